"""Continuing a run after it was killed: the file-level part (`python train.py resume=<run directory>`).

A run can be killed at any moment, including while it writes a checkpoint. What that leaves is
fixed here, before anything is loaded: `repair_checkpoints` undoes a half-done checkpoint write,
`resumable_checkpoint` finds the newest checkpoint that holds the training state, `truncate_logs`
cuts `metrics.jsonl` and `samples.jsonl` back to that checkpoint's step (so the continued run does
not log the lost steps twice), and `resumed_config` refuses command-line changes that would make
the continued run differ from an uninterrupted one. All of it assumes the caller holds the run's
lock (`dpo.rundir.run_lock`): nothing else may be writing the directory meanwhile.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from dpo.errors import CheckpointError, ConfigError, RunDirError
from dpo.rundir import (CHECKPOINT_NAME, RESUME_STATE_FILE, SETUP_FILES, checkpoint_step, describe_os_error,
                        run_artifacts)

LOG_FILES = ("metrics.jsonl", "samples.jsonl")
OPTIMIZER_DIR = "optimizer"  # dpo.parallel's sharded optimizer state (torch.distributed.checkpoint)

# What changes how the run is logged, evaluated or how long it lasts, but not the weights it reaches
# at a given step. A dotted key is allowed if it or a prefix of it is listed. The number of
# processes (nproc_per_node) may be restated; the checkpoint itself refuses a different one.
ALLOWED_CHANGES = frozenset({
    "n_epochs", "n_examples", "save_every", "eval_every", "do_first_eval", "sample_during_eval",
    "n_eval_model_samples", "n_eval_examples", "eval_batch_size", "minimum_log_interval_secs", "wandb", "debug",
    "nan_policy", "local_dirs", "resume", "fsdp_port", "nproc_per_node"})
# Keys that configs saved by earlier versions lack; they meant null then.
_ADDED_LATER = ("resume", "save_every")

_WRITE_DEBRIS = re.compile(r"^(LATEST|step-\d+)\.(partial|previous)$")
_UNSET = object()  # a key the config does not hold (as opposed to one holding null)


# ---- checkpoints -----------------------------------------------------------------------------------


def repair_checkpoints(run_dir: str) -> list[str]:
    """Undo what a kill during `dpo.checkpoints.write_checkpoint` can leave; return one note per action.

    `X.partial/` may be unfinished, so it is deleted. `X.previous/` is always complete (it is made by
    one rename of a complete `X/`): with `X/` missing the kill came between the two renames of
    `_replace_directory`, so it becomes `X/` again; with `X/` present it is stale and deleted.
    Running it again after a kill during the repair finishes the job.
    """
    notes = []
    for name in run_artifacts(run_dir):
        match = _WRITE_DEBRIS.match(name)
        if match is None:
            continue
        debris, target = os.path.join(run_dir, name), os.path.join(run_dir, match.group(1))
        try:
            if match.group(2) == "partial":
                _remove(debris)
                notes.append(f"deleted {debris}, a checkpoint whose writing was interrupted")
            elif os.path.isdir(target):
                _remove(debris)
                notes.append(f"deleted {debris}, an old copy of {target} left by a kill")
            else:
                os.replace(debris, target)
                notes.append(f"restored {target} from {debris}: the run was killed while replacing it")
        except OSError as error:
            raise RunDirError(f"cannot repair checkpoint {debris}: {describe_os_error(error)}") from None
    return notes


def _remove(path: str) -> None:
    shutil.rmtree(path) if os.path.isdir(path) and not os.path.islink(path) else os.remove(path)


def resumable_checkpoint(run_dir: str) -> tuple[str, int]:
    """`(directory, step)` of the newest checkpoint of the run holding `RESUME_STATE_FILE`.

    Newest means the largest step, not `LATEST/`: a continued run writes `step-N/` beyond the step of
    the `LATEST/` its first part ended with. Call `repair_checkpoints` first, or a checkpoint that a
    kill left as `X.previous/` is not seen. The checkpoint's files are checked to be readable (the
    optimizer state's and the weights' without reading their tensors), so that a damaged one is named
    with the way to resume from the one before it, not found out halfway through loading.
    """
    _check_is_run_dir(run_dir)
    names = _checkpoint_names(run_dir)
    resumable = [name for name in names if os.path.isfile(os.path.join(run_dir, name, RESUME_STATE_FILE))]
    if not resumable:
        raise RunDirError(_nothing_to_resume(run_dir, names))
    found, damaged = [], {}
    for name in resumable:
        try:
            found.append((checkpoint_step(run_dir, name), name == "LATEST", name))
        except CheckpointError as error:  # LATEST, whose step is in the file that is damaged
            damaged[name] = str(error)
    found.sort(reverse=True)  # at equal steps LATEST wins: it holds the Hugging Face files too
    newest = next(iter(damaged), None) or found[0][2]  # a damaged LATEST is the newest: it was written last
    problem = damaged.get(newest) or _unreadable_file(os.path.join(run_dir, newest))
    if problem:
        earlier = [name for _, _, name in found if name != newest]
        raise CheckpointError(f"{problem}, so {os.path.join(run_dir, newest)} cannot be resumed from; "
                              + _damaged_fix(run_dir, newest, earlier[0] if earlier else None))
    step, _, name = found[0]
    return os.path.join(run_dir, name), step


def _unreadable_file(checkpoint: str) -> str | None:
    """What is wrong with the first unreadable file of `checkpoint` (as a sentence's start), or None."""
    for filename in (RESUME_STATE_FILE, "scheduler.pt", "policy.pt", "optimizer.pt"):
        path = os.path.join(checkpoint, filename)
        if filename == "optimizer.pt" and not os.path.exists(path):
            if os.path.isdir(os.path.join(checkpoint, OPTIMIZER_DIR)):  # a parallel trainer's shards
                if not os.path.isfile(os.path.join(checkpoint, OPTIMIZER_DIR, ".metadata")):
                    return f"{os.path.join(checkpoint, OPTIMIZER_DIR)} lacks its .metadata file"
                continue
        try:
            _read_payload(path, whole=filename in (RESUME_STATE_FILE, "scheduler.pt"))
        except CheckpointError as error:
            return str(error)
    return None


def _read_payload(path: str, whole: bool = True) -> dict:
    """The `{"step_idx", "state", "metrics"}` dict in `path` (`whole=False`: its tensors are mapped, not read)."""
    import torch

    if not os.path.isfile(path):
        raise CheckpointError(f"{path} is missing")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True, mmap=not whole)
    except Exception as error:  # unpickling errors come in many types
        raise CheckpointError(f"{path} is not readable ({_first_sentence(error)})") from None
    if not isinstance(payload, dict) or not isinstance(payload.get("state"), dict):
        found = f"a dict of {', '.join(map(str, sorted(payload, key=str)))}" if isinstance(payload, dict) else \
            f"a {type(payload).__name__}"
        raise CheckpointError(f"{path} is not a checkpoint file: it holds {found}, not a dict with 'state'")
    return payload


