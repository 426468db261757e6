"""Preference data from local files: `datasets=[path/to/data.jsonl]` or `datasets=[path/to/folder]`.

Three row formats are understood, told apart by the first row's fields:

- pair format: `{"prompt": ..., "chosen": ..., "rejected": ...}`, the responses being what follows
  the prompt (prompts kept from their start when too long);
- HH transcript format: `{"chosen": ..., "rejected": ...}` holding full Anthropic-style
  transcripts, converted exactly as the `hh` dataset is (prompts kept from their end);
- chat format: chosen and rejected (and optionally prompt) as lists of messages, rendered with the
  tokenizer's chat template (see `dpo.data.chat`; prompts kept from their end). Chat rows may also
  appear among pair-format rows.

A directory holds one train and one test file, recognised by name (see `split_of_file`), each
possibly in shards (`train-00000-of-00003.parquet`, ...) and possibly under a `data/` subfolder,
as the Hugging Face hub stores datasets.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import re
from collections import Counter
from typing import Iterable, Iterator, Optional

from dpo.data import (DIRECTORY_HINT, LOCAL_SUFFIXES, RENDERED, PreferenceData, PreferenceSource, SplitData,
                      add_pair)
from dpo.data.chat import ChatRenderer, is_chat_row, prompt_key
from dpo.data.hh import hh_rows_to_data, transcript_prompt
from dpo.errors import DataError

SPLITS = ("train", "test")
# The last word of a file's name that makes it a split's file: `dpo_train.jsonl`, `validation.parquet`.
SPLIT_WORDS = {"train": ("train", "training"),
               "test": ("test", "eval", "evaluation", "validation", "valid", "val", "dev")}
EXAMPLE_NAMES = {"train": "train.jsonl or dpo_train.jsonl", "test": "test.jsonl or dpo_eval.jsonl"}
WORD_SEPARATORS = re.compile(r"[_.-]")
# The hub's shard numbering, `-00000-of-00003`, in older exports followed by a content hash.
SHARD_NUMBER = re.compile(r"-(\d+)-of-(\d+)(?:-[0-9a-f]{8,})?$")
HUB_DATA_FOLDER = "data"
MAX_LISTED = 12
TEST_PERCENT = 5
PAIR_FIELDS = ("prompt", "chosen", "rejected")
HH_FIELDS = ("chosen", "rejected")
# The row formats, and the fields each needs (a chat row's prompt is optional).
PAIR, HH, CHAT = "pair", "hh", "chat"
FORMAT_FIELDS = {PAIR: PAIR_FIELDS, HH: HH_FIELDS, CHAT: HH_FIELDS}
TRUNCATION_MODES = {PAIR: "keep_start", HH: "keep_end", CHAT: "keep_end"}
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

def row_format(where: str, row) -> str:
    """The format of a file's rows, decided by its first row: PAIR, HH transcripts or CHAT messages."""
    check_is_object(where, row)
    if is_chat_row(row):
        return CHAT
    for row_format_name in (PAIR, HH):
        if all(field in row for field in FORMAT_FIELDS[row_format_name]):
            return row_format_name
    raise DataError(
        f"{where} fits neither accepted row format (its fields are: {', '.join(row) or 'none'}); give each row "
        f"the strings {PAIR_EXAMPLE}, or HH transcripts in 'chosen' and 'rejected' (whole "
        "'\\n\\nHuman: ...\\n\\nAssistant: ...' dialogues), renaming your fields to one of these"
    )


def check_is_object(where: str, row) -> None:
    if not isinstance(row, dict):
        raise DataError(
            f"{where} is a JSON {type(row).__name__}, not an object; each row must be an object like {PAIR_EXAMPLE}"
        )


