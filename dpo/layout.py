"""How a micro-batch of chosen/rejected sequences is laid out for the model, and where its response tokens are predicted.

Three layouts, all giving the same log-probs:
- `padded_inputs`: the reference implementation's; chosen rows stacked over rejected rows, right-padded
  to the longest. Simple, and every pad position costs as much as a real token.
- `packed_inputs`: each sequence's real tokens only, placed end to end in a few rows (first-fit
  decreasing) with positions restarting at 0; a 4-D mask lets each token attend only to its own
  sequence. No pad token is computed beyond the ends of the rows.
- `packed_inputs(..., share_prompts=True)`: prefix sharing. A pair becomes one segment, its prompt once
  followed by both responses; the chosen response attends to the prompt and itself, the rejected one to
  the prompt and itself, and both continue the prompt's positions. The prompt is computed once, not twice.
- `seq2seq_inputs`: for encoder-decoder models (T5). The left-padded prompt goes to the encoder, each
  response (with its EOS) to the decoder, after the decoder's start token, right-padded. Chosen and
  rejected rows share their prompt's encoding (`encoder_repeats`).

A collated batch is a dict of per-example rows; `micro_batches` and `slice_batch` cut it by examples
before any layout is chosen. Whatever the layout, `ModelInputs` lists each response token's prediction
as (the flat output position that predicts it, the token, its sequence, its index within the sequence),
so `dpo.logps` runs the LM head at exactly those positions and sums per sequence in the same order for
every layout.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional

import torch
from torch import Tensor

IGNORE_INDEX = -100
PROMPT_BRANCH, CHOSEN_BRANCH, REJECTED_BRANCH = 0, 1, 2
MASKABLE_ATTENTION = ("sdpa", "eager")  # the attention implementations that take packing's 4-D mask


def batch_size_of(batch: Mapping[str, Any]) -> int:
    """Examples (pairs, or SFT targets) in a collated batch."""
    return len(batch["prompt"])


def slice_batch(batch: Mapping[str, Any], start: int, end: int) -> dict:
    """Examples [start, end) of a collated batch: rows of every field, tensors and lists alike."""
    return {key: value[start:end] for key, value in batch.items()}


def micro_batches(batch: Mapping[str, Any], count: int) -> list[dict]:
    """`batch` in `count` equal consecutive slices (gradient accumulation)."""
    size = batch_size_of(batch) // count
    return [slice_batch(batch, index * size, (index + 1) * size) for index in range(count)]


@dataclass
class ModelInputs:
    """A micro-batch as the model sees it, and where each response token is predicted.

    Sequences are numbered chosen 0..B-1, then rejected B..2B-1. For packed layouts, `segment_ids`
    (-1 on the padding at the end of a row) and `branch_ids` define the attention mask: a token sees
    the earlier tokens of its segment that are in the prompt or in its own branch.
    """

    input_ids: Tensor  # (rows, width)
    predict_at: Tensor  # (n,) flat index into rows * width of the output that predicts each token
    targets: Tensor  # (n,) the predicted response tokens
    sequence_index: Tensor  # (n,) the sequence each token belongs to
    token_index: Tensor  # (n,) the token's label position minus one, as in the padded layout (seq2seq: its column)
    n_sequences: int
    attention_mask: Optional[Tensor] = None  # (rows, width) padding mask of the padded layout
    position_ids: Optional[Tensor] = None  # packed layouts: positions restart in every sequence
    segment_ids: Optional[Tensor] = None
    branch_ids: Optional[Tensor] = None
    # encoder-decoder layout: `input_ids` are the encoder's rows, each prompt listed `encoder_repeats` times
    decoder_input_ids: Optional[Tensor] = None  # (rows, width): the rows `predict_at` indexes
    decoder_attention_mask: Optional[Tensor] = None
    encoder_repeats: int = 1

    @property
    def n_tokens(self) -> int:
        """Positions the model computes: each prompt once in the encoder, plus the decoder's (if any)."""
        encoder = self.input_ids.numel() // self.encoder_repeats
        return int(encoder + (self.decoder_input_ids.numel() if self.decoder_input_ids is not None else 0))

    def to(self, device: torch.device) -> "ModelInputs":
        moved = {name: value.to(device) if isinstance(value, Tensor) else value for name, value in vars(self).items()}
        return ModelInputs(**moved)

    def model_kwargs(self, attention: str, dtype: torch.dtype) -> dict[str, Any]:
        """Keyword arguments for a Hugging Face causal LM using attention implementation `attention`
        (or, with decoder inputs, for an encoder-decoder model)."""
        if self.decoder_input_ids is not None:
            return {"input_ids": self.input_ids, "attention_mask": self.attention_mask,
                    "decoder_input_ids": self.decoder_input_ids, "decoder_attention_mask": self.decoder_attention_mask}
        if self.segment_ids is None:
            return {"input_ids": self.input_ids, "attention_mask": self.attention_mask}
        return {"input_ids": self.input_ids, "position_ids": self.position_ids,
                "attention_mask": self._block_mask(attention, dtype)}

    def _block_mask(self, attention: str, dtype: torch.dtype) -> Tensor:
        """(rows, 1, width, width): may query q attend to key k. Boolean for SDPA, additive for eager attention."""
        width = self.input_ids.shape[1]
        causal = torch.ones(width, width, dtype=torch.bool, device=self.input_ids.device).tril()
        same_segment = self.segment_ids[:, :, None] == self.segment_ids[:, None, :]
        key_branch = self.branch_ids[:, None, :]
        visible_branch = (key_branch == PROMPT_BRANCH) | (key_branch == self.branch_ids[:, :, None])
        allowed = (same_segment & visible_branch & causal)[:, None]
        if attention == "sdpa":
            return allowed
        if attention == "eager":
            return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
                ~allowed, torch.finfo(dtype).min)
        raise ValueError(f"packing needs the model's attention implementation to be sdpa or eager, not {attention!r}; "
                         "load the model with attn_implementation='sdpa', or set packing=false")


