"""Every way of computing log-probs (chunked head, packing, prefix sharing) against the plain padded path.

Batches are tokenized the way training tokenizes them: ragged, a pair whose responses differ
greatly in length, one cut at max_length, and one whose prompt is empty of shared tokens never
happens (every prompt is shared). Log-probs must agree within 1e-5 relative (float32), DPO loss
gradients within 1e-4 relative, and the prefix-shared path must also match each sequence run alone.
"""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoConfig, AutoModelForCausalLM

from dpo.batching import get_collate_fn, tokenize_batch_element
from dpo.layout import CHOSEN_BRANCH, REJECTED_BRANCH, packed_inputs, padded_inputs, sequences_of
from dpo.logps import LogpsOptions, forward_logps
from dpo.losses import DPOLoss
from dpo.models import build_char_tokenizer

MAX_LENGTH, MAX_PROMPT_LENGTH = 96, 48
PLAIN = LogpsOptions(lm_head_chunk_size=None)
MODES = {
    "chunked": LogpsOptions(),
    "chunked_by_7": LogpsOptions(lm_head_chunk_size=7),
    "chunked_by_1": LogpsOptions(lm_head_chunk_size=1),
    "packed": LogpsOptions(packing=True),
    "prefix_shared": LogpsOptions(prefix_sharing=True),
    "prefix_shared_by_5": LogpsOptions(prefix_sharing=True, lm_head_chunk_size=5),
    "packed_full_logits": LogpsOptions(packing=True, lm_head_chunk_size=None),
}
ARCHITECTURES = {
    "gpt_neox": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                     rotary_pct=0.25, max_position_embeddings=128),
    "gpt2": dict(n_embd=64, n_layer=2, n_head=4, n_positions=128),
    "llama": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=128, max_position_embeddings=128),
}


@pytest.fixture(scope="module")
def tokenizer():
    return build_char_tokenizer()


def make_model(model_type, attention="sdpa", seed=0):
    config = AutoConfig.for_model(model_type, vocab_size=100, bos_token_id=1, eos_token_id=1, pad_token_id=0,
                                  **ARCHITECTURES[model_type])
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, attn_implementation=attention).eval()


TRIPLES = [
    ("\n\nHuman: hi\n\nAssistant:", " hello there", " no"),
    ("\n\nHuman: what is two plus two?\n\nAssistant:", " four", " it is five, since " + "x" * 40),  # 1:12 lengths
    ("Q" * 60, " cut at max_length " * 6, " short"),  # the prompt and the response are both truncated
    ("\n\nHuman: list three colours\n\nAssistant:", " red, green, blue", " red, green and also blue"),
]


def make_batch(tokenizer, triples=TRIPLES):
    elements = [tokenize_batch_element(p, c, r, "keep_end", tokenizer, MAX_LENGTH, MAX_PROMPT_LENGTH)
                for p, c, r in triples]
    return get_collate_fn(tokenizer)(elements)


def logps_and_gradient(model, batch, options):
    """Per-example log-probs, token counts, and the gradient of a DPO loss against a fixed reference."""
    model.zero_grad(set_to_none=True)
    policy = forward_logps(model, batch, options)
    with torch.no_grad():
        reference = forward_logps(model, batch, PLAIN)
        reference.chosen += torch.linspace(-1, 1, len(reference.chosen))  # a margin that varies per pair
    losses, _ = DPOLoss(beta=0.5)(policy, reference)
    losses.mean().backward()
    gradient = {name: param.grad.clone() for name, param in model.named_parameters() if param.grad is not None}
    model.zero_grad(set_to_none=True)
    logps = torch.cat([policy.chosen, policy.rejected]).detach()
    return logps, torch.cat([policy.chosen_tokens, policy.rejected_tokens]), gradient


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("model_type", list(ARCHITECTURES))
def test_every_mode_matches_the_plain_path(tokenizer, model_type, attention):
    model = make_model(model_type, attention)
    batch = make_batch(tokenizer)
    assert batch["chosen_input_ids"].shape[1] == MAX_LENGTH or batch["rejected_input_ids"].shape[1] == MAX_LENGTH
    expected_logps, expected_tokens, expected_gradient = logps_and_gradient(model, batch, PLAIN)
    total_norm = torch.cat([g.flatten() for g in expected_gradient.values()]).norm()
    for mode, options in MODES.items():
        logps, tokens, gradient = logps_and_gradient(model, batch, options)
        torch.testing.assert_close(tokens, expected_tokens, rtol=0, atol=0, msg=mode)
        torch.testing.assert_close(logps, expected_logps, rtol=1e-5, atol=1e-5, msg=mode)
        assert gradient.keys() == expected_gradient.keys(), mode
        difference = torch.cat([(gradient[k] - expected_gradient[k]).flatten() for k in gradient]).norm()
        assert difference <= 1e-4 * total_norm, (mode, float(difference / total_norm))
        for name, value in gradient.items():  # every parameter, not only the largest ones
            torch.testing.assert_close(value, expected_gradient[name], rtol=1e-4, atol=1e-4 * float(total_norm),
                                       msg=f"{mode}: {name}")


