"""`toy`: an embedded preference task that needs no download and whose outcome can be judged.

Each prompt asks to reverse a short random word, in the HH dialogue format:

    "\\n\\nHuman: reverse dgaf\\n\\nAssistant:"   preferred " fagd"   dispreferred " dgaf"

The SFT targets come from a careless demonstrator that answers correctly for half the prompts
and merely copies the word for the other half, much as a pretrained model knows both behaviours.
SFT therefore learns a policy that reverses about half the time; the preferences then tell DPO
which behaviour is wanted. `judge` scores a response 1 if it is the exact reversal, else 0, so
the mean judge score of sampled responses is the policy's success rate on held-out words.
"""

from __future__ import annotations

import random
import re
from typing import Optional

from dpo.data import PreferenceData, PreferenceSource, register_dataset
from dpo.errors import DataError

ALPHABET = "abcdefgh"
MIN_WORD_LENGTH, MAX_WORD_LENGTH = 3, 5
SPLIT_SIZES = {"train": 4096, "test": 256}
SEED = 20230529  # fixed: the task is the same on every machine

_PROMPT = "\n\nHuman: reverse {word}\n\nAssistant:"
_PROMPT_PATTERN = re.compile(r"Human: reverse ([a-z]+)\n\nAssistant:$")


def toy_prompt(word: str) -> str:
    return _PROMPT.format(word=word)


def toy_words() -> dict[str, list[str]]:
    """Disjoint lists of distinct, non-palindromic words for each split."""
    rng = random.Random(SEED)
    words: dict[str, None] = {}  # insertion-ordered set
    total = sum(SPLIT_SIZES.values())
    while len(words) < total:
        length = rng.randint(MIN_WORD_LENGTH, MAX_WORD_LENGTH)
        word = "".join(rng.choice(ALPHABET) for _ in range(length))
        if word != word[::-1]:
            words[word] = None
    ordered = list(words)
    return {"train": ordered[:SPLIT_SIZES["train"]], "test": ordered[SPLIT_SIZES["train"]:]}


def near_miss_reversal(word: str, rng: random.Random) -> str:
    """The reversal of `word` with one letter replaced by another: almost right, still wrong."""
    target = list(word[::-1])
    position = rng.randrange(len(target))
    target[position] = rng.choice([letter for letter in ALPHABET if letter != target[position]])
    return "".join(target)


@register_dataset
class ToyReversal(PreferenceSource):
    """The embedded `toy` task: reverse a word; reversing is preferred over copying."""

    name = "toy"

    def load(self, split: str, silent: bool = False, cache_dir: Optional[str] = None) -> PreferenceData:
        if split not in SPLIT_SIZES:
            raise DataError(f"dataset toy has no split '{split}': use one of {', '.join(SPLIT_SIZES)}")
        data: PreferenceData = {}
        rng = random.Random(SEED + len(split))
        for index, word in enumerate(toy_words()[split]):
            reversed_response, copied_response = " " + word[::-1], " " + word
            near_miss = " " + near_miss_reversal(word, rng)
            demonstrator_is_right = index % 2 == 0
            data[toy_prompt(word)] = {
                "responses": [reversed_response, copied_response, near_miss],
                "pairs": [(0, 1), (0, 2)],
                "sft_target": reversed_response if demonstrator_is_right else copied_response,
            }
        return data

    def judge(self, prompt: str, response: str) -> float:
        """1.0 if `response` is the exact reversal of the prompt's word (surrounding spaces ignored), else 0.0."""
        match = _PROMPT_PATTERN.search(prompt)
        if match is None:
            raise ValueError(f"not a toy prompt: {prompt!r}")
        return float(response.strip() == match.group(1)[::-1])
