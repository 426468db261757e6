"""Train a language model on preferences: SFT, DPO, conservative DPO, IPO, ...

    python train.py                                              # tiny model, toy task, SFT
    python train.py loss=sft model=pythia28 datasets=[hh] exp_name=my_sft
    python train.py loss=dpo loss.beta=0.1 model=pythia28 datasets=[hh] model.archive=.../LATEST/policy.pt

Reads top to bottom: config -> loss -> tokenizer -> data -> run directory -> models -> trainer -> checkpoint.
"""

from __future__ import annotations

import copy
import os
import sys
from typing import Optional

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from dpo.batching import get_batch_iterator
from dpo.checkpoints import load_policy_state, read_archive
from dpo.config import get_local_dir, register_resolvers, validate_config
from dpo.data import dataset_source
from dpo.errors import RunDirError, UserError
from dpo.losses import build_loss
from dpo.metrics import MetricsSink, format_metrics
from dpo.models import load_model, load_tokenizer, torch_dtype
from dpo.rundir import check_run_dir_is_free, describe_os_error, newest_checkpoint, open_run_dir
from dpo.trainers import TRAINERS

register_resolvers()


@hydra.main(version_base="1.3", config_path="config", config_name="config")
def main(config: DictConfig) -> None:
    try:
        train(config)
    except KeyboardInterrupt:
        print(f"error: {interrupted_message(config)}", file=sys.stderr)
        sys.exit(130)  # the shell's code for a run ended by Ctrl-C
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)


def train(config: DictConfig) -> dict:
    """Run the whole training described by `config`; return the final eval metrics."""
    OmegaConf.resolve(config)  # once: the run directory's name holds a timestamp
    validate_config(config)
    loss = build_loss(OmegaConf.to_container(config.loss, resolve=True))
    check_run_dir_is_free(config.local_run_dir, config.overwrite_run_dir)  # fail fast; checked again under lock

    cache_dir = get_local_dir(config.local_dirs)
    tokenizer = load_tokenizer(config.model, cache_dir=cache_dir)
    data_options = dict(names=list(config.datasets), tokenizer=tokenizer, max_length=config.max_length,
                        max_prompt_length=config.max_prompt_length, sft_mode=not loss.uses_pairs,
                        seed=config.seed, cache_dir=cache_dir)
    train_batches = get_batch_iterator(**data_options, split="train", batch_size=config.batch_size,
                                       n_epochs=config.n_epochs, n_examples=config.n_examples)
    eval_batches = []
    if config.n_eval_examples > 0:
        eval_batches = list(get_batch_iterator(**data_options, split="test", batch_size=config.eval_batch_size,
                                               n_epochs=1, n_examples=config.n_eval_examples, drop_last=False))
    sources = {name: dataset_source(name) for name in config.datasets}
    judges = {name: source.judge for name, source in sources.items() if source.judge is not None}
    archive = read_archive(config.model.archive) if config.model.archive else None

    with open_run_dir(config.local_run_dir, overwrite=config.overwrite_run_dir) as run_dir:
        write_run_config(config, run_dir)
        policy, reference_model = load_models(config, tokenizer, loss.needs_reference, cache_dir, archive)
        sink = MetricsSink(run_dir, enabled=True, run_name=config.exp_name,
                           wandb_config=None if config.debug else config.wandb,
                           config_dict=OmegaConf.to_container(config))
        try:
            trainer = TRAINERS[config.trainer](config, policy, tokenizer, loss, train_batches, eval_batches, run_dir,
                                               reference_model=reference_model, judges=judges, sink=sink)
            final_metrics = trainer.train()
            trainer.save(metrics=final_metrics)
        finally:
            sink.close()
    summary = {k: v for k, v in final_metrics.items()
               if k.startswith(("rewards_eval/accuracies", "rewards_eval/margins", "loss/eval", "judge_eval/"))}
    print(f"final eval after {trainer.example_counter} examples: {format_metrics(summary)}")
    return final_metrics


def write_run_config(config: DictConfig, run_dir: str) -> None:
    print(OmegaConf.to_yaml(config))
    print(f"run directory: {run_dir}")
    try:
        OmegaConf.save(config, os.path.join(run_dir, "config.yaml"))
    except OSError as error:
        raise RunDirError(f"cannot write {run_dir}/config.yaml: {describe_os_error(error)}") from None


def interrupted_message(config: DictConfig) -> str:
    """What a Ctrl-C left behind: the newest complete checkpoint of the run, if any."""
    run_dir = OmegaConf.select(config, "local_run_dir", throw_on_resolution_failure=False)
    checkpoint = newest_checkpoint(run_dir) if isinstance(run_dir, str) else None
    if checkpoint is None:
        return "interrupted; no checkpoint was written"
    return f"interrupted; the last complete checkpoint is {checkpoint}"


def load_models(config: DictConfig, tokenizer, needs_reference: bool, cache_dir: str, archive: Optional[dict]):
    """The policy and, if the loss needs one, the frozen reference model, both from `archive` (read from
    `model.archive`) if given."""
    torch.manual_seed(config.seed)  # a model built from a config gets the same initial weights every run
    policy = load_model(config.model, tokenizer, torch_dtype(config.model.policy_dtype, "model.policy_dtype"),
                        cache_dir=cache_dir)
    if archive is not None:
        load_policy_state(policy, archive["state"], config.model.archive)
        print(f"loaded model.archive={config.model.archive} (step {archive.get('step_idx')})")
    if not needs_reference:
        return policy, None
    reference_dtype = torch_dtype(config.model.reference_dtype, "model.reference_dtype")
    if config.model.get("from_config"):
        reference_model = copy.deepcopy(policy).to(reference_dtype)
    else:
        reference_model = load_model(config.model, tokenizer, reference_dtype, cache_dir=cache_dir)
        if archive is not None:
            load_policy_state(reference_model, archive["state"], config.model.archive)
    reference_model.requires_grad_(False)
    return policy, reference_model


if __name__ == "__main__":
    main()
