"""From preference examples to padded token batches, with the reference implementation's semantics.

A batch element holds, for `chosen`, `rejected` and `prompt`, the token `input_ids`,
`attention_mask` and (for chosen/rejected) `labels` with -100 on prompt tokens, plus the texts.
Responses end with the EOS token. Over-long inputs are cut as in the reference: first the prompt
to `max_prompt_length` tokens (its end with `keep_end`, its start with `keep_start`), then the
responses to `max_length - max_prompt_length`. Collation right-pads everything except the prompt,
which is left-padded so that generation can continue it.
"""

from __future__ import annotations

import random
from typing import Iterator, Optional

import torch
from transformers import PreTrainedTokenizerBase

from dpo.data import dataset_source, load_source
from dpo.errors import DataError
from dpo.logps import IGNORE_INDEX


def tokenize_batch_element(prompt: str, chosen: str, rejected: str, truncation_mode: str,
                           tokenizer: PreTrainedTokenizerBase, max_length: int, max_prompt_length: int) -> dict:
    """Tokenize one (prompt, chosen, rejected) triple into a batch element (lists, not tensors)."""
    prompt_tokens = tokenizer(prompt, add_special_tokens=False)
    chosen_tokens = tokenizer(chosen, add_special_tokens=False)
    rejected_tokens = tokenizer(rejected, add_special_tokens=False)
    for label, tokens in (("prompt", prompt_tokens), ("chosen", chosen_tokens), ("rejected", rejected_tokens)):
        if tokenizer.eos_token_id in tokens["input_ids"]:
            raise DataError(f"the {label} text of prompt {_excerpt(prompt)} tokenizes to the EOS token; "
                            "remove it from the data (EOS is appended to responses automatically)")
    prompt_tokens = {k: list(prompt_tokens[k]) for k in ("input_ids", "attention_mask")}
    chosen_tokens = {k: list(chosen_tokens[k]) for k in ("input_ids", "attention_mask")}
    rejected_tokens = {k: list(rejected_tokens[k]) for k in ("input_ids", "attention_mask")}
    for tokens in (chosen_tokens, rejected_tokens):
        tokens["input_ids"].append(tokenizer.eos_token_id)
        tokens["attention_mask"].append(1)

    longer_response = max(len(chosen_tokens["input_ids"]), len(rejected_tokens["input_ids"]))
    if len(prompt_tokens["input_ids"]) + longer_response > max_length:
        if truncation_mode == "keep_start":
            prompt_tokens = {k: v[:max_prompt_length] for k, v in prompt_tokens.items()}
        elif truncation_mode == "keep_end":
            prompt_tokens = {k: v[-max_prompt_length:] for k, v in prompt_tokens.items()}
        else:
            raise ValueError(f"unknown truncation_mode {truncation_mode!r}: use keep_start or keep_end")
    if len(prompt_tokens["input_ids"]) + longer_response > max_length:
        response_budget = max_length - max_prompt_length
        chosen_tokens = {k: v[:response_budget] for k, v in chosen_tokens.items()}
        rejected_tokens = {k: v[:response_budget] for k, v in rejected_tokens.items()}

    element = {"prompt": prompt, "chosen": prompt + chosen, "rejected": prompt + rejected,
               "chosen_response_only": chosen, "rejected_response_only": rejected}
    n_prompt = len(prompt_tokens["input_ids"])
    for label, response_tokens in (("chosen", chosen_tokens), ("rejected", rejected_tokens)):
        input_ids = prompt_tokens["input_ids"] + response_tokens["input_ids"]
        element[f"{label}_input_ids"] = input_ids
        element[f"{label}_attention_mask"] = prompt_tokens["attention_mask"] + response_tokens["attention_mask"]
        element[f"{label}_labels"] = [IGNORE_INDEX] * n_prompt + response_tokens["input_ids"]
    element["prompt_input_ids"] = prompt_tokens["input_ids"]
    element["prompt_attention_mask"] = prompt_tokens["attention_mask"]
    return element


def _excerpt(text: str, n: int = 60) -> str:
    return repr(text if len(text) <= n else text[:n] + "...")


def get_collate_fn(tokenizer: PreTrainedTokenizerBase):
    """Collate batch elements: pad token fields into tensors, keep everything else as lists."""

    def collate(elements: list[dict]) -> dict:
        batch = {}
        for key in elements[0]:
            values = [element[key] for element in elements]
            if key.endswith("_input_ids"):
                batch[key] = _pad(values, tokenizer.pad_token_id, left=key.startswith("prompt"))
            elif key.endswith("_attention_mask"):
                batch[key] = _pad(values, 0, left=key.startswith("prompt"))
            elif key.endswith("_labels"):
                batch[key] = _pad(values, IGNORE_INDEX, left=False)
            else:
                batch[key] = values
        return batch

    return collate


