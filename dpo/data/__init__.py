"""Preference datasets: a registry of sources that each load `prompt -> {responses, pairs, sft_target}`.

The structure is the reference implementation's: for every prompt, a list of response strings,
a list of `(preferred_index, dispreferred_index)` pairs into it, and one response to imitate
during SFT. A new dataset is one `PreferenceSource` subclass in a new module of this package,
decorated with `@register_dataset`; the module is imported automatically. Besides registered names,
`datasets=[...]` takes local paths (`dpo.data.local`), mappings such as `{path: ..., split: ...,
columns: {...}}` and named ones in config/dataset/ (`dpo.data.hub`); rows may be chat messages,
rendered with the tokenizer's chat template (`dpo.data.chat`).

Every source's output passes through `clean_pairs`, which applies the rules that hold for all
data (see the README, "Data rules"): pairs with an empty prompt, an empty response or with
chosen == rejected (as text, or as tokens when a tokenizer is given, or as tokens after truncation
when the batching's lengths are given) are skipped, counted and reported once.
"""

from __future__ import annotations

import importlib
import os
import pkgutil
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional, Union

from dpo.data.tokens import check_tokens, unknown_token_warning
from dpo.errors import DataError

PreferenceData = dict  # prompt -> {"responses": [str], "pairs": [(int, int)], "sft_target": str}

# Set on a prompt's entry when a chat template wrote its texts: templates may end every turn with the EOS
# token, so the EOS checks meant for raw text do not apply (dpo.data.chat checks the messages instead).
RENDERED = "rendered_by_chat_template"

LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet")
DIRECTORY_HINT = ("a directory holding a train and a test file (train.jsonl and test.jsonl, or names like "
                  "dpo_train.jsonl, validation.parquet, data/train-00000-of-00001.parquet)")

EMPTY_PROMPT = "pairs with an empty prompt"
EMPTY_PROMPT_SFT = "SFT targets with an empty prompt"
EMPTY_RESPONSE = "pairs with an empty response"
SAME_TEXT = "pairs with chosen == rejected"
SAME_TOKENS = "pairs with chosen == rejected once tokenized"
SAME_TRUNCATED = "pairs with chosen == rejected once truncated to max_length"
NOTHING_LEFT = "prompts with no usable pair or SFT target"


@dataclass(frozen=True)
class SplitData:
    """One split of one dataset: the reference's dict, how to cut its over-long prompts, and what was skipped.

    `truncation_mode` travels with the data because a local source only knows it once it has read
    the files (HH transcripts keep the end of their prompts, other rows the start).
    """

    data: PreferenceData
    truncation_mode: str
    skipped: Counter = field(default_factory=Counter)


class PreferenceSource:
    """One named preference dataset.

    Subclasses set `name` (the value users put in `datasets=[...]`), may set `truncation_mode`
    (`keep_end` keeps the end of over-long prompts, right for multi-turn transcripts) and
    implement `load`. A source that can score responses programmatically sets `judge` to a
    method `judge(prompt, response) -> float in [0, 1]`; the trainer then scores eval samples.
    """

    name: str = ""
    truncation_mode: str = "keep_start"
    judge: Optional[Callable[[str, str], float]] = None

    def __init__(self) -> None:
        # Rows the loader dropped for format-specific reasons, reported once by `get_dataset`.
        self.skipped: Counter = Counter()

    def load(self, split: str, silent: bool = False, cache_dir: Optional[str] = None) -> PreferenceData:
        raise NotImplementedError

    def load_split(self, split: str, silent: bool = False, cache_dir: Optional[str] = None) -> SplitData:
        """`load(split)` with the truncation mode its prompts need.

        A source whose truncation mode depends on what it reads (local files) overrides this.
        """
        return SplitData(self.load(split, silent=silent, cache_dir=cache_dir), self.truncation_mode)


_SOURCES: dict[str, type[PreferenceSource]] = {}


