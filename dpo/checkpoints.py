"""Checkpoints in the reference implementation's format, written atomically, read without pickle.

A checkpoint directory holds `policy.pt`, `optimizer.pt` and `scheduler.pt`, each a dict
`{"step_idx": int, "state": state_dict, "metrics": dict}` as the reference writes them, and
optionally the policy and tokenizer in Hugging Face format (`save_pretrained`).

Checkpoints move both ways between this project and the reference code, which pins transformers
4.29.2: `policy.pt` holds exactly the state-dict keys 4.29.2 expects (the reference loads it with a
strict `load_state_dict`), the Hugging Face files carry the config keys and tokenizer format 4.29.2
reads, and reading accepts files written by 4.29.2 or by the installed transformers.

Writes are atomic: everything goes to `<dir>.partial`, which then replaces `<dir>` by renames, so
a run killed mid-write leaves the previous checkpoint complete. Reads use `weights_only=True`:
a checkpoint can hold tensors and plain values but never code that would run on load.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional

import torch
from torch import nn

from dpo.errors import CheckpointError

CHECKPOINT_FILES = ("policy.pt", "optimizer.pt", "scheduler.pt")

# The transformers version the reference implementation pins; "legacy" below means its layout.
LEGACY_TRANSFORMERS = "4.29.2"


# ---- state dicts: transformers 4.29.2 <-> the installed version ----------------------------------


def _causal_mask(config) -> torch.Tensor:
    positions = config.max_position_embeddings
    return torch.tril(torch.ones((positions, positions), dtype=torch.bool)).view(1, 1, positions, positions)


def _rope_inv_freq(config) -> torch.Tensor:
    """RoPE inverse frequencies exactly as 4.29.2 computes them: 1 / base^(2i/d) over the d rotary dims.

    Computed from the config rather than copied from the live buffer, which a dtype cast rounds and
    a scaled RoPE variant rescales; 4.29.2 knows neither.
    """
    rope = dict(getattr(config, "rope_parameters", None) or {})  # transformers >= 5
    base = rope.get("rope_theta", getattr(config, "rotary_emb_base", None) or getattr(config, "rope_theta", None)
                    or 10000)
    fraction = rope.get("partial_rotary_factor", getattr(config, "rotary_pct", 1.0))
    head_size = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    dim = int(head_size * fraction)
    return 1.0 / (base ** (torch.arange(0, dim, 2).float() / dim))


def _gpt_neox_buffers(config) -> dict:
    return {"bias": _causal_mask(config), "masked_bias": torch.tensor(-1e9),
            "rotary_emb.inv_freq": _rope_inv_freq(config)}


def _gpt2_buffers(config) -> dict:
    return {"bias": _causal_mask(config), "masked_bias": torch.tensor(-1e4)}


def _llama_buffers(config) -> dict:
    return {"rotary_emb.inv_freq": _rope_inv_freq(config)}


@dataclass(frozen=True)
class _LegacyLayout:
    """How one architecture's state dict under transformers 4.29.2 differs from the current one."""

    renames: Mapping[str, str] = field(default_factory=dict)  # 4.29.2 key prefix -> current key prefix
    attention_key: Optional[str] = None  # a key every attention module has; group 1 is the module's name
    buffers: Callable[[Any], dict] = lambda config: {}  # name under the attention module -> value


# Keyed on config.model_type, which survives wrapping (FSDP renames the model's class). GPT-J's
# state dict is the same in both versions; so is that of any architecture not listed (T5 among them).
_LEGACY_LAYOUTS = {
    "gpt_neox": _LegacyLayout({"embed_out.": "lm_head."}, r"(.*\.attention)\.query_key_value\.weight",
                              _gpt_neox_buffers),
    "gpt2": _LegacyLayout({}, r"(.*\.(?:attn|crossattention))\.c_attn\.weight", _gpt2_buffers),
    "gptj": _LegacyLayout(),
    "llama": _LegacyLayout({}, r"(.*\.self_attn)\.q_proj\.weight", _llama_buffers),
}
# Buffers that some transformers versions put in state dicts and others recompute instead.
_RECOMPUTED_BUFFERS = re.compile(r"\.(?:attention|attn|crossattention)\.(?:bias|masked_bias)$|"
                                 r"\.rotary_emb\.inv_freq$")


def _model_type(model: nn.Module) -> Optional[str]:
    return getattr(getattr(model, "config", None), "model_type", None)


def _legacy_layout(model: nn.Module) -> _LegacyLayout:
    return _LEGACY_LAYOUTS.get(_model_type(model), _LegacyLayout())


