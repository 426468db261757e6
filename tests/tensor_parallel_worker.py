"""The multi-process half of the tensor-parallel tests: `python tests/tensor_parallel_worker.py OUT`.

It runs gloo process groups on CPU (RUNS: a 1-D tensor-parallel mesh, and a 2x2 data x tensor mesh). Every rank
builds each tiny model twice from one seed, shards one copy as the trainer does (apply_tensor_parallel over the
tensor dimension, then FSDP2 over the data dimension when it has more than one rank), runs both on its rows of
the same batch, and measures how far the parallel model's logits, gradients, grad norm, state dict, AdamW step
and generations are from the plain model's. OUT gets, per run and architecture, the worst value of
each measurement over all ranks (JSON). A failing rank stops the others and makes this script exit non-zero.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import socket
import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.multiprocessing import start_processes

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from dpo.logps import IGNORE_INDEX, get_batch_logps  # noqa: E402
from dpo.models import build_char_tokenizer, load_model  # noqa: E402
from dpo.tensor_parallel import apply_tensor_parallel, full_state_from_tensor_parallel  # noqa: E402

CONFIGS = {
    "gpt_neox": {"model_type": "gpt_neox", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                 "num_attention_heads": 4, "max_position_embeddings": 64},
    # GPT-2 ties its LM head to the token embedding.
    "gpt2": {"model_type": "gpt2", "n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 64},
    # Grouped-query attention: 2 query heads per kv head.
    "llama": {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64},
}
# name -> (world size, data-parallel size, architectures); FSDP2 joins in where data-parallel size > 1.
RUNS = {"tp2": (2, 1, list(CONFIGS)), "dp2_tp2": (4, 2, ["gpt2", "llama"])}
ROWS = 4  # global batch; each data-parallel rank takes ROWS // dp of them
SEED = 0


def build(architecture: str) -> nn.Module:
    torch.manual_seed(SEED)  # every rank, and both copies, get the same weights
    return load_model({"from_config": CONFIGS[architecture]}, build_char_tokenizer(), torch.float32)


def training_batch() -> dict[str, Tensor]:
    """Right-padded sequences of different lengths, labels -100 on the prompt and the padding."""
    generator = torch.Generator().manual_seed(1)
    lengths, width, prompt = [12, 9, 7, 11], 12, 3
    input_ids = torch.randint(3, 100, (ROWS, width), generator=generator)
    attention_mask = (torch.arange(width) < torch.tensor(lengths)[:, None]).long()
    input_ids = input_ids.masked_fill(attention_mask == 0, 0)
    labels = input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)
    labels[:, :prompt] = IGNORE_INDEX
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def prompt_batch() -> dict[str, Tensor]:
    """Left-padded prompts, as generation takes them."""
    generator = torch.Generator().manual_seed(2)
    lengths, width = [6, 4, 5, 3], 6
    input_ids = torch.randint(3, 100, (ROWS, width), generator=generator)
    attention_mask = (torch.arange(width) >= width - torch.tensor(lengths)[:, None]).long()
    return {"input_ids": input_ids.masked_fill(attention_mask == 0, 0), "attention_mask": attention_mask}


def rows(batch: dict[str, Tensor], mesh: DeviceMesh) -> dict[str, Tensor]:
    """This rank's data-parallel slice; ranks of one tensor-parallel group share it."""
    dp = mesh["dp"]
    size = ROWS // dp.size()
    start = dp.get_local_rank() * size
    return {key: value[start:start + size] for key, value in batch.items()}


def parallelize(model: nn.Module, mesh: DeviceMesh) -> None:
    """What the trainer does: tensor parallel, then FSDP2 per block and at the root over dp."""
    apply_tensor_parallel(model, mesh["tp"])
    if mesh["dp"].size() > 1:
        for block in [module for module in model.modules() if type(module).__name__ in model._no_split_modules]:
            fully_shard(block, mesh=mesh["dp"])
        fully_shard(model, mesh=mesh["dp"])


def sharded_parameters(model: nn.Module) -> list[str]:
    """Names (block index as *) of the parameters sharded over the tensor-parallel (last) mesh dimension."""
    return sorted({re.sub(r"\.\d+\.", ".*.", name) for name, param in model.named_parameters()
                   if isinstance(param, DTensor) and param.placements[-1].is_shard()})


def tied(model: nn.Module) -> bool:
    return model.get_output_embeddings().weight is model.get_input_embeddings().weight


def full(tensor: Tensor) -> Tensor:
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def max_difference(actual: dict[str, Tensor], expected: dict[str, Tensor]) -> float:
    if list(actual) != list(expected):
        return float("inf")
    return max((actual[key].float() - expected[key].float()).abs().max().item() for key in expected)


def gathered_state(model: nn.Module, cpu_offload: bool) -> dict[str, Tensor]:
    options = StateDictOptions(full_state_dict=True, cpu_offload=cpu_offload)
    return get_model_state_dict(model, options=options)