def check_row(where: str, row, row_format_name: str) -> None:
    """Raise a DataError naming the row if it lacks a field its format needs, or a text field is not a string.

    Chat rows are allowed among pair-format rows; their messages are checked when they are rendered.
    """
    check_is_object(where, row)
    if row_format_name != HH and is_chat_row(row):
        check_has_fields(where, row, HH_FIELDS, "every chat row needs chosen and rejected messages")
        return
    fields = PAIR_FIELDS if row_format_name == CHAT else FORMAT_FIELDS[row_format_name]
    need = f"every row needs the string fields {', '.join(fields)}, as the first row has"
    if row_format_name == CHAT:
        need = "a row without chat messages needs the string fields prompt, chosen and rejected"
    check_has_fields(where, row, fields, need)
    for field in fields:
        value = row[field]
        if isinstance(value, (list, dict)):
            raise DataError(
                f"{where} field '{field}' holds chat messages, but the first row holds HH transcripts; give every "
                "row of a file in one format (chat rows may mix with prompt/chosen/rejected rows, not with HH ones)"
            )
        if not isinstance(value, str):
            raise DataError(
                f"{where} field '{field}' is {type(value).__name__}, not a string; give plain strings like "
                f"{PAIR_EXAMPLE}"
            )


def check_has_fields(where: str, row: dict, fields: tuple[str, ...], need: str) -> None:
    for field in fields:
        if field not in row:
            raise DataError(f"{where} has no '{field}' field (it has: {', '.join(row) or 'no fields'}); {need}")


def check_rows(rows: list[LocatedRow]) -> str:
    """The format the first row calls for, after checking every row against it."""
    row_format_name = row_format(*rows[0])
    for where, row in rows:
        check_row(where, row, row_format_name)
    return row_format_name


# ---- converting rows ------------------------------------------------------------------------

def rows_to_split_data(rows: list[LocatedRow], row_format_name: str, skipped: Counter,
                       renderer: ChatRenderer) -> SplitData:
    """Convert checked rows into the preference dict, with the truncation mode their format needs."""
    if row_format_name == HH:
        return SplitData(hh_rows_to_data(rows, skipped), TRUNCATION_MODES[HH])
    return SplitData(pair_rows_to_data(rows, renderer), TRUNCATION_MODES[row_format_name])


def pair_rows_to_data(rows: Iterable[LocatedRow], renderer: ChatRenderer) -> PreferenceData:
    """Convert checked `{prompt, chosen, rejected}` rows, plain or chat, into the preference dict."""
    data: PreferenceData = {}
    for where, row in rows:
        if is_chat_row(row):
            prompt, chosen, rejected = renderer.texts(where, row)
            add_pair(data, prompt, chosen, rejected)
            data[prompt][RENDERED] = True
        else:
            add_pair(data, row["prompt"], row["chosen"], row["rejected"])
    return data


def row_prompt(where: str, row: dict, row_format_name: str) -> str:
    """The prompt a checked row belongs to, in any format (for chat rows, its messages as JSON)."""
    if row_format_name == HH:
        return transcript_prompt(row["chosen"], where)
    return prompt_key(where, row) if is_chat_row(row) else row["prompt"]


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


def rows_of_split(rows: list[LocatedRow], row_format_name: str, split: str, label: str,
                  fix: str) -> list[LocatedRow]:
    """The rows whose prompt falls in `split` when one set of rows is split by prompt hash.

    `label` names the data and `fix` says what to do when it has a single prompt, too few to split.
    """
    prompts = [row_prompt(where, row, row_format_name) for where, row in rows]
    test_prompts = held_out_prompts(prompts)
    if split == "test" and not test_prompts:
        raise DataError(f"{label} holds a single prompt, too few to hold one out for the test split; {fix}")
    in_test = split == "test"
    return [located for located, prompt in zip(rows, prompts) if (prompt in test_prompts) == in_test]


# ---- finding the files of a directory's splits ----------------------------------------------

def name_parts(name: str) -> tuple[str, str]:
    """A data file's name split before its suffix: ('data/train-00000-of-00002', '.parquet.gz')."""
    suffix = data_suffix(name) + (".gz" if name.endswith(".gz") else "")
    return name[: -len(suffix)], suffix


