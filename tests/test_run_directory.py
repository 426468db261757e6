"""The run directory: never silently reused, one owner at a time, and every way of not being able to write it
explained in one sentence with nothing lost."""

import getpass
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from test_train import REPO, make_config, quick, read_metrics

import train as train_script
from dpo.errors import RunDirError
from dpo.rundir import LOCK_FILE, newest_checkpoint, open_run_dir

SHORT_RUN = ("n_examples=128", "eval_every=64", "n_eval_examples=32", "n_eval_model_samples=4")


def snapshot(directory: Path) -> dict:
    """Every file under `directory`, by relative path, with its bytes."""
    return {str(path.relative_to(directory)): path.read_bytes() for path in sorted(directory.rglob("*")) if path.is_file()}


def run_cli(*arguments, timeout=300):
    return subprocess.run([sys.executable, "train.py", "wandb.enabled=false", *arguments], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


def test_a_directory_holding_a_run_is_refused_and_left_byte_identical(tmp_path):
    run_dir = tmp_path / "run"
    train_script.train(quick(run_dir, *SHORT_RUN))
    before = snapshot(run_dir)
    assert {"config.yaml", "metrics.jsonl", "step-64/policy.pt", "LATEST/policy.pt"} <= set(before)

    result = run_cli(f"local_run_dir={run_dir}", "seed=1", *SHORT_RUN)
    assert result.returncode == 1
    assert result.stderr.strip() == (
        f"error: local_run_dir={run_dir} already holds a run (LATEST, config.yaml, metrics.jsonl, plots, ...); "
        "choose a new local_run_dir, or pass overwrite_run_dir=true to delete that run's files and start again")
    assert snapshot(run_dir) == before


def test_overwrite_run_dir_replaces_every_file_of_the_old_run(tmp_path):
    run_dir = tmp_path / "run"
    train_script.train(quick(run_dir, "n_examples=256", "eval_every=64", "n_eval_examples=32"))
    assert (run_dir / "step-192").is_dir()
    (run_dir / "notes.txt").write_text("mine")  # not a run's file: kept

    train_script.train(quick(run_dir, *SHORT_RUN, "overwrite_run_dir=true"))
    assert not (run_dir / "step-192").exists()  # the old run's newer-looking checkpoint is gone
    assert sorted(p.name for p in run_dir.glob("step-*")) == ["step-64"]
    assert [r["step"] for r in read_metrics(run_dir) if r["event"] == "eval"] == [0, 64, 128]
    assert (run_dir / "notes.txt").read_text() == "mine"
    assert not (run_dir / LOCK_FILE).exists()


def test_a_second_concurrent_run_is_refused(tmp_path):
    run_dir = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "train.py", "wandb.enabled=false", f"local_run_dir={run_dir}",
                              "n_epochs=50", "n_eval_examples=32"], cwd=REPO, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not (run_dir / "config.yaml").exists() and time.time() < deadline:
            time.sleep(0.2)
        assert (run_dir / LOCK_FILE).exists()
        before = snapshot(run_dir)
        with pytest.raises(RunDirError) as error:
            train_script.train(quick(run_dir, *SHORT_RUN, "overwrite_run_dir=true"))
        # Even an explicit overwrite does not touch a directory a live run owns.
        assert str(error.value) == (
            f"local_run_dir={run_dir} is in use by process {first.pid} on host {socket.gethostname()}; wait for it "
            "to finish or choose another local_run_dir")
        assert snapshot(run_dir)["config.yaml"] == before["config.yaml"]
    finally:
        first.kill()
        first.wait()


def test_a_stale_lock_is_taken_over(tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    gone = subprocess.Popen(["true"])
    gone.wait()
    (run_dir / LOCK_FILE).write_text(json.dumps({"pid": gone.pid, "host": socket.gethostname(), "started": 0}))
    with open_run_dir(str(run_dir)):
        owner = json.loads((run_dir / LOCK_FILE).read_text())
        assert owner["pid"] == os.getpid()
    assert (f"note: taking over {run_dir / LOCK_FILE} from process {gone.pid} on host {socket.gethostname()}, which "
            "is no longer running") in capsys.readouterr().out
    assert not (run_dir / LOCK_FILE).exists()


def test_a_lock_file_from_another_host_that_no_process_holds_is_taken_over(tmp_path, capsys):
    # The lock is flock(2), which a live run on another host would hold (on NFS, through the server's locks); a
    # file naming one that nobody holds is what a killed run left.
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / LOCK_FILE).write_text(json.dumps({"pid": 1234, "host": "node-17", "started": 0}))
    with open_run_dir(str(run_dir)):
        assert json.loads((run_dir / LOCK_FILE).read_text())["host"] == socket.gethostname()
    assert "from process 1234 on host node-17, which is no longer running" in capsys.readouterr().out


