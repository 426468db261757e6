"""Processes, devices and collectives: the one module that knows whether a run is distributed.

A run is one process (`BasicTrainer`), or one process per device under `torchrun` or under the
self-launcher (`launch`, which `train.py` uses for a parallel trainer started without torchrun),
all running the same code. `init_processes` reads torchrun's environment (RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR, MASTER_PORT), joins the process group (NCCL on GPUs, gloo on CPU) and
lays the processes out on a device mesh: data-parallel ("dp") times tensor-parallel ("tp").
Everything else asks the returned `Processes` for its rank, device and groups.
"""

from __future__ import annotations

import datetime
import math
import os
import socket
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from dpo.errors import ConfigError

# A rank that waits this long for the others in a collective gives up with an error instead of hanging forever.
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=30)


@dataclass(frozen=True)
class Processes:
    """Where this process stands in the run: its rank, its device, and the data-parallel layout.

    Ranks that share a tensor-parallel group read the same data; `dp_rank`/`dp_size` say which
    slice of every global batch this process reads.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    dp_rank: int = 0
    dp_size: int = 1
    tp_rank: int = 0
    tp_size: int = 1
    mesh: Any = None  # a DeviceMesh with dims ("dp",) or ("dp", "tp"); None for one process

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.mesh is not None

    @property
    def dp_group(self) -> Optional[dist.ProcessGroup]:
        return self.mesh["dp"].get_group() if self.mesh is not None else None


def single_process() -> Processes:
    """One process on the best device there is."""
    return Processes(device=torch.device("cuda" if torch.cuda.is_available() else "cpu"))


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init_processes(trainer: str, tensor_parallel_size: Optional[int] = None) -> Processes:
    """Join the process group torchrun (or `launch`) described in the environment, and build the mesh.

    `BasicTrainer` runs in one process; the parallel trainers run in any number, one process per
    device, with a mesh even for one process so that they run the same code at every scale.
    """
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if trainer == "BasicTrainer":
        if world_size > 1:
            raise ConfigError(f"trainer=BasicTrainer runs in one process, but {world_size} were started; use "
                              "trainer=FSDPTrainer or trainer=TensorParallelTrainer, or start one process")
        return single_process()
    if not launched_by_torchrun():  # e.g. a parallel trainer in a notebook: a group of one
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(free_port()))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=COLLECTIVE_TIMEOUT,
                                device_id=device if device.type == "cuda" else None)
    tp_size = _tensor_parallel_size(trainer, tensor_parallel_size, world_size)
    dp_size = world_size // tp_size
    from torch.distributed.device_mesh import init_device_mesh

    if trainer == "TensorParallelTrainer":
        mesh = init_device_mesh(device.type, (dp_size, tp_size), mesh_dim_names=("dp", "tp"))
    else:
        mesh = init_device_mesh(device.type, (world_size,), mesh_dim_names=("dp",))
    tp_rank = mesh["tp"].get_local_rank() if "tp" in mesh.mesh_dim_names else 0
    return Processes(rank=rank, world_size=world_size, local_rank=local_rank, device=device,
                     dp_rank=mesh["dp"].get_local_rank(), dp_size=dp_size, tp_rank=tp_rank, tp_size=tp_size,
                     mesh=mesh)


def _tensor_parallel_size(trainer: str, requested: Optional[int], world_size: int) -> int:
    """The tensor-parallel degree: `tensor_parallel_size`, or by default the processes of one node."""
    if trainer != "TensorParallelTrainer":
        return 1
    size = requested or int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    if world_size % size:
        raise ConfigError(f"tensor_parallel_size={size} must divide the number of processes ({world_size}); the "
                          "processes form a data-parallel x tensor-parallel grid")
    return size


def check_batch_layout(batch_size: int, gradient_accumulation_steps: int, processes: Processes) -> None:
    """Every process runs the same number of equal micro-batches: batch_size must divide evenly."""
    parts = gradient_accumulation_steps * processes.dp_size
    if batch_size % parts:
        raise ConfigError(f"batch_size={batch_size} (the global batch) must be divisible by "
                          f"gradient_accumulation_steps ({gradient_accumulation_steps}) x data-parallel processes "
                          f"({processes.dp_size}) = {parts}; choose a batch_size that is a multiple of {parts}")


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def free_port() -> int:
    """A TCP port nobody listens on right now, for the process group's rendezvous."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ---- collectives that are no-ops in one process ----------------------------------------------------


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def broadcast_object(value: Any) -> Any:
    """Rank 0's `value`, on every rank."""
    if not dist.is_initialized():
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def gather_objects(value: Any) -> list:
    """Every rank's `value`, in rank order, on every rank."""
    if not dist.is_initialized():
        return [value]
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def all_ranks_agree(ok: bool) -> bool:
    """True only if `ok` on every rank, so that all ranks take the same branch."""
    if not dist.is_initialized():
        return ok
    flag = torch.tensor([0.0 if ok else 1.0])
    if dist.get_backend() == "nccl":
        flag = flag.cuda()
    dist.all_reduce(flag)
    return flag.item() == 0


