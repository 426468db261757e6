"""Trainers: the training loop, evaluation, sampling, checkpointing and resuming.

`BasicTrainer` runs on one device. It knows nothing about any particular loss: it computes log-probs
through `policy_logps` and `reference_logps` (the latter only when `loss.needs_reference`) and hands
them to the loss module. `FSDPTrainer` and `TensorParallelTrainer` (dpo/parallel.py) subclass it and
override only what parallelism changes: how models are placed, the gradient norm, how the policy's
full weights and the optimizer state are gathered and restored, and how samples are generated.

A checkpoint holds everything a run needs to continue exactly (`load_checkpoint`): the policy,
the optimizer and scheduler, the counters and every process's random state.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import os
import random
import shutil
import time
from collections import defaultdict
from typing import Any, Callable, Iterable, Mapping, Optional

import numpy as np
import torch
import tqdm
from omegaconf import DictConfig
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from dpo.checkpoints import (finish_checkpoint, partial_directory, save_synced, start_checkpoint,
                             to_reference_names, write_checkpoint_files)
from dpo.config import TrainerSettings
from dpo.distributed import (Processes, all_ranks_agree, barrier, broadcast_object, gather_objects, gather_values,
                             single_process)
from dpo.errors import CheckpointError, ConfigError, DataError, RunDirError, TrainingError
from dpo.layout import batch_size_of, micro_batches, slice_batch
from dpo.lora import (ADAPTER_FOLDER, adapter_state_dict, adapters_disabled, is_lora_model, merged_state_dict,
                      save_adapter)
from dpo.logps import LogpsOptions, SequenceLogps, forward_logps
from dpo.losses import PreferenceLoss
from dpo.metrics import MetricsSink, mean_metrics
from dpo.models import compile_blocks
from dpo.reference_cache import ReferenceLogpsCache
from dpo.rundir import RESUME_STATE_FILE, describe_os_error, newest_checkpoint

# With nan_policy=skip, this many non-finite steps in a row mean the model will not recover: stop.
MAX_CONSECUTIVE_SKIPS = 10

Judge = Callable[[str, str], float]


def split_metric_name(name: str, split: str) -> str:
    """"rewards/chosen" -> "rewards_train/chosen", "loss" -> "loss/train": the reference implementation's names."""
    group, slash, key = name.partition("/")
    return f"{group}_{split}/{key}" if slash else f"{name}/{split}"


def warmup_schedule(warmup_steps: int) -> Callable[[int], float]:
    """Linear warmup from 1/(warmup_steps+1) of the learning rate to all of it, then constant."""
    return lambda step: min(1.0, (step + 1) / (warmup_steps + 1))


