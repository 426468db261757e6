"""Batching: tokenization, truncation, collation and the batch iterator, against the reference semantics.

The reference is eric-mitchell/direct-preference-optimization, preference_datasets.py. This file
re-implements its `tokenize_batch_element`, `get_collate_fn` and the batch-counting logic of
`get_batch_iterator` independently and compares dpo.batching with them.
"""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch.nn.utils.rnn import pad_sequence

import fixtures as fx
from dpo.batching import Example, flatten_examples, get_batch_iterator, get_collate_fn, tokenize_batch_element
from dpo.data import get_dataset
from dpo.data.tokens import check_tokens, emits_unknown_token
from dpo.errors import DataError
from dpo.models import build_char_tokenizer

SHARED_TOKENIZERS = Path(__file__).resolve().parents[2] / "shared" / "tokenizers"
GPT2_DIR = SHARED_TOKENIZERS / "gpt2"
NEOX_FILE = SHARED_TOKENIZERS / "gpt-neox-20b" / "tokenizer.json"
EOS_TEXT = "<|endoftext|>"

PAIR_KEYS = {
    "prompt", "chosen", "rejected", "chosen_response_only", "rejected_response_only",
    "chosen_input_ids", "chosen_attention_mask", "chosen_labels",
    "rejected_input_ids", "rejected_attention_mask", "rejected_labels",
    "prompt_input_ids", "prompt_attention_mask",
}
SFT_KEYS = {k for k in PAIR_KEYS if "rejected" not in k}


# ---- tokenizers -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def char_tok():
    return build_char_tokenizer()


def _load_gpt2():
    from transformers import GPT2TokenizerFast

    vocab, merges = str(GPT2_DIR / "vocab.json"), str(GPT2_DIR / "merges.txt")
    try:  # transformers 5 names the arguments vocab/merges; vocab_file/merges_file are silently ignored there
        tokenizer = GPT2TokenizerFast(vocab=vocab, merges=merges)
    except TypeError:
        tokenizer = GPT2TokenizerFast(vocab_file=vocab, merges_file=merges)
    # A wrongly loaded tokenizer (empty vocabulary) would make every comparison vacuous.
    assert tokenizer.eos_token_id == 50256
    assert tokenizer(" world", add_special_tokens=False)["input_ids"] == [995]
    tokenizer.pad_token_id = tokenizer.eos_token_id  # as dpo.models.load_tokenizer does
    return tokenizer


def _load_neox():
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(NEOX_FILE), eos_token=EOS_TEXT)
    assert tokenizer.eos_token_id is not None and len(tokenizer) > 50000
    tokenizer.pad_token_id = tokenizer.eos_token_id
    return tokenizer


@pytest.fixture(scope="module")
def gpt2_tok():
    if not (GPT2_DIR / "vocab.json").exists() or not (GPT2_DIR / "merges.txt").exists():
        pytest.skip(f"GPT-2 tokenizer files not in {GPT2_DIR}")
    return _load_gpt2()


@pytest.fixture(scope="module")
def neox_tok():
    if not NEOX_FILE.exists():
        pytest.skip(f"GPT-NeoX tokenizer not at {NEOX_FILE}")
    return _load_neox()


@pytest.fixture(params=["char", "gpt2", "neox"])
def any_tok(request):
    return request.getfixturevalue({"char": "char_tok", "gpt2": "gpt2_tok", "neox": "neox_tok"}[request.param])


# ---- an independent re-implementation of the reference ----------------------------------------


def reference_tokenize_batch_element(prompt, chosen, rejected, truncation_mode, tokenizer, max_length,
                                     max_prompt_length):
    """The reference's tokenize_batch_element, written out from its description."""
    eos = tokenizer.eos_token_id
    p = tokenizer(prompt, add_special_tokens=False)
    c = tokenizer(chosen, add_special_tokens=False)
    r = tokenizer(rejected, add_special_tokens=False)
    p_ids, p_mask = list(p["input_ids"]), list(p["attention_mask"])
    c_ids, c_mask = list(c["input_ids"]) + [eos], list(c["attention_mask"]) + [1]
    r_ids, r_mask = list(r["input_ids"]) + [eos], list(r["attention_mask"]) + [1]
    for ids in (p_ids, c_ids[:-1], r_ids[:-1]):
        assert eos not in ids

    longer = max(len(c_ids), len(r_ids))
    if len(p_ids) + longer > max_length:
        if truncation_mode == "keep_start":
            p_ids, p_mask = p_ids[:max_prompt_length], p_mask[:max_prompt_length]
        elif truncation_mode == "keep_end":
            p_ids, p_mask = p_ids[-max_prompt_length:], p_mask[-max_prompt_length:]
        else:
            raise ValueError(truncation_mode)
    if len(p_ids) + longer > max_length:
        budget = max_length - max_prompt_length
        c_ids, c_mask, r_ids, r_mask = c_ids[:budget], c_mask[:budget], r_ids[:budget], r_mask[:budget]

    def labels(response_ids):
        full = p_ids + response_ids
        return [-100] * len(p_ids) + full[len(p_ids):]

    return {
        "prompt": prompt,
        "chosen": prompt + chosen,
        "rejected": prompt + rejected,
        "chosen_response_only": chosen,
        "rejected_response_only": rejected,
        "chosen_input_ids": p_ids + c_ids,
        "chosen_attention_mask": p_mask + c_mask,
        "chosen_labels": labels(c_ids),
        "rejected_input_ids": p_ids + r_ids,
        "rejected_attention_mask": p_mask + r_mask,
        "rejected_labels": labels(r_ids),
        "prompt_input_ids": p_ids,
        "prompt_attention_mask": p_mask,
    }


