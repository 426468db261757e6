"""Preference pairs held in memory: what the Python API (`dpo.DPOTrainer(dataset=...)`) trains on.

Rows are `(prompt, chosen, rejected)` tuples, dicts with those keys, or a `datasets.Dataset` with
those columns; the responses are what follows the prompt, as in the local pair format. Dicts may
also be chat rows (lists of messages, see `dpo.data.chat`), rendered with the tokenizer's chat
template. The source is not registered under a name: it is handed to `get_batch_iterator` as an object.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Optional

from dpo.data import RENDERED, PreferenceData, PreferenceSource, add_pair
from dpo.data.chat import ChatRenderer, is_chat_row
from dpo.errors import DataError

FIELDS = ("prompt", "chosen", "rejected")


class InMemoryPairs(PreferenceSource):
    """Train (and optionally test) rows given as Python objects; `name` labels them in logs and errors."""

    def __init__(self, train_rows: Optional[Iterable[Any]] = None, test_rows: Optional[Iterable[Any]] = None,
                 name: str = "dataset", tokenizer=None) -> None:
        super().__init__()
        self.name = name
        self.renderer = ChatRenderer(tokenizer, name)
        self.rows = {}
        if train_rows is not None:
            self.rows["train"] = _as_pairs(train_rows, name)
        if test_rows is not None:
            self.rows["test"] = _as_pairs(test_rows, f"eval_{name}")

    def load(self, split: str, silent: bool = False, cache_dir: Optional[str] = None) -> PreferenceData:
        if split not in self.rows:
            raise DataError(f"{self.name} has no {split} rows; pass eval_dataset=... to evaluate")
        data: PreferenceData = {}
        label = self.name if split == "train" else f"eval_{self.name}"
        for index, row in enumerate(self.rows[split]):
            if isinstance(row, Mapping):  # a chat row or one with a system prompt, checked as it is rendered
                prompt, chosen, rejected, rendered = self.renderer.pair_texts(f"{label} row {index}", dict(row))
                add_pair(data, prompt, chosen, rejected)
                if rendered:
                    data[prompt][RENDERED] = True
            elif self.renderer.strings_as_chat:
                prompt, chosen, rejected, _ = self.renderer.pair_texts(f"{label} row {index}", dict(zip(FIELDS, row)))
                add_pair(data, prompt, chosen, rejected)
                data[prompt][RENDERED] = True
            else:
                add_pair(data, *row)
        return data


def _as_pairs(rows: Iterable[Any], label: str) -> list:
    """Each row as a (prompt, chosen, rejected) tuple of strings (or a chat row), checked now: a bad row fails at
    construction, and a chat row as it is rendered."""
    if isinstance(rows, (str, bytes, Mapping)) or not isinstance(rows, Iterable):
        raise DataError(f"{label} must be a list of (prompt, chosen, rejected) tuples, a list of dicts with those "
                        f"keys, or a datasets.Dataset with those columns; got {type(rows).__name__}")
    pairs = [_as_pair(row, index, label) for index, row in enumerate(rows)]
    if not pairs:
        raise DataError(f"{label} holds no rows; give at least one (prompt, chosen, rejected) pair")
    return pairs


def _as_pair(row: Any, index: int, label: str):
    """The row as a (prompt, chosen, rejected) tuple of strings, or a chat row as a dict."""
    if isinstance(row, Mapping) and is_chat_row(dict(row)):
        return dict(row)
    if isinstance(row, Mapping):
        missing = [field for field in FIELDS if field not in row]
        if missing:
            raise DataError(f"{label} row {index} has no '{missing[0]}' key (its keys: {sorted(row)}); every row "
                            "needs prompt, chosen and rejected")
        values = tuple(row[field] for field in FIELDS)
    elif isinstance(row, (tuple, list)) and len(row) == 3:
        values = tuple(row)
    else:
        raise DataError(f"{label} row {index} is {_excerpt(row)}; expected a (prompt, chosen, rejected) tuple or a "
                        "dict with those keys")
    for field, value in zip(FIELDS, values):
        if not isinstance(value, str):
            raise DataError(f"{label} row {index}: {field} is a {type(value).__name__}, not text; give strings")
    if isinstance(row, Mapping) and row.get("system") is not None:  # kept: rendered with the prompt
        return {**dict(zip(FIELDS, values)), "system": row["system"]}
    return values


def _excerpt(row: Any, limit: int = 60) -> str:
    text = repr(row)
    return text if len(text) <= limit else text[:limit] + "..."
