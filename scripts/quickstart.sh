#!/usr/bin/env bash
# Set up, then run the embedded default: SFT and then DPO of the `tiny` model on the `toy` task, on CPU.
# Prints held-out reward accuracy and the judge's score of DPO policy samples against the SFT model's.
set -euo pipefail
cd "$(dirname "$0")/.."
pip install -q torch==2.13.0 && pip install -q -e ".[plot]"  # plot: the figures each run writes to plots/
# overwrite_run_dir=true: rerunning the quick start replaces its own earlier runs (any other run directory
# that already holds a run is refused).
python train.py loss=sft exp_name=toy_sft local_run_dir=runs/toy_sft wandb.enabled=false overwrite_run_dir=true
python train.py loss=dpo loss.beta=0.1 exp_name=toy_dpo model.archive=runs/toy_sft/LATEST/policy.pt \
    local_run_dir=runs/toy_dpo wandb.enabled=false overwrite_run_dir=true
python scripts/summarize_runs.py runs/toy_sft runs/toy_dpo