def reference_collate(tokenizer, batch):
    """The reference's collate_fn: pad_sequence, with prompt fields reversed, padded and flipped back."""
    padded = {}
    for k in batch[0]:
        if k.endswith("_input_ids") or k.endswith("_attention_mask") or k.endswith("_labels"):
            if "prompt" in k:
                to_pad = [torch.LongTensor(ex[k][::-1]) for ex in batch]
            else:
                to_pad = [torch.LongTensor(ex[k]) for ex in batch]
            if k.endswith("_input_ids"):
                value = tokenizer.pad_token_id
            elif k.endswith("_labels"):
                value = -100
            else:
                value = 0
            padded[k] = pad_sequence(to_pad, batch_first=True, padding_value=value)
            if "prompt" in k:
                padded[k] = padded[k].flip(dims=[1])
        else:
            padded[k] = [ex[k] for ex in batch]
    return padded


def reference_batch_sizes(n_items, batch_size, n_epochs, n_examples, drop_last):
    """Sizes of the batches the iterator yields for `n_items` examples per epoch.

    drop_last=True is the reference's loop exactly; drop_last=False is the evaluation variant
    described for this library (final partial batch kept, exactly n_examples examples).
    """
    sizes, count, epoch = [], 0, 0
    while n_epochs is None or epoch < n_epochs:
        batch = 0
        for _ in range(n_items):
            batch += 1
            count += 1
            if drop_last:
                if batch == batch_size:
                    sizes.append(batch)
                    batch = 0
                    if n_examples is not None and count >= n_examples:
                        return sizes
            else:
                if batch == batch_size or (n_examples is not None and count >= n_examples):
                    sizes.append(batch)
                    batch = 0
                    if n_examples is not None and count >= n_examples:
                        return sizes
        if batch and not drop_last:
            sizes.append(batch)
        epoch += 1
    return sizes


# ---- random texts -----------------------------------------------------------------------------

_CHAR_ALPHABET = "abcdefghijklmnopqrstuvwxyzABCXYZ0123456789 .,!?'\"-:;()\n\t"
_UNICODE_EXTRA = ["é", "ü", "ß", "日本", "😀", "  ", "\n\n", "Human:", "Assistant:", "ing", "the"]


def random_text(rng: random.Random, max_pieces: int, unicode: bool) -> str:
    pieces = []
    for _ in range(rng.randint(0, max_pieces)):
        if unicode and rng.random() < 0.15:
            pieces.append(rng.choice(_UNICODE_EXTRA))
        else:
            pieces.append(rng.choice(_CHAR_ALPHABET))
    text = "".join(pieces)
    assert EOS_TEXT not in text
    return text


def _compare_many(tokenizer, n_trials: int, unicode: bool, seed: int):
    rng = random.Random(seed)
    n_truncated_prompt = n_truncated_response = 0
    for trial in range(n_trials):
        prompt = random_text(rng, 80, unicode)
        chosen = random_text(rng, 50, unicode)
        rejected = random_text(rng, 50, unicode)
        mode = ("keep_start", "keep_end")[trial % 2]
        max_length = rng.randint(2, 90)
        max_prompt_length = rng.randint(1, max_length - 1)
        expected = reference_tokenize_batch_element(prompt, chosen, rejected, mode, tokenizer, max_length,
                                                    max_prompt_length)
        actual = tokenize_batch_element(prompt, chosen, rejected, mode, tokenizer, max_length, max_prompt_length)
        assert set(actual) == PAIR_KEYS
        assert actual == expected, (trial, prompt, chosen, rejected, mode, max_length, max_prompt_length)
        full_prompt = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        n_truncated_prompt += len(actual["prompt_input_ids"]) < len(full_prompt)
        full_chosen = tokenizer(chosen, add_special_tokens=False)["input_ids"]
        n_truncated_response += len(actual["chosen_input_ids"]) - len(actual["prompt_input_ids"]) < len(full_chosen) + 1
    # The random lengths must exercise both truncation steps, or the comparison proves little.
    assert n_truncated_prompt > n_trials // 10
    assert n_truncated_response > n_trials // 10


# ---- tokenize_batch_element ---------------------------------------------------------------------


def test_tokenize_matches_reference_char_tokenizer(char_tok):
    _compare_many(char_tok, 600, unicode=False, seed=1)


def test_tokenize_matches_reference_gpt2(gpt2_tok):
    _compare_many(gpt2_tok, 400, unicode=True, seed=2)


def test_tokenize_matches_reference_neox(neox_tok):
    _compare_many(neox_tok, 400, unicode=True, seed=3)


@pytest.mark.parametrize("mode", ["keep_start", "keep_end"])
def test_tokenize_hand_worked_char_example(char_tok, mode):
    # One token per character: prompt 10, chosen 4+EOS, rejected 2+EOS; 10 + 5 > 12.
    eos = char_tok.eos_token_id
    ids = lambda text: char_tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    element = tokenize_batch_element("0123456789", "abcd", "xy", mode, char_tok, max_length=12, max_prompt_length=4)
    kept = "0123" if mode == "keep_start" else "6789"
    # The prompt is cut to 4 tokens; 4 + 5 <= 12, so the responses are whole.
    assert element["prompt_input_ids"] == ids(kept)
    assert element["prompt_attention_mask"] == [1] * 4
    assert element["chosen_input_ids"] == ids(kept) + ids("abcd") + [eos]
    assert element["rejected_input_ids"] == ids(kept) + ids("xy") + [eos]
    assert element["chosen_labels"] == [-100] * 4 + ids("abcd") + [eos]
    assert element["rejected_labels"] == [-100] * 4 + ids("xy") + [eos]
    assert element["chosen_attention_mask"] == [1] * 9
    # The texts are never truncated.
    assert element["prompt"] == "0123456789"
    assert element["chosen"] == "0123456789abcd"
    assert element["rejected"] == "0123456789xy"
    assert element["chosen_response_only"] == "abcd"
    assert element["rejected_response_only"] == "xy"


