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
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
from transformers import PreTrainedTokenizerBase

from dpo.data import RENDERED, DatasetEntry, SplitData, dataset_source, describe_skips, load_source
from dpo.data.tokens import vocabulary_problem
from dpo.errors import ConfigError, DataError
from dpo.logps import IGNORE_INDEX


def tokenize_batch_element(prompt: str, chosen: str, rejected: str, truncation_mode: str,
                           tokenizer: PreTrainedTokenizerBase, max_length: int, max_prompt_length: int,
                           eos_allowed: bool = False) -> dict:
    """Tokenize one (prompt, chosen, rejected) triple into a batch element (lists, not tensors).

    Text holding the EOS token is refused unless `eos_allowed` (text a chat template wrote).
    """
    prompt_tokens = tokenizer(prompt, add_special_tokens=False)
    chosen_tokens = tokenizer(chosen, add_special_tokens=False)
    rejected_tokens = tokenizer(rejected, add_special_tokens=False)
    for label, tokens in (("prompt", prompt_tokens), ("chosen", chosen_tokens), ("rejected", rejected_tokens)):
        if tokenizer.eos_token_id in tokens["input_ids"] and not eos_allowed:
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


class TruncatedTies:
    """Which pairs `tokenize_batch_element` would make identical: chosen and rejected the same ids once truncated.

    Two responses that differ only after their first `max_length - max_prompt_length` tokens are cut
    to the same tokens: such a pair gives no gradient and counts as wrong in reward accuracy. Only
    pairs whose texts share a long enough start are tokenized to find out: the first B tokens cover
    at least B bytes, so at least B/4 characters, of each response. Characters the tokenizer does not
    know all become its one unknown token, so they count as one character here.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, max_length: int, max_prompt_length: int) -> None:
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.max_prompt_length = max_prompt_length
        self.shortest_shared_start = max(0, (max_length - max_prompt_length) // 4 - 1)

    def __call__(self, truncation_mode: str, unknown_characters: frozenset):
        unknown = {ord(character): "\0" for character in unknown_characters}

        def same_once_truncated(prompt: str, chosen: str, rejected: str) -> bool:
            if unknown:
                chosen_start, rejected_start = chosen.translate(unknown), rejected.translate(unknown)
            else:
                chosen_start, rejected_start = chosen, rejected
            if shared_start(chosen_start, rejected_start) < self.shortest_shared_start:
                return False
            element = tokenize_batch_element(prompt, chosen, rejected, truncation_mode, self.tokenizer,
                                             self.max_length, self.max_prompt_length, eos_allowed=True)
            return element["chosen_labels"] == element["rejected_labels"]

        return same_once_truncated


def shared_start(first: str, second: str) -> int:
    """How many characters `first` and `second` share at their start."""
    n = 0
    for a, b in zip(first, second):
        if a != b:
            break
        n += 1
    return n


@dataclass(frozen=True)
class Example:
    """One prompt of one dataset, with all that batching needs to tokenize its pairs or its SFT target."""

    prompt: str
    responses: list[str]
    pairs: list[tuple[int, int]]
    sft_target: str
    truncation_mode: str
    dataset: str
    eos_allowed: bool = False  # a chat template wrote the texts, and may have ended turns with EOS


@dataclass(frozen=True)
class BatchPlan:
    """How examples become batches: `get_batch_iterator`'s settings of size, order, length and count."""

    batch_size: int
    shuffle: bool
    max_length: int
    max_prompt_length: int
    sft_mode: bool
    n_epochs: Optional[int]
    n_examples: Optional[int]
    seed: int
    drop_last: bool
    start_batch: int = 0  # batches to pass over untokenized: a resumed run continues where it stopped
    dp_rank: int = 0  # this process reads slice dp_rank of dp_size of every batch
    dp_size: int = 1