def _first_sentence(error: Exception) -> str:
    """The start of torch.load's error, whose first line goes on about weights_only for a paragraph."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return text.split(". ")[0].rstrip(".")


def _damaged_fix(run_dir: str, name: str, earlier: str | None) -> str:
    directory = os.path.join(run_dir, name)
    keep = " (keep it: it holds the run's final weights)" if name == "LATEST" else ""
    if earlier is not None:
        return (f"to resume from the checkpoint before it, {os.path.join(run_dir, earlier)}, move it aside{keep}, "
                f"e.g. mv {directory} {directory}.damaged")
    return (f"no earlier checkpoint can be resumed from; start a new run (without resume=), from these weights with "
            f"model.archive={os.path.join(directory, 'policy.pt')} if that file is intact")


def read_train_state(checkpoint: str, keys: tuple[str, ...] = ("trainer", "world_size")) -> dict:
    """The training state (counters, random states, ...) of `checkpoint`'s `RESUME_STATE_FILE`, holding `keys`."""
    path = os.path.join(checkpoint, RESUME_STATE_FILE)
    state = _read_payload(path)["state"]
    missing = [key for key in keys if key not in state]
    if missing:
        raise CheckpointError(f"{path} lacks {', '.join(missing)}, so it was not written by this project's trainers "
                              "and cannot be resumed from; start a new run (without resume=)")
    return state


