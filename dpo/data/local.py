"""Preference data from local files: `datasets=[path/to/data.jsonl]` or `datasets=[path/to/folder]`.

Three row formats are understood, told apart by the first row's fields (after other projects' column
names are recognised, see `COLUMN_NAMES`):

- pair format: `{"prompt": ..., "chosen": ..., "rejected": ...}`, the responses being what follows
  the prompt (prompts kept from their start when too long);
- HH transcript format: `{"chosen": ..., "rejected": ...}` holding full Anthropic-style
  transcripts, converted exactly as the `hh` dataset is (prompts kept from their end);
- chat format: chosen and rejected (and optionally prompt) as lists of messages, rendered with the
  tokenizer's chat template (see `dpo.data.chat`; prompts kept from their end). Chat rows may also
  appear among pair-format rows.

A directory holds a train file and usually a test file, recognised by name (see `split_files`), each
possibly in shards (`train-00000-of-00003.parquet`, ...) and possibly under a `data/` subfolder,
as the Hugging Face hub stores datasets; without a test file, 5% of the train file's prompts are held
out as for a single file. A directory written by `save_to_disk` is read by `dpo.data.hub` instead.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import re
from collections import Counter
from typing import Iterable, Iterator, NamedTuple, Optional

from dpo.data import (DIRECTORY_HINT, LOCAL_SUFFIXES, RENDERED, PreferenceData, PreferenceSource, SplitData,
                      add_pair)
from dpo.data.chat import ChatRenderer, is_chat_row, prompt_key, system_text, with_system_text
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
CHAT_EXAMPLE = '{"role": "user"|"assistant"|"system", "content": "..."} lists'
# The column names other projects write for our fields, looked for in this order: TRL and the Hub (prompt,
# chosen, rejected), Intel/orca_dpo_pairs (system, question), LLaMA-Factory (instruction and input,
# conversations, system, history), OpenAI's preference data (input, preferred_output, non_preferred_output),
# lvwerra/stack-exchange-paired (question, response_j, response_k).
COLUMN_NAMES = {
    "prompt": ("prompt", "question", "instruction", "conversations", "messages", "input"),
    "chosen": ("chosen", "response_j", "chosen_response", "preferred_output", "accepted"),
    "rejected": ("rejected", "response_k", "rejected_response", "non_preferred_output"),
    "system": ("system", "system_prompt"),
}
# LLaMA-Factory's alpaca form: `input` continues the `instruction`, `history` holds earlier [question, answer] turns.
QUERY, HISTORY = "input", "history"
# Words in column names that suggest a field, for the `columns:` mapping an unreadable layout's error proposes.
FIELD_HINTS = {"rejected": ("rej", "bad", "worse", "los", "neg", "non_pref", "dispref", "_k"),
               "chosen": ("chos", "good", "better", "win", "pos", "pref", "accept", "_j"),
               "prompt": ("prompt", "quest", "instr", "query", "input", "context", "post", "conversation", "dialog")}

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


# ---- recognising other projects' column names -------------------------------------------------

def recognised_columns(columns: list[str], mapped: Optional[dict[str, str]] = None) -> dict[str, str]:
    """Our field -> the column holding it: `mapped` first, then the first of `COLUMN_NAMES[field]` present.

    Beside an `instruction` prompt, an `input` column continues it; a `history` column is read too.
    """
    found = dict(mapped or {})
    for our_field, names in COLUMN_NAMES.items():
        if our_field not in found:
            column = next((name for name in names if name in columns and name not in found.values()), None)
            if column is not None:
                found[our_field] = column
    if found.get("prompt") == "instruction" and QUERY in columns and QUERY not in found.values():
        found[f"_{QUERY}"] = QUERY
    if HISTORY in columns and HISTORY not in found.values():
        found[f"_{HISTORY}"] = HISTORY
    return found


def renamed_row(where: str, row, columns: dict[str, str]):
    """The row under our field names, LLaMA-Factory's `input` and `history` folded into its prompt.

    The prompt is `instruction + "\n" + input` (as LLaMA-Factory joins them), and with a history the
    prompt becomes messages: each [question, answer] as a user and an assistant turn, then the prompt.
    A row that is not an object is left for `check_rows` to refuse.
    """
    if not isinstance(row, dict):
        return row
    renamed = {our_field: row[column] for our_field, column in columns.items() if column in row}
    query, history = renamed.pop(f"_{QUERY}", None), renamed.pop(f"_{HISTORY}", None)
    prompt = renamed.get("prompt")
    if isinstance(prompt, str) and isinstance(query, str) and query.strip():
        renamed["prompt"] = f"{prompt}\n{query}" if prompt.strip() else query
    if history and isinstance(renamed.get("prompt"), str):
        renamed["prompt"] = history_messages(where, history) + [{"role": "user", "content": renamed["prompt"]}]
    return renamed


def history_messages(where: str, history) -> list[dict]:
    turns = history if isinstance(history, list) else [None]
    messages = []
    for number, turn in enumerate(turns, start=1):
        if not (isinstance(turn, (list, tuple)) and len(turn) == 2 and all(isinstance(text, str) for text in turn)):
            raise DataError(f"{where} field 'history' entry {number} is not a [question, answer] pair of strings; "
                            'give the earlier turns as LLaMA-Factory does, [["question", "answer"], ...]')
        messages += [{"role": "user", "content": turn[0]}, {"role": "assistant", "content": turn[1]}]
    return messages


def recognised_rows(rows: list[LocatedRow], path: str) -> list[LocatedRow]:
    """The rows of a file (or files) under our field names, or a DataError proposing a `columns` mapping."""
    columns = list(dict.fromkeys(key for _, row in rows if isinstance(row, dict) for key in row))
    found = recognised_columns(columns)
    if isinstance(rows[0][1], dict) and not ("chosen" in found and "rejected" in found):
        raise unknown_layout(path, columns, found, path)
    return [(where, renamed_row(where, row, found)) for where, row in rows]


def unknown_layout(name: str, columns: list[str], found: dict[str, str], path: str) -> DataError:
    """The error for columns that fit no layout: what is read, and the `columns` mapping that would read them."""
    guess = guessed_columns(columns, found)
    mapping = ", ".join(f"{our_field}: {column}" for our_field, column in guess.items())
    return DataError(
        f"{name} fits no layout read here (its columns: {', '.join(columns) or 'none'}); give each row the strings "
        f"{PAIR_EXAMPLE} (or question/instruction for prompt, and system), chosen and rejected as chat messages "
        f"({CHAT_EXAMPLE}, or ShareGPT conversations), or HH transcripts, or name your columns, e.g. "
        f"'datasets=[{{path: {path}, columns: {{{mapping}}}}}]' with the preferred response's column as chosen"
    )


def guessed_columns(columns: list[str], found: dict[str, str]) -> dict[str, str]:
    """A `columns` mapping for prompt, chosen and rejected: what was recognised, then columns whose names hint at
    a field, then the remaining columns in order (`<column>` when none is left)."""
    guess = {our_field: found[our_field] for our_field in ("prompt", "chosen", "rejected") if our_field in found}
    free = [column for column in columns if column not in found.values()]
    for our_field, hints in FIELD_HINTS.items():
        if our_field not in guess:
            column = next((c for c in free if any(hint in c.lower() for hint in hints)), None)
            if column is not None:
                guess[our_field] = column
                free.remove(column)
    for our_field in ("prompt", "chosen", "rejected"):
        if our_field not in guess:
            guess[our_field] = free.pop(0) if free else "<column>"
    return {our_field: guess[our_field] for our_field in ("prompt", "chosen", "rejected")}


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
        f"the strings {PAIR_EXAMPLE}, chat messages ({CHAT_EXAMPLE}) in chosen and rejected, or HH transcripts in "
        "'chosen' and 'rejected' (whole '\\n\\nHuman: ...\\n\\nAssistant: ...' dialogues), or map your fields to "
        "these with a columns: {prompt: ..., chosen: ..., rejected: ...} entry"
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
    # Rendered prompts end with the template's generation prompt, which keeping their start would cut off.
    mode = TRUNCATION_MODES[CHAT if renderer.strings_as_chat else row_format_name]
    return SplitData(pair_rows_to_data(rows, renderer), mode)


def pair_rows_to_data(rows: Iterable[LocatedRow], renderer: ChatRenderer) -> PreferenceData:
    """Convert checked `{prompt, chosen, rejected}` rows (and `system`), plain or chat, into the preference dict."""
    data: PreferenceData = {}
    for where, row in rows:
        prompt, chosen, rejected, rendered = renderer.pair_texts(where, row)
        add_pair(data, prompt, chosen, rejected)
        if rendered:
            data[prompt][RENDERED] = True
    return data


def row_prompt(where: str, row: dict, row_format_name: str) -> str:
    """The prompt a checked row belongs to, in any format (for chat rows, its messages as JSON)."""
    if row_format_name == HH:
        return transcript_prompt(row["chosen"], where)
    return prompt_key(where, row) if is_chat_row(row) else with_system_text(system_text(where, row), row["prompt"])


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


class SplitName(NamedTuple):
    """What a split's name says: our split, the rest of the name, and whether the split word leads it."""

    split: str
    rest: str
    leading: bool


