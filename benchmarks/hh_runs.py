"""Whole DPO runs on real HH-RLHF rows, once per log-prob path: the same losses, and how much faster.

    python benchmarks/hh_runs.py --out /tmp/hh_runs [--examples 96] [--hidden 512] [--layers 6]

Each path is a real `train.py` run (a fresh process, one after another, so they do not share the
cores) of a small GPT-NeoX built from a config with the real GPT-NeoX tokenizer, on the first rows
of `../shared/data/hh-rlhf/harmless-base-test.jsonl.gz` (batches of 8 pairs, 512/256 truncation,
as the reference trains on HH). It reports the median `examples_per_second` over the steps after
the first, the speed-up over the plain path, and the largest relative difference of any step's
`loss/train` from the plain path's. Writes `OUT/hh_runs.json` and `OUT/hh_runs.md`.
"""

from __future__ import annotations

import argparse
import gzip
import itertools
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
HH_ROWS = SHARED / "data" / "hh-rlhf" / "harmless-base-test.jsonl.gz"
TOKENIZER = SHARED / "tokenizers" / "gpt-neox-20b"
PATHS = {
    "plain (reference layout, full logits)": ["lm_head_chunk_size=null"],
    "chunked head (default)": [],
    "packing": ["packing=true"],
    "packing + prefix sharing": ["packing=true", "prefix_sharing=true"],
    "packing + prefix sharing + cached reference": ["packing=true", "prefix_sharing=true", "cache_reference_logps=true"],
}


def write_data(folder: Path, n_train: int, n_test: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    with gzip.open(HH_ROWS, "rt") as rows:
        lines = list(itertools.islice(rows, n_train + n_test))
    (folder / "train.jsonl").write_text("".join(lines[:n_train]))
    (folder / "test.jsonl").write_text("".join(lines[n_train:]))


def run(out: Path, name: str, overrides: list[str], args) -> dict:
    run_dir = out / "runs" / name.replace(" ", "_").replace("(", "").replace(")", "").replace(",", "")
    model = (f"model.from_config={{model_type: gpt_neox, hidden_size: {args.hidden}, num_hidden_layers: {args.layers}, "
             f"num_attention_heads: {max(1, args.hidden // 64)}, intermediate_size: {4 * args.hidden}, "
             "max_position_embeddings: 2048, rotary_pct: 0.25}")
    argv = [sys.executable, "train.py", "loss=dpo", "loss.beta=0.1", model, f"model.tokenizer_name_or_path={TOKENIZER}",
            f"datasets=[{out / 'data'}]", "batch_size=8", "max_length=512", "max_prompt_length=256",
            f"n_examples={args.examples}", "n_eval_examples=8", "sample_during_eval=false", "do_first_eval=false",
            "eval_every=1000000", "lr=1e-4", "warmup_steps=0", "wandb.enabled=false", "debug=true",
            f"local_dirs=[{out / 'cache'}]", f"local_run_dir={run_dir}", "overwrite_run_dir=true", *overrides]
    start = time.time()
    subprocess.run(argv, cwd=REPO, check=True, stdout=subprocess.DEVNULL)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [row for row in rows if row["event"] == "train"]
    return {"path": name, "overrides": overrides, "wall_seconds": time.time() - start,
            "losses": [row["loss/train"] for row in steps],
            "examples_per_second": statistics.median(row["examples_per_second"] for row in steps[1:])}


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--examples", type=int, default=96, help="training pairs per run (8 per step)")
    parser.add_argument("--hidden", type=int, default=512, help="512 x 6 layers: the shape of Pythia-70m")
    parser.add_argument("--layers", type=int, default=6)
    args = parser.parse_args(argv)
    if not (HH_ROWS.is_file() and TOKENIZER.is_dir()):
        sys.exit(f"needs {HH_ROWS} and {TOKENIZER} (../shared beside the checkout)")
    write_data(args.out / "data", n_train=args.examples, n_test=8)
    results = [run(args.out, name, overrides, args) for name, overrides in PATHS.items()]
    lines = [f"DPO on the first {args.examples} real HH-RLHF pairs (harmless-base-test), GPT-NeoX hidden {args.hidden} x "
             f"{args.layers} layers from config with the real GPT-NeoX tokenizer, batches of 8, max_length 512, "
             f"CPU with {os.cpu_count()} cores; `python benchmarks/hh_runs.py --out OUT --examples {args.examples}`.", "",
             *table(results)]
    (args.out / "hh_runs.json").write_text(json.dumps(results, indent=1))
    (args.out / "hh_runs.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return results


def table(results: list[dict]) -> list[str]:
    """Markdown rows: speed against the plain path and against the default (chunked head), loss agreement."""
    plain, default = results[0], results[1]
    lines = ["| path | examples/s (median) | x plain | x default | max rel. loss difference per step |",
             "|---|---|---|---|---|"]
    for result in results:
        result["speedup"] = result["examples_per_second"] / plain["examples_per_second"]
        result["speedup_over_default"] = result["examples_per_second"] / default["examples_per_second"]
        result["max_relative_loss_difference"] = max(abs(a - b) / abs(b) for a, b in zip(result["losses"], plain["losses"]))
        lines.append(f"| {result['path']} | {result['examples_per_second']:.2f} | {result['speedup']:.2f}x | "
                     f"{result['speedup_over_default']:.2f}x | {result['max_relative_loss_difference']:.1e} |")
    return lines


if __name__ == "__main__":
    main()
