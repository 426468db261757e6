"""Reference log-probs computed once per example and kept, so the reference model need not stay loaded.

The frozen reference model gives every pair the same log-probs at every epoch and every
evaluation, so `cache_reference_logps=true` computes them in one pass before training
(`BasicTrainer.precompute_reference_logps`) and frees the model. Entries are keyed by the pair's
tokens (ids and which of them are labelled), so the key already covers the data, the tokenizer
and the truncation settings; the file is named after what determines the reference model, so a
later run (or a resumed one) with the same reference reads it instead of recomputing.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Mapping, Optional

import torch
from torch import Tensor

from dpo.checkpoints import save_synced
from dpo.layout import sequences_of
from dpo.logps import SequenceLogps

CACHE_FOLDER = "reference_logps"
KEY_BYTES = 16
Entry = tuple[float, float, float, float]  # chosen and rejected log-probs, chosen and rejected token counts


def reference_fingerprint(config: Mapping[str, Any]) -> str:
    """A digest of everything that decides the reference model's weights and dtype."""
    model = config["model"]
    archive = model.get("archive")
    archive_stamp = None
    if archive and os.path.isfile(archive):
        status = os.stat(archive)
        archive_stamp = [os.path.abspath(archive), status.st_size, status.st_mtime_ns]
    identity = {"name_or_path": model.get("name_or_path"), "from_config": model.get("from_config"),
                "seed": config["seed"] if model.get("from_config") else None,  # a fresh model's weights follow it
                "archive": archive_stamp, "reference_dtype": model.get("reference_dtype")}
    text = json.dumps(identity, sort_keys=True, default=str)
    return hashlib.blake2b(text.encode(), digest_size=12).hexdigest()


class ReferenceLogpsCache:
    """Reference log-probs of pairs, by the pairs' tokens; optionally read from and written to `path`."""

    def __init__(self, path: Optional[str] = None):
        self.path = path
        self.entries: dict[bytes, Entry] = {}
        if path and os.path.isfile(path):
            stored = torch.load(path, map_location="cpu", weights_only=True)
            self.entries = {bytes(key): tuple(value)
                            for key, value in zip(stored["keys"].tolist(), stored["values"].tolist())}

    def __len__(self) -> int:
        return len(self.entries)

    @staticmethod
    def keys(batch: Mapping[str, Any]) -> list[bytes]:
        """One key per pair of `batch`: a digest of both sequences' real tokens and labels."""
        sequences = sequences_of(batch)
        n_pairs = len(sequences) // 2
        return [_digest(sequences[pair] + sequences[pair + n_pairs]) for pair in range(n_pairs)]

    def missing(self, batch: Mapping[str, Any]) -> bool:
        return any(key not in self.entries for key in self.keys(batch))

    def lookup(self, batch: Mapping[str, Any], device: torch.device) -> Optional[SequenceLogps]:
        """The batch's reference log-probs, or None if any pair is not cached."""
        entries = [self.entries.get(key) for key in self.keys(batch)]
        if any(entry is None for entry in entries):
            return None
        values = torch.tensor(entries, dtype=torch.float32, device=device)
        return SequenceLogps(chosen=values[:, 0], rejected=values[:, 1], chosen_tokens=values[:, 2],
                             rejected_tokens=values[:, 3])

    def add(self, batch: Mapping[str, Any], logps: SequenceLogps) -> None:
        columns = torch.stack([logps.chosen, logps.rejected, logps.chosen_tokens, logps.rejected_tokens], dim=1)
        for key, row in zip(self.keys(batch), columns.float().cpu().tolist()):
            self.entries[key] = tuple(row)

    def update(self, entries: Mapping[bytes, Entry]) -> None:
        self.entries.update(entries)

    def save(self) -> None:
        """Write all entries to `path` atomically (a killed write leaves the previous file)."""
        if not self.path:
            return
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        keys = list(self.entries)
        state = {"keys": torch.tensor([list(key) for key in keys], dtype=torch.uint8).reshape(len(keys), KEY_BYTES),
                 "values": torch.tensor([self.entries[key] for key in keys], dtype=torch.float32).reshape(-1, 4)}
        temporary = f"{self.path}.{os.getpid()}.tmp"
        save_synced(state, temporary)
        os.replace(temporary, self.path)


def _digest(tensors: tuple[Tensor, ...]) -> bytes:
    digest = hashlib.blake2b(digest_size=KEY_BYTES)
    for tensor in tensors:
        digest.update(tensor.to(torch.int64).numpy().tobytes())
        digest.update(b"|")
    return digest.digest()
