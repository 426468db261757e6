"""Encoder-decoder models (T5): log-probs against a naive per-example computation, and the whole workflow.

The naive reference runs one example at a time, unpadded, through the model's own `labels` path
(`model(input_ids=prompt, labels=response)`, which shifts the labels right itself) and sums the log-softmax
at each label in float64. `forward_logps` must agree on sums, token counts, per-token log-probs and
gradients, for pairs and for SFT batches.
"""

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from transformers import AutoConfig, AutoModelForSeq2SeqLM, AutoTokenizer

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import train as train_script  # noqa: E402
from dpo.batching import get_collate_fn, tokenize_batch_element  # noqa: E402
from dpo.checkpoints import load_policy_state, read_archive, to_reference_names, write_checkpoint  # noqa: E402
from dpo.errors import ConfigError  # noqa: E402
from dpo.layout import seq2seq_inputs  # noqa: E402
from dpo.logps import IGNORE_INDEX, LogpsOptions, forward_logps  # noqa: E402
from dpo.models import build_char_tokenizer, load_model  # noqa: E402

TRIPLES = [
    ("\n\nHuman: hi\n\nAssistant:", " hello there", " no"),
    ("\n\nHuman: what is two plus two?\n\nAssistant:", " four", " it is five, since " + "x" * 30),
    ("Q" * 60, " cut at max_length " * 6, " short"),  # prompt and chosen response both truncated
]


@pytest.fixture(scope="module")
def tokenizer():
    return build_char_tokenizer()


@pytest.fixture(scope="module")
def pair_batch(tokenizer):
    elements = [tokenize_batch_element(p, c, r, "keep_end", tokenizer, 80, 40) for p, c, r in TRIPLES]
    return get_collate_fn(tokenizer)(elements)


@pytest.fixture(scope="module")
def sft_batch(pair_batch):
    return {key: value for key, value in pair_batch.items() if "rejected" not in key}


def tiny_t5(tokenizer, seed=0, **overrides):
    """A random float64 T5; few relative-position buckets, so that prompt lengths cross bucket boundaries."""
    settings = dict(d_model=32, num_layers=2, num_decoder_layers=1, num_heads=4, d_kv=8, d_ff=64,
                    relative_attention_num_buckets=8, relative_attention_max_distance=20, dropout_rate=0.0,
                    vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                    eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.pad_token_id)
    settings.update(overrides)
    torch.manual_seed(seed)
    return AutoModelForSeq2SeqLM.from_config(AutoConfig.for_model("t5", **settings)).double().eval()


def naive_token_logps(model, batch, side):
    """Per example: the float64 log-prob of each response token, the prompt alone (unpadded) to the encoder."""
    out = []
    for row in range(len(batch["prompt"])):
        prompt = batch["prompt_input_ids"][row][batch["prompt_attention_mask"][row].bool()]
        labels = batch[f"{side}_labels"][row]
        response = labels[labels != IGNORE_INDEX]
        logits = model(input_ids=prompt[None], labels=response[None]).logits[0]
        out.append(torch.log_softmax(logits.double(), -1).gather(-1, response[:, None])[:, 0])
    return out


def sides_of(batch):
    return ("chosen", "rejected") if "rejected_input_ids" in batch else ("chosen",)


def gradients(model):
    return torch.cat([parameter.grad.flatten() for parameter in model.parameters()])


# ---- log-probs ------------------------------------------------------------------------------------

@pytest.mark.parametrize("chunk_size", [None, 3])
@pytest.mark.parametrize("kind", ["pairs", "sft"])
def test_forward_logps_matches_naive_per_example_values_and_gradients(tokenizer, pair_batch, sft_batch, kind,
                                                                      chunk_size):
    batch = pair_batch if kind == "pairs" else sft_batch
    model = tiny_t5(tokenizer)
    weights = torch.linspace(0.5, 1.5, len(batch["prompt"]) * len(sides_of(batch)), dtype=torch.float64)

    out = forward_logps(model, batch, LogpsOptions(lm_head_chunk_size=chunk_size), token_logps=True)
    for side in sides_of(batch):
        expected = naive_token_logps(model, batch, side)
        sums, counts = getattr(out, side), getattr(out, f"{side}_tokens")
        per_token = getattr(out, f"{side}_token_logps")
        torch.testing.assert_close(sums.double(), torch.stack([tokens.sum() for tokens in expected]),
                                   rtol=1e-5, atol=1e-5)
        assert counts.tolist() == [len(tokens) for tokens in expected]
        assert per_token.shape == (len(expected), max(len(tokens) for tokens in expected))
        for row, tokens in enumerate(expected):  # response-aligned: token 0 in column 0, zeros after the end
            torch.testing.assert_close(per_token[row, :len(tokens)].double(), tokens, rtol=1e-5, atol=1e-5)
            assert (per_token[row, len(tokens):] == 0).all()

    all_logps = torch.cat([getattr(out, side) for side in sides_of(batch)])
    (weights * all_logps).sum().backward()
    ours = gradients(model)
    model.zero_grad()
    naive = torch.stack([tokens.sum() for side in sides_of(batch) for tokens in naive_token_logps(model, batch, side)])
    (weights * naive).sum().backward()
    expected = gradients(model)  # log-probs are float32 by design, so agreement is to float32 precision
    assert (ours - expected).norm() <= 1e-6 * expected.norm()
    assert expected.norm() > 0


