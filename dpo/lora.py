"""LoRA adapters (`lora.rank=<r>`), with the adapter-free model as the reference: one model in memory.

`peft` wraps the policy; only the adapters train. The reference log-probs come from the same
model with its adapters disabled (`adapters_disabled`), so no second copy of the weights exists.
A checkpoint's `policy.pt` holds the adapter weights (peft's names) and `adapter/` holds them in
peft's own format (`PeftModel.from_pretrained(base, "<checkpoint>/adapter")`); `LATEST/` also holds
the merged model in Hugging Face format, which loads with no peft at all.

peft is optional (`pip install -e .[lora]`): it is imported only when LoRA is asked for.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Mapping, Optional

from torch import Tensor, nn

from dpo.errors import CheckpointError, ConfigError

ADAPTER_FOLDER = "adapter"

# Every linear layer of the transformer blocks: LoRA on attention alone trains noticeably worse than
# full fine-tuning (QLoRA, Dettmers et al. 2023, section 4), and the adapters stay small either way.
DEFAULT_TARGET_MODULES = {
    "gpt_neox": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "mistral": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "t5": ["q", "k", "v", "o", "wi", "wi_0", "wi_1", "wo"],
}


def lora_enabled(settings: Optional[Mapping[str, Any]]) -> bool:
    return bool(settings) and settings.get("rank") is not None


def check_lora_settings(settings: Mapping[str, Any]) -> None:
    """Refuse bad `lora.*` values before any model loads."""
    rank, alpha, dropout = settings.get("rank"), settings.get("alpha"), settings.get("dropout", 0.0)
    if rank is None:
        return
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ConfigError(f"lora.rank must be a positive integer (e.g. lora.rank=16), or null for no LoRA; "
                          f"got {rank!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or alpha <= 0:
        raise ConfigError(f"lora.alpha must be a positive number (e.g. lora.alpha=16); got {alpha!r}")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise ConfigError(f"lora.dropout must be a number in [0, 1); got {dropout!r}")
    targets = settings.get("target_modules")
    if targets is not None and (isinstance(targets, str) or not targets
                                or not all(isinstance(name, str) for name in targets)):
        raise ConfigError(f"lora.target_modules must be a non-empty list of module names (e.g. "
                          f"'lora.target_modules=[q_proj,v_proj]'), or null for the model's defaults; got {targets!r}")
    _import_peft()


def _import_peft():
    try:
        import peft
    except ImportError:
        raise ConfigError("lora.rank needs the peft package: pip install peft (or pip install -e .[lora])") from None
    return peft


def target_modules(model: nn.Module, settings: Mapping[str, Any]) -> list[str]:
    """`lora.target_modules`, or this architecture's default, checked to name modules of the model."""
    model_type = getattr(model.config, "model_type", None)
    names = settings.get("target_modules") or DEFAULT_TARGET_MODULES.get(model_type)
    if names is None:
        raise ConfigError(f"there are no default LoRA target modules for model_type {model_type}; set "
                          "lora.target_modules to the names of its linear layers (e.g. '[q_proj,v_proj]')")
    present = {name.rsplit(".", 1)[-1] for name, module in model.named_modules()}
    found = [name for name in names if name in present]
    if not found:
        raise ConfigError(f"lora.target_modules={list(names)} names no module of this {model_type} model; "
                          "give the names of its linear layers")
    return found


def apply_lora(model: nn.Module, settings: Mapping[str, Any]) -> nn.Module:
    """`model` wrapped by peft with fresh LoRA adapters (B = 0, so it starts as the model itself)."""
    peft = _import_peft()
    config = peft.LoraConfig(r=settings["rank"], lora_alpha=settings["alpha"],
                             lora_dropout=settings.get("dropout", 0.0),
                             target_modules=target_modules(model, settings),
                             fan_in_fan_out=getattr(model.config, "model_type", None) == "gpt2",  # its Conv1D
                             task_type=_task_type(model))
    return peft.get_peft_model(model, config)


