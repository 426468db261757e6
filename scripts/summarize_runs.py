"""Print the final evaluation of each run directory given, from its metrics.jsonl.

    python scripts/summarize_runs.py runs/toy_sft runs/toy_dpo
"""

import json
import sys

KEYS = ("loss/eval", "rewards_eval/accuracies", "rewards_eval/margins", "judge_eval/policy", "judge_eval/reference")


def final_eval(run_dir: str) -> dict:
    with open(f"{run_dir}/metrics.jsonl") as file:
        evals = [record for record in map(json.loads, file) if record["event"] == "eval"]
    if not evals:
        sys.exit(f"error: {run_dir}/metrics.jsonl has no eval record; did the run finish?")
    return evals[-1]


def main(run_dirs: list[str]) -> None:
    for run_dir in run_dirs:
        record = final_eval(run_dir)
        shown = ", ".join(f"{key} {record[key]:.3f}" for key in KEYS if record.get(key) is not None)
        print(f"{run_dir} after {record['step']} examples: {shown}")


if __name__ == "__main__":
    main(sys.argv[1:])
