"""Stanford Human Preferences (SHP): pairs of Reddit comments to one post, preferred by votes.

As in the reference, a pair is kept only when one comment scored at least twice the other, so
that the preference is clear, and each prompt's SFT target is its highest-scored kept comment.
"""

from __future__ import annotations

from collections import Counter
from typing import Iterable, Optional

from dpo.data import PreferenceData, PreferenceSource, load_hub_dataset, register_dataset

HUB_NAME = "stanfordnlp/SHP"
MIN_SCORE_RATIO = 2


def score_ratio(score_a: float, score_b: float) -> float:
    """How many times the better comment outscored the other; infinite against a zero score."""
    if score_a == 0 or score_b == 0:
        return float("inf")
    return max(score_a / score_b, score_b / score_a)


def shp_rows_to_data(rows: Iterable[dict], skipped: Counter) -> PreferenceData:
    """Convert SHP rows into the preference dict, keeping pairs with a score ratio of at least 2.

    `labels == 1` means comment A is preferred (see the SHP dataset card). A pair where both
    comments scored zero carries no preference and is skipped, counted.
    """
    data: PreferenceData = {}
    scores: dict[str, list] = {}
    for row in rows:
        if row["score_A"] == 0 and row["score_B"] == 0:
            skipped["pairs with both scores zero"] += 1
            continue
        if score_ratio(row["score_A"], row["score_B"]) < MIN_SCORE_RATIO:
            skipped[f"pairs with score ratio below {MIN_SCORE_RATIO}"] += 1
            continue
        prompt = "\n\nHuman: " + row["history"] + "\n\nAssistant:"
        example = data.setdefault(prompt, {"responses": [], "pairs": [], "sft_target": ""})
        n = len(example["responses"])
        example["pairs"].append((n, n + 1) if row["labels"] == 1 else (n + 1, n))
        example["responses"].extend([" " + row["human_ref_A"], " " + row["human_ref_B"]])
        scores.setdefault(prompt, []).extend([row["score_A"], row["score_B"]])
    for prompt, example in data.items():
        prompt_scores = scores[prompt]
        best = max(range(len(prompt_scores)), key=prompt_scores.__getitem__)
        example["sft_target"] = example["responses"][best]
    return data


@register_dataset
class SHPSource(PreferenceSource):
    """stanfordnlp/SHP from the Hugging Face hub (splits train, validation, test)."""

    name = "shp"
    truncation_mode = "keep_start"

    def load(self, split: str, silent: bool = False, cache_dir: Optional[str] = None) -> PreferenceData:
        self.skipped.clear()
        if not silent:
            print(f"Loading SHP dataset ({split} split) from Huggingface...")
        dataset = load_hub_dataset(HUB_NAME, split, cache_dir)
        return shp_rows_to_data(dataset, self.skipped)
