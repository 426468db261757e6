"""LoRA DPO against full fine-tuning DPO, from one SFT checkpoint of the tiny model on the toy task.

    python benchmarks/lora_vs_full.py --out OUT [--sft RUN_DIR] [--rank 16] [--lora-lr 3e-4,1e-4]

Trains SFT once (or reuses `--sft`), then DPO (beta 0.1, one epoch, the tiny model's preference settings)
from its `LATEST/policy.pt`: once training every weight with a separate reference model, and once per
LoRA learning rate with adapters and the adapter-free policy as the reference. Each run is its own
`train.py` process, one after the other. Reports held-out reward accuracy and margins, the judge's score of the samples, wall time, the
process's peak resident memory (from `wait4`), and the bytes of model state each run keeps (weights,
gradients and AdamW's two moments of what trains, plus the reference model's weights). Writes
`OUT/lora_vs_full.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.loss_family import events  # noqa: E402


def train(run_dir: Path, out: Path, overrides: list[str]) -> tuple[float, int]:
    """Run train.py into `run_dir`; return (wall seconds, peak resident memory in bytes)."""
    argv = [sys.executable, "train.py", "wandb.enabled=false", f"local_dirs=[{out / 'cache'}]",
            f"local_run_dir={run_dir}", "overwrite_run_dir=true", *overrides]
    start = time.time()
    with open(run_dir.with_suffix(".log"), "w") as log:
        process = subprocess.Popen(argv, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(process.pid, 0)
    if status != 0:
        raise SystemExit(f"{argv} failed; see {run_dir.with_suffix('.log')}")
    return time.time() - start, usage.ru_maxrss * 1024  # Linux reports kilobytes


def model_state_bytes(run_dir: Path, lora: bool) -> dict:
    """Parameters that train and that stay frozen, and the bytes of state each kind keeps (float32)."""
    import torch
    from omegaconf import OmegaConf

    from dpo.models import load_models, load_tokenizer

    config = OmegaConf.load(run_dir / "config.yaml")
    policy, reference = load_models(config, load_tokenizer(config.model), True, None, verbose=False)
    trainable = sum(p.numel() for p in policy.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in policy.parameters() if not p.requires_grad)
    reference_params = sum(p.numel() for p in reference.parameters()) if reference is not None else 0
    size = torch.finfo(torch.float32).bits // 8
    # weights + gradient + AdamW's exp_avg and exp_avg_sq for what trains; weights only for the rest
    return {"trainable_parameters": trainable, "frozen_parameters": frozen + reference_params,
            "model_state_bytes": size * (4 * trainable + frozen + reference_params)}


def summarize(name: str, run_dir: Path, seconds: float, peak_rss: int, lora: bool) -> dict:
    final = events(run_dir, "eval")[-1]
    return {"run": name, "lr": _lr(run_dir), "accuracy": final["rewards_eval/accuracies"],
            "margins": final["rewards_eval/margins"], "judge_policy": final.get("judge_eval/policy"),
            "judge_reference": final.get("judge_eval/reference"), "seconds": round(seconds, 1),
            "peak_rss_mib": round(peak_rss / 2**20, 1), **model_state_bytes(run_dir, lora)}


def _lr(run_dir: Path) -> float:
    from omegaconf import OmegaConf

    return float(OmegaConf.load(run_dir / "config.yaml").lr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--sft", type=Path, help="a finished SFT run directory of the tiny model to start from")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--alpha", type=float, default=32)
    parser.add_argument("--lora-lr", default="3e-4", help="comma-separated learning rates for LoRA, whose adapters "
                        "start at zero and need more than full fine-tuning's 3e-5")
    args = parser.parse_args()
    out = args.out.resolve()
    (out / "runs").mkdir(parents=True, exist_ok=True)
    sft_dir = args.sft
    if sft_dir is None:
        sft_dir = out / "runs" / "sft"
        print(f"sft: {train(sft_dir, out, ['loss=sft'])[0]:.0f} s", flush=True)
    dpo = ["loss=dpo", "loss.beta=0.1", f"model.archive={sft_dir.resolve() / 'LATEST' / 'policy.pt'}"]
    lora = [f"lora.rank={args.rank}", f"lora.alpha={args.alpha}"]
    runs = [("full", dpo)] + [(f"lora_lr{lr}", dpo + lora + [f"lr={lr}"]) for lr in args.lora_lr.split(",")]
    rows = []
    for name, overrides in runs:
        run_dir = out / "runs" / name
        rows.append(summarize(name, run_dir, *train(run_dir, out, overrides), lora=name != "full"))
        print(json.dumps(rows[-1]), flush=True)
    (out / "lora_vs_full.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