def test_tokenize_no_truncation_when_it_fits(char_tok):
    eos = char_tok.eos_token_id
    ids = lambda text: char_tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    # 10 + 5 == 15: fits exactly, nothing is cut even though the prompt exceeds max_prompt_length.
    element = tokenize_batch_element("0123456789", "abcd", "x", "keep_start", char_tok, 15, 2)
    assert element["prompt_input_ids"] == ids("0123456789")
    assert element["chosen_input_ids"] == ids("0123456789abcd") + [eos]


def test_tokenize_truncates_responses_after_prompt(char_tok):
    ids = lambda text: char_tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    # Prompt 3 (shorter than max_prompt_length 4), responses 20+EOS: 3 + 21 > 10, so responses go to 10 - 4 = 6.
    element = tokenize_batch_element("abc", "A" * 20, "B" * 8, "keep_start", char_tok, 10, 4)
    assert element["prompt_input_ids"] == ids("abc")
    assert element["chosen_input_ids"] == ids("abc") + ids("A" * 6)
    assert element["rejected_input_ids"] == ids("abc") + ids("B" * 6)
    assert element["chosen_labels"] == [-100] * 3 + ids("A" * 6)
    # The EOS is cut with the response, as in the reference.
    assert char_tok.eos_token_id not in element["chosen_input_ids"]


@pytest.mark.parametrize("mode", ["keep_start", "keep_end"])
def test_long_prompt_truncated_to_max_length(any_tok, mode):
    rng = random.Random(7)
    max_length, max_prompt_length = 48, 20
    for _ in range(30):
        prompt = " ".join(random_text(rng, 8, unicode=False) for _ in range(60)) + " end"
        chosen = random_text(rng, 120, unicode=False).strip() or "x"
        rejected = random_text(rng, 120, unicode=False).strip() or "y"
        full_prompt = any_tok(prompt, add_special_tokens=False)["input_ids"]
        assert len(full_prompt) > max_length
        element = tokenize_batch_element(prompt, chosen, rejected, mode, any_tok, max_length, max_prompt_length)
        assert len(element["prompt_input_ids"]) == max_prompt_length
        expected_prompt = full_prompt[:max_prompt_length] if mode == "keep_start" else full_prompt[-max_prompt_length:]
        assert element["prompt_input_ids"] == expected_prompt
        for side, text in (("chosen", chosen), ("rejected", rejected)):
            ids = element[f"{side}_input_ids"]
            assert len(ids) <= max_length
            assert len(element[f"{side}_attention_mask"]) == len(ids)
            assert len(element[f"{side}_labels"]) == len(ids)
            response = ids[max_prompt_length:]
            assert len(response) >= 1
            assert response[0] == any_tok(text, add_special_tokens=False)["input_ids"][0]
            assert element[f"{side}_labels"][max_prompt_length:] == response
            assert all(label == -100 for label in element[f"{side}_labels"][:max_prompt_length])


@pytest.mark.parametrize("field", ["prompt", "chosen", "rejected"])
def test_tokenize_rejects_eos_in_text(char_tok, field):
    texts = {"prompt": "Q: hi", "chosen": " ok", "rejected": " no"}
    texts[field] = texts[field] + EOS_TEXT + " more"
    with pytest.raises(DataError, match=field):
        tokenize_batch_element(texts["prompt"], texts["chosen"], texts["rejected"], "keep_start", char_tok, 64, 32)


def test_tokenize_unknown_truncation_mode(char_tok):
    with pytest.raises(ValueError, match="truncation_mode"):
        tokenize_batch_element("x" * 50, "a", "b", "keep_middle", char_tok, 10, 5)


# ---- collate ----------------------------------------------------------------------------------


def _hand_elements():
    return [
        {"prompt": "p1", "chosen_input_ids": [11, 12, 13], "chosen_attention_mask": [1, 1, 1],
         "chosen_labels": [-100, 12, 13], "prompt_input_ids": [11], "prompt_attention_mask": [1],
         "dataset": "a"},
        {"prompt": "p2", "chosen_input_ids": [21, 22, 23, 24, 25], "chosen_attention_mask": [1, 1, 1, 1, 1],
         "chosen_labels": [-100, -100, -100, 24, 25], "prompt_input_ids": [21, 22, 23],
         "prompt_attention_mask": [1, 1, 1], "dataset": "b"},
        {"prompt": "p3", "chosen_input_ids": [31], "chosen_attention_mask": [1],
         "chosen_labels": [31], "prompt_input_ids": [], "prompt_attention_mask": [], "dataset": "a"},
    ]


def test_collate_padding_sides_and_values():
    collate = get_collate_fn(SimpleNamespace(pad_token_id=7))
    batch = collate(_hand_elements())
    expected = {
        "chosen_input_ids": [[11, 12, 13, 7, 7], [21, 22, 23, 24, 25], [31, 7, 7, 7, 7]],
        "chosen_attention_mask": [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]],
        "chosen_labels": [[-100, 12, 13, -100, -100], [-100, -100, -100, 24, 25], [31, -100, -100, -100, -100]],
        "prompt_input_ids": [[7, 7, 11], [21, 22, 23], [7, 7, 7]],
        "prompt_attention_mask": [[0, 0, 1], [1, 1, 1], [0, 0, 0]],
    }
    for key, value in expected.items():
        assert isinstance(batch[key], torch.Tensor), key
        assert batch[key].dtype == torch.long, key
        assert batch[key].tolist() == value, key
    assert batch["prompt"] == ["p1", "p2", "p3"]
    assert batch["dataset"] == ["a", "b", "a"]
    assert set(batch) == set(_hand_elements()[0])


