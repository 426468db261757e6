"""Per-sequence log-probs against naive per-sequence, per-token float64 loops."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from dpo.logps import (IGNORE_INDEX, SequenceLogps, concatenated_inputs, forward_logps,
                       get_batch_logps, pad_to_length)

VOCAB = 50


# ---------------------------------------------------------------- naive references

def naive_logps(logits, labels, average=False):
    """For each sequence, sum log_softmax(logits[t])[labels[t + 1]] in float64 over labelled t + 1."""
    out = []
    for seq_logits, seq_labels in zip(logits, labels):
        total, count = 0.0, 0
        for t in range(len(seq_labels) - 1):
            target = int(seq_labels[t + 1])
            if target != IGNORE_INDEX:
                total += torch.log_softmax(seq_logits[t].double(), -1)[target].item()
                count += 1
        out.append(total / count if average else total)
    return torch.tensor(out, dtype=torch.float64)


def random_logits_and_labels(seed=0, batch=5, length=12, vocab=20, scale=4.0):
    """Random logits; labels -100 on each row's prompt (left) and padding (right)."""
    g = torch.Generator().manual_seed(seed)
    logits = scale * torch.randn(batch, length, vocab, generator=g)
    labels = torch.randint(0, vocab, (batch, length), generator=g)
    for row in range(batch):
        prompt = int(torch.randint(1, length // 2, (1,), generator=g))
        padding = int(torch.randint(0, length // 3, (1,), generator=g))
        labels[row, :prompt] = IGNORE_INDEX
        labels[row, length - padding:] = IGNORE_INDEX
    return logits, labels


# ---------------------------------------------------------------- get_batch_logps

@pytest.mark.parametrize("average", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_get_batch_logps_matches_naive_loop(average, seed):
    logits, labels = random_logits_and_labels(seed)
    result = get_batch_logps(logits, labels, average_log_prob=average)
    assert result.shape == (logits.shape[0],)
    torch.testing.assert_close(result.double(), naive_logps(logits, labels, average), rtol=1e-6, atol=1e-5)


def test_get_batch_logps_ignores_logits_at_masked_and_last_positions():
    logits, labels = random_logits_and_labels(3)
    logits.requires_grad_(True)
    get_batch_logps(logits, labels).sum().backward()
    next_label_masked = torch.ones_like(labels, dtype=torch.bool)
    next_label_masked[:, :-1] = labels[:, 1:] == IGNORE_INDEX
    assert (logits.grad[next_label_masked] == 0).all()
    assert (logits.grad[~next_label_masked].abs().sum(-1) > 0).all()


def test_get_batch_logps_changing_masked_labels_changes_nothing():
    logits, labels = random_logits_and_labels(4)
    other = labels.clone()
    other[:, 0] = 7  # position 0 is never predicted
    assert torch.equal(get_batch_logps(logits, labels), get_batch_logps(logits, other))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("average", [False, True])
def test_low_precision_logits_are_upcast_to_float32(dtype, average):
    logits, labels = random_logits_and_labels(5, vocab=200)
    low = logits.to(dtype)
    result = get_batch_logps(low, labels, average_log_prob=average)
    assert result.dtype == torch.float32
    # reference on exactly the rounded logits, in float64: only float32 rounding remains
    torch.testing.assert_close(result.double(), naive_logps(low, labels, average), rtol=1e-6, atol=1e-4)


@pytest.mark.parametrize("logits_shape, labels_shape", [
    ((2, 5, 10), (2, 6)),
    ((2, 5, 10), (3, 5)),
    ((2, 5, 10), (2, 5, 1)),
])
def test_get_batch_logps_rejects_mismatched_shapes(logits_shape, labels_shape):
    with pytest.raises(ValueError, match="disagree"):
        get_batch_logps(torch.randn(logits_shape), torch.zeros(labels_shape, dtype=torch.long))


# ---------------------------------------------------------------- pad_to_length

def test_pad_to_length_right_pads_last_dim():
    x = torch.tensor([[1, 2], [3, 4]])
    padded = pad_to_length(x, 4, -100)
    assert torch.equal(padded, torch.tensor([[1, 2, -100, -100], [3, 4, -100, -100]]))
    assert padded.dtype == x.dtype


def test_pad_to_length_along_dim_zero():
    x = torch.tensor([[1.5, 2.5]])
    assert torch.equal(pad_to_length(x, 3, 0, dim=0), torch.tensor([[1.5, 2.5], [0.0, 0.0], [0.0, 0.0]]))


@pytest.mark.parametrize("length", [2, 1])
def test_pad_to_length_leaves_long_enough_tensor_unchanged(length):
    x = torch.tensor([[1, 2]])
    assert torch.equal(pad_to_length(x, length, 0), x)


# ---------------------------------------------------------------- concatenated_inputs

def side(ids, labels):
    ids = torch.tensor(ids)
    return ids, torch.ones_like(ids), torch.tensor(labels)


@pytest.mark.parametrize("chosen_len, rejected_len", [(3, 5), (5, 3), (4, 4)])
def test_concatenated_inputs_stacks_chosen_first_and_right_pads(chosen_len, rejected_len):
    chosen = side([[11 + i for i in range(chosen_len)]] * 2, [[-100] + [21] * (chosen_len - 1)] * 2)
    rejected = side([[31 + i for i in range(rejected_len)]] * 2, [[-100] + [41] * (rejected_len - 1)] * 2)
    batch = {}
    for prefix, (ids, mask, labels) in (("chosen", chosen), ("rejected", rejected)):
        batch.update({f"{prefix}_input_ids": ids, f"{prefix}_attention_mask": mask, f"{prefix}_labels": labels})
    out = concatenated_inputs(batch)

    length = max(chosen_len, rejected_len)
    assert set(out) == {"concatenated_input_ids", "concatenated_attention_mask", "concatenated_labels"}
    for key, index, pad in (("concatenated_input_ids", 0, 0), ("concatenated_attention_mask", 1, 0),
                            ("concatenated_labels", 2, IGNORE_INDEX)):
        tensor = out[key]
        assert tensor.shape == (4, length) and tensor.dtype == torch.long
        for rows, source, n in ((slice(0, 2), chosen, chosen_len), (slice(2, 4), rejected, rejected_len)):
            assert torch.equal(tensor[rows, :n], source[index])
            assert (tensor[rows, n:] == pad).all()


# ---------------------------------------------------------------- forward_logps on a tiny model

@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


def make_side(g, prompt_lens, response_lens):
    """Right-padded ids/mask/labels plus the unpadded (ids, prompt_len) of each sequence."""
    seqs = [torch.randint(1, VOCAB, (p + r,), generator=g) for p, r in zip(prompt_lens, response_lens)]
    length = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), length, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, IGNORE_INDEX)
    for row, (seq, p) in enumerate(zip(seqs, prompt_lens)):
        ids[row, :len(seq)] = seq
        mask[row, :len(seq)] = 1
        labels[row, p:len(seq)] = seq[p:]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}, list(zip(seqs, prompt_lens))


def make_batch(seed=0, rejected=True):
    g = torch.Generator().manual_seed(seed)
    prompts = [3, 5, 2]
    chosen, chosen_seqs = make_side(g, prompts, [4, 2, 6])
    batch = {f"chosen_{k}": v for k, v in chosen.items()}
    rejected_seqs = None
    if rejected:
        rejected_side, rejected_seqs = make_side(g, prompts, [7, 3, 9])  # longer than chosen
        batch.update({f"rejected_{k}": v for k, v in rejected_side.items()})
    return batch, chosen_seqs, rejected_seqs


@torch.no_grad()
def naive_sequence_logps(model, seqs):
    """Run the model on each sequence alone, unpadded; sum log-probs of its response tokens."""
    logps, counts = [], []
    for seq, prompt_len in seqs:
        logits = model(seq[None]).logits[0].double()
        total = sum(torch.log_softmax(logits[t - 1], -1)[seq[t]].item() for t in range(prompt_len, len(seq)))
        logps.append(total)
        counts.append(len(seq) - prompt_len)
    return torch.tensor(logps, dtype=torch.float64), torch.tensor(counts, dtype=torch.float64)


def assert_matches_naive(logps, tokens, model, seqs):
    expected_logps, expected_counts = naive_sequence_logps(model, seqs)
    torch.testing.assert_close(logps.detach().double(), expected_logps, rtol=0, atol=1e-5)
    torch.testing.assert_close(tokens.double(), expected_counts)


def test_forward_logps_matches_each_sequence_run_alone(tiny_model):
    batch, chosen_seqs, rejected_seqs = make_batch()
    out = forward_logps(tiny_model, batch)
    assert isinstance(out, SequenceLogps)
    assert out.chosen.shape == out.rejected.shape == (3,)
    assert_matches_naive(out.chosen, out.chosen_tokens, tiny_model, chosen_seqs)
    assert_matches_naive(out.rejected, out.rejected_tokens, tiny_model, rejected_seqs)


def test_forward_logps_chosen_only_batch_has_no_rejected(tiny_model):
    batch, chosen_seqs, _ = make_batch(seed=1, rejected=False)
    out = forward_logps(tiny_model, batch)
    assert out.rejected is None and out.rejected_tokens is None
    assert_matches_naive(out.chosen, out.chosen_tokens, tiny_model, chosen_seqs)


def test_forward_logps_runs_the_model_once_for_a_pair_batch(tiny_model):
    calls = []
    handle = tiny_model.register_forward_hook(lambda module, args, output: calls.append(1))
    try:
        forward_logps(tiny_model, make_batch(seed=2)[0])
    finally:
        handle.remove()
    assert len(calls) == 1


def test_forward_logps_gradients_flow_to_the_model(tiny_model):
    tiny_model.zero_grad()
    out = forward_logps(tiny_model, make_batch(seed=3)[0])
    assert out.chosen.requires_grad and out.rejected.requires_grad
    (out.chosen.sum() - out.rejected.sum()).backward()
    grads = [p.grad for p in tiny_model.parameters()]
    assert all(g is not None for g in grads)
    assert sum(g.abs().sum() for g in grads) > 0
    tiny_model.zero_grad()


def test_forward_logps_under_no_grad_does_not_require_grad(tiny_model):
    with torch.no_grad():
        out = forward_logps(tiny_model, make_batch(seed=4)[0])
    assert not out.chosen.requires_grad and not out.rejected.requires_grad