def split_of_file(name: str) -> Optional[str]:
    """'train' or 'test' when a data file's name says which split it holds, else None.

    The rule: take the file name without its folder, its data suffix (.jsonl, .json, .parquet,
    optionally .gz) and a shard number like `-00000-of-00003`; its last word, after the last `_`,
    `-` or `.`, ignoring case, must be one of the split's words (`SPLIT_WORDS`). So `train.jsonl`,
    `dpo_train.jsonl`, `train-00000-of-00001.parquet` and `my.valid.json.gz` name splits, while
    `contest.jsonl` and `train_sft.jsonl` do not.
    """
    if data_suffix(name) is None:
        return None
    stem = SHARD_NUMBER.sub("", os.path.basename(name_parts(name)[0]))
    last_word = WORD_SEPARATORS.split(stem.lower())[-1]
    return next((split for split, words in SPLIT_WORDS.items() if last_word in words), None)


def file_group(name: str) -> str:
    """The group of a file's shards: its name with the shard number blanked (`data/train-*-of-00003.parquet`)."""
    head, suffix = name_parts(name)
    return SHARD_NUMBER.sub(lambda match: f"-*-of-{match.group(2)}", head) + suffix


def directory_files(directory: str) -> list[str]:
    """The files of `directory` and of its `data/` subfolder (named `data/<file>`), sorted."""
    names = [name for name in os.listdir(directory) if os.path.isfile(os.path.join(directory, name))]
    hub_folder = os.path.join(directory, HUB_DATA_FOLDER)
    if os.path.isdir(hub_folder):
        names += [f"{HUB_DATA_FOLDER}/{name}" for name in os.listdir(hub_folder)
                  if os.path.isfile(os.path.join(hub_folder, name))]
    return sorted(names)


def directory_listing(directory: str) -> str:
    """What the directory holds, for error messages: folders end in '/', long listings are cut."""
    names = sorted(name + "/" if os.path.isdir(os.path.join(directory, name)) else name
                   for name in os.listdir(directory))
    if f"{HUB_DATA_FOLDER}/" in names:
        names += sorted(f"{HUB_DATA_FOLDER}/{name}" for name in os.listdir(os.path.join(directory, HUB_DATA_FOLDER)))
    if len(names) > MAX_LISTED:
        names = names[:MAX_LISTED] + [f"and {len(names) - MAX_LISTED} more"]
    return ", ".join(names) or "nothing"


def split_files(directory: str, name: str) -> dict[str, list[str]]:
    """The file, or the shards of the file, that holds each split, as names relative to `directory`.

    Each split must be named by exactly one file or one complete set of shards (see `split_of_file`).
    """
    files = directory_files(directory)
    found = {}
    for split in SPLITS:
        groups: dict[str, list[str]] = {}
        for file in files:
            if split_of_file(file) == split:
                groups.setdefault(file_group(file), []).append(file)
        if not groups:
            raise no_split_file(directory, name, split)
        if len(groups) > 1:
            raise several_split_files(name, split, groups)
        (found[split],) = groups.values()
        check_shards_complete(name, split, found[split])
    return found


def no_split_file(directory: str, name: str, split: str) -> DataError:
    words = SPLIT_WORDS[split]
    return DataError(
        f"directory {name} has no {split} file (it holds: {directory_listing(directory)}); add one such as "
        f"{EXAMPLE_NAMES[split]}: accepted names are {', '.join(words[:-1])} or {words[-1]}, alone or after a prefix "
        f"ending in _, - or ., then optionally a shard number like -00000-of-00003, then {SUPPORTED}, in the "
        f"directory or its {HUB_DATA_FOLDER}/ subfolder"
    )


def several_split_files(name: str, split: str, groups: dict[str, list[str]]) -> DataError:
    files = sorted(file for shards in groups.values() for file in shards)
    note = " (the shards of one file count as one)" if any(len(shards) > 1 for shards in groups.values()) else ""
    return DataError(f"directory {name} has several {split} files ({', '.join(files)}); keep exactly one{note}")


