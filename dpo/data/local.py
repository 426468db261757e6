"""Preference data from local files: `datasets=[path/to/data.jsonl]` or `datasets=[path/to/folder]`.

Two row formats are understood, told apart by the first row's fields:

- pair format: `{"prompt": ..., "chosen": ..., "rejected": ...}`, the responses being what follows
  the prompt (prompts kept from their start when too long);
- HH transcript format: `{"chosen": ..., "rejected": ...}` holding full Anthropic-style
  transcripts, converted exactly as the `hh` dataset is (prompts kept from their end).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
from collections import Counter
from typing import Iterable, Iterator, Optional

from dpo.data import LOCAL_SUFFIXES, PreferenceData, PreferenceSource, add_pair
from dpo.data.hh import hh_rows_to_data, transcript_prompt
from dpo.errors import DataError

SPLITS = ("train", "test")
TEST_PERCENT = 5
PAIR_FIELDS = ("prompt", "chosen", "rejected")
HH_FIELDS = ("chosen", "rejected")
SUPPORTED = ".jsonl, .json or .parquet, optionally followed by .gz"
PAIR_EXAMPLE = '{"prompt": "...", "chosen": "...", "rejected": "..."}'

LocatedRow = tuple[str, dict]


# ---- reading files into (where, row) ----------------------------------------------------------

def data_suffix(path: str) -> Optional[str]:
    """The data suffix of `path` without a trailing .gz (".jsonl", ...), or None if unsupported."""
    name = path[:-3] if path.endswith(".gz") else path
    return next((suffix for suffix in LOCAL_SUFFIXES if name.endswith(suffix)), None)


def read_bytes(path: str) -> bytes:
    """The file's content, gunzipped when its name ends in .gz."""
    with open(path, "rb") as file:
        content = file.read()
    if not path.endswith(".gz"):
        return content
    try:
        return gzip.decompress(content)
    except (OSError, EOFError) as error:
        raise DataError(f"{path} is not a valid gzip file ({error}); re-compress it with gzip or drop the .gz suffix") from None


def read_text(path: str) -> str:
    try:
        return read_bytes(path).decode("utf-8")
    except UnicodeDecodeError as error:
        raise DataError(f"{path} is not UTF-8 text (byte {error.start + 1}); save it as UTF-8") from None


def read_json_lines(path: str, text: str) -> Iterator[LocatedRow]:
    """One JSON value per line; blank lines are ignored."""
    for line_number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(
                f"{path} line {line_number} is not valid JSON: {error.msg} (column {error.colno}); "
                f"fix that line so it holds one object like {PAIR_EXAMPLE}"
            ) from None
        yield f"{path} line {line_number}", row


def read_json(path: str, text: str) -> Iterator[LocatedRow]:
    """A JSON array of objects, or JSON-lines content saved with a .json suffix."""
    if not text.lstrip().startswith("["):
        yield from read_json_lines(path, text)
        return
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as error:
        raise DataError(
            f"{path} line {error.lineno} is not valid JSON: {error.msg} (column {error.colno}); "
            f"fix it so the file holds one array of objects like {PAIR_EXAMPLE}"
        ) from None
    for row_number, row in enumerate(rows, start=1):
        yield f"{path} row {row_number}", row


def read_parquet(path: str) -> Iterator[LocatedRow]:
    import pyarrow
    import pyarrow.parquet

    source = io.BytesIO(read_bytes(path)) if path.endswith(".gz") else path
    try:
        rows = pyarrow.parquet.read_table(source).to_pylist()
    except pyarrow.ArrowException as error:
        raise DataError(f"{path} is not a readable parquet file ({error}); rewrite it with pyarrow or pandas") from None
    for row_number, row in enumerate(rows, start=1):
        yield f"{path} row {row_number}", row


def read_rows(path: str) -> list[LocatedRow]:
    """All rows of one supported file, each with its 1-based location for error messages."""
    suffix = data_suffix(path)
    if suffix == ".parquet":
        rows = list(read_parquet(path))
    elif suffix == ".json":
        rows = list(read_json(path, read_text(path)))
    else:
        rows = list(read_json_lines(path, read_text(path)))
    if not rows:
        raise DataError(f"{path} holds no rows; add one object per row like {PAIR_EXAMPLE}")
    return rows


# ---- checking rows --------------------------------------------------------------------------

def row_format(where: str, row) -> tuple[str, ...]:
    """The fields every row must have, decided by the first row: pair format or HH transcripts."""
    check_is_object(where, row)
    return PAIR_FIELDS if "prompt" in row else HH_FIELDS


def check_is_object(where: str, row) -> None:
    if not isinstance(row, dict):
        raise DataError(
            f"{where} is a JSON {type(row).__name__}, not an object; each row must be an object like {PAIR_EXAMPLE}"
        )


def check_row(where: str, row, fields: tuple[str, ...]) -> None:
    """Raise a DataError naming the row if it lacks one of `fields` or one is not a string."""
    check_is_object(where, row)
    for field in fields:
        if field not in row:
            raise DataError(
                f"{where} has no '{field}' field (it has: {', '.join(row) or 'no fields'}); "
                f"every row needs the string fields {', '.join(fields)}, as the first row has"
            )
        value = row[field]
        if isinstance(value, list):
            raise DataError(
                f"{where} field '{field}' is a list, not a string: conversational (list of chat messages) "
                f"format is not supported; give plain strings like {PAIR_EXAMPLE}"
            )
        if not isinstance(value, str):
            raise DataError(
                f"{where} field '{field}' is {type(value).__name__}, not a string; give plain strings like {PAIR_EXAMPLE}"
            )