@torch.no_grad()
def naive_logps(model, batch):
    """Each sequence run alone, unpadded; its response tokens' log-probs summed in float64."""
    totals = []
    for ids, labels in sequences_of(batch):
        logits = model(ids[None]).logits[0].double()
        totals.append(sum(torch.log_softmax(logits[t - 1], -1)[labels[t]].item()
                          for t in range(1, len(ids)) if labels[t] != -100))
    return torch.tensor(totals, dtype=torch.float64)


def test_prefix_sharing_matches_each_sequence_run_alone(tokenizer):
    model = make_model("gpt_neox")
    batch = make_batch(tokenizer)
    with torch.no_grad():
        out = forward_logps(model, batch, LogpsOptions(prefix_sharing=True))
    logps = torch.cat([out.chosen, out.rejected]).double()
    torch.testing.assert_close(logps, naive_logps(model, batch), rtol=1e-5, atol=1e-5)


def test_a_chosen_only_batch_packs_too(tokenizer):
    model = make_model("llama")
    batch = make_batch(tokenizer)
    sft = {key: value for key, value in batch.items() if not key.startswith("rejected")}
    with torch.no_grad():
        plain = forward_logps(model, sft, PLAIN)
        for options in (LogpsOptions(packing=True), LogpsOptions(prefix_sharing=True)):
            out = forward_logps(model, sft, options)
            assert out.rejected is None
            torch.testing.assert_close(out.chosen, plain.chosen, rtol=1e-5, atol=1e-5)


# ---- what the layouts compute ------------------------------------------------------------------------


def test_packing_computes_only_real_tokens_and_prefix_sharing_each_prompt_once(tokenizer):
    batch = make_batch(tokenizer)
    sequences = sequences_of(batch)
    real = sum(len(ids) for ids, _ in sequences)
    padded, packed, shared = padded_inputs(batch), packed_inputs(batch), packed_inputs(batch, share_prompts=True)
    assert padded.n_tokens == len(sequences) * max(len(ids) for ids, _ in sequences)
    assert real <= packed.n_tokens < padded.n_tokens
    assert packed.input_ids.shape[1] == max(len(ids) for ids, _ in sequences)  # no row longer than the longest
    prompts = sum(len(prompt) for prompt in batch["prompt_input_ids"].unbind()) - \
        int((batch["prompt_attention_mask"] == 0).sum())
    assert int((shared.segment_ids >= 0).sum()) == real - prompts  # every prompt token computed once
    for layout in (packed, shared):  # the same predictions, wherever they are made
        assert sorted(zip(layout.sequence_index.tolist(), layout.token_index.tolist(), layout.targets.tolist())) == \
            sorted(zip(padded.sequence_index.tolist(), padded.token_index.tolist(), padded.targets.tolist()))


def test_a_response_never_sees_the_other_response(tokenizer):
    shared = packed_inputs(make_batch(tokenizer), share_prompts=True)
    allowed = shared.model_kwargs("sdpa", torch.float32)["attention_mask"][:, 0]
    branch = shared.branch_ids
    chosen_queries = (branch == CHOSEN_BRANCH)[:, :, None] & (branch == REJECTED_BRANCH)[:, None, :]
    rejected_queries = (branch == REJECTED_BRANCH)[:, :, None] & (branch == CHOSEN_BRANCH)[:, None, :]
    assert chosen_queries.any() and rejected_queries.any()
    assert not allowed[chosen_queries].any() and not allowed[rejected_queries].any()
    # and the rejected response continues the prompt's positions, as it would alone
    for row in range(len(branch)):
        rejected = (branch[row] == REJECTED_BRANCH) & (shared.segment_ids[row] >= 0)
        if rejected.any():
            first = int(rejected.nonzero()[0])
            assert shared.position_ids[row, first] > 0


