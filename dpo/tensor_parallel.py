"""Tensor parallelism for Hugging Face causal LMs, with PyTorch's DTensor (`torch.distributed.tensor.parallel`).

Megatron-style: in every transformer block, the attention's QKV projection and the MLP's first projection(s)
are sharded column-wise (each rank computes whole heads and a slice of the MLP's hidden units), the output
projections row-wise (each rank's partial sum is all-reduced). Activations between the two stay local tensors,
so the model's own attention code runs unchanged on its ranks' heads, which is why the head counts it reads
must be local (see each plan).

Embeddings, norms and the LM head stay whole on every rank, but as `Replicate()` DTensors on the same mesh:
with every parameter a DTensor, PyTorch's foreach optimizers and `clip_grad_norm_` accept `model.parameters()`
(they refuse lists mixing DTensors and plain tensors), and FSDP2 over a data-parallel mesh dimension puts
every parameter on the one 2-D mesh.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any, Callable

import torch
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Placement, Replicate, Shard, distribute_module, distribute_tensor
from torch.distributed.tensor.parallel import ColwiseParallel, ParallelStyle, RowwiseParallel, parallelize_module

from dpo.errors import ConfigError

# Set on a module whose output columns were permuted for sharding: new column j holds original column order[j].
COLUMN_ORDER_ATTRIBUTE = "tensor_parallel_column_order"


# ---- GPT-2's Conv1D: nn.Linear with the weight transposed ([in, out]) ------------------------------------------


def _shard_parameters(placements: dict[str, Placement], src_data_rank: int | None, name: str, module: nn.Module,
                      mesh: DeviceMesh) -> None:
    for key, placement in placements.items():
        param = getattr(module, key, None)
        if param is not None:
            sharded = distribute_tensor(param, mesh, [placement], src_data_rank=src_data_rank)
            module.register_parameter(key, nn.Parameter(sharded, requires_grad=param.requires_grad))


class _ColwiseConv1D(ColwiseParallel):
    """ColwiseParallel for Conv1D, which torch's own rejects: output columns are the weight's dim 1, not dim 0."""

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        return distribute_module(
            module, device_mesh, partial(_shard_parameters, {"weight": Shard(1), "bias": Shard(0)}, self.src_data_rank),
            partial(self._prepare_input_fn, self.input_layouts, self.desired_input_layouts),
            partial(self._prepare_output_fn, self.output_layouts, self.use_local_output))


class _RowwiseConv1D(RowwiseParallel):
    """RowwiseParallel for Conv1D: input rows are the weight's dim 0; the bias is added once, after the sum."""

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        self.desired_input_layouts = (Shard(-1),)
        return distribute_module(
            module, device_mesh,
            partial(_shard_parameters, {"weight": Shard(0), "bias": Replicate()}, self.src_data_rank),
            partial(self._prepare_input_fn, self.input_layouts, self.desired_input_layouts),
            partial(self._prepare_output_fn, self.output_layouts, self.use_local_output))


# ---- per-architecture plans --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Plan:
    """How to shard one architecture's transformer block."""

    styles: Callable[[], dict[str, ParallelStyle]]  # block-relative module name -> a fresh style
    counts: Callable[[Any], dict[str, int]]  # config counts that must divide by the tensor-parallel size
    prepare: Callable[[nn.Module, int], None] = lambda block, size: None  # adjusts a block before sharding


def _gpt_neox_styles() -> dict[str, ParallelStyle]:
    # query_key_value is laid out head by head ([q k v] of head 0, then head 1, ...), and the forward infers
    # the head count (view(..., -1, 3 * head_size)): a contiguous column shard is a set of whole heads as is.
    return {"attention.query_key_value": ColwiseParallel(), "attention.dense": RowwiseParallel(),
            "mlp.dense_h_to_4h": ColwiseParallel(), "mlp.dense_4h_to_h": RowwiseParallel()}


def _gpt2_styles() -> dict[str, ParallelStyle]:
    return {"attn.c_attn": _ColwiseConv1D(), "attn.c_proj": _RowwiseConv1D(),
            "mlp.c_fc": _ColwiseConv1D(), "mlp.c_proj": _RowwiseConv1D()}


def _gpt2_prepare(block: nn.Module, size: int) -> None:
    """Regroup c_attn's columns [all q | all k | all v] into [q_0 k_0 v_0 | q_1 k_1 v_1 | ...], one group a rank.

    The forward splits c_attn's output into q, k, v by `split_size` (then infers the head count), so with each
    rank's shard holding its own [q_r | k_r | v_r], setting `split_size` to the local width is all it needs.
    """
    attention, c_attn = block.attn, block.attn.c_attn
    width = attention.split_size // size
    order = torch.arange(3 * attention.split_size, device=c_attn.weight.device)
    order = order.view(3, size, width).transpose(0, 1).reshape(-1)
    with torch.no_grad():
        c_attn.weight.copy_(c_attn.weight[:, order])
        c_attn.bias.copy_(c_attn.bias[order])
    setattr(c_attn, COLUMN_ORDER_ATTRIBUTE, order)
    attention.split_size = width