def split_name(name: str) -> Optional[SplitName]:
    """Which of our splits a split's (or a data file's) name names, if any.

    Its last word, after the last `_`, `-` or `.`, ignoring case, is one of a split's words
    (`SPLIT_WORDS`): `train`, `dpo_train`, `my.valid`; or, as the Hub names the splits of datasets with
    several kinds of data, its first word is, followed by other words: `train_prefs`, `test_sft`.
    """
    words = WORD_SEPARATORS.split(name.lower())
    for word, rest, leading in ((words[-1], words[:-1], False), (words[0], words[1:], True)):
        split = next((split for split, split_words in SPLIT_WORDS.items() if word in split_words), None)
        if split is not None and (rest or not leading):
            return SplitName(split, "_".join(rest), leading)
    return None


def split_of_file(name: str) -> Optional[str]:
    """'train' or 'test' when a data file's name ends with a split's word, else None.

    The rule: take the file name without its folder, its data suffix (.jsonl, .json, .parquet,
    optionally .gz) and a shard number like `-00000-of-00003`; its last word, after the last `_`,
    `-` or `.`, ignoring case, must be one of the split's words (`SPLIT_WORDS`). So `train.jsonl`,
    `dpo_train.jsonl`, `train-00000-of-00001.parquet` and `my.valid.json.gz` name splits, while
    `contest.jsonl` does not; `train_sft.jsonl` names one the Hub's way (`hub_split_of_file`).
    """
    named = file_split_name(name)
    return named.split if named is not None and not named.leading else None


