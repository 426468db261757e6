"""Side-by-side generations: the tuned policy's completions next to the model it started from.

    python -m dpo.generate RUN_DIR_or_CHECKPOINT_or_MODEL_DIR --prompts FILE_or_DATASET
        [--n 16] [--max_new_tokens 64] [--temperature 1.0] [--top_p 1.0] [--seed 0] [--greedy]
        [--reference MODEL] [--out DIR]

A run directory (or one of its checkpoints, `LATEST/` by default) is rebuilt from the run's config.yaml:
the policy from the checkpoint, the reference as the run started (its `model.archive`, its hub or local
model, or the same fresh initialisation), unless `--reference` names another model to compare with; a
LoRA run's reference is its policy with the adapters off, as in training. A plain Hugging Face model
directory needs `--reference`. Prompts come from a UTF-8 text file (one per line), a .jsonl file (a
`prompt` field per row; a byte-order mark is fine), or a dataset name or path as in `datasets=[...]`
(its test split). Both models sample with the same seed, at a temperature of at least 0.01 (below it,
sampling overflows; `--greedy` takes the most likely tokens). For a dataset with a judge (`toy`), both
completions are scored and the policy's win rate reported. Writes `generations.jsonl` and
`generations.md` to `--out` (default `RUN_DIR/generations/`) and prints the first 8 rows.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

from dpo.checkpoints import read_archive
from dpo.data import dataset_source, is_local_path
from dpo.errors import ConfigError, DataError, RunDirError, UserError
from dpo.export import checkpoint_policy_path, read_run_config
from dpo.lora import AdapterFreeModel, is_lora_model
from dpo.models import load_models, load_tokenizer

Judge = Callable[[str, str], float]

# Sampling divides the logits by the temperature. Below 0.01 that is greedy decoding in all but name (a logit
# 0.1 ahead is 22,000 times likelier), and far below it the division overflows: 1e-300 makes every logit
# infinite and sampling fails on NaN probabilities. Greedy decoding is its own option.
MIN_TEMPERATURE = 0.01


@dataclass(frozen=True)
class GenerationOptions:
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    greedy: bool = False
    seed: int = 0
    batch_size: int = 16


def check_options(options: GenerationOptions, command_line: bool = False) -> None:
    """Refuse options that sampling cannot use, in one sentence naming the option as the user wrote it."""
    def name(option: str) -> str:
        return f"--{option}" if command_line else option

    def refuse(option: str, value, rule: str) -> None:
        raise ConfigError(f"{name(option)} {value!r} is out of range; give {name(option)} {rule}")

    if isinstance(options.max_new_tokens, bool) or not isinstance(options.max_new_tokens, int) \
            or options.max_new_tokens < 1:
        refuse("max_new_tokens", options.max_new_tokens, "of at least 1")
    if options.greedy:
        return  # temperature and top_p are not used
    if not (isinstance(options.temperature, (int, float)) and math.isfinite(options.temperature)
            and options.temperature >= MIN_TEMPERATURE):
        refuse("temperature", options.temperature,
               f"a finite number of at least {MIN_TEMPERATURE} (below it logits / temperature overflows, and "
               f"sampling is greedy decoding in all but name), or use {name('greedy')} for the most likely tokens")
    if not (isinstance(options.top_p, (int, float)) and 0 < options.top_p <= 1):
        refuse("top_p", options.top_p, "in (0, 1] (1 samples from every token)")


@dataclass
class SideBySide:
    """A tuned policy, the model it started from, and their tokenizer."""

    policy: nn.Module
    reference: nn.Module
    tokenizer: object
    run_dir: Optional[str] = None
    datasets: tuple[str, ...] = ()

    def complete(self, prompts: list[str], options: GenerationOptions = GenerationOptions(),
                 judge: Optional[Judge] = None) -> list[dict]:
        """One row per prompt: the prompt, both completions and, with a judge, both scores."""
        completions = {role: generate(model, self.tokenizer, prompts, options)
                       for role, model in (("policy", self.policy), ("reference", self.reference))}
        rows = []
        for index, prompt in enumerate(prompts):
            row = {"prompt": prompt, "policy": completions["policy"][index],
                   "reference": completions["reference"][index]}
            if judge is not None:
                row["judge_policy"] = judge(prompt, row["policy"])
                row["judge_reference"] = judge(prompt, row["reference"])
            rows.append(row)
        return rows


def load_side_by_side(path: str, reference: Optional[str] = None, device: Optional[str] = None) -> SideBySide:
    """The policy at `path` (a run directory, one of its checkpoints, or a Hugging Face model directory)
    and its reference model, in eval mode on `device` (default: a GPU if visible)."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if not os.path.isdir(path):
        raise ConfigError(f"{path} is not a directory; give a run directory, a checkpoint such as <run dir>/LATEST, "
                          "or a Hugging Face model directory")
    run_dir, checkpoint = _run_and_checkpoint(path)
    if run_dir is None:
        pair = _from_model_directories(path, reference)
    else:
        pair = _from_run(run_dir, checkpoint)
        if reference is not None:  # compare with another model than the one the run started from
            pair.reference = _hf_model(reference)
        elif pair.reference is None and is_lora_model(pair.policy):
            # A LoRA run has no second model: its reference is the policy with the adapters off, as in training.
            pair.reference = AdapterFreeModel(pair.policy)
    for model in (pair.policy, pair.reference):
        model.to(device).eval()
    return pair