def summed_logps_loss(model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return logits, -get_batch_logps(logits, batch["labels"]).sum()


def generations(model: nn.Module, prompts: dict[str, Tensor], synced: bool, sample: bool) -> Tensor:
    with torch.no_grad(), torch.random.fork_rng():
        torch.manual_seed(SEED)
        return model.generate(**prompts, max_new_tokens=5, do_sample=sample, pad_token_id=0, synced_gpus=synced)


def measure(architecture: str, mesh: DeviceMesh) -> dict:
    """How far the parallel model is from the plain one, step by step through a training step and generation."""
    plain, parallel = build(architecture), build(architecture)
    parallelize(parallel, mesh)
    result = {"sharded": sharded_parameters(parallel),
              "plain_parameters": sum(not isinstance(param, DTensor) for param in parallel.parameters()),
              "ties_kept": tied(parallel) == tied(plain)}

    # Rank 0 gathers everything (cpu_offload), the others get an empty dict.
    initial = {key: value.clone() for key, value in plain.state_dict().items()}  # the step updates in place
    raw = gathered_state(parallel, cpu_offload=True)
    restored = full_state_from_tensor_parallel(raw, parallel)
    if dist.get_rank() == 0:
        result["state_keys_match"] = list(restored) == list(initial)
        result["state_equal"] = all(torch.equal(restored[key], initial[key]) for key in initial)
        result["raw_state_max_difference"] = max_difference(raw, initial)  # > 0 only where columns were reordered
    else:
        result["state_empty_off_rank_0"] = restored == {}

    # The global batch's loss, averaged over data-parallel ranks as FSDP2 averages their gradients.
    batch = training_batch()
    plain_logits, plain_loss = summed_logps_loss(plain, batch)
    (plain_loss / mesh["dp"].size()).backward()
    local = rows(batch, mesh)
    logits, loss = summed_logps_loss(parallel, local)
    loss.backward()
    start = mesh["dp"].get_local_rank() * len(local["input_ids"])
    result["logits"] = (logits - plain_logits[start:start + len(logits)]).abs().max().item()

    gradients = {name: full(param.grad) for name, param in parallel.named_parameters()}
    result["gradients"] = max_difference(full_state_from_tensor_parallel(gradients, parallel),
                                         {name: param.grad for name, param in plain.named_parameters()})

    plain_norm = torch.nn.utils.clip_grad_norm_(plain.parameters(), 1.0).item()
    norm = torch.nn.utils.clip_grad_norm_(parallel.parameters(), 1.0).item()  # as the trainer calls it
    result["grad_norm_relative_difference"] = abs(norm - plain_norm) / plain_norm
    result["grad_norm_clips"] = plain_norm > 1.0  # so the clipped gradients feed the step below

    # foreach=True as on GPUs, where it is the default: it refuses lists mixing DTensors and plain tensors.
    # Adam's first step is lr * g / (|g| + eps): the default eps (1e-8) would turn float32 noise in gradients
    # that are zero in exact arithmetic (GPT-2's key bias) into +-lr; 1e-4 keeps this about the step.
    for model in (plain, parallel):
        torch.optim.AdamW(model.parameters(), lr=1e-2, eps=1e-4, foreach=True).step()
    stepped = plain.state_dict()
    result["adamw"] = max_difference(full_state_from_tensor_parallel(gathered_state(parallel, False), parallel),
                                     stepped)
    result["adamw_moved_weights"] = max_difference(stepped, initial)

    plain.eval()
    parallel.eval()
    prompts = rows(prompt_batch(), mesh)
    for name, sample in (("greedy", False), ("sampled", True)):
        expected = generations(plain, prompts, synced=False, sample=sample)
        result[f"generate_{name}_equal"] = torch.equal(generations(parallel, prompts, synced=True, sample=sample),
                                                       expected)
    return result


def worst(results: list[dict]) -> dict:
    """Per measurement, the worst over ranks: the largest number, False if any rank said False, and a list only
    if every rank gave the same one."""
    merged: dict = {}
    for result in results:
        for key, value in result.items():
            if isinstance(value, bool):
                merged[key] = merged.get(key, True) and value
            elif isinstance(value, list):
                merged[key] = value if merged.get(key, value) == value else ["ranks differ"]
            else:
                merged[key] = max(merged.get(key, 0), value)
    return merged


def rank_main(rank: int, world: int, dp: int, architectures: list[str], port: int, report: Path) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    # A rank stuck in a collective (its peer died) errors out instead of hanging.
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    mesh = init_device_mesh("cpu", (dp, world // dp), mesh_dim_names=("dp", "tp"))
    measured = {}
    for architecture in architectures:
        results = [None] * world
        dist.all_gather_object(results, measure(architecture, mesh))
        measured[architecture] = worst(results)
    if rank == 0:
        report.write_text(json.dumps(measured))
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def main() -> None:
    out = Path(sys.argv[1])
    for architecture in CONFIGS:  # imported once here rather than in every forked rank
        importlib.import_module(f"transformers.models.{architecture}.modeling_{architecture}")
    reports = {}
    for run, (world, dp, architectures) in RUNS.items():
        report = out.with_name(f"{out.stem}.{run}.json")
        # fork: the ranks inherit the imports; start_processes stops the others when one fails, and raises.
        start_processes(rank_main, args=(world, dp, architectures, free_port(), report), nprocs=world,
                        start_method="fork")
        reports[run] = json.loads(report.read_text())
    out.write_text(json.dumps(reports, indent=1))


if __name__ == "__main__":
    main()