def gather_values(values: dict[str, Tensor], processes: Processes) -> dict[str, list[float]]:
    """Per-example metric values of the whole global batch: every data-parallel rank's, in rank order.

    All metrics travel in one collective. Tensor-parallel peers hold the same values, so only the
    data-parallel group is gathered.
    """
    names = list(values)
    local = torch.stack([values[name].detach().float().reshape(-1) for name in names])
    if processes.dp_size > 1:
        parts = [torch.empty_like(local) for _ in range(processes.dp_size)]
        dist.all_gather(parts, local.contiguous(), group=processes.dp_group)
        local = torch.cat(parts, dim=1)
    rows = local.cpu().tolist()
    return dict(zip(names, rows))


@contextmanager
def main_process_first() -> Iterator[None]:
    """Rank 0 runs the block first (downloads fill the cache), then the others (they read it)."""
    if dist.is_initialized() and dist.get_rank() != 0:
        dist.barrier()
    yield
    if dist.is_initialized() and dist.get_rank() == 0:
        dist.barrier()


# ---- the self-launcher ---------------------------------------------------------------------------


def visible_devices() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 1


def launch(worker: Callable[[Any], None], argument: Any, n_processes: int, port: Optional[int] = None) -> None:
    """Run `worker(argument)` in `n_processes` processes on this machine, as torchrun would.

    Each process gets torchrun's environment. If one process fails (an error or a signal), the
    others are stopped at once and this raises `LaunchError` naming the process and its exit code;
    the failed process has already printed its own error.
    """
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port or free_port()))
    if n_processes == 1:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
        worker(argument)
        return
    import torch.multiprocessing as mp

    try:
        mp.start_processes(_worker_entry, args=(n_processes, worker, argument), nprocs=n_processes, join=True,
                           start_method="spawn")
    except mp.ProcessExitedException as error:
        raise LaunchError(f"process {error.error_index} of {n_processes} {_describe_exit(error.exit_code)}; "
                          "the other processes were stopped") from None
    except mp.ProcessRaisedException as error:  # its traceback went to a file, not to the terminal
        raise LaunchError(f"process {error.error_index} of {n_processes} failed (the other processes were stopped):"
                          f"\n{str(error).strip()}") from None


class LaunchError(RuntimeError):
    """A process of a self-launched run failed; it has printed its own error."""


def _describe_exit(code: int) -> str:
    if code < 0:
        import signal

        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def _worker_entry(index: int, n_processes: int, worker: Callable[[Any], None], argument: Any) -> None:
    os.environ.update(RANK=str(index), LOCAL_RANK=str(index), WORLD_SIZE=str(n_processes),
                      LOCAL_WORLD_SIZE=str(n_processes))
    worker(argument)


# ---- gradients of sharded parameters -------------------------------------------------------------


def clip_grad_norm(parameters, max_norm: Optional[float]) -> float:
    """Scale gradients so that their global 2-norm is at most `max_norm` (None: leave them); return the norm.

    Gradients may be plain tensors, or DTensors sharded on different meshes (FSDP's data-parallel
    mesh, tensor parallelism's 2-D one), which torch's `clip_grad_norm_` cannot mix: each group
    of gradients on one mesh and layout is reduced over its own mesh, then the groups are combined.
    """
    from torch.distributed.tensor import DTensor

    grads = [parameter.grad for parameter in parameters if parameter.grad is not None]
    groups: dict[Any, list[Tensor]] = {}
    for grad in grads:
        key = (grad.device_mesh, grad.placements) if isinstance(grad, DTensor) else None
        groups.setdefault(key, []).append(grad)
    squares = []
    for group in groups.values():
        norm = torch.nn.utils.get_total_norm(group, 2.0)
        squares.append((norm.full_tensor() if isinstance(norm, DTensor) else norm).float() ** 2)
    total = torch.stack(squares).sum().sqrt().item() if squares else 0.0
    if max_norm is not None and math.isfinite(total):
        coefficient = max_norm / (total + 1e-6)  # as torch.nn.utils.clip_grad_norm_ computes it
        if coefficient < 1:
            for grad in grads:
                grad.mul_(coefficient)
    return total