def _run_and_checkpoint(path: str) -> tuple[Optional[str], Optional[str]]:
    path = os.path.abspath(path)
    if os.path.isfile(os.path.join(path, "config.yaml")):
        return path, os.path.join(path, "LATEST")
    parent = os.path.dirname(path)
    if os.path.isfile(os.path.join(path, "policy.pt")) and os.path.isfile(os.path.join(parent, "config.yaml")):
        return parent, path
    return None, None


def _from_run(run_dir: str, checkpoint: str) -> SideBySide:
    config, cache_dir = read_run_config(os.path.join(run_dir, "config.yaml"))
    policy_path = checkpoint_policy_path(checkpoint)
    tokenizer = load_tokenizer(config["model"], cache_dir=cache_dir)
    archive = read_archive(config["model"]["archive"]) if config["model"].get("archive") else None
    state = read_archive(policy_path, label=policy_path)["state"]
    policy, reference = load_models(config, tokenizer, needs_reference=True, cache_dir=cache_dir, archive=archive,
                                    resume_state=state, verbose=False)
    return SideBySide(policy, reference, tokenizer, run_dir=run_dir, datasets=tuple(config.get("datasets") or ()))


def _from_model_directories(path: str, reference: Optional[str]) -> SideBySide:
    if reference is None:
        raise ConfigError(f"{path} is not a run directory (no config.yaml in it or its parent), so its starting "
                          "model is unknown; pass --reference <model directory or hub name>")
    return SideBySide(_hf_model(path), _hf_model(reference), load_tokenizer({"name_or_path": path}))


