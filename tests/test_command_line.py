"""`python train.py` with a command line Hydra cannot compose: one line naming the key or option, the closest
one that exists and what exists, exit code 1, and nothing written."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def train(*arguments: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "train.py"), *arguments], cwd=cwd, capture_output=True,
                          text=True, timeout=120)


@pytest.mark.parametrize("arguments, message", [
    (["bacth_size=8"], "error: bacth_size=8: the config has no setting 'bacth_size'; did you mean batch_size? "
                       "(the settings are the keys of config/config.yaml)"),
    (["loss=dpoo"], "error: loss=dpoo: there is no loss named 'dpoo'; did you mean loss=dpo? (the loss options are "
                    "the files of config/loss/: aot, aot_unpaired,"),
    (["loss=dpo", "loss.bta=0.1"], "error: loss.bta=0.1: loss=dpo has no setting 'bta'; did you mean loss.beta? "
                                   "(its settings: beta, label_smoothing, name, reference_free, rpo_alpha)"),
    (["lora={r:4}"], "error: lora={r:4}: lora has no setting 'r' (its settings: alpha, dropout, rank, target_modules)"),
    (["loss=dpo,ipo"], "error: loss=dpo,ipo: a comma-separated value asks Hydra for one run per value, which needs "
                       "--multirun"),
])
def test_an_unknown_key_or_option_is_one_line(tmp_path, arguments, message):
    finished = train(*arguments, f"local_run_dir={tmp_path / 'run'}", cwd=tmp_path)
    assert finished.returncode == 1
    lines = finished.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message), finished.stderr
    assert "HYDRA_FULL_ERROR" not in finished.stderr and "+bacth_size" not in finished.stderr
    assert not (tmp_path / "run").exists() and list(tmp_path.iterdir()) == []


def test_resuming_with_a_setting_of_the_runs_loss_says_the_run_keeps_its_config(tmp_path):
    run_dir = tmp_path / "dpo_run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text("loss:\n  name: dpo\n  beta: 0.1\n")
    finished = train(f"resume={run_dir}", "loss.beta=0.2")
    assert finished.returncode == 1
    assert finished.stderr.strip() == (
        f"error: cannot resume with loss.beta=0.2: a resumed run keeps the config it was started with "
        f"({run_dir}/config.yaml, where loss.beta is 0.1); drop the override to continue the run as it was, or "
        "start a new run (without resume=) to train with it")
    assert sorted(path.name for path in run_dir.iterdir()) == ["config.yaml"]


def test_hydra_flags_still_reach_hydra():
    finished = train("loss=dpo", "loss.beta=0.1", "--cfg", "job")
    assert finished.returncode == 0 and "beta: 0.1" in finished.stdout


def test_n_epochs_ending_the_run_before_n_examples_is_said_once(tmp_path):
    rows = [{"prompt": f"\n\nHuman: reverse w{i}\n\nAssistant:", "chosen": f" {i}w", "rejected": f" w{i}"}
            for i in range(8)]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    test = tmp_path / "pairs_test.jsonl"
    finished = train("loss=sft", f"datasets=[{data}]", "n_epochs=1", "n_examples=16", "batch_size=4", "n_eval_examples=0",
                     "wandb.enabled=false", "sample_during_eval=false", f"local_run_dir={tmp_path / 'run'}")
    assert finished.returncode == 0, finished.stderr[-2000:]
    notes = [line for line in finished.stdout.splitlines() if line.startswith("note: n_epochs=")]
    assert notes == ["note: n_epochs=1 ends the run after 4 examples (1 epoch of the training data), before "
                     "n_examples=16; pass n_epochs=null to train on 16 examples"], finished.stdout[-2000:]
    assert not test.exists()
