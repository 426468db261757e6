"""The embedded `toy` word-reversal task, its judge, and the character tokenizer it is trained with."""

from __future__ import annotations

import re

import pytest
from transformers import AutoTokenizer

from dpo.data import dataset_source, get_dataset
from dpo.data.toy import ALPHABET, SPLIT_SIZES, ToyReversal, toy_prompt, toy_words
from dpo.errors import DataError
from dpo.models import build_char_tokenizer

PROMPT_FORMAT = re.compile(r"\A\n\nHuman: reverse ([a-h]{3,5})\n\nAssistant:\Z")
EOS_TEXT = "<|endoftext|>"


@pytest.fixture(scope="module")
def toy():
    return {split: ToyReversal().load(split, silent=True) for split in ("train", "test")}


@pytest.fixture(scope="module")
def char_tok():
    return build_char_tokenizer()


def word_of(prompt: str) -> str:
    match = PROMPT_FORMAT.match(prompt)
    assert match is not None, repr(prompt)
    return match.group(1)


def all_texts(data):
    for prompt, example in data.items():
        yield prompt
        yield from example["responses"]
        yield example["sft_target"]


# ---- the data -----------------------------------------------------------------------------------


def test_deterministic(toy):
    for split in ("train", "test"):
        again = ToyReversal().load(split, silent=True)
        assert again == toy[split]
        assert list(again) == list(toy[split])  # same order too
    assert toy_words() == toy_words()


def test_sizes(toy):
    assert SPLIT_SIZES == {"train": 4096, "test": 256}
    assert len(toy["train"]) == 4096
    assert len(toy["test"]) == 256
    # two pairs per prompt: reversal over copy, reversal over a near miss
    assert sum(len(ex["pairs"]) for ex in toy["train"].values()) == 2 * 4096
    assert sum(len(ex["pairs"]) for ex in toy["test"].values()) == 2 * 256


def test_words_disjoint_distinct_no_palindromes(toy):
    words = {split: [word_of(prompt) for prompt in toy[split]] for split in toy}
    for split, split_words in words.items():
        assert len(set(split_words)) == len(split_words), split
        assert all(word != word[::-1] for word in split_words), split
        assert all(3 <= len(word) <= 5 for word in split_words), split
    assert not set(words["train"]) & set(words["test"])
    assert toy_words() == words


def test_prompts_in_hh_format(toy):
    for split in toy:
        for prompt in toy[split]:
            assert prompt.startswith("\n\nHuman: reverse ")
            assert prompt.endswith("\n\nAssistant:")
            assert PROMPT_FORMAT.match(prompt)
    assert toy_prompt("abc") == "\n\nHuman: reverse abc\n\nAssistant:"


def test_pairs_prefer_reversal_over_copy_and_over_a_near_miss(toy):
    for split in toy:
        for prompt, example in toy[split].items():
            word = word_of(prompt)
            responses = example["responses"]
            assert len(example["pairs"]) == 2, prompt
            (chosen, copy), (chosen_again, near) = example["pairs"]
            assert responses[chosen] == responses[chosen_again] == " " + word[::-1]
            assert responses[copy] == " " + word
            near_miss = responses[near].strip()
            assert len(near_miss) == len(word) and set(near_miss) <= set(ALPHABET)
            assert sum(a != b for a, b in zip(near_miss, word[::-1])) == 1, (word, near_miss)


@pytest.mark.parametrize("split", ["train", "test"])
def test_sft_targets_half_right(toy, split):
    n_right = 0
    for prompt, example in toy[split].items():
        word = word_of(prompt)
        target = example["sft_target"]
        assert target in (" " + word[::-1], " " + word), (prompt, target)
        n_right += target == " " + word[::-1]
    fraction = n_right / len(toy[split])
    assert 0.4 <= fraction <= 0.6, fraction


def test_unknown_split():
    with pytest.raises(DataError, match="train"):
        ToyReversal().load("validation")


def test_passes_get_dataset_unchanged(toy, capsys):
    for split in ("train", "test"):
        data = get_dataset("toy", split)  # not silent: any skipped pair would be reported
        assert data == toy[split]
    assert "skipped" not in capsys.readouterr().out
    source = dataset_source("toy")
    assert isinstance(source, ToyReversal)
    assert source.truncation_mode == "keep_start"


