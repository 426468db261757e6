"""The run directory: owned by one live run at a time, and never silently reused.

A run writes `config.yaml`, `metrics.jsonl`, `samples.jsonl`, `step-N/`, `LATEST/` and `plots/` into its
directory (and `python -m dpo.generate` its `generations/`). Starting a second run there would mix two
runs' files (and leave the first run's higher-numbered `step-N/` looking newest), so a directory that
already holds a run is refused unless the user asks to overwrite it (`config.yaml` alone is not a run: that
run never trained). A lock (`fcntl.flock` on `.lock`, which names the owner's pid and host)
refuses a second concurrent run; the kernel releases it when its process ends, however it ends.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import shutil
import socket
import sys
import time
from contextlib import contextmanager
from typing import Iterator, Optional

from dpo.errors import CheckpointError, RunDirError

LOCK_FILE = ".lock"
_RUN_FILES = ("config.yaml", "reference_identity.json", "metrics.jsonl", "samples.jsonl", "LATEST", "wandb", "plots",
              "generations")
# What a run writes before it trains (dpo.run; the second is dpo.reference_cache.IDENTITY_FILE): a directory
# holding only these is a run that never trained, which blocks nothing.
SETUP_FILES = ("config.yaml", "reference_identity.json")
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
    if not set(found) <= set(SETUP_FILES) and not overwrite:
        shown = ", ".join(found[:4]) + (", ..." if len(found) > 4 else "")
        raise RunDirError(f"local_run_dir={run_dir} already holds a run ({shown}); choose a new local_run_dir, "
                          "or pass overwrite_run_dir=true to delete that run's files and start again")


@contextmanager
def open_run_dir(run_dir: str, overwrite: bool = False, resume: bool = False) -> Iterator[str]:
    """Create and lock `run_dir` for a new run; with `overwrite`, first delete an earlier run's files.

    With `resume`, lock the existing run in `run_dir` to continue it, keeping its files. The lock
    is released when the block ends, however it ends. A new run that fails before it has written
    anything but its `config.yaml` (a model that does not load, Ctrl-C during loading) takes that
    file back, and the directory if it made it: a run that never trained leaves nothing behind.
    """
    if resume:
        with run_lock(run_dir):
            yield run_dir
        return
    check_run_dir_is_free(run_dir, overwrite)
    created = not os.path.isdir(run_dir)
    try:
        os.makedirs(run_dir, exist_ok=True)
    except OSError as error:
        raise RunDirError(f"cannot create local_run_dir={run_dir}: {describe_os_error(error)}") from None
    try:
        with run_lock(run_dir):
            check_run_dir_is_free(run_dir, overwrite)  # again, now that no other run can be writing
            for name in run_artifacts(run_dir):
                path = os.path.join(run_dir, name)
                shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
            try:
                yield run_dir
            except BaseException:
                _remove_if_never_trained(run_dir)
                raise
    finally:
        if created:
            _remove_empty_directory(run_dir)


def _remove_if_never_trained(run_dir: str) -> None:
    found = run_artifacts(run_dir)
    if set(found) <= set(SETUP_FILES):
        for name in found:
            try:
                os.remove(os.path.join(run_dir, name))
            except OSError:  # the error being raised matters more
                pass


def _remove_empty_directory(run_dir: str) -> None:
    try:
        os.rmdir(run_dir)  # fails, harmlessly, unless empty: a run wrote into it, or another has started to
    except OSError:
        pass


# The lock is `fcntl.flock` on `.lock`, which the kernel releases when its process ends, however it
# ends (SIGKILL included), so a lock is never stale. The file's content (pid, host, start time) only
# names the owner in messages. The owner deletes the file when it is done, while still holding it;
# a process that then gets the lock on the deleted file sees that `.lock` is now another file (or
# none) and tries again, so at any moment at most one process holds the lock on the file `.lock` is.
# Network filesystems: Linux NFS clients turn flock into byte-range locks on the server (NLM for
# NFSv3, part of the protocol in NFSv4), which exclude processes on every host; a client mounted with
# `nolock` or `local_lock=flock|all` (or Lustre without `-o flock`) locks only among its own
# processes, so two hosts could each hold it: the owner's host is kept in the file for that reason.
# Where flock fails outright (ENOLCK, EOPNOTSUPP, ...), the run goes ahead with a warning. The descriptor is not
# inherited by programs the run starts (wandb's service); a fork() without exec shares the lock until it exits.
_NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL, errno.EBADF)


@contextmanager
def run_lock(run_dir: str) -> Iterator[None]:
    """Hold the lock of `run_dir` (`.lock`, naming this process's pid and host) for the duration of the block."""
    path = os.path.join(run_dir, LOCK_FILE)
    descriptor = _acquire(path, run_dir)
    try:
        if descriptor is not None:
            _write_owner(descriptor, path)
        yield
    finally:
        if descriptor is not None:
            try:
                os.remove(path)  # while still locked: see above
            except OSError:
                pass
            os.close(descriptor)  # releases the lock


def _acquire(path: str, run_dir: str) -> Optional[int]:
    """A descriptor of the file `path` now is, locked by this process; None where the filesystem has no locks."""
    while True:
        try:
            descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as error:
            raise RunDirError(f"cannot write in local_run_dir={run_dir}: {describe_os_error(error)}") from None
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner, current = _read_owner(descriptor), _is_file_at(descriptor, path)
            os.close(descriptor)
            if current:
                raise RunDirError(_in_use(run_dir, owner)) from None
            continue  # its owner deleted it on the way out: try the one that is there now
        except OSError as error:
            os.close(descriptor)
            if error.errno not in _NO_LOCKS:
                raise RunDirError(f"cannot lock {path}: {describe_os_error(error)}") from None
            print(f"warning: cannot lock {path} ({error.strerror}: the filesystem does not support file locks); "
                  "nothing stops a second run from writing into this directory at the same time", file=sys.stderr)
            return None
        if _is_file_at(descriptor, path):
            return descriptor
        os.close(descriptor)  # we locked a file its owner has just deleted: try the one that is there now


def _is_file_at(descriptor: int, path: str) -> bool:
    try:
        linked = os.stat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(descriptor)
    return (held.st_dev, held.st_ino) == (linked.st_dev, linked.st_ino)


def _write_owner(descriptor: int, path: str) -> None:
    previous = _read_owner(descriptor)
    if previous and previous.get("pid") is not None:  # a run that was killed (it left the file)
        print(f"note: taking over {path} from process {previous.get('pid')} on host {previous.get('host')}, "
              "which is no longer running")
    owner = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
    os.ftruncate(descriptor, 0)
    os.pwrite(descriptor, json.dumps(owner).encode(), 0)


def _read_owner(descriptor: int) -> Optional[dict]:
    try:
        owner = json.loads(os.pread(descriptor, 4096, 0))
    except (OSError, ValueError):  # empty: its owner is just starting or ending
        return None
    return owner if isinstance(owner, dict) else None


def _in_use(run_dir: str, owner: Optional[dict]) -> str:
    if owner is None:
        return f"local_run_dir={run_dir} is locked by a run that is just starting or ending; choose another " \
               "local_run_dir, or try again once it has ended"
    return (f"local_run_dir={run_dir} is in use by process {owner.get('pid')} on host {owner.get('host')}; wait for it "
            "to finish or choose another local_run_dir")


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
    """The examples seen at checkpoint `name`: N of `step-N`, else (LATEST has none) from its train state file.

    CheckpointError names an unreadable train state file; the caller says what to do about it.
    """
    match = CHECKPOINT_NAME.match(name)
    if match.group(1) is not None:
        return int(match.group(1))
    path = os.path.join(run_dir, name, RESUME_STATE_FILE)
    import torch  # here: taking the lock (above) should not wait for torch to load

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # unpickling errors come in many types
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"{path} is not readable ({first_line.split('. ')[0].rstrip('.')})") from None
    step = state.get("step_idx") if isinstance(state, dict) else None
    if isinstance(step, bool) or not isinstance(step, int):
        raise CheckpointError(f"{path} holds no integer step_idx (found {step!r})")
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