def register_dataset(cls: type[PreferenceSource]) -> type[PreferenceSource]:
    """Class decorator: make `cls` available as `datasets=[cls.name]`."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} must set a non-empty `name` to be registered")
    _SOURCES[cls.name] = cls
    return cls


def dataset_names() -> list[str]:
    return sorted(_SOURCES)


def is_local_path(name: str) -> bool:
    """A dataset name is a path if it names something on disk or looks like a file or folder."""
    return (
        os.path.exists(name)
        or os.sep in name
        or name.startswith((".", "~"))
        or any(suffix in name for suffix in LOCAL_SUFFIXES)
    )


# What `datasets=[...]` may hold: a registered name, a named entry of config/dataset/, a local path, a
# mapping `{path: ..., split: ..., columns: {...}}` (see `dpo.data.hub`), or an already built source.
DatasetEntry = Union[str, Mapping, PreferenceSource]


def dataset_source(entry: DatasetEntry, tokenizer=None) -> PreferenceSource:
    """The source for an entry of `datasets=[...]` (see `DatasetEntry`), loading nothing yet.

    `tokenizer` renders chat rows with its chat template; without one, data holding chat rows is refused
    when it is loaded. A `PreferenceSource` is returned as it is.
    """
    from dpo.data.hub import MappedDatasetSource, named_entry, named_entry_names
    from dpo.data.local import LocalPreferenceFiles

    if isinstance(entry, PreferenceSource):
        return entry
    if isinstance(entry, Mapping):
        return MappedDatasetSource(entry, tokenizer)
    if not isinstance(entry, str):
        raise DataError(f"datasets entry {entry!r} is {type(entry).__name__}; give a dataset name, a path, or a "
                        "mapping like {path: my/dataset, split: train}")
    if entry in _SOURCES:
        return _SOURCES[entry]()
    named = named_entry(entry)
    if named is not None:
        return MappedDatasetSource(named.entry, tokenizer, label=entry, where=named.path)
    if is_local_path(entry):
        from dpo.data.hub import is_saved_to_disk

        if is_saved_to_disk(os.path.expanduser(entry)):  # read as {path: entry} is
            return MappedDatasetSource({"path": entry}, tokenizer, label=entry)
        return LocalPreferenceFiles(entry, tokenizer)
    raise DataError(
        f"unknown dataset '{entry}' in datasets=[...]: valid names are {', '.join(dataset_names())}, the entries of "
        f"config/dataset/ ({', '.join(named_entry_names()) or 'none'}), a path to a local .jsonl/.json/.parquet file "
        f"(optionally .gz) or to {DIRECTORY_HINT}, or a mapping like {{path: my/hub_dataset, split: train}}"
    )


def get_dataset(name: DatasetEntry, split: str, silent: bool = False, cache_dir: Optional[str] = None,
                tokenizer=None) -> PreferenceData:
    """Load dataset `name` (any `DatasetEntry`) for `split`, as the reference's dict.

    Data holding chat rows needs a `tokenizer` with a chat template to render them.
    """
    source = dataset_source(name, tokenizer)
    return load_source(source, split, silent=silent, cache_dir=cache_dir, tokenizer=tokenizer).data


# Whether a pair's two responses are the same tokens once cut to the batches' lengths:
# (truncation mode, characters the tokenizer does not know) -> (prompt, chosen, rejected) -> bool.
TruncatedTie = Callable[[str, frozenset], Callable[[str, str, str], bool]]


def load_source(source: PreferenceSource, split: str, silent: bool = False, cache_dir: Optional[str] = None,
                tokenizer=None, truncated_tie: Optional[TruncatedTie] = None) -> SplitData:
    """`source.load_split(split)` cleaned by `clean_pairs`; every skip is counted in `source.skipped` and printed once.

    With a `tokenizer` that emits an unknown token, pairs whose responses it cannot tell apart are
    skipped too, and a warning says when much of the text is unknown to it (see `dpo.data.tokens`).
    With `truncated_tie` (see `dpo.batching.TruncatedTies`), so are pairs whose responses become the
    same tokens once truncated: they give no gradient and count as wrong in reward accuracy.
    """
    source.skipped.clear()
    loaded = source.load_split(split, silent=silent, cache_dir=cache_dir)
    label = f"dataset {source.name} ({split})"
    tokens = check_tokens(tokenizer, loaded.data)
    if tokens is not None and tokens.too_many_unknown:
        # Printed even when silent: a run on text its tokenizer cannot read learns nothing, however quiet.
        print(f"warning: {unknown_token_warning(label, tokenizer, tokens.unknown_share)}")
    same_tokens = tokens.same_tokens if tokens is not None else None
    unknown = frozenset(tokens.unknown_characters) if tokens is not None else frozenset()
    same_truncated = truncated_tie(loaded.truncation_mode, unknown) if truncated_tie is not None else None
    data = clean_pairs(loaded.data, source.skipped, same_tokens, same_truncated)
    if not silent and source.skipped:
        n_pairs = sum(len(example["pairs"]) for example in data.values())
        print(f"{label}: kept {n_pairs} pairs over {len(data)} prompts; skipped {describe_skips(source.skipped)}")
    if not data:
        raise no_usable_examples(label, source.skipped)
    return SplitData(data, loaded.truncation_mode, Counter(source.skipped))


def describe_skips(skipped: Counter) -> str:
    """'pairs with an empty response: 3; prompts with ...: 1', the form the skip report prints."""
    return "; ".join(f"{reason}: {count}" for reason, count in sorted(skipped.items()))


def no_usable_examples(label: str, skipped: Counter) -> DataError:
    if not skipped:
        return DataError(f"{label} holds no examples; add prompts with preference pairs to it")
    return DataError(f"{label} has no usable examples after skipping bad rows (skipped {describe_skips(skipped)}); "
                     "fix those rows (see the README's Data rules) or choose another dataset")


def clean_pairs(data: PreferenceData, skipped: Counter,
                same_tokens: Optional[Callable[[str, str], bool]] = None,
                same_truncated: Optional[Callable[[str, str, str], bool]] = None) -> PreferenceData:
    """Drop pairs that carry no usable preference; keep prompts that still have a pair or an SFT target.

    A prompt that is empty (or all whitespace) loses its pairs and SFT target: generation would
    have nothing to continue. A pair is dropped when either response is empty (the model would be
    trained to emit EOS at once) or both responses are the same text, or, when `same_tokens` says
    so, the same tokens (the DPO gradient is zero and the pair would count as a wrong prediction
    in reward accuracy), or, when `same_truncated(prompt, chosen, rejected)` says so, the same tokens
    once truncated. `skipped` gains one count per reason.
    """
    cleaned: PreferenceData = {}
    for prompt, example in data.items():
        if not prompt.strip():
            count_empty_prompt(example, skipped)
            continue
        responses = example["responses"]
        tie = (lambda chosen, rejected, prompt=prompt: same_truncated(prompt, chosen, rejected)) \
            if same_truncated is not None else None
        pairs = [tuple(pair) for pair in example["pairs"]
                 if is_usable_pair(responses, pair, skipped, same_tokens, tie)]
        sft_target = example.get("sft_target", "")
        if not sft_target.strip():
            sft_target = ""
        if pairs or sft_target:
            cleaned[prompt] = {**example, "pairs": pairs, "sft_target": sft_target}
        else:
            skipped[NOTHING_LEFT] += 1
    return cleaned


def is_usable_pair(responses: list[str], pair: tuple[int, int], skipped: Counter,
                   same_tokens: Optional[Callable[[str, str], bool]],
                   same_truncated: Optional[Callable[[str, str], bool]] = None) -> bool:
    """Whether a pair carries a preference; if not, count why in `skipped`."""
    chosen, rejected = responses[pair[0]], responses[pair[1]]
    if not chosen.strip() or not rejected.strip():
        reason = EMPTY_RESPONSE
    elif chosen == rejected:
        reason = SAME_TEXT
    elif same_tokens is not None and same_tokens(chosen, rejected):
        reason = SAME_TOKENS
    elif same_truncated is not None and same_truncated(chosen, rejected):
        reason = SAME_TRUNCATED
    else:
        return True
    skipped[reason] += 1
    return False


def count_empty_prompt(example: dict, skipped: Counter) -> None:
    if example["pairs"]:
        skipped[EMPTY_PROMPT] += len(example["pairs"])
    elif example.get("sft_target", "").strip():
        skipped[EMPTY_PROMPT_SFT] += 1
    else:
        skipped[NOTHING_LEFT] += 1


def add_pair(data: PreferenceData, prompt: str, chosen: str, rejected: str) -> None:
    """Append one (chosen, rejected) pair for `prompt`, as the reference's hh loader does.

    The latest non-empty chosen response becomes the prompt's SFT target.
    """
    example = data.setdefault(prompt, {"responses": [], "pairs": [], "sft_target": ""})
    n_responses = len(example["responses"])
    example["responses"].extend([chosen, rejected])
    example["pairs"].append((n_responses, n_responses + 1))
    if chosen.strip():
        example["sft_target"] = chosen


def load_hub_dataset(hub_name: str, split: Optional[str], cache_dir: Optional[str] = None,
                     config_name: Optional[str] = None):
    """`datasets.load_dataset(hub_name, config_name, split=split)`, with a failure explained in one sentence.

    With `split=None`, all splits, as a `DatasetDict`. `hub_name` may also be a local data folder.
    """
    import datasets

    options = {"split": split, "cache_dir": cache_dir}
    if config_name:
        options["name"] = config_name
    try:
        return datasets.load_dataset(hub_name, **options)
    except Exception as error:  # network, auth and missing-split errors come in many types
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        what = hub_name + (f" (subset {config_name})" if config_name else "") + (f" ({split} split)" if split else "")
        origin = "as a local dataset folder" if os.path.isdir(hub_name) else "from the Hugging Face hub"
        raise DataError(f"could not load {what} {origin}: {reason}; check your network (or HF_HUB_OFFLINE and the "
                        "cache), or use a local copy: datasets=[/path/to/files]") from None


def _import_all_sources() -> None:
    for module in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{module.name}")


_import_all_sources()