# ---- the judge ----------------------------------------------------------------------------------


def test_judge_scores(toy):
    judge = ToyReversal().judge
    for prompt in list(toy["test"])[:50]:
        word = word_of(prompt)
        assert judge(prompt, " " + word[::-1]) == 1.0
        assert judge(prompt, word[::-1]) == 1.0
        assert judge(prompt, "  " + word[::-1] + " \n") == 1.0
        assert judge(prompt, " " + word) == 0.0
        assert judge(prompt, "") == 0.0
        assert judge(prompt, " ") == 0.0
        assert judge(prompt, " " + word[::-1][:-1]) == 0.0
        assert judge(prompt, " " + word[::-1] + "a") == 0.0
        assert judge(prompt, " " + word[::-1] + " " + word[::-1]) == 0.0
    prompt = toy_prompt("abcd")
    assert judge(prompt, " dcba") == 1.0
    assert judge(prompt, " dbca") == 0.0  # a wrong reversal
    assert judge(prompt, " abcd") == 0.0
    assert isinstance(judge(prompt, " dcba"), float)


def test_judge_mean_of_dataset_responses(toy):
    judge = ToyReversal().judge
    scores = [judge(prompt, example["responses"][c]) for prompt, example in toy["test"].items()
              for c, _ in example["pairs"]]
    assert scores == [1.0] * len(scores)
    scores = [judge(prompt, example["responses"][r]) for prompt, example in toy["test"].items()
              for _, r in example["pairs"]]
    assert scores == [0.0] * len(scores)


@pytest.mark.parametrize("prompt", ["\n\nHuman: What is the capital of France?\n\nAssistant:",
                                    "reverse abc", "", "\n\nHuman: reverse abc\n\nAssistant: cba"])
def test_judge_rejects_non_toy_prompt(prompt):
    with pytest.raises(ValueError, match="toy"):
        ToyReversal().judge(prompt, " cba")


# ---- the character tokenizer on toy data -------------------------------------------------------------


def test_char_tokenizer_round_trips_toy(toy, char_tok):
    unk = char_tok.unk_token_id
    for split in toy:
        texts = sorted(set(all_texts(toy[split])))
        encoded = char_tok(texts, add_special_tokens=False)["input_ids"]
        for text, ids in zip(texts, encoded):
            assert len(ids) == len(text)  # one token per character
            assert unk not in ids
            assert char_tok.decode(ids) == text


def test_char_tokenizer_eos_text(char_tok):
    eos = char_tok.eos_token_id
    assert char_tok.eos_token == EOS_TEXT
    assert char_tok(EOS_TEXT, add_special_tokens=False)["input_ids"] == [eos]
    ids = char_tok("ab" + EOS_TEXT + "c", add_special_tokens=False)["input_ids"]
    assert ids == char_tok("ab", add_special_tokens=False)["input_ids"] + [eos] + \
        char_tok("c", add_special_tokens=False)["input_ids"]
    assert char_tok.pad_token_id is not None and char_tok.pad_token_id != eos
    # No special tokens added by default either: batching relies on add_special_tokens=False anyway.
    assert char_tok("ab")["input_ids"] == char_tok("ab", add_special_tokens=False)["input_ids"]


def test_char_tokenizer_save_and_reload(tmp_path, toy, char_tok):
    char_tok.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert reloaded.eos_token_id == char_tok.eos_token_id
    assert reloaded.pad_token_id == char_tok.pad_token_id
    assert reloaded.unk_token_id == char_tok.unk_token_id
    assert len(reloaded) == len(char_tok)
    texts = sorted(set(all_texts(toy["test"]))) + [EOS_TEXT, "x" + EOS_TEXT + "y", "Tab\tand\nnewline ~!", "é"]
    assert reloaded(texts, add_special_tokens=False)["input_ids"] == char_tok(texts, add_special_tokens=False)["input_ids"]
    assert reloaded(texts)["input_ids"] == char_tok(texts)["input_ids"]
    for text in sorted(set(all_texts(toy["test"])))[:100]:
        assert reloaded.decode(reloaded(text, add_special_tokens=False)["input_ids"]) == text
