"""Config checks that run before anything is loaded, so that every bad value costs seconds, not a model load.

`validate_config` raises `ConfigError` with one sentence naming the key and the fix. The loss
module's constructor checks the `loss.*` settings (`dpo.losses.build_loss`).
"""

from __future__ import annotations

import getpass
import math
import os
from collections import Counter
from datetime import datetime
from dataclasses import dataclass, fields
from typing import Any, Callable, Mapping, Optional

import torch
from omegaconf import DictConfig, OmegaConf

from dpo.data import dataset_source
from dpo.errors import ConfigError
from dpo.lora import check_lora_settings, lora_enabled
from dpo.losses import loss_uses_pairs
from dpo.models import torch_dtype

_POSITIVE_INTEGERS = ("batch_size", "eval_batch_size", "gradient_accumulation_steps", "max_length",
                      "max_prompt_length", "eval_every")
_NON_NEGATIVE_INTEGERS = ("n_eval_examples", "n_eval_model_samples", "warmup_steps")
_FLAGS = ("debug", "do_first_eval", "sample_during_eval", "activation_checkpointing", "overwrite_run_dir",
          "wandb.enabled", "packing", "prefix_sharing", "cache_reference_logps", "compile")
NAN_POLICIES = ("stop", "skip")
CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "config")


@dataclass(frozen=True)
class TrainerSettings:
    """Everything a trainer reads from the config, typed and in one place (`from_config`).

    The Hydra config is composed and checked by `validate_config` first (by `train.py` and the
    Python API alike); trainers then read these fields, never the loose config.
    """

    seed: int = 0
    batch_size: int = 4
    gradient_accumulation_steps: int = 1
    optimizer: str = "RMSprop"
    lr: float = 5e-7
    warmup_steps: int = 150
    max_grad_norm: Optional[float] = 10.0
    nan_policy: str = "stop"
    n_examples: Optional[int] = None
    eval_every: Optional[int] = 20_000
    save_every: Optional[int] = None
    do_first_eval: bool = True
    sample_during_eval: bool = True
    n_eval_model_samples: int = 16
    max_length: int = 512
    minimum_log_interval_secs: float = 1.0
    activation_checkpointing: bool = False
    compile: bool = False
    debug: bool = False
    datasets: tuple = ()  # how the data is named in messages
    policy_dtype: str = "float32"  # model.policy_dtype
    mixed_precision: Optional[str] = None  # model.fsdp_policy_mp
    block_name: Optional[str] = None  # model.block_name

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "TrainerSettings":
        model = config.get("model") or {}
        values = {f.name: config.get(f.name, f.default) for f in fields(cls)
                  if f.name not in ("datasets", "policy_dtype", "mixed_precision", "block_name")}
        if values["max_grad_norm"] is not None:
            values["max_grad_norm"] = float(values["max_grad_norm"])
        for key in ("lr", "minimum_log_interval_secs"):
            values[key] = float(values[key])
        return cls(**values, datasets=tuple(str(name) for name in config.get("datasets") or ()),
                   policy_dtype=str(model.get("policy_dtype", "float32")), mixed_precision=model.get("fsdp_policy_mp"),
                   block_name=model.get("block_name"))


def get_local_dir(prefixes: list[str]) -> str:
    """`<first existing prefix>/<user>`, else `<last prefix>/<user>`; nothing is created until something is written."""
    prefix = next((prefix for prefix in prefixes if os.path.exists(prefix)), prefixes[-1])
    return os.path.join(prefix, getpass.getuser())


def get_local_run_dir(exp_name: str, local_dirs: list[str]) -> str:
    """A new run directory name `<local dir>/<exp_name>_<timestamp>` (the `${get_local_run_dir:...}` resolver).

    It only names the directory: `dpo.rundir.open_run_dir` creates it once the data has been checked.
    Each evaluation gives a new timestamp, so `train` resolves the config once, first.
    """
    timestamp = datetime.now().strftime("%Y-%m-%d_%H-%M-%S_%f")
    return os.path.join(get_local_dir(list(local_dirs)), f"{exp_name}_{timestamp}")


def sft_or_preference(loss_name: str, sft_value: Any, preference_value: Any) -> Any:
    """`${sft_or_preference:${loss.name},A,B}`: A for a loss on single responses (SFT), B for one on pairs.

    A model config uses it for settings that differ between the two stages (the tiny model's
    learning rate), so that every preference loss, including one added later, gets them.
    """
    return preference_value if loss_uses_pairs(str(loss_name)) else sft_value


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("get_local_run_dir"):
        OmegaConf.register_new_resolver("get_local_run_dir", get_local_run_dir)
    if not OmegaConf.has_resolver("sft_or_preference"):
        OmegaConf.register_new_resolver("sft_or_preference", sft_or_preference)


