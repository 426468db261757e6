"""Export any checkpoint's policy in Hugging Face format.

    python -m dpo.export <checkpoint dir> [<output dir>] [--config <run dir>/config.yaml]

Only `LATEST/` gets Hugging Face files when a run ends; every `step-N/` holds just policy.pt,
optimizer.pt and scheduler.pt. This rebuilds the model and tokenizer as the run built them, from the
run's config.yaml (the checkpoint directory's parent holds it), loads policy.pt into the model, and
saves both with `save_pretrained` into the output directory (default: the checkpoint directory), so
that `AutoModelForCausalLM.from_pretrained(<output dir>)` (`AutoModelForSeq2SeqLM` for an encoder-decoder
model such as T5) loads the policy, under transformers 4.29.2 (the reference implementation's version) too.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import sys
import tempfile
from typing import Optional

import torch
from omegaconf import OmegaConf

from dpo.checkpoints import LEGACY_TRANSFORMERS, load_policy_state, read_archive, write_hf_export
from dpo.config import get_local_dir, register_resolvers
from dpo.errors import CheckpointError, ConfigError, UserError
from dpo.lora import apply_lora, load_adapter_state, lora_enabled, merged_state_dict
from dpo.models import load_model, load_tokenizer, torch_dtype

# Weight files an earlier export may have left that a new one would not overwrite (shards, when it
# writes one file): loaders could pick them up instead.
_WEIGHT_FILES = ("model*.safetensors", "model.safetensors.index.json", "pytorch_model*.bin",
                 "pytorch_model.bin.index.json")


def export_checkpoint(checkpoint_dir: str, output_dir: Optional[str] = None,
                      config_path: Optional[str] = None) -> list[str]:
    """Write the policy of `checkpoint_dir` and the run's tokenizer in Hugging Face format to `output_dir`.

    The model is built from `config_path` (default: `<checkpoint_dir>/../config.yaml`) as train.py
    builds it. Returns what transformers 4.29.2 cannot represent (empty when it loads the same model).
    Raises CheckpointError or ConfigError naming the path and the fix.
    """
    policy_path = checkpoint_policy_path(checkpoint_dir)
    config_path = config_path or os.path.join(os.path.dirname(os.path.abspath(checkpoint_dir)), "config.yaml")
    config, cache_dir = read_run_config(config_path)
    model_config = config["model"]
    archive = read_archive(policy_path, label=policy_path)
    tokenizer = load_tokenizer(model_config, cache_dir=cache_dir)
    dtype = torch_dtype(model_config.get("policy_dtype", "float32"), "model.policy_dtype")
    torch.manual_seed(config.get("seed", 0))  # a LoRA run's base model built from a config: the run's weights
    model = load_model(model_config, tokenizer, dtype, cache_dir=cache_dir)
    label = f"{policy_path} (with the model of {config_path})"
    if lora_enabled(config.get("lora")):  # policy.pt holds the adapters: export the merged model
        if model_config.get("archive"):  # the base the adapters were trained on
            load_policy_state(model, read_archive(model_config["archive"])["state"], model_config["archive"])
        model = apply_lora(model, config["lora"])
        load_adapter_state(model, archive["state"], label)
        return _write_into(output_dir or checkpoint_dir, model.get_base_model(), tokenizer, merged_state_dict(model))
    load_policy_state(model, archive["state"], policy_path, label=label)
    return _write_into(output_dir or checkpoint_dir, model, tokenizer)


def checkpoint_policy_path(checkpoint_dir: str) -> str:
    if not os.path.isdir(checkpoint_dir):
        raise CheckpointError(f"{checkpoint_dir} is not a directory; give a checkpoint directory such as "
                              "<run dir>/step-1024 or <run dir>/LATEST")
    path = os.path.join(checkpoint_dir, "policy.pt")
    if not os.path.isfile(path):
        raise CheckpointError(f"{checkpoint_dir} holds no policy.pt; give a checkpoint directory such as "
                              "<run dir>/step-1024 or <run dir>/LATEST")
    return path


def read_run_config(config_path: str) -> tuple[dict, Optional[str]]:
    """A run's config.yaml as a dict (checked to have a `model` section), and the cache directory the run used."""
    if not os.path.isfile(config_path):
        raise ConfigError(f"{config_path} does not exist, and the model cannot be rebuilt without the run's "
                          "config; pass --config <run dir>/config.yaml")
    register_resolvers()  # a hand-written config may still hold the run-directory interpolation
    try:
        config = OmegaConf.to_container(OmegaConf.load(config_path), resolve=True)
    except Exception as error:  # YAML and interpolation errors come in many types
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ConfigError(f"{config_path} is not a readable config ({first_line}); pass --config with the "
                          "run's config.yaml") from None
    if not isinstance(config, dict) or not isinstance(config.get("model"), dict):
        raise ConfigError(f"{config_path} has no model section, so it is not a run's config.yaml; pass "
                          "--config <run dir>/config.yaml")
    local_dirs = config.get("local_dirs")
    return config, get_local_dir(list(local_dirs)) if local_dirs else None


def _write_into(directory: str, model, tokenizer, state: Optional[dict] = None) -> list[str]:
    """Save into `directory` next to whatever it holds; config.json, which loaders look for, is moved in last."""
    try:
        os.makedirs(directory, exist_ok=True)
        staging = tempfile.mkdtemp(prefix=".export-", dir=directory)  # same filesystem: moves are renames
        try:
            problems = write_hf_export(staging, model, tokenizer, state)
            written = sorted(os.listdir(staging), key=lambda name: name == "config.json")
            _remove_stale_weights(directory, keep=set(written))
            for name in written:
                os.replace(os.path.join(staging, name), os.path.join(directory, name))
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    except OSError as error:
        raise CheckpointError(f"cannot write the export to {directory}: {error.strerror or error}; choose a "
                              "writable output directory with free space") from None
    return problems


def _remove_stale_weights(directory: str, keep: set) -> None:
    for pattern in _WEIGHT_FILES:
        for path in glob.glob(os.path.join(directory, pattern)):
            if os.path.basename(path) not in keep:
                os.remove(path)


def auto_class_name(directory: str) -> str:
    """The transformers Auto class that loads the model saved in `directory`."""
    with open(os.path.join(directory, "config.json")) as file:
        encoder_decoder = json.load(file).get("is_encoder_decoder", False)
    return "AutoModelForSeq2SeqLM" if encoder_decoder else "AutoModelForCausalLM"


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dpo.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint_dir", help="a checkpoint directory holding policy.pt, e.g. <run dir>/step-1024")
    parser.add_argument("output_dir", nargs="?", help="where to write (default: the checkpoint directory)")
    parser.add_argument("--config", help="the run's config.yaml (default: the one next to the checkpoint directory)")
    args = parser.parse_args(argv)
    try:
        problems = export_checkpoint(args.checkpoint_dir, args.output_dir, args.config)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    output = args.output_dir or args.checkpoint_dir
    print(f"wrote {output}: the policy and tokenizer in Hugging Face format "
          f"({auto_class_name(output)}.from_pretrained({output!r}))")
    for problem in problems:
        print(f"note: transformers {LEGACY_TRANSFORMERS} would build a different model from it: {problem}",
              file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