def _renamed_key(key: str, prefixes: Mapping[str, str]) -> str:
    for old, new in prefixes.items():
        if key.startswith(old):
            return new + key[len(old):]
    return key


def to_reference_names(state: Mapping[str, Any], model: nn.Module) -> dict:
    """`model`'s state dict laid out as transformers 4.29.2, the reference implementation's version, lays it out.

    The reference loads `policy.pt` with a strict `load_state_dict`, so the result has exactly 4.29.2's
    keys: weights under their 4.29.2 names, plus the buffers 4.29.2 kept in state dicts (causal masks,
    RoPE frequencies) with the values 4.29.2 computes from the same config. Keys already in 4.29.2's
    layout (state dicts from transformers 4.x) are kept as they are.
    """
    layout = _legacy_layout(model)
    to_legacy = {current: legacy for legacy, current in layout.renames.items()}
    state = {_renamed_key(key, to_legacy): value for key, value in state.items()}
    if layout.attention_key is None:
        return state
    return _with_legacy_buffers(state, re.compile(layout.attention_key), layout.buffers(model.config))


def _with_legacy_buffers(state: Mapping[str, Any], attention_key: re.Pattern, buffers: Mapping[str, Any]) -> dict:
    """`state` with `buffers` under every attention module, placed before that module's weights.

    Every layer gets the same tensor objects, which torch.save stores once.
    """
    result = {}
    for key, value in state.items():
        match = attention_key.fullmatch(key)
        if match:
            for name, buffer in buffers.items():
                result.setdefault(f"{match.group(1)}.{name}", buffer)
        result[key] = value
    return result


def to_current_names(state: Mapping[str, Any], model: nn.Module) -> dict:
    """A state dict saved by any transformers version, renamed for `model`; stale buffers dropped.

    A key is renamed only when `model` lacks it and has the renamed one, so 4.29.2 names and current
    names are both accepted, whichever transformers is installed.
    """
    expected = model.state_dict()
    renames = _legacy_layout(model).renames
    current = {}
    for key, value in state.items():
        if key not in expected and _renamed_key(key, renames) in expected:
            key = _renamed_key(key, renames)
        if key in expected or not _RECOMPUTED_BUFFERS.search(key):
            current[key] = value
    return current


# ---- Hugging Face format that transformers 4.29.2 reads as well ----------------------------------


def _rope_parameters(config) -> Optional[dict]:
    """transformers >= 5 keeps RoPE settings in `rope_parameters`; None where the config predates it."""
    rope = getattr(config, "rope_parameters", None)
    return dict(rope) if rope else None


def _rope_type_problems(rope: Mapping[str, Any]) -> list[str]:
    rope_type = rope.get("rope_type", "default")
    return [] if rope_type == "default" else [f"rope_type={rope_type} (4.29.2 has only the original RoPE)"]


def _gpt_neox_legacy_config(config, rope: Mapping[str, Any]) -> tuple[dict, list[str]]:
    keys = {"rotary_pct": rope.get("partial_rotary_factor", 1.0), "rotary_emb_base": rope.get("rope_theta", 10000)}
    problems = _rope_type_problems(rope)
    if not getattr(config, "attention_bias", True):
        problems.append("attention_bias=false (4.29.2 always has attention biases)")
    return keys, problems


