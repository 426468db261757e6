"""Signals and locks: nothing of a run keeps running after the run is told to stop, and one run at a time owns a
run directory, with no stale locks and no races when several runs start at once.

The runs are real `python train.py` processes on the tiny model (the parallel one under train.py's own launcher, on
CPU with gloo); the lock race starts real processes at the same moment against a lock left by a killed run.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from test_train import REPO

from dpo.rundir import LOCK_FILE, check_run_dir_is_free

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
# Steps of 8 DPO pairs, a checkpoint after every one, no evaluation: a run that is training within seconds.
RUN = ["loss=dpo", "loss.beta=0.1", "lr=1e-3", "warmup_steps=2", "batch_size=8", "save_every=8",
       "eval_every=100000", "do_first_eval=false", "n_eval_examples=8", "eval_batch_size=8",
       "sample_during_eval=false", "wandb.enabled=false"]


def start(*arguments) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "train.py", *arguments], cwd=REPO, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def finish(process: subprocess.Popen, timeout: float = 240) -> tuple[str, str]:
    try:
        return process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(process)
        output, errors = process.communicate()
        pytest.fail(f"ran over {timeout} s:\n{output[-3000:]}\n{errors[-3000:]}")


def kill_tree(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)  # its own session: every process it started, and only those
    except ProcessLookupError:
        pass


def wait_for(process: subprocess.Popen, ready, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while not ready():
        if process.poll() is not None or time.time() > deadline:
            kill_tree(process)
            output, errors = process.communicate()
            pytest.fail(f"the run never got there (exit {process.returncode}):\n{output[-3000:]}\n{errors[-3000:]}")
        time.sleep(0.05)


def running(pids: list[int]) -> list[int]:
    alive = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                alive.append(pid)
        except psutil.NoSuchProcess:
            pass
    return alive


def lock_is_free(run_dir: Path) -> bool:
    """Whether a new run could take the run directory's lock now (taking and releasing it)."""
    from dpo.errors import RunDirError
    from dpo.rundir import run_lock

    try:
        with run_lock(str(run_dir)):
            return True
    except RunDirError:
        return False


def stale_lock(run_dir: Path) -> None:
    """What a run killed by SIGKILL leaves: a lock file naming a process that is gone."""
    gone = subprocess.Popen(["true"])
    gone.wait()
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / LOCK_FILE).write_text(json.dumps({"pid": gone.pid, "host": socket.gethostname(), "started": 0}))


# ---- SIGTERM and Ctrl-C ------------------------------------------------------------------------------


def test_sigterm_to_the_launcher_stops_every_worker_and_the_run_resumes(tmp_path):
    run_dir = tmp_path / "run"
    process = start(*RUN, "n_examples=100000", "trainer=FSDPTrainer", "nproc_per_node=2", f"local_run_dir={run_dir}")
    wait_for(process, lambda: (run_dir / "step-16" / "policy.pt").is_file())
    workers = [child.pid for child in psutil.Process(process.pid).children(recursive=True)
               if "spawn_main" in " ".join(child.cmdline())]
    assert len(workers) == 2
    process.send_signal(signal.SIGTERM)  # the parent alone, as `kill <pid>` or a scheduler's stop does
    _, errors = finish(process, timeout=90)
    stragglers = running(workers)  # at the moment the parent is gone, before any grace of ours
    kill_tree(process)
    assert process.returncode == 143, errors[-3000:]
    assert stragglers == [], "workers kept running after the launcher exited"
    assert "Traceback" not in errors
    last = errors.strip().splitlines()[-1]
    assert last.startswith(f"error: stopped by SIGTERM; the last complete checkpoint is {run_dir}/step-"), last
    assert last.endswith(f"; continue with resume={run_dir}")
    assert errors.count("stopped by SIGTERM") == 1  # one message for the run, not one per process
    assert not (run_dir / LOCK_FILE).exists() and lock_is_free(run_dir)
    assert not list(run_dir.glob("*.partial"))
    newest = int(last.split(f"{run_dir}/step-")[1].split(";")[0])

    resumed = start(f"resume={run_dir}", f"n_examples={newest + 16}")
    output, errors = finish(resumed)
    assert resumed.returncode == 0, errors[-3000:]
    assert f"resuming {run_dir} from {run_dir}/step-{newest} after {newest} examples" in output
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["event"] == "train"]
    assert steps == list(range(8, newest + 17, 8))  # every step once: the killed run's later lines were dropped