def _check_is_run_dir(run_dir: str) -> None:
    if not os.path.isdir(run_dir):
        problem = "is a file, not a directory" if os.path.exists(run_dir) else "does not exist"
        raise RunDirError(f"resume={run_dir} {problem}; pass the directory of the run to continue "
                          "(the 'run directory:' it printed when it started)")
    if not os.path.isfile(os.path.join(run_dir, "config.yaml")):
        raise RunDirError(f"resume={run_dir} holds no config.yaml, so it is not a run directory; pass the directory "
                          "of the run to continue (the one holding its config.yaml and step-N/ checkpoints)")


def _checkpoint_names(run_dir: str) -> list[str]:
    """The `step-N` and `LATEST` directories of the run, resumable or not."""
    return [name for name in run_artifacts(run_dir)
            if CHECKPOINT_NAME.match(name) and os.path.isdir(os.path.join(run_dir, name))]


def _nothing_to_resume(run_dir: str, names: list[str]) -> str:
    if not names:
        again = "start the run again"
        if not set(run_artifacts(run_dir)) <= set(SETUP_FILES):  # it trained, so a new run there must overwrite it
            again += f" (into this directory with local_run_dir={run_dir} overwrite_run_dir=true, which deletes its files)"
        return (f"resume={run_dir} holds no checkpoint (the run stopped before writing its first one), so there "
                f"is nothing to resume; {again}")
    names = sorted(names, key=lambda name: float("inf") if name == "LATEST" else int(name[len("step-"):]))
    shown = ", ".join(f"{name}/" for name in names[:4]) + (", ..." if len(names) > 4 else "")
    newest = os.path.join(run_dir, names[-1], "policy.pt")  # LATEST, if any: the end of the run
    return (f"resume={run_dir} has only checkpoints from before resume support ({shown} without "
            f"{RESUME_STATE_FILE}), which cannot be resumed; start the run again, or start a new run from "
            f"those weights with model.archive={newest}")


# ---- logs ------------------------------------------------------------------------------------------


def truncate_logs(run_dir: str, step: int) -> int:
    """Cut `metrics.jsonl` and `samples.jsonl` back to `step` (examples seen); return the lines dropped.

    Lines logged after the checkpoint being resumed from describe steps the continued run does
    again, so they go, as does a line a kill tore in half (it would glue itself to the next one).
    Each file is replaced atomically: a kill or a full disk leaves it as it was.
    """
    return sum(_truncate_log(os.path.join(run_dir, name), step) for name in LOG_FILES)


def _truncate_log(path: str, step: int) -> int:
    temporary = path + ".truncating"
    try:
        if os.path.exists(temporary):  # debris of a truncation that was killed
            os.remove(temporary)
        if not os.path.isfile(path):
            return 0
        with open(path, "rb") as file:
            content = file.read()
        lines = content.splitlines(keepends=True)
        kept = [line if line.endswith(b"\n") else line + b"\n" for line in lines if _logged_by(line, step)]
        if b"".join(kept) != content:
            _replace_file(path, temporary, b"".join(kept))
    except OSError as error:
        raise RunDirError(f"cannot rewrite {path} for resuming: {describe_os_error(error)}") from None
    return len(lines) - len(kept)


def _logged_by(line: bytes, step: int) -> bool:
    """Whether `line` is a whole JSON record of a step at most `step`."""
    try:
        record = json.loads(line)
    except ValueError:  # torn by a kill mid-write (or not UTF-8)
        return False
    logged = record.get("step") if isinstance(record, dict) else None
    return isinstance(logged, (int, float)) and not isinstance(logged, bool) and logged <= step


def _replace_file(path: str, temporary: str, content: bytes) -> None:
    try:
        with open(temporary, "wb") as file:
            file.write(content)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)
    _fsync_directory(os.path.dirname(path) or ".")  # so that the rename itself survives a power cut


def _fsync_directory(directory: str) -> None:
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


