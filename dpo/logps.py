"""Per-sequence log-probabilities of response tokens: the one place a model is run on a batch.

`forward_logps(model, batch, options)` is the seam every trainer and loss goes through. It lays the
chosen and rejected sequences out for one model call (padded, packed, or with each prompt shared:
`dpo.layout`; for an encoder-decoder model such as T5, prompts to the encoder and responses to the
decoder), runs the LM head only where a response token is predicted, and sums each sequence's
token log-probs. `get_batch_logps` and `concatenated_inputs` keep the reference implementation's
functional API.
"""

from __future__ import annotations

from dataclasses import dataclass
from contextlib import contextmanager
from typing import Any, Iterator, Mapping, Optional

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor
from torch.utils.checkpoint import checkpoint

from dpo.errors import ConfigError
from dpo.layout import (IGNORE_INDEX, MASKABLE_ATTENTION, ModelInputs, concatenated_inputs, packed_inputs,
                        pad_to_length, padded_inputs, seq2seq_inputs)

# concatenated_inputs and pad_to_length live with the layouts; they are here too as the reference's API.
__all__ = ["IGNORE_INDEX", "SequenceLogps", "LogpsOptions", "forward_logps", "get_batch_logps", "per_token_logps",
           "concatenated_inputs", "pad_to_length", "response_token_logps"]


@dataclass
class SequenceLogps:
    """Summed log-probs of each sequence's response tokens, and how many tokens were summed.

    `rejected` and `rejected_tokens` are None for chosen-only (SFT) batches. The per-token
    log-probs (`*_token_logps`: [sequences, longest response], 0 past each response's end) are
    there only when asked for (`forward_logps(..., token_logps=True)`).
    """

    chosen: Tensor
    rejected: Optional[Tensor] = None
    chosen_tokens: Optional[Tensor] = None
    rejected_tokens: Optional[Tensor] = None
    chosen_token_logps: Optional[Tensor] = None
    rejected_token_logps: Optional[Tensor] = None

    def metrics(self) -> dict[str, Tensor]:
        """Per-example log-prob metrics, detached: `logps/chosen`, `logps/rejected`, and their per-token means."""
        metrics = {"logps/chosen": self.chosen.detach()}
        if self.rejected is not None:
            metrics["logps/rejected"] = self.rejected.detach()
        for label, tokens in (("chosen", self.chosen_tokens), ("rejected", self.rejected_tokens)):
            if tokens is not None and f"logps/{label}" in metrics:
                metrics[f"logps/{label}_per_token"] = metrics[f"logps/{label}"] / tokens.clamp(min=1)
        return metrics


def get_batch_logps(logits: Tensor, labels: Tensor, average_log_prob: bool = False) -> Tensor:
    """Log-prob of `labels` under `logits`, summed (or averaged) over positions whose label is not -100.

    logits: (batch, seq, vocab); labels: (batch, seq), -100 on prompt and padding tokens. The
    logits at position t predict the label at t + 1, as in the reference implementation.
    """
    per_token, mask = per_token_logps(logits, labels)
    summed = (per_token * mask).sum(-1)
    if average_log_prob:
        return summed / mask.sum(-1)
    return summed


def per_token_logps(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """(log-prob of each next token in float32, float mask of the tokens that count)."""
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} disagree")
    labels = labels[:, 1:]
    logits = logits[:, :-1, :].float()
    mask = labels != IGNORE_INDEX
    # -100 is not a valid index: gather a dummy token there; the mask removes it.
    targets = labels.masked_fill(~mask, 0).unsqueeze(-1)
    # gather - logsumexp keeps no full-vocabulary log-softmax tensor alive for the backward pass.
    token_logps = logits.gather(-1, targets).squeeze(-1) - logits.logsumexp(-1)
    return token_logps, mask.to(token_logps.dtype)