def compose_config(overrides: list[str] = ()) -> DictConfig:
    """The config `python train.py <overrides>` composes, for code that builds one without the command line.

    The yaml files use this package's resolvers, which OmegaConf looks up only when a value is read,
    so they are registered here: a caller that composes with Hydra directly and forgets them fails
    later, on the first read, far from the cause.
    """
    from hydra import compose, initialize_config_dir

    register_resolvers()
    if not os.path.isdir(CONFIG_DIR):
        raise ConfigError(f"the config folder {CONFIG_DIR} is missing; install the package from a checkout "
                          "with pip install -e .")
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def validate_config(config: DictConfig, check_datasets: bool = True) -> None:
    """Check every value `train.py` relies on, before anything is loaded; warn about suspicious ones.

    It also rounds `eval_every` and `save_every` down to a multiple of `batch_size` (with a
    warning), the only values it adjusts. Loss settings are checked by `build_loss`.
    """
    _check_missing(config)
    _check_known_keys(config)
    for key in _POSITIVE_INTEGERS:
        _check_integer(config, key, minimum=1)
    for key in _NON_NEGATIVE_INTEGERS:
        _check_integer(config, key, minimum=0)
    _check_integer(config, "seed", minimum=0, maximum=2**32 - 1)  # numpy's seed range
    for key in _FLAGS:
        if not isinstance(OmegaConf.select(config, key), bool):
            raise ConfigError(f"{key} must be true or false, got {OmegaConf.select(config, key)!r}")
    if config.batch_size % config.gradient_accumulation_steps:
        raise ConfigError(f"batch_size={config.batch_size} must be divisible by gradient_accumulation_steps="
                          f"{config.gradient_accumulation_steps} (each micro-batch holds the same number of examples)")
    if config.max_prompt_length >= config.max_length:
        raise ConfigError(f"max_prompt_length={config.max_prompt_length} must be below max_length={config.max_length}, "
                          "or responses would get no tokens")
    if config.n_epochs is None and config.n_examples is None:
        raise ConfigError("set n_epochs or n_examples: both are null, so training would never end")
    for key in ("n_epochs", "n_examples", "save_every", "nproc_per_node", "tensor_parallel_size", "fsdp_port",
                "lm_head_chunk_size"):
        if config.get(key) is not None:
            _check_integer(config, key, minimum=1)
    _check_number(config, "lr", "a positive number (e.g. lr=5e-7)", lambda value: value > 0)
    _check_number(config, "minimum_log_interval_secs", "a non-negative number of seconds", lambda value: value >= 0)
    if config.max_grad_norm is not None:
        _check_number(config, "max_grad_norm", "a positive number, or null for no clipping", lambda value: value > 0)
    if config.nan_policy not in NAN_POLICIES:
        raise ConfigError(f"nan_policy={config.nan_policy} is not valid: use {' or '.join(NAN_POLICIES)}")
    _check_optimizer(config.optimizer)
    _check_trainer(config.trainer)
    torch_dtype(config.model.policy_dtype, "model.policy_dtype")
    torch_dtype(config.model.reference_dtype, "model.reference_dtype")
    if not isinstance(config.model.get("string_prompts_as_chat", False), bool):  # absent in older runs' configs
        raise ConfigError(f"model.string_prompts_as_chat must be true or false, got "
                          f"{config.model.string_prompts_as_chat!r}")
    if not isinstance(config.model.get("chat_template") or "", str):
        raise ConfigError("model.chat_template must be a file path or a Jinja template string (quote it on the "
                          "command line), or null")
    if not config.model.name_or_path and not config.model.get("from_config"):
        raise ConfigError("model.name_or_path is required: a hub name or local directory "
                          "(or choose a model config, e.g. model=pythia28 or model=tiny)")
    if check_datasets:  # not when the Python API hands over in-memory data
        _check_datasets(config.datasets)
    _check_lora(config)
    for key in ("eval_every", "save_every"):
        _round_to_batches(config, key)


