"""The run directory: owned by one live run at a time, and never silently reused.

A run writes `config.yaml`, `metrics.jsonl`, `samples.jsonl`, `step-N/`, `LATEST/` and `plots/` into its
directory (and `python -m dpo.generate` its `generations/`). Starting a second run there would mix two
runs' files (and leave the first run's higher-numbered `step-N/` looking newest), so a directory that
already holds a run is refused unless the user asks to overwrite it. A lock file naming the owner's pid
and host refuses a second concurrent run; a lock whose process is gone (same host) is stale and taken
over.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import socket
import time
from contextlib import contextmanager
from typing import Iterator, Optional

import torch

from dpo.errors import CheckpointError, RunDirError

LOCK_FILE = ".lock"
_RUN_FILES = ("config.yaml", "metrics.jsonl", "samples.jsonl", "LATEST", "wandb", "plots", "generations")
# A checkpoint directory holding this file (counters, random states) can be resumed from.
RESUME_STATE_FILE = "train_state.pt"
CHECKPOINT_NAME = re.compile(r"^(?:LATEST|step-(\d+))$")
_CHECKPOINT_DIR = re.compile(r"^(LATEST|step-\d+)(\.partial|\.previous)?$")


def run_artifacts(run_dir: str) -> list[str]:
    """The names in `run_dir` that a run writes (sorted); empty if it holds no run or does not exist."""
    if not os.path.isdir(run_dir):
        return []
    return sorted(name for name in os.listdir(run_dir) if name in _RUN_FILES or _CHECKPOINT_DIR.match(name))


def check_run_dir_is_free(run_dir: str, overwrite: bool) -> None:
    """Raise RunDirError if `run_dir` cannot hold a new run: it is a file, or holds a run and `overwrite` is off."""
    if os.path.exists(run_dir) and not os.path.isdir(run_dir):
        raise RunDirError(f"local_run_dir={run_dir} is a file, not a directory; choose another local_run_dir")
    found = run_artifacts(run_dir)
    if found and not overwrite:
        shown = ", ".join(found[:4]) + (", ..." if len(found) > 4 else "")
        raise RunDirError(f"local_run_dir={run_dir} already holds a run ({shown}); choose a new local_run_dir, "
                          "or pass overwrite_run_dir=true to delete that run's files and start again")


@contextmanager
def open_run_dir(run_dir: str, overwrite: bool = False, resume: bool = False) -> Iterator[str]:
    """Create and lock `run_dir` for a new run; with `overwrite`, first delete an earlier run's files.

    With `resume`, lock the existing run in `run_dir` to continue it, keeping its files. The lock
    is released when the block ends, however it ends.
    """
    if resume:
        with run_lock(run_dir):
            yield run_dir
        return
    check_run_dir_is_free(run_dir, overwrite)
    try:
        os.makedirs(run_dir, exist_ok=True)
    except OSError as error:
        raise RunDirError(f"cannot create local_run_dir={run_dir}: {describe_os_error(error)}") from None
    with run_lock(run_dir):
        check_run_dir_is_free(run_dir, overwrite)  # again, now that no other run can be writing
        for name in run_artifacts(run_dir):
            path = os.path.join(run_dir, name)
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
        yield run_dir


@contextmanager
def run_lock(run_dir: str) -> Iterator[None]:
    """Hold `run_dir/.lock` (pid, host, start time) for the duration of the block."""
    path = os.path.join(run_dir, LOCK_FILE)
    owner = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
    for _ in range(2):  # a second try after removing a stale lock
        try:
            descriptor = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            _remove_if_stale(path, owner["host"])
            continue
        except OSError as error:
            raise RunDirError(f"cannot write in local_run_dir={run_dir}: {describe_os_error(error)}") from None
        with os.fdopen(descriptor, "w") as file:
            json.dump(owner, file)
        break
    else:
        raise RunDirError(f"local_run_dir={run_dir} is locked by a run that just started; choose another local_run_dir")
    try:
        yield
    finally:
        if _read_lock(path) == owner:
            os.remove(path)


def _remove_if_stale(path: str, host: str) -> None:
    """Remove the lock at `path` if its process is gone; otherwise raise RunDirError naming the owner."""
    owner = _read_lock(path)
    if owner is None:  # unreadable or half-written: its writer died before finishing one small write
        os.remove(path)
        return
    pid, owner_host = owner.get("pid"), owner.get("host")
    if owner_host == host and isinstance(pid, int) and not _process_alive(pid):
        print(f"note: removing the stale lock of run process {pid}, which is no longer running")
        os.remove(path)
        return
    run_dir = os.path.dirname(path)
    raise RunDirError(f"local_run_dir={run_dir} is in use by process {pid} on host {owner_host}; wait for it to "
                      f"finish or choose another local_run_dir (if that process is gone, delete {path})")


def _read_lock(path: str) -> Optional[dict]:
    try:
        with open(path) as file:
            owner = json.load(file)
    except (OSError, ValueError):
        return None
    return owner if isinstance(owner, dict) else None


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def newest_checkpoint(run_dir: str) -> Optional[str]:
    """The newest complete checkpoint directory of a run (the most examples seen), or None.

    An old `LATEST/` without a train state was written last, at the end of its run.
    """
    candidates = []
    for name in run_artifacts(run_dir):
        if CHECKPOINT_NAME.match(name) and os.path.isfile(os.path.join(run_dir, name, "policy.pt")):
            try:
                step = checkpoint_step(run_dir, name)
            except CheckpointError:
                step = float("inf")
            candidates.append((step, name == "LATEST", name))
    return os.path.join(run_dir, max(candidates)[2]) if candidates else None


def checkpoint_step(run_dir: str, name: str) -> int:
    """The examples seen at checkpoint `name`: N of `step-N`, else (LATEST has none) from its train state file."""
    match = CHECKPOINT_NAME.match(name)
    if match.group(1) is not None:
        return int(match.group(1))
    path = os.path.join(run_dir, name, RESUME_STATE_FILE)
    fix = f"delete {os.path.join(run_dir, name)} to resume from the run's previous checkpoint"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # unpickling errors come in many types
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"{path} is not readable ({first_line}); {fix}") from None
    step = state.get("step_idx") if isinstance(state, dict) else None
    if isinstance(step, bool) or not isinstance(step, int):
        raise CheckpointError(f"{path} holds no integer step_idx (found {step!r}); {fix}")
    return step


def describe_os_error(error: OSError) -> str:
    """An OSError as a short reason plus the usual fix."""
    reason = error.strerror or str(error)
    fixes = {errno.ENOSPC: "free some disk space or choose a local_run_dir on another disk",
             errno.EROFS: "the filesystem is read-only; choose a writable local_run_dir",
             errno.EACCES: "choose a local_run_dir you may write to",
             errno.ENOTDIR: "a part of the path is a file, not a directory; choose another local_run_dir",
             errno.EEXIST: "a part of the path is a file, not a directory; choose another local_run_dir"}
    fix = fixes.get(error.errno, "choose another local_run_dir")
    where = f" ({error.filename})" if error.filename else ""
    return f"{reason}{where}; {fix}"
