"""Checkpoints in the reference implementation's format, written atomically, read without pickle.

A checkpoint directory holds `policy.pt`, `optimizer.pt` and `scheduler.pt`, each a dict
`{"step_idx": int, "state": state_dict, "metrics": dict}` as the reference writes them, and
optionally the policy and tokenizer in Hugging Face format (`save_pretrained`).

Writes are atomic: everything goes to `<dir>.partial`, which then replaces `<dir>` by renames, so
a run killed mid-write leaves the previous checkpoint complete. Reads use `weights_only=True`:
a checkpoint can hold tensors and plain values but never code that would run on load.
"""

from __future__ import annotations

import os
import re
import shutil
from typing import Any, Mapping, Optional

import torch
from torch import nn

from dpo.errors import CheckpointError

CHECKPOINT_FILES = ("policy.pt", "optimizer.pt", "scheduler.pt")

# The reference implementation saved with transformers 4.x; since then some weights were renamed
# (reference-format prefix -> current prefix). policy.pt keeps the reference's names so that its
# code loads our checkpoints, and we read both.
_REFERENCE_PREFIXES = {"GPTNeoXForCausalLM": {"embed_out.": "lm_head."}}
# Buffers that transformers 4.x put in state dicts and later versions recompute instead.
_RECOMPUTED_BUFFERS = re.compile(r"\.(attention\.bias|attention\.masked_bias|attn\.bias|attn\.masked_bias|"
                                 r"rotary_emb\.inv_freq)$")


def _renamed(state: Mapping[str, Any], prefixes: Mapping[str, str]) -> dict:
    renamed = {}
    for key, value in state.items():
        for old, new in prefixes.items():
            if key.startswith(old):
                key = new + key[len(old):]
                break
        renamed[key] = value
    return renamed


def to_reference_names(state: Mapping[str, Any], model: nn.Module) -> dict:
    """`model`'s state dict under the parameter names the reference implementation's transformers used."""
    current_to_reference = {new: old for old, new in _REFERENCE_PREFIXES.get(type(model).__name__, {}).items()}
    return _renamed(state, current_to_reference)


def to_current_names(state: Mapping[str, Any], model: nn.Module) -> dict:
    """A state dict saved by any transformers version, renamed for `model`; stale buffers dropped."""
    expected = model.state_dict()
    state = _renamed(state, _REFERENCE_PREFIXES.get(type(model).__name__, {}))
    return {key: value for key, value in state.items()
            if key in expected or not _RECOMPUTED_BUFFERS.search(key)}


def write_checkpoint(directory: str, step_idx: int, metrics: Mapping[str, Any],
                     states: Mapping[str, Mapping[str, Any]], hf_model: Optional[nn.Module] = None,
                     tokenizer=None, hf_state: Optional[Mapping[str, Any]] = None) -> None:
    """Atomically write `{filename: state_dict}` as reference-format files into `directory`.

    With `hf_model`, the policy (and `tokenizer`) are also saved in Hugging Face format, so that
    `AutoModelForCausalLM.from_pretrained(directory)` loads the result; its weights are `hf_state`
    (default: `states["policy.pt"]`), which a parallel trainer gathers from its shards.
    """
    partial = directory.rstrip("/") + ".partial"
    shutil.rmtree(partial, ignore_errors=True)  # debris of a write that was killed
    os.makedirs(partial)
    for filename, state in states.items():
        payload = {"step_idx": step_idx, "state": state, "metrics": dict(metrics)}
        _save_synced(payload, os.path.join(partial, filename))
    if hf_model is not None:
        hf_model.save_pretrained(partial, state_dict=hf_state if hf_state is not None else states.get("policy.pt"))
        if tokenizer is not None:
            tokenizer.save_pretrained(partial)
    _replace_directory(partial, directory)


def _save_synced(payload: Any, path: str) -> None:
    with open(path, "wb") as file:
        torch.save(payload, file)
        file.flush()
        os.fsync(file.fileno())


def _replace_directory(new: str, target: str) -> None:
    """Make `new` become `target`. A kill at any point leaves a complete `target` or `target.previous`."""
    previous = target.rstrip("/") + ".previous"
    if os.path.isdir(target):
        shutil.rmtree(previous, ignore_errors=True)
        os.replace(target, previous)
    os.replace(new, target)
    shutil.rmtree(previous, ignore_errors=True)


def read_archive(path: str) -> dict:
    """Read a reference-format `policy.pt` (`{"step_idx", "state", "metrics"}`) safely.

    If `path` is missing because a kill interrupted the swap of a checkpoint directory, the
    complete previous checkpoint in `<dir>.previous` is named in the error.
    """
    if not os.path.isfile(path):
        hint = ""
        directory, filename = os.path.split(os.path.abspath(path))
        if os.path.isfile(os.path.join(directory + ".previous", filename)):
            hint = f"; the last complete checkpoint is {os.path.join(directory + '.previous', filename)}"
        raise CheckpointError(f"model.archive={path} does not exist{hint}")
    try:
        archive = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # unpickling errors come in many types
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"model.archive={path} is not a readable tensor checkpoint "
                              f"(only tensors and plain values are loaded, never code): {first_line}") from None
    if not isinstance(archive, dict) or not isinstance(archive.get("state"), dict):
        found = sorted(archive) if isinstance(archive, dict) else type(archive).__name__
        raise CheckpointError(f"model.archive={path} is not a policy.pt checkpoint: expected a dict with "
                              f"'step_idx', 'state' and 'metrics', found {found}")
    return archive


def load_policy_state(model: nn.Module, state: Mapping[str, Any], path: str) -> None:
    """Load `state` into `model`, explaining any mismatch of names or shapes in one sentence."""
    state = to_current_names(state, model)
    expected = model.state_dict()
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    misshapen = [f"{key} {tuple(state[key].shape)} vs {tuple(expected[key].shape)}" for key in expected
                 if key in state and hasattr(state[key], "shape") and state[key].shape != expected[key].shape]
    if missing or unexpected or misshapen:
        problems = []
        if missing:
            problems.append(f"{len(missing)} missing keys (e.g. {missing[0]})")
        if unexpected:
            problems.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]})")
        if misshapen:
            problems.append(f"{len(misshapen)} shape mismatches (e.g. {misshapen[0]})")
        raise CheckpointError(f"model.archive={path} does not fit model {type(model).__name__}: "
                              f"{'; '.join(problems)}; was it saved from a different model config?")
    model.load_state_dict(state)