def sequences_of(batch: Mapping[str, Any]) -> list[tuple[Tensor, Tensor]]:
    """(real token ids, labels) of every sequence: chosen rows, then rejected rows (if any), padding removed."""
    sides = ("chosen", "rejected") if "rejected_input_ids" in batch else ("chosen",)
    sequences = []
    for side in sides:
        lengths = batch[f"{side}_attention_mask"].sum(-1).tolist()
        for row, length in enumerate(lengths):
            sequences.append((batch[f"{side}_input_ids"][row, :length], batch[f"{side}_labels"][row, :length]))
    return sequences


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


def padded_inputs(batch: Mapping[str, Any]) -> ModelInputs:
    """Chosen over rejected, right-padded to the longer (the reference implementation's layout)."""
    if "rejected_input_ids" in batch:
        fields = {key[len("concatenated_"):]: value for key, value in concatenated_inputs(batch).items()}
    else:
        fields = {field: batch[f"chosen_{field}"] for field in ("input_ids", "attention_mask", "labels")}
    labels = fields["labels"][:, 1:]
    rows, columns = (labels != IGNORE_INDEX).nonzero(as_tuple=True)
    width = fields["input_ids"].shape[1]
    return ModelInputs(input_ids=fields["input_ids"], attention_mask=fields["attention_mask"],
                       predict_at=rows * width + columns, targets=labels[rows, columns], sequence_index=rows,
                       token_index=columns, n_sequences=fields["input_ids"].shape[0])


def seq2seq_inputs(batch: Mapping[str, Any], decoder_start_token_id: int) -> ModelInputs:
    """Prompts to the encoder and responses to the decoder: chosen rows, then rejected rows (if any).

    A response is what a sequence labels (its tokens and EOS); the decoder reads the start token then the
    response, so the output at column j predicts response token j.
    """
    sides = ("chosen", "rejected") if "rejected_input_ids" in batch else ("chosen",)
    responses = [response_labels(batch[f"{side}_labels"]) for side in sides]
    width = max(1, *(response.shape[1] for response in responses))
    labels = torch.cat([pad_to_length(response, width, IGNORE_INDEX) for response in responses])
    labelled = labels != IGNORE_INDEX
    # Past a response's end the decoder reads filler: later columns never affect earlier ones, and the mask hides it.
    tokens = labels.masked_fill(~labelled, decoder_start_token_id)
    start = tokens.new_full((len(tokens), 1), decoder_start_token_id)
    decoder_input_ids = torch.cat([start, tokens[:, :-1]], dim=1)
    decoder_attention_mask = labelled.long()
    decoder_attention_mask[:, 0] = 1  # the start token, always: a query with no key to attend to would give NaN
    rows, columns = labelled.nonzero(as_tuple=True)
    repeats = len(sides)
    return ModelInputs(input_ids=batch["prompt_input_ids"].repeat(repeats, 1),
                       attention_mask=batch["prompt_attention_mask"].repeat(repeats, 1),
                       decoder_input_ids=decoder_input_ids, decoder_attention_mask=decoder_attention_mask,
                       predict_at=rows * width + columns, targets=labels[rows, columns], sequence_index=rows,
                       token_index=columns, n_sequences=len(labels), encoder_repeats=repeats)


def response_labels(labels: Tensor) -> Tensor:
    """Each row's labelled tokens moved to the row's start, -100 after them: (rows, longest response)."""
    labelled = labels != IGNORE_INDEX
    width = int(labelled.sum(-1).max()) if len(labels) else 0
    rows, columns = labelled.nonzero(as_tuple=True)
    moved = labels.new_full((len(labels), width), IGNORE_INDEX)
    moved[rows, (labelled.cumsum(-1) - 1)[rows, columns]] = labels[rows, columns]
    return moved


@dataclass
class _Segment:
    """Tokens that go into a row together, and the sequences that read them (by their offsets in the segment)."""

    ids: Tensor
    branches: Tensor
    positions: Tensor
    members: list[tuple[int, Tensor, Tensor]]  # (sequence index, offset of each of its tokens, labels)

    def __len__(self) -> int:
        return len(self.ids)


