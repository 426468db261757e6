"""Command-line overrides that Hydra cannot compose, explained in one sentence.

Hydra's own report of a misspelled key (`bacth_size=8`) is several lines that end by suggesting
`+bacth_size=8`, which this project then refuses as an unknown key; an unknown group option
(`loss=dpoo`) prints the whole search path. `composition_problem` composes the command line the
way `train.py` will and, when that fails, says which key or option is unknown, the closest one that
exists, and what does exist.
"""

from __future__ import annotations

import difflib
import os
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf

from dpo.config import CONFIG_DIR, compose_config

_ABSENT = object()


def composition_problem(arguments: list[str]) -> Optional[str]:
    """Why `python train.py <arguments>` cannot compose its config, or None if it can (or if Hydra's own
    command-line flags are among them, which Hydra then handles itself)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    if any(argument.startswith("-") for argument in arguments):
        return None
    try:
        overrides = OverridesParser.create().parse_overrides(list(arguments))
    except HydraException as error:
        return f"cannot read the command line: {_one_line(error)}"
    sweep = next((override for override in overrides if override.is_sweep_override()), None)
    if sweep is not None:
        return (f"{sweep.input_line}: a comma-separated value asks Hydra for one run per value, which needs "
                f"--multirun; for a list write {sweep.key_or_group}=[...], for text with a comma quote it")
    overrides = [override for override in overrides if not override.key_or_group.startswith("hydra")]
    for override in overrides:
        problem = _unknown_group_option(override)
        if problem:
            return problem
    lines = [override.input_line for override in overrides]
    try:
        compose_config(lines)
    except HydraException as error:
        return _explain(error, overrides, lines)
    return None


def _unknown_group_option(override) -> Optional[str]:
    """`loss=dpoo`: the option names no file of the config group."""
    group, value = override.key_or_group, override.value()
    folder = os.path.join(CONFIG_DIR, group)
    if "." in group or not os.path.isdir(folder) or not isinstance(value, str) or override.is_delete():
        return None
    options = sorted(name[:-len(".yaml")] for name in os.listdir(folder) if name.endswith(".yaml"))
    if value in options:
        return None
    return (f"{override.input_line}: there is no {group} named {value!r}{_did_you_mean(value, options, group + '=')} "
            f"(the {group} options are the files of config/{group}/: {', '.join(options)})")


def _explain(error: Exception, overrides: list, lines: list[str]) -> str:
    bad = next((override for override in overrides if f"'{override.key_or_group}'" in str(error)), None)
    if bad is None:
        return f"cannot compose the config: {_one_line(error)}"
    # For a dict value (lora={r:4}) the unknown key is inside it: OmegaConf's error names the full key.
    key = getattr(error.__cause__, "full_key", None) or bad.key_or_group
    resume = next((override.value() for override in overrides if override.key_or_group == "resume"), None)
    saved = _saved_config(resume)
    if saved is not None and OmegaConf.select(saved, key, default=_ABSENT) is not _ABSENT:
        # The run has the key, the default config that the command line is composed on does not
        # (the run's loss or model is another than the default one).
        return (f"cannot resume with {bad.input_line}: a resumed run keeps the config it was started with "
                f"({os.path.join(str(resume), 'config.yaml')}, where {key} is "
                f"{OmegaConf.select(saved, key)!r}); drop the override to continue the run as it was, or start a new "
                "run (without resume=) to train with it")
    section, _, leaf = key.rpartition(".")
    try:
        config = compose_config([line for line in lines if line != bad.input_line])
    except Exception:  # another override is wrong too; name this one without the list of what exists
        return f"{bad.input_line}: the config has no key {key}; check its spelling"
    node = OmegaConf.select(config, section) if section else config
    if not isinstance(node, DictConfig):
        return f"{bad.input_line}: {section} is not a section of the config, so it has no key {leaf}"
    known = sorted(str(name) for name in node.keys() if name not in ("hydra", "defaults"))
    where = _section_name(config, section)
    prefix = f"{section}." if section else ""
    listing = f"its settings: {', '.join(known)}" if section else "the settings are the keys of config/config.yaml"
    return f"{bad.input_line}: {where} has no setting {leaf!r}{_did_you_mean(leaf, known, prefix)} ({listing})"


def _saved_config(run_dir: Any) -> Optional[DictConfig]:
    path = os.path.join(str(run_dir), "config.yaml") if isinstance(run_dir, str) else ""
    try:
        return OmegaConf.load(path) if os.path.isfile(path) else None
    except Exception:  # an unreadable config: train.py's resume names it
        return None


def _section_name(config: DictConfig, section: str) -> str:
    if section in ("loss", "model"):
        chosen = _choice(config, section)
        return f"{section}={chosen}" if chosen else section
    return section or "the config"


def _choice(config: DictConfig, group: str) -> Any:
    if group == "loss":
        return OmegaConf.select(config, "loss.name")
    return None  # a model file may set keys anywhere (@package _global_), so it names no section


def _did_you_mean(name: str, options: list[str], prefix: str) -> str:
    close = difflib.get_close_matches(name, options, n=1, cutoff=0.6)
    return f"; did you mean {prefix}{close[0]}?" if close else ""


def _one_line(error: Exception) -> str:
    text = " ".join(line.strip() for line in str(error).strip().splitlines() if line.strip())
    return text or type(error).__name__
