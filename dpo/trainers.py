"""Trainers: the training loop, evaluation, sampling and checkpointing.

`BasicTrainer` runs on one device. It knows nothing about any particular loss: it computes log-probs
through `dpo.logps.forward_logps` (for the reference model only when `loss.needs_reference`) and
hands them to the loss module. Trainers for parallel setups subclass it and override only what
parallelism changes: `clip_gradient`, `gather`, the state dicts and the process rank.
"""

from __future__ import annotations

import math
import os
import random
import time
from collections import defaultdict
from typing import Any, Callable, Iterable, Mapping, Optional

import numpy as np
import torch
import tqdm
from omegaconf import DictConfig
from torch import Tensor, nn

from dpo.checkpoints import to_reference_names, write_checkpoint
from dpo.errors import RunDirError, TrainingError
from dpo.logps import forward_logps
from dpo.losses import PreferenceLoss
from dpo.metrics import MetricsSink, mean_metrics
from dpo.rundir import describe_os_error, newest_checkpoint

# With nan_policy=skip, this many non-finite steps in a row mean the model will not recover: stop.
MAX_CONSECUTIVE_SKIPS = 10

Judge = Callable[[str, str], float]


def slice_batch(batch: Mapping[str, Any], start: int, end: int) -> dict:
    """Rows [start, end) of every field (tensors and lists alike)."""
    return {key: value[start:end] for key, value in batch.items()}


def batch_size_of(batch: Mapping[str, Any]) -> int:
    return len(batch["prompt"])


def warmup_schedule(warmup_steps: int) -> Callable[[int], float]:
    """Linear warmup from 1/(warmup_steps+1) of the learning rate to all of it, then constant."""
    return lambda step: min(1.0, (step + 1) / (warmup_steps + 1))