def _llama_legacy_config(config, rope: Mapping[str, Any]) -> tuple[dict, list[str]]:
    # 4.29.2 reads no RoPE key; rope_theta and rope_scaling keep 4.31 to 4.x reading it right.
    theta = rope.get("rope_theta", 10000.0)
    keys = {"rope_theta": theta}
    problems = _rope_type_problems(rope)
    if not problems:
        keys["rope_scaling"] = None
    if float(theta) != 10000.0:
        problems.append(f"rope_theta={theta} (4.29.2 always uses 10000)")
    heads = config.num_attention_heads
    if getattr(config, "num_key_value_heads", heads) != heads:
        problems.append(f"num_key_value_heads={config.num_key_value_heads} (4.29.2 has no grouped-query attention)")
    if (getattr(config, "head_dim", None) or config.hidden_size // heads) != config.hidden_size // heads:
        problems.append(f"head_dim={config.head_dim} (4.29.2 uses hidden_size / num_attention_heads)")
    for flag in ("attention_bias", "mlp_bias"):
        if getattr(config, flag, False):
            problems.append(f"{flag}=true (4.29.2 has no such biases)")
    return keys, problems


_LEGACY_CONFIGS = {"gpt_neox": _gpt_neox_legacy_config, "llama": _llama_legacy_config}


def legacy_config_keys(config) -> tuple[dict, list[str]]:
    """The config.json keys that make transformers 4.29.2 build the model `config` describes, and what it cannot.

    Returns `(keys, problems)`: keys derived from the current ones (`rope_parameters` ->
    `rotary_pct`, ...), which current transformers ignore in favour of the ones they derive from,
    and one phrase per setting 4.29.2 cannot represent (it would silently build a different model).
    GPT-2 and GPT-J configs need nothing; architectures not listed are not judged.
    """
    rope = _rope_parameters(config)
    legacy = _LEGACY_CONFIGS.get(getattr(config, "model_type", None))
    if legacy is None or rope is None:
        return {}, []
    return legacy(config, rope)


def write_hf_export(directory: str, model: nn.Module, tokenizer=None,
                    state: Optional[Mapping[str, Any]] = None) -> list[str]:
    """Save `model` (with weights `state`, default its own) and `tokenizer` with `save_pretrained` into `directory`.

    The files load with `from_pretrained` in the installed transformers and in 4.29.2 (which needs
    the `safetensors` package for the weights). Returns what 4.29.2 cannot represent (see
    `legacy_config_keys`); empty when it loads the same model.
    """
    # a copy: transformers 5 empties the state dict it is given
    model.save_pretrained(directory, state_dict=dict(state) if state is not None else None)
    keys, problems = legacy_config_keys(model.config)
    keys["architectures"] = [model_class_name(model)]
    _add_json_keys(os.path.join(directory, "config.json"), keys)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
        _make_tokenizer_legacy_readable(directory)
    return problems


def model_class_name(model: nn.Module) -> str:
    """The model's own class name, also when FSDP2 has swapped its class for a wrapper (`FSDP<name>`)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch without distributed support
        return type(model).__name__
    return next(cls for cls in type(model).__mro__ if not issubclass(cls, FSDPModule)).__name__


def _add_json_keys(path: str, keys: Mapping[str, Any]) -> None:
    """Add `keys` to a JSON object file, keeping any that are already there (except `architectures`)."""
    if not keys:
        return
    with open(path) as file:
        content = json.load(file)
    for key, value in keys.items():
        if key == "architectures":
            content[key] = value
        else:
            content.setdefault(key, value)
    _write_json(path, content)


def _make_tokenizer_legacy_readable(directory: str) -> None:
    """Rewrite two things transformers 5 saves that 4.29.2 (tokenizers 0.13) cannot parse, in forms both read.

    The generic fast tokenizer's class is named `PreTrainedTokenizerFast` (5.x: `TokenizersBackend`),
    and BPE merges are written as "a b" strings rather than ["a", "b"] pairs, unless a part holds a
    space, which only the pair form can express.
    """
    config_path = os.path.join(directory, "tokenizer_config.json")
    if os.path.isfile(config_path):
        with open(config_path) as file:
            config = json.load(file)
        if config.get("tokenizer_class") == "TokenizersBackend":
            config["tokenizer_class"] = "PreTrainedTokenizerFast"
            _write_json(config_path, config)
    tokenizer_path = os.path.join(directory, "tokenizer.json")
    if os.path.isfile(tokenizer_path):
        with open(tokenizer_path, encoding="utf-8") as file:
            tokenizer = json.load(file)
        merges = tokenizer.get("model", {}).get("merges")
        if merges and all(isinstance(merge, list) and len(merge) == 2 and " " not in "".join(merge)
                          for merge in merges):
            tokenizer["model"]["merges"] = [" ".join(merge) for merge in merges]
            _write_json(tokenizer_path, tokenizer)


def _write_json(path: str, content: Any) -> None:
    with open(path, "w", encoding="utf-8") as file:
        json.dump(content, file, indent=2, ensure_ascii=False)
        file.write("\n")


def _warn_about_legacy_problems(directory: str, problems: list[str]) -> None:
    if problems:
        warnings.warn(f"{directory}: transformers {LEGACY_TRANSFORMERS} (the reference implementation's version) "
                      f"would build a different model from this config: {'; '.join(problems)}; load it with "
                      "transformers >= 5", stacklevel=3)


# ---- writing ---------------------------------------------------------------------------------------


def write_checkpoint(directory: str, step_idx: int, metrics: Mapping[str, Any],
                     states: Mapping[str, Mapping[str, Any]], hf_model: Optional[nn.Module] = None,
                     tokenizer=None, hf_state: Optional[Mapping[str, Any]] = None) -> None:
    """Atomically write `{filename: state_dict}` as reference-format files into `directory`.

    With `hf_model`, the policy (and `tokenizer`) are also saved in Hugging Face format, so that
    `AutoModelForCausalLM.from_pretrained(directory)` (`AutoModelForSeq2SeqLM` for T5) loads the result,
    under transformers 4.29.2 too (see `write_hf_export`); its weights are `hf_state` (default:
    `states["policy.pt"]`), which a parallel trainer gathers from its shards.
    """
    partial = start_checkpoint(directory)
    try:
        problems = write_checkpoint_files(partial, step_idx, metrics, states, hf_model, tokenizer, hf_state)
    except BaseException:  # a full disk, Ctrl-C: give the space back; the previous checkpoint is untouched
        shutil.rmtree(partial, ignore_errors=True)
        raise
    finish_checkpoint(partial, directory, problems)


def partial_directory(directory: str) -> str:
    """Where a checkpoint is written before it becomes `directory`."""
    return directory.rstrip("/") + ".partial"


def start_checkpoint(directory: str) -> str:
    """An empty `<directory>.partial` to write a checkpoint into (parallel trainers: from every process)."""
    partial = partial_directory(directory)
    shutil.rmtree(partial, ignore_errors=True)  # debris of a write that was killed
    os.makedirs(partial)
    return partial


def write_checkpoint_files(partial: str, step_idx: int, metrics: Mapping[str, Any],
                           states: Mapping[str, Mapping[str, Any]], hf_model: Optional[nn.Module] = None,
                           tokenizer=None, hf_state: Optional[Mapping[str, Any]] = None) -> list[str]:
    """The reference-format files (and the Hugging Face copy) of `write_checkpoint`, into `partial`.

    Returns what transformers 4.29.2 could not represent of the Hugging Face copy.
    """
    for filename, state in states.items():
        payload = {"step_idx": step_idx, "state": state, "metrics": dict(metrics)}
        save_synced(payload, os.path.join(partial, filename))
    if hf_model is None:
        return []
    state = hf_state if hf_state is not None else states.get("policy.pt")
    return write_hf_export(partial, hf_model, tokenizer, state)


def finish_checkpoint(partial: str, directory: str, problems: Optional[list[str]] = None) -> None:
    """Make the complete `partial` become `directory`, atomically."""
    _replace_directory(partial, directory)
    _warn_about_legacy_problems(directory, problems or [])


def save_synced(payload: Any, path: str) -> None:
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


# ---- reading ---------------------------------------------------------------------------------------


def read_archive(path: str, label: Optional[str] = None) -> dict:
    """Read a reference-format `policy.pt` (`{"step_idx", "state", "metrics"}`) safely.

    Errors name the file as `label` (default `model.archive=<path>`). If `path` is missing because a
    kill interrupted the swap of a checkpoint directory, the complete previous checkpoint in
    `<dir>.previous` is named in the error.
    """
    label = label or f"model.archive={path}"
    if not os.path.isfile(path):
        hint = ""
        directory, filename = os.path.split(os.path.abspath(path))
        if os.path.isfile(os.path.join(directory + ".previous", filename)):
            hint = f"; the last complete checkpoint is {os.path.join(directory + '.previous', filename)}"
        raise CheckpointError(f"{label} does not exist{hint}")
    try:
        archive = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # unpickling errors come in many types
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"{label} is not a readable tensor checkpoint "
                              f"(only tensors and plain values are loaded, never code): {first_line}") from None
    if not isinstance(archive, dict) or not isinstance(archive.get("state"), dict):
        found = sorted(archive) if isinstance(archive, dict) else type(archive).__name__
        raise CheckpointError(f"{label} is not a policy.pt checkpoint: expected a dict with "
                              f"'step_idx', 'state' and 'metrics', found {found}")
    return archive


def load_policy_state(model: nn.Module, state: Mapping[str, Any], path: str, label: Optional[str] = None) -> None:
    """Load `state` into `model`, explaining any mismatch of names or shapes in one sentence.

    `state` may come from transformers 4.29.2 or the installed version (see `to_current_names`).
    Errors name the file as `label` (default `model.archive=<path>`).
    """
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
        raise CheckpointError(f"{label or f'model.archive={path}'} does not fit model {type(model).__name__}: "
                              f"{'; '.join(problems)}; was it saved from a different model config?")
    model.load_state_dict(state)