def flatten_examples(names: list[DatasetEntry], split: str, tokenizer: PreTrainedTokenizerBase,
                     sft_mode: bool = False, silent: bool = False, cache_dir: Optional[str] = None,
                     max_length: Optional[int] = None, max_prompt_length: Optional[int] = None) -> list[Example]:
    """All examples of `names`' `split`, checked up front against `tokenizer`.

    `names` are `datasets=[...]` entries: names, paths, mappings or source objects (`dataset_source`);
    each example carries its source's short `name` as its dataset label. The tokenizer's chat template
    renders chat rows. Checking here, before the first step, stops a bad run at once rather than hours
    in: a tokenizer with no vocabulary, the EOS text in the data, pairs the tokenizer cannot tell apart
    (with `max_length` and `max_prompt_length`, also once truncated), and a preference loss with no pairs.
    """
    problem = vocabulary_problem(tokenizer)
    if problem is not None:
        raise ConfigError(problem)
    ties = TruncatedTies(tokenizer, max_length, max_prompt_length) if max_length and max_prompt_length else None
    examples = []
    for entry in names:
        source = dataset_source(entry, tokenizer)
        loaded = load_source(source, split, silent=silent, cache_dir=cache_dir, tokenizer=tokenizer,
                             truncated_tie=ties)
        if not sft_mode:
            _check_has_pairs(source.name, split, loaded)
        for prompt, example in loaded.data.items():
            rendered = example.get(RENDERED, False)
            if tokenizer.eos_token and not rendered:
                _check_no_eos_text(source.name, split, prompt, example, tokenizer.eos_token)
            examples.append(Example(prompt, example["responses"], example["pairs"], example["sft_target"],
                                    loaded.truncation_mode, source.name, eos_allowed=rendered))
    return examples


def _check_has_pairs(name: str, split: str, loaded: SplitData) -> None:
    if any(example["pairs"] for example in loaded.data.values()):
        return
    why = f"skipped {describe_skips(loaded.skipped)}" if loaded.skipped else "it holds SFT targets only"
    raise DataError(f"dataset {name} ({split}) has no usable preference pairs ({why}); fix the data, or train "
                    "with loss=sft")


def _check_no_eos_text(name: str, split: str, prompt: str, example: dict, eos_text: str) -> None:
    responses = example["responses"]
    texts = [("prompt", prompt)]
    texts += [(label, responses[index]) for chosen, rejected in example["pairs"]
              for label, index in (("chosen response", chosen), ("rejected response", rejected))]
    if example["sft_target"] and example["sft_target"] not in responses:  # usually the chosen response itself
        texts.append(("SFT target", example["sft_target"]))
    for label, text in texts:
        if eos_text in text:
            raise DataError(f"dataset {name} ({split}): the {label} of prompt {_excerpt(prompt)} contains the "
                            f"tokenizer's EOS text {eos_text!r}; remove it from the data (EOS is appended automatically)")


def get_batch_iterator(names: list[DatasetEntry], tokenizer: PreTrainedTokenizerBase, split: str = "train",
                       batch_size: int = 1, shuffle: bool = True, max_length: int = 512,
                       max_prompt_length: int = 128, sft_mode: bool = False, n_epochs: Optional[int] = None,
                       n_examples: Optional[int] = None, seed: int = 0, silent: bool = False,
                       cache_dir: Optional[str] = None, drop_last: bool = True, start_batch: int = 0,
                       dp_rank: int = 0, dp_size: int = 1) -> Iterator[dict]:
    """Yield collated batches of `names`' `split` for `n_epochs` epochs or `n_examples` examples.

    An example is a preference pair, or a prompt's SFT target when `sft_mode`. The whole data is
    shuffled (with `seed`) at each epoch. With `drop_last` (training), a final partial batch is
    dropped so that every step has `batch_size` examples; evaluation keeps it.

    `batch_size` is the global batch. With `dp_size` > 1 each process gets its own contiguous
    slice, `dp_rank` of `dp_size`, of every batch; a batch that does not divide evenly (evaluation's
    last) is filled up by repeating its last example, marked in the batch's `is_padding` list.
    `start_batch` skips that many batches without tokenizing them, so that a resumed run reads
    exactly the batches the interrupted one would have read next.
    """
    if n_epochs is None and n_examples is None:
        raise ValueError("get_batch_iterator needs n_epochs or n_examples")
    # Load and check all data now, so that bad data stops the run before any model is loaded.
    examples = flatten_examples(names, split, tokenizer, sft_mode=sft_mode, silent=silent, cache_dir=cache_dir,
                                max_length=max_length, max_prompt_length=max_prompt_length)
    plan = BatchPlan(batch_size, shuffle, max_length, max_prompt_length, sft_mode, n_epochs, n_examples, seed,
                     drop_last, start_batch, dp_rank, dp_size)
    labels = list(dict.fromkeys(example.dataset for example in examples))
    return BatchIterator(_batches(examples, tokenizer, plan, f"datasets {labels} ({split})"),
                         planned_examples(examples, plan))