def file_split_name(name: str) -> Optional[SplitName]:
    if data_suffix(name) is None:
        return None
    return split_name(SHARD_NUMBER.sub("", os.path.basename(name_parts(name)[0])))


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

    The train split is the one file or complete set of shards whose name ends with a train word
    (`split_of_file`); failing that, one named the Hub's way (`train_prefs`, `train_sft`: when there
    are several, the preference one, see `PREFERENCE_SPLITS`). The test split is the file named for
    test the same way (`test.jsonl`; `test_prefs` beside `train_prefs`). Without one, there is no
    'test' entry and the caller holds out 5% of the train split's prompts.
    """
    files = directory_files(directory)
    ending = {split: groups_of(files, lambda file, split=split: split_of_file(file) == split) for split in SPLITS}
    if ending["train"]:
        found = {"train": one_group(name, "train", ending["train"])}
        if ending["test"]:
            found["test"] = one_group(name, "test", ending["test"])
        return found
    leading = {file: named for file in files if (named := file_split_name(file)) is not None and named.leading}
    rests = sorted({named.rest for named in leading.values() if named.split == "train"})
    if not rests:
        raise no_split_file(directory, name, "train")
    rest = preferred_rest(rests, lambda rests: DataError(
        f"directory {name} holds several train splits ({', '.join('train_' + r for r in rests)}) and none of them "
        "is preference data by name; move the others out of it, or give it as {path: ..., split: ...}"))
    trains = groups_of(files, lambda file: leading.get(file) == ("train", rest, True))
    found = {"train": one_group(name, "train", trains)}
    tests = groups_of(files, lambda file: leading.get(file) == ("test", rest, True))
    if tests:
        found["test"] = one_group(name, "test", tests)
    elif ending["test"]:
        found["test"] = one_group(name, "test", ending["test"])
    return found


# The rest of a Hub-style split's name that marks preference data, chosen among several train splits.
PREFERENCE_SPLITS = ("prefs", "preferences", "pairs", "dpo", "binarized", "comparisons")


def preferred_rest(rests: list[str], ambiguous) -> str:
    """The one rest among several split names' rests that names preference data, else `ambiguous(rests)` raised."""
    if len(rests) == 1:
        return rests[0]
    preferred = [rest for rest in rests if rest in PREFERENCE_SPLITS]
    if len(preferred) != 1:
        raise ambiguous(rests)
    return preferred[0]