# ---- converting rows ------------------------------------------------------------------------

def pair_rows_to_data(rows: Iterable[LocatedRow], skipped: Counter) -> PreferenceData:
    """Convert checked `{prompt, chosen, rejected}` rows into the preference dict."""
    data: PreferenceData = {}
    for _, row in rows:
        add_pair(data, row["prompt"], row["chosen"], row["rejected"])
    return data


def row_prompt(where: str, row: dict, fields: tuple[str, ...]) -> str:
    """The prompt a checked row belongs to, in either format."""
    return transcript_prompt(row["chosen"], where) if fields == HH_FIELDS else row["prompt"]


def prompt_hash(prompt: str) -> str:
    """A hash of the prompt that is the same on every machine and Python run (unlike `hash()`)."""
    return hashlib.sha256(prompt.encode("utf-8")).hexdigest()


def held_out_prompts(prompts: Iterable[str]) -> set[str]:
    """The test prompts of a single file: the first ceil(5%) of prompts in hash order (none if fewer than 2)."""
    ordered = sorted(set(prompts), key=prompt_hash)
    if len(ordered) < 2:
        return set()
    n_test = -(-len(ordered) * TEST_PERCENT // 100)
    return set(ordered[:n_test])


class LocalPreferenceFiles(PreferenceSource):
    """Preference pairs from a local file or directory (see the module docstring for row formats).

    `path` is either
    - a directory holding exactly one `train.*` and one `test.*` file, each .jsonl, .json or
      .parquet, optionally gzipped (`train.jsonl.gz`); each split is read from its file; or
    - a single such file, split by prompt so that no prompt is in both splits: prompts are sorted
      by the SHA-256 of their text and the first ceil(5%) of them (none when the file has a
      single prompt) are 'test', the rest 'train'. The split is the same on every machine and
      does not depend on row order. Rows dropped for format reasons are counted in the split
      their prompt belongs to.

    .jsonl files hold one object per line (blank lines ignored); .json files hold an array of
    objects or JSON lines; .parquet files are read with pyarrow. `truncation_mode` is set when
    `load` detects the row format.
    """

    def __init__(self, path: str) -> None:
        super().__init__()
        self.name = path
        self.path = os.path.expanduser(path)

    def load(self, split: str, silent: bool = False, cache_dir: Optional[str] = None) -> PreferenceData:
        if split not in SPLITS:
            raise DataError(f"local dataset {self.name} has splits 'train' and 'test', not '{split}'; use one of those")
        self.skipped.clear()
        if os.path.isdir(self.path):
            rows, fields = self.checked_rows(self.split_files()[split])
        else:
            rows, fields = self.checked_rows(self.single_file())
            rows = self.rows_of_split(rows, fields, split)
        if fields == HH_FIELDS:
            self.truncation_mode = "keep_end"
            return hh_rows_to_data(rows, self.skipped)
        self.truncation_mode = "keep_start"
        return pair_rows_to_data(rows, self.skipped)

    def single_file(self) -> str:
        if not os.path.exists(self.path):
            raise DataError(
                f"dataset path {self.name} does not exist; give a .jsonl, .json or .parquet file "
                "(optionally .gz) or a directory holding train.* and test.* files"
            )
        if data_suffix(self.path) is None:
            raise DataError(f"{self.name} has an unsupported suffix; use {SUPPORTED}")
        return self.path

    def split_files(self) -> dict[str, str]:
        """The directory's train.* and test.* files; both must exist, once each."""
        entries = sorted(os.listdir(self.path))
        files = {}
        for split in SPLITS:
            candidates = [name for name in entries if name.startswith(split + ".") and data_suffix(name)]
            if not candidates:
                raise DataError(
                    f"directory {self.name} has no {split} file (it holds: {', '.join(entries) or 'nothing'}); "
                    f"add {split}.jsonl, {split}.json or {split}.parquet (optionally .gz)"
                )
            if len(candidates) > 1:
                raise DataError(
                    f"directory {self.name} has several {split} files ({', '.join(candidates)}); keep exactly one"
                )
            files[split] = os.path.join(self.path, candidates[0])
        return files

    @staticmethod
    def checked_rows(path: str) -> tuple[list[LocatedRow], tuple[str, ...]]:
        """The file's rows, all checked against the fields the first row calls for."""
        rows = read_rows(path)
        fields = row_format(*rows[0])
        for where, row in rows:
            check_row(where, row, fields)
        return rows, fields

    def rows_of_split(self, rows: list[LocatedRow], fields: tuple[str, ...], split: str) -> list[LocatedRow]:
        """The rows of a single file whose prompt falls in `split` (see the class docstring)."""
        prompts = [row_prompt(where, row, fields) for where, row in rows]
        test_prompts = held_out_prompts(prompts)
        if split == "test" and not test_prompts:
            raise DataError(
                f"{self.name} holds a single prompt, too few to hold one out for the test "
                "split; add more prompts or give a directory with train.* and test.* files"
            )
        in_test = split == "test"
        return [located for located, prompt in zip(rows, prompts) if (prompt in test_prompts) == in_test]
