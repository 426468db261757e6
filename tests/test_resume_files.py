"""Resuming a killed run, the file-level part: repairing half-written checkpoints, finding the newest
resumable one, cutting the logs back to its step, and refusing config changes that alter the run.

Checkpoints here are small `torch.save`d dicts in the reference layout; one test kills a real
writer process, the rest stage what a kill leaves by hand or by failing a rename on purpose.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # dpo/ lives in the repo root
    sys.path.insert(0, str(REPO_ROOT))

from dpo import checkpoints  # noqa: E402
from dpo.checkpoints import write_checkpoint  # noqa: E402
from dpo.config import CONFIG_DIR, register_resolvers  # noqa: E402
from dpo.errors import CheckpointError, ConfigError, RunDirError  # noqa: E402
from dpo.resume import (RESUME_STATE_FILE, repair_checkpoints, resumable_checkpoint, resumed_config,  # noqa: E402
                        truncate_logs)

# ---- helpers ---------------------------------------------------------------------------------------


def make_run(tmp_path: Path) -> Path:
    run = tmp_path / "run"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text("seed: 0\n")
    return run


def states(step: int, resumable: bool = True) -> dict:
    found = {"policy.pt": {"w": torch.full((2,), float(step))}, "optimizer.pt": {"state": {}}, "scheduler.pt": {}}
    if resumable:
        found[RESUME_STATE_FILE] = {"example_counter": step}
    return found


def put_checkpoint(directory: Path, step: int, resumable: bool = True, torn: bool = False) -> Path:
    """A checkpoint directory as write_checkpoint lays it out; `torn` leaves its last file half-written."""
    directory.mkdir()
    for filename, state in states(step, resumable).items():
        torch.save({"step_idx": step, "state": state, "metrics": {}}, directory / filename)
    if torn:
        last = directory / RESUME_STATE_FILE
        last.write_bytes(last.read_bytes()[:20])
    return directory


def step_of(directory: Path) -> int:
    """The step every file of a checkpoint agrees on (fails on a torn or mixed checkpoint)."""
    steps = {torch.load(path, weights_only=True)["step_idx"] for path in directory.iterdir()}
    assert len(steps) == 1, (directory, steps)
    return steps.pop()


def names(run: Path) -> list[str]:
    return sorted(path.name for path in run.iterdir())


def snapshot(directory: Path) -> dict:
    return {str(path.relative_to(directory)): path.read_bytes() for path in sorted(directory.rglob("*"))
            if path.is_file()}


# ---- repair_checkpoints ----------------------------------------------------------------------------


def test_repair_deletes_an_unfinished_write(tmp_path):
    run = make_run(tmp_path)
    put_checkpoint(run / "step-64", 64)
    put_checkpoint(run / "step-128.partial", 128, torn=True)
    notes = repair_checkpoints(str(run))
    assert len(notes) == 1 and "step-128.partial" in notes[0] and "deleted" in notes[0]
    assert names(run) == ["config.yaml", "step-64"]
    assert step_of(run / "step-64") == 64


def test_repair_restores_previous_when_killed_between_the_two_renames(tmp_path):
    run = make_run(tmp_path)
    put_checkpoint(run / "LATEST.previous", 64)
    put_checkpoint(run / "LATEST.partial", 128)
    notes = repair_checkpoints(str(run))
    assert len(notes) == 2
    assert any("restored" in note and str(run / "LATEST") in note for note in notes), notes
    assert names(run) == ["LATEST", "config.yaml"]
    assert step_of(run / "LATEST") == 64


def test_repair_removes_a_stale_previous_and_keeps_the_new_checkpoint(tmp_path):
    run = make_run(tmp_path)
    put_checkpoint(run / "LATEST", 128)
    put_checkpoint(run / "LATEST.previous", 64)
    (run / "LATEST.previous" / "policy.pt").unlink()  # a kill in the middle of its deletion
    notes = repair_checkpoints(str(run))
    assert len(notes) == 1 and "LATEST.previous" in notes[0]
    assert names(run) == ["LATEST", "config.yaml"]
    assert step_of(run / "LATEST") == 128


def test_repair_with_nothing_to_do_changes_nothing(tmp_path):
    run = make_run(tmp_path)
    put_checkpoint(run / "step-64", 64)
    put_checkpoint(run / "LATEST", 64)
    (run / "metrics.jsonl").write_text('{"step": 64}\n')
    (run / "notes.partial").mkdir()  # not a checkpoint: none of repair's business
    before = snapshot(run)
    assert repair_checkpoints(str(run)) == []
    assert snapshot(run) == before and (run / "notes.partial").is_dir()
    assert repair_checkpoints(str(tmp_path / "nowhere")) == []


class Killed(BaseException):
    """Stands in for SIGKILL: nothing after the raise runs, as nothing after a kill does."""


# The file operations of _replace_directory, in order: rmtree(stale previous), rename(target ->
# previous), rename(partial -> target), rmtree(previous). A kill before operation k, for each k; 4 is
# no kill at all. Before the second rename completes the old checkpoint (64) is the resumable one.
@pytest.mark.parametrize("kill_before, expected_step", [(0, 64), (1, 64), (2, 64), (3, 128), (4, 128)])
def test_a_kill_anywhere_in_the_directory_swap_is_repaired(tmp_path, kill_before, expected_step):
    run = make_run(tmp_path)
    write_checkpoint(str(run / "LATEST"), 64, {}, states(64))
    operations = []

    def killing(real):
        def operation(*args, **kwargs):
            if len(operations) == kill_before:
                raise Killed
            operations.append(real.__name__)
            return real(*args, **kwargs)
        return operation

    original_swap = checkpoints._replace_directory

    def swap_then_die(new, target):
        real_replace, real_rmtree = os.replace, shutil.rmtree
        os.replace, shutil.rmtree = killing(real_replace), killing(real_rmtree)
        try:
            original_swap(new, target)
        finally:
            os.replace, shutil.rmtree = real_replace, real_rmtree

    checkpoints._replace_directory = swap_then_die
    try:
        with pytest.raises(Killed) if kill_before < 4 else contextlib.nullcontext():
            write_checkpoint(str(run / "LATEST"), 128, {}, states(128))
    finally:
        checkpoints._replace_directory = original_swap
    assert len(operations) == min(kill_before, 4)

    repair_checkpoints(str(run))
    assert names(run) == ["LATEST", "config.yaml"]
    assert resumable_checkpoint(str(run)) == (str(run / "LATEST"), expected_step)
    assert step_of(run / "LATEST") == expected_step


WRITER = r"""
import os, sys, torch
sys.path.insert(0, sys.argv[2])
from dpo.checkpoints import write_checkpoint
run = sys.argv[1]
policy = {f"w{i}": torch.empty(512, 1024) for i in range(4)}  # 8 MB: most of the time goes to writing
step = 0
while True:
    step += 64
    for tensor in policy.values():
        tensor.fill_(float(step))
    states = {"policy.pt": policy, "optimizer.pt": {}, "scheduler.pt": {}, "train_state.pt": {"example_counter": step}}
    for name in (f"step-{step}", "LATEST"):
        write_checkpoint(os.path.join(run, name), step, {}, states)
        print(name, step, flush=True)