def test_sigterm_to_a_single_process_run_releases_its_lock_and_names_the_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    process = start(*RUN, "n_examples=100000", f"local_run_dir={run_dir}")
    wait_for(process, lambda: (run_dir / "step-8" / "policy.pt").is_file())
    process.send_signal(signal.SIGTERM)
    _, errors = finish(process, timeout=60)
    assert process.returncode == 143
    assert "Traceback" not in errors
    last = errors.strip().splitlines()[-1]
    assert last.startswith(f"error: stopped by SIGTERM; the last complete checkpoint is {run_dir}/step-"), last
    assert not (run_dir / LOCK_FILE).exists() and lock_is_free(run_dir)


# ---- the lock ----------------------------------------------------------------------------------------

# Each contender waits for trial k's start file, tries to take the lock of trial k's run directory and, while it
# holds it, logs its entry, waits a little and logs its exit (O_APPEND: the log's order is the real order).
CONTENDER = r"""
import os, sys, time
sys.path.insert(0, sys.argv[1])
from dpo.errors import RunDirError
from dpo.rundir import run_lock
root, trials, name = sys.argv[2], int(sys.argv[3]), sys.argv[4]
log = os.open(os.path.join(root, "log"), os.O_WRONLY | os.O_APPEND | os.O_CREAT)
for trial in range(trials):
    while not os.path.exists(os.path.join(root, f"go-{trial}")):
        time.sleep(0.0005)
    try:
        with run_lock(os.path.join(root, f"run-{trial}")):
            os.write(log, f"{trial} enter {name}\n".encode())
            time.sleep(0.005)
            os.write(log, f"{trial} exit {name}\n".encode())
    except RunDirError as error:
        assert "is in use by process" in str(error) or "just starting or ending" in str(error), error
    open(os.path.join(root, f"done-{trial}-{name}"), "w").close()
"""


def test_runs_starting_at_once_against_a_stale_lock_never_both_hold_it(tmp_path):
    trials, contenders = 30, 6
    for trial in range(trials):
        stale_lock(tmp_path / f"run-{trial}")
    processes = [subprocess.Popen([sys.executable, "-c", CONTENDER, str(REPO), str(tmp_path), str(trials), str(n)],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for n in range(contenders)]
    try:
        for trial in range(trials):
            (tmp_path / f"go-{trial}").touch()
            deadline = time.time() + 30
            while len(list(tmp_path.glob(f"done-{trial}-*"))) < contenders:
                assert time.time() < deadline and all(p.poll() in (None, 0) for p in processes), \
                    [p.communicate()[1][-2000:] for p in processes if p.poll()]
                time.sleep(0.001)
        results = [p.communicate(timeout=30) for p in processes]
    finally:
        for p in processes:
            p.kill()
    assert [p.returncode for p in processes] == [0] * contenders, [errors[-2000:] for _, errors in results]
    assert not any("Traceback" in errors for _, errors in results)
    holders: dict[int, list[str]] = {}
    overlapping = set()
    for line in (tmp_path / "log").read_text().splitlines():
        trial, event, name = line.split()
        inside = holders.setdefault(int(trial), [])
        if event == "enter":
            if inside:
                overlapping.add(int(trial))
            inside.append(name)
        else:
            inside.remove(name)
    assert sorted(overlapping) == [], f"two processes held the lock at once in {len(overlapping)} of {trials} trials"
    assert len(holders) == trials  # in every trial someone took over the stale lock
    assert not list(tmp_path.glob(f"run-*/{LOCK_FILE}"))  # every holder cleaned up after itself


# ---- a run that never trained ------------------------------------------------------------------------


def test_a_run_that_fails_while_loading_its_model_leaves_nothing(tmp_path):
    import torch

    archive = tmp_path / "policy.pt"  # readable, but not the tiny model's weights: load_models refuses it
    torch.save({"step_idx": 0, "state": {"w": torch.zeros(2)}, "metrics": {}}, archive)
    run_dir = tmp_path / "run"
    command = [sys.executable, "train.py", *RUN, "n_examples=8", f"local_run_dir={run_dir}"]
    result = subprocess.run([*command, f"model.archive={archive}"], cwd=REPO, env=ENV, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 1, result.stderr[-2000:]
    assert result.stderr.strip().startswith(f"error: model.archive={archive} does not fit model")
    assert f"run directory: {run_dir}" in result.stdout  # it got as far as making it
    assert not run_dir.exists()

    # What a SIGKILL while loading the model leaves (its config.yaml and lock file) blocks no rerun either.
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text("seed: 0\n")
    (run_dir / LOCK_FILE).write_text("{}")
    check_run_dir_is_free(str(run_dir), overwrite=False)
    rerun = subprocess.run(command, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert (run_dir / "LATEST" / "policy.pt").is_file() and not (run_dir / LOCK_FILE).exists()