@dataclass(frozen=True)
class LogpsOptions:
    """How `forward_logps` runs a model: every choice gives the same log-probs and gradients.

    `lm_head_chunk_size`: the LM head runs only where a response token is predicted, this many
    positions at a time, recomputed in the backward pass, so full-vocabulary float32 logits never
    exist; None runs the model's own head everywhere (the reference implementation's way).
    `packing` and `prefix_sharing` choose the layout of a causal LM (`dpo.layout`); an encoder-decoder
    model always gets `seq2seq_inputs`, prompts to the encoder and responses to the decoder.
    """

    lm_head_chunk_size: Optional[int] = 1024
    packing: bool = False
    prefix_sharing: bool = False

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "LogpsOptions":
        return cls(lm_head_chunk_size=config.get("lm_head_chunk_size", 1024), packing=bool(config.get("packing")),
                   prefix_sharing=bool(config.get("prefix_sharing")))

    def check(self, model: nn.Module) -> None:
        """Refuse, before training, a packed layout on an encoder-decoder model or on attention that cannot take
        its mask."""
        if not (self.packing or self.prefix_sharing):
            return
        key = "prefix_sharing" if self.prefix_sharing else "packing"
        if is_encoder_decoder(model):
            raise ConfigError(f"{key}=true is for causal LMs, but {model.config.model_type} is an encoder-decoder "
                              f"model, which already encodes each prompt once; set {key}=false")
        attention = getattr(model.config, "_attn_implementation", None)
        if attention not in MASKABLE_ATTENTION:
            raise ConfigError(f"{key}=true needs attention that takes a mask ({' or '.join(MASKABLE_ATTENTION)}), but "
                              f"the model uses {attention}; set {key}=false, or load the model with sdpa attention")

    def layout(self, batch: Mapping[str, Any], model: nn.Module) -> ModelInputs:
        if is_encoder_decoder(model):
            return seq2seq_inputs(batch, decoder_start_token_id(model))
        if self.packing or self.prefix_sharing:
            return packed_inputs(batch, share_prompts=self.prefix_sharing)
        return padded_inputs(batch)


# Architectures whose logits are exactly `lm_head(final hidden states)`: no scaling or soft-capping
# after the head, which the response-only head would skip. Others run their own head everywhere.
# T5 scales its decoder output *before* the head (tied-embedding T5 v1.0), so the head sees it scaled.
PLAIN_HEAD_ARCHITECTURES = frozenset({
    "gpt_neox", "gpt2", "llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gptj",
    "gpt_bigcode", "phi3", "olmo", "olmo2", "opt", "falcon", "stablelm", "starcoder2", "t5"})


def is_encoder_decoder(model: nn.Module) -> bool:
    return bool(getattr(model.config, "is_encoder_decoder", False))


def decoder_start_token_id(model: nn.Module) -> int:
    """The token an encoder-decoder model's decoder reads first (transformers 5 may keep it in generation_config)."""
    for config in (model.config, getattr(model, "generation_config", None)):
        start = getattr(config, "decoder_start_token_id", None)
        if start is not None:
            return int(start)
    raise ConfigError(f"the {model.config.model_type} model's config has no decoder_start_token_id; add it to "
                      "model.from_config or the model's config.json (T5 uses its pad token id, 0)")


def forward_logps(model: nn.Module, batch: Mapping[str, Any], options: LogpsOptions = LogpsOptions(),
                  token_logps: bool = False) -> SequenceLogps:
    """Log-probs of the batch's chosen (and, if present, rejected) responses under `model`, in one model call.

    Gradients flow unless the caller disables them (the reference model runs under no_grad).
    `token_logps` also returns each response token's log-prob (for losses that need them).
    """
    device = next(model.parameters()).device
    inputs = options.layout(batch, model)
    n_sequences, width = inputs.n_sequences, int(inputs.token_index.max()) + 1 if len(inputs.token_index) else 1
    inputs = inputs.to(device)  # sizes are read before: no waiting on the device
    values = response_token_logps(model, inputs, options.lm_head_chunk_size)
    # Summing a (sequence, position) grid adds each sequence's tokens in the same order in every layout.
    grid = values.new_zeros(n_sequences, width).index_put((inputs.sequence_index, inputs.token_index), values)
    logps = grid.sum(-1)
    tokens = torch.bincount(inputs.sequence_index, minlength=n_sequences).to(logps.dtype)
    per_token = _response_aligned(values, inputs, n_sequences) if token_logps else None
    if "rejected_input_ids" not in batch:
        return SequenceLogps(chosen=logps, chosen_tokens=tokens, chosen_token_logps=per_token)
    n_chosen = n_sequences // 2
    return SequenceLogps(chosen=logps[:n_chosen], rejected=logps[n_chosen:],
                         chosen_tokens=tokens[:n_chosen], rejected_tokens=tokens[n_chosen:],
                         chosen_token_logps=per_token[:n_chosen] if token_logps else None,
                         rejected_token_logps=per_token[n_chosen:] if token_logps else None)