def _hf_model(name_or_path: str) -> nn.Module:
    """A causal LM, or an encoder-decoder one (T5) where its config says so."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    from dpo.models import explained_load_errors, explained_weight_errors

    with explained_load_errors("--reference", name_or_path), explained_weight_errors("--reference", name_or_path):
        encoder_decoder = AutoConfig.from_pretrained(name_or_path).is_encoder_decoder
        auto_class = AutoModelForSeq2SeqLM if encoder_decoder else AutoModelForCausalLM
        return auto_class.from_pretrained(name_or_path)


@torch.no_grad()
def generate(model: nn.Module, tokenizer, prompts: list[str], options: GenerationOptions) -> list[str]:
    """Completions (response text only) of `prompts`, sampled with `options.seed` (or greedy)."""
    check_options(options)
    device = next(model.parameters()).device
    padding_side, tokenizer.padding_side = tokenizer.padding_side, "left"  # continuations follow the prompt
    texts = []
    try:
        for start in range(0, len(prompts), options.batch_size):
            inputs = tokenizer(prompts[start:start + options.batch_size], return_tensors="pt", padding=True,
                               add_special_tokens=False).to(device)
            torch.manual_seed(options.seed + start)  # the same randomness for every model
            sampling = {} if options.greedy else {"temperature": options.temperature, "top_p": options.top_p}
            output = model.generate(**inputs, max_new_tokens=options.max_new_tokens, do_sample=not options.greedy,
                                    pad_token_id=tokenizer.pad_token_id, **sampling)
            # a causal LM returns prompt + continuation; an encoder-decoder model its decoder's start token + response
            response_start = 1 if model.config.is_encoder_decoder else inputs["input_ids"].shape[1]
            texts += tokenizer.batch_decode(output[:, response_start:], skip_special_tokens=True)
    finally:
        tokenizer.padding_side = padding_side
    return texts


def read_prompts(source: str, n: int) -> tuple[list[str], Optional[Judge]]:
    """The first `n` prompts of a .txt/.jsonl file or of a dataset's test split, and the dataset's judge if any."""
    if os.path.isfile(source) and source.endswith((".txt", ".jsonl")):
        return _prompts_from_file(source)[:n], None
    if not (source in _dataset_names() or is_local_path(source)):
        raise DataError(f"--prompts {source} is neither a .txt or .jsonl file nor a dataset; give a file with one "
                        "prompt per line, or a dataset name such as toy or hh")
    data_source = dataset_source(source)
    prompts = list(data_source.load_split("test", silent=True).data)[:n]
    return prompts, data_source.judge


def _dataset_names() -> list[str]:
    from dpo.data import dataset_names

    return dataset_names()


def _prompts_from_file(path: str) -> list[str]:
    try:
        with open(path, encoding="utf-8-sig") as file:  # -sig: a byte-order mark, as some editors write, is dropped
            lines = [line.rstrip("\r\n") for line in file]
    except UnicodeDecodeError as error:
        raise DataError(f"--prompts {path} is not UTF-8 text (byte 0x{error.object[error.start]:02x} at offset "
                        f"{error.start}); save it as UTF-8") from None
    except OSError as error:
        raise DataError(f"cannot read --prompts {path}: {error.strerror or error}; check that it is a readable "
                        "file") from None
    if path.endswith(".txt"):
        prompts = [line.replace("\\n", "\n") for line in lines if line.strip()]
    else:
        prompts = []
        for number, line in enumerate(lines, start=1):
            if line.strip():
                try:
                    row = json.loads(line)
                except ValueError as error:
                    reason = getattr(error, "msg", str(error))
                    raise DataError(f"line {number} of {path} is not valid JSON ({reason} at column "
                                    f"{getattr(error, 'colno', '?')}); write one JSON object per line such as "
                                    "{\"prompt\": \"...\"}") from None
                if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
                    raise DataError(f"line {number} of {path} has no \"prompt\" text field; write one JSON object "
                                    "per line such as {\"prompt\": \"...\"}")
                prompts.append(row["prompt"])
    if not prompts:
        raise DataError(f"{path} holds no prompts; write one prompt per line")
    return prompts


def write_generations(rows: list[dict], out_dir: str) -> list[str]:
    """`generations.jsonl` (every row) and `generations.md` (a table to read), in `out_dir`."""
    check_out_dir(out_dir)
    try:
        os.makedirs(out_dir, exist_ok=True)
        return _write_generation_files(rows, out_dir)
    except OSError as error:
        raise RunDirError(f"cannot write the generations to {out_dir}: {error.strerror or error}; give --out a "
                          "writable directory with free space") from None


def check_out_dir(out_dir: str) -> None:
    """Refuse an output path that is a file (or lies under one), before any model loads."""
    path = os.path.abspath(out_dir)
    while path and not os.path.exists(path):
        parent = os.path.dirname(path)
        if parent == path:
            return
        path = parent
    if not os.path.isdir(path):
        where = "" if path == os.path.abspath(out_dir) else f" ({path} is a file)"
        raise RunDirError(f"--out {out_dir} is a file, not a directory{where}; give a directory (created if "
                          "missing) for generations.jsonl and generations.md")


def _write_generation_files(rows: list[dict], out_dir: str) -> list[str]:
    jsonl, markdown = os.path.join(out_dir, "generations.jsonl"), os.path.join(out_dir, "generations.md")
    with open(jsonl, "w", encoding="utf-8") as file:
        file.writelines(json.dumps(row) + "\n" for row in rows)
    judged = bool(rows) and "judge_policy" in rows[0]
    header = "| prompt | policy | reference |" + (" judge policy | judge reference |" if judged else "")
    lines = [header, "|---|---|---|" + ("---|---|" if judged else "")]
    for row in rows:
        cells = [_cell(row["prompt"]), _cell(row["policy"]), _cell(row["reference"])]
        if judged:
            cells += [f"{row['judge_policy']:.2f}", f"{row['judge_reference']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    summary = summarize(rows)
    if summary:
        lines += ["", summary]
    with open(markdown, "w", encoding="utf-8") as file:
        file.write("\n".join(lines) + "\n")
    return [jsonl, markdown]


def summarize(rows: list[dict]) -> str:
    """Mean judge scores and the policy's win rate (ties count half), when the rows are judged."""
    if not rows or "judge_policy" not in rows[0]:
        return ""
    policy = sum(row["judge_policy"] for row in rows) / len(rows)
    reference = sum(row["judge_reference"] for row in rows) / len(rows)
    wins = sum(1.0 if row["judge_policy"] > row["judge_reference"] else 0.5 if row["judge_policy"] ==
               row["judge_reference"] else 0.0 for row in rows) / len(rows)
    return f"judge: policy {policy:.3f}, reference {reference:.3f}; policy win rate {wins:.3f} over {len(rows)} prompts"


