"""Preference data read with the `datasets` library: a mapping entry in `datasets=[...]`, or a named one.

An entry is a mapping (on the command line `'datasets=[{path: my/dataset, split: train_prefs}]'`):

- `path`: a Hugging Face hub dataset id, a directory written by `Dataset.save_to_disk` or
  `DatasetDict.save_to_disk`, a local .jsonl/.json/.parquet file (optionally .gz), or a local data
  folder (read by `datasets.load_dataset`, which names splits by file name, e.g. `data/test-0000...`);
- `name`: the hub dataset's config (subset), if it has several;
- `split`: the split to train on (default `train`);
- `test_split`: the split to evaluate on; by default `test` when the dataset has one, else a held-out
  5% of the train split's prompts (chosen by prompt hash, as for a single local file);
- `columns`: our field names (prompt, chosen, rejected, system) mapped to the dataset's column names; a
  field not mapped is read from the column of its own name or of a name other projects use for it
  (`dpo.data.local.COLUMN_NAMES`: question, instruction, conversations, response_j, ...), and `prompt`
  may be absent (HH transcripts, or chat rows whose shared leading turns are the prompt).

Without `split`, the `train` split is read, or, in a dataset without one, its one Hub-style train split
(`train_prefs`, `train_sft`; among several, the preference one). Without `test_split`, the train
split's partner is evaluated on: `test` (or `validation`, `eval`, ...) for `train`, `test_prefs` for
`train_prefs`; only a dataset with none holds out 5% of the train split's prompts.

Rows then follow the local files' formats (`dpo.data.local`): prompt/chosen/rejected strings, HH
transcripts, or chat messages. A named entry, `datasets=[ultrafeedback_binarized]`, is such a mapping
kept in `config/dataset/<name>.yaml` (not `config/datasets/`: Hydra would take a config group named
`datasets` for the `datasets=` override and refuse it). A source's `name` is a short label: the entry's
name, or the path's last part plus the config and any split other than `train`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Callable, Optional

from dpo.data import PreferenceData, PreferenceSource, SplitData, is_local_path, load_hub_dataset
from dpo.data.chat import ChatRenderer
from dpo.data.local import (SPLIT_WORDS, SPLITS, TEST_PERCENT, WORD_SEPARATORS, LocatedRow, check_rows, data_suffix,
                            preferred_rest, read_rows, recognised_columns, renamed_row, report_layout, rows_of_split,
                            rows_to_split_data, split_name, unknown_layout)
from dpo.errors import DataError

ENTRY_KEYS = ("path", "name", "split", "test_split", "columns")
FIELDS = ("prompt", "chosen", "rejected", "system")
REQUIRED_FIELDS = ("chosen", "rejected")
DEFAULT_SPLIT = "train"
DEFAULT_TEST_SPLIT = "test"
NAMED_FOLDER = "dataset"
# A Dataset saved alone, or a single data file, has no split names: it is this one split.
SINGLE_SPLIT = "train"
PATH_HINT = ("a Hugging Face hub dataset id, a directory written by save_to_disk, or a local .jsonl/.json/.parquet "
             "file or data folder")


# ---- entries ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class MappedEntry:
    """A checked mapping entry (see the module docstring)."""

    path: str
    name: Optional[str] = None
    split: str = DEFAULT_SPLIT
    test_split: Optional[str] = None
    columns: dict[str, str] = field(default_factory=dict)
    split_given: bool = False  # without one, a dataset with no `train` split may train on `train_prefs`

    @property
    def label(self) -> str:
        """A short name for logs and batches: `ultrafeedback_binarized:train_prefs`, `my_ds`, `glue/mrpc`."""
        label = os.path.basename(self.path.rstrip("/" + os.sep)) or self.path
        if self.name:
            label += f"/{self.name}"
        return label if self.split == DEFAULT_SPLIT else f"{label}:{self.split}"


def parse_entry(entry: Mapping, where: str) -> MappedEntry:
    """Check a mapping entry's keys and values, loading nothing; `where` names it in errors."""
    unknown = [key for key in entry if key not in ENTRY_KEYS]
    if unknown:
        raise DataError(f"{where} has the unknown key '{unknown[0]}'; the valid keys are {', '.join(ENTRY_KEYS)}")
    path = entry.get("path")
    if not isinstance(path, str) or not path.strip():
        raise DataError(f"{where} needs a 'path': {PATH_HINT}")
    for key in ("name", "split", "test_split"):
        value = entry.get(key)
        if value is not None and (not isinstance(value, str) or not value.strip()):
            raise DataError(f"{where} key '{key}' is {value!r}; give a non-empty string, or leave it out")
    split = entry.get("split") or DEFAULT_SPLIT
    if entry.get("test_split") == split:
        raise DataError(f"{where} evaluates on its training split '{split}'; set test_split to another split, "
                        "or leave it out to hold out part of the training split")
    return MappedEntry(path, entry.get("name"), split, entry.get("test_split"), parse_columns(entry, where),
                       split_given=entry.get("split") is not None)