def test_collate_matches_reference_on_real_elements(any_tok):
    rng = random.Random(11)
    collate = get_collate_fn(any_tok)
    for trial in range(20):
        elements = []
        for _ in range(rng.randint(1, 6)):
            element = tokenize_batch_element(random_text(rng, 40, False), random_text(rng, 30, False),
                                             random_text(rng, 30, False), ("keep_start", "keep_end")[trial % 2],
                                             any_tok, 48, 24)
            elements.append({**element, "dataset": f"d{trial}"})
        actual = collate(elements)
        expected = reference_collate(any_tok, elements)
        assert set(actual) == set(expected) == PAIR_KEYS | {"dataset"}
        for key, value in expected.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(actual[key], value), key
            else:
                assert actual[key] == value, key
        # Unpadding recovers each element: right padding for responses, left for the prompt.
        for row, element in enumerate(elements):
            n = len(element["chosen_input_ids"])
            assert actual["chosen_input_ids"][row, :n].tolist() == element["chosen_input_ids"]
            assert actual["chosen_attention_mask"][row].sum().item() == n
            m = len(element["prompt_input_ids"])
            width = actual["prompt_input_ids"].shape[1]
            assert actual["prompt_input_ids"][row, width - m:].tolist() == element["prompt_input_ids"]
            assert actual["prompt_attention_mask"][row, : width - m].sum().item() == 0


# ---- get_batch_iterator ------------------------------------------------------------------------


def write_pair_dir(root: Path, n_train: int, n_test: int, pairs_per_prompt: int = 1, name: str = "pairs") -> str:
    folder = root / name
    folder.mkdir()
    rows = fx.pair_rows(n_train + n_test, pairs_per_prompt)
    split = n_train * pairs_per_prompt
    fx.write_jsonl(folder / "train.jsonl", rows[:split])
    fx.write_jsonl(folder / "test.jsonl", rows[split:])
    return str(folder)


def collect(iterator):
    return list(iterator)


def n_rows(batch):
    return len(batch["prompt"])


def pair_ids(batches):
    return [(p, c, r) for b in batches for p, c, r in zip(b["prompt"], b["chosen_response_only"],
                                                           b["rejected_response_only"])]


@pytest.mark.parametrize("n_items,batch_size", [(10, 4), (12, 4), (7, 3), (5, 5)])
@pytest.mark.parametrize("n_epochs,n_examples", [(1, None), (3, None), (None, 1), (None, 5), (None, 9),
                                                 (None, 23), (2, 100), (1, 6)])
@pytest.mark.parametrize("drop_last", [True, False])
def test_batch_counts_match_reference(tmp_path, char_tok, n_items, batch_size, n_epochs, n_examples, drop_last):
    path = write_pair_dir(tmp_path, n_items, 2)
    batches = collect(get_batch_iterator([path], char_tok, split="train", batch_size=batch_size, n_epochs=n_epochs,
                                         n_examples=n_examples, seed=0, silent=True, drop_last=drop_last,
                                         max_length=64, max_prompt_length=32))
    assert [n_rows(b) for b in batches] == reference_batch_sizes(n_items, batch_size, n_epochs, n_examples, drop_last)


def test_batch_counts_hand_worked(tmp_path, char_tok):
    path = write_pair_dir(tmp_path, 10, 3)

    def sizes(**kwargs):
        kwargs = {"split": "train", "batch_size": 4, "seed": 0, "silent": True, **kwargs}
        return [n_rows(b) for b in get_batch_iterator([path], char_tok, **kwargs)]

    # Training: partial batches dropped in every epoch.
    assert sizes(n_epochs=1) == [4, 4]
    assert sizes(n_epochs=3) == [4, 4] * 3
    # Training: stop at the first full batch at or after n_examples.
    assert sizes(n_examples=5) == [4, 4]
    assert sizes(n_examples=8) == [4, 4]
    # The 2 dropped examples of epoch 1 count, as in the reference: 10 >= 9 only after a yield in epoch 2.
    assert sizes(n_examples=9) == [4, 4, 4]
    # Evaluation: final partial batch kept; exactly n_examples; n_epochs=1 never repeats.
    assert sizes(n_epochs=1, drop_last=False) == [4, 4, 2]
    assert sizes(n_epochs=1, n_examples=6, drop_last=False) == [4, 2]
    assert sizes(n_epochs=1, n_examples=25, drop_last=False) == [4, 4, 2]
    assert sizes(n_examples=25, drop_last=False) == [4, 4, 2, 4, 4, 2, 4, 1]
    assert sizes(split="test", n_epochs=1, batch_size=2, drop_last=False) == [2, 1]


def test_eval_single_epoch_has_no_repetition(tmp_path, char_tok):
    path = write_pair_dir(tmp_path, 3, 13)
    batches = collect(get_batch_iterator([path], char_tok, split="test", batch_size=4, n_epochs=1, n_examples=100,
                                         silent=True, drop_last=False, shuffle=True, seed=5))
    pairs = pair_ids(batches)
    assert len(pairs) == 13 and len(set(pairs)) == 13
    batches = collect(get_batch_iterator([path], char_tok, split="test", batch_size=4, n_epochs=1, n_examples=10,
                                         silent=True, drop_last=False, shuffle=True, seed=5))
    assert [n_rows(b) for b in batches] == [4, 4, 2]
    assert len(set(pair_ids(batches))) == 10