def packed_inputs(batch: Mapping[str, Any], share_prompts: bool = False) -> ModelInputs:
    """Sequences (or, with `share_prompts`, whole pairs) end to end in rows as long as the longest one."""
    sequences = sequences_of(batch)
    n_pairs = len(sequences) // 2 if "rejected_input_ids" in batch else 0
    if share_prompts and n_pairs:
        segments = [segment for pair in range(n_pairs)
                    for segment in _pair_segments(pair, sequences[pair], pair + n_pairs, sequences[pair + n_pairs])]
    else:
        segments = [_sequence_segment(index, ids, labels) for index, (ids, labels) in enumerate(sequences)]
    rows = _first_fit_decreasing(segments)
    width = max(len(segment) for segment in segments)
    shape = (len(rows), width)
    input_ids = torch.zeros(shape, dtype=torch.long)
    position_ids = torch.zeros(shape, dtype=torch.long)
    segment_ids = torch.full(shape, -1, dtype=torch.long)
    branch_ids = torch.zeros(shape, dtype=torch.long)
    predictions = []
    for row, placed in enumerate(rows):
        for number, (offset, segment) in enumerate(placed):
            end = offset + len(segment)
            input_ids[row, offset:end] = segment.ids
            position_ids[row, offset:end] = segment.positions
            branch_ids[row, offset:end] = segment.branches
            segment_ids[row, offset:end] = number
            for sequence, where, labels in segment.members:
                predictions.append(_predictions(sequence, row * width + offset + where, labels))
    predict_at, targets, sequence_index, token_index = (torch.cat(parts) for parts in zip(*predictions))
    return ModelInputs(input_ids=input_ids, position_ids=position_ids, segment_ids=segment_ids, branch_ids=branch_ids,
                       predict_at=predict_at, targets=targets, sequence_index=sequence_index, token_index=token_index,
                       n_sequences=len(sequences))


def _predictions(sequence: int, where: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Token t (labelled) is predicted by the output at token t - 1's place."""
    labelled = (labels[1:] != IGNORE_INDEX).nonzero(as_tuple=True)[0]
    return where[labelled], labels[1:][labelled], torch.full_like(labelled, sequence), labelled


def _sequence_segment(index: int, ids: Tensor, labels: Tensor) -> _Segment:
    offsets = torch.arange(len(ids))
    return _Segment(ids=ids, branches=torch.zeros_like(ids), positions=offsets, members=[(index, offsets, labels)])


def _pair_segments(chosen_index: int, chosen: tuple[Tensor, Tensor], rejected_index: int,
                   rejected: tuple[Tensor, Tensor]) -> list[_Segment]:
    """The pair as one segment (prompt, chosen response, rejected response), or as two if their prompts differ."""
    (chosen_ids, chosen_labels), (rejected_ids, rejected_labels) = chosen, rejected
    prompt = _prompt_length(chosen_labels)
    if prompt != _prompt_length(rejected_labels) or not torch.equal(chosen_ids[:prompt], rejected_ids[:prompt]):
        return [_sequence_segment(chosen_index, *chosen), _sequence_segment(rejected_index, *rejected)]
    n_chosen, n_rejected = len(chosen_ids) - prompt, len(rejected_ids) - prompt
    ids = torch.cat([chosen_ids, rejected_ids[prompt:]])
    branches = torch.tensor([PROMPT_BRANCH] * prompt + [CHOSEN_BRANCH] * n_chosen + [REJECTED_BRANCH] * n_rejected)
    positions = torch.cat([torch.arange(prompt + n_chosen), torch.arange(prompt, prompt + n_rejected)])
    chosen_where = torch.arange(prompt + n_chosen)
    rejected_where = torch.cat([torch.arange(prompt), torch.arange(prompt + n_chosen, len(ids))])
    return [_Segment(ids=ids, branches=branches, positions=positions,
                     members=[(chosen_index, chosen_where, chosen_labels),
                              (rejected_index, rejected_where, rejected_labels)])]


def _prompt_length(labels: Tensor) -> int:
    """Leading unlabelled tokens: the prompt."""
    labelled = (labels != IGNORE_INDEX).nonzero(as_tuple=True)[0]
    return int(labelled[0]) if len(labelled) else len(labels)


def _first_fit_decreasing(segments: list[_Segment]) -> list[list[tuple[int, _Segment]]]:
    """Rows of (offset, segment), each row no longer than the longest segment."""
    width = max(len(segment) for segment in segments)
    rows: list[list[tuple[int, _Segment]]] = []
    filled: list[int] = []
    for segment in sorted(segments, key=len, reverse=True):
        row = next((row for row, used in enumerate(filled) if used + len(segment) <= width), None)
        if row is None:
            rows.append([])
            filled.append(0)
            row = len(rows) - 1
        rows[row].append((filled[row], segment))
        filled[row] += len(segment)
    return rows