def parse_columns(entry: Mapping, where: str) -> dict[str, str]:
    columns = entry.get("columns")
    if columns is None:
        return {}
    if not isinstance(columns, Mapping):
        raise DataError(f"{where} key 'columns' is {type(columns).__name__}; give a mapping from our fields to "
                        "your columns, like {prompt: question, chosen: good, rejected: bad}")
    for our_field, column in columns.items():
        if our_field not in FIELDS:
            raise DataError(f"{where} maps the unknown field '{our_field}' in columns; the fields are "
                            f"{', '.join(FIELDS)}, each mapped to one of your dataset's column names")
        if not isinstance(column, str) or not column:
            raise DataError(f"{where} maps {our_field} to {column!r} in columns; give a column name")
    return {str(our_field): str(column) for our_field, column in columns.items()}


def describe_entry(entry: Mapping) -> str:
    """`{path: x, split: y}`, as the entry was written."""
    items = (f"{key}: {describe_entry(value) if isinstance(value, Mapping) else value}" for key, value in entry.items())
    return "{" + ", ".join(items) + "}"


# ---- named entries ------------------------------------------------------------------------------

@dataclass(frozen=True)
class NamedEntry:
    path: str
    entry: Mapping


def named_entries_dir() -> str:
    from dpo.config import CONFIG_DIR  # here, not at the top: dpo.config imports dpo.data

    return os.path.join(CONFIG_DIR, NAMED_FOLDER)


def named_entry_names() -> list[str]:
    folder = named_entries_dir()
    if not os.path.isdir(folder):
        return []
    return sorted(name[: -len(".yaml")] for name in os.listdir(folder) if name.endswith(".yaml"))


def named_entry(name: str) -> Optional[NamedEntry]:
    """The mapping kept in `config/dataset/<name>.yaml`, or None when there is no such file."""
    if not name or "/" in name or os.sep in name or name.startswith((".", "~")):
        return None
    path = os.path.join(named_entries_dir(), f"{name}.yaml")
    if not os.path.isfile(path):
        return None
    import yaml

    try:
        with open(path, encoding="utf-8") as file:
            entry = yaml.safe_load(file)
    except yaml.YAMLError as error:
        raise DataError(f"{path} is not valid YAML ({str(error).splitlines()[0]}); fix it") from None
    if not isinstance(entry, Mapping):
        raise DataError(f"{path} holds {type(entry).__name__}, not a mapping; write keys like path: my/dataset")
    return NamedEntry(path, entry)


# ---- reading splits ----------------------------------------------------------------------------

@dataclass(frozen=True)
class SplitTable:
    """One split's column names, and how to read its rows (only the given columns) once they are known good."""

    columns: list[str]
    read: Callable[[list[str]], list[LocatedRow]]


def is_saved_to_disk(path: str) -> bool:
    """Whether `path` is a directory written by `Dataset.save_to_disk` or `DatasetDict.save_to_disk`."""
    return os.path.isfile(os.path.join(path, "dataset_dict.json")) or (
        os.path.isfile(os.path.join(path, "state.json")) and os.path.isfile(os.path.join(path, "dataset_info.json")))


def dataset_table(dataset, label: str, split: str) -> SplitTable:
    def read(columns: list[str]) -> list[LocatedRow]:
        if not dataset.num_rows:  # select_columns fails on a dataset without rows
            return []
        rows = dataset.select_columns(columns).to_list()
        return [(f"row {number} of {label} ({split})", row) for number, row in enumerate(rows, start=1)]

    return SplitTable(list(dataset.column_names), read)


