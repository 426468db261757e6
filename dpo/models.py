"""Tokenizers and causal language models: from the Hugging Face hub, a local directory, or a config.

`model.name_or_path` names a hub model or a local Hugging Face directory. `model.from_config`
instead builds a fresh model from a config dict (e.g. the `tiny` model), with no download.
`model.tokenizer_name_or_path: char` selects the project's built-in character tokenizer.
"""

from __future__ import annotations

import copy
import glob
import os
import re
from contextlib import contextmanager
from typing import Any, Mapping, Optional

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from dpo.checkpoints import load_policy_state
from dpo.errors import ConfigError
from dpo.lora import (apply_lora, is_lora_model, load_adapter_state, lora_enabled,
                      refuse_adapter_archive)

CHAR_TOKENIZER = "char"
_CHAR_SPECIAL_TOKENS = ("<|pad|>", "<|endoftext|>", "<|unk|>")


def build_char_tokenizer() -> PreTrainedTokenizerBase:
    """A character-level tokenizer over printable ASCII, newline and tab, built offline.

    One token per character keeps the `tiny` model's vocabulary at 100 and needs no training
    data; other characters map to <|unk|>. Its chat template writes conversations as the HH and
    toy data are written ("\n\nHuman: hi\n\nAssistant: hello"), so chat datasets train with it too.
    It saves and reloads with `AutoTokenizer`.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from dpo.data.chat import CHAR_CHAT_TEMPLATE  # here: dpo.data's sources may import this module

    characters = [chr(code) for code in range(32, 127)] + ["\n", "\t"]
    vocab = {token: index for index, token in enumerate([*_CHAR_SPECIAL_TOKENS, *characters])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|unk|>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    pad, eos, unk = _CHAR_SPECIAL_TOKENS
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token=pad, eos_token=eos, unk_token=unk)
    tokenizer.name_or_path = CHAR_TOKENIZER  # so messages can name it
    tokenizer.chat_template = CHAR_CHAT_TEMPLATE
    return tokenizer


def load_tokenizer(model_config: Mapping[str, Any], cache_dir: Optional[str] = None) -> PreTrainedTokenizerBase:
    """The tokenizer named by `model.tokenizer_name_or_path` (default: `model.name_or_path`).

    As in the reference, a tokenizer without a pad token pads with EOS. `model.chat_template` (a file,
    or the template itself) replaces its chat template; `model.string_prompts_as_chat` has string
    prompts rendered with that template too (`dpo.data.chat`). A tokenizer with no vocabulary is refused.
    """
    # here: dpo.data's sources may import this module
    from dpo.data.chat import check_chat_template, read_chat_template, set_string_prompts_as_chat
    from dpo.data.tokens import vocabulary_problem

    name = model_config.get("tokenizer_name_or_path") or model_config.get("name_or_path")
    if name == CHAR_TOKENIZER:
        tokenizer = build_char_tokenizer()
    elif name:
        key = "model.tokenizer_name_or_path" if model_config.get("tokenizer_name_or_path") else "model.name_or_path"
        with explained_load_errors(key, name):
            tokenizer = AutoTokenizer.from_pretrained(name, cache_dir=cache_dir)
    else:
        raise ConfigError("model.tokenizer_name_or_path is required when model.name_or_path is null "
                          "(e.g. model.tokenizer_name_or_path=char)")
    if tokenizer.eos_token_id is None:
        raise ConfigError(f"tokenizer {name} has no EOS token, which DPO appends to every response; "
                          "choose a tokenizer with one")
    problem = vocabulary_problem(tokenizer)
    if problem is not None:
        raise ConfigError(problem)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token_id = tokenizer.eos_token_id
    if model_config.get("chat_template"):
        tokenizer.chat_template = read_chat_template(str(model_config["chat_template"]))
        check_chat_template(tokenizer)
    set_string_prompts_as_chat(tokenizer, bool(model_config.get("string_prompts_as_chat")))
    return tokenizer


@contextmanager
def explained_load_errors(key: str, name: str):
    """Turn the many ways a hub or directory load fails (offline, typo, no weights) into one sentence."""
    try:
        yield
    except (OSError, ValueError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ConfigError(f"could not load {key}={name}: {reason}; give a Hugging Face hub name (online, or cached "
                          "with HF_HUB_OFFLINE=1) or a local directory saved with save_pretrained") from None


# Models are trained and run in these; float8 and the like need scaling recipes this project does not have.
MODEL_DTYPES = ("float32", "bfloat16", "float16", "float64")


def torch_dtype(name: str, key: str) -> torch.dtype:
    if str(name) not in MODEL_DTYPES:
        raise ConfigError(f"{key}={name} is not a supported model dtype: use float32, bfloat16 or float16 "
                          "(or float64)")
    return getattr(torch, str(name))


def load_model(model_config: Mapping[str, Any], tokenizer: PreTrainedTokenizerBase, dtype: torch.dtype,
               cache_dir: Optional[str] = None) -> nn.Module:
    """A causal LM, or an encoder-decoder LM such as T5 (`config.is_encoder_decoder`), with every dropout turned
    off, from `model.from_config` or `model.name_or_path`."""
    from transformers import AutoModelForSeq2SeqLM

    from_config = model_config.get("from_config")
    if from_config:
        config = AutoConfig.for_model(**dict(from_config))
        config.vocab_size = len(tokenizer)
        config.pad_token_id, config.eos_token_id, config.bos_token_id = (
            tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.eos_token_id)
        if config.is_encoder_decoder:  # the decoder reads this before the first response token; T5 uses its pad
            config.decoder_start_token_id = tokenizer.pad_token_id
        disable_config_dropout(config)
        auto_class = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
        model = auto_class.from_config(config, dtype=dtype)
    else:
        name = model_config["name_or_path"]
        with explained_load_errors("model.name_or_path", name):
            config = AutoConfig.from_pretrained(name, cache_dir=cache_dir)
            disable_config_dropout(config)
            auto_class = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
            with explained_weight_errors("model.name_or_path", name):
                model = auto_class.from_pretrained(name, config=config, cache_dir=cache_dir, dtype=dtype,
                                                   low_cpu_mem_usage=True)
    disable_dropout(model)
    return model


@contextmanager
def explained_weight_errors(key: str, name: str):
    """A weights file that exists but cannot be read (a truncated `model.safetensors`, a `pytorch_model.bin` that
    `torch.load(weights_only=True)` refuses) as one sentence naming the file, instead of the reader's traceback."""
    import pickle

    from safetensors import SafetensorError

    try:
        yield
    except SafetensorError as error:
        raise ConfigError(f"could not load {key}={name}: {_weight_file(name, 'safetensors')} is damaged "
                          f"({_first_line(error)}), as an interrupted copy or download leaves it; save the model "
                          "again with save_pretrained, or download it again") from None
    except (pickle.UnpicklingError, EOFError, RuntimeError) as error:
        if isinstance(error, RuntimeError) and "PytorchStreamReader" not in str(error):
            raise  # not the file: a bug or the device, whose traceback is wanted
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(error))
        reason = (f"it pickles {found.group(1)}, which torch.load(weights_only=True) refuses to run" if found
                  else f"{_first_line(error)}")
        raise ConfigError(f"could not load {key}={name}: {_weight_file(name, 'bin')} cannot be read as plain "
                          f"weights ({reason}); save the model again with save_pretrained (safetensors) from a copy "
                          "you trust, or download it again") from None
    except OSError as error:  # a truncated pytorch_model.bin fails its memory map with EINVAL
        if error.errno is None or not os.path.isdir(name):
            raise  # transformers' own "no file named ..." errors: explained_load_errors says those
        kind = "safetensors" if glob.glob(os.path.join(glob.escape(name), "model*.safetensors")) else "bin"
        raise ConfigError(f"could not load {key}={name}: {_weight_file(name, kind)} is damaged "
                          f"({error.strerror or error} while reading it), as an interrupted copy or download leaves "
                          "it; save the model again with save_pretrained, or download it again") from None