def test_one_run_makes_one_run_directory_and_nothing_in_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    train_script.train(make_config("wandb.enabled=false", f"local_dirs=[{tmp_path / 'runs'}]", *SHORT_RUN))
    user_dir = tmp_path / "runs" / getpass.getuser()
    assert len(list(user_dir.iterdir())) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs"]  # no .cache, no outputs/

    bad = quick(str(tmp_path / "elsewhere" / "run"), *SHORT_RUN, f"datasets=[{tmp_path / 'missing.jsonl'}]")
    with pytest.raises(Exception, match="does not exist"):
        train_script.train(bad)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs"]  # a refused run writes nothing


def test_a_run_directory_that_is_a_file(tmp_path):
    target = tmp_path / "taken"
    target.write_text("x")
    result = run_cli(f"local_run_dir={target}", *SHORT_RUN)
    assert result.returncode == 1
    assert result.stderr.strip() == f"error: local_run_dir={target} is a file, not a directory; choose another local_run_dir"
    assert target.read_text() == "x"

    with pytest.raises(RunDirError, match=r"cannot create local_run_dir=.*taken/run: Not a directory"):
        train_script.train(quick(target / "run", *SHORT_RUN))


@pytest.fixture
def tmpfs(tmp_path):
    """Mount a small tmpfs (root only); yields a function remounting it with options."""
    mount_point = tmp_path / "mnt"
    mount_point.mkdir()

    def mount(options):
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mount_point)], capture_output=True)
        if result.returncode:
            pytest.skip(f"cannot mount a tmpfs here: {result.stderr.decode().strip()}")
        return mount_point

    yield mount
    subprocess.run(["umount", str(mount_point)], capture_output=True)


def test_a_read_only_filesystem(tmpfs):
    read_only = tmpfs("ro,size=1m")
    result = run_cli(f"local_run_dir={read_only / 'run'}", *SHORT_RUN)
    assert result.returncode == 1
    assert result.stderr.strip() == (
        f"error: cannot create local_run_dir={read_only / 'run'}: Read-only file system ({read_only / 'run'}); "
        "the filesystem is read-only; choose a writable local_run_dir")


def test_a_full_disk_stops_with_the_last_good_checkpoint_intact(tmpfs):
    # A checkpoint of the tiny model takes 4.8 MB (AdamW's state is twice the 1.6 MB policy): 7 MB hold
    # config, metrics and step-64, but not a second checkpoint beside it.
    disk = tmpfs("size=7m")
    run_dir = disk / "run"
    with pytest.raises(RunDirError) as error:
        train_script.train(quick(run_dir, "n_examples=256", "eval_every=64", "n_eval_examples=32",
                                 "sample_during_eval=false", "loss=sft"))
    message = str(error.value)
    assert message.startswith(f"cannot write checkpoint {run_dir}/step-")
    assert "No space left on device" in message and "free some disk space" in message
    checkpoint = newest_checkpoint(str(run_dir))
    assert checkpoint == str(run_dir / "step-64")
    import torch

    assert torch.load(Path(checkpoint) / "policy.pt", weights_only=True)["step_idx"] == 64
    assert not list(run_dir.glob("*.partial"))  # the failed write gave its space back
    assert not (run_dir / LOCK_FILE).exists()


def test_ctrl_c_names_the_last_complete_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    process = subprocess.Popen([sys.executable, "train.py", "wandb.enabled=false", f"local_run_dir={run_dir}",
                                "n_epochs=50", "eval_every=256", "n_eval_examples=32", "sample_during_eval=false"],
                               cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (run_dir / "step-256" / "policy.pt").exists() and time.time() < deadline:
        time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130
    assert "Traceback" not in stderr
    last_line = stderr.strip().splitlines()[-1]
    assert last_line.startswith(f"error: interrupted; the last complete checkpoint is {run_dir}/step-")
    assert last_line.endswith(f"; continue with resume={run_dir}")
    assert os.path.isfile(last_line.split(" is ")[-1].split(";")[0] + "/policy.pt")
    assert not (run_dir / LOCK_FILE).exists()