def _cell(text: str, limit: int = 300) -> str:
    text = text if len(text) <= limit else text[:limit] + "..."
    return text.replace("|", "\\|").replace("\n", "<br>")


N_PRINTED = 8  # rows printed to the terminal; the files hold every row


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dpo.generate", description=__doc__.split("\n\n")[0])
    parser.add_argument("path", help="a run directory, one of its checkpoints, or a Hugging Face model directory")
    parser.add_argument("--prompts", required=True, help="a .txt or .jsonl file, or a dataset name or path")
    parser.add_argument("--n", type=int, default=16, help="how many prompts")
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top_p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--greedy", action="store_true", help="greedy decoding instead of sampling")
    parser.add_argument("--reference", help="the starting model, for a Hugging Face model directory")
    parser.add_argument("--out", help="output directory (default: RUN_DIR/generations)")
    args = parser.parse_args(argv)
    options = GenerationOptions(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                                greedy=args.greedy, seed=args.seed)
    try:
        if args.n < 1:
            raise ConfigError(f"--n {args.n} is out of range; give --n, the number of prompts, of at least 1")
        check_options(options, command_line=True)
        if args.out:
            check_out_dir(args.out)
        prompts, judge = read_prompts(args.prompts, args.n)
        pair = load_side_by_side(args.path, args.reference)
        rows = pair.complete(prompts, options, judge)
        out_dir = args.out or os.path.join(pair.run_dir or args.path, "generations")
        written = write_generations(rows, out_dir)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    if len(prompts) < args.n:
        print(f"note: --prompts {args.prompts} holds {len(prompts)} prompt{'s' if len(prompts) != 1 else ''}, fewer "
              f"than --n {args.n}: all of them were generated")
    for row in rows[:N_PRINTED]:
        print(f"{row['prompt'][-60:]!r}\n  policy:    {row['policy'][:80]!r}\n  reference: {row['reference'][:80]!r}")
    if len(rows) > N_PRINTED:
        print(f"(the first {N_PRINTED} of {len(rows)} rows; {os.path.join(out_dir, 'generations.md')} has them all)")
    summary = summarize(rows)
    if summary:
        print(summary)
    print("wrote " + ", ".join(written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