def test_one_element_per_pair_and_each_epoch_is_a_permutation(tmp_path, char_tok):
    path = write_pair_dir(tmp_path, 6, 2, pairs_per_prompt=3)  # 18 train pairs over 6 prompts
    data = get_dataset(path, "train", silent=True)
    expected = Counter((prompt, ex["responses"][c], ex["responses"][r]) for prompt, ex in data.items()
                       for c, r in ex["pairs"])
    assert sum(expected.values()) == 18
    batches = collect(get_batch_iterator([path], char_tok, split="train", batch_size=6, n_epochs=2, seed=3,
                                         silent=True))
    assert len(batches) == 6
    epoch1, epoch2 = pair_ids(batches[:3]), pair_ids(batches[3:])
    assert Counter(epoch1) == expected
    assert Counter(epoch2) == expected
    # The order differs from one epoch to the next.
    assert epoch1 != epoch2
    for batch in batches:
        assert set(batch) == PAIR_KEYS | {"dataset"}
        assert batch["dataset"] == [path] * 6
        assert batch["chosen"] == [p + c for p, c in zip(batch["prompt"], batch["chosen_response_only"])]
        assert batch["rejected"] == [p + r for p, r in zip(batch["prompt"], batch["rejected_response_only"])]


def test_batches_equal_collated_elements(tmp_path, char_tok):
    """Each batch is exactly the collation of tokenize_batch_element of its pairs (+ dataset)."""
    path = write_pair_dir(tmp_path, 9, 2)
    collate = get_collate_fn(char_tok)
    batches = collect(get_batch_iterator([path], char_tok, split="train", batch_size=3, n_epochs=1, seed=1,
                                         silent=True, max_length=20, max_prompt_length=8))
    assert len(batches) == 3
    for batch in batches:
        elements = [{**reference_tokenize_batch_element(p, c, r, "keep_start", char_tok, 20, 8), "dataset": path}
                    for p, c, r in zip(batch["prompt"], batch["chosen_response_only"], batch["rejected_response_only"])]
        expected = reference_collate(char_tok, elements)
        for key, value in expected.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(batch[key], value), key
            else:
                assert batch[key] == value, key
        assert collate(elements).keys() == batch.keys()


def _order(path, tok, seed, shuffle=True, **kwargs):
    kwargs = {"split": "train", "batch_size": 5, "n_epochs": 2, "silent": True, **kwargs}
    return pair_ids(get_batch_iterator([path], tok, seed=seed, shuffle=shuffle, **kwargs))


def test_shuffle_deterministic_for_seed(tmp_path, char_tok):
    path = write_pair_dir(tmp_path, 30, 2)
    first = _order(path, char_tok, seed=0)
    assert first == _order(path, char_tok, seed=0)
    assert first != _order(path, char_tok, seed=1)
    # The same multiset either way, and a real shuffle: not the file order.
    assert Counter(first) == Counter(_order(path, char_tok, seed=1))
    unshuffled = _order(path, char_tok, seed=0, shuffle=False)
    assert unshuffled[:30] == unshuffled[30:]
    assert first[:30] != unshuffled[:30]
    assert first[:30] != first[30:]


def test_toy_dataset_iterator(char_tok):
    # 256 test prompts with 2 pairs each: 16 full batches of 32.
    batches = collect(get_batch_iterator(["toy"], char_tok, split="test", batch_size=32, n_epochs=1, silent=True,
                                         max_length=64, max_prompt_length=48))
    assert [n_rows(b) for b in batches] == [32] * 16
    assert len(set(pair_ids(batches))) == 512
    assert all(b["dataset"] == ["toy"] * 32 for b in batches)
    # The toy prompts fit: nothing is truncated and every response ends with EOS.
    eos = char_tok.eos_token_id
    for batch in batches:
        for row, (prompt, chosen) in enumerate(zip(batch["prompt"], batch["chosen_response_only"])):
            n = int(batch["chosen_attention_mask"][row].sum())
            assert n == len(prompt) + len(chosen) + 1
            assert batch["chosen_input_ids"][row, n - 1].item() == eos
    # Evaluation variant with n_examples not a multiple of the batch size.
    batches = collect(get_batch_iterator(["toy"], char_tok, split="test", batch_size=32, n_epochs=1, n_examples=70,
                                         silent=True, drop_last=False))
    assert [n_rows(b) for b in batches] == [32, 32, 6]


def test_sft_mode_keys_and_targets(tmp_path, char_tok):
    path = write_pair_dir(tmp_path, 8, 2, pairs_per_prompt=2)  # 8 prompts, 16 pairs
    data = get_dataset(path, "train", silent=True)
    batches = collect(get_batch_iterator([path], char_tok, split="train", batch_size=4, n_epochs=1, sft_mode=True,
                                         silent=True, seed=2))
    # One element per prompt, not per pair.
    assert [n_rows(b) for b in batches] == [4, 4]
    seen = []
    for batch in batches:
        assert set(batch) == SFT_KEYS | {"dataset"}
        assert not any("rejected" in key for key in batch)
        for row, prompt in enumerate(batch["prompt"]):
            target = data[prompt]["sft_target"]
            assert batch["chosen_response_only"][row] == target
            assert batch["chosen"][row] == prompt + target
            ids = char_tok(prompt + target, add_special_tokens=False)["input_ids"] + [char_tok.eos_token_id]
            assert batch["chosen_input_ids"][row, : len(ids)].tolist() == ids
            labels = batch["chosen_labels"][row].tolist()
            assert labels[: len(prompt)] == [-100] * len(prompt)
            assert labels[len(prompt): len(ids)] == ids[len(prompt):]
            seen.append(prompt)
    assert sorted(seen) == sorted(data)


