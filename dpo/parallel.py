"""The parallel trainers: the same loop as `BasicTrainer`, on models sharded with PyTorch's own engines.

`FSDPTrainer` shards the policy and the reference model with FSDP2 (`fully_shard`) over every
transformer block and the root, across all processes. `TensorParallelTrainer` splits the attention
and MLP projections of every block over the processes of a tensor-parallel group with DTensor
(`dpo.tensor_parallel`), and shards over the data-parallel dimension of a 2-D mesh with FSDP2.

What they change from `BasicTrainer`: how models are placed, the gradient norm of sharded
gradients, the policy's full state dict (gathered to the main process), and the optimizer state,
which each process writes and reads as its own shard with `torch.distributed.checkpoint` into the
checkpoint's `optimizer/` directory (restorable with the same number of processes).
"""

from __future__ import annotations

import contextlib
import os
from typing import Optional

import torch
from torch import nn

from dpo.distributed import clip_grad_norm
from dpo.errors import ConfigError
from dpo.models import compile_blocks, transformer_blocks
from dpo.trainers import BasicTrainer, enable_activation_checkpointing

OPTIMIZER_DIR = "optimizer"  # sharded optimizer state, as written by torch.distributed.checkpoint


class FSDPTrainer(BasicTrainer):
    """Fully sharded data parallelism (FSDP2): every process holds 1/N of the weights, gradients and optimizer state.

    `model.fsdp_policy_mp` (bfloat16 or float16) computes in that dtype while keeping float32 weights
    and reducing gradients in float32; `activation_checkpointing=true` recomputes each block's
    activations in the backward pass.
    """

    def place_models(self) -> None:
        if self.settings.activation_checkpointing:
            enable_activation_checkpointing(self.policy)
        if self.settings.compile:
            compile_blocks([self.policy, self.reference_model], self.settings.block_name)
        mesh = self.processes.mesh["dp"]
        shard_model(self.policy, mesh, self.settings.block_name, mixed_precision(self.settings.mixed_precision))
        if self.reference_model is not None:
            shard_model(self.reference_model, mesh, self.settings.block_name, None)

    def clip_gradient(self) -> float:
        return clip_grad_norm(self.policy.parameters(), self.settings.max_grad_norm)

    def autocast(self):
        return contextlib.nullcontext()  # FSDP2's MixedPrecisionPolicy (place_models) does it

    def policy_state_dict(self) -> dict:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        # full tensors on the main process only, moved to CPU one at a time: no process holds two copies on GPU
        return get_model_state_dict(self.policy, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def write_optimizer_state(self, partial: str) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        state = get_optimizer_state_dict(self.policy, self.optimizer)
        dcp.save({"optimizer": state}, checkpoint_id=os.path.join(partial, OPTIMIZER_DIR))

    def read_optimizer_state(self, directory: str) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

        path = os.path.join(directory, OPTIMIZER_DIR)
        if not os.path.isdir(path):
            raise ConfigError(f"{directory} holds no sharded optimizer state ({OPTIMIZER_DIR}/); it was not written "
                              f"by trainer={type(self).__name__}: resume it with the trainer that wrote it")
        state = {"optimizer": get_optimizer_state_dict(self.policy, self.optimizer)}  # the shapes to read into
        dcp.load(state, checkpoint_id=path)
        set_optimizer_state_dict(self.policy, self.optimizer, state["optimizer"])


class TensorParallelTrainer(FSDPTrainer):
    """Tensor parallelism (DTensor) inside each group of `tensor_parallel_size` processes, FSDP2 across groups.

    The processes form a 2-D mesh, data-parallel x tensor-parallel; processes of one
    tensor-parallel group read the same data and each computes a slice of every projection.
    """

    def place_models(self) -> None:
        from dpo.tensor_parallel import apply_tensor_parallel

        tp_mesh, dp_mesh = self.processes.mesh["tp"], self.processes.mesh["dp"]
        block_name = self.settings.block_name
        for model in (self.policy, self.reference_model):
            if model is not None:
                model.to(self.device)
                apply_tensor_parallel(model, tp_mesh)
        if self.settings.activation_checkpointing:
            enable_activation_checkpointing(self.policy)
        if self.settings.compile:
            compile_blocks([self.policy, self.reference_model], block_name)
        # FSDP over the data-parallel dimension, even of size 1: every parameter becomes a DTensor
        # and model.fsdp_policy_mp applies.
        shard_model(self.policy, dp_mesh, block_name, mixed_precision(self.settings.mixed_precision))
        if self.reference_model is not None:
            shard_model(self.reference_model, dp_mesh, block_name, None)

    def policy_state_dict(self) -> dict:
        from dpo.tensor_parallel import full_state_from_tensor_parallel

        state = super().policy_state_dict()
        return full_state_from_tensor_parallel(state, self.policy) if state else state


# ---- FSDP2 ------------------------------------------------------------------------------------------


def mixed_precision(dtype_name: Optional[str]):
    """FSDP2's policy for `model.fsdp_policy_mp`: compute in that dtype, reduce gradients in float32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if dtype_name is None:
        return MixedPrecisionPolicy()
    if dtype_name not in ("bfloat16", "float16", "float32"):
        raise ConfigError(f"model.fsdp_policy_mp={dtype_name} is not supported: use bfloat16, float16, or null for "
                          "no mixed precision")
    return MixedPrecisionPolicy(param_dtype=getattr(torch, dtype_name), reduce_dtype=torch.float32)


def shard_model(model: nn.Module, mesh, block_name: Optional[str], policy) -> None:
    """`fully_shard` every transformer block, then the root (embeddings, final norm, LM head)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = policy or MixedPrecisionPolicy()
    for block in transformer_blocks(model, block_name):
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
