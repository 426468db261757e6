"""One DPO training step, side by side: this library, the original reference code's step, and TRL.

    python benchmarks/dpo_step.py --device cpu --out /tmp/bench_cpu
    python benchmarks/dpo_step.py --device cuda --out /tmp/bench_gpu
    python benchmarks/dpo_step.py --device cpu --out /tmp/q --quick        # 1 warm-up + 1 timed step, tiny model

Every implementation trains the same random-init GPT-NeoX (Pythia shapes) on the same sequence of
batches of 8 HH-RLHF pairs (from ../shared, or drawn from `hh_lengths.json` when that is absent):

- `dpo`: this library's `BasicTrainer.train_step`, config composed with Hydra, one row per mode
  (plain padded logits, chunked LM head, packing, prefix sharing, cached reference log-probs, compile);
- `reference`: the step of the original DPO code (Rafailov et al. 2023), re-implemented below;
- `trl`: TRL's `DPOTrainer` (`pip install -e ".[bench]"`).

Each (implementation, mode, model) runs in a fresh subprocess, so its peak memory is its own (its
output goes to OUT/logs/). The results go to OUT/results.json and OUT/results.md, which says what
each column means and every setting that differs from an implementation's defaults.

On 2 CPU cores the default CPU run takes about 5 minutes. On an H100 the two GPU sizes take most of
a 10-minute budget, mainly in starting each row (building a random-init model on the CPU); to split
it, run `--sizes pythia-410m` and `--sizes pythia-1.4b` separately, or use `--no-isolate`.
`import dpo_step; dpo_step.main([...])` runs it from Python and returns the rows.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import gzip
import importlib.metadata
import importlib.util
import json
import os
import platform
import random
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from pathlib import Path
from typing import Callable, Iterable, Optional

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SHARED = REPO.parent / "shared"
NEOX_TOKENIZER = SHARED / "tokenizers" / "gpt-neox-20b"
HH_DIR = SHARED / "data" / "hh-rlhf"
LENGTHS_FILE = Path(__file__).with_name("hh_lengths.json")

SEED = 0
PAIRS_PER_STEP = 8
BETA = 0.1
LR = 1e-6
REFERENCE_MAX_GRAD_NORM = 10.0

# Pythia shapes (GPT-NeoX). The library sizes the vocabulary to the tokenizer (50,277 for GPT-NeoX-20B;
# Pythia pads it to 50,304), so `vocab_size` is not set here.
MODELS = {
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256),
    # On CPU the 50k-vocabulary LM head dominates a step: hidden 128 keeps the whole CPU run under 10 minutes.
    "cpu-small": dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=512),
    "pythia-410m": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096),
    "pythia-1.4b": dict(hidden_size=2048, num_hidden_layers=24, num_attention_heads=16, intermediate_size=8192),
}
DEFAULT_SIZES = {"cpu": ["cpu-small"], "cuda": ["pythia-410m", "pythia-1.4b"]}
DEFAULT_STEPS = {"cpu": (1, 2), "cuda": (2, 5)}  # (warm-up, timed) per row

# This library's modes: config overrides on top of the common ones (`compose_config`).
DPO_MODES = {
    "plain": ["lm_head_chunk_size=null"],
    "chunked": [],
    "packed": ["packing=true"],
    "prefix_shared": ["packing=true", "prefix_sharing=true"],
    "prefix_shared+cached_reference": ["packing=true", "prefix_sharing=true", "cache_reference_logps=true"],
}
COMPILE_MODE = "+compile"  # the fastest mode above, plus compile=true; its row is named "<mode>+compile"
COMPILE_EXTRA_WARMUP = 2  # compilation and the first recompilation for new shapes happen in warm-up
TRL_MODES = {
    "default": {},
    "precompute_ref_log_probs": {"precompute_ref_log_probs": True},
    # TRL checkpoints activations by default; this mode shows what that costs (the others do not checkpoint).
    "no_gradient_checkpointing": {"gradient_checkpointing": False},
}
IMPLEMENTATIONS = ("dpo", "reference", "trl")
MATMUL_SIZES = {"cuda": (8192, 50), "cpu": (2048, 5)}  # (square matrix size, repeats) for the matmul peak
TRL_MISSING = "pip install -e .[bench]"

# The fields every row has (None where it did not run).
ROW_FIELDS = ("implementation", "mode", "model", "device", "skipped", "pairs_per_s", "real_tokens_per_s",
              "useful_tokens_per_s", "padded_tokens_per_step", "real_tokens_per_step", "useful_tokens_per_step",
              "step_seconds_median", "step_seconds", "peak_memory_bytes", "peak_memory_kind", "final_loss", "mfu",
              "non_embedding_params", "precompute_seconds", "dtypes", "warmup_steps", "timed_steps", "settings")
# The config keys that make a library mode what it is, recorded in its row as composed.
MODE_SETTINGS = ("lm_head_chunk_size", "packing", "prefix_sharing", "cache_reference_logps", "compile")


# ---- pairs --------------------------------------------------------------------------------------

def hh_pairs() -> list[tuple[str, str, str]]:
    """Every usable (prompt, chosen, rejected) of the HH-RLHF files in ../shared, split as the library's `hh` does."""
    from dpo.data import clean_pairs
    from dpo.data.hh import hh_rows_to_data

    rows = []
    for path in sorted(HH_DIR.glob("*.jsonl.gz")):
        with gzip.open(path, "rt", encoding="utf-8") as file:
            rows += [(f"{path.name} line {number}", json.loads(line)) for number, line in enumerate(file, 1)]
    data = clean_pairs(hh_rows_to_data(rows, Counter()), Counter())
    return [(prompt, example["responses"][c], example["responses"][r])
            for prompt, example in data.items() for c, r in example["pairs"]]


