"""StackExchange preferences: questions with several answers ranked by a vote-based `pm_score`.

The hub dataset has only a train split; as in the reference, it is shuffled with seed 42 and
its first 1% is the test split. Questions and answers are HTML; `strip_html_tags` turns them
into plain paragraphs while keeping code recognisable as `<code>...</code>`.
"""

from __future__ import annotations

import re
from collections import Counter
from html.parser import HTMLParser
from typing import Iterable, Optional

from dpo.data import PreferenceData, PreferenceSource, load_hub_dataset, register_dataset
from dpo.errors import DataError

HUB_NAME = "HuggingFaceH4/stack-exchange-preferences"
TEST_FRACTION = 0.01
SHUFFLE_SEED = 42

BLOCK_TAGS = {"p", "pre", "li", "h1", "h2", "h3", "h4", "h5", "h6", "blockquote", "div", "ul", "ol", "hr", "table", "tr"}


class _PlainTextParser(HTMLParser):
    """Collects text as paragraphs: one per block element, code kept as `<code>...</code>`."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.paragraphs: list[str] = []
        self.current: list[str] = []
        self.pre_depth = 0

    def handle_starttag(self, tag: str, attrs) -> None:
        if tag in BLOCK_TAGS:
            self.end_paragraph()
        if tag == "pre":
            self.pre_depth += 1
        elif tag == "code":
            self.current.append("<code>")
        elif tag == "br":
            self.current.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag == "code":
            self.current.append("</code>")
        elif tag == "pre":
            self.pre_depth = max(0, self.pre_depth - 1)
        if tag in BLOCK_TAGS:
            self.end_paragraph()

    def handle_data(self, data: str) -> None:
        # Outside <pre>, source line breaks and indentation are layout, not content (as in a browser).
        self.current.append(data if self.pre_depth else re.sub(r"\s+", " ", data))

    def end_paragraph(self) -> None:
        paragraph = "".join(self.current).strip()
        if paragraph:
            self.paragraphs.append(paragraph)
        self.current = []


def strip_html_tags(html: str) -> str:
    """Plain text of StackExchange HTML: tags removed, code kept as `<code>...</code>` (the reference's name).

    Block elements (p, pre, li, headings, blockquote, div) become paragraphs separated by a blank
    line; code, both `<pre><code>` blocks and inline `<code>`, keeps its tags so the model sees
    where code starts and ends; entities are unescaped.
    """
    parser = _PlainTextParser()
    parser.feed(html)
    parser.close()
    parser.end_paragraph()
    return "\n\n".join(parser.paragraphs)


def se_rows_to_data(rows: Iterable[dict], skipped: Counter) -> PreferenceData:
    """Convert StackExchange rows (question HTML, answers with pm_score) into the preference dict.

    Every two answers with different scores make a pair, the higher-scored first; answers with
    equal scores express no preference, so that pair is skipped and counted (the reference
    paired them in arbitrary order). The SFT target is the highest-scored answer.
    """
    data: PreferenceData = {}
    for row in rows:
        prompt = "\n\nHuman: " + strip_html_tags(row["question"]) + "\n\nAssistant:"
        answers = row["answers"]
        if not answers:
            skipped["questions without answers"] += 1
            continue
        responses = [" " + strip_html_tags(answer["text"]) for answer in answers]
        scores = [answer["pm_score"] for answer in answers]
        pairs = []
        for i in range(len(answers)):
            for j in range(i + 1, len(answers)):
                if scores[i] == scores[j]:
                    skipped["answer pairs with equal scores"] += 1
                else:
                    pairs.append((i, j) if scores[i] > scores[j] else (j, i))
        best = max(range(len(scores)), key=scores.__getitem__)
        data[prompt] = {"responses": responses, "pairs": pairs, "sft_target": responses[best]}
    return data


def check_split(split: str) -> None:
    """Refuse split names other than the two this source derives, before any download."""
    if split not in ("train", "test"):
        raise DataError(f"dataset se has splits 'train' and 'test', not '{split}'; use one of those")


def select_split(dataset, split: str):
    """The reference's split of the hub's only split: shuffle with seed 42, first 1% is 'test'."""
    check_split(split)
    dataset = dataset.shuffle(seed=SHUFFLE_SEED)
    n_test = int(len(dataset) * TEST_FRACTION)
    indices = range(n_test) if split == "test" else range(n_test, len(dataset))
    return dataset.select(indices)


@register_dataset
class SESource(PreferenceSource):
    """HuggingFaceH4/stack-exchange-preferences from the Hugging Face hub."""

    name = "se"
    truncation_mode = "keep_start"

    def load(self, split: str, silent: bool = False, cache_dir: Optional[str] = None) -> PreferenceData:
        check_split(split)
        self.skipped.clear()
        if not silent:
            print(f"Loading SE dataset ({split} split) from Huggingface...")
        dataset = load_hub_dataset(HUB_NAME, "train", cache_dir)
        return se_rows_to_data(select_split(dataset, split), self.skipped)
