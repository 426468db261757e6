"""What a tokenizer makes of the data: the share of unknown tokens, and pairs it cannot tell apart.

A tokenizer with an unknown token maps everything outside its vocabulary to that one token; the
built-in `char` tokenizer does so for every non-ASCII character. Hebrew or emoji text then
becomes a run of <|unk|>, chosen and rejected responses can become the same ids, and DPO would
train on pairs that carry no preference while exiting with success. Byte-level tokenizers (GPT-2,
GPT-NeoX, Llama with byte fallback) never emit their unknown token, so one probe text decides
whether the data needs tokenizing here at all: for them the whole check is one short call. For
the others, the data is tokenized only if one of its characters is unknown on its own (all-ASCII
data and the `char` tokenizer cost one pass over the characters).
"""

from __future__ import annotations

import hashlib
from array import array
from collections import Counter
from dataclasses import dataclass, field
from typing import Optional

UNKNOWN_SHARE_LIMIT = 0.01
# Scripts and symbols that a narrow vocabulary lacks and a byte-level one still encodes.
PROBE_TEXT = "שלום, 世界! Привет 😀 é ∑ 𝔘"
TEXTS_PER_CALL = 4096  # enough for fast batching, few enough that the ids of one call fit in memory
SUGGESTED_TOKENIZER = "EleutherAI/gpt-neox-20b"


def emits_unknown_token(tokenizer) -> bool:
    unknown = tokenizer.unk_token_id
    return unknown is not None and unknown in tokenizer(PROBE_TEXT, add_special_tokens=False)["input_ids"]


@dataclass
class TokenCheck:
    """What the tokenizer made of one split: a fingerprint of each text's ids, and unknown-token counts."""

    fingerprints: dict = field(default_factory=dict)
    n_unknown: int = 0
    n_tokens: int = 0
    unknown_characters: set = field(default_factory=set)  # the characters it turns into its unknown token

    def same_tokens(self, chosen: str, rejected: str) -> bool:
        return self.fingerprints[chosen] == self.fingerprints[rejected]

    @property
    def unknown_share(self) -> float:
        return self.n_unknown / self.n_tokens if self.n_tokens else 0.0

    @property
    def too_many_unknown(self) -> bool:
        return self.unknown_share > UNKNOWN_SHARE_LIMIT


def check_tokens(tokenizer, data: dict) -> Optional[TokenCheck]:
    """Tokenize the split's texts if `tokenizer` can emit its unknown token on them; else None (also for no tokenizer).

    Each distinct text is tokenized once. The unknown share weighs it by how often a run
    tokenizes it: a prompt and its SFT target once, a response once per pair it is in.
    """
    if tokenizer is None or not emits_unknown_token(tokenizer):
        return None
    uses = texts_and_uses(data)
    unknown = unknown_characters(tokenizer, uses)
    if not unknown:
        return None
    check = TokenCheck(unknown_characters=unknown)
    texts = list(uses)
    for start in range(0, len(texts), TEXTS_PER_CALL):
        chunk = texts[start:start + TEXTS_PER_CALL]
        chunk_ids = tokenizer(chunk, add_special_tokens=False, return_attention_mask=False)["input_ids"]
        for text, ids in zip(chunk, chunk_ids):
            check.fingerprints[text] = fingerprint(ids)
            check.n_unknown += ids.count(tokenizer.unk_token_id) * uses[text]
            check.n_tokens += len(ids) * uses[text]
    return check


def unknown_characters(tokenizer, texts) -> set[str]:
    """The characters of `texts` that `tokenizer` turns into its unknown token on their own."""
    characters: set[str] = set()
    for text in texts:
        characters.update(text)
    ordered = sorted(characters)
    ids = tokenizer(ordered, add_special_tokens=False, return_attention_mask=False)["input_ids"] if ordered else []
    return {character for character, character_ids in zip(ordered, ids) if tokenizer.unk_token_id in character_ids}


def texts_and_uses(data: dict) -> Counter:
    uses: Counter = Counter()
    for prompt, example in data.items():
        uses[prompt] += 1
        uses[example.get("sft_target", "")] += 1
        for pair in example["pairs"]:
            for index in pair:
                uses[example["responses"][index]] += 1
    return uses


def fingerprint(ids: list[int]) -> bytes:
    """A short digest of token ids: keeping the ids of a whole dataset would take gigabytes."""
    return hashlib.blake2b(array("q", ids).tobytes(), digest_size=16).digest()


VOCABULARY_PROBE = "Hello, world"


def vocabulary_problem(tokenizer) -> Optional[str]:
    """Why `tokenizer` cannot train a model, or None: a tokenizer with no tokens but its special ones.

    transformers 5 builds such a one from `GPT2TokenizerFast(vocab_file=..., merges_file=...)`: it
    encodes every text to no tokens, so the model gets a vocabulary of one or none and training fails
    only at the first backward pass.
    """
    if tokenizer(VOCABULARY_PROBE, add_special_tokens=False)["input_ids"]:
        return None
    return (f"{tokenizer_description(tokenizer)} has no vocabulary ({len(tokenizer)} tokens, all special, and it "
            f"encodes {VOCABULARY_PROBE!r} to no tokens), so nothing could be trained; load it with "
            "AutoTokenizer.from_pretrained(<its directory or hub name>) (transformers 5 builds an empty one from "
            "GPT2TokenizerFast(vocab_file=..., merges_file=...)), or set model.tokenizer_name_or_path to it")


def unknown_token_warning(label: str, tokenizer, share: float) -> str:
    return (f"{share:.1%} of the tokens of {label} are the unknown token {tokenizer.unk_token} of "
            f"{tokenizer_description(tokenizer)}: the model can neither read nor write that text, and pairs whose "
            f"responses differ only there are skipped; use a tokenizer that covers the text, e.g. "
            f"model.tokenizer_name_or_path={SUGGESTED_TOKENIZER}")


def tokenizer_description(tokenizer) -> str:
    """'tokenizer <name>' as users set it in model.tokenizer_name_or_path, where it can be known."""
    return f"tokenizer {tokenizer.name_or_path}" if tokenizer.name_or_path else "the tokenizer in use"