def write_length_histogram(path: Path = LENGTHS_FILE, bin_width: int = 8, cap: int = 1024) -> None:
    """Write the joint histogram of (prompt, chosen, rejected) token lengths of the HH-RLHF pairs in ../shared.

    Lengths are GPT-NeoX-20B tokens of the untruncated texts (responses without EOS), capped at
    `cap` (above max_length, so truncation acts as on the real lengths) and binned by `bin_width`.
    It is the fallback that `sampled_pairs` draws from when ../shared is absent.
    Regenerate with `python benchmarks/dpo_step.py --write-lengths`.
    """
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(NEOX_TOKENIZER))
    pairs = hh_pairs()
    lengths = [[len(ids) for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]] for texts in pairs]
    cells = Counter(tuple(min(n, cap) // bin_width for n in triple) for triple in lengths)
    histogram = {"source": sorted(p.name for p in HH_DIR.glob("*.jsonl.gz")), "tokenizer": "gpt-neox-20b",
                 "pairs": len(pairs), "bin_width": bin_width, "cap": cap,
                 "cells": "[prompt_bin, chosen_bin, rejected_bin, count]; bin b holds lengths b*bin_width to "
                          "(b+1)*bin_width-1",
                 "counts": sorted([*cell, count] for cell, count in cells.items())}
    path.write_text(json.dumps(histogram, separators=(",", ":")) + "\n")
    print(f"wrote {path}: {len(cells)} cells from {len(pairs)} pairs")


def sampled_pairs(n: int, tokenizer, rng: random.Random) -> list[tuple[str, str, str]]:
    """`n` pairs of random-token texts whose token lengths are drawn from `hh_lengths.json`."""
    histogram = json.loads(LENGTHS_FILE.read_text())
    cells = [tuple(cell[:3]) for cell in histogram["counts"]]
    weights = [cell[3] for cell in histogram["counts"]]
    words = single_token_words(tokenizer)
    frame_tokens = len(tokenizer("\n\nHuman:\n\nAssistant:", add_special_tokens=False)["input_ids"])

    def text(n_tokens: int) -> str:
        return "".join(rng.choice(words) for _ in range(max(1, n_tokens)))

    pairs = []
    for cell in rng.choices(cells, weights=weights, k=n):
        prompt, chosen, rejected = (b * histogram["bin_width"] + rng.randrange(histogram["bin_width"]) for b in cell)
        pairs.append((f"\n\nHuman:{text(prompt - frame_tokens)}\n\nAssistant:", text(chosen), text(rejected)))
    return pairs


def single_token_words(tokenizer) -> list[str]:
    """Texts that are one token each and stay one token each when concatenated (" the", " cat"; or letters)."""
    vocab = [tokenizer.decode([index]) for index in range(len(tokenizer))]
    words = [word for word in vocab if re.fullmatch(r" [a-z]{2,}", word)]
    if len(words) < 100:  # a character tokenizer
        words = [word for word in vocab if re.fullmatch(r"[a-z]", word)]
    return [word for word in words if len(tokenizer(word + word, add_special_tokens=False)["input_ids"]) == 2]


def benchmark_pairs(n: int, tokenizer_name: str) -> tuple[list[tuple[str, str, str]], str]:
    """`n` pairs, the same in every run: shuffled HH-RLHF pairs, or sampled ones when ../shared is absent."""
    rng = random.Random(SEED)
    if HH_DIR.is_dir():
        pairs = hh_pairs()
        rng.shuffle(pairs)
        return pairs[:n], f"HH-RLHF pairs from {', '.join(sorted(p.name for p in HH_DIR.glob('*.jsonl.gz')))}"
    from dpo.models import load_tokenizer

    tokenizer = load_tokenizer({"tokenizer_name_or_path": tokenizer_name})
    return sampled_pairs(n, tokenizer, rng), f"random-token texts with HH-RLHF token lengths from {LENGTHS_FILE.name}"


def tokenizer_path(quick: bool) -> str:
    """The GPT-NeoX tokenizer in ../shared; the library's built-in character tokenizer (vocabulary 100) for
    --quick, which checks the machinery rather than the speed, or when ../shared is absent."""
    return str(NEOX_TOKENIZER) if NEOX_TOKENIZER.is_dir() and not quick else "char"


# ---- batches and their token counts -------------------------------------------------------------

def tokenized_elements(pairs, tokenizer, job: dict) -> list[dict]:
    from dpo.batching import tokenize_batch_element

    return [tokenize_batch_element(prompt, chosen, rejected, "keep_end", tokenizer, max_length=job["max_length"],
                                   max_prompt_length=job["max_prompt_length"]) for prompt, chosen, rejected in pairs]


def batches_of(elements: list[dict], tokenizer) -> list[dict]:
    from dpo.batching import get_collate_fn

    collate = get_collate_fn(tokenizer)
    return [collate(elements[i:i + PAIRS_PER_STEP]) for i in range(0, len(elements), PAIRS_PER_STEP)]


def workload(batch: dict) -> dict:
    """Token counts of one batch: real (non-pad chosen + rejected), useful (prompt once + both responses),
    padded (the [2 x pairs, longest sequence] rectangle that a padded implementation computes)."""
    real = int(batch["chosen_attention_mask"].sum() + batch["rejected_attention_mask"].sum())
    responses = int((batch["chosen_labels"] != -100).sum() + (batch["rejected_labels"] != -100).sum())
    width = max(batch["chosen_input_ids"].shape[1], batch["rejected_input_ids"].shape[1])
    return {"real": real, "useful": int(batch["prompt_attention_mask"].sum()) + responses,
            "padded": 2 * len(batch["prompt"]) * width}


def mean_workload(batches: list[dict]) -> dict:
    counts = [workload(batch) for batch in batches]
    return {key: sum(count[key] for count in counts) / len(counts) for key in counts[0]}


# ---- clocks and memory --------------------------------------------------------------------------

def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_memory(device: torch.device) -> bool:
    """Start a new peak: CUDA's allocator statistics, or on CPU the kernel's peak RSS (Linux's clear_refs).

    False where the peak cannot be reset, and so covers the whole process.
    """
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return True
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_memory(device: torch.device, was_reset: bool) -> tuple[int, str]:
    """(peak bytes, what they measure) since `reset_peak_memory`."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "torch.cuda.max_memory_allocated during the steps"
    what = "peak RSS during the steps" if was_reset else "peak RSS of the whole process"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, what


def time_steps(step: Callable[[dict], float], job: dict, batches: list[dict], device: torch.device,
               extra_warmup: int = 0) -> dict:
    """Run `step` on the warm-up batches (again `extra_warmup` times), then time it on the rest."""
    warmup, timed = batches[:job["warmup"]], batches[job["warmup"]:]
    was_reset = reset_peak_memory(device)
    for batch in warmup * (1 + extra_warmup):
        step(batch)
    seconds, loss = [], None
    for batch in timed:
        synchronize(device)
        start = time.perf_counter()
        loss = step(batch)
        synchronize(device)
        seconds.append(time.perf_counter() - start)
    memory, kind = peak_memory(device, was_reset)
    return {"step_seconds": seconds, "final_loss": loss, "peak_memory_bytes": memory, "peak_memory_kind": kind}


# ---- the models, as every implementation gets them ------------------------------------------------

class FeatureMissing(Exception):
    """A mode needs something this checkout of the library does not have yet: its row is skipped."""


def compose_config(job: dict, overrides: Iterable[str] = ()):
    """The library's config for this job, composed with Hydra as train.py composes it."""
    from hydra.errors import ConfigCompositionException

    from dpo.config import compose_config as compose_library_config

    shape = {"model_type": "gpt_neox", **MODELS[job["model"]], "rotary_pct": 0.25, "max_position_embeddings": 2048}
    # model=blank_model: the top-level defaults of config.yaml, not those the default `tiny` model sets for
    # its own toy runs (its plain LM head once made the "chunked" row silently plain).
    common = ["model=blank_model", "loss=dpo", f"loss.beta={BETA}", f"batch_size={PAIRS_PER_STEP}", f"max_length={job['max_length']}",
              f"max_prompt_length={job['max_prompt_length']}", "optimizer=RMSprop", f"lr={LR}", "warmup_steps=0",
              "wandb.enabled=false", "datasets=[hh]", "sample_during_eval=false",
              f"model.policy_dtype={job['dtypes'][0]}", f"model.reference_dtype={job['dtypes'][1]}",
              f"model.tokenizer_name_or_path='{job['tokenizer']}'",
              "model.from_config={" + ",".join(f"{key}:{value}" for key, value in shape.items()) + "}"]
    try:
        return compose_library_config([*common, *overrides])
    except ConfigCompositionException as error:
        raise FeatureMissing(f"the library's config does not accept {list(overrides)}: {first_line(error)}") from None


def load_everything(job: dict, overrides: Iterable[str] = ()):
    """(config, tokenizer, batches, policy, reference model): the same weights and batches in every job."""
    from dpo.models import load_models, load_tokenizer

    config = compose_config(job, overrides)
    tokenizer = load_tokenizer(config.model)
    batches = batches_of(tokenized_elements(job["pairs"], tokenizer, job), tokenizer)
    policy, reference_model = load_models(config, tokenizer, needs_reference=True, cache_dir=None, verbose=False)
    return config, tokenizer, batches, policy, reference_model


def non_embedding_params(model: torch.nn.Module) -> int:
    embeddings = {id(model.get_input_embeddings().weight), id(model.get_output_embeddings().weight)}
    return sum(p.numel() for p in model.parameters() if id(p) not in embeddings)


def job_device(job: dict) -> torch.device:
    return torch.device("cuda" if job["device"] == "cuda" else "cpu")


# ---- implementation "dpo": this library's trainer -------------------------------------------------

def run_dpo(job: dict) -> dict:
    from omegaconf import OmegaConf

    from dpo.distributed import Processes
    from dpo.losses import build_loss
    from dpo.metrics import MetricsSink
    from dpo.trainers import BasicTrainer

    config, tokenizer, batches, policy, reference_model = load_everything(job, job["overrides"])
    n_params = non_embedding_params(policy)
    loss = build_loss(OmegaConf.to_container(config.loss))
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = BasicTrainer(config, policy, tokenizer, loss, train_batches=[], eval_batches=[], run_dir=run_dir,
                               reference_model=reference_model, sink=MetricsSink(run_dir, enabled=False),
                               processes=Processes(device=job_device(job)))  # the default, but CPU even with a GPU
        del policy, reference_model  # the trainer may free the reference model; these names would keep it
        precompute_seconds = precompute_reference(trainer, batches) if config.get("cache_reference_logps") else None
        extra_warmup = COMPILE_EXTRA_WARMUP if config.get("compile") else 0
        measured = time_steps(lambda batch: trainer.train_step(batch)["loss/train"], job, batches, trainer.device,
                              extra_warmup)
    return {**measured, "non_embedding_params": n_params, "precompute_seconds": precompute_seconds,
            "settings": {key: config.get(key) for key in MODE_SETTINGS}}


def precompute_reference(trainer, batches: list[dict]) -> float:
    """Seconds `trainer.precompute_reference_logps` takes over every batch the run will see."""
    try:
        precompute = trainer.precompute_reference_logps
    except AttributeError:
        raise FeatureMissing("BasicTrainer has no precompute_reference_logps yet") from None
    synchronize(trainer.device)
    start = time.perf_counter()
    precompute(batches)
    synchronize(trainer.device)
    return time.perf_counter() - start


# ---- implementation "reference": the original DPO code's training step ------------------------------
# Re-implemented from eric-mitchell/direct-preference-optimization, trainers.py (BasicTrainer on one device,
# loss=dpo): the same tensor operations in the same order, without its logging, evaluation and saving.

def reference_pad_to_length(tensor: torch.Tensor, length: int, pad_value, dim: int = -1) -> torch.Tensor:
    if tensor.size(dim) >= length:
        return tensor
    pad_size = list(tensor.shape)
    pad_size[dim] = length - tensor.size(dim)
    return torch.cat([tensor, pad_value * torch.ones(*pad_size, dtype=tensor.dtype, device=tensor.device)], dim=dim)


def reference_concatenated_inputs(batch: dict) -> dict:
    """Chosen and rejected tensors, each padded to the longer of the two, stacked chosen-first."""
    max_length = max(batch["chosen_input_ids"].shape[1], batch["rejected_input_ids"].shape[1])
    concatenated = {}
    for key in batch:
        if key.startswith("chosen") and isinstance(batch[key], torch.Tensor):
            pad_value = -100 if "labels" in key else 0
            concatenated[key.replace("chosen", "concatenated")] = reference_pad_to_length(batch[key], max_length,
                                                                                          pad_value)
    for key in batch:
        if key.startswith("rejected") and isinstance(batch[key], torch.Tensor):
            pad_value = -100 if "labels" in key else 0
            name = key.replace("rejected", "concatenated")
            concatenated[name] = torch.cat((concatenated[name],
                                            reference_pad_to_length(batch[key], max_length, pad_value)), dim=0)
    return concatenated


def reference_batch_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed log-probs of the labels: a full-vocabulary log_softmax, then a gather, masked at -100."""
    labels = labels[:, 1:].clone()
    logits = logits[:, :-1, :]
    loss_mask = labels != -100
    labels[labels == -100] = 0  # a dummy token; the mask removes it
    per_token_logps = torch.gather(logits.log_softmax(-1), dim=2, index=labels.unsqueeze(2)).squeeze(2)
    return (per_token_logps * loss_mask).sum(-1)


def reference_dpo_loss(policy_chosen, policy_rejected, reference_chosen, reference_rejected, beta: float):
    logits = (policy_chosen - policy_rejected) - (reference_chosen - reference_rejected)
    losses = -F.logsigmoid(beta * logits)
    chosen_rewards = beta * (policy_chosen - reference_chosen).detach()
    rejected_rewards = beta * (policy_rejected - reference_rejected).detach()
    return losses, chosen_rewards, rejected_rewards


def reference_concatenated_forward(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    concatenated = reference_concatenated_inputs(batch)
    all_logits = model(concatenated["concatenated_input_ids"],
                       attention_mask=concatenated["concatenated_attention_mask"]).logits.to(torch.float32)
    all_logps = reference_batch_logps(all_logits, concatenated["concatenated_labels"])
    n_chosen = batch["chosen_input_ids"].shape[0]
    return all_logps[:n_chosen], all_logps[n_chosen:]


class ReferenceStep:
    """One optimizer step of the reference's BasicTrainer.train (gradient_accumulation_steps=1)."""

    def __init__(self, policy, reference_model, device: torch.device):
        self.policy = policy.to(device)
        self.reference_model = reference_model.to(device).eval()
        self.device = device
        self.optimizer = torch.optim.RMSprop(self.policy.parameters(), lr=LR)
        warmup_steps = 0
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda=lambda step: min(1.0, (step + 1) / (warmup_steps + 1)))

    def __call__(self, batch: dict) -> float:
        self.policy.train()
        batch = {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        policy_chosen, policy_rejected = reference_concatenated_forward(self.policy, batch)
        with torch.no_grad():
            reference_chosen, reference_rejected = reference_concatenated_forward(self.reference_model, batch)
        losses, chosen_rewards, rejected_rewards = reference_dpo_loss(policy_chosen, policy_rejected,
                                                                      reference_chosen, reference_rejected, BETA)
        # The reference turns its metrics into lists every step (each one a device-to-host copy).
        metrics = {"chosen": chosen_rewards.cpu().numpy().tolist(), "rejected": rejected_rewards.cpu().numpy().tolist(),
                   "accuracies": (chosen_rewards > rejected_rewards).float().cpu().numpy().tolist(),
                   "margins": (chosen_rewards - rejected_rewards).cpu().numpy().tolist(),
                   "logps_rejected": policy_rejected.detach().cpu().numpy().tolist(),
                   "logps_chosen": policy_chosen.detach().cpu().numpy().tolist(),
                   "loss": losses.detach().cpu().numpy().tolist()}
        losses.mean().backward()
        torch.nn.utils.clip_grad_norm_(self.policy.parameters(), REFERENCE_MAX_GRAD_NORM).item()
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad()
        return sum(metrics["loss"]) / len(metrics["loss"])


def run_reference(job: dict) -> dict:
    _, _, batches, policy, reference_model = load_everything(job)
    n_params = non_embedding_params(policy)
    step = ReferenceStep(policy, reference_model, job_device(job))
    del policy, reference_model
    allowed = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True  # the reference's trainers.py sets this on import
    try:
        return {**time_steps(step, job, batches, step.device), "non_embedding_params": n_params}
    finally:
        torch.backends.cuda.matmul.allow_tf32 = allowed  # rows that share this process (--no-isolate) keep theirs


# ---- implementation "trl": TRL's DPOTrainer ---------------------------------------------------------

def run_trl(job: dict) -> dict:
    from datasets import Dataset
    from transformers import PrinterCallback

    device = job_device(job)
    _, tokenizer, batches, policy, reference_model = load_everything(job)
    n_params = non_embedding_params(policy)
    timer = step_timer(device)
    with tempfile.TemporaryDirectory() as output_dir:
        args = trl_config(job, output_dir, max_steps=len(batches))
        # With precomputed log-probs TRL runs its reference pass on the policy, which starts as the reference.
        reference = None if args.precompute_ref_log_probs else reference_model
        trainer = pretokenized_trainer_class(device)(
            model=policy, ref_model=reference, args=args, callbacks=[timer], processing_class=tokenizer,
            train_dataset=Dataset.from_list(trl_rows(tokenized_elements(job["pairs"], tokenizer, job))))
        trainer.remove_callback(PrinterCallback)  # its per-step log lines; the timer reads the losses
        del policy, reference_model, reference
        trainer.train()
    memory, kind = peak_memory(device, timer.memory_was_reset)
    return {"step_seconds": timer.seconds[job["warmup"]:], "final_loss": timer.losses[-1] if timer.losses else None,
            "peak_memory_bytes": memory, "peak_memory_kind": kind, "non_embedding_params": n_params,
            "precompute_seconds": trainer.precompute_seconds if args.precompute_ref_log_probs else None}


def trl_config(job: dict, output_dir: str, max_steps: int):
    """TRL's defaults, except what makes it train like the others (see SETTINGS in the report)."""
    from trl import DPOConfig

    on_gpu = job["device"] == "cuda"
    return DPOConfig(output_dir=output_dir, per_device_train_batch_size=PAIRS_PER_STEP, max_steps=max_steps,
                     beta=BETA, max_length=job["max_length"], optim="rmsprop", learning_rate=LR,
                     train_sampling_strategy="sequential", bf16=on_gpu, use_cpu=not on_gpu, report_to="none",
                     logging_steps=1, disable_tqdm=True, save_strategy="no", **TRL_MODES[job["mode"]])


def trl_rows(elements: list[dict]) -> list[dict]:
    """The library's batch elements as TRL's tokenized rows: prompt ids, and each response's ids (EOS included)."""
    return [{"prompt_ids": element["prompt_input_ids"],
             "chosen_ids": element["chosen_input_ids"][len(element["prompt_input_ids"]):],
             "rejected_ids": element["rejected_input_ids"][len(element["prompt_input_ids"]):]} for element in elements]


def step_timer(device: torch.device):
    """A TrainerCallback that times each optimizer step (forward, backward, clipping, optimizer), keeps each
    logged loss, and starts the peak-memory measurement when training starts."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.seconds, self.losses, self.start, self.memory_was_reset = [], [], 0.0, False

        def on_train_begin(self, args, state, control, **kwargs):
            self.memory_was_reset = reset_peak_memory(device)

        def on_step_begin(self, args, state, control, **kwargs):
            synchronize(device)
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            synchronize(device)
            self.seconds.append(time.perf_counter() - self.start)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.losses.append(logs["loss"])

    return StepTimer()


def pretokenized_trainer_class(device: torch.device):
    """DPOTrainer fed the library's token ids, so that it trains on exactly the same sequences as the others.

    TRL would tokenize prompt and response together and cut the whole sequence from its end (it has no
    max_prompt_length). Only that preprocessing is replaced, not the training step; the reference pass of
    precompute_ref_log_probs is timed.
    """
    from trl import DPOTrainer

    class PretokenizedDPOTrainer(DPOTrainer):
        precompute_seconds = 0.0

        def _prepare_dataset(self, dataset, *args, **kwargs):
            return dataset

        def _precompute_ref_logps(self, *args, **kwargs):
            start = time.perf_counter()
            result = super()._precompute_ref_logps(*args, **kwargs)
            synchronize(device)
            self.precompute_seconds += time.perf_counter() - start
            return result

    return PretokenizedDPOTrainer


# ---- the device's matmul peak -------------------------------------------------------------------

def matmul_peak(job: dict) -> dict:
    """Measured FLOP/s of a large square matmul, in bfloat16 and float32, on the job's device."""
    device = job_device(job)
    size, repeats = MATMUL_SIZES[device.type]
    peaks = {}
    for dtype in (torch.bfloat16, torch.float32):
        a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
        a @ b
        synchronize(device)
        start = time.perf_counter()
        for _ in range(repeats):
            a @ b
        synchronize(device)
        peaks[str(dtype).removeprefix("torch.")] = 2 * size ** 3 * repeats / (time.perf_counter() - start)
    return peaks


# ---- running jobs -------------------------------------------------------------------------------

RUNNERS = {"dpo": run_dpo, "reference": run_reference, "trl": run_trl, "peak": matmul_peak}


def run_job_here(job: dict) -> dict:
    """Run one job in this process; a missing feature or any failure becomes a `skipped` reason."""
    torch.manual_seed(SEED)
    try:
        return RUNNERS[job["implementation"]](job)
    except (FeatureMissing, NotImplementedError) as error:
        return {"skipped": f"not available yet: {first_line(error)}"}
    except Exception as error:  # one failing row must not lose the others
        traceback.print_exc()
        return {"skipped": f"failed: {type(error).__name__}: {first_line(error)}"}
    finally:  # with --no-isolate the next row starts without this one's models
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def first_line(error: Exception) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else ""


def run_job(job: dict, out_dir: Path, isolate: bool) -> dict:
    """Run one job, in a fresh subprocess when `isolate` (its log goes to OUT/logs/)."""
    if not isolate:
        return run_job_here(job)
    logs = out_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    name = re.sub(r"[^A-Za-z0-9.+-]+", "_", f"{job['implementation']}-{job.get('model', '')}-{job.get('mode', '')}")
    job_file, result_file, log_file = (logs / f"{name}.{suffix}" for suffix in ("job.json", "result.json", "log"))
    job_file.write_text(json.dumps(job))
    result_file.unlink(missing_ok=True)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    if job["device"] == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    with open(log_file, "w") as log:
        code = subprocess.run([sys.executable, __file__, "--worker", str(job_file), "--result", str(result_file)],
                              stdout=log, stderr=subprocess.STDOUT, env=env).returncode
    if not result_file.exists():
        return {"skipped": f"failed: the worker exited with code {code} and no result; see {log_file}"}
    return json.loads(result_file.read_text())


def worker_main(job_file: str, result_file: str) -> int:
    job = json.loads(Path(job_file).read_text())
    result = run_job_here(job)
    Path(result_file).write_text(json.dumps(result))
    return 0


# ---- rows and the plan --------------------------------------------------------------------------

def row_of(job: dict, result: dict, peaks: dict) -> dict:
    """One results.json row: the job's identity plus what it measured, with throughput and MFU derived."""
    row = dict.fromkeys(ROW_FIELDS)
    row.update({key: job.get(key) for key in ("implementation", "mode", "model", "device")})
    row.update(dtypes=job.get("dtypes"), warmup_steps=job.get("warmup"), timed_steps=job.get("steps"))
    row.update({key: value for key, value in result.items() if key in ROW_FIELDS})
    if row["skipped"] or not row["step_seconds"]:
        row["skipped"] = row["skipped"] or "failed: no step was timed"
        return row
    median = statistics.median(row["step_seconds"])
    tokens = job["workload"]
    row.update(step_seconds_median=median, pairs_per_s=PAIRS_PER_STEP / median,
               real_tokens_per_s=tokens["real"] / median, useful_tokens_per_s=tokens["useful"] / median,
               padded_tokens_per_step=tokens["padded"], real_tokens_per_step=tokens["real"],
               useful_tokens_per_step=tokens["useful"])
    if peaks.get("bfloat16"):
        row["mfu"] = 8 * row["non_embedding_params"] * row["useful_tokens_per_s"] / peaks["bfloat16"]
    return row


def skipped_row(job: dict, reason: str) -> dict:
    return row_of(job, {"skipped": reason}, {})


def modes_for(implementation: str, device: str, wanted: Optional[set]) -> list[str]:
    if implementation == "dpo":
        modes = [*DPO_MODES, COMPILE_MODE]
    elif implementation == "reference":
        modes = list(reference_modes(device))
    else:
        modes = list(TRL_MODES)
    return [mode for mode in modes if wanted is None or mode in wanted]


def reference_modes(device: str) -> dict[str, tuple[str, str]]:
    """Mode name -> (policy dtype, reference dtype). The first is the reference as it ships."""
    if device == "cuda":
        return {"policy float32 + reference float16": ("float32", "float16"), "bf16": ("bfloat16", "bfloat16")}
    # float16 matmuls on CPU run at a fraction of a GFLOP/s: the as-shipped row uses float32 for both there.
    return {"policy float32 + reference float32 (CPU: float16 matmul too slow)": ("float32", "float32"),
            "bf16": ("bfloat16", "bfloat16")}


def job_dtypes(implementation: str, mode: str, device: str) -> tuple[str, str]:
    if implementation == "reference":
        return reference_modes(device)[mode]
    return ("bfloat16", "bfloat16") if device == "cuda" else ("float32", "float32")


def run_model(model: str, base: dict, args, out_dir: Path, peaks: dict, report: Callable[[dict], None]) -> list[dict]:
    """Every row of one model size, in order: dpo modes (then compile on the fastest), reference, TRL."""
    rows = []
    trl_present = importlib.util.find_spec("trl") is not None
    for implementation in args.implementations:
        for mode in modes_for(implementation, args.device, args.modes):
            job = {**base, "implementation": implementation, "mode": mode, "model": model,
                   "dtypes": job_dtypes(implementation, mode, args.device)}
            if implementation == "dpo":
                job["overrides"] = DPO_MODES.get(mode)
            if implementation == "trl" and not trl_present:
                row = skipped_row(job, f"TRL is not installed: {TRL_MISSING}")
            elif mode == COMPILE_MODE:
                row = compile_row(job, rows, args, out_dir, peaks)
            else:
                row = row_of(job, run_job(job, out_dir, args.isolate), peaks)
            rows.append(row)
            report(row)
    return rows


def compile_row(job: dict, rows: list[dict], args, out_dir: Path, peaks: dict) -> dict:
    """The fastest dpo mode measured so far, with compile=true."""
    ran = [row for row in rows if row["implementation"] == "dpo" and not row["skipped"]]
    if args.device != "cuda" and (args.modes is None or COMPILE_MODE not in args.modes):
        return skipped_row(job, f"compile runs on GPU only by default (slow to compile on CPU); add "
                                f"--modes ...,{COMPILE_MODE} to run it")
    if not ran:
        return skipped_row(job, "no dpo mode ran to compile")
    best = min(ran, key=lambda row: row["step_seconds_median"])["mode"]
    job = {**job, "mode": best + COMPILE_MODE, "overrides": [*DPO_MODES[best], "compile=true"]}
    return row_of(job, run_job(job, out_dir, args.isolate), peaks)


# ---- reports ------------------------------------------------------------------------------------

def versions() -> dict:
    found = {"python": platform.python_version(), "torch": torch.__version__}
    for package in ("transformers", "trl"):
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            found[package] = f"not installed ({TRL_MISSING})" if package == "trl" else "not installed"
    return found


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name(0)
    with contextlib.suppress(OSError):
        model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
                     None)
    return f"CPU ({model or platform.machine()}), {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"


def fmt(value, spec: str = ".3g", none: str = "–") -> str:
    return none if value is None else format(value, spec)


def ratio(row: dict, base: Optional[dict]) -> str:
    if row["skipped"] or not base or base["skipped"]:
        return "–"
    return f"{row['pairs_per_s'] / base['pairs_per_s']:.2f}×"


def markdown_table(rows: list[dict]) -> str:
    """One table per model: speed, tokens, memory, loss, MFU, and speed ratios to the two baselines."""
    lines = []
    for model in dict.fromkeys(row["model"] for row in rows):
        mine = [row for row in rows if row["model"] == model]
        reference = find_row(mine, "reference", next(iter(reference_modes(mine[0]["device"]))))
        trl_default = find_row(mine, "trl", "default")
        lines += [f"\n**{model}** (padded tokens per step: {fmt(first(mine, 'padded_tokens_per_step'), '.0f')}, "
                  f"real {fmt(first(mine, 'real_tokens_per_step'), '.0f')}, "
                  f"useful {fmt(first(mine, 'useful_tokens_per_step'), '.0f')})\n",
                  "| implementation | mode | step s (median) | pairs/s | real tok/s | useful tok/s | peak memory MiB "
                  "| final loss | MFU | × reference (as shipped) | × TRL default | notes |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for row in mine:
            notes = row["skipped"] or (f"precompute {row['precompute_seconds']:.2f} s"
                                       if row["precompute_seconds"] is not None else "")
            memory = row["peak_memory_bytes"] / 2 ** 20 if row["peak_memory_bytes"] else None
            lines.append(f"| {row['implementation']} | {row['mode']} | {fmt(row['step_seconds_median'], '.3f')} "
                         f"| {fmt(row['pairs_per_s'], '.2f')} | {fmt(row['real_tokens_per_s'], '.0f')} "
                         f"| {fmt(row['useful_tokens_per_s'], '.0f')} | {fmt(memory, '.0f')} "
                         f"| {fmt(row['final_loss'], '.4f')} | {fmt(row['mfu'], '.2%')} | {ratio(row, reference)} "
                         f"| {ratio(row, trl_default)} | {notes} |")
    return "\n".join(lines)


def find_row(rows: list[dict], implementation: str, mode: str) -> Optional[dict]:
    return next((row for row in rows if row["implementation"] == implementation and row["mode"] == mode), None)


def first(rows: list[dict], key: str):
    return next((row[key] for row in rows if row[key] is not None), None)


def write_markdown(path: Path, rows: list[dict], meta: dict) -> str:
    """results.md: what ran where, the table, how to read it, and every setting that differs from a default."""
    text = "\n".join(["# One DPO training step: this library vs the reference code vs TRL\n", *header_lines(rows, meta),
                      markdown_table(rows), HOW_TO_READ.format(memory=first(rows, "peak_memory_kind") or "–",
                                                               cpu_mfu=cpu_mfu_note(meta)),
                      SETTINGS.format(compile_warmup=COMPILE_EXTRA_WARMUP, max_length=meta["max_length"],
                                      **DEVICE_NOTES[meta["device_kind"]])])
    path.write_text(text)
    return text


def header_lines(rows: list[dict], meta: dict) -> list[str]:
    peaks = meta["matmul_peak_flops"]
    lines = [f"- command: `{meta['command']}` (took {meta['seconds']:.0f} s)",
             f"- device: {meta['device']}",
             f"- versions: {', '.join(f'{name} {version}' for name, version in meta['versions'].items())}",
             f"- measured matmul peak: bfloat16 {fmt(peaks.get('bfloat16', 0) / 1e12, '.3g')} TFLOP/s, "
             f"float32 {fmt(peaks.get('float32', 0) / 1e12, '.3g')} TFLOP/s ({MATMUL_SIZES[meta['device_kind']][0]}² "
             "matrices)",
             f"- data: {meta['data']}; tokenizer `{meta['tokenizer']}`; {PAIRS_PER_STEP} pairs per step, max_length "
             f"{meta['max_length']}, max_prompt_length {meta['max_prompt_length']} (prompts cut keep_end)",
             f"- each row: {meta['warmup']} warm-up step(s), then {meta['steps']} timed step(s), on the same batches "
             f"for every row; {'each row in a fresh subprocess' if meta['isolate'] else 'all rows in one process'}"]
    for name, shape in meta["models"].items():
        params = first([row for row in rows if row["model"] == name], "non_embedding_params")
        lines.append(f"- `{name}`: GPT-NeoX (Pythia), hidden {shape['hidden_size']}, {shape['num_hidden_layers']} "
                     f"layers, {shape['num_attention_heads']} heads, intermediate {shape['intermediate_size']}, "
                     f"rotary_pct 0.25, the tokenizer's vocabulary; {fmt(params, ',')} non-embedding parameters")
    return lines


def cpu_mfu_note(meta: dict) -> str:
    peaks = meta["matmul_peak_flops"]
    if meta["device_kind"] != "cpu" or not peaks.get("float32") or not peaks.get("bfloat16"):
        return ""
    return (f"\n  On CPU the rows compute in float32 (bf16: the reference's bf16 row), whose measured peak is lower: "
            f"MFU against it is {peaks['bfloat16'] / peaks['float32']:.2g}× the column.")


HOW_TO_READ = """
## How to read it

- **step s**: median wall time of one optimizer step (forward of policy and reference, backward, clipping,
  optimizer), CUDA synchronized before each clock read. pairs/s and tokens/s are one timed step's mean counts
  divided by it. **real** tokens: non-pad tokens of the chosen and rejected sequences; **useful**: prompt tokens
  once plus both responses; **padded**: the [2 × pairs, longest sequence] rectangle a padded implementation computes.
- **× reference / × TRL default**: the row's pairs/s divided by that baseline's pairs/s on the same model.
- **peak memory**: {memory}, from the first warm-up step to the last timed step (weights, optimizer state,
  activations; on CPU the RSS also holds the Python runtime and libraries).
- **MFU**: 8 × non-embedding parameters × useful tokens/s ÷ the measured bfloat16 matmul peak (6N for the policy's
  forward and backward, 2N for the reference's forward; the LM head and attention are not counted).{cpu_mfu}
- **final loss**: the last timed step's mean loss. Every row starts from the same weights and sees the same
  batches; TRL's learning rate decays linearly and it clips gradients at 1.0, so its loss moves a little differently.
"""

SETTINGS = """
## Settings

- **dpo**: `BasicTrainer.train_step`, config composed from `config/` with `loss=dpo loss.beta=0.1 batch_size=8
  optimizer=RMSprop lr=1e-6 warmup_steps=0 sample_during_eval=false` and the mode's keys. plain:
  `lm_head_chunk_size=null`; chunked: the default `lm_head_chunk_size=1024`; packed: `packing=true`; prefix_shared:
  `packing=true prefix_sharing=true`; prefix_shared+cached_reference: also `cache_reference_logps=true`, after
  `precompute_reference_logps` over every batch (timed as *precompute*); `<mode>+compile`: the fastest mode plus
  `compile=true`, with {compile_warmup} extra passes over the warm-up batches for compilation.
  `sample_during_eval=false` lets `precompute_reference_logps` free the reference model, as a run without sampling does.
- **reference**: the original code's step, re-implemented in the benchmark: chosen and rejected padded to the
  longer and stacked, `model(...).logits.to(float32)`, a full-vocabulary `log_softmax` and `gather`, the reference
  model under `no_grad`, the sigmoid DPO loss, RMSprop, `clip_grad_norm_(10)`, the metrics copied to lists every
  step, `allow_tf32=True` as its trainers.py sets. It ships with a float32 policy and a float16 reference model;
  {reference_note}
- **trl**: `DPOTrainer` at its defaults except `per_device_train_batch_size=8`, `max_length={max_length}` and
  `optim="rmsprop"` to match the others (`beta=0.1` and `learning_rate=1e-6` are its defaults);
  `train_sampling_strategy="sequential"`, so that it sees the same batches in the same order; {trl_bf16};
  `report_to="none"`, `logging_steps=1` (to read each step's loss), `disable_tqdm=True`, `save_strategy="no"`.
  It gets the same token ids as the others: its dataset preprocessing is skipped, because it would tokenize prompt
  and response together and cut the whole sequence from its end (it has no max_prompt_length). Still at its
  defaults: gradient checkpointing **on** (the row `no_gradient_checkpointing` shows what it costs),
  `max_grad_norm=1.0`, a linearly decaying learning rate, its fused chunked LM head. `precompute_ref_log_probs` runs
  the model once over the training set while the trainer is built (timed as *precompute*) and keeps no reference model.
  {trl_device}
- Every row's policy and reference model come from `dpo.models.load_models` with the same seed: the same weights.
"""

DEVICE_NOTES = {
    "cpu": {"reference_note": "float16 matmuls run below 1 GFLOP/s on CPU, so its first row there computes in float32.",
            "trl_bf16": "`bf16=False`, to compute in float32 like the other CPU rows (its default is `True`)",
            "trl_device": "On CPU TRL's fused LM head scores every position, not only the responses' (its compact "
                          "path is for Triton devices), and also computes entropy and top-1 statistics for its logs: "
                          "its CPU rows say little about its GPU speed."},
    "cuda": {"reference_note": "that is its first row, the baseline of the × reference column.",
             "trl_bf16": "`bf16=True` (its default), with bfloat16 weights like the other rows",
             "trl_device": "On GPU its fused LM head scores only the response positions, in chunks."},
}


# ---- main ---------------------------------------------------------------------------------------

QUICK = {"sizes": ["tiny"], "warmup": 1, "steps": 1, "max_length": 128, "max_prompt_length": 64}


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, help="directory for results.json, results.md and logs/")
    parser.add_argument("--sizes", type=comma_list, help=f"comma-separated, of {', '.join(MODELS)}")
    parser.add_argument("--steps", type=int, help="timed steps per row (default: cpu 2, cuda 5)")
    parser.add_argument("--warmup", type=int, help="warm-up steps per row (default: cpu 1, cuda 2)")
    parser.add_argument("--implementations", type=comma_list, default=list(IMPLEMENTATIONS))
    parser.add_argument("--modes", type=lambda text: set(comma_list(text)),
                        help="only these modes, named as in the table ('+compile' also runs compile on CPU)")
    parser.add_argument("--max-length", type=int, help="default 512")
    parser.add_argument("--max-prompt-length", type=int, help="default 256")
    parser.add_argument("--quick", action="store_true",
                        help="tiny model, character tokenizer, max_length 128, 1 warm-up + 1 timed step, all rows "
                             "in this process: checks that every row runs, in well under a minute")
    parser.add_argument("--no-isolate", dest="isolate", action="store_false",
                        help="run every row in this process (faster; CPU peak memory is still reset per row)")
    parser.add_argument("--write-lengths", action="store_true", help=f"regenerate {LENGTHS_FILE.name} and exit")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    apply_defaults(args)
    problems = argument_problems(args)
    if problems:
        parser.error("; ".join(problems))
    return args


def comma_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def apply_defaults(args: argparse.Namespace) -> None:
    if args.quick:
        args.isolate = False
        for key, value in QUICK.items():
            if getattr(args, key) is None:
                setattr(args, key, value)
    warmup, steps = DEFAULT_STEPS[args.device]
    defaults = {"sizes": DEFAULT_SIZES[args.device], "warmup": warmup, "steps": steps, "max_length": 512,
                "max_prompt_length": 256}
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)


