"""The judge scores each held-out prompt once: a prompt with several pairs (the toy task has two per prompt) is
sampled once per evaluation. That parallel trainers sample the same prompts as one process is
test_distributed's test_parallel_trainers_sample_the_same_prompts_and_honour_mixed_precision."""

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
COMMON = ("loss=dpo", "loss.beta=0.1", "n_examples=64", "eval_every=64", "batch_size=8", "eval_batch_size=8",
          "n_eval_examples=40", "n_eval_model_samples=15", "max_length=24", "max_prompt_length=16",
          "wandb.enabled=false", "do_first_eval=false")


def eval_records(run_dir: Path) -> tuple[list[dict], list[dict]]:
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    samples = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    return [record for record in metrics if record["event"] == "eval"], samples


def test_each_prompt_is_sampled_and_judged_once(tmp_path):
    finished = subprocess.run([sys.executable, "train.py", *COMMON, f"local_run_dir={tmp_path}"],
                              cwd=REPO, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr[-3000:]
    evals, samples = eval_records(tmp_path)
    # 40 eval pairs are the first 20 prompts' two pairs each; the first 15 of those prompts are sampled, once each
    prompts = [row["prompt"] for row in samples]
    assert len(prompts) == 15 and max(Counter(prompts).values()) == 1
    assert all(set(row) >= {"judge_policy", "judge_reference"} for row in samples)
    assert evals[-1]["counters/sampled_prompts"] == 15
    assert evals[-1]["judge_eval/policy"] == pytest.approx(sum(row["judge_policy"] for row in samples) / 15)