def test_pairs_whose_prompts_differ_are_packed_as_two_sequences(tokenizer):
    batch = make_batch(tokenizer)
    batch["rejected_input_ids"][0, 0] = 5  # no longer the chosen one's prompt
    model = make_model("gpt2")
    shared = packed_inputs(batch, share_prompts=True)
    assert int(shared.segment_ids.max()) >= 0
    with torch.no_grad():
        expected = forward_logps(model, batch, PLAIN)
        out = forward_logps(model, batch, LogpsOptions(prefix_sharing=True))
    torch.testing.assert_close(out.rejected, expected.rejected, rtol=1e-5, atol=1e-5)


class VocabularySizedTensors(TorchDispatchMode):
    """Records the size of every tensor an operation creates whose last dimension is the vocabulary."""

    def __init__(self, vocabulary, weight_shape):
        super().__init__()
        self.vocabulary, self.weight_shape, self.sizes = vocabulary, weight_shape, [0]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        output = func(*args, **(kwargs or {}))
        for tensor in output if isinstance(output, (tuple, list)) else [output]:
            if isinstance(tensor, torch.Tensor) and tensor.dim() and tensor.shape[-1] == self.vocabulary \
                    and tensor.numel() != self.weight_shape.numel():  # the head's weight (transposed) and its gradient
                self.sizes.append(tensor.numel())
        return output


def test_the_chunked_head_never_makes_full_vocabulary_logits(tokenizer):
    """The point of the chunked head: no (positions x vocabulary) tensor, forward or backward."""
    model = make_model("gpt_neox")  # vocabulary 100: no other dimension of this model is 100 wide
    batch = make_batch(tokenizer)
    positions = padded_inputs(batch).n_tokens

    def largest(options):
        with VocabularySizedTensors(model.config.vocab_size, model.get_output_embeddings().weight.shape) as recorder:
            forward_logps(model, batch, options).chosen.sum().backward()
        return max(recorder.sizes)

    assert largest(PLAIN) >= positions * model.config.vocab_size
    assert largest(LogpsOptions(lm_head_chunk_size=16)) <= 16 * model.config.vocab_size


def test_an_architecture_with_scaled_logits_keeps_its_own_head(tokenizer, monkeypatch):
    """Where logits are not plainly lm_head(hidden) (soft-capping, scaling), the model's own forward must run."""
    model = make_model("gpt_neox")
    batch = make_batch(tokenizer)
    original = model.forward

    def scaled(*args, **kwargs):
        output = original(*args, **kwargs)
        output.logits = output.logits * 0.5
        return output

    with torch.no_grad():
        monkeypatch.setattr(model, "forward", scaled)
        monkeypatch.setattr(model.config, "model_type", "an_unknown_architecture")
        halved = forward_logps(model, batch, LogpsOptions())
        monkeypatch.setattr(model.config, "model_type", "gpt_neox")
        reference = forward_logps(model, batch, LogpsOptions(lm_head_chunk_size=None))
    torch.testing.assert_close(halved.chosen, reference.chosen)


def test_packing_with_an_attention_that_takes_no_mask_is_refused(tokenizer):
    shared = packed_inputs(make_batch(tokenizer), share_prompts=True)
    with pytest.raises(ValueError, match="sdpa or eager.*packing=false"):
        shared.model_kwargs("flash_attention_2", torch.bfloat16)


def test_eager_attention_gets_an_additive_mask(tokenizer):
    packed = packed_inputs(make_batch(tokenizer))
    mask = packed.model_kwargs("eager", torch.bfloat16)["attention_mask"]
    allowed = packed.model_kwargs("sdpa", torch.bfloat16)["attention_mask"]
    assert mask.dtype == torch.bfloat16
    assert (mask[allowed] == 0).all() and (mask[~allowed] == torch.finfo(torch.bfloat16).min).all()


def test_trainers_refuse_packing_on_attention_without_masks_before_training():
    from dpo.errors import ConfigError

    model = make_model("llama")
    model.config._attn_implementation = "flash_attention_2"
    LogpsOptions().check(model)  # the padded layout works with any attention
    with pytest.raises(ConfigError, match="prefix_sharing=true needs attention that takes a mask.*flash_attention_2"):
        LogpsOptions(prefix_sharing=True).check(model)