def test_sft_mode_toy(char_tok):
    batches = collect(get_batch_iterator(["toy"], char_tok, split="test", batch_size=64, n_epochs=1, sft_mode=True,
                                         silent=True))
    assert [n_rows(b) for b in batches] == [64] * 4
    assert all(set(b) == SFT_KEYS | {"dataset"} for b in batches)


def test_multiple_datasets_tagged(tmp_path, char_tok):
    a = write_pair_dir(tmp_path, 4, 1, name="a")
    b = write_pair_dir(tmp_path, 6, 1, name="b")
    batches = collect(get_batch_iterator([a, b], char_tok, split="train", batch_size=5, n_epochs=1, silent=True))
    assert [n_rows(x) for x in batches] == [5, 5]
    assert Counter(d for x in batches for d in x["dataset"]) == {a: 4, b: 6}


def test_single_file_dataset_by_path(tmp_path, char_tok):
    path = fx.write_jsonl(tmp_path / "prefs.jsonl", fx.pair_rows(40))
    train = pair_ids(get_batch_iterator([str(path)], char_tok, split="train", batch_size=1, n_epochs=1,
                                        silent=True))
    test = pair_ids(get_batch_iterator([str(path)], char_tok, split="test", batch_size=1, n_epochs=1, silent=True,
                                       drop_last=False))
    # ceil(5% of 40) = 2 prompts held out; the splits share no prompt.
    assert len(train) == 38 and len(test) == 2
    assert not {p for p, _, _ in train} & {p for p, _, _ in test}


def test_data_loaded_eagerly(tmp_path, char_tok):
    path = write_pair_dir(tmp_path, 6, 2)
    iterator = get_batch_iterator([path], char_tok, split="train", batch_size=3, n_epochs=1, silent=True)
    for file in Path(path).iterdir():
        file.unlink()
    Path(path).rmdir()
    assert [n_rows(b) for b in iterator] == [3, 3]


def test_missing_dataset_fails_at_creation(tmp_path, char_tok):
    with pytest.raises(DataError):
        get_batch_iterator([str(tmp_path / "nowhere.jsonl")], char_tok, split="train", batch_size=2, n_epochs=1,
                           silent=True)


@pytest.mark.parametrize("field", ["prompt", "chosen", "rejected"])
def test_eos_text_in_data_fails_at_creation(tmp_path, char_tok, field):
    folder = tmp_path / "eosdata"
    folder.mkdir()
    rows = fx.pair_rows(6)
    bad = dict(rows[4])
    bad[field] = bad[field] + " and then " + EOS_TEXT + " more"
    rows[4] = bad
    fx.write_jsonl(folder / "train.jsonl", rows[:2])
    fx.write_jsonl(folder / "test.jsonl", rows[2:])
    # The train split is clean.
    get_batch_iterator([str(folder)], char_tok, split="train", batch_size=1, n_epochs=1, silent=True)
    # The error comes from the call itself, before any batch is asked for.
    with pytest.raises(DataError) as error:
        get_batch_iterator([str(folder)], char_tok, split="test", batch_size=1, n_epochs=1, silent=True)
    message = str(error.value)
    assert str(folder) in message
    assert "test" in message
    assert bad["prompt"][:20] in message
    assert EOS_TEXT in message


def test_eos_text_of_other_tokenizer(tmp_path, gpt2_tok):
    """The check uses the tokenizer's own EOS text (GPT-2's is also <|endoftext|>)."""
    folder = tmp_path / "eos2"
    folder.mkdir()
    rows = fx.pair_rows(4)
    rows[0] = {**rows[0], "prompt": EOS_TEXT + rows[0]["prompt"]}
    fx.write_jsonl(folder / "train.jsonl", rows)
    fx.write_jsonl(folder / "test.jsonl", rows[1:])
    with pytest.raises(DataError, match="train"):
        get_batch_iterator([str(folder)], gpt2_tok, split="train", batch_size=1, n_epochs=1, silent=True)


def test_dataset_smaller_than_batch(tmp_path, char_tok):
    path = write_pair_dir(tmp_path, 3, 2)
    with pytest.raises(DataError, match="lower batch_size"):
        collect(get_batch_iterator([path], char_tok, split="train", batch_size=4, n_epochs=1, silent=True))
    with pytest.raises(DataError, match="lower batch_size"):
        collect(get_batch_iterator([path], char_tok, split="train", batch_size=4, n_examples=100, silent=True))
    # Evaluation keeps the partial batch instead.
    batches = collect(get_batch_iterator([path], char_tok, split="train", batch_size=4, n_epochs=1, silent=True,
                                         drop_last=False))
    assert [n_rows(b) for b in batches] == [3]


def test_needs_epochs_or_examples(tmp_path, char_tok):
    path = write_pair_dir(tmp_path, 3, 2)
    with pytest.raises(ValueError):
        get_batch_iterator([path], char_tok, split="train", batch_size=1, silent=True)


