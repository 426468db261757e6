"""The reference implementation's data module, kept importable under its old name.

Code written against the original DPO repository (`from preference_datasets import get_batch_iterator`)
runs unchanged; the implementation lives in `dpo.data` and `dpo.batching`.
"""

from dpo.batching import get_batch_iterator, get_collate_fn, tokenize_batch_element
from dpo.data import get_dataset
from dpo.data.hh import extract_anthropic_prompt
from dpo.data.se import strip_html_tags

__all__ = ["get_batch_iterator", "get_collate_fn", "get_dataset", "tokenize_batch_element",
           "extract_anthropic_prompt", "strip_html_tags"]