def check_shards_complete(name: str, split: str, shards: list[str]) -> None:
    """Refuse a partial set of shards (an interrupted download would otherwise train on part of the data)."""
    numbers = [SHARD_NUMBER.search(name_parts(shard)[0]) for shard in shards]
    if numbers[0] is None:
        return
    total = int(numbers[0].group(2))
    if sorted(int(number.group(1)) for number in numbers) != list(range(total)):
        raise DataError(
            f"directory {name} has the {split} shards {', '.join(shards)}, but their names promise shards 0 to "
            f"{total - 1} once each; add the missing shards (was a download interrupted?) or remove the extra ones"
        )


# Which files became which split is printed once per process, though train and test are loaded apart.
_REPORTED_LAYOUTS: set[str] = set()


def report_layout(name: str, files: dict[str, list[str]]) -> None:
    line = f"dataset {name}: " + "; ".join(f"{split} <- {', '.join(names)}" for split, names in files.items())
    if line not in _REPORTED_LAYOUTS:
        _REPORTED_LAYOUTS.add(line)
        print(line)


def checked_rows(paths: list[str]) -> tuple[list[LocatedRow], str]:
    """The rows of the files, in order, all checked against the format the first row calls for."""
    rows = [located for path in paths for located in read_rows(path)]
    return rows, check_rows(rows)


class LocalPreferenceFiles(PreferenceSource):
    """Preference pairs from a local file or directory (see the module docstring for row formats).

    `path` is either
    - a directory holding one train and one test file (`split_of_file` says which name is
      which: `train.jsonl`, `dpo_eval.jsonl`, `validation.parquet.gz`, ...), each .jsonl, .json or
      .parquet, optionally gzipped, or in shards (`train-00000-of-00002.parquet`, read in order),
      directly or under `data/`; each split is read from its file(s); or
    - a single such file, split by prompt so that no prompt is in both splits: prompts are sorted
      by the SHA-256 of their text and the first ceil(5%) of them (none when the file has a
      single prompt) are 'test', the rest 'train'. The split is the same on every machine and
      does not depend on row order. Rows dropped for format reasons are counted in the split
      their prompt belongs to.

    .jsonl files hold one object per line (blank lines ignored); .json files hold an array of
    objects or JSON lines; .parquet files are read with pyarrow. The truncation mode depends on
    the row format, so `load_split` returns it with the data.
    """

    truncation_mode = None  # known only once the files are read: see load_split

    def __init__(self, path: str, tokenizer=None) -> None:
        super().__init__()
        self.name = path
        self.path = os.path.expanduser(path)
        self.renderer = ChatRenderer(tokenizer, path)

    def load(self, split: str, silent: bool = False, cache_dir: Optional[str] = None) -> PreferenceData:
        return self.load_split(split, silent=silent, cache_dir=cache_dir).data

    def load_split(self, split: str, silent: bool = False, cache_dir: Optional[str] = None) -> SplitData:
        if split not in SPLITS:
            raise DataError(f"local dataset {self.name} has splits 'train' and 'test', not '{split}'; use one of those")
        self.skipped.clear()
        rows, row_format_name = self.split_rows(split, silent)
        return rows_to_split_data(rows, row_format_name, self.skipped, self.renderer)

    def split_rows(self, split: str, silent: bool) -> tuple[list[LocatedRow], str]:
        """The checked rows of `split` and the row format they share."""
        if os.path.isdir(self.path):
            files = split_files(self.path, self.name)
            if not silent:
                report_layout(self.name, files)
            return checked_rows([os.path.join(self.path, file) for file in files[split]])
        rows, row_format_name = checked_rows([self.single_file()])
        fix = "add more prompts or give a directory with a train and a test file"
        return rows_of_split(rows, row_format_name, split, self.name, fix), row_format_name

    def single_file(self) -> str:
        if not os.path.exists(self.path):
            raise DataError(
                f"dataset path {self.name} does not exist; give a .jsonl, .json or .parquet file "
                f"(optionally .gz) or {DIRECTORY_HINT}"
            )
        if data_suffix(self.path) is None:
            raise DataError(f"{self.name} has an unsupported suffix; use {SUPPORTED}")
        return self.path