def _pad(sequences: list[list[int]], pad_value: int, left: bool) -> torch.Tensor:
    width = max(len(sequence) for sequence in sequences)
    padded = torch.full((len(sequences), width), pad_value, dtype=torch.long)
    for row, sequence in enumerate(sequences):
        if sequence:
            if left:
                padded[row, width - len(sequence):] = torch.tensor(sequence)
            else:
                padded[row, :len(sequence)] = torch.tensor(sequence)
    return padded


def flatten_examples(names: list[str], split: str, eos_text: Optional[str], silent: bool = False,
                     cache_dir: Optional[str] = None) -> list[tuple]:
    """All (prompt, responses, pairs, sft_target, truncation_mode, dataset) of `names`, checked up front.

    Checking the EOS text here, before the first step, stops a bad run at once rather than hours in.
    """
    flat = []
    for name in names:
        source = dataset_source(name)
        data = load_source(source, split, silent=silent, cache_dir=cache_dir)
        for prompt, example in data.items():
            if eos_text:
                _check_no_eos_text(name, split, prompt, example, eos_text)
            flat.append((prompt, example["responses"], example["pairs"], example["sft_target"],
                         source.truncation_mode, name))
    return flat


def _check_no_eos_text(name: str, split: str, prompt: str, example: dict, eos_text: str) -> None:
    texts = [("prompt", prompt), ("SFT target", example["sft_target"])]
    texts += [("response", example["responses"][i]) for pair in example["pairs"] for i in pair]
    for label, text in texts:
        if eos_text in text:
            raise DataError(f"dataset {name} ({split}): the {label} of prompt {_excerpt(prompt)} contains the "
                            f"tokenizer's EOS text {eos_text!r}; remove it from the data (EOS is appended automatically)")


def get_batch_iterator(names: list[str], tokenizer: PreTrainedTokenizerBase, split: str = "train",
                       batch_size: int = 1, shuffle: bool = True, max_length: int = 512,
                       max_prompt_length: int = 128, sft_mode: bool = False, n_epochs: Optional[int] = None,
                       n_examples: Optional[int] = None, seed: int = 0, silent: bool = False,
                       cache_dir: Optional[str] = None, drop_last: bool = True) -> Iterator[dict]:
    """Yield collated batches of `names`' `split` for `n_epochs` epochs or `n_examples` examples.

    An example is a preference pair, or a prompt's SFT target when `sft_mode`. The whole data is
    shuffled (with `seed`) at each epoch. With `drop_last` (training), a final partial batch is
    dropped so that every step has `batch_size` examples; evaluation keeps it.
    """
    if n_epochs is None and n_examples is None:
        raise ValueError("get_batch_iterator needs n_epochs or n_examples")
    # Load and check all data now, so that bad data stops the run before any model is loaded.
    flat = flatten_examples(names, split, tokenizer.eos_token, silent=silent, cache_dir=cache_dir)
    return _batches(flat, names, split, tokenizer, batch_size, shuffle, max_length, max_prompt_length, sft_mode,
                    n_epochs, n_examples, seed, drop_last)


def _batches(flat, names, split, tokenizer, batch_size, shuffle, max_length, max_prompt_length, sft_mode,
             n_epochs, n_examples, seed, drop_last) -> Iterator[dict]:
    collate = get_collate_fn(tokenizer)
    rng = random.Random(seed)
    epoch, example_count = 0, 0
    while n_epochs is None or epoch < n_epochs:
        if shuffle:
            rng.shuffle(flat)
        batch, epoch_size = [], 0
        for element in _elements(flat, tokenizer, max_length, max_prompt_length, sft_mode):
            batch.append(element)
            epoch_size += 1
            example_count += 1
            reached = n_examples is not None and example_count >= n_examples
            # Like the reference, training rounds n_examples up to a whole batch.
            if len(batch) == batch_size or (reached and not drop_last):
                yield collate(batch)
                batch = []
                if reached:
                    return
        if batch and not drop_last:
            yield collate(batch)
        if epoch_size == 0 or (drop_last and epoch_size < batch_size):
            kind = "SFT targets" if sft_mode else "pairs"
            raise DataError(f"datasets {list(names)} ({split}) hold {epoch_size} {kind}, fewer than one batch of "
                            f"{batch_size}; lower batch_size or add data")
        epoch += 1


def _elements(flat: list[tuple], tokenizer, max_length: int, max_prompt_length: int,
              sft_mode: bool) -> Iterator[dict]:
    for prompt, responses, pairs, sft_target, truncation_mode, dataset in flat:
        if sft_mode:
            if not sft_target:
                continue
            element = tokenize_batch_element(prompt, sft_target, sft_target, truncation_mode, tokenizer,
                                             max_length, max_prompt_length)
            element = {k: v for k, v in element.items() if "rejected" not in k}
            yield {**element, "dataset": dataset}
        else:
            for chosen, rejected in pairs:
                element = tokenize_batch_element(prompt, responses[chosen], responses[rejected], truncation_mode,
                                                 tokenizer, max_length, max_prompt_length)
                yield {**element, "dataset": dataset}
