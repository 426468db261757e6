"""LoRA (`lora.rank=<r>`): adapters on each architecture, the adapter-free model as the reference, checkpoints
that hold the adapters, a merged model in `LATEST/` that loads without peft, exact resume, and every bad setting."""

import copy
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

pytest.importorskip("peft")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import train as train_script  # noqa: E402
from dpo.batching import get_batch_iterator  # noqa: E402
from dpo.config import validate_config  # noqa: E402
from dpo.errors import CheckpointError, ConfigError  # noqa: E402
from dpo.export import export_checkpoint  # noqa: E402
from dpo.logps import forward_logps  # noqa: E402
from dpo.lora import (DEFAULT_TARGET_MODULES, adapter_state_dict, apply_lora, is_lora_model,  # noqa: E402
                      load_adapter_state, merged_state_dict, refuse_adapter_archive)
from dpo.losses import build_loss  # noqa: E402
from dpo.models import build_char_tokenizer, load_model, load_models  # noqa: E402
from dpo.trainers import BasicTrainer  # noqa: E402
from tests.test_train import make_config, quick  # noqa: E402

SETTINGS = {"rank": 4, "alpha": 8, "dropout": 0.0, "target_modules": None}
TINY_CONFIGS = {
    "gpt_neox": dict(model_type="gpt_neox", hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=64, rotary_pct=1.0),
    "gpt2": dict(model_type="gpt2", n_embd=32, n_layer=2, n_head=4, n_positions=64),
    "llama": dict(model_type="llama", hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64),
    "t5": dict(model_type="t5", d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4),
}


def tiny(model_type: str, seed: int = 0):
    torch.manual_seed(seed)
    tokenizer = build_char_tokenizer()
    return load_model({"from_config": TINY_CONFIGS[model_type]}, tokenizer, torch.float32), tokenizer