"""


def test_a_real_sigkill_while_writing_checkpoints_loses_no_complete_checkpoint(tmp_path):
    rng = random.Random(0)
    for round_ in range(3):
        run = make_run(tmp_path / f"round{round_}")
        process = subprocess.Popen([sys.executable, "-c", WRITER, str(run), str(REPO_ROOT)],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            ready, _, _ = select.select([process.stdout], [], [], 60)
            assert ready and process.stdout.readline(), f"the writer wrote no checkpoint: {process.stderr.read()}"
            time.sleep(rng.uniform(0.0, 0.4))
        finally:
            process.send_signal(signal.SIGKILL)
            process.wait()
        finished = process.stdout.read().split()
        process.stdout.close()
        process.stderr.close()
        # every write that reported itself complete must survive the kill and the repair
        steps = [int(word) for word in finished if word.isdigit()]  # a kill can cut the last line after its name
        completed = steps[-1] if steps else 64
        repair_checkpoints(str(run))
        assert not [name for name in names(run) if name.endswith((".partial", ".previous"))], names(run)
        directory, step = resumable_checkpoint(str(run))
        assert step >= completed
        assert step_of(Path(directory)) == step
        assert bool((torch.load(Path(directory) / "policy.pt", weights_only=True)["state"]["w0"] == step).all())


# ---- resumable_checkpoint --------------------------------------------------------------------------


def test_the_largest_step_wins_whether_step_n_or_latest(tmp_path):
    run = make_run(tmp_path)
    put_checkpoint(run / "step-64", 64)
    put_checkpoint(run / "step-128", 128)
    put_checkpoint(run / "LATEST", 96)  # written at the end of a shorter first part of the run
    put_checkpoint(run / "step-192", 192, resumable=False)  # from before resume support
    assert resumable_checkpoint(str(run)) == (str(run / "step-128"), 128)

    shutil.rmtree(run / "LATEST")
    put_checkpoint(run / "LATEST", 256)
    assert resumable_checkpoint(str(run)) == (str(run / "LATEST"), 256)


def test_latest_takes_its_step_from_its_train_state_and_wins_a_tie(tmp_path):
    run = make_run(tmp_path)
    put_checkpoint(run / "step-128", 128)
    put_checkpoint(run / "LATEST", 128)
    assert resumable_checkpoint(str(run)) == (str(run / "LATEST"), 128)
    # the step comes from train_state.pt, not from policy.pt
    torch.save({"step_idx": 64, "state": {}, "metrics": {}}, run / "LATEST" / RESUME_STATE_FILE)
    assert resumable_checkpoint(str(run)) == (str(run / "step-128"), 128)


def test_numeric_not_alphabetical_order_of_steps(tmp_path):
    run = make_run(tmp_path)
    put_checkpoint(run / "step-960", 960)
    put_checkpoint(run / "step-1024", 1024)
    assert resumable_checkpoint(str(run)) == (str(run / "step-1024"), 1024)


def test_a_missing_run_directory_is_named_with_the_fix(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(RunDirError, match="does not exist") as caught:
        resumable_checkpoint(str(missing))
    assert f"resume={missing}" in str(caught.value) and "pass the directory of the run" in str(caught.value)

    file = tmp_path / "a_file"
    file.write_text("")
    with pytest.raises(RunDirError, match="is a file, not a directory"):
        resumable_checkpoint(str(file))


def test_a_directory_without_config_yaml_is_not_a_run(tmp_path):
    put_checkpoint(tmp_path / "LATEST", 64)
    with pytest.raises(RunDirError, match="holds no config.yaml, so it is not a run directory") as caught:
        resumable_checkpoint(str(tmp_path))
    assert str(tmp_path) in str(caught.value) and "pass the directory of the run" in str(caught.value)


def test_a_run_without_checkpoints_must_start_again(tmp_path):
    run = make_run(tmp_path)
    put_checkpoint(run / "step-64.partial", 64)  # unfinished: not a checkpoint
    with pytest.raises(RunDirError, match="holds no checkpoint") as caught:
        resumable_checkpoint(str(run))
    assert str(run) in str(caught.value) and "start the run again" in str(caught.value)


def test_checkpoints_from_before_resume_support_are_explained(tmp_path):
    run = make_run(tmp_path)
    put_checkpoint(run / "step-64", 64, resumable=False)
    put_checkpoint(run / "step-128", 128, resumable=False)
    with pytest.raises(RunDirError, match="from before resume support") as caught:
        resumable_checkpoint(str(run))
    message = str(caught.value)
    assert str(run) in message and "step-64/, step-128/" in message and RESUME_STATE_FILE in message
    assert "start the run again" in message and f"model.archive={run / 'step-128' / 'policy.pt'}" in message


def test_an_unreadable_latest_train_state_is_named(tmp_path):
    run = make_run(tmp_path)
    put_checkpoint(run / "step-64", 64)
    put_checkpoint(run / "LATEST", 128, torn=True)
    with pytest.raises(CheckpointError, match="is not readable") as caught:
        resumable_checkpoint(str(run))
    assert str(run / "LATEST" / RESUME_STATE_FILE) in str(caught.value)
    # LATEST holds the run's final weights: moved aside, not deleted
    assert (f"to resume from the checkpoint before it, {run / 'step-64'}, move it aside (keep it: it holds the run's "
            f"final weights), e.g. mv {run / 'LATEST'} {run / 'LATEST'}.damaged") in str(caught.value)

    torch.save({"state": {}}, run / "LATEST" / RESUME_STATE_FILE)
    with pytest.raises(CheckpointError, match="holds no integer step_idx"):
        resumable_checkpoint(str(run))


# ---- truncate_logs ---------------------------------------------------------------------------------


def log_lines(*steps) -> str:
    return "".join(json.dumps({"event": "train", "step": step, "loss": 0.5}) + "\n" for step in steps)


def test_logs_are_cut_back_to_the_step_in_both_files(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(log_lines(32, 64, 64, 96, 128) + '{"event": "train", "st')
    (tmp_path / "samples.jsonl").write_text(log_lines(0, 64, 128))
    assert truncate_logs(str(tmp_path), 64) == 3 + 1  # 96, 128 and the torn line; 128 in samples
    assert (tmp_path / "metrics.jsonl").read_text() == log_lines(32, 64, 64)
    assert (tmp_path / "samples.jsonl").read_text() == log_lines(0, 64)
    assert truncate_logs(str(tmp_path), 64) == 0  # done once, nothing left to do
    assert sorted(os.listdir(tmp_path)) == ["metrics.jsonl", "samples.jsonl"]


def test_lines_without_a_step_are_dropped_and_a_complete_last_line_gets_its_newline(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 32}\n\n[1]\n{"step": "64"}\n{"step": true}\n{"step": 64}')
    assert truncate_logs(str(tmp_path), 64) == 4
    # without the newline, the next line the continued run appends would join this one
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 32}\n{"step": 64}\n'


def test_missing_log_files_are_fine(tmp_path):
    assert truncate_logs(str(tmp_path), 64) == 0
    (tmp_path / "metrics.jsonl").write_text(log_lines(64, 128))
    assert truncate_logs(str(tmp_path), 64) == 1
    assert sorted(os.listdir(tmp_path)) == ["metrics.jsonl"]


def test_a_log_that_needs_no_change_is_not_rewritten(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(log_lines(32, 64))
    inode = path.stat().st_ino
    assert truncate_logs(str(tmp_path), 64) == 0
    assert path.stat().st_ino == inode


def test_a_failed_rewrite_leaves_the_log_intact(tmp_path, monkeypatch):
    path = tmp_path / "metrics.jsonl"
    path.write_text(log_lines(32, 64, 96))
    before = path.read_bytes()

    def full_disk(source, target):
        raise OSError(errno.ENOSPC, "No space left on device", str(target))

    monkeypatch.setattr(os, "replace", full_disk)
    with pytest.raises(RunDirError, match="cannot rewrite") as caught:
        truncate_logs(str(tmp_path), 64)
    assert str(path) in str(caught.value) and "free some disk space" in str(caught.value)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["metrics.jsonl"]  # no temporary file left behind

    monkeypatch.undo()
    assert truncate_logs(str(tmp_path), 64) == 1


def test_the_temporary_file_of_a_killed_truncation_is_cleaned_up(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(log_lines(64))
    (tmp_path / "metrics.jsonl.truncating").write_text(log_lines(32))
    assert truncate_logs(str(tmp_path), 64) == 0
    assert os.listdir(tmp_path) == ["metrics.jsonl"]
    assert (tmp_path / "metrics.jsonl").read_text() == log_lines(64)


# ---- resumed_config --------------------------------------------------------------------------------


def saved_config():
    """A config as a run saves it (resolved), from before `resume` and `save_every` existed."""
    return OmegaConf.create({
        "seed": 0, "lr": 0.002, "batch_size": 32, "n_epochs": 1, "n_examples": None, "eval_every": 2048,
        "datasets": ["toy"], "local_run_dir": "/runs/dpo_1", "do_first_eval": True,
        "wandb": {"enabled": True, "entity": None, "project": "dpo"},
        "loss": {"name": "dpo", "beta": 0.1, "label_smoothing": 0, "reference_free": False},
        "model": {"name_or_path": None, "archive": "/runs/sft/LATEST/policy.pt", "policy_dtype": "float32"}})


def requested_config(**changes):
    """What Hydra would compose from the same command line: the saved config with the overrides applied."""
    config = saved_config()
    config.resume = None
    config.save_every = None
    for key, value in changes.items():
        OmegaConf.update(config, key.replace("__", "."), value, merge=False, force_add=True)
    return config


def test_allowed_changes_are_taken_over_and_missing_keys_are_null():
    requested = requested_config(resume="/runs/dpo_1", n_epochs=3, eval_every=4096, save_every=512,
                                 wandb__enabled=False, do_first_eval=False)
    result = resumed_config(saved_config(), requested,
                            ["resume=/runs/dpo_1", "n_epochs=3", "eval_every=4096", "save_every=512",
                             "wandb.enabled=false", "do_first_eval=false"])
    assert (result.resume, result.n_epochs, result.eval_every, result.save_every) == ("/runs/dpo_1", 3, 4096, 512)
    assert result.wandb.enabled is False and result.do_first_eval is False
    assert result.lr == 0.002 and result.local_run_dir == "/runs/dpo_1"

    plain = resumed_config(saved_config(), requested_config(), [])
    assert plain.resume is None and plain.save_every is None  # absent from an old saved config
    assert OmegaConf.to_container(plain) == {**OmegaConf.to_container(saved_config()), "resume": None,
                                             "save_every": None}


def test_only_overridden_keys_are_taken_from_the_command_line():
    # requested differs in lr (say a group's default changed since), but the command line did not ask for it
    result = resumed_config(saved_config(), requested_config(lr=0.1, n_epochs=2), ["n_epochs=2"])
    assert result.lr == 0.002 and result.n_epochs == 2


@pytest.mark.parametrize("override, key, old, new", [
    ("lr=1e-4", "lr", "0.002", "0.0001"),
    ("seed=1", "seed", "0", "1"),
    ("batch_size=64", "batch_size", "32", "64"),
    ("loss.beta=0.2", "loss.beta", "0.1", "0.2"),
    ("datasets=[toy,hh]", "datasets", '["toy"]', '["toy", "hh"]'),
    ("model.archive=null", "model.archive", "/runs/sft/LATEST/policy.pt", "null"),
])
def test_changes_to_the_training_are_refused_naming_key_and_both_values(override, key, old, new):
    requested = requested_config(**{key.replace(".", "__"): _hydra_value(override)})
    with pytest.raises(ConfigError) as caught:
        resumed_config(saved_config(), requested, ["resume=/runs/dpo_1", override])
    message = str(caught.value)
    assert f"changes {key} from {old} (the run's value) to {new}" in message, message
    assert override in message and "start a new run" in message and "drop that override" in message


def _hydra_value(override: str):
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return OverridesParser.create().parse_override(override).value()


def test_an_override_equal_to_the_saved_value_is_fine():
    result = resumed_config(saved_config(), requested_config(), ["lr=0.002", "loss.beta=0.1", "seed=0"])
    assert result.lr == 0.002 and result.loss.beta == 0.1


def test_additions_are_refused_unless_allowed():
    with pytest.raises(ConfigError, match=r"changes foo from unset \(the run's value\) to 1"):
        resumed_config(saved_config(), requested_config(foo=1), ["+foo=1"])
    result = resumed_config(saved_config(), requested_config(wandb__name="second-half"), ["+wandb.name=second-half"])
    assert result.wandb.name == "second-half"


def test_an_overridden_subtree_is_taken_whole():
    requested = requested_config()
    requested.wandb = {"enabled": False, "project": "other"}  # e.g. wandb={enabled:false,project:other}
    result = resumed_config(saved_config(), requested, ["wandb={enabled:false,project:other}"])
    assert OmegaConf.to_container(result.wandb) == {"enabled": False, "project": "other"}


def test_a_deleted_key_is_a_change_too():
    requested = requested_config()
    del requested.wandb["entity"]
    del requested.loss["label_smoothing"]
    saved = saved_config()
    saved.wandb.entity = "me"
    assert "entity" not in resumed_config(saved, requested, ["~wandb.entity"]).wandb
    with pytest.raises(ConfigError, match="changes loss.label_smoothing from 0"):
        resumed_config(saved, requested, ["~loss.label_smoothing"])


def test_hydra_settings_are_ignored_and_spread_out_groups_refused():
    result = resumed_config(saved_config(), requested_config(), ["hydra/job_logging=none", "hydra.run.dir=."])
    assert OmegaConf.to_container(result) == OmegaConf.to_container(resumed_config(saved_config(),
                                                                                   requested_config(), []))
    with pytest.raises(ConfigError, match="model_loss=tiny_dpo: that config group sets keys all over the config"):
        resumed_config(saved_config(), requested_config(), ["model_loss=tiny_dpo"])


# Group overrides, composed by Hydra from the project's real config files.


def compose(*overrides: str):
    from hydra import compose as hydra_compose, initialize_config_dir

    register_resolvers()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return hydra_compose(config_name="config", overrides=list(overrides))


def saved_run(*overrides: str):
    config = compose(*overrides)
    OmegaConf.resolve(config)
    return OmegaConf.create(OmegaConf.to_yaml(config))  # as config.yaml holds it


def test_a_group_override_equal_to_the_run_is_fine():
    original = ("model=tiny", "loss=dpo", "loss.beta=0.1")
    saved = saved_run(*original)
    result = resumed_config(saved, compose(*original, "n_epochs=2"), [*original, "n_epochs=2"])
    assert result.n_epochs == 2 and result.model == saved.model and result.loss == saved.loss
    assert result.local_run_dir == saved.local_run_dir


def test_a_group_override_that_differs_names_the_differing_key():
    saved = saved_run("model=tiny", "loss=dpo", "loss.beta=0.1")
    with pytest.raises(ConfigError) as caught:
        resumed_config(saved, compose("model=pythia28", "loss=dpo", "loss.beta=0.1"), ["model=pythia28"])
    message = str(caught.value)
    assert "model=pythia28" in message and "model." in message and "(the run's value)" in message
    with pytest.raises(ConfigError, match=r"loss=ipo: it changes loss\.\w+ from"):
        resumed_config(saved, compose("model=tiny", "loss=ipo", "loss.beta=0.1"), ["loss=ipo", "loss.beta=0.1"])