def test_iterator_truncates_long_prompts(tmp_path, any_tok):
    folder = tmp_path / "long"
    folder.mkdir()
    rows = [{"prompt": f"Story {i}: " + "once upon a time there was a very long prompt " * 12,
             "chosen": f" Chosen answer {i} " + "with plenty of words " * 8,
             "rejected": f" Rejected {i}."} for i in range(6)]
    fx.write_jsonl(folder / "train.jsonl", rows)
    fx.write_jsonl(folder / "test.jsonl", rows[:2])
    max_length, max_prompt_length = 40, 16
    batches = collect(get_batch_iterator([str(folder)], any_tok, split="train", batch_size=3, n_epochs=1,
                                         silent=True, max_length=max_length, max_prompt_length=max_prompt_length))
    assert len(batches) == 2
    for batch in batches:
        assert batch["prompt_input_ids"].shape[1] == max_prompt_length
        for side in ("chosen", "rejected"):
            assert batch[f"{side}_input_ids"].shape[1] <= max_length
            mask = batch[f"{side}_attention_mask"]
            labels = batch[f"{side}_labels"]
            for row in range(3):
                assert int(mask[row].sum()) <= max_length
                n_response = int((labels[row] != -100).sum())
                assert n_response >= 1
                response = batch[f"{side}_response_only"][row]
                first = any_tok(response, add_special_tokens=False)["input_ids"][0]
                assert labels[row, max_prompt_length].item() == first
                # keep_start: the prompt keeps its first tokens.
                full_prompt = any_tok(batch["prompt"][row], add_special_tokens=False)["input_ids"]
                assert batch["prompt_input_ids"][row].tolist() == full_prompt[:max_prompt_length]


def test_hh_transcripts_keep_prompt_end(tmp_path, char_tok):
    folder = tmp_path / "hh"
    folder.mkdir()
    fx.write_jsonl(folder / "train.jsonl", fx.HH_ROWS[:4])
    fx.write_jsonl(folder / "test.jsonl", fx.HH_ROWS[:2])
    max_length, max_prompt_length = 48, 20
    batches = collect(get_batch_iterator([str(folder)], char_tok, split="train", batch_size=1, n_epochs=1,
                                         shuffle=False, silent=True, max_length=max_length,
                                         max_prompt_length=max_prompt_length))
    assert len(batches) >= 3
    n_longer = 0
    for batch in batches:
        prompt = batch["prompt"][0]
        full = char_tok(prompt, add_special_tokens=False)["input_ids"]
        n_longer += len(full) > max_length
        # Every pair here is too long as a whole, so every prompt is cut to its end.
        assert len(full) + len(batch["chosen_response_only"][0]) + 1 > max_length
        assert batch["prompt_input_ids"][0].tolist() == full[-max_prompt_length:]
        assert batch["prompt_input_ids"][0].tolist() == char_tok(prompt[-max_prompt_length:],
                                                                   add_special_tokens=False)["input_ids"]
        assert batch["chosen_input_ids"].shape[1] <= max_length
    assert n_longer >= 1


def test_examples_carry_the_truncation_mode_of_their_format(tmp_path, char_tok):
    hh = tmp_path / "hh"
    hh.mkdir()
    fx.write_jsonl(hh / "train.jsonl", fx.HH_ROWS[:2])
    fx.write_jsonl(hh / "test.jsonl", fx.HH_ROWS[:1])
    pairs = write_pair_dir(tmp_path, 2, 1)
    examples = flatten_examples([str(hh), pairs, "toy"], "test", char_tok, silent=True)
    assert all(isinstance(example, Example) for example in examples)
    modes = Counter((example.dataset, example.truncation_mode) for example in examples)
    assert modes == {(str(hh), "keep_end"): 1, (pairs, "keep_start"): 1, ("toy", "keep_start"): 256}
    egg = examples[0]
    assert (egg.prompt, egg.responses, egg.pairs) == (fx.EGG_PROMPT, fx.HH_EXPECTED[fx.EGG_PROMPT]["responses"][:2],
                                                      [(0, 1)])


def test_empty_prompts_stop_the_iterator_with_the_reason(tmp_path, char_tok):
    folder = tmp_path / "empty_prompts"
    folder.mkdir()
    rows = [{**row, "prompt": ""} for row in fx.pair_rows(5)]
    fx.write_jsonl(folder / "train.jsonl", rows[:3])
    fx.write_jsonl(folder / "test.jsonl", rows[3:])
    with pytest.raises(DataError) as error:
        get_batch_iterator([str(folder)], char_tok, split="test", batch_size=1, n_epochs=1, silent=True)
    assert str(error.value) == (
        f"dataset {folder} (test) has no usable examples after skipping bad rows (skipped pairs with an empty prompt: "
        "2); fix those rows (see the README's Data rules) or choose another dataset"
    )


# ---- text the tokenizer does not cover ------------------------------------------------------------

# English questions with Hebrew answers of equal length: the char tokenizer reads both as " <unk>x4".
HEBREW_ROWS = [
    {"prompt": f"\n\nHuman: How do you say '{word}' in Hebrew?\n\nAssistant:", "chosen": f" {right}",
     "rejected": f" {wrong}"}
    for word, right, wrong in (("peace", "שלום", "אהבה"), ("love", "אהבה", "שלום"),
                               ("sun", "שמש", "ירח"))
]
PRINTABLE = {chr(code) for code in range(32, 127)} | {"\n", "\t"}


def char_unknown_share(rows) -> float:
    """The char tokenizer's unknown share of one-pair-per-prompt rows: prompt, both responses, SFT target (= chosen)."""
    texts = [text for row in rows for text in (row["prompt"], row["chosen"], row["rejected"], row["chosen"])]
    return sum(ch not in PRINTABLE for text in texts for ch in text) / sum(len(text) for text in texts)


def write_split_dir(folder: Path, train_rows, test_rows) -> str:
    folder.mkdir()
    fx.write_jsonl(folder / "train.jsonl.gz", train_rows)
    fx.write_jsonl(folder / "test.jsonl", test_rows)
    return str(folder)


