"""One training run, from a config to a checkpoint, in every process of the run.

Reads top to bottom: processes -> config -> loss -> run directory (new, or one to resume) -> tokenizer
-> data -> models -> trainer (-> cached reference log-probs) -> checkpoint -> plots. `train.py` calls
`run_from_command_line` (directly, under torchrun, or in each process it starts itself); notebooks may
call `run`.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass
from itertools import chain
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf
from torch import nn

from dpo.batching import get_batch_iterator
from dpo.checkpoints import read_archive
from dpo.config import get_local_dir, validate_config
from dpo.data import dataset_source
from dpo.data.chat import set_string_prompts_as_chat
from dpo.distributed import (Processes, barrier, broadcast_object, check_batch_layout, init_processes,
                             main_process_first, shutdown, stop_on_signals, stop_signal)
from dpo.errors import CheckpointError, ConfigError, RunDirError, UserError
from dpo.lora import lora_enabled
from dpo.losses import build_loss
from dpo.metrics import MetricsSink, format_metrics
from dpo.models import load_models, load_tokenizer
from dpo.plot import plot_run_quietly
from dpo.reference_cache import (CACHE_FOLDER, check_resumed_reference, fingerprint_of, reference_identity,
                                 write_reference_identity)
from dpo.resume import read_train_state, repair_checkpoints, resumable_checkpoint, truncate_logs
from dpo.rundir import check_run_dir_is_free, describe_os_error, newest_checkpoint, open_run_dir
from dpo.trainers import trainer_class


def run_from_command_line(config: DictConfig) -> None:
    """`run`, with errors as one line on stderr and the exit codes a shell expects: 1 for errors, 128 + the signal's
    number for a stop by signal (130 for Ctrl-C, 143 for SIGTERM), which ends the run with its lock released."""
    stop_on_signals()
    try:
        run(config)
    except KeyboardInterrupt:
        _exit_stopped(config, stop_signal() or signal.SIGINT)
    except UserError as error:
        if stop_signal():  # e.g. another process stopped first, and this one failed talking to it
            _exit_stopped(config, stop_signal())
        print(f"error: {_rank_prefix()}{error}", file=sys.stderr)
        sys.exit(1)
    except BaseException:
        if stop_signal():  # Terminated, or what a collective raised when the other processes stopped first
            _exit_stopped(config, stop_signal())
        raise


def _exit_stopped(config: DictConfig, signum: int) -> None:
    if int(os.environ.get("RANK", 0)) == 0:  # one message for the whole run
        print(f"error: {interrupted_message(config, signum)}", file=sys.stderr)
    sys.exit(128 + signum)


@dataclass
class Given:
    """What a Python caller (`dpo.api.DPOTrainer`) hands over instead of having the config load it.

    `datasets` are dataset entries (e.g. an in-memory `PreferenceSource`) used instead of
    `config.datasets`, which then only names them in the saved config.
    """

    policy: Optional[nn.Module] = None
    reference_model: Optional[nn.Module] = None
    tokenizer: Any = None
    datasets: Optional[list] = None
    show_config: bool = True  # print the whole config when the run starts (train.py does; the API does not)


def run(config: DictConfig, given: Optional[Given] = None) -> dict:
    """Run the whole training described by `config` in this process; return the final eval metrics."""
    processes = init_processes(config.trainer, config.get("tensor_parallel_size"))
    try:
        return _run(config, processes, given or Given())
    finally:
        shutdown()


def evaluate(config: DictConfig, given: Optional[Given] = None) -> dict:
    """The eval metrics of the model `config` describes (or `given.policy`) on its test split; writes nothing."""
    given = given or Given()
    processes = init_processes(config.trainer, config.get("tensor_parallel_size"))
    try:
        _prepare_config(config, given)
        loss = build_loss(OmegaConf.to_container(config.loss, resolve=True))
        cache_dir = get_local_dir(config.local_dirs)
        tokenizer, _, eval_batches = _load_data(config, processes, loss, cache_dir, 0, given, with_train=False)
        policy, reference_model = load_models(config, tokenizer, loss.needs_reference, cache_dir, verbose=False,
                                              policy=given.policy, reference_model=given.reference_model)
        sink = MetricsSink(config.local_run_dir, enabled=False)
        trainer = trainer_class(config.trainer)(config, policy, tokenizer, loss, [], eval_batches,
                                                config.local_run_dir, reference_model=reference_model,
                                                judges=_judges(config, given), sink=sink, processes=processes)
        return trainer.evaluate()
    finally:
        shutdown()


def _prepare_config(config: DictConfig, given: Given) -> None:
    OmegaConf.resolve(config)  # once: the run directory's name holds a timestamp
    config.local_run_dir = broadcast_object(config.local_run_dir)  # under torchrun each process made its own
    validate_config(config, check_datasets=given.datasets is None)


def _run(config: DictConfig, processes: Processes, given: Given) -> dict:
    main = processes.is_main
    _prepare_config(config, given)
    check_batch_layout(config.batch_size, config.gradient_accumulation_steps, processes)
    loss = build_loss(OmegaConf.to_container(config.loss, resolve=True))
    run_dir = config.local_run_dir
    with ExitStack() as run_dir_lock:
        checkpoint, step = None, 0
        if config.resume:  # the run directory exists: lock it before repairing what a kill left there
            if main:
                run_dir_lock.enter_context(open_run_dir(run_dir, resume=True))
            checkpoint, step = broadcast_object(_checkpoint_to_resume(run_dir) if main else None)
            _check_same_processes(checkpoint, config.trainer, processes.world_size)
        else:
            check_run_dir_is_free(run_dir, config.overwrite_run_dir)  # fail fast; checked again under lock
        return _train(config, processes, loss, checkpoint, step, run_dir_lock, given)


def _train(config: DictConfig, processes: Processes, loss, checkpoint: Optional[str], step: int,
           run_dir_lock: ExitStack, given: Given) -> dict:
    main, run_dir = processes.is_main, config.local_run_dir
    cache_dir = get_local_dir(config.local_dirs)
    tokenizer, train_batches, eval_batches = _load_data(config, processes, loss, cache_dir, step, given)
    if checkpoint and step >= train_batches.n_examples:
        raise ConfigError(f"resume={run_dir}: the run already trained on all {train_batches.n_examples} examples "
                          f"({checkpoint}); to train it longer, pass a larger n_epochs or n_examples")
    if train_batches.n_examples == 0:
        raise ConfigError(f"the training data holds fewer examples than batch_size={config.batch_size}, so not "
                          "one full batch (training drops a partial last batch); lower batch_size or add examples")
    if main and not checkpoint:
        _note_which_limit_ends_the_run(config, train_batches.n_examples)
    judges = _judges(config, given)
    reference = reference_identity(config, cache_dir, given.reference_model,
                                   digest_weights=bool(config.cache_reference_logps))
    if checkpoint and (loss.needs_reference or lora_enabled(config.get("lora"))):
        check_resumed_reference(run_dir, reference)  # the reference is rebuilt from the files as they are now
    archive = read_archive(config.model.archive) if config.model.archive else None
    resume_state = None
    if checkpoint:
        resume_state = read_archive(os.path.join(checkpoint, "policy.pt"), label=f"{checkpoint}/policy.pt")["state"]

    if main:
        if checkpoint:
            dropped = truncate_logs(run_dir, step)
            print(f"resuming {run_dir} from {checkpoint} after {step} examples"
                  + (f" (dropped {dropped} log lines written after it)" if dropped else ""))
        else:  # created only now that config and data are known to be good
            run_dir_lock.enter_context(open_run_dir(run_dir, overwrite=config.overwrite_run_dir))
            write_reference_identity(run_dir, reference)
        write_run_config(config, run_dir, show_config=given.show_config)
    barrier()  # the run directory exists before any process writes into it
    policy, reference_model = load_models(config, tokenizer, loss.needs_reference, cache_dir, archive,
                                          resume_state=resume_state, verbose=main, policy=given.policy,
                                          reference_model=given.reference_model)
    sink = MetricsSink(run_dir, enabled=main, run_name=config.exp_name,
                       wandb_config=None if config.debug else config.wandb,
                       config_dict=OmegaConf.to_container(config), wandb_id=_wandb_id(checkpoint))
    try:
        trainer = trainer_class(config.trainer)(config, policy, tokenizer, loss, train_batches, eval_batches,
                                                run_dir, reference_model=reference_model, judges=judges,
                                                sink=sink, processes=processes)
        if checkpoint:
            trainer.load_checkpoint(checkpoint)
        if config.cache_reference_logps and reference_model is not None:
            _precompute_reference_logps(config, processes, trainer, loss, cache_dir, step, eval_batches, given,
                                        reference)
        final_metrics = trainer.train()
        trainer.save(metrics=final_metrics)
    finally:
        sink.close()
    if main and not config.debug:
        print(plot_run_quietly(run_dir))
    if main and eval_batches:
        summary = {k: v for k, v in final_metrics.items()
                   if k.startswith(("rewards_eval/accuracies", "rewards_eval/margins", "loss/eval", "judge_eval/"))}
        print(f"final eval after {trainer.example_counter} examples: {format_metrics(summary)}")
    return final_metrics


def _note_which_limit_ends_the_run(config: DictConfig, planned: int) -> None:
    """With both n_epochs and n_examples set, the first limit reached ends the run: say so when that is n_epochs,
    which otherwise silently trains on fewer examples than were asked for."""
    if config.n_epochs is None or config.n_examples is None or planned >= config.n_examples:
        return
    epochs = "1 epoch" if config.n_epochs == 1 else f"{config.n_epochs} epochs"
    print(f"note: n_epochs={config.n_epochs} ends the run after {planned} examples ({epochs} of the training data), "
          f"before n_examples={config.n_examples}; pass n_epochs=null to train on {config.n_examples} examples")


def _dataset_entries(config: DictConfig, given: Given) -> list:
    return list(given.datasets) if given.datasets is not None else list(config.datasets)


def _judges(config: DictConfig, given: Given) -> dict:
    """The datasets' judges (for eval samples), by the dataset name batches carry."""
    sources = [dataset_source(entry) for entry in _dataset_entries(config, given)]
    return {source.name: source.judge for source in sources if source.judge is not None}