def file_table(path: str) -> SplitTable:
    """A local data file read as `datasets=[file]` reads it, so that its errors name the file and line."""
    rows = read_rows(path)
    columns = list(dict.fromkeys(key for _, row in rows if isinstance(row, dict) for key in row))

    def read(wanted: list[str]) -> list[LocatedRow]:
        return [(where, {key: row[key] for key in wanted if key in row} if isinstance(row, dict) else row)
                for where, row in rows]

    return SplitTable(columns, read)


def read_split_tables(entry: MappedEntry, label: str, cache_dir: Optional[str]) -> tuple[dict[str, SplitTable], bool]:
    """Every split of the entry's data, and whether the data has no split names (a single Dataset or file)."""
    import datasets

    path = os.path.expanduser(entry.path)
    local = os.path.exists(path)
    if entry.name and local and (is_saved_to_disk(path) or os.path.isfile(path)):
        raise DataError(f"dataset {label}: name ({entry.name}) selects a hub dataset's config, but {entry.path} "
                        "is a local file or save_to_disk directory, which has none; remove name")
    if local and is_saved_to_disk(path):
        loaded = load_saved(path, label)
    elif local and os.path.isfile(path):
        if data_suffix(path) is None:
            raise DataError(f"dataset {label}: {entry.path} is not a .jsonl, .json or .parquet file (optionally .gz); "
                            f"give {PATH_HINT}")
        return {SINGLE_SPLIT: file_table(path)}, True
    elif not local and is_local_path(entry.path) and not looks_like_hub_id(entry.path):
        raise DataError(f"dataset path {entry.path} does not exist; give {PATH_HINT}")
    else:
        loaded = load_hub_dataset(entry.path, None, cache_dir, config_name=entry.name)
    if isinstance(loaded, datasets.Dataset):
        return {SINGLE_SPLIT: dataset_table(loaded, label, SINGLE_SPLIT)}, True
    return {split: dataset_table(dataset, label, split) for split, dataset in loaded.items()}, False


def load_saved(path: str, label: str):
    """`datasets.load_from_disk(path)`, with a failure (a partial copy, another datasets version) in one sentence."""
    import datasets

    try:
        return datasets.load_from_disk(path)
    except Exception as error:  # the arrow files and the json next to them can fail in many ways
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise DataError(f"dataset {label}: could not read the save_to_disk directory {path} ({reason}); write it "
                        "again with Dataset.save_to_disk or DatasetDict.save_to_disk") from None


def looks_like_hub_id(path: str) -> bool:
    """`owner/name`: what `is_local_path` takes for a path only because it holds a slash."""
    parts = path.split("/")
    return len(parts) == 2 and all(parts) and not path.startswith((".", "~")) and data_suffix(path) is None


# ---- the source ---------------------------------------------------------------------------------