class BasicTrainer:
    """The reference implementation's training loop on a single device (a GPU when one is visible).

    Every `eval_every` examples (and first, if `do_first_eval`, and once at the end) it evaluates on
    `eval_batches`, optionally samples and judges, and saves a checkpoint to `step-N/`; every
    `save_every` examples it saves one without evaluating. `save()` writes `LATEST/`.
    `train_batches` yields this process's slice of every global batch of `config.batch_size`.
    """

    def __init__(self, config: DictConfig, policy: nn.Module, tokenizer, loss: PreferenceLoss,
                 train_batches: Iterable[dict], eval_batches: list[dict], run_dir: str,
                 reference_model: Optional[nn.Module] = None, judges: Optional[Mapping[str, Judge]] = None,
                 sink: Optional[MetricsSink] = None, processes: Optional[Processes] = None):
        self.config = config  # the whole run's config, as loaded; the trainer reads `settings`
        self.settings = TrainerSettings.from_config(config)
        self.policy = policy
        self.reference_model = reference_model
        self.tokenizer = tokenizer
        self.loss = loss
        self.train_batches = train_batches
        self.eval_batches = eval_batches
        self.run_dir = run_dir
        self.judges = dict(judges or {})
        self.processes = processes or single_process()
        self.device = self.processes.device
        self.sink = sink or MetricsSink(run_dir, enabled=self.is_main_process)
        self.example_counter = 0
        self.batch_counter = 0
        self.skipped_steps = 0
        self.consecutive_skips = 0
        self.resumed_at: Optional[int] = None  # the example count a resumed run continues from
        self.logps_options = LogpsOptions.from_config(config)
        self.logps_options.check(policy)
        self.reference_cache: Optional[ReferenceLogpsCache] = None  # see precompute_reference_logps
        # by eval batch index: a frozen reference samples the same text at every evaluation, so once is enough
        self.reference_samples: dict[int, list[str]] = {}
        self.place_models()
        self.loss.to(self.device)  # its running statistics, if any (bco)
        optimizer_class = getattr(torch.optim, self.settings.optimizer)
        parameters = list(self.policy.parameters())
        fused = fused_if_available(optimizer_class, parameters, self.device)
        self.optimizer = optimizer_class(parameters, lr=self.settings.lr, **fused)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, warmup_schedule(self.settings.warmup_steps))

    @property
    def is_main_process(self) -> bool:
        return self.processes.is_main

    # ---- the loop ---------------------------------------------------------------------------

    def train(self) -> dict:
        """Train on all of `train_batches`; return the final evaluation's metrics."""
        if self.resumed_at is None:
            seed_everything(self.settings.seed)
        if self.reference_model is not None:
            self.reference_model.eval()
        last_log, metrics = None, {}
        total = getattr(self.train_batches, "n_examples", self.settings.n_examples)
        with tqdm.tqdm(total=total, initial=self.example_counter, unit="ex", desc="train", dynamic_ncols=True,
                       disable=not self.is_main_process) as progress:
            for batch in self.train_batches:
                if self.due(self.settings.eval_every) or (self.example_counter == 0 and self.settings.do_first_eval):
                    metrics = self.evaluate()
                if self.due(self.settings.eval_every) or self.due(self.settings.save_every):
                    self.save(os.path.join(self.run_dir, f"step-{self.example_counter}"), metrics)
                metrics = self.train_step(batch)
                progress.update(self.settings.batch_size)
                show = last_log is None or time.time() - last_log > self.settings.minimum_log_interval_secs
                self.sink.log(metrics, self.example_counter, "train", echo=show)
                if show:
                    last_log = time.time()
        return self.evaluate()

    def due(self, every: Optional[int]) -> bool:
        """True every `every` examples, except at the start and where a resumed run already did it."""
        return bool(every) and self.example_counter % every == 0 and self.example_counter > 0 \
            and self.example_counter != self.resumed_at

    def train_step(self, batch: dict) -> dict:
        """One optimizer step on `batch`, split into `gradient_accumulation_steps` micro-batches.

        A non-finite loss or gradient norm never reaches the weights: the run stops (or, with
        `nan_policy=skip`, the step is skipped) before the optimizer sees it.
        """
        self.policy.train()
        start = time.time()
        steps = self.settings.gradient_accumulation_steps
        parts = []
        for microbatch in micro_batches(batch, steps):
            loss, values = self.batch_metrics(microbatch, train=True)
            (loss / steps).backward()
            parts.append(values)
        grad_norm = self.clip_gradient()
        metrics = mean_metrics(self.gather_metrics(parts))
        if self.step_is_finite(metrics["loss/train"], grad_norm):
            self.optimizer.step()
            self.scheduler.step()
            self.batch_counter += 1
        self.optimizer.zero_grad(set_to_none=True)
        self.example_counter += self.settings.batch_size
        metrics.update({"examples_per_second": self.settings.batch_size / (time.time() - start),
                        "grad_norm": grad_norm, "lr": self.scheduler.get_last_lr()[0],
                        "counters/examples": self.example_counter, "counters/updates": self.batch_counter,
                        "counters/skipped_steps": self.skipped_steps})
        return metrics

    def step_is_finite(self, loss: float, grad_norm: float) -> bool:
        """True if the step may be applied; False if it is to be skipped (`nan_policy=skip`).

        Raises TrainingError to stop the run: under `nan_policy=stop`, or after
        `MAX_CONSECUTIVE_SKIPS` skipped steps in a row (the model no longer recovers). Every process
        sees the same global loss and norm, so all take the same branch.
        """
        if math.isfinite(loss) and math.isfinite(grad_norm):
            self.consecutive_skips = 0
            return True
        problem = f"loss/train is {loss}" if not math.isfinite(loss) else f"grad_norm is {grad_norm}"
        where = f"the step after {self.example_counter} examples"
        if self.settings.nan_policy == "skip" and self.consecutive_skips < MAX_CONSECUTIVE_SKIPS:
            self.skipped_steps += 1
            self.consecutive_skips += 1
            self.sink.print(f"warning: {where}: {problem}; skipping that step (nan_policy=skip)")
            return False
        if self.consecutive_skips:
            problem += f" for {MAX_CONSECUTIVE_SKIPS + 1} steps in a row"
        raise TrainingError(f"training stopped at {where}: {problem}; {self.divergence_advice()}; "
                            f"that step was not applied and {self.last_checkpoint_note()}")

    def divergence_advice(self) -> str:
        """The likely cause of non-finite values, and the fix."""
        if self.settings.policy_dtype == "float16":
            return ("float16 likely overflowed (model.policy_dtype=float16, which needs loss scaling): use bfloat16 "
                    f"or float32, or lower the learning rate (lr={self.settings.lr}), or set nan_policy=skip to skip "
                    "such steps")
        return f"the learning rate is likely too high (lr={self.settings.lr}): lower it, or set nan_policy=skip " \
               "to skip such steps"

    def last_checkpoint_note(self) -> str:
        checkpoint = newest_checkpoint(self.run_dir)
        return f"the last complete checkpoint is {checkpoint}" if checkpoint else "no checkpoint was written"

    def batch_metrics(self, batch: dict, train: bool) -> tuple[Tensor, dict[str, Tensor]]:
        """(mean loss of this process's rows, per-example metric values of those rows, still on the device)."""
        split = "train" if train else "eval"
        with self.autocast():
            policy_logps = self.policy_logps(batch)
            reference_logps = self.reference_logps(batch) if self.loss.needs_reference else None
        self.loss.train(train)  # a loss with running statistics (bco) updates them in training only
        losses, loss_metrics = self.loss(policy_logps, reference_logps, self.loss_fields(batch))
        values = {"loss": losses.detach(), **policy_logps.metrics(), **loss_metrics}
        values = {split_metric_name(name, split): value for name, value in values.items()}
        padding = batch.get("is_padding") or [False] * len(losses)
        values["is_padding"] = torch.tensor(padding, dtype=torch.float32, device=losses.device)
        return losses.mean(), values

    def loss_fields(self, batch: dict) -> dict[str, Tensor]:
        """The batch fields the loss declares it needs (`loss.batch_fields`), as tensors on the device."""
        missing = [field for field in self.loss.batch_fields if field not in batch]
        if missing:
            raise DataError(f"loss '{self.loss.name}' needs the batch field '{missing[0]}', which the datasets "
                            f"{list(self.settings.datasets)} do not provide; choose a dataset that has it, or "
                            "another loss")
        return {field: torch.as_tensor(batch[field], device=self.device) for field in self.loss.batch_fields}

    def gather_metrics(self, parts: list[dict[str, Tensor]]) -> dict[str, list[float]]:
        """Per-example values of every process's rows, in one collective and one copy to the host.

        Called once per optimizer step (and once per evaluation), so the device is never made to
        wait for the host inside a step, whatever the number of metrics and micro-batches.
        """
        values = {key: torch.cat([part[key] for part in parts]) for key in parts[0]}
        gathered = gather_values(values, self.processes)
        padding = gathered.pop("is_padding")  # rows that only fill up an uneven last eval batch count nowhere
        return {key: [v for v, pad in zip(column, padding) if not pad] for key, column in gathered.items()}

    def autocast(self):
        """Mixed precision on one device: `model.fsdp_policy_mp` computes in that dtype over float32 weights
        (the parallel trainers get the same from FSDP2's policy instead)."""
        dtype = self.settings.mixed_precision
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=getattr(torch, dtype))

    def policy_logps(self, batch: dict) -> SequenceLogps:
        """Log-probs of the batch's responses under the policy, with gradients when training."""
        return forward_logps(self.policy, batch, self.logps_options, token_logps=self.loss.needs_token_logps)

    def reference_logps(self, batch: dict) -> SequenceLogps:
        """Log-probs of the batch's responses under the frozen reference model, from the cache where it has them."""
        if self.reference_cache is not None:
            cached = self.reference_cache.lookup(batch, self.device)
            if cached is not None:
                return cached
            if self.reference_model is None:
                raise TrainingError("a batch's reference log-probs are not in the cache and the reference model was "
                                    "released after precompute_reference_logps; pass every batch the run will see "
                                    "to it, or set cache_reference_logps=false")
        with torch.no_grad(), self.reference_in_use() as reference_model:
            return forward_logps(reference_model, batch, self.logps_options, token_logps=self.loss.needs_token_logps)

    @property
    def has_reference(self) -> bool:
        """Whether there is a reference model to run: a model of its own, or the policy without its adapters."""
        return self.reference_model is not None or (is_lora_model(self.policy) and self.loss.needs_reference)

    def reference_in_use(self) -> contextlib.AbstractContextManager:
        """A context giving the reference model: a model of its own, or (LoRA) the policy with adapters disabled."""
        if self.reference_model is None and is_lora_model(self.policy):
            return adapters_disabled(self.policy)
        return contextlib.nullcontext(self.reference_model)

    def precompute_reference_logps(self, batches: Iterable[dict], path: Optional[str] = None) -> int:
        """Compute the reference log-probs of every pair in `batches` once, then free the reference model.

        `path` keeps them between runs: entries already there are not recomputed, and the new ones
        are written back. Each data-parallel process computes its own slices; all processes end
        with every entry, so any batch layout finds its pairs. Returns the number of distinct pairs
        computed (by all processes); `reference_cache.n_pairs` is the number of distinct pairs seen.
        """
        if self.loss.needs_token_logps:
            raise ConfigError(f"loss '{self.loss.name}' needs per-token reference log-probs, which "
                              "cache_reference_logps does not keep (only sums); set cache_reference_logps=false")
        self.reference_cache = ReferenceLogpsCache(path if self.is_main_process else None)
        self.reference_cache.update(broadcast_object(self.reference_cache.entries))
        computed, seen = {}, set()
        self.reference_model.eval()
        for batch in batches:
            keys = self.reference_cache.keys(batch)
            seen.update(keys)
            cached = all(key in self.reference_cache.entries for key in keys)
            if not all_ranks_agree(cached):  # sharded models run on all processes or none
                self.reference_cache.add(batch, self.reference_logps(batch))
                computed.update((key, self.reference_cache.entries[key]) for key in keys)
        computed_anywhere = set()
        for part, part_seen in gather_objects((computed, seen)):
            self.reference_cache.update(part)
            computed_anywhere.update(part)
            seen.update(part_seen)
        self.reference_cache.n_pairs = len(seen)
        if self.is_main_process and (computed_anywhere or not self.reference_cache.existed
                                     or self.reference_cache.unreadable):
            self.reference_cache.save()
        if not self.settings.sample_during_eval:
            self.release_reference_model()
        return len(computed_anywhere)

    def release_reference_model(self) -> None:
        """Free the reference model's memory once the cache holds all its log-probs (and samples)."""
        self.reference_model = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # ---- evaluation and samples ---------------------------------------------------------------

    def evaluate(self) -> dict:
        """Mean eval metrics over `eval_batches`, plus judged samples if `sample_during_eval`."""
        self.policy.eval()
        parts = []
        for batch in tqdm.tqdm(self.eval_batches, desc="eval", disable=not self.is_main_process, leave=False):
            with torch.no_grad():
                parts.append(self.batch_metrics(batch, train=False)[1])
        lists = defaultdict(list, self.gather_metrics(parts) if parts else {})
        loss = mean_metrics(lists).get("loss/eval", 0.0)
        if not math.isfinite(loss):  # sampling from such a model would fail with a torch error
            raise TrainingError(f"evaluation after {self.example_counter} examples gives loss/eval {loss}, so the "
                                f"weights are broken; {self.divergence_advice()}; {self.last_checkpoint_note()}")
        judged = {}
        if self.settings.sample_during_eval:
            lists.update(self.sample_and_judge())
            judged = {"counters/sampled_prompts": self.sampled_prompts}
        metrics = mean_metrics(lists)
        metrics.update({"counters/examples": self.example_counter, "counters/updates": self.batch_counter, **judged})
        if self.eval_batches:  # without eval pairs there is nothing to report, only the counters to return
            self.sink.log(metrics, self.example_counter, "eval")
        return metrics

    def sample_and_judge(self) -> dict[str, list[float]]:
        """Sample the first `n_eval_model_samples` distinct eval prompts from policy (and reference); judge
        where possible.

        A prompt with several pairs is sampled once, so each judged prompt counts once. Each
        data-parallel process samples its own slice of a batch; the rows are gathered in order.
        """
        rows, scores = [], defaultdict(list)
        remaining, seen = self.settings.n_eval_model_samples, set()
        for batch_index, batch in enumerate(self.eval_batches):
            if remaining <= 0:
                break
            local_rows, chosen = self._rows_to_sample(batch, remaining, seen)
            remaining -= chosen
            if not self.processes.distributed:  # alone, sample only what is needed
                if not local_rows:
                    continue
                batch = slice_batch(batch, 0, local_rows[-1] + 1)
            samples = {"policy": self.generate(self.policy, batch)}
            if self.has_reference and batch_index not in self.reference_samples:
                with self.reference_in_use() as reference_model:
                    self.reference_samples[batch_index] = self.generate(reference_model, batch)
            if batch_index in self.reference_samples:
                samples["reference"] = self.reference_samples[batch_index]
            local = [self._judged_row(batch, index, samples) for index in local_rows]
            if self.processes.tp_rank != 0:  # tensor-parallel peers sampled the same rows
                local = []
            rows += [row for part in gather_objects(local) for row in part]
        self.sampled_prompts = len(rows)
        for row in rows:
            for role in ("policy", "reference"):
                if f"judge_{role}" in row:
                    scores[f"judge_eval/{role}"].append(row[f"judge_{role}"])
        self.sink.log_samples(rows, self.example_counter)
        if self.reference_cache is not None and self.reference_model is not None:
            self.release_reference_model()  # its samples are kept: nothing needs it any more
        if rows:
            self.sink.print("policy samples:\n" + "\n".join(repr(row["prompt"] + row["policy"]) for row in rows[:4]))
        return scores

    def _rows_to_sample(self, batch: dict, remaining: int, seen: set) -> tuple[list[int], int]:
        """(this process's rows of `batch` to sample, how many rows all processes sample): the first rows of the
        global batch, in order, whose prompts are not in `seen`, at most `remaining`; the chosen prompts are
        added to `seen` (every process makes the same choice)."""
        padding = batch.get("is_padding") or [False] * batch_size_of(batch)
        prompts = [None if pad else prompt for prompt, pad in zip(batch["prompt"], padding)]
        by_dp_rank = dict(gather_objects((self.processes.dp_rank, prompts)))  # tensor-parallel peers agree
        mine, chosen = [], 0
        for dp_rank in sorted(by_dp_rank):
            for index, prompt in enumerate(by_dp_rank[dp_rank]):
                if chosen < remaining and prompt is not None and prompt not in seen:
                    seen.add(prompt)
                    chosen += 1
                    if dp_rank == self.processes.dp_rank:
                        mine.append(index)
        return mine, chosen

    def _judged_row(self, batch: dict, index: int, samples: Mapping[str, list[str]]) -> dict:
        prompt = batch["prompt"][index]
        row = {"prompt": prompt, **{role: texts[index] for role, texts in samples.items()}}
        judge = self.judges.get(batch["dataset"][index])
        if judge is not None:
            for role, texts in samples.items():
                row[f"judge_{role}"] = judge(prompt, texts[index])
        return row

    def generate(self, model: nn.Module, batch: dict) -> list[str]:
        """Sampled continuations (response text only) of the batch's left-padded prompts."""
        input_ids = batch["prompt_input_ids"].to(self.device)
        attention_mask = batch["prompt_attention_mask"].to(self.device)
        max_new_tokens = max(1, self.settings.max_length - input_ids.shape[1])
        was_training = model.training
        model.eval()
        # A private random stream: sampling leaves training's stream untouched, and every eval
        # samples with the same randomness, so evals (and policy vs reference) compare fairly.
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.no_grad(), torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.settings.seed)
            # synced: sharded models need every process in every forward until all have finished
            output = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                                    do_sample=True, pad_token_id=self.tokenizer.pad_token_id,
                                    synced_gpus=self.processes.distributed)
        model.train(was_training)
        # A causal LM returns prompt + continuation; an encoder-decoder model only the decoder's tokens, after its
        # start token.
        response_start = 1 if model.config.is_encoder_decoder else input_ids.shape[1]
        return self.tokenizer.batch_decode(output[:, response_start:], skip_special_tokens=True)

    # ---- checkpoints ----------------------------------------------------------------------------

    def save(self, output_dir: Optional[str] = None, metrics: Optional[Mapping[str, Any]] = None) -> None:
        """Write a checkpoint to `output_dir` (default `LATEST/`, which also gets Hugging Face format).

        Every process takes part (the policy and optimizer may be sharded); the main process writes
        the files into `<dir>.partial`, which becomes `<dir>` only when complete.
        """
        if self.settings.debug:
            self.sink.print("debug mode: not saving a checkpoint")
            return
        directory = output_dir or os.path.join(self.run_dir, "LATEST")
        policy_state = self.policy_state_dict()
        bad = next((name for name, value in policy_state.items()
                    if value.is_floating_point() and not torch.isfinite(value).all()), None)
        if not all_ranks_agree(bad is None):
            what = f"{bad} holds" if bad else "weights (on another process) hold"
            raise TrainingError(f"not writing {directory}: the policy's {what} non-finite values; "
                                f"{self.divergence_advice()}; {self.last_checkpoint_note()}")
        train_state = self.train_state()
        try:
            partial = start_checkpoint(directory) if self.is_main_process else partial_directory(directory)
            barrier()
            self.write_optimizer_state(partial)
            barrier()
            if self.is_main_process:
                self.sink.print(f"writing checkpoint to {directory}")
                lora = is_lora_model(self.policy)
                states = {"policy.pt": policy_state if lora else to_reference_names(policy_state, self.policy),
                          "scheduler.pt": self.scheduler.state_dict(), RESUME_STATE_FILE: train_state}
                hf_model, hf_state = self.policy, policy_state
                if lora:  # LATEST/ gets the merged model, which loads without peft
                    save_adapter(self.policy, os.path.join(partial, ADAPTER_FOLDER))
                    hf_model, hf_state = self.policy.get_base_model(), merged_state_dict(self.policy)
                problems = write_checkpoint_files(partial, self.example_counter, metrics or {}, states,
                                                  tokenizer=self.tokenizer, hf_state=hf_state,
                                                  hf_model=hf_model if output_dir is None else None)
                finish_checkpoint(partial, directory, problems)
        except BaseException as error:  # a full disk, Ctrl-C: give the space back; the previous checkpoint stays
            if self.is_main_process:
                shutil.rmtree(partial_directory(directory), ignore_errors=True)
            _raise_as_run_dir_error(error, directory)
            raise
        barrier()

    def train_state(self) -> dict:
        """Counters and every process's random state: with the weights, all a resumed run needs."""
        return {"example_counter": self.example_counter, "batch_counter": self.batch_counter,
                "skipped_steps": self.skipped_steps, "consecutive_skips": self.consecutive_skips,
                "trainer": type(self).__name__, "world_size": self.processes.world_size,
                "wandb_id": self.sink.wandb_id, "random_states": gather_objects(random_states()),
                "loss": self.loss.state_dict()}

    def load_checkpoint(self, directory: str) -> None:
        """Continue from the checkpoint in `directory` (its policy weights are already loaded).

        Restores the optimizer, scheduler, counters and this process's random states. The caller has
        checked that the same trainer and number of processes wrote it (`dpo.run`).
        """
        state = _read_state(os.path.join(directory, RESUME_STATE_FILE))
        self.read_optimizer_state(directory)
        self.scheduler.load_state_dict(_read_state(os.path.join(directory, "scheduler.pt")))
        for key in ("example_counter", "batch_counter", "skipped_steps", "consecutive_skips"):
            setattr(self, key, state[key])
        set_random_states(state["random_states"][self.processes.rank])
        if "loss" in state:  # running statistics of the loss (bco's reward shift); older checkpoints have none
            self.loss.load_state_dict(state["loss"])
        self.resumed_at = self.example_counter

    # ---- what parallel trainers override ---------------------------------------------------------

    def place_models(self) -> None:
        """Move (or, in parallel trainers, shard) the models for training."""
        self.policy.to(self.device)
        if self.reference_model is not None:
            self.reference_model.to(self.device)
        if self.settings.activation_checkpointing:
            enable_activation_checkpointing(self.policy)
        if self.settings.compile:
            compile_blocks([self.policy, self.reference_model], self.settings.block_name)

    def clip_gradient(self) -> float:
        """Clip to `max_grad_norm` (null: no clipping); return the norm before clipping."""
        max_norm = self.settings.max_grad_norm if self.settings.max_grad_norm is not None else math.inf
        return torch.nn.utils.clip_grad_norm_(self.policy.parameters(), max_norm).item()

    def policy_state_dict(self) -> dict:
        """The policy's full state dict (on the main process; parallel trainers gather it there).

        Under LoRA only the adapters train, so only they are saved.
        """
        return adapter_state_dict(self.policy) if is_lora_model(self.policy) else self.policy.state_dict()

    def write_optimizer_state(self, partial: str) -> None:
        if self.is_main_process:
            save_synced({"step_idx": self.example_counter, "state": self.optimizer.state_dict(), "metrics": {}},
                        os.path.join(partial, "optimizer.pt"))

    def read_optimizer_state(self, directory: str) -> None:
        self.optimizer.load_state_dict(_read_state(os.path.join(directory, "optimizer.pt")))