def argument_problems(args: argparse.Namespace) -> list[str]:
    problems = [f"unknown size {size!r} (choose from {', '.join(MODELS)})" for size in args.sizes if size not in MODELS]
    problems += [f"unknown implementation {name!r} (choose from {', '.join(IMPLEMENTATIONS)})"
                 for name in args.implementations if name not in IMPLEMENTATIONS]
    if args.device == "cuda" and not torch.cuda.is_available():
        problems.append("--device cuda needs a visible GPU, and torch.cuda.is_available() is False")
    if not args.worker and not args.write_lengths and args.out is None:
        problems.append("--out DIR is required")
    if args.steps < 1 or args.warmup < 0:
        problems.append("--steps must be at least 1 and --warmup at least 0")
    if args.max_prompt_length >= args.max_length:
        problems.append("--max-prompt-length must be below --max-length")
    return problems


def main(argv: Optional[list[str]] = None) -> list[dict]:
    """Run the benchmark; write OUT/results.json and OUT/results.md, print the table; return the rows."""
    args = parse_args(argv)
    if args.worker:
        sys.exit(worker_main(args.worker, args.result))
    if args.write_lengths:
        write_length_histogram()
        return []
    started = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    base, data = common_job(args)
    peaks = run_job({**base, "implementation": "peak", "model": "", "mode": "matmul"}, args.out, args.isolate)
    peaks = {key: value for key, value in peaks.items() if key != "skipped"}

    def report(row: dict) -> None:
        outcome = row["skipped"] or f"{row['step_seconds_median']:.3f} s/step, {row['pairs_per_s']:.2f} pairs/s"
        elapsed = time.perf_counter() - started
        print(f"[{elapsed:6.0f} s] {row['model']} {row['implementation']} {row['mode']}: {outcome}", flush=True)

    rows = [row for model in args.sizes for row in run_model(model, base, args, args.out, peaks, report)]
    command = " ".join(["python", "benchmarks/dpo_step.py", *(sys.argv[1:] if argv is None else argv)])
    meta = {"seconds": time.perf_counter() - started, "command": command, "device": device_name(args.device),
            "device_kind": args.device, "versions": versions(), "matmul_peak_flops": peaks, "data": data,
            "tokenizer": Path(base["tokenizer"]).name, "warmup": args.warmup, "steps": args.steps,
            "max_length": args.max_length, "max_prompt_length": args.max_prompt_length, "isolate": args.isolate,
            "models": {name: MODELS[name] for name in args.sizes}}
    (args.out / "results.json").write_text(json.dumps(rows, indent=1) + "\n")
    write_markdown(args.out / "results.md", rows, meta)
    print(markdown_table(rows))
    print(f"\n{len(rows)} rows in {meta['seconds']:.0f} s; wrote {args.out / 'results.json'} and "
          f"{args.out / 'results.md'}")
    return rows


def common_job(args: argparse.Namespace) -> tuple[dict, str]:
    """What every job shares (the pairs, the tokenizer, the lengths, the timed batches' token counts), and
    a description of the data."""
    tokenizer = tokenizer_path(args.quick)
    pairs, data = benchmark_pairs(PAIRS_PER_STEP * (args.warmup + args.steps), tokenizer)
    base = {"device": args.device, "pairs": pairs, "tokenizer": tokenizer, "warmup": args.warmup, "steps": args.steps,
            "max_length": args.max_length, "max_prompt_length": args.max_prompt_length}
    return {**base, "workload": timed_workload(base)}, data


def timed_workload(base: dict) -> dict:
    """Mean token counts of the timed batches (every row times the same ones)."""
    from dpo.models import load_tokenizer

    tokenizer = load_tokenizer({"tokenizer_name_or_path": base["tokenizer"]})
    batches = batches_of(tokenized_elements(base["pairs"], tokenizer, base), tokenizer)
    return mean_workload(batches[base["warmup"]:])


if __name__ == "__main__":
    main()
