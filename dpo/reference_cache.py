"""Reference log-probs computed once per example and kept, so the reference model need not stay loaded.

The frozen reference model gives every pair the same log-probs at every epoch and every
evaluation, so `cache_reference_logps=true` computes them in one pass before training
(`BasicTrainer.precompute_reference_logps`) and frees the model. Entries are keyed by the pair's
tokens (ids and which of them are labelled), so the key already covers the data, the tokenizer
and the truncation settings; the file is named after the reference model's identity, so a later
run (or a resumed one) with the same reference reads it instead of recomputing.

The identity (`reference_identity`) is what the reference's log-probs depend on, made cheap to
compute: for weights in files (`model.name_or_path` as a local directory or a downloaded hub
snapshot, `model.archive`) each file's size, modification time and a digest of a few sampled
blocks of it; for a model built from `model.from_config`, that config and the seed; for a model
handed over in memory (the Python API), a digest of its config and of its parameters (all of them
for a small model, an evenly spaced sample of every tensor for a large one). A run records it in
`<run dir>/reference_identity.json`; resuming refuses a run whose reference files changed since.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from typing import Any, Mapping, Optional

import torch
from torch import Tensor, nn

from dpo.checkpoints import save_synced
from dpo.distributed import broadcast_object
from dpo.errors import CheckpointError, RunDirError
from dpo.layout import sequences_of
from dpo.logps import SequenceLogps
from dpo.rundir import describe_os_error

CACHE_FOLDER = "reference_logps"
IDENTITY_FILE = "reference_identity.json"
KEY_BYTES = 16
Entry = tuple[float, float, float, float]  # chosen and rejected log-probs, chosen and rejected token counts

_BLOCK = 1 << 16  # bytes read at each of a file's sampled offsets
_SAMPLED_BLOCKS = 5  # start, quarters, end
_WEIGHT_FILE_ENDINGS = (".json", ".safetensors", ".bin")  # what from_pretrained reads from a model directory
_FULL_DIGEST_BYTES = 256 << 20  # an in-memory model up to this size is digested whole
_SAMPLED_ELEMENTS = 1 << 16  # per tensor, of a larger one


# ---- the reference model's identity ------------------------------------------------------------------


def reference_identity(config: Mapping[str, Any], cache_dir: Optional[str] = None,
                       reference_model: Optional[nn.Module] = None, digest_weights: bool = True) -> dict:
    """What decides the reference model's log-probs, as a JSON-able dict (see the module docstring).

    `reference_model`: a model handed over in memory, identified by its weights (digested only with
    `digest_weights`; without, it is recorded as in memory, which no later run can match).
    """
    model = config["model"]
    if reference_model is not None:
        return {"in_memory": type(reference_model).__name__,
                "weights": module_digest(reference_model) if digest_weights else None}
    from_config = model.get("from_config")
    if from_config:  # a fresh model's weights follow the seed, its vocabulary the tokenizer
        source = {"from_config": _plain(from_config), "seed": config["seed"],
                  "tokenizer": model.get("tokenizer_name_or_path")}
    else:
        name = model.get("name_or_path")
        source = {"name_or_path": name, "files": _model_files_stamp(name, cache_dir)}
    archive = model.get("archive")
    return {**source, "archive": file_stamp(archive) if archive else None,
            "reference_dtype": model.get("reference_dtype")}


def fingerprint_of(identity: Mapping[str, Any]) -> str:
    """The cache file's name for a reference of this identity."""
    text = json.dumps(identity, sort_keys=True, default=str)
    return hashlib.blake2b(text.encode(), digest_size=12).hexdigest()


def reference_fingerprint(config: Mapping[str, Any], cache_dir: Optional[str] = None,
                          reference_model: Optional[nn.Module] = None) -> str:
    """A digest of everything that decides the reference model's weights and dtype."""
    return fingerprint_of(reference_identity(config, cache_dir, reference_model))