def _task_type(model: nn.Module) -> str:
    return "SEQ_2_SEQ_LM" if getattr(model.config, "is_encoder_decoder", False) else "CAUSAL_LM"


def is_lora_model(model: Optional[nn.Module]) -> bool:
    """Whether `model` is a peft model (built here, or handed to the Python API by the caller)."""
    return model is not None and hasattr(model, "disable_adapter") and hasattr(model, "get_base_model")


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """The model as it was before LoRA: the reference model, without a copy."""
    with model.disable_adapter():
        yield model


class AdapterFreeModel(nn.Module):
    """A LoRA model with its adapters off, as a model of its own: the reference for tools that want two models
    (`dpo.generate`, `dpo.demo`), sharing every weight with the policy, so that still no copy exists."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.lora_model = model

    @property
    def config(self):
        return self.lora_model.config

    def forward(self, *args, **kwargs):
        with adapters_disabled(self.lora_model) as model:
            return model(*args, **kwargs)

    def generate(self, **kwargs):
        with adapters_disabled(self.lora_model) as model:
            return model.generate(**kwargs)


def adapter_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The trained adapter weights, under peft's names (what `set_peft_model_state_dict` takes)."""
    from peft.utils import get_peft_model_state_dict

    return {name: value.detach() for name, value in get_peft_model_state_dict(model).items()}


def load_adapter_state(model: nn.Module, state: Mapping[str, Tensor], label: str) -> None:
    """Load adapter weights saved by `adapter_state_dict`, refusing a checkpoint of other adapters."""
    expected = adapter_state_dict(model)
    if set(state) != set(expected):
        missing = sorted(set(expected) - set(state))
        example = missing[0] if missing else sorted(set(state) - set(expected))[0]
        raise CheckpointError(f"{label} does not hold this run's LoRA adapters (e.g. {example} differs); was it "
                              "saved with other lora.* settings or another model? Use the same settings to resume")
    misshapen = [name for name in state if state[name].shape != expected[name].shape]
    if misshapen:
        raise CheckpointError(f"{label}: adapter weight {misshapen[0]} has shape {tuple(state[misshapen[0]].shape)}, "
                              f"this run's has {tuple(expected[misshapen[0]].shape)}; resume with the same lora.rank")
    from peft.utils import set_peft_model_state_dict

    set_peft_model_state_dict(model, dict(state))


def merged_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The base model's weights with each adapter's update added, under the base model's own names.

    Computed beside the model (W + ΔW for each adapted layer) rather than by merging in place, so
    the trained model is left exactly as it was.
    """
    base = model.get_base_model()
    deltas = {f"{name}.base_layer.weight": module.get_delta_weight(adapter)
              for name, module in base.named_modules() if hasattr(module, "get_delta_weight")
              for adapter in module.active_adapters if adapter in getattr(module, "lora_A", {})}
    merged = {}
    for name, value in base.state_dict().items():
        if ".lora_" in name:
            continue
        if name in deltas:
            value = value + deltas[name].to(value.dtype)
        merged[name.replace(".base_layer.", ".")] = value.detach()
    return merged


def save_adapter(model: nn.Module, directory: str) -> None:
    """peft's own adapter files (adapter_config.json, adapter_model.safetensors) in `directory`."""
    model.save_pretrained(directory)


def refuse_adapter_archive(state: Mapping[str, Any], path: str) -> None:
    """A LoRA run's policy.pt holds adapters only; the next stage loads the merged model instead."""
    if state and all(".lora_" in name for name in state):
        run_dir = path.rsplit("/", 2)[0] if path.count("/") >= 2 else "<run dir>"
        raise ConfigError(f"model.archive={path} holds LoRA adapter weights only; start from the merged model the "
                          f"run wrote instead: model.name_or_path={run_dir}/LATEST model.archive=null (with "
                          "model.from_config=null model.tokenizer_name_or_path=null for a model built from a config)")
