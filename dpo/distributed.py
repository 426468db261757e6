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
import signal
import socket
import sys
import threading
import time
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


# How long the launcher waits for its processes to stop after forwarding a signal, before it kills them
# (torchrun's agent waits as long).
STOP_GRACE_S = 30.0


def launch(worker: Callable[[Any], None], argument: Any, n_processes: int, port: Optional[int] = None,
           grace_s: float = STOP_GRACE_S) -> None:
    """Run `worker(argument)` in `n_processes` processes on this machine, as torchrun would.

    Each process gets torchrun's environment. If one process fails (an error or a signal), the
    others are stopped at once and this raises `LaunchError` naming the process and its exit code;
    the failed process has already printed its own error. A SIGTERM or SIGINT sent to this process
    is forwarded to every process, which stop (see `stop_on_signals`); once all have ended (those
    still running after `grace_s` seconds are killed) this exits with 128 + the signal's number,
    as a shell reports a process ended by that signal. Nothing of the run is left running.
    """
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port or free_port()))
    if n_processes == 1:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
        worker(argument)
        return
    import torch.multiprocessing as mp

    forwarding = _SignalForwarding()
    with forwarding:
        context = mp.start_processes(_worker_entry, args=(n_processes, worker, argument), nprocs=n_processes,
                                     join=False, start_method="spawn")
        forwarding.forward_to(context.processes)
        try:
            while not forwarding.signum:
                with forwarding.interruptible():
                    if context.join(timeout=1.0):
                        return
        except mp.ProcessExitedException as error:
            if not forwarding.signum:
                raise LaunchError(f"process {error.error_index} of {n_processes} {_describe_exit(error.exit_code)}; "
                                  "the other processes were stopped") from None
        except mp.ProcessRaisedException as error:  # its traceback went to a file, not to the terminal
            if not forwarding.signum:
                raise LaunchError(f"process {error.error_index} of {n_processes} failed (the other processes were "
                                  f"stopped):\n{str(error).strip()}") from None
        except _Stop:
            pass
        _stop_within(context.processes, grace_s, forwarding.signum)
    sys.exit(128 + forwarding.signum)


class _Stop(BaseException):
    """Raised by the launcher's signal handler to leave `ProcessContext.join`, which waits through signals."""


class _SignalForwarding:
    """While active: SIGTERM and SIGINT reach this process's workers, and `signum` records the first one.

    A terminal's Ctrl-C reaches the workers too (they share its process group); they take that
    signal and the forwarded one as one (`stop_on_signals`).
    """

    def __init__(self) -> None:
        self.signum: Optional[int] = None
        self._processes: list = []
        self._interruptible = False
        self._previous: dict = {}

    def __enter__(self) -> "_SignalForwarding":
        for signum in STOP_SIGNALS:
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc_info) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def forward_to(self, processes: list) -> None:
        self._processes = list(processes)
        if self.signum:  # it came while they were being started
            self._send(self.signum)

    @contextmanager
    def interruptible(self) -> Iterator[None]:
        self._interruptible = True
        try:
            yield
        finally:
            self._interruptible = False

    def _handle(self, signum: int, frame) -> None:
        self._send(signum)  # a repeated signal too: a second Ctrl-C means hurry
        first = self.signum is None
        self.signum = self.signum or signum
        if first and self._interruptible:
            raise _Stop()

    def _send(self, signum: int) -> None:
        for process in self._processes:
            if process.is_alive():
                try:
                    os.kill(process.pid, signum)
                except ProcessLookupError:
                    pass


def _stop_within(processes: list, grace_s: float, signum: int) -> None:
    """Wait up to `grace_s` seconds for `processes` to end after `signum`, then kill those still running."""
    deadline = time.monotonic() + grace_s
    for process in processes:
        process.join(max(0.0, deadline - time.monotonic()))
    late = [index for index, process in enumerate(processes) if process.is_alive()]
    for index in late:
        processes[index].kill()
        processes[index].join()
    if late:
        which = ", ".join(str(index) for index in late)
        print(f"error: process {which} of {len(processes)} had not stopped {grace_s:g} s after "
              f"{signal.Signals(signum).name} and was killed", file=sys.stderr)


class LaunchError(RuntimeError):
    """A process of a self-launched run failed; it has printed its own error."""


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def _worker_entry(index: int, n_processes: int, worker: Callable[[Any], None], argument: Any) -> None:
    os.environ.update(RANK=str(index), LOCAL_RANK=str(index), WORLD_SIZE=str(n_processes),
                      LOCAL_WORLD_SIZE=str(n_processes))
    worker(argument)


# ---- stopping a run on a signal --------------------------------------------------------------------

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
# A signal repeated within this many seconds is the same one delivered twice: a terminal's Ctrl-C
# reaches every process of its process group, and train.py's launcher forwards it as well.
_REPEAT_S = 2.0
_stop_signals: list[tuple[int, float]] = []  # (signal, time) of each one taken


class Terminated(BaseException):
    """SIGTERM arrived: raised where the run is, as Ctrl-C raises KeyboardInterrupt, so that its cleanup runs."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum


def stop_on_signals() -> None:
    """Make SIGTERM raise `Terminated` (and SIGINT KeyboardInterrupt, as always) in this process's main thread.

    Either way the run unwinds: the run directory's lock is released, a checkpoint being written is
    left as `<dir>.partial` (which resuming deletes), and nothing keeps running. Under torchrun,
    which forwards SIGTERM to its workers and kills them 30 s later, and under `launch` alike.
    """
    if threading.current_thread() is not threading.main_thread():
        return
    _stop_signals.clear()
    for signum in STOP_SIGNALS:
        signal.signal(signum, _on_stop_signal)


def stop_signal() -> Optional[int]:
    """The first signal `stop_on_signals` has taken in this process, or None."""
    return _stop_signals[0][0] if _stop_signals else None


def _on_stop_signal(signum: int, frame) -> None:
    now = time.monotonic()
    if _stop_signals and now - _stop_signals[-1][1] < _REPEAT_S:
        return
    _stop_signals.append((signum, now))
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise Terminated(signum)


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