class MappedDatasetSource(PreferenceSource):
    """Preference pairs from a mapping entry (see the module docstring), read with the `datasets` library."""

    truncation_mode = None  # known only once the rows are read: see load_split

    def __init__(self, entry: Mapping, tokenizer=None, label: Optional[str] = None,
                 where: Optional[str] = None) -> None:
        super().__init__()
        self.entry = parse_entry(entry, where or f"datasets entry {describe_entry(entry)}")
        self.name = label or self.entry.label
        self.renderer = ChatRenderer(tokenizer, self.name)

    def load(self, split: str, silent: bool = False, cache_dir: Optional[str] = None) -> PreferenceData:
        return self.load_split(split, silent=silent, cache_dir=cache_dir).data

    def load_split(self, split: str, silent: bool = False, cache_dir: Optional[str] = None) -> SplitData:
        if split not in SPLITS:
            raise DataError(f"dataset {self.name} is read as splits 'train' and 'test', not '{split}'; use one of "
                            "those (set split and test_split in its entry to choose the dataset's splits)")
        self.skipped.clear()
        tables, unnamed = read_split_tables(self.entry, self.name, cache_dir)
        plan = self.split_plan(tables, unnamed)
        if not silent:
            report_layout(self.name, {ours: [describe_source(ours, *source)] for ours, source in plan.items()})
        source_split, held_out = plan[split]
        rows = self.rows(tables[source_split], source_split)
        row_format_name = check_rows(rows)
        if held_out:
            fix = "add more prompts, or set test_split to a split of the dataset"
            rows = rows_of_split(rows, row_format_name, split, f"dataset {self.name}", fix)
        return rows_to_split_data(rows, row_format_name, self.skipped, self.renderer)

    def split_plan(self, tables: dict[str, SplitTable], unnamed: bool) -> dict[str, tuple[str, bool]]:
        """Our train and test splits, each as (the dataset's split, whether it is split by prompt hash)."""
        train = self.train_split(tables)
        self.check_has_split(tables, train, "split", unnamed)
        if self.entry.test_split:
            self.check_has_split(tables, self.entry.test_split, "test_split", unnamed)
            test = (self.entry.test_split, False)
        else:
            partner = test_partner(train, tables)
            test = (partner, False) if partner is not None else (train, True)
        return {"train": (train, test[1]), "test": test}

    def train_split(self, tables: dict[str, SplitTable]) -> str:
        """The entry's split; without one, `train`, or the dataset's one Hub-style train split (`train_prefs`)."""
        if self.entry.split_given or self.entry.split in tables:
            return self.entry.split
        trains = {named.rest: split for split in tables
                  if (named := split_name(split)) is not None and named.split == "train" and named.leading}
        if not trains:
            return self.entry.split  # refused by check_has_split, naming the splits there are
        return trains[preferred_rest(sorted(trains), lambda rests: DataError(
            f"dataset {self.name} has no 'train' split but several others ({', '.join(trains[r] for r in rests)}); "
            f"choose one with split, e.g. {{path: {self.entry.path}, split: {trains[rests[0]]}}}"))]

    def check_has_split(self, tables: dict[str, SplitTable], split: str, key: str, unnamed: bool) -> None:
        if split in tables:
            return
        if unnamed:
            raise DataError(f"dataset {self.name} is a single dataset with no named splits, so {key}: {split} "
                            f"names none of it; remove {key} (or save a DatasetDict with a '{split}' split)")
        raise DataError(f"dataset {self.name} has no split '{split}' (its splits are: {', '.join(tables)}); set "
                        f"{key} to one of them")

    def rows(self, table: SplitTable, split: str) -> list[LocatedRow]:
        """The split's rows with our field names, read only from the columns they come from."""
        columns = self.column_of_field(table)
        rows = [(where, renamed_row(where, row, columns))
                for where, row in table.read(list(dict.fromkeys(columns.values())))]
        if not rows:
            raise DataError(f"dataset {self.name} has no rows in its '{split}' split; choose a split with preference "
                            "rows (set split or test_split)")
        return rows

    def column_of_field(self, table: SplitTable) -> dict[str, str]:
        """Our field -> the dataset's column for it, checked against the columns the dataset has."""
        listing = ", ".join(table.columns) or "none"
        for our_field, column in self.entry.columns.items():
            if column not in table.columns:
                raise DataError(f"dataset {self.name}: columns maps {our_field} to '{column}', which is not one of "
                                f"its columns ({listing}); set columns.{our_field} to one of those")
        columns = recognised_columns(table.columns, self.entry.columns)
        missing = [our_field for our_field in REQUIRED_FIELDS if our_field not in columns]
        if missing and not self.entry.columns:
            raise unknown_layout(f"dataset {self.name}", table.columns, columns, self.entry.path)
        if missing:
            raise DataError(f"dataset {self.name} has no '{missing[0]}' column for {missing[0]} (its "
                            f"columns are: {listing}); map the column that holds it with columns: "
                            f"{{{missing[0]}: <column>}}")
        return columns


def test_partner(train: str, tables: Mapping) -> Optional[str]:
    """The split that evaluates `train`: the same name with a test word for its train word (`test_prefs` for
    `train_prefs`; `test`, else `validation`, `eval`, ... for `train`), else `test`; None when there is none."""
    named = split_name(train)
    if named is not None and named.split == "train":
        words = WORD_SEPARATORS.split(train)
        for word in SPLIT_WORDS["test"]:
            candidate = word + train[len(words[0]):] if named.leading else train[:len(train) - len(words[-1])] + word
            if candidate in tables:
                return candidate
    return DEFAULT_TEST_SPLIT if DEFAULT_TEST_SPLIT in tables and DEFAULT_TEST_SPLIT != train else None


def describe_source(ours: str, split: str, held_out: bool) -> str:
    """Where one of our splits comes from, for the line `report_layout` prints."""
    if not held_out:
        return split
    if ours == "test":
        return f"{TEST_PERCENT}% of {split}'s prompts (chosen by hash)"
    return f"{split} less the {TEST_PERCENT}% of its prompts held out for test"