def _llama_styles() -> dict[str, ParallelStyle]:
    # The forward infers head counts (view(..., -1, head_dim)); num_key_value_groups (heads per kv head) is
    # the same locally when both counts divide by the tensor-parallel size, so no attribute changes.
    return {"self_attn.q_proj": ColwiseParallel(), "self_attn.k_proj": ColwiseParallel(),
            "self_attn.v_proj": ColwiseParallel(), "self_attn.o_proj": RowwiseParallel(),
            "mlp.gate_proj": ColwiseParallel(), "mlp.up_proj": ColwiseParallel(), "mlp.down_proj": RowwiseParallel()}


_PLANS = {
    "gpt_neox": _Plan(_gpt_neox_styles, lambda config: {
        "num_attention_heads": config.num_attention_heads, "intermediate_size": config.intermediate_size}),
    "gpt2": _Plan(_gpt2_styles, lambda config: {
        "n_head": config.n_head, "n_inner": config.n_inner or 4 * config.n_embd}, _gpt2_prepare),
    "llama": _Plan(_llama_styles, lambda config: {
        "num_attention_heads": config.num_attention_heads, "num_key_value_heads": config.num_key_value_heads,
        "intermediate_size": config.intermediate_size}),
}


def tensor_parallel_architectures() -> list[str]:
    """The model_type names that have a plan, for messages and docs."""
    return sorted(_PLANS)


# ---- applying and undoing ----------------------------------------------------------------------------------------


def apply_tensor_parallel(model: nn.Module, tp_mesh: DeviceMesh) -> None:
    """Shard model's attention and MLP projections of every transformer block over the 1-D `tp_mesh`, in place.

    The model arrives on its device holding full weights (already loaded); embeddings, norms and LM head stay
    replicated. Raises ConfigError when the architecture has no plan or its head / kv-head / MLP sizes do not
    divide by the tensor-parallel size.
    """
    model_type = getattr(model.config, "model_type", None)
    plan = _PLANS.get(model_type)
    if plan is None:
        raise ConfigError(f"tensor parallelism has no plan for model_type={model_type} ({type(model).__name__}); "
                          f"supported architectures: {', '.join(tensor_parallel_architectures())}")
    size = tp_mesh.size()
    counts = plan.counts(model.config)
    if any(count % size for count in counts.values()):
        listed = ", ".join(f"{key}={count}" for key, count in counts.items())
        raise ConfigError(f"tensor parallelism over {size} ranks needs {model_type}'s {listed} all divisible by "
                          f"{size}; choose a tensor-parallel size that divides them")
    for block in _transformer_blocks(model):
        plan.prepare(block, size)
        parallelize_module(block, tp_mesh, plan.styles())
    _replicate_the_rest(model, tp_mesh)


def _transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks, by the class names Hugging Face lists in `_no_split_modules`.

    Not by attribute path, which differs per architecture, nor by the outer class, which FSDP2 renames.
    """
    names = set(getattr(model, "_no_split_modules", None) or ())
    return [module for module in model.modules() if type(module).__name__ in names]


def _replicate_the_rest(model: nn.Module, mesh: DeviceMesh) -> None:
    """Turn every parameter the plan did not shard into a Replicate() DTensor; its module still takes and gives
    plain tensors.

    The modules owning such parameters (embeddings, norms, LM head) are leaves in the supported architectures,
    so converting their inputs and outputs at their boundary touches no other module.
    """
    owners = [module for module in model.modules()
              if any(not isinstance(param, DTensor) for param in module.parameters(recurse=False))]
    replicas: dict[int, nn.Parameter] = {}
    for module in owners:
        distribute_module(module, mesh, partial(_replicate_parameters, replicas), _replicated_inputs, _local_output)


def _replicate_parameters(replicas: dict[int, nn.Parameter], name: str, module: nn.Module, mesh: DeviceMesh) -> None:
    # One replica per parameter object keeps tied weights (an LM head sharing the embedding) tied.
    for key, param in list(module.named_parameters(recurse=False)):
        if not isinstance(param, DTensor):
            if id(param) not in replicas:
                replica = distribute_tensor(param.data, mesh, [Replicate()])
                replicas[id(param)] = nn.Parameter(replica, requires_grad=param.requires_grad)
            module.register_parameter(key, replicas[id(param)])


def _replicated_inputs(module: nn.Module, inputs: tuple, mesh: DeviceMesh) -> tuple:
    return tuple(DTensor.from_local(value, mesh, [Replicate()], run_check=False)
                 if isinstance(value, Tensor) and not isinstance(value, DTensor) else value for value in inputs)


def _local_output(module: nn.Module, output: Any, mesh: DeviceMesh) -> Any:
    return output.to_local() if isinstance(output, DTensor) else output


def full_state_from_tensor_parallel(state: dict, model: nn.Module) -> dict:
    """`state`, a full (gathered, plain-tensor) state dict of a model that went through apply_tensor_parallel, in
    the plain model's layout: the columns sharding permuted (GPT-2's c_attn) put back in their original order.

    Keys absent from `state` are left absent: with cpu_offload, ranks other than 0 gather an empty dict. Any dict
    keyed like the state dict (gathered gradients, say) is put back the same way.
    """
    full = dict(state)
    for name, module in model.named_modules():
        order = getattr(module, COLUMN_ORDER_ATTRIBUTE, None)
        if order is None:
            continue
        for key in (f"{name}.weight", f"{name}.bias"):
            if key in full:
                restored = torch.empty_like(full[key])
                restored[..., order.to(restored.device)] = full[key]
                full[key] = restored
    return full