def file_stamp(path: str) -> dict:
    """A file's identity without reading all of it: size, modification time, digest of sampled blocks."""
    path = os.path.abspath(path)
    try:
        status = os.stat(path)
        digest = hashlib.blake2b(digest_size=8)
        with open(path, "rb") as file:
            size = status.st_size
            offsets = [0] if size <= _BLOCK * _SAMPLED_BLOCKS else \
                [size * part // (_SAMPLED_BLOCKS - 1) for part in range(_SAMPLED_BLOCKS - 1)] + [size - _BLOCK]
            for offset in offsets:
                file.seek(offset)
                digest.update(file.read(_BLOCK if len(offsets) > 1 else size))
    except OSError:
        return {"path": path, "missing": True}
    return {"path": path, "bytes": status.st_size, "mtime_ns": status.st_mtime_ns, "sample": digest.hexdigest()}


def _model_files_stamp(name: Optional[str], cache_dir: Optional[str]) -> Optional[dict]:
    """The stamps of the weight and config files `from_pretrained(name)` reads: from the directory `name`, or
    from the downloaded hub snapshot (whose folder is named after its revision); None if neither is here."""
    if not name:
        return None
    directory, revision = name, None
    if not os.path.isdir(name):
        try:
            from huggingface_hub import try_to_load_from_cache
            found = try_to_load_from_cache(name, "config.json", cache_dir=cache_dir)
        except Exception:  # not a valid hub name (e.g. "<in-memory ...>"), or no hub library
            return None
        if not isinstance(found, str):
            return None
        directory = os.path.dirname(found)
        revision = os.path.basename(directory)
    files = {}
    for entry in sorted(os.listdir(directory)):
        path = os.path.join(directory, entry)
        if entry.endswith(_WEIGHT_FILE_ENDINGS) and os.path.isfile(path):
            files[entry] = {key: value for key, value in file_stamp(path).items() if key != "path"}
    return {"path": os.path.abspath(directory), "revision": revision, "files": files}


def module_digest(model: nn.Module) -> str:
    """A digest of a model's config and parameters: every byte for a small model, else each tensor's name,
    dtype, shape and an evenly spaced sample of its elements (a change to a few elements of a large
    model can go unseen; training changes them all)."""
    digest = hashlib.blake2b(digest_size=16)
    model_config = getattr(model, "config", None)
    if hasattr(model_config, "to_dict"):
        settings = {key: value for key, value in model_config.to_dict().items() if key != "_name_or_path"}
        digest.update(json.dumps(settings, sort_keys=True, default=str).encode())
    state = model.state_dict()
    total = sum(tensor.numel() * tensor.element_size() for tensor in state.values())
    for name, tensor in state.items():
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        if tensor.device.type == "meta" or tensor.numel() == 0:
            continue
        flat = tensor.detach().reshape(-1)
        if total > _FULL_DIGEST_BYTES and flat.numel() > _SAMPLED_ELEMENTS:
            flat = flat[::flat.numel() // _SAMPLED_ELEMENTS][:_SAMPLED_ELEMENTS]
        digest.update(flat.contiguous().cpu().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _plain(value: Any) -> Any:
    try:
        from omegaconf import OmegaConf
        return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
    except ImportError:
        return value


# ---- the identity a run records, and a resume checks ---------------------------------------------------


def write_reference_identity(run_dir: str, identity: Mapping[str, Any]) -> None:
    """Record the reference's identity in the run directory, for a later resume to compare."""
    path = os.path.join(run_dir, IDENTITY_FILE)
    temporary = f"{path}.{os.getpid()}.tmp"
    try:
        with open(temporary, "w") as file:
            json.dump(identity, file, indent=1, sort_keys=True, default=str)
        os.replace(temporary, path)
    except OSError as error:
        raise RunDirError(f"cannot write {path}: {describe_os_error(error)}") from None


def check_resumed_reference(run_dir: str, identity: Mapping[str, Any]) -> None:
    """Refuse to resume a run whose reference model's files changed since it started (in every process).

    The resumed run rebuilds the reference from `model.name_or_path` and `model.archive` as they are
    now; changed files would make it train against another reference. Modification times alone do not
    count (a copied file keeps its content); a run recorded before this check existed is not checked.
    """
    problem = broadcast_object(_reference_change(run_dir, identity) if _is_main() else None)
    if problem:
        raise CheckpointError(problem)


def _reference_change(run_dir: str, identity: Mapping[str, Any]) -> Optional[str]:
    path = os.path.join(run_dir, IDENTITY_FILE)
    try:
        with open(path) as file:
            recorded = json.load(file)
    except (OSError, ValueError):
        return None
    advice = ("so the resumed run would train against another reference model than the one it started with; "
              "put the original back, or start a new run (without resume=) to train against the new one")
    old, new = recorded.get("archive"), identity.get("archive")
    if old and new and _content(old) != _content(new):
        return (f"resume={run_dir}: model.archive={old['path']} changed since the run started (recorded in "
                f"{path}: {_describe(old)}; now: {_describe(new)}), {advice}")
    old, new = recorded.get("files"), identity.get("files")
    if old and new:
        for name in sorted(set(old["files"]) | set(new["files"])):
            was, now = old["files"].get(name), new["files"].get(name)
            if was is None or now is None or _content(was) != _content(now):
                return (f"resume={run_dir}: model.name_or_path={recorded.get('name_or_path')}: "
                        f"{os.path.join(new['path'], name)} changed since the run started (recorded in {path}: "
                        f"{_describe(was)}; now: {_describe(now)}), {advice}")
    return None


def _content(stamp: Mapping[str, Any]) -> dict:
    return {key: value for key, value in stamp.items() if key not in ("mtime_ns", "path")}


def _describe(stamp: Optional[Mapping[str, Any]]) -> str:
    if stamp is None or stamp.get("missing"):
        return "absent"
    modified = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(stamp["mtime_ns"] / 1e9))
    return f"{stamp['bytes']} bytes, modified {modified}, sampled-content digest {stamp['sample']}"


def _is_main() -> bool:
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0


# ---- the cache ------------------------------------------------------------------------------------------


class ReferenceLogpsCache:
    """Reference log-probs of pairs, by the pairs' tokens; optionally read from and written to `path`.

    A file that cannot be read back (truncated, other shapes, not a cache) is not an error: `unreadable`
    says why, the cache starts empty, and `save` replaces the file.
    """

    def __init__(self, path: Optional[str] = None):
        self.path = path
        self.entries: dict[bytes, Entry] = {}
        self.existed = bool(path and os.path.isfile(path))
        self.unreadable: Optional[str] = None
        self.n_pairs = 0  # distinct pairs a precompute pass saw (see BasicTrainer.precompute_reference_logps)
        if self.existed:
            try:
                self.entries = _read_entries(path)
            except Exception as error:  # noqa: BLE001 (any way it fails, the log-probs can be recomputed)
                reason = str(error).strip().splitlines()[0] if str(error).strip() else ""
                self.unreadable = f"{type(error).__name__}: {reason}" if reason else type(error).__name__

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


def _read_entries(path: str) -> dict[bytes, Entry]:
    stored = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(stored, dict) or not isinstance(stored.get("keys"), Tensor) \
            or not isinstance(stored.get("values"), Tensor):
        raise ValueError("it holds no 'keys' and 'values' tensors")
    keys, values = stored["keys"], stored["values"]
    if keys.dtype != torch.uint8 or keys.dim() != 2 or keys.shape[1] != KEY_BYTES or values.dim() != 2 \
            or values.shape[1] != 4 or len(values) != len(keys) or not values.is_floating_point():
        raise ValueError(f"its keys are {keys.dtype} {tuple(keys.shape)} and its values {values.dtype} "
                         f"{tuple(values.shape)}, not uint8 [n, {KEY_BYTES}] and float [n, 4]")
    return {bytes(key): tuple(value) for key, value in zip(keys.tolist(), values.float().tolist())}


def _digest(tensors: tuple[Tensor, ...]) -> bytes:
    digest = hashlib.blake2b(digest_size=KEY_BYTES)
    for tensor in tensors:
        digest.update(tensor.to(torch.int64).numpy().tobytes())
        digest.update(b"|")
    return digest.digest()
