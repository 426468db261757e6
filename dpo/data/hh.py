"""Anthropic HH-RLHF: helpfulness and harmlessness comparisons of two full dialogue transcripts.

Each row holds two transcripts, `chosen` and `rejected`, that share every turn but the last
assistant reply. The prompt is the shared dialogue up to and including the last
"\\n\\nAssistant:", and the two responses are what follows it.
"""

from __future__ import annotations

from collections import Counter
from typing import Iterable, Optional

from dpo.data import PreferenceData, PreferenceSource, add_pair, load_hub_dataset, register_dataset
from dpo.data.chat import system_text, with_system_text
from dpo.errors import DataError

ASSISTANT_TAG = "\n\nAssistant:"
HUB_NAME = "Anthropic/hh-rlhf"


def extract_anthropic_prompt(prompt_and_response: str) -> str:
    """The transcript up to and including its last "\\n\\nAssistant:" (the reference's name).

    Raises ValueError when the text has no assistant turn; callers that know where the text came
    from turn that into a DataError naming the row.
    """
    index = prompt_and_response.rfind(ASSISTANT_TAG)
    if index == -1:
        raise ValueError(f"text has no {ASSISTANT_TAG!r} turn")
    return prompt_and_response[: index + len(ASSISTANT_TAG)]


def transcript_prompt(chosen: str, where: str) -> str:
    """The prompt of the `chosen` transcript found at `where`, or a DataError saying why there is none."""
    try:
        return extract_anthropic_prompt(chosen)
    except ValueError:
        raise DataError(
            f"{where} is not an HH transcript: its 'chosen' text has no '\\n\\nAssistant:' turn; give full "
            "'\\n\\nHuman: ...\\n\\nAssistant: ...' transcripts in chosen and rejected, or add a 'prompt' "
            "field to use the prompt/chosen/rejected format"
        ) from None


def hh_rows_to_data(rows: Iterable[tuple[str, dict]], skipped: Counter) -> PreferenceData:
    """Convert `(where, {"chosen", "rejected"})` rows into the preference dict.

    `where` names the row in error messages ("row 5 of Anthropic/hh-rlhf (test)",
    "data.jsonl line 17"). A row whose rejected transcript does not start with the chosen
    transcript's prompt is skipped and counted: slicing it as the reference does would pair the
    chosen reply with a fragment of a different conversation. Empty and identical responses are
    kept here; `clean_pairs` drops and counts them for every source alike. A row's `system` text,
    if any, opens its prompt, as the char chat template writes a system turn.
    """
    data: PreferenceData = {}
    for where, row in rows:
        prompt = transcript_prompt(row["chosen"], where)
        if not row["rejected"].startswith(prompt):
            skipped["rows whose rejected transcript has a different prompt"] += 1
            continue
        add_pair(data, with_system_text(system_text(where, row), prompt), row["chosen"][len(prompt):],
                 row["rejected"][len(prompt):])
    return data


def hub_rows(hub_name: str, dataset: Iterable[dict], split: str) -> Iterable[tuple[str, dict]]:
    """Pair each hub row with its 1-based location, for error messages."""
    for index, row in enumerate(dataset, start=1):
        yield f"row {index} of {hub_name} ({split})", row


@register_dataset
class HHSource(PreferenceSource):
    """Anthropic/hh-rlhf from the Hugging Face hub; prompts are multi-turn, so keep their end."""

    name = "hh"
    truncation_mode = "keep_end"

    def load(self, split: str, silent: bool = False, cache_dir: Optional[str] = None) -> PreferenceData:
        self.skipped.clear()
        if not silent:
            print(f"Loading HH dataset ({split} split) from Huggingface...")
        dataset = load_hub_dataset(HUB_NAME, split, cache_dir)
        return hh_rows_to_data(hub_rows(HUB_NAME, dataset, split), self.skipped)