def _check_lora(config: DictConfig) -> None:
    lora = config.get("lora")
    if not lora_enabled(lora):
        return
    check_lora_settings(lora)
    if config.trainer != "BasicTrainer":
        raise ConfigError(f"lora.rank works with trainer=BasicTrainer only (not {config.trainer}); use "
                          "trainer=BasicTrainer, or train every weight with lora.rank=null")
    if config.cache_reference_logps:
        raise ConfigError("cache_reference_logps=true has nothing to free with lora.rank set (the reference is the "
                          "policy with its adapters disabled, not a second model); set cache_reference_logps=false")


def _round_to_batches(config: DictConfig, key: str) -> None:
    """Steps end at multiples of batch_size, so a cadence in examples must be one too."""
    every = config.get(key)
    if every is not None and every % config.batch_size:
        adjusted = max(config.batch_size, every - every % config.batch_size)
        print(f"warning: {key}={every} is not a multiple of batch_size={config.batch_size}; using {key}={adjusted}")
        config[key] = adjusted


def _check_missing(config: DictConfig) -> None:
    missing = sorted(key for key in OmegaConf.missing_keys(config))
    if not missing:
        return
    key = missing[0]
    examples = {"loss.beta": "loss.beta=0.1", "model.name_or_path": "model.name_or_path=EleutherAI/pythia-2.8b",
                "loss.terms": "'loss.terms={dpo:{weight:1.0,beta:0.1},sft:{weight:0.05}}'"}
    example = examples.get(key, f"{key}=...")
    raise ConfigError(f"{key} is required{' for loss=' + str(config.loss.name) if key.startswith('loss.') else ''}: "
                      f"pass it on the command line, e.g. {example}")


def _check_known_keys(config: DictConfig) -> None:
    """Refuse keys that no config file defines (e.g. `+resume=true`): they would be silently ignored."""
    _check_keys_defined_in(config, "config.yaml", prefix="", also=("model", "loss"))
    _check_keys_defined_in(config.model, os.path.join("model", "blank_model.yaml"), prefix="model.")


def _check_keys_defined_in(node: DictConfig, schema_file: str, prefix: str, also: tuple[str, ...] = ()) -> None:
    path = os.path.join(CONFIG_DIR, schema_file)
    if not os.path.isfile(path):  # an installed package without the config folder: nothing to compare with
        return
    known = set(OmegaConf.load(path)) - {"defaults", "hydra"} | set(also)
    unknown = sorted(set(node) - known)
    if unknown:
        raise ConfigError(f"{prefix}{unknown[0]} is not a config key (the valid keys are in config/{schema_file}); "
                          "remove it or fix its spelling")


def _check_integer(config: DictConfig, key: str, minimum: int, maximum: Optional[int] = None) -> None:
    value = config[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum or (maximum and value > maximum):
        bound = {0: "a non-negative", 1: "a positive"}[minimum]
        limit = f" at most {maximum}" if maximum else ""
        raise ConfigError(f"{key} must be {bound} integer{limit}, got {value!r}")


def _check_number(config: DictConfig, key: str, wanted: str, in_range: Callable[[float], bool]) -> None:
    value = config[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not in_range(value):
        raise ConfigError(f"{key} must be {wanted}, got {value!r}")


def _check_optimizer(name: str) -> None:
    optimizer = getattr(torch.optim, str(name), None)
    if not (isinstance(optimizer, type) and issubclass(optimizer, torch.optim.Optimizer)):
        valid = sorted(n for n, o in vars(torch.optim).items()
                       if isinstance(o, type) and issubclass(o, torch.optim.Optimizer) and o is not torch.optim.Optimizer)
        raise ConfigError(f"optimizer={name} is not a torch.optim optimizer: valid are {', '.join(valid)}")


def _check_trainer(name: str) -> None:
    from dpo.trainers import TRAINER_NAMES

    if name not in TRAINER_NAMES:
        raise ConfigError(f"trainer={name} is not available: valid trainers are {', '.join(TRAINER_NAMES)}")


def _check_datasets(names) -> None:
    if isinstance(names, str) or not names:
        raise ConfigError(f"datasets must be a non-empty list, e.g. datasets=[hh] or datasets=[hh,shp]; got {names!r}")
    from collections.abc import Mapping  # here: only this check of the file needs it

    for entry in names:
        # A name, path or mapping entry ({path: ..., split: ...}, or a named one in config/dataset/): its keys
        # and values are checked here, while nothing is loaded yet.
        dataset_source(entry if isinstance(entry, (str, Mapping)) else str(entry))
    for name, count in Counter(str(name) for name in names).items():
        if count > 1:
            print(f"warning: datasets lists {name} {count} times, so each of its examples is used {count} times "
                  "per epoch; list it once unless you mean to up-weight it")