def _load_data(config: DictConfig, processes: Processes, loss, cache_dir: str, step: int, given: Given,
               with_eval: bool = True, with_train: bool = True):
    """(tokenizer, this process's train batches from example `step` on, its eval batches)."""
    with main_process_first():  # the main process fills the download cache, the others read it
        tokenizer = given.tokenizer or load_tokenizer(config.model, cache_dir=cache_dir)
        if given.tokenizer is not None and config.model.get("string_prompts_as_chat"):
            set_string_prompts_as_chat(tokenizer, True)  # what load_tokenizer does for a tokenizer it loads
        options = dict(names=_dataset_entries(config, given), tokenizer=tokenizer, max_length=config.max_length,
                       max_prompt_length=config.max_prompt_length, sft_mode=not loss.uses_pairs, seed=config.seed,
                       cache_dir=cache_dir, silent=not processes.is_main, dp_rank=processes.dp_rank,
                       dp_size=processes.dp_size)
        train_batches = None
        if with_train:
            train_batches = get_batch_iterator(**options, split="train", batch_size=config.batch_size,
                                               n_epochs=config.n_epochs, n_examples=config.n_examples,
                                               start_batch=step // config.batch_size)
        eval_batches = []
        if config.n_eval_examples > 0 and with_eval:
            eval_batches = list(get_batch_iterator(**options, split="test", batch_size=config.eval_batch_size,
                                                   n_epochs=1, n_examples=config.n_eval_examples, drop_last=False))
    return tokenizer, train_batches, eval_batches


def _precompute_reference_logps(config: DictConfig, processes: Processes, trainer, loss, cache_dir: str, step: int,
                                eval_batches: list[dict], given: Given, reference: dict) -> None:
    """One pass over the batches the run will see (each pair computed once), cached under `cache_dir` in a file
    named after the reference's identity (`reference`)."""
    path = os.path.join(cache_dir, CACHE_FOLDER, f"{fingerprint_of(reference)}.pt")
    _, train_batches, _ = _load_data(config, processes, loss, cache_dir, step, given, with_eval=False)
    start = time.time()
    computed = trainer.precompute_reference_logps(chain(train_batches, eval_batches), path)
    cache, seconds = trainer.reference_cache, time.time() - start
    if not processes.is_main:
        return
    if cache.unreadable:
        print(f"warning: the reference log-prob cache {path} was unreadable ({cache.unreadable}); its log-probs are "
              "computed again and the file replaced")
    by = f" by {processes.world_size} processes" if processes.world_size > 1 else ""
    read = cache.n_pairs - computed
    if read == 0:
        print(f"reference log-probs: computed all {computed} pairs{by} in {seconds:.1f}s; saved to {path}")
    elif computed == 0:
        print(f"reference log-probs: all {read} pairs read from {path}")
    else:
        print(f"reference log-probs: {read} of {cache.n_pairs} pairs read from {path}, {computed} computed{by} in "
              f"{seconds:.1f}s and added to it")


def _checkpoint_to_resume(run_dir: str) -> tuple[str, int]:
    for note in repair_checkpoints(run_dir):
        print(f"note: {note}")
    return resumable_checkpoint(run_dir)


def _train_state(checkpoint: str) -> dict:
    return read_train_state(checkpoint)


def _check_same_processes(checkpoint: str, trainer: str, world_size: int) -> None:
    """Sharded optimizer state and per-process random states fit only the layout that wrote them."""
    state = _train_state(checkpoint)
    if state["trainer"] != trainer or state["world_size"] != world_size:
        raise CheckpointError(f"{checkpoint} was written by trainer={state['trainer']} with {state['world_size']} "
                              f"processes; resume it with the same trainer and number of processes (now "
                              f"trainer={trainer} with {world_size})")


def _wandb_id(checkpoint: Optional[str]) -> Optional[str]:
    return _train_state(checkpoint).get("wandb_id") if checkpoint else None


def write_run_config(config: DictConfig, run_dir: str, show_config: bool = True) -> None:
    if show_config:
        print(OmegaConf.to_yaml(config))
    print(f"run directory: {run_dir}")
    try:
        OmegaConf.save(config, os.path.join(run_dir, "config.yaml"))
    except OSError as error:
        raise RunDirError(f"cannot write {run_dir}/config.yaml: {describe_os_error(error)}") from None


def interrupted_message(config: DictConfig, signum: int = signal.SIGINT) -> str:
    """What a Ctrl-C (or another stop signal) left behind: the newest complete checkpoint of the run, if any."""
    run_dir = OmegaConf.select(config, "local_run_dir", throw_on_resolution_failure=False)
    checkpoint = newest_checkpoint(run_dir) if isinstance(run_dir, str) else None
    stopped = "interrupted" if signum == signal.SIGINT else f"stopped by {signal.Signals(signum).name}"
    if checkpoint is None:
        return f"{stopped}; no checkpoint was written"
    return f"{stopped}; the last complete checkpoint is {checkpoint}; continue with resume={run_dir}"


def _rank_prefix() -> str:
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    return f"[process {os.environ.get('RANK', 0)} of {world_size}] " if world_size > 1 else ""