def _response_aligned(values: Tensor, inputs: ModelInputs, n_sequences: int) -> Tensor:
    """Token log-probs as [sequences, longest response]: each response's first token in column 0."""
    first = torch.full((n_sequences,), torch.iinfo(torch.long).max, device=values.device)
    first = first.scatter_reduce(0, inputs.sequence_index, inputs.token_index, reduce="amin")
    column = inputs.token_index - first[inputs.sequence_index]
    width = int(column.max()) + 1 if len(column) else 1
    return values.new_zeros(n_sequences, width).index_put((inputs.sequence_index, column), values)


def response_token_logps(model: nn.Module, inputs: ModelInputs, chunk_size: Optional[int]) -> Tensor:
    """Float32 log-prob of each of `inputs.targets`, predicted at `inputs.predict_at`."""
    kwargs = inputs.model_kwargs(model.config._attn_implementation, model.dtype)
    head = model.get_output_embeddings()
    with _encoder_runs_once(model, inputs.encoder_repeats):
        if chunk_size is None or not _plain_head(model, head):
            logits = model(**kwargs, use_cache=False).logits
            return _chunk_logps(logits.flatten(0, 1)[inputs.predict_at], inputs.targets)
        # The head runs inside the model's own forward, so FSDP2 and tensor-parallel hooks see a normal call.
        head.forward = lambda hidden: _head_logps(head, hidden, inputs, chunk_size)
        try:
            return model(**kwargs, use_cache=False).logits
        finally:
            del head.forward


@contextmanager
def _encoder_runs_once(model: nn.Module, repeats: int) -> Iterator[None]:
    """While inside, the encoder computes only the first 1/`repeats` of its rows and repeats its output.

    The seq2seq layout lists each prompt once per response (chosen, rejected), so that the model's
    cross-attention mask has a row per decoder row; encoding each prompt once gives the same values and
    gradients for half the encoder's work. Inside the model's own forward, like the chunked head.
    """
    if repeats == 1:
        yield
        return
    encoder = model.get_encoder()
    encode = encoder.forward
    installed = vars(encoder).get("forward")  # a forward some library set on the instance, to put back

    def encode_once(input_ids: Tensor, attention_mask: Tensor, **kwargs: Any):
        rows = len(input_ids) // repeats
        output = encode(input_ids=input_ids[:rows], attention_mask=attention_mask[:rows], **kwargs)
        output.last_hidden_state = output.last_hidden_state.repeat(repeats, 1, 1)
        return output

    encoder.forward = encode_once
    try:
        yield
    finally:
        if installed is None:
            del encoder.forward
        else:
            encoder.forward = installed


def _plain_head(model: nn.Module, head: Optional[nn.Module]) -> bool:
    return isinstance(head, nn.Linear) and getattr(model.config, "model_type", None) in PLAIN_HEAD_ARCHITECTURES


def _head_logps(head: nn.Linear, hidden: Tensor, inputs: ModelInputs, chunk_size: int) -> Tensor:
    weight, bias = head.weight, head.bias
    if isinstance(hidden, DTensor):  # tensor parallel: the head is replicated, so every rank computes it whole
        hidden, weight = hidden.to_local(), weight.to_local()
        bias = bias.to_local() if bias is not None else None
    hidden = hidden.flatten(0, 1)[inputs.predict_at]
    chunks = []
    for start in range(0, len(hidden), chunk_size):
        piece = (hidden[start:start + chunk_size], inputs.targets[start:start + chunk_size], weight, bias)
        if torch.is_grad_enabled():  # keep no logits for backward: recompute each chunk's there
            chunks.append(checkpoint(_linear_logps, *piece, use_reentrant=False))
        else:
            chunks.append(_linear_logps(*piece))
    return torch.cat(chunks) if chunks else hidden.new_zeros(0, dtype=torch.float32)


def _linear_logps(hidden: Tensor, targets: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    return _chunk_logps(nn.functional.linear(hidden, weight, bias), targets)


def _chunk_logps(logits: Tensor, targets: Tensor) -> Tensor:
    """log softmax(logits)[target] per row, in float32, without a full-vocabulary log-softmax tensor."""
    logits = logits.float()
    return logits.gather(-1, targets[:, None]).squeeze(-1) - logits.logsumexp(-1)