def test_only_tokenizers_with_an_unknown_token_are_checked(char_tok, gpt2_tok, neox_tok):
    assert emits_unknown_token(char_tok)
    assert not emits_unknown_token(gpt2_tok) and not emits_unknown_token(neox_tok)


def test_data_is_tokenized_only_when_one_of_its_characters_is_unknown(char_tok):
    ascii_data = {"Q: hi": {"responses": [" a", " b"], "pairs": [(0, 1)], "sft_target": " a"}}
    assert check_tokens(char_tok, ascii_data) is None
    # A carriage return is ASCII, yet not in the char tokenizer's vocabulary.
    windows_data = {"Q: hi\r\n": {"responses": [" a\r", " b\r"], "pairs": [(0, 1)], "sft_target": " a\r"}}
    check = check_tokens(char_tok, windows_data)
    assert (check.n_unknown, check.n_tokens) == (1 + 1 + 1 + 1, 7 + 3 + 3 + 3)  # prompt, pair, SFT target
    assert not check.same_tokens(" a\r", " b\r")


def test_pairs_the_tokenizer_cannot_tell_apart_are_skipped_with_one_warning(tmp_path, char_tok, capsys):
    train_rows = fx.pair_rows(4) + HEBREW_ROWS
    path = write_split_dir(tmp_path / "hebrew", train_rows, fx.pair_rows(2))
    batches = collect(get_batch_iterator([path], char_tok, split="train", batch_size=2, n_epochs=1))
    assert sorted(pair_ids(batches)) == sorted((row["prompt"], row["chosen"], row["rejected"])
                                               for row in fx.pair_rows(4))
    share = char_unknown_share(train_rows)
    assert 0.05 < share < 0.5
    assert capsys.readouterr().out == (
        f"dataset {path}: train <- train.jsonl.gz; test <- test.jsonl\n"
        f"warning: {share:.1%} of the tokens of dataset {path} (train) are the unknown token <|unk|> of tokenizer "
        "char: the model can neither read nor write that text, and pairs whose responses differ only there are "
        "skipped; use a tokenizer that covers the text, e.g. model.tokenizer_name_or_path=EleutherAI/gpt-neox-20b\n"
        f"dataset {path} (train): kept 4 pairs over 7 prompts; skipped pairs with chosen == rejected once "
        "tokenized: 3\n"
    )


@pytest.mark.parametrize("tokenizer", ["gpt2_tok", "neox_tok"])
def test_byte_level_tokenizers_keep_every_pair(tmp_path, capsys, request, tokenizer):
    tokenizer = request.getfixturevalue(tokenizer)
    path = write_split_dir(tmp_path / "hebrew", fx.pair_rows(4) + HEBREW_ROWS, fx.pair_rows(2))
    batches = collect(get_batch_iterator([path], tokenizer, split="train", batch_size=7, n_epochs=1))
    assert len(pair_ids(batches)) == 7
    assert capsys.readouterr().out == f"dataset {path}: train <- train.jsonl.gz; test <- test.jsonl\n"


def test_a_few_unknown_tokens_are_no_warning(tmp_path, char_tok, capsys):
    rows = fx.pair_rows(6)
    rows[0] = {**rows[0], "chosen": " 0, café."}
    path = write_split_dir(tmp_path / "cafe", rows, rows[:2])
    assert 0 < char_unknown_share(rows) < 0.01
    get_batch_iterator([path], char_tok, split="train", batch_size=2, n_epochs=1, silent=True)
    assert capsys.readouterr().out == ""


def test_no_pair_left_after_tokenizing_stops_a_preference_run(tmp_path, char_tok, capsys):
    path = write_split_dir(tmp_path / "hebrew", HEBREW_ROWS, HEBREW_ROWS[:1])
    with pytest.raises(DataError) as error:
        get_batch_iterator([path], char_tok, split="train", batch_size=1, n_epochs=1, silent=True)
    assert str(error.value) == (
        f"dataset {path} (train) has no usable preference pairs (skipped pairs with chosen == rejected once "
        "tokenized: 3); fix the data, or train with loss=sft"
    )
    # The warning is printed even when silent: the run would otherwise learn nothing without a word.
    share = char_unknown_share(HEBREW_ROWS)
    assert capsys.readouterr().out == (
        f"warning: {share:.1%} of the tokens of dataset {path} (train) are the unknown token <|unk|> of tokenizer "
        "char: the model can neither read nor write that text, and pairs whose responses differ only there are "
        "skipped; use a tokenizer that covers the text, e.g. model.tokenizer_name_or_path=EleutherAI/gpt-neox-20b\n"
    )
    # SFT has targets to learn, unknown tokens and all (the warning said so).
    batches = collect(get_batch_iterator([path], char_tok, split="train", batch_size=3, n_epochs=1, sft_mode=True,
                                         silent=True))
    assert [n_rows(b) for b in batches] == [3]


@pytest.mark.parametrize("sft_mode, n_epochs, n_examples, drop_last", [
    (False, 2, None, True), (True, 1, None, True), (False, None, 100, True), (False, 3, 10_000, True),
    (False, 1, None, False), (True, None, 37, False),
])
def test_the_batch_iterator_knows_how_many_examples_it_yields(sft_mode, n_epochs, n_examples, drop_last):
    from dpo.models import build_char_tokenizer

    batches = get_batch_iterator(["toy"], build_char_tokenizer(), split="test", batch_size=24, sft_mode=sft_mode,
                                 n_epochs=n_epochs, n_examples=n_examples, max_length=64, max_prompt_length=48,
                                 drop_last=drop_last)
    planned = batches.n_examples
    assert planned == sum(len(batch["prompt"]) for batch in batches)
    assert planned > 0