def _raise_as_run_dir_error(error: BaseException, directory: str) -> None:
    """A failed write (a full disk) as one sentence; torch.save reports it as a RuntimeError from the OSError."""
    os_error = error if isinstance(error, OSError) else error.__context__
    if isinstance(error, (OSError, RuntimeError)) and isinstance(os_error, OSError):
        raise RunDirError(f"cannot write checkpoint {directory}: {describe_os_error(os_error)}") from None


def _read_state(path: str) -> Any:
    if not os.path.isfile(path):
        raise CheckpointError(f"{path} is missing, so the checkpoint cannot be resumed from; resume from an "
                              "earlier checkpoint by deleting this one, or start a new run")
    return torch.load(path, map_location="cpu", weights_only=True)["state"]


def enable_activation_checkpointing(model: nn.Module) -> None:
    # Non-reentrant checkpointing works with sharded (FSDP2) and frozen parameters alike.
    options = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers 5 renamed gradient_checkpointing_enable
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=options)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=options)


def fused_if_available(optimizer_class: type, parameters: list[Tensor], device: torch.device) -> dict:
    """`fused=True` where the optimizer has a fused CUDA kernel (Adam, AdamW, SGD, ...) and the parameters are
    plain tensors on the GPU (not sharded DTensors): one kernel updates them all, not several per parameter."""
    plain = all(not isinstance(param, DTensor) for param in parameters)
    if device.type == "cuda" and plain and "fused" in inspect.signature(optimizer_class).parameters:
        return {"fused": True}
    return {}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def random_states() -> dict:
    """This process's random generators (python, numpy, torch CPU and CUDA) as plain lists and numbers,
    which every collective and `torch.load(weights_only=True)` carry unchanged."""
    kind, keys, position, has_gauss, cached = np.random.get_state()
    states = {"python": random.getstate(), "numpy": [kind, keys.tolist(), position, has_gauss, cached],
              "torch": torch.get_rng_state().tolist()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state().tolist()
    return states


def set_random_states(states: dict) -> None:
    random.setstate(_as_tuples(states["python"]))
    kind, keys, position, has_gauss, cached = states["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), position, has_gauss, cached))
    torch.set_rng_state(torch.tensor(states["torch"], dtype=torch.uint8))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.tensor(states["cuda"], dtype=torch.uint8))


def _as_tuples(value: Any) -> Any:
    """Python's random state is nested tuples, which a round trip through torch.save may turn into lists."""
    return tuple(_as_tuples(item) for item in value) if isinstance(value, (list, tuple)) else value


TRAINER_NAMES = ("BasicTrainer", "FSDPTrainer", "TensorParallelTrainer")


def trainer_class(name: str) -> type[BasicTrainer]:
    """The trainer class called `name` (one of TRAINER_NAMES)."""
    if name == "BasicTrainer":
        return BasicTrainer
    from dpo import parallel  # the parallel trainers import torch.distributed's FSDP and tensor-parallel parts

    return getattr(parallel, name)
