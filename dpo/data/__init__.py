"""Preference datasets: a registry of sources that each load `prompt -> {responses, pairs, sft_target}`.

The structure is the reference implementation's: for every prompt, a list of response strings,
a list of `(preferred_index, dispreferred_index)` pairs into it, and one response to imitate
during SFT. A new dataset is one `PreferenceSource` subclass in a new module of this package,
decorated with `@register_dataset`; the module is imported automatically.

Every source's output passes through `clean_pairs`, which applies the rules that hold for all
data (see the README, "Data rules"): pairs with an empty response or with chosen == rejected
are skipped, counted and reported once.
"""

from __future__ import annotations

import importlib
import os
import pkgutil
from collections import Counter
from typing import Callable, Optional

from dpo.errors import DataError

PreferenceData = dict  # prompt -> {"responses": [str], "pairs": [(int, int)], "sft_target": str}

LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet")


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


def dataset_source(name: str) -> PreferenceSource:
    """The source for a name in `datasets=[...]`: a registered name or a local path."""
    if name in _SOURCES:
        return _SOURCES[name]()
    if is_local_path(name):
        from dpo.data.local import LocalPreferenceFiles

        return LocalPreferenceFiles(name)
    raise DataError(
        f"unknown dataset '{name}' in datasets=[...]: valid names are {', '.join(dataset_names())}, "
        "or a path to a local .jsonl/.json/.parquet file (optionally .gz) or to a directory holding "
        "train.* and test.* files"
    )


def get_dataset(name: str, split: str, silent: bool = False, cache_dir: Optional[str] = None) -> PreferenceData:
    """Load dataset `name` (registered or a local path) for `split`, as the reference's dict."""
    return load_source(dataset_source(name), split, silent=silent, cache_dir=cache_dir)


def load_source(source: PreferenceSource, split: str, silent: bool = False,
                cache_dir: Optional[str] = None) -> PreferenceData:
    """`source.load(split)` cleaned by `clean_pairs`; every skip is counted in `source.skipped` and printed once."""
    source.skipped.clear()
    data = clean_pairs(source.load(split, silent=silent, cache_dir=cache_dir), source.skipped)
    n_pairs = sum(len(example["pairs"]) for example in data.values())
    if not silent and source.skipped:
        reasons = "; ".join(f"{reason}: {count}" for reason, count in sorted(source.skipped.items()))
        print(f"dataset {source.name} ({split}): kept {n_pairs} pairs over {len(data)} prompts; skipped {reasons}")
    if not data:
        raise DataError(f"dataset {source.name} ({split}) has no usable examples after skipping bad rows")
    return data


def clean_pairs(data: PreferenceData, skipped: Counter) -> PreferenceData:
    """Drop pairs that carry no usable preference; keep prompts that still have a pair or an SFT target.

    A pair is dropped when either response is empty (the model would be trained to emit EOS at
    once) or both responses are the same text (the DPO gradient is zero and the pair would count
    as a wrong prediction in reward accuracy). `skipped` gains one count per reason.
    """
    cleaned: PreferenceData = {}
    for prompt, example in data.items():
        responses = example["responses"]
        pairs = []
        for chosen, rejected in example["pairs"]:
            if not responses[chosen].strip() or not responses[rejected].strip():
                skipped["pairs with an empty response"] += 1
            elif responses[chosen] == responses[rejected]:
                skipped["pairs with chosen == rejected"] += 1
            else:
                pairs.append((chosen, rejected))
        sft_target = example.get("sft_target", "")
        if not sft_target.strip():
            sft_target = ""
        if pairs or sft_target:
            cleaned[prompt] = {**example, "pairs": pairs, "sft_target": sft_target}
        else:
            skipped["prompts with no usable pair or SFT target"] += 1
    return cleaned


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


def load_hub_dataset(hub_name: str, split: str, cache_dir: Optional[str] = None):
    """`datasets.load_dataset(hub_name, split=split)`, with a failure explained in one sentence."""
    import datasets

    try:
        return datasets.load_dataset(hub_name, split=split, cache_dir=cache_dir)
    except Exception as error:  # network, auth and missing-split errors come in many types
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise DataError(f"could not load {hub_name} ({split} split) from the Hugging Face hub: {reason}; check your "
                        "network (or HF_HUB_OFFLINE and the cache), or use a local copy: datasets=[/path/to/files]") from None


def _import_all_sources() -> None:
    for module in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{module.name}")


_import_all_sources()
