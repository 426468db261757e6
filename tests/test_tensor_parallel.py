"""Tensor parallelism (dpo/tensor_parallel.py) against the plain model, on real gloo process groups on CPU.

tests/tensor_parallel_worker.py runs, in one subprocess, 2 ranks on a 1-D tensor-parallel mesh for every supported
architecture and 4 ranks on a 2x2 (data x tensor) mesh with FSDP2 over the data dimension; each rank compares its
parallel model with a plain copy built in the same process. The tests here check those measurements; the errors
are checked in this process, with no process group.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from torch.distributed.tensor import DTensor

import tensor_parallel_worker as worker
from dpo.errors import ConfigError
from dpo.models import build_char_tokenizer, load_model
from dpo.tensor_parallel import apply_tensor_parallel, tensor_parallel_architectures

WORKER_TIMEOUT_S = 150
TOLERANCE = 1e-5
CASES = [(run, architecture) for run, (_, _, architectures) in worker.RUNS.items() for architecture in architectures]
# Per architecture: the parameters a block shards, under the block's path; all others stay replicated.
SHARDED = {
    "gpt_neox": ("gpt_neox.layers.*.", ["attention.dense.weight", "attention.query_key_value.bias",
                                        "attention.query_key_value.weight", "mlp.dense_4h_to_h.weight",
                                        "mlp.dense_h_to_4h.bias", "mlp.dense_h_to_4h.weight"]),
    "gpt2": ("transformer.h.*.", ["attn.c_attn.bias", "attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.bias",
                                  "mlp.c_fc.weight", "mlp.c_proj.weight"]),
    "llama": ("model.layers.*.", ["mlp.down_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight",
                                  "self_attn.k_proj.weight", "self_attn.o_proj.weight", "self_attn.q_proj.weight",
                                  "self_attn.v_proj.weight"]),
}


@pytest.fixture(scope="module")
def measured(tmp_path_factory) -> dict:
    """The worker's measurements: run -> architecture -> measurement -> worst value over ranks."""
    out = tmp_path_factory.mktemp("tensor_parallel") / "measured.json"
    # One thread a rank: up to 4 ranks share the 2 cores of a small machine.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, worker.__file__, str(out)], env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = process.communicate(timeout=WORKER_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # the worker and the ranks it forked
        output, _ = process.communicate()
        pytest.fail(f"the tensor-parallel worker ran over {WORKER_TIMEOUT_S} s:\n{output[-4000:]}")
    if process.returncode != 0:
        pytest.fail(f"the tensor-parallel worker failed ({process.returncode}):\n{output[-4000:]}")
    return json.loads(out.read_text())


@pytest.mark.parametrize("run, architecture", CASES)
def test_only_block_projections_are_sharded_and_every_parameter_is_a_dtensor(measured, run, architecture):
    result = measured[run][architecture]
    prefix, names = SHARDED[architecture]
    assert result["sharded"] == [prefix + name for name in names]
    assert result["plain_parameters"] == 0  # foreach optimizers and clip_grad_norm_ refuse mixed lists
    assert result["ties_kept"]


@pytest.mark.parametrize("run, architecture", CASES)
def test_logits_and_gradients_match_the_plain_model(measured, run, architecture):
    result = measured[run][architecture]
    assert result["logits"] < TOLERANCE
    assert result["gradients"] < TOLERANCE


@pytest.mark.parametrize("run, architecture", CASES)
def test_clip_grad_norm_and_adamw_step_match_the_plain_model(measured, run, architecture):
    result = measured[run][architecture]
    assert result["grad_norm_clips"]
    assert result["grad_norm_relative_difference"] < 1e-6
    assert result["adamw_moved_weights"] > 1e-3
    assert result["adamw"] < TOLERANCE


@pytest.mark.parametrize("run, architecture", CASES)
def test_gathered_state_dict_is_the_plain_models(measured, run, architecture):
    result = measured[run][architecture]
    assert result["state_keys_match"]
    assert result["state_equal"]
    assert result["state_empty_off_rank_0"]  # cpu_offload gathers on rank 0 only
    # Only GPT-2's c_attn columns are regrouped for sharding, so only its raw gathered state differs.
    assert (result["raw_state_max_difference"] > 0) == (architecture == "gpt2")


@pytest.mark.parametrize("run, architecture", CASES)
def test_synced_generation_matches_the_plain_model(measured, run, architecture):
    result = measured[run][architecture]
    assert result["generate_greedy_equal"]
    assert result["generate_sampled_equal"]


# ---- errors, in this process ----------------------------------------------------------------------------------


class _MeshOfSize:
    """Stands in for a DeviceMesh: the checks read its size before anything touches the model or the mesh."""

    def __init__(self, size: int):
        self._size = size

    def size(self) -> int:
        return self._size


def _tiny(config: dict) -> torch.nn.Module:
    return load_model({"from_config": config}, build_char_tokenizer(), torch.float32)


def test_the_supported_architectures_are_listed():
    assert tensor_parallel_architectures() == sorted(worker.CONFIGS) == ["gpt2", "gpt_neox", "llama"]


@pytest.mark.parametrize("config, model_class", [
    ({"model_type": "gptj", "n_embd": 32, "n_layer": 1, "n_head": 4, "rotary_dim": 4}, "GPTJForCausalLM"),
    ({"model_type": "opt", "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 4, "ffn_dim": 64,
      "word_embed_proj_dim": 32}, "OPTForCausalLM"),
])
def test_an_architecture_without_a_plan_is_a_config_error(config, model_class):
    model = _tiny(config)
    with pytest.raises(ConfigError) as error:
        apply_tensor_parallel(model, _MeshOfSize(2))
    message = str(error.value)
    assert f"model_type={config['model_type']}" in message and model_class in message
    assert "gpt2, gpt_neox, llama" in message


@pytest.mark.parametrize("architecture, size, named", [
    ("gpt_neox", 3, "num_attention_heads=4"),
    ("gpt2", 3, "n_head=4"),
    ("llama", 4, "num_key_value_heads=2"),  # 4 query heads divide, 2 kv heads do not
])
def test_counts_that_do_not_divide_are_a_config_error_and_leave_the_model_alone(architecture, size, named):
    model = _tiny(worker.CONFIGS[architecture])
    with pytest.raises(ConfigError, match=f"over {size} ranks") as error:
        apply_tensor_parallel(model, _MeshOfSize(size))
    assert named in str(error.value)
    assert not any(isinstance(param, DTensor) for param in model.parameters())