# ---- config ----------------------------------------------------------------------------------------


def resumed_config(saved: DictConfig, requested: DictConfig, overrides: list[str]) -> DictConfig:
    """The run's saved config plus those command-line `overrides` that leave its training trajectory alone.

    `requested` is what Hydra composed from the same command line; each overridden key's value is
    taken from it (a whole subtree for a group such as `model=...`) and compared leaf by leaf, as
    dotted keys, with the saved one. A change outside `ALLOWED_CHANGES` raises ConfigError: the
    continued run would no longer be the run it continues. An unset key counts as null.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser

    result = copy.deepcopy(saved)
    for key in _ADDED_LATER:
        if OmegaConf.select(result, key, default=_UNSET) is _UNSET:
            OmegaConf.update(result, key, None, force_add=True)
    for override in OverridesParser.create().parse_overrides(list(overrides)):
        key = _override_key(override)
        if key is None:
            continue
        old, new = _plain_value(saved, key), _plain_value(requested, key)
        if old is _UNSET and new is _UNSET:
            raise ConfigError(f"cannot resume with {override.input_line}: that config group sets keys all over the "
                              "config, which would change the run; drop the override to continue the run, or start a "
                              "new run (without resume=) to train with it")
        _check_unchanged(override.input_line, key, old, new)
        if not _same(old, new):
            _set(result, key, new)
    return result


def _override_key(override) -> str | None:
    """The dotted config key an override sets; None for Hydra's own settings, which do not reach the run."""
    key = override.key_or_group.replace("/", ".")
    if key == "hydra" or key.startswith("hydra."):
        return None
    if override.package is not None:
        raise ConfigError(f"cannot resume with {override.input_line}: a group placed with @package cannot be "
                          "compared with the run's config; drop the override to continue the run")
    return key


def _plain_value(config: DictConfig, key: str) -> Any:
    """The value at dotted `key` as plain Python (dicts and lists), `_UNSET` where there is none."""
    value = OmegaConf.select(config, key, default=_UNSET)
    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    return value


def _check_unchanged(line: str, key: str, old: Any, new: Any) -> None:
    """Raise ConfigError at the first leaf under `key` that differs and may not change."""
    old_leaves, new_leaves = _leaves(old, key), _leaves(new, key)
    for path in sorted(set(old_leaves) | set(new_leaves)):
        before, after = old_leaves.get(path, _UNSET), new_leaves.get(path, _UNSET)
        if not _same(before, after) and not _allowed(path):
            raise ConfigError(f"cannot resume with {line}: it changes {path} from {_show(before)} (the run's value) "
                              f"to {_show(after)}, which changes the training; drop that override to continue the "
                              "run as it was, or start a new run (without resume=) to train with the change")


def _leaves(value: Any, path: str) -> dict[str, Any]:
    """`{dotted path: value}` for every non-dict value under `path` (lists are single values)."""
    if isinstance(value, dict) and value:
        leaves = {}
        for name, child in value.items():
            leaves.update(_leaves(child, f"{path}.{name}"))
        return leaves
    return {path: value}


def _same(a: Any, b: Any) -> bool:
    """Equal, with unset taken as null (configs saved before a key existed lack it)."""
    a, b = (None if value is _UNSET else value for value in (a, b))
    return a == b


def _allowed(path: str) -> bool:
    parts = path.split(".")
    return any(".".join(parts[:length]) in ALLOWED_CHANGES for length in range(1, len(parts) + 1))


def _show(value: Any) -> str:
    if value is _UNSET:
        return "unset"
    if value is None or isinstance(value, (bool, list, dict)):
        return json.dumps(value)
    return str(value)


def _set(config: DictConfig, key: str, value: Any) -> None:
    """Set dotted `key` to `value`, replacing a whole subtree; `_UNSET` removes the key (a `~key` override)."""
    if value is not _UNSET:
        OmegaConf.update(config, key, value, merge=False, force_add=True)
        return
    parent_key, _, name = key.rpartition(".")
    parent = OmegaConf.select(config, parent_key) if parent_key else config
    if isinstance(parent, DictConfig) and name in parent:
        del parent[name]
