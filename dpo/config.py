"""Config checks that run before anything is loaded, so that every bad value costs seconds, not a model load.

`validate_config` raises `ConfigError` with one sentence naming the key and the fix; it also builds
the loss module (whose constructor checks its own settings) and returns it.
"""

from __future__ import annotations

import getpass
import os
from datetime import datetime

import torch
from omegaconf import DictConfig, OmegaConf

from dpo.data import dataset_source
from dpo.errors import ConfigError
from dpo.losses import PreferenceLoss, build_loss
from dpo.models import torch_dtype

_POSITIVE_INTEGERS = ("batch_size", "eval_batch_size", "gradient_accumulation_steps", "max_length",
                      "max_prompt_length", "eval_every")
_NON_NEGATIVE_INTEGERS = ("n_eval_examples", "n_eval_model_samples", "warmup_steps")


def get_local_dir(prefixes: list[str]) -> str:
    """`<first existing prefix>/<user>`, creating the last prefix if none exists (as the reference)."""
    for prefix in prefixes:
        if os.path.exists(prefix):
            return os.path.join(prefix, getpass.getuser())
    os.makedirs(prefixes[-1], exist_ok=True)
    return os.path.join(prefixes[-1], getpass.getuser())


def get_local_run_dir(exp_name: str, local_dirs: list[str]) -> str:
    """A new run directory `<local dir>/<exp_name>_<timestamp>` (the `${get_local_run_dir:...}` resolver)."""
    timestamp = datetime.now().strftime("%Y-%m-%d_%H-%M-%S_%f")
    run_dir = os.path.join(get_local_dir(list(local_dirs)), f"{exp_name}_{timestamp}")
    os.makedirs(run_dir, exist_ok=True)
    return run_dir


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("get_local_run_dir"):
        OmegaConf.register_new_resolver("get_local_run_dir", get_local_run_dir)


def validate_config(config: DictConfig) -> PreferenceLoss:
    """Check every value `train.py` relies on; return the configured loss module."""
    _check_missing(config)
    for key in _POSITIVE_INTEGERS:
        _check_integer(config, key, minimum=1)
    for key in _NON_NEGATIVE_INTEGERS:
        _check_integer(config, key, minimum=0)
    if config.batch_size % config.gradient_accumulation_steps:
        raise ConfigError(f"batch_size={config.batch_size} must be divisible by gradient_accumulation_steps="
                          f"{config.gradient_accumulation_steps} (each micro-batch holds the same number of examples)")
    if config.max_prompt_length >= config.max_length:
        raise ConfigError(f"max_prompt_length={config.max_prompt_length} must be below max_length={config.max_length}, "
                          "or responses would get no tokens")
    if config.n_epochs is None and config.n_examples is None:
        raise ConfigError("set n_epochs or n_examples: both are null, so training would never end")
    for key in ("n_epochs", "n_examples"):
        if config[key] is not None:
            _check_integer(config, key, minimum=1)
    if not isinstance(config.lr, (int, float)) or config.lr <= 0:
        raise ConfigError(f"lr must be a positive number, got {config.lr!r}")
    _check_optimizer(config.optimizer)
    _check_trainer(config.trainer)
    torch_dtype(config.model.policy_dtype, "model.policy_dtype")
    torch_dtype(config.model.reference_dtype, "model.reference_dtype")
    if not config.model.name_or_path and not config.model.get("from_config"):
        raise ConfigError("model.name_or_path is required: a hub name or local directory "
                          "(or choose a model config, e.g. model=pythia28 or model=tiny)")
    _check_datasets(config.datasets)
    return build_loss(OmegaConf.to_container(config.loss, resolve=True))


def _check_missing(config: DictConfig) -> None:
    missing = sorted(key for key in OmegaConf.missing_keys(config))
    if not missing:
        return
    key = missing[0]
    examples = {"loss.beta": "loss.beta=0.1", "model.name_or_path": "model.name_or_path=EleutherAI/pythia-2.8b"}
    example = examples.get(key, f"{key}=...")
    raise ConfigError(f"{key} is required{' for loss=' + str(config.loss.name) if key.startswith('loss.') else ''}: "
                      f"pass it on the command line, e.g. {example}")


def _check_integer(config: DictConfig, key: str, minimum: int) -> None:
    value = config[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        bound = "a positive" if minimum == 1 else "a non-negative"
        raise ConfigError(f"{key} must be {bound} integer, got {value!r}")


def _check_optimizer(name: str) -> None:
    optimizer = getattr(torch.optim, str(name), None)
    if not (isinstance(optimizer, type) and issubclass(optimizer, torch.optim.Optimizer)):
        valid = sorted(n for n, o in vars(torch.optim).items()
                       if isinstance(o, type) and issubclass(o, torch.optim.Optimizer) and o is not torch.optim.Optimizer)
        raise ConfigError(f"optimizer={name} is not a torch.optim optimizer: valid are {', '.join(valid)}")


def _check_trainer(name: str) -> None:
    from dpo.trainers import TRAINERS

    if name not in TRAINERS:
        raise ConfigError(f"trainer={name} is not available: valid trainers are {', '.join(sorted(TRAINERS))}")


def _check_datasets(names) -> None:
    if isinstance(names, str) or not names:
        raise ConfigError(f"datasets must be a non-empty list, e.g. datasets=[hh] or datasets=[hh,shp]; got {names!r}")
    for name in names:
        dataset_source(str(name))
