"""Per-sequence log-probabilities of response tokens: the one place a model is run on a batch.

`forward_logps(model, batch)` is the seam every trainer and loss goes through: today it runs the
chosen and rejected sequences as one concatenated batch; packing, prefix sharing, a chunked LM
head or cached reference log-probs can replace its inside without touching losses or trainers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, nn

IGNORE_INDEX = -100


@dataclass
class SequenceLogps:
    """Summed log-probs of each sequence's response tokens, and how many tokens were summed.

    `rejected` and `rejected_tokens` are None for chosen-only (SFT) batches.
    """

    chosen: Tensor
    rejected: Optional[Tensor] = None
    chosen_tokens: Optional[Tensor] = None
    rejected_tokens: Optional[Tensor] = None


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


def pad_to_length(tensor: Tensor, length: int, pad_value: int, dim: int = -1) -> Tensor:
    """Right-pad `tensor` along `dim` to `length` with `pad_value`."""
    missing = length - tensor.size(dim)
    if missing <= 0:
        return tensor
    pad_shape = list(tensor.shape)
    pad_shape[dim] = missing
    return torch.cat([tensor, tensor.new_full(pad_shape, pad_value)], dim=dim)


def concatenated_inputs(batch: dict) -> dict[str, Tensor]:
    """Stack chosen over rejected sequences into `concatenated_{input_ids,attention_mask,labels}`.

    Both halves are right-padded to the longer one so that one forward pass serves both.
    """
    max_length = max(batch["chosen_input_ids"].shape[1], batch["rejected_input_ids"].shape[1])
    concatenated = {}
    for field, pad_value in (("input_ids", 0), ("attention_mask", 0), ("labels", IGNORE_INDEX)):
        concatenated[f"concatenated_{field}"] = torch.cat([
            pad_to_length(batch[f"chosen_{field}"], max_length, pad_value),
            pad_to_length(batch[f"rejected_{field}"], max_length, pad_value),
        ])
    return concatenated


def sequence_logps(model: nn.Module, input_ids: Tensor, attention_mask: Tensor,
                   labels: Tensor) -> tuple[Tensor, Tensor]:
    """(summed response log-probs, response token counts) of each sequence under `model`."""
    logits = model(input_ids, attention_mask=attention_mask, use_cache=False).logits
    token_logps, mask = per_token_logps(logits, labels)
    return (token_logps * mask).sum(-1), mask.sum(-1)


def forward_logps(model: nn.Module, batch: dict) -> SequenceLogps:
    """Log-probs of the batch's chosen (and, if present, rejected) responses under `model`.

    Chosen and rejected run as one concatenated batch: one model call, better device use.
    Gradients flow unless the caller disables them (the reference model runs under no_grad).
    """
    device = next(model.parameters()).device
    if "rejected_input_ids" not in batch:
        logps, tokens = sequence_logps(model, batch["chosen_input_ids"].to(device),
                                       batch["chosen_attention_mask"].to(device),
                                       batch["chosen_labels"].to(device))
        return SequenceLogps(chosen=logps, chosen_tokens=tokens)
    concatenated = concatenated_inputs(batch)
    logps, tokens = sequence_logps(model, concatenated["concatenated_input_ids"].to(device),
                                   concatenated["concatenated_attention_mask"].to(device),
                                   concatenated["concatenated_labels"].to(device))
    n_chosen = batch["chosen_input_ids"].shape[0]
    return SequenceLogps(chosen=logps[:n_chosen], rejected=logps[n_chosen:],
                         chosen_tokens=tokens[:n_chosen], rejected_tokens=tokens[n_chosen:])
