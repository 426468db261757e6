"""Every registered preference loss trained on the toy task from one SFT checkpoint: does it learn?

    python benchmarks/loss_family.py --out /tmp/loss_family [--losses dpo,simpo,...] [--sft RUN_DIR]

Trains the `tiny` model with SFT once (the default quick-start settings; `--sft` reuses a finished SFT
run), then each loss for one epoch from its `LATEST/policy.pt` with the tiny model's preference
settings (`model/tiny.yaml`: lr 3e-5, 1 epoch) and the loss's own defaults (beta 0.1 where the loss
requires one). Every run is a real `train.py` process, one after another on the same cores.

For each loss it reports, from the last evaluation in `metrics.jsonl`: held-out reward accuracy
(for reference-free losses the rewards are the policy's own, possibly length-normalised, log-probs,
so this is its chosen-vs-rejected log-prob accuracy), the toy judge's mean score of the policy's
samples next to the SFT model's, `logps_eval/chosen` against the SFT model's, and whether every
train loss stayed finite. Writes `OUT/loss_family.json` and `OUT/loss_family.md`.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dpo.losses import LOSSES, build_loss  # noqa: E402

# what the yaml of a loss leaves to the command line (beta, as the reference does for dpo)
REQUIRED = {name: ["loss.beta=0.1"] for name in ("dpo", "cdpo", "ipo", "rpo")}
REQUIRED["weighted_sum"] = ["loss.terms={dpo:{weight:1.0,beta:0.1},sft:{weight:0.05}}"]


def train(run_dir: Path, out: Path, overrides: list[str]) -> float:
    """Run train.py into `run_dir`; return its wall time in seconds."""
    argv = [sys.executable, "train.py", "wandb.enabled=false", f"local_dirs=[{out / 'cache'}]",
            f"local_run_dir={run_dir}", "overwrite_run_dir=true", *overrides]
    start = time.time()
    with open(run_dir.with_suffix(".log"), "w") as log:
        subprocess.run(argv, cwd=REPO, check=True, stdout=log, stderr=subprocess.STDOUT)
    return time.time() - start


def events(run_dir: Path, kind: str) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [row for row in rows if row["event"] == kind]


def loss_overrides(name: str) -> list[str]:
    return [f"loss={name}", *REQUIRED.get(name, [])]


def summarize(name: str, run_dir: Path, seconds: float, sft: dict) -> dict:
    final = events(run_dir, "eval")[-1]
    train_losses = [row.get("loss/train") for row in events(run_dir, "train")]
    loss = build_loss(yaml.safe_load((run_dir / "config.yaml").read_text())["loss"])
    return {
        "loss": name, "reference": loss.needs_reference, "seconds": round(seconds, 1),
        "finite": all(value is not None and math.isfinite(value) for value in train_losses),
        "accuracy": final.get("rewards_eval/accuracies"), "judge_policy": final.get("judge_eval/policy"),
        "judge_sft": sft["judge_eval/policy"], "logps_chosen": final.get("logps_eval/chosen"),
        "logps_chosen_sft": sft["logps_eval/chosen"], "loss_eval": final.get("loss/eval"),
    }


def markdown(rows: list[dict], sft_seconds: float) -> str:
    lines = [f"SFT: {sft_seconds:.0f} s; each loss: one epoch from its checkpoint.", "",
             "| loss | reference | held-out reward acc. | judge: policy | judge: SFT | logps_eval/chosen (SFT) "
             "| finite | s |", "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        accuracy = "n/a" if row["accuracy"] is None else f"{row['accuracy']:.3f}"
        lines.append(f"| {row['loss']} | {'yes' if row['reference'] else 'no'} | {accuracy} "
                     f"| {row['judge_policy']:.3f} | {row['judge_sft']:.3f} "
                     f"| {row['logps_chosen']:.2f} ({row['logps_chosen_sft']:.2f}) "
                     f"| {'yes' if row['finite'] else 'NO'} | {row['seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--losses", help="comma-separated loss names (default: every registered one but sft)")
    parser.add_argument("--sft", type=Path, help="a finished SFT run directory to start from")
    args = parser.parse_args()
    out = args.out.resolve()
    (out / "runs").mkdir(parents=True, exist_ok=True)
    names = args.losses.split(",") if args.losses else sorted(name for name in LOSSES if name != "sft")

    sft_dir, sft_seconds = args.sft, 0.0
    if sft_dir is None:
        sft_dir = out / "runs" / "sft"
        sft_seconds = train(sft_dir, out, ["loss=sft"])
        print(f"sft: {sft_seconds:.0f} s", flush=True)
    sft = events(sft_dir, "eval")[-1]
    archive = sft_dir / "LATEST" / "policy.pt"

    rows = []
    for name in names:
        run_dir = out / "runs" / name
        seconds = train(run_dir, out, [*loss_overrides(name), f"model.archive={archive}"])
        rows.append(summarize(name, run_dir, seconds, sft))
        print(json.dumps(rows[-1]), flush=True)
    (out / "loss_family.json").write_text(json.dumps({"sft": sft, "losses": rows}, indent=1))
    (out / "loss_family.md").write_text(markdown(rows, sft_seconds))
    print(markdown(rows, sft_seconds))


if __name__ == "__main__":
    main()