def randomize_adapters(model) -> None:
    """Fresh adapters leave the model unchanged (B = 0); give them weights so that merging has work to do."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_" in name:
                parameter.normal_(0, 0.2)


def logits(model, ids):
    if model.config.is_encoder_decoder:
        return model(input_ids=ids, decoder_input_ids=ids).logits
    return model(input_ids=ids).logits


@pytest.mark.parametrize("model_type", sorted(TINY_CONFIGS))
def test_default_targets_adapt_every_listed_layer_and_merging_gives_the_same_model(model_type):
    base, tokenizer = tiny(model_type)
    original = copy.deepcopy(base)
    model = apply_lora(base, SETTINGS)
    adapted = {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if hasattr(module, "lora_A")}
    assert adapted and adapted <= set(DEFAULT_TARGET_MODULES[model_type])
    trainable = [name for name, parameter in model.named_parameters() if parameter.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)
    ids = torch.tensor([tokenizer("Human: hi there")["input_ids"]])
    # B = 0: the adapters start as no-ops
    torch.testing.assert_close(logits(model, ids), logits(original, ids), atol=1e-6, rtol=1e-6)
    randomize_adapters(model)
    merged = copy.deepcopy(original)
    merged.load_state_dict(merged_state_dict(model))  # strict: exactly the base model's names
    assert not torch.allclose(logits(merged, ids), logits(original, ids))
    torch.testing.assert_close(logits(merged, ids), logits(model, ids), atol=1e-5, rtol=1e-5)
    with model.disable_adapter():
        torch.testing.assert_close(logits(model, ids), logits(original, ids), atol=1e-6, rtol=1e-6)


def test_bad_settings_are_named():
    base, _ = tiny("gpt_neox")
    with pytest.raises(ConfigError, match="names no module"):
        apply_lora(base, {**SETTINGS, "target_modules": ["no_such_layer"]})
    base.config.model_type = "unheard_of"
    with pytest.raises(ConfigError, match="lora.target_modules"):
        apply_lora(base, SETTINGS)


@pytest.mark.parametrize("override, message", [
    ("lora.rank=0", "lora.rank must be a positive integer"),
    ("lora.rank=1.5", "lora.rank must be a positive integer"),
    ("lora.alpha=-1", "lora.alpha must be a positive number"),
    ("lora.dropout=1.0", r"lora.dropout must be a number in \[0, 1\)"),
    ("lora.target_modules=dense", "lora.target_modules must be a non-empty list"),
    ("trainer=FSDPTrainer", "trainer=BasicTrainer only"),
    ("cache_reference_logps=true", "set cache_reference_logps=false"),
])
def test_bad_lora_config_is_refused_before_loading(override, message):
    config = make_config("loss=dpo", "loss.beta=0.1", "lora.rank=4", override)
    with pytest.raises(ConfigError, match=message):
        validate_config(config)


def test_an_adapter_only_archive_points_to_the_merged_model():
    state = {"base_model.model.gpt_neox.layers.0.attention.query_key_value.lora_A.weight": torch.zeros(1)}
    with pytest.raises(ConfigError, match=r"model.name_or_path=/runs/sft/LATEST"):
        refuse_adapter_archive(state, "/runs/sft/LATEST/policy.pt")
    refuse_adapter_archive({"gpt_neox.embed_in.weight": torch.zeros(1)}, "x/policy.pt")  # a full policy is fine


def test_adapter_state_of_other_settings_is_refused():
    model = apply_lora(tiny("gpt_neox")[0], SETTINGS)
    other = apply_lora(tiny("gpt_neox")[0], {**SETTINGS, "rank": 2})
    with pytest.raises(CheckpointError, match="same lora.rank"):
        load_adapter_state(model, adapter_state_dict(other), "step-64/policy.pt")
    with pytest.raises(CheckpointError, match="other lora"):
        load_adapter_state(model, {}, "step-64/policy.pt")


def test_one_model_serves_as_policy_and_reference_and_the_reference_never_moves(tmp_path):
    config = quick(tmp_path / "run", "loss=dpo", "loss.beta=0.1", "lora.rank=4", "lr=1e-2")
    OmegaConf.resolve(config)
    tokenizer = build_char_tokenizer()
    loss = build_loss(OmegaConf.to_container(config.loss))
    policy, reference = load_models(config, tokenizer, True, None, verbose=False)
    assert is_lora_model(policy) and reference is None  # no second copy
    original = copy.deepcopy(policy.get_base_model())
    batches = get_batch_iterator(["toy"], tokenizer, batch_size=8, n_examples=32, max_length=64,
                                 max_prompt_length=48)
    trainer = BasicTrainer(config, policy, tokenizer, loss, batches, [], str(tmp_path / "run"))
    batch = next(iter(get_batch_iterator(["toy"], tokenizer, split="test", batch_size=8, n_epochs=1,
                                         max_length=64, max_prompt_length=48)))
    for train_batch in batches:
        trainer.train_step(train_batch)
    with torch.no_grad():
        expected = forward_logps(original, batch)
        reference_logps = trainer.reference_logps(batch)
        policy_logps = forward_logps(policy, batch)
    torch.testing.assert_close(reference_logps.chosen, expected.chosen, atol=0, rtol=0)
    torch.testing.assert_close(reference_logps.rejected, expected.rejected, atol=0, rtol=0)
    assert not torch.allclose(policy_logps.chosen, expected.chosen)  # the adapters did train
    before = {name: value for name, value in original.state_dict().items() if ".lora_" not in name}
    after = {name: value for name, value in policy.get_base_model().state_dict().items() if ".lora_" not in name}
    assert before.keys() == after.keys() and all(torch.equal(before[name], after[name]) for name in before)


def test_a_lora_run_writes_adapters_and_a_merged_model_that_loads_alone(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run_dir = tmp_path / "run"
    train_script.train(quick(run_dir, "loss=dpo", "loss.beta=0.1", "lora.rank=4", "lr=1e-2", "n_examples=64",
                             "eval_every=64", "sample_during_eval=false"))
    latest = run_dir / "LATEST"
    state = torch.load(latest / "policy.pt", weights_only=True)["state"]
    assert state and all(".lora_" in name for name in state)  # the adapters only
    assert (latest / "adapter" / "adapter_config.json").is_file()
    merged = AutoModelForCausalLM.from_pretrained(latest)
    config = OmegaConf.load(run_dir / "config.yaml")
    torch.manual_seed(config.seed)  # the run's base weights: built from the config with its seed
    base = load_model(config.model, build_char_tokenizer(), torch.float32)
    with_adapter = PeftModel.from_pretrained(base, latest / "adapter")
    ids = torch.tensor([build_char_tokenizer()("\n\nHuman: reverse abc\n\nAssistant:")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, with_adapter(ids).logits, atol=1e-5, rtol=1e-5)
        with with_adapter.disable_adapter():
            assert not torch.allclose(merged(ids).logits, with_adapter(ids).logits, atol=1e-4)
    export_checkpoint(str(latest), str(tmp_path / "exported"))  # what python -m dpo.export does for step-N/
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "exported")
    with torch.no_grad():
        torch.testing.assert_close(exported(ids).logits, merged(ids).logits, atol=0, rtol=0)


def test_a_resumed_lora_run_ends_with_the_adapters_of_an_uninterrupted_one(tmp_path):
    settings = ("loss=dpo", "loss.beta=0.1", "lora.rank=4", "lr=1e-2", "eval_every=64", "sample_during_eval=false",
                "n_eval_examples=32", "do_first_eval=false")
    train_script.train(quick(tmp_path / "straight", *settings, "n_examples=128"))
    train_script.train(quick(tmp_path / "resumed", *settings, "n_examples=64"))
    saved = OmegaConf.load(tmp_path / "resumed" / "config.yaml")
    resumed = train_script.command_line_config(make_config(f"resume={tmp_path / 'resumed'}", "n_examples=128"),
                                               ["n_examples=128"])
    assert resumed.lora.rank == saved.lora.rank == 4
    train_script.train(resumed)
    straight = torch.load(tmp_path / "straight" / "LATEST" / "policy.pt", weights_only=True)["state"]
    again = torch.load(tmp_path / "resumed" / "LATEST" / "policy.pt", weights_only=True)["state"]
    assert straight.keys() == again.keys()
    for name in straight:
        torch.testing.assert_close(again[name], straight[name], atol=0, rtol=0)


def test_t5_trains_with_adapters_samples_with_them_off_and_exports_a_seq2seq_model(tmp_path):
    from transformers import AutoModelForSeq2SeqLM

    run_dir = tmp_path / "t5"
    final = train_script.train(quick(run_dir, "model=tiny-t5", "loss=dpo", "loss.beta=0.1", "lora.rank=4",
                                     "n_examples=64", "eval_every=64", "n_eval_examples=32", "n_eval_model_samples=4"))
    assert "judge_eval/reference" in final  # the reference sampled: the same model with its adapters disabled
    assert type(AutoModelForSeq2SeqLM.from_pretrained(run_dir / "LATEST")).__name__ == "T5ForConditionalGeneration"