class BatchIterator:
    """The batches of `get_batch_iterator`, which also know how many examples they hold in all
    (`n_examples`), so that a progress bar can show the end."""

    def __init__(self, batches: Iterator[dict], n_examples: int):
        self._batches = batches
        self.n_examples = n_examples

    def __iter__(self) -> "BatchIterator":
        return self

    def __next__(self) -> dict:
        return next(self._batches)


def planned_examples(examples: list[Example], plan: BatchPlan) -> int:
    """How many examples `_batches` yields under `plan`, counted without tokenizing."""
    per_epoch = sum(bool(example.sft_target) if plan.sft_mode else len(example.pairs) for example in examples)
    if plan.drop_last:
        per_epoch -= per_epoch % plan.batch_size
    if plan.n_examples is None:
        return per_epoch * plan.n_epochs
    wanted = plan.n_examples
    if plan.drop_last:  # training rounds n_examples up to a whole batch
        wanted = -(-wanted // plan.batch_size) * plan.batch_size
    return wanted if plan.n_epochs is None else min(wanted, per_epoch * plan.n_epochs)


# One example of a batch before tokenization: an Example with the texts of its chosen and rejected response.
_Item = tuple[Example, str, str]


def _batches(examples: list[Example], tokenizer, plan: BatchPlan, label: str) -> Iterator[dict]:
    collate = get_collate_fn(tokenizer)
    for index, items in enumerate(_global_batches(examples, plan, label)):
        if index >= plan.start_batch:
            yield collate(_local_elements(items, tokenizer, plan))


def _global_batches(examples: list[Example], plan: BatchPlan, label: str) -> Iterator[list[_Item]]:
    """The untokenized global batches, in order: cheap to pass over when resuming."""
    rng = random.Random(plan.seed)
    epoch, example_count = 0, 0
    while plan.n_epochs is None or epoch < plan.n_epochs:
        if plan.shuffle:
            rng.shuffle(examples)
        batch, epoch_size = [], 0
        for item in _items(examples, plan.sft_mode):
            batch.append(item)
            epoch_size += 1
            example_count += 1
            reached = plan.n_examples is not None and example_count >= plan.n_examples
            # Like the reference, training rounds n_examples up to a whole batch.
            if len(batch) == plan.batch_size or (reached and not plan.drop_last):
                yield batch
                batch = []
                if reached:
                    return
        if batch and not plan.drop_last:
            yield batch
        if epoch_size == 0 or (plan.drop_last and epoch_size < plan.batch_size):
            kind = "SFT targets" if plan.sft_mode else "pairs"
            raise DataError(f"{label} hold {epoch_size} {kind}, fewer than one batch of {plan.batch_size}; "
                            "lower batch_size or add data")
        epoch += 1


def _items(examples: list[Example], sft_mode: bool) -> Iterator[_Item]:
    for example in examples:
        if sft_mode:
            if example.sft_target:
                yield example, example.sft_target, example.sft_target
        else:
            for chosen, rejected in example.pairs:
                yield example, example.responses[chosen], example.responses[rejected]


def _local_elements(items: list[_Item], tokenizer, plan: BatchPlan) -> list[dict]:
    """Tokenized batch elements of this process's slice of `items` (all of them in one process)."""
    padding = [False] * len(items)
    if plan.dp_size > 1:
        per_rank = -(-len(items) // plan.dp_size)
        missing = per_rank * plan.dp_size - len(items)
        items, padding = items + items[-1:] * missing, padding + [True] * missing
        start = plan.dp_rank * per_rank
        items, padding = items[start:start + per_rank], padding[start:start + per_rank]
    elements = []
    for (example, chosen, rejected), is_padding in zip(items, padding):
        element = tokenize_batch_element(example.prompt, chosen, rejected, example.truncation_mode, tokenizer,
                                         plan.max_length, plan.max_prompt_length, eos_allowed=example.eos_allowed)
        if plan.sft_mode:
            element = {k: v for k, v in element.items() if "rejected" not in k}
        element["dataset"] = example.dataset
        if plan.dp_size > 1:
            element["is_padding"] = is_padding
        elements.append(element)
    return elements