def test_chunked_head_matches_full_logits_without_the_output_scaling_too(tokenizer, pair_batch):
    model = tiny_t5(tokenizer, tie_word_embeddings=False)  # T5 v1.1 and FLAN-T5: the decoder output is not scaled
    assert not model.config.scale_decoder_outputs
    with torch.no_grad():
        full = forward_logps(model, pair_batch, LogpsOptions(lm_head_chunk_size=None))
        chunked = forward_logps(model, pair_batch, LogpsOptions(lm_head_chunk_size=3))
    torch.testing.assert_close(chunked.chosen, full.chosen, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(chunked.rejected, full.rejected, rtol=1e-6, atol=1e-6)


def test_each_prompt_is_encoded_once_and_the_encoder_is_restored(tokenizer, pair_batch):
    model = tiny_t5(tokenizer)
    encoder = model.get_encoder()
    rows_seen = []  # rows the encoder computes (its input lists each prompt once per response)
    handle = encoder.final_layer_norm.register_forward_hook(lambda module, args, output: rows_seen.append(len(output)))
    with torch.no_grad():
        forward_logps(model, pair_batch)
    handle.remove()
    assert rows_seen == [len(pair_batch["prompt"])]  # not once per chosen and once per rejected row
    assert "forward" not in vars(encoder)


def test_seq2seq_layout_feeds_the_start_token_then_the_response(tokenizer, pair_batch):
    inputs = seq2seq_inputs(pair_batch, decoder_start_token_id=tokenizer.pad_token_id)
    n_pairs = len(pair_batch["prompt"])
    assert inputs.n_sequences == 2 * n_pairs and inputs.encoder_repeats == 2
    assert torch.equal(inputs.input_ids, pair_batch["prompt_input_ids"].repeat(2, 1))
    chosen = pair_batch["chosen_labels"][0]
    response = chosen[chosen != IGNORE_INDEX]  # ends with EOS
    assert response[-1] == tokenizer.eos_token_id
    decoder_row = inputs.decoder_input_ids[0, :len(response)]
    assert decoder_row.tolist() == [tokenizer.pad_token_id] + response[:-1].tolist()
    assert inputs.decoder_attention_mask[0].sum() == len(response)
    assert inputs.targets[inputs.sequence_index == 0].tolist() == response.tolist()


@pytest.mark.parametrize("key", ["packing", "prefix_sharing"])
def test_packed_layouts_are_refused_for_encoder_decoder_models(tokenizer, key):
    options = LogpsOptions(**{key: True})
    with pytest.raises(ConfigError, match=f"{key}=true .* encoder-decoder .* set {key}=false"):
        options.check(tiny_t5(tokenizer))


# ---- models, configs, generation ------------------------------------------------------------------

def make_config(*overrides):
    with initialize_config_dir(config_dir=str(REPO / "config"), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def test_configs_build_a_t5_without_dropout(tokenizer):
    config = make_config("model=tiny-t5")
    assert list(config.datasets) == ["toy"] and config.model.block_name == "T5Block"
    model = load_model(config.model, tokenizer, torch.float32)
    assert type(model).__name__ == "T5ForConditionalGeneration"
    assert model.config.vocab_size == len(tokenizer) and model.config.dropout_rate == 0
    assert model.config.decoder_start_token_id == tokenizer.pad_token_id
    for name, hub_name in (("t5-small", "google-t5/t5-small"), ("t5-base", "google-t5/t5-base"),
                           ("flan-t5-large", "google/flan-t5-large")):
        real = make_config(f"model={name}", "loss=dpo", "loss.beta=0.1").model
        assert real.name_or_path == hub_name and real.block_name == "T5Block"
        assert "float16" not in (real.policy_dtype, real.reference_dtype)  # T5 overflows in float16


def test_generate_returns_the_response_only(tokenizer):
    from dpo.generate import GenerationOptions, generate

    model = tiny_t5(tokenizer, seed=1).float()
    with torch.no_grad():  # else the tied head echoes the start token (pad) and every text is empty
        model.shared.weight[tokenizer.pad_token_id] = 0
    prompts = ["\n\nHuman: reverse abc\n\nAssistant:", "hi"]
    texts = generate(model, tokenizer, prompts, GenerationOptions(greedy=True, max_new_tokens=6))
    for prompt, text in zip(prompts, texts):  # a greedy decoding loop, written out
        encoded = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
        decoded = [tokenizer.pad_token_id]
        while len(decoded) <= 6 and decoded[-1] != tokenizer.eos_token_id:
            with torch.no_grad():
                logits = model(input_ids=encoded, decoder_input_ids=torch.tensor([decoded])).logits
            decoded.append(int(logits[0, -1].argmax()))
        assert text == tokenizer.decode(decoded[1:], skip_special_tokens=True)
    assert any(texts)  # so that dropping the response (slicing at the prompt's length) is caught


# ---- the workflow ---------------------------------------------------------------------------------

def quick(run_dir, *overrides):
    return make_config("model=tiny-t5", f"local_run_dir={run_dir}", "wandb.enabled=false", "n_examples=64",
                       "eval_every=64", "n_eval_examples=32", "eval_batch_size=32", "n_eval_model_samples=8",
                       "warmup_steps=0", *overrides)


def logits_of(model, tokenizer):
    ids = tokenizer(["\n\nHuman: reverse abc\n\nAssistant:"], return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        return model(**ids, decoder_input_ids=torch.tensor([[0, 5, 9, 7]])).logits


def test_sft_then_dpo_end_to_end_and_latest_loads_as_seq2seq(tmp_path, tokenizer):
    sft_dir, dpo_dir = tmp_path / "sft", tmp_path / "dpo"
    train_script.train(quick(sft_dir, "loss=sft"))
    final = train_script.train(quick(dpo_dir, "loss=dpo", "loss.beta=0.1", "lr=1e-3",
                                     f"model.archive={sft_dir / 'LATEST' / 'policy.pt'}"))
    records = [json.loads(line) for line in (dpo_dir / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["loss/eval"] == pytest.approx(math.log(2), abs=1e-6)  # the reference is the SFT policy
    for name in ("loss/eval", "rewards_eval/accuracies", "rewards_eval/margins", "logps_eval/chosen",
                 "judge_eval/policy", "judge_eval/reference"):
        assert math.isfinite(final[name]), name
    assert final["rewards_eval/margins"] != 0  # DPO moved the policy away from the reference
    samples = [json.loads(line) for line in (dpo_dir / "samples.jsonl").read_text().splitlines()]
    assert any(row["policy"] for row in samples)  # decoder tokens, not cut off at the prompt's length

    config = OmegaConf.load(dpo_dir / "config.yaml")
    policy = load_model(config.model, tokenizer, torch.float32).eval()
    load_policy_state(policy, read_archive(str(dpo_dir / "LATEST" / "policy.pt"))["state"], "policy.pt")
    exported = AutoModelForSeq2SeqLM.from_pretrained(dpo_dir / "LATEST").eval()
    torch.testing.assert_close(logits_of(exported, tokenizer), logits_of(policy, tokenizer), rtol=0, atol=0)
    saved_tokenizer = AutoTokenizer.from_pretrained(dpo_dir / "LATEST")
    assert saved_tokenizer("reverse")["input_ids"] == tokenizer("reverse")["input_ids"]


def test_export_writes_a_t5_step_checkpoint(tmp_path, tokenizer, capsys):
    from dpo.export import main
    from dpo.generate import _hf_model

    config = make_config("model=tiny-t5")
    OmegaConf.resolve(config)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    OmegaConf.save(config, str(run_dir / "config.yaml"))
    model = load_model(config.model, tokenizer, torch.float32).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.1)
    state = to_reference_names(model.state_dict(), model)
    assert state.keys() == model.state_dict().keys()  # T5's names are the same in transformers 4.29.2
    write_checkpoint(str(run_dir / "step-64"), 64, {}, {"policy.pt": state})

    assert main([str(run_dir / "step-64")]) == 0
    assert "AutoModelForSeq2SeqLM.from_pretrained" in capsys.readouterr().out
    exported = _hf_model(str(run_dir / "step-64"))
    assert type(exported).__name__ == "T5ForConditionalGeneration"
    torch.testing.assert_close(logits_of(exported.eval(), tokenizer), logits_of(model, tokenizer), rtol=0, atol=1e-6)