def groups_of(files: list[str], wanted) -> dict[str, list[str]]:
    """The wanted files, grouped by shard set (`file_group`)."""
    groups: dict[str, list[str]] = {}
    for file in files:
        if wanted(file):
            groups.setdefault(file_group(file), []).append(file)
    return groups


def one_group(name: str, split: str, groups: dict[str, list[str]]) -> list[str]:
    if len(groups) > 1:
        raise several_split_files(name, split, groups)
    (shards,) = groups.values()
    check_shards_complete(name, split, shards)
    return shards


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


def held_out_layout(train_files: list[str]) -> dict[str, list[str]]:
    """What `report_layout` prints for a directory with no test file."""
    train = ", ".join(train_files)
    return {"train": [f"{train} less the {TEST_PERCENT}% of its prompts held out for test"],
            "test": [f"{TEST_PERCENT}% of {train}'s prompts (chosen by hash)"]}


def report_layout(name: str, files: dict[str, list[str]]) -> None:
    line = f"dataset {name}: " + "; ".join(f"{split} <- {', '.join(names)}" for split, names in files.items())
    if line not in _REPORTED_LAYOUTS:
        _REPORTED_LAYOUTS.add(line)
        print(line)


def checked_rows(paths: list[str], name: str) -> tuple[list[LocatedRow], str]:
    """The rows of the files, in order, under our field names, all checked against the format the first row calls
    for; `name` is what `datasets=[...]` called them."""
    rows = recognised_rows([located for path in paths for located in read_rows(path)], name)
    return rows, check_rows(rows)


class LocalPreferenceFiles(PreferenceSource):
    """Preference pairs from a local file or directory (see the module docstring for row formats).

    `path` is either
    - a directory holding a train and usually a test file (`split_files` says which name is
      which: `train.jsonl`, `dpo_eval.jsonl`, `validation.parquet.gz`, `train_prefs-00000-of-00001.parquet`,
      ...), each .jsonl, .json or .parquet, optionally gzipped, or in shards (`train-00000-of-00002.parquet`,
      read in order), directly or under `data/`; each split is read from its file(s), and without a test
      file 5% of the train file's prompts are held out as for a single file; or
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
        fix = "add more prompts or give a directory with a train and a test file"
        if os.path.isdir(self.path):
            files = split_files(self.path, self.name)
            if not silent:
                report_layout(self.name, files if "test" in files else held_out_layout(files["train"]))
            paths = [os.path.join(self.path, file) for file in files.get(split, files["train"])]
            rows, row_format_name = checked_rows(paths, self.name)
            if "test" in files:
                return rows, row_format_name
        else:
            rows, row_format_name = checked_rows([self.single_file()], self.name)
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