def _weight_file(name: str, kind: str) -> str:
    """The weights file of that kind in a local model directory, or a description of it for a hub name."""
    patterns = ("model*.safetensors",) if kind == "safetensors" else ("pytorch_model*.bin",)
    found = sorted(path for pattern in patterns for path in glob.glob(os.path.join(glob.escape(name), pattern)))
    if len(found) == 1:
        return found[0]
    if found:
        return f"one of {os.path.join(name, patterns[0])}"
    return f"the cached {'model.safetensors' if kind == 'safetensors' else 'pytorch_model.bin'} of {name}"


def _first_line(error: BaseException, limit: int = 200) -> str:
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return text if len(text) <= limit else text[:limit] + "..."


# Config attributes that hold the number of positions a model has embeddings for, in the order models use them.
_CONTEXT_ATTRIBUTES = ("n_positions", "max_position_embeddings", "n_ctx")


def context_length(model: nn.Module) -> tuple[Optional[int], Optional[str]]:
    """The model's context in tokens and the config attribute that says so; (None, None) when its config has none."""
    config = getattr(model, "config", None)
    for attribute in _CONTEXT_ATTRIBUTES:
        value = getattr(config, attribute, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value, attribute
    return None, None


def has_absolute_positions(model: nn.Module) -> bool:
    """Whether the model looks positions up in a table (GPT-2's `wpe`, OPT's `embed_positions`), so that a longer
    sequence is an IndexError, rather than computing them (rotary, ALiBi, T5's relative buckets)."""
    return any(isinstance(module, nn.Embedding) and (name.endswith("wpe") or "position" in name.rsplit(".", 1)[-1])
               for name, module in model.named_modules())


def check_context_length(config: Mapping[str, Any], model: nn.Module) -> None:
    """Refuse a `max_length` longer than the position table of a model with absolute positions."""
    context, attribute = context_length(model)
    max_length = config.get("max_length")
    if context is None or not isinstance(max_length, int) or max_length <= context or not has_absolute_positions(model):
        return
    raise ConfigError(f"max_length={max_length} is longer than the model's context of {context} tokens "
                      f"({attribute}={context} in its config), whose position embeddings end there; set max_length "
                      f"to at most {context} (and max_prompt_length below it)")


def disable_config_dropout(config) -> None:
    """Zero every dropout probability in a model config (attention dropout is often not a module)."""
    for key, value in config.to_dict().items():
        if isinstance(value, float) and ("dropout" in key or key.endswith("_pdrop")):
            setattr(config, key, 0.0)


def disable_dropout(model: nn.Module) -> None:
    """Set p=0 in every dropout module: DPO compares log-probs that dropout would make noisy."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0


def load_models(config: Mapping[str, Any], tokenizer: PreTrainedTokenizerBase, needs_reference: bool,
                cache_dir: Optional[str], archive: Optional[Mapping[str, Any]] = None,
                resume_state: Optional[Mapping[str, Any]] = None, verbose: bool = True,
                policy: Optional[nn.Module] = None, reference_model: Optional[nn.Module] = None):
    """The policy and, if the loss needs one, the frozen reference model, both on the CPU.

    Both start from `archive` (the `policy.pt` that `model.archive` names) if given. A resumed run
    then loads its checkpoint's policy weights (`resume_state`) into the policy only: the
    reference model stays what the run started with. A `policy` (and `reference_model`) passed
    in by the Python API are used as they are. With `lora.rank` set, or a peft model passed in,
    there is no reference model: the reference is the policy with its adapters disabled.
    """
    torch.manual_seed(config["seed"])  # a model built from a config gets the same initial weights every run
    model_config, lora = config["model"], config.get("lora")
    if policy is None:
        policy = load_model(model_config, tokenizer, torch_dtype(model_config["policy_dtype"], "model.policy_dtype"),
                            cache_dir=cache_dir)
        if archive is not None:
            refuse_adapter_archive(archive["state"], model_config["archive"])
            load_policy_state(policy, archive["state"], model_config["archive"])
            if verbose:
                print(f"loaded model.archive={model_config['archive']} (step {archive.get('step_idx')})")
    else:
        disable_dropout(policy)
    check_context_length(config, policy)
    if lora_enabled(lora) and not is_lora_model(policy):
        policy = apply_lora(policy, lora)
    if not needs_reference:
        reference_model = None
    elif reference_model is None and not is_lora_model(policy):
        reference_model = _reference_copy(config, policy, tokenizer, archive, cache_dir)
    if reference_model is not None:
        disable_dropout(reference_model)
        reference_model.requires_grad_(False)
    if resume_state is not None:
        label = "the resumed policy.pt"
        if is_lora_model(policy):
            load_adapter_state(policy, resume_state, label)
        else:
            load_policy_state(policy, resume_state, "the checkpoint to resume from", label=label)
    return policy, reference_model


def _reference_copy(config: Mapping[str, Any], policy: nn.Module, tokenizer: PreTrainedTokenizerBase,
                    archive: Optional[Mapping[str, Any]], cache_dir: Optional[str]) -> nn.Module:
    """The reference model: the policy as it starts, in `model.reference_dtype`.

    A model loaded by name is loaded again (straight into its dtype, never through a float32
    copy); one built from a config is copied.
    """
    model_config = config["model"]
    dtype = torch_dtype(model_config["reference_dtype"], "model.reference_dtype")
    if model_config.get("from_config"):
        return copy.deepcopy(policy).to(dtype)
    reference_model = load_model(model_config, tokenizer, dtype, cache_dir=cache_dir)
    if archive is not None:
        load_policy_state(reference_model, archive["state"], model_config["archive"])
    return reference_model


def transformer_blocks(model: nn.Module, block_name: Optional[str]) -> list[nn.Module]:
    """The modules of class `model.block_name`, or of the model's own `_no_split_modules` when not given."""
    names = [block_name] if block_name else list(getattr(model, "_no_split_modules", None) or [])
    blocks = [module for module in model.modules() if type(module).__name__ in names]
    if blocks:
        return blocks
    repeated = sorted({type(child).__name__ for module in model.modules() if isinstance(module, nn.ModuleList)
                       for child in module})
    found = f"its repeated blocks are {', '.join(repeated)}" if repeated else "it has no repeated blocks"
    if block_name:
        raise ConfigError(f"model.block_name={block_name} names no module of this model ({found}); set "
                          "model.block_name to the transformer block's class name")
    raise ConfigError(f"cannot tell this model's transformer block ({found}); set model.block_name to its class name")


def compile_blocks(models: list[Optional[nn.Module]], block_name: Optional[str]) -> None:
    """torch.compile each transformer block (`compile=true`): the blocks are where the time goes, and compiling
    them one by one leaves the log-prob code around them, whose shapes change every batch, in eager mode."""
    for model in models:
        if model is not None:
            for block in transformer_blocks(model, block_name):
                block.compile()