class BasicTrainer:
    """The reference implementation's training loop on a single device (a GPU when one is visible).

    Every `eval_every` examples (and first, if `do_first_eval`, and once at the end) it evaluates on
    `eval_batches`, optionally samples and judges, and saves a checkpoint to `step-N/`.
    `save()` writes `LATEST/`.
    """

    def __init__(self, config: DictConfig, policy: nn.Module, tokenizer, loss: PreferenceLoss,
                 train_batches: Iterable[dict], eval_batches: list[dict], run_dir: str,
                 reference_model: Optional[nn.Module] = None, judges: Optional[Mapping[str, Judge]] = None,
                 sink: Optional[MetricsSink] = None, rank: int = 0, world_size: int = 1):
        self.config = config
        self.policy = policy
        self.reference_model = reference_model
        self.tokenizer = tokenizer
        self.loss = loss
        self.train_batches = train_batches
        self.eval_batches = eval_batches
        self.run_dir = run_dir
        self.judges = dict(judges or {})
        self.rank, self.world_size = rank, world_size
        self.sink = sink or MetricsSink(run_dir, enabled=self.is_main_process)
        self.example_counter = 0
        self.batch_counter = 0
        self.skipped_steps = 0
        self.consecutive_skips = 0
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.place_models()
        self.optimizer = getattr(torch.optim, config.optimizer)(self.policy.parameters(), lr=config.lr)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, warmup_schedule(config.warmup_steps))

    @property
    def is_main_process(self) -> bool:
        return self.rank == 0

    # ---- the loop ---------------------------------------------------------------------------

    def train(self) -> dict:
        """Train on all of `train_batches`; return the final evaluation's metrics."""
        seed_everything(self.config.seed)
        if self.reference_model is not None:
            self.reference_model.eval()
        last_log = None
        total = getattr(self.train_batches, "n_examples", self.config.n_examples)
        with tqdm.tqdm(total=total, unit="ex", desc="train", disable=not self.is_main_process,
                       dynamic_ncols=True) as progress:
            for batch in self.train_batches:
                if self.example_counter % self.config.eval_every == 0 and (
                        self.example_counter > 0 or self.config.do_first_eval):
                    metrics = self.evaluate()
                    if self.example_counter > 0:
                        self.save(os.path.join(self.run_dir, f"step-{self.example_counter}"), metrics)
                metrics = self.train_step(batch)
                progress.update(batch_size_of(batch))
                show = last_log is None or time.time() - last_log > self.config.minimum_log_interval_secs
                self.sink.log(metrics, self.example_counter, "train", echo=show)
                if show:
                    last_log = time.time()
        return self.evaluate()

    def train_step(self, batch: dict) -> dict:
        """One optimizer step on `batch`, split into `gradient_accumulation_steps` micro-batches.

        A non-finite loss or gradient norm never reaches the weights: the run stops (or, with
        `nan_policy=skip`, the step is skipped) before the optimizer sees it.
        """
        self.policy.train()
        start = time.time()
        steps = self.config.gradient_accumulation_steps
        size = batch_size_of(batch)
        per_step = size // steps
        lists = defaultdict(list)
        for index in range(steps):
            microbatch = slice_batch(batch, index * per_step, (index + 1) * per_step)
            loss, metrics = self.batch_metrics(microbatch, train=True)
            (loss / steps).backward()
            for key, values in metrics.items():
                lists[key].extend(values)
        grad_norm = self.clip_gradient()
        metrics = mean_metrics(lists)
        if self.step_is_finite(metrics["loss/train"], grad_norm):
            self.optimizer.step()
            self.scheduler.step()
            self.batch_counter += 1
        self.optimizer.zero_grad(set_to_none=True)
        self.example_counter += size
        metrics.update({"examples_per_second": size / (time.time() - start), "grad_norm": grad_norm,
                        "lr": self.scheduler.get_last_lr()[0], "counters/examples": self.example_counter,
                        "counters/updates": self.batch_counter, "counters/skipped_steps": self.skipped_steps})
        return metrics

    def step_is_finite(self, loss: float, grad_norm: float) -> bool:
        """True if the step may be applied; False if it is to be skipped (`nan_policy=skip`).

        Raises TrainingError to stop the run: under `nan_policy=stop`, or after
        `MAX_CONSECUTIVE_SKIPS` skipped steps in a row (the model no longer recovers).
        """
        if math.isfinite(loss) and math.isfinite(grad_norm):
            self.consecutive_skips = 0
            return True
        problem = f"loss/train is {loss}" if not math.isfinite(loss) else f"grad_norm is {grad_norm}"
        where = f"the step after {self.example_counter} examples"
        if self.config.nan_policy == "skip" and self.consecutive_skips < MAX_CONSECUTIVE_SKIPS:
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
        if self.config.model.policy_dtype == "float16":
            return ("float16 likely overflowed (model.policy_dtype=float16, which needs loss scaling): use bfloat16 "
                    f"or float32, or lower the learning rate (lr={self.config.lr}), or set nan_policy=skip to skip "
                    "such steps")
        return f"the learning rate is likely too high (lr={self.config.lr}): lower it, or set nan_policy=skip " \
               "to skip such steps"

    def last_checkpoint_note(self) -> str:
        checkpoint = newest_checkpoint(self.run_dir)
        return f"the last complete checkpoint is {checkpoint}" if checkpoint else "no checkpoint was written"

    def batch_metrics(self, batch: dict, train: bool) -> tuple[Tensor, dict[str, list[float]]]:
        """(mean loss, per-example metric values) of `batch` under the configured loss."""
        split = "train" if train else "eval"
        policy_logps = forward_logps(self.policy, batch)
        reference_logps = None
        if self.loss.needs_reference:
            with torch.no_grad():
                reference_logps = forward_logps(self.reference_model, batch)
        losses, chosen_rewards, rejected_rewards = self.loss(policy_logps, reference_logps)
        values = {f"loss/{split}": losses.detach(), f"logps_{split}/chosen": policy_logps.chosen.detach()}
        if policy_logps.rejected is not None:
            values[f"logps_{split}/rejected"] = policy_logps.rejected.detach()
        if chosen_rewards is not None:
            values[f"rewards_{split}/chosen"] = chosen_rewards
            values[f"rewards_{split}/rejected"] = rejected_rewards
            values[f"rewards_{split}/accuracies"] = (chosen_rewards > rejected_rewards).float()
            values[f"rewards_{split}/margins"] = chosen_rewards - rejected_rewards
        return losses.mean(), {key: self.gather(value) for key, value in values.items()}

    # ---- evaluation and samples ---------------------------------------------------------------

    def evaluate(self) -> dict:
        """Mean eval metrics over `eval_batches`, plus judged samples if `sample_during_eval`."""
        self.policy.eval()
        lists = defaultdict(list)
        for batch in tqdm.tqdm(self.eval_batches, desc="eval", disable=not self.is_main_process, leave=False):
            with torch.no_grad():
                _, metrics = self.batch_metrics(batch, train=False)
            for key, values in metrics.items():
                lists[key].extend(values)
        loss = mean_metrics(lists).get("loss/eval", 0.0)
        if not math.isfinite(loss):  # sampling from such a model would fail with a torch error
            raise TrainingError(f"evaluation after {self.example_counter} examples gives loss/eval {loss}, so the "
                                f"weights are broken; {self.divergence_advice()}; {self.last_checkpoint_note()}")
        if self.config.sample_during_eval:
            lists.update(self.sample_and_judge())
        metrics = mean_metrics(lists)
        metrics.update({"counters/examples": self.example_counter, "counters/updates": self.batch_counter})
        self.sink.log(metrics, self.example_counter, "eval")
        return metrics

    def sample_and_judge(self) -> dict[str, list[float]]:
        """Sample `n_eval_model_samples` eval prompts from policy (and reference); judge where possible."""
        rows, scores = [], defaultdict(list)
        remaining = self.config.n_eval_model_samples
        for batch in self.eval_batches:
            if remaining <= 0:
                break
            batch = slice_batch(batch, 0, min(remaining, batch_size_of(batch)))
            remaining -= batch_size_of(batch)
            models = {"policy": self.policy}
            if self.reference_model is not None:
                models["reference"] = self.reference_model
            samples = {role: self.generate(model, batch) for role, model in models.items()}
            for index, prompt in enumerate(batch["prompt"]):
                row = {"prompt": prompt, **{role: texts[index] for role, texts in samples.items()}}
                judge = self.judges.get(batch["dataset"][index])
                if judge is not None:
                    for role, texts in samples.items():
                        row[f"judge_{role}"] = judge(prompt, texts[index])
                        scores[f"judge_eval/{role}"].append(row[f"judge_{role}"])
                rows.append(row)
        self.sink.log_samples(rows, self.example_counter)
        if rows:
            self.sink.print("policy samples:\n" + "\n".join(repr(row["prompt"] + row["policy"]) for row in rows[:4]))
        return scores

    def generate(self, model: nn.Module, batch: dict) -> list[str]:
        """Sampled continuations (response text only) of the batch's left-padded prompts."""
        input_ids = batch["prompt_input_ids"].to(self.device)
        attention_mask = batch["prompt_attention_mask"].to(self.device)
        max_new_tokens = max(1, self.config.max_length - input_ids.shape[1])
        was_training = model.training
        model.eval()
        # A private random stream: sampling leaves training's stream untouched, and every eval
        # samples with the same randomness, so evals (and policy vs reference) compare fairly.
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.no_grad(), torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.config.seed)
            output = model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                                    do_sample=True, pad_token_id=self.tokenizer.pad_token_id)
        model.train(was_training)
        return self.tokenizer.batch_decode(output[:, input_ids.shape[1]:], skip_special_tokens=True)

    # ---- checkpoints ----------------------------------------------------------------------------

    def save(self, output_dir: Optional[str] = None, metrics: Optional[Mapping[str, Any]] = None) -> None:
        """Write a checkpoint to `output_dir` (default `LATEST/`, which also gets Hugging Face format)."""
        if self.config.debug:
            self.sink.print("debug mode: not saving a checkpoint")
            return
        directory = output_dir or os.path.join(self.run_dir, "LATEST")
        policy_state = self.policy_state_dict()
        bad = next((name for name, value in policy_state.items()
                    if value.is_floating_point() and not torch.isfinite(value).all()), None)
        if bad is not None:
            raise TrainingError(f"not writing {directory}: the policy's {bad} holds non-finite values; "
                                f"{self.divergence_advice()}; {self.last_checkpoint_note()}")
        states = {"policy.pt": to_reference_names(policy_state, self.policy),
                  "optimizer.pt": self.optimizer_state_dict(), "scheduler.pt": self.scheduler.state_dict()}
        if self.is_main_process:
            self.sink.print(f"writing checkpoint to {directory}")
            try:
                write_checkpoint(directory, self.example_counter, metrics or {}, states, tokenizer=self.tokenizer,
                                 hf_model=self.policy if output_dir is None else None, hf_state=policy_state)
            except (OSError, RuntimeError) as error:
                # torch.save reports a failed write (a full disk) as a RuntimeError raised while handling the OSError.
                os_error = error if isinstance(error, OSError) else error.__context__
                if not isinstance(os_error, OSError):
                    raise
                raise RunDirError(f"cannot write checkpoint {directory}: {describe_os_error(os_error)}") from None

    # ---- what parallel trainers override ---------------------------------------------------------

    def place_models(self) -> None:
        """Move (or, in parallel trainers, wrap) the models for training."""
        self.policy.to(self.device)
        if self.reference_model is not None:
            self.reference_model.to(self.device)
        if self.config.activation_checkpointing:
            # transformers 5 renamed gradient_checkpointing_enable; keep working with 4.x.
            enable = getattr(self.policy, "activation_checkpointing_enable", None) or \
                self.policy.gradient_checkpointing_enable
            enable()

    def clip_gradient(self) -> float:
        """Clip to `max_grad_norm` (null: no clipping); return the norm before clipping."""
        max_norm = self.config.max_grad_norm if self.config.max_grad_norm is not None else math.inf
        return torch.nn.utils.clip_grad_norm_(self.policy.parameters(), max_norm).item()

    def gather(self, values: Tensor) -> list[float]:
        """Per-example values from every process, as floats (one process here)."""
        return values.float().cpu().tolist()

    def policy_state_dict(self) -> dict:
        return self.policy.state_dict()

    def optimizer_state_dict(self) -> dict:
        return self.optimizer.state_dict()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


TRAINERS: dict[str, type[BasicTrainer]] = {"BasicTrainer": BasicTrainer}
