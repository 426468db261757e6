"""`python train.py resume=...` with damaged checkpoints and refused command lines: one line naming the file or key
and a fix that is true (following it works), exit code 1, and the run directory left exactly as it was."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from test_train import REPO

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
# three steps of 8 DPO pairs, a checkpoint after each, no evaluation
RUN = ["loss=dpo", "loss.beta=0.1", "lr=1e-3", "warmup_steps=2", "batch_size=8", "n_examples=24", "save_every=8",
       "eval_every=100000", "do_first_eval=false", "n_eval_examples=8", "eval_batch_size=8",
       "sample_during_eval=false", "wandb.enabled=false"]


def train(*arguments) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "train.py", *arguments], cwd=REPO, env=ENV, capture_output=True, text=True,
                          timeout=240)


def snapshot(directory: Path) -> dict:
    return {str(path.relative_to(directory)): path.read_bytes() for path in sorted(directory.rglob("*"))
            if path.is_file()}


def refused(result: subprocess.CompletedProcess) -> str:
    """The one-line error of a refused command (exit 1, no traceback)."""
    assert result.returncode == 1, (result.returncode, result.stderr[-3000:])
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-3000:]
    return lines[0][len("error: "):]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    result = train(*RUN, f"local_run_dir={run_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert {"step-8", "step-16", "LATEST"} <= set(os.listdir(run_dir))
    return run_dir


def copy_of(run: Path, tmp_path: Path, without=()) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    for name in without:
        shutil.rmtree(copy / name)
    (copy / "config.yaml").write_text((copy / "config.yaml").read_text().replace(str(run), str(copy)))
    return copy


def garbage(path: Path) -> None:
    path.write_bytes(b"not a checkpoint\n")


def truncated(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def without_state(path: Path) -> None:
    torch.save({"step_idx": 16, "metrics": {}}, path)


def only(run: Path, *kept: str) -> list[str]:
    """The checkpoints of `run` other than `kept`."""
    return [name for name in os.listdir(run) if (name == "LATEST" or name.startswith("step-")) and name not in kept]


def test_a_damaged_step_checkpoint_is_named_with_the_one_before_it(finished_run, tmp_path):
    run = copy_of(finished_run, tmp_path, without=only(finished_run, "step-8", "step-16"))
    garbage(run / "step-16" / "train_state.pt")
    before = snapshot(run)
    message = refused(train(f"resume={run}", "n_examples=32"))
    assert message == (f"{run}/step-16/train_state.pt is not readable (Weights only load failed), so {run}/step-16 "
                       f"cannot be resumed from; to resume from the checkpoint before it, {run}/step-8, move it aside, "
                       f"e.g. mv {run}/step-16 {run}/step-16.damaged")
    assert snapshot(run) == before


def test_following_the_advice_for_a_truncated_optimizer_file_resumes_from_the_checkpoint_before(finished_run, tmp_path):
    run = copy_of(finished_run, tmp_path, without=only(finished_run, "step-8", "step-16"))
    truncated(run / "step-16" / "optimizer.pt")
    message = refused(train(f"resume={run}"))
    assert message.startswith(f"{run}/step-16/optimizer.pt is not readable (PytorchStreamReader failed reading zip "
                              "archive: failed finding central directory), so "), message
    assert message.endswith(f"e.g. mv {run}/step-16 {run}/step-16.damaged")
    os.rename(run / "step-16", run / "step-16.damaged")
    result = train(f"resume={run}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resuming {run} from {run}/step-8 after 8 examples" in result.stdout
    assert (run / "LATEST" / "policy.pt").is_file() and (run / "step-16.damaged").is_dir()


@pytest.mark.parametrize("damage, reason", [
    (truncated, "is not readable ("),
    (without_state, "is not a checkpoint file: it holds a dict of metrics, step_idx, not a dict with 'state'"),
])
def test_other_damaged_train_states_are_named_too(finished_run, tmp_path, damage, reason):
    # the same check as above, which train.py runs before loading anything; called directly to save a process
    from dpo.errors import CheckpointError
    from dpo.resume import resumable_checkpoint

    run = copy_of(finished_run, tmp_path, without=only(finished_run, "step-8", "step-16"))
    damage(run / "step-16" / "train_state.pt")
    with pytest.raises(CheckpointError) as caught:
        resumable_checkpoint(str(run))
    assert str(caught.value).startswith(f"{run}/step-16/train_state.pt {reason}")
    assert str(caught.value).endswith(f"to resume from the checkpoint before it, {run}/step-8, move it aside, e.g. "
                                      f"mv {run}/step-16 {run}/step-16.damaged")


def test_the_only_checkpoint_damaged_says_to_start_a_new_run_from_its_weights(finished_run, tmp_path):
    run = copy_of(finished_run, tmp_path, without=only(finished_run, "step-8"))
    garbage(run / "step-8" / "train_state.pt")
    message = refused(train(f"resume={run}"))
    assert message.endswith(f", so {run}/step-8 cannot be resumed from; no earlier checkpoint can be resumed from; "
                            f"start a new run (without resume=), from these weights with "
                            f"model.archive={run}/step-8/policy.pt if that file is intact"), message


def test_a_damaged_latest_is_moved_aside_not_deleted(finished_run, tmp_path):
    run = copy_of(finished_run, tmp_path)
    garbage(run / "LATEST" / "train_state.pt")
    message = refused(train(f"resume={run}", "n_examples=32"))
    newest = max(int(name[len("step-"):]) for name in os.listdir(run) if name.startswith("step-"))
    assert message.startswith(f"{run}/LATEST/train_state.pt is not readable"), message
    assert message.endswith(f"to resume from the checkpoint before it, {run}/step-{newest}, move it aside (keep it: "
                            f"it holds the run's final weights), e.g. mv {run}/LATEST {run}/LATEST.damaged"), message
    assert "delete" not in message


@pytest.mark.parametrize("override", ["resume=true", "+resume=true"])
def test_resume_true_is_refused_in_one_line(override):
    assert refused(train(override)) == (
        "resume=true is not a run directory; resume= takes the directory of the run to continue (the 'run "
        "directory:' it printed when it started), e.g. resume=runs/my_run")


def test_resume_with_a_key_of_the_runs_own_loss_says_the_run_keeps_its_config(finished_run, tmp_path):
    # loss.beta is a key of the run's loss (dpo), not of the default config (sft) that the command line is
    # composed on, so Hydra refuses it before train.py sees it, with advice (+loss.beta) that does not apply here.
    message = refused(train(f"resume={finished_run}", "loss.beta=0.2"))
    assert message.startswith("cannot resume with loss.beta=0.2: a resumed run keeps the config it was started with "
                              f"({finished_run}/config.yaml, where loss.beta is 0.1)"), message
    assert "start a new run (without resume=)" in message and "+loss.beta" not in message
