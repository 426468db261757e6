"""The Python API: train a model you already hold on preference pairs you already hold.

    from dpo import DPOTrainer
    dataset = [("Prompt 1", "Preferred completion 1", "Dispreferred completion 1"), ...]
    trainer = DPOTrainer(model=model, tokenizer=tokenizer, dataset=dataset, beta=0.1)
    trainer.train()
    model.save_pretrained("fine-tuned-model"); tokenizer.save_pretrained("fine-tuned-model")

It is `train.py` without the command line: the keyword arguments are the config's keys with the
same defaults (`config/config.yaml`, the chosen loss's yaml, `config/model/blank_model.yaml`), and
`train()` runs the same `dpo.run.run`. Three defaults differ, as a notebook wants: wandb is off
unless `wandb={"enabled": True}`, evaluation happens only with an `eval_dataset`, and it samples
from the models only with `sample_during_eval=True` (generation is the slow part of an eval).
It does not print the whole config unless `show_config=True`.

With `cache_reference_logps=True` the cached reference log-probs are named after a digest of the
reference model's config and weights (see `dpo.reference_cache`), so another model, or the same
model after training, never reads a first one's log-probs.
"""

from __future__ import annotations

import copy
import os
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf
from torch import nn

from dpo.config import CONFIG_DIR, register_resolvers
from dpo.data.memory import InMemoryPairs
from dpo.errors import ConfigError
from dpo.lora import apply_lora, check_lora_settings, is_lora_model, lora_enabled
from dpo.losses import build_loss
from dpo.run import Given, evaluate, run

# Keys that are not settings: the API's arguments stand for them.
_NOT_SETTINGS = ("datasets", "model", "loss", "resume")


class DPOTrainer:
    """Preference training of `model` on in-memory pairs, with any registered loss (default `dpo`).

    `dataset` / `eval_dataset`: a list of `(prompt, chosen, rejected)` tuples, a list of dicts with
    those keys, or a `datasets.Dataset` with those columns; chat rows (lists of messages) are
    rendered with the tokenizer's chat template. `ref_model`: the frozen reference
    (default: a copy of `model` as it is now, or, for a peft model or with `lora={"rank": r}`, the
    model with its adapters disabled). `model` is trained in place, with its dropout turned off.
    Every other keyword is a config key: `lr=`, `batch_size=`, `n_epochs=`, a loss setting such as
    `beta=`, a model setting such as `policy_dtype=`, or a section such as `lora={"rank": 8}`.
    `show_config=True` prints the whole config when `train()` starts, as `train.py` does (it is
    always saved as the run directory's `config.yaml`).
    """

    def __init__(self, model: nn.Module, tokenizer, dataset, eval_dataset=None, ref_model: Optional[nn.Module] = None,
                 loss: str = "dpo", show_config: bool = False, **settings: Any) -> None:
        if "datasets" in settings:
            raise TypeError("DPOTrainer takes its data as dataset= (and eval_dataset=), not datasets=")
        self.config = trainer_config(loss, model, has_eval=eval_dataset is not None, **settings)
        self.tokenizer = tokenizer
        if tokenizer.pad_token_id is None:  # as load_tokenizer does: pad with EOS
            tokenizer.pad_token_id = tokenizer.eos_token_id
        self.data = InMemoryPairs(dataset, eval_dataset, name="dataset", tokenizer=tokenizer)
        if lora_enabled(self.config.lora) and not is_lora_model(model):
            check_lora_settings(self.config.lora)
            model = apply_lora(model, self.config.lora)  # once: every train() call trains the same adapters
        self.model = model
        needs_reference = build_loss(OmegaConf.to_container(self.config.loss, resolve=True)).needs_reference
        if ref_model is None and needs_reference and not is_lora_model(model):
            ref_model = copy.deepcopy(model)  # now, before training changes `model`
        self.ref_model = ref_model.requires_grad_(False) if ref_model is not None else None
        self.show_config = show_config
        self.run_dir: Optional[str] = None

    def train(self) -> dict:
        """Train for the configured epochs (or examples); return the final metrics.

        These are the final evaluation's, on `eval_dataset`; without one, the run's counters.
        The run directory (config.yaml, metrics.jsonl, checkpoints) is `config.local_run_dir`.
        """
        config = copy.deepcopy(self.config)  # each call resolves its own run directory
        metrics = run(config, self._given())
        self.run_dir = config.local_run_dir
        return metrics

    def evaluate(self, dataset=None) -> dict:
        """Eval metrics (loss, rewards, accuracies, log-probs) of the model as it is now, on `dataset`
        (default: `eval_dataset`), against the reference; writes nothing."""
        config, given = copy.deepcopy(self.config), self._given()
        if dataset is not None:
            given.datasets = [InMemoryPairs(test_rows=dataset, name="dataset", tokenizer=self.tokenizer)]
            config.n_eval_examples = len(given.datasets[0].rows["test"])
        elif "test" not in self.data.rows:
            raise ConfigError("DPOTrainer.evaluate() needs pairs to evaluate on: pass eval_dataset= when "
                              "constructing the trainer, or call evaluate(dataset)")
        return evaluate(config, given)

    def _given(self) -> Given:
        return Given(policy=self.model, reference_model=self.ref_model, tokenizer=self.tokenizer,
                     datasets=[self.data], show_config=self.show_config)


def trainer_config(loss: str, model: nn.Module, has_eval: bool, **settings: Any) -> DictConfig:
    """The Hydra config `train.py loss=<loss> model=blank_model` composes, with `settings` applied by key."""
    from hydra import compose, initialize_config_dir

    register_resolvers()
    if not os.path.isdir(CONFIG_DIR):
        raise ConfigError(f"the config folder {CONFIG_DIR} is missing; the Python API needs the repository's "
                          "config/ (install the package from a checkout with pip install -e .)")
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        config = compose(config_name="config", overrides=[f"loss={loss}", "model=blank_model"])
    OmegaConf.set_struct(config, False)
    name = getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None), "_name_or_path", "")
    config.model.name_or_path = name or f"<in-memory {type(model).__name__}>"
    config.model.policy_dtype = config.model.reference_dtype = str(next(model.parameters()).dtype).split(".")[-1]
    config.datasets = ["<in-memory dataset>"]
    config.wandb.enabled = False
    config.sample_during_eval = False
    if not has_eval:
        config.n_eval_examples = 0
    for key, value in settings.items():
        _apply_setting(config, key, value)
    missing = sorted(OmegaConf.missing_keys(config))
    if missing:
        raise ConfigError(f"{missing[0]} is required for loss={loss}: pass it, e.g. "
                          f"DPOTrainer(..., {missing[0].split('.')[-1]}=0.1)")
    return config


def _apply_setting(config: DictConfig, key: str, value: Any) -> None:
    """Set `key` where the config has it: top level, then the loss section, then the model section."""
    for section in (config, config.loss, config.model):
        if key in section.keys() and not (section is config and key in _NOT_SETTINGS):  # `in` skips ??? values
            if isinstance(value, dict) and not OmegaConf.is_missing(section, key) \
                    and isinstance(section[key], DictConfig):
                section[key] = OmegaConf.merge(section[key], value)
            else:
                section[key] = value
            return
    loss_keys = sorted(k for k in config.loss if k != "name")
    raise TypeError(f"DPOTrainer got an unknown setting {key}=; settings are the keys of config/config.yaml "
                    f"(lr, batch_size, n_epochs, ...), of loss={config.loss.name} ({', '.join(loss_keys) or 'none'}) "
                    "and of config/model/blank_model.yaml")
