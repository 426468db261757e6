"""Parallel trainers, launching, failures and exact resume, with real processes on CPU (gloo).

The parallel runs are `torchrun --nproc_per_node 2 train.py trainer=...` (and train.py's own
launcher) on the tiny model; each is compared with `trainer=BasicTrainer` on the same seed and
global batch. Kills are real SIGKILLs of real processes.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from test_train import REPO

from dpo.batching import get_batch_iterator  # noqa: E402
from dpo.distributed import LaunchError, Processes, check_batch_layout, launch  # noqa: E402
from dpo.errors import ConfigError  # noqa: E402
from dpo.models import build_char_tokenizer  # noqa: E402

RUN_TIMEOUT_S = 240
# 32 steps of 8 DPO pairs, checkpoints every 8 steps, no evaluation until the end.
RUN = ["loss=dpo", "loss.beta=0.1", "lr=1e-3", "warmup_steps=2", "max_grad_norm=1.0", "batch_size=8",
       "n_examples=256", "save_every=64", "eval_every=100000", "do_first_eval=false", "n_eval_examples=20",
       "eval_batch_size=8", "sample_during_eval=false", "wandb.enabled=false"]
STEPS = list(range(8, 257, 8))


def command(run_dir, *overrides, trainer="BasicTrainer", torchrun=True):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    prefix = launcher if torchrun and trainer != "BasicTrainer" else [sys.executable]
    return [*prefix, "train.py", *RUN, f"trainer={trainer}", f"local_run_dir={run_dir}", *overrides]


def start(argv) -> subprocess.Popen:
    # One thread a process: the ranks share the 2 cores of a small machine.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def finish(process: subprocess.Popen, timeout: float = RUN_TIMEOUT_S) -> str:
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(process.pid)
        output, _ = process.communicate()
        pytest.fail(f"ran over {timeout} s:\n{output[-4000:]}")
    return output


def run(argv) -> str:
    process = start(argv)
    output = finish(process)
    assert process.returncode == 0, output[-4000:]
    return output


def descendants(pid: int) -> list[int]:
    """Every process below `pid`, read from /proc (torchrun's workers live in their own sessions)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            parent = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(parent, []).append(int(entry))
    found, queue = [], [pid]
    while queue:
        for child in children.get(queue.pop(), []):
            found.append(child)
            queue.append(child)
    return found


def command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ")
    except OSError:
        return ""


def kill_tree(pid: int) -> None:
    for process_id in [pid, *descendants(pid)]:
        try:
            os.kill(process_id, signal.SIGKILL)
        except ProcessLookupError:
            pass


def train_lines(run_dir) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    lines = []
    for line in path.read_text().splitlines():
        try:
            lines.append(json.loads(line))
        except ValueError:  # a line being written right now
            continue
    return [line for line in lines if line["event"] == "train"]


def policy(run_dir, checkpoint="LATEST") -> dict:
    return torch.load(Path(run_dir) / checkpoint / "policy.pt", weights_only=True)["state"]


def relative(a: float, b: float) -> float:
    return abs(a - b) / max(abs(a), abs(b), 1e-12)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict:
    """Each trainer's uninterrupted run of RUN (a directory per trainer), run once for the module."""
    root = tmp_path_factory.mktemp("uninterrupted")
    runs = {}
    for trainer in ("BasicTrainer", "FSDPTrainer", "TensorParallelTrainer"):
        runs[trainer] = root / trainer
        run(command(runs[trainer], trainer=trainer))
    return runs


# ---- the parallel trainers match BasicTrainer ------------------------------------------------------


@pytest.mark.parametrize("trainer", ["FSDPTrainer", "TensorParallelTrainer"])
def test_parallel_trainer_matches_basic_trainer_step_by_step(uninterrupted, trainer):
    basic, parallel = train_lines(uninterrupted["BasicTrainer"]), train_lines(uninterrupted[trainer])
    assert [line["step"] for line in basic] == [line["step"] for line in parallel] == STEPS
    for key in ("loss/train", "grad_norm", "rewards_train/accuracies", "rewards_train/margins"):
        worst = max(relative(a[key], b[key]) for a, b in zip(basic, parallel))
        assert worst < 1e-4 or key == "rewards_train/margins" and worst < 1e-3, (key, worst)
    assert basic[-1]["loss/train"] < basic[0]["loss/train"] - 0.01  # the policy moved
    assert all(line["counters/examples"] == step for line, step in zip(parallel, STEPS))


@pytest.mark.parametrize("trainer", ["FSDPTrainer", "TensorParallelTrainer"])
def test_parallel_trainer_writes_the_same_policy_file(uninterrupted, trainer):
    basic, parallel = policy(uninterrupted["BasicTrainer"]), policy(uninterrupted[trainer])
    earlier = policy(uninterrupted["BasicTrainer"], "step-64")
    moved = max((basic[key].float() - earlier[key].float()).abs().max().item() for key in basic)
    assert list(basic) == list(parallel)  # the reference's names, in the same order
    worst = max((basic[key].float() - parallel[key].float()).abs().max().item() for key in basic)
    assert worst < 1e-4
    assert moved > 100 * worst  # far below how much the weights moved in the last 24 steps
    # loadable where BasicTrainer's is: the Hugging Face copy and the archive path
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(uninterrupted[trainer] / "LATEST")
    assert type(model).__name__ == "GPTNeoXForCausalLM"
    config = json.loads((uninterrupted[trainer] / "LATEST" / "config.json").read_text())
    assert config["architectures"] == ["GPTNeoXForCausalLM"]  # not FSDP2's wrapper class


def test_parallel_checkpoints_hold_sharded_optimizer_state(uninterrupted):
    for trainer in ("FSDPTrainer", "TensorParallelTrainer"):
        files = sorted(os.listdir(uninterrupted[trainer] / "step-64"))
        assert files == ["optimizer", "policy.pt", "scheduler.pt", "train_state.pt"]
        shards = os.listdir(uninterrupted[trainer] / "step-64" / "optimizer")
        assert ".metadata" in shards and sum(name.endswith(".distcp") for name in shards) == 2
    assert sorted(os.listdir(uninterrupted["BasicTrainer"] / "step-64")) == [
        "optimizer.pt", "policy.pt", "scheduler.pt", "train_state.pt"]


def test_the_self_launcher_runs_the_same_training(uninterrupted, tmp_path):
    run(command(tmp_path / "run", "nproc_per_node=2", "n_examples=64", trainer="FSDPTrainer", torchrun=False))
    launched, expected = train_lines(tmp_path / "run"), train_lines(uninterrupted["FSDPTrainer"])[:8]
    assert [line["step"] for line in launched] == STEPS[:8]
    assert max(relative(a["loss/train"], b["loss/train"]) for a, b in zip(launched, expected)) < 1e-6


@pytest.mark.parametrize("trainer", ["FSDPTrainer", "TensorParallelTrainer"])
def test_parallel_trainers_take_the_fast_paths_to_the_same_training(uninterrupted, tmp_path, trainer):
    """Prefix sharing, packing, the chunked head (inside FSDP2's and DTensor's hooks) and reference log-probs
    cached by a pass that every process shares."""
    run(command(tmp_path / "run", "n_examples=64", "packing=true", "prefix_sharing=true", "cache_reference_logps=true",
                "lm_head_chunk_size=64", f"local_dirs=[{tmp_path}]", trainer=trainer))
    fast, expected = train_lines(tmp_path / "run"), train_lines(uninterrupted["BasicTrainer"])[:8]
    assert [line["step"] for line in fast] == STEPS[:8]
    assert max(relative(a["loss/train"], b["loss/train"]) for a, b in zip(fast, expected)) < 1e-5
    assert len(list(tmp_path.rglob("reference_logps/*.pt"))) == 1


# ---- exact resume ----------------------------------------------------------------------------------


def kill_when(process: subprocess.Popen, ready, timeout: float = RUN_TIMEOUT_S) -> None:
    deadline = time.time() + timeout
    while not ready():
        assert process.poll() is None, f"the run ended before it could be killed:\n{process.stdout.read()[-3000:]}"
        assert time.time() < deadline, "the run never reached the point to kill it at"
        time.sleep(0.005)
    kill_tree(process.pid)
    process.communicate()


def assert_resumed_run_equals(run_dir, expected_dir) -> None:
    resumed, expected = train_lines(run_dir), train_lines(expected_dir)
    assert [line["step"] for line in resumed] == STEPS  # every step exactly once
    worst = max(relative(a["loss/train"], b["loss/train"]) for a, b in zip(resumed, expected))
    assert worst < 1e-6
    assert max(relative(a["grad_norm"], b["grad_norm"]) for a, b in zip(resumed, expected)) < 1e-6
    final, reference = policy(run_dir), policy(expected_dir)
    assert max((final[k].float() - reference[k].float()).abs().max().item() for k in final) < 1e-6
    evals = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in evals if line["event"] == "eval"] == [256]


@pytest.mark.parametrize("trainer", ["BasicTrainer", "FSDPTrainer"])
def test_a_run_killed_after_a_checkpoint_resumes_exactly(uninterrupted, tmp_path, trainer):
    run_dir = tmp_path / "run"
    process = start(command(run_dir, trainer=trainer))
    # killed once it has checkpointed and logged steps after that checkpoint, which resuming must drop
    kill_when(process, lambda: (run_dir / "step-64").is_dir() and any(line["step"] >= 96 for line in train_lines(run_dir)))
    assert not (run_dir / "LATEST").exists()
    killed_steps = [line["step"] for line in train_lines(run_dir)]
    output = run([sys.executable, "train.py", f"resume={run_dir}"] if trainer == "BasicTrainer" else
                 [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "train.py",
                  f"resume={run_dir}"])
    match = re.search(r"resuming \S+ from \S+/step-(\d+) after (\d+) examples", output)
    assert match and match.group(1) == match.group(2), output[-3000:]
    assert max(killed_steps) > int(match.group(1))  # lines after the checkpoint existed, and are gone now
    assert_resumed_run_equals(run_dir, uninterrupted[trainer])


def test_a_run_killed_while_writing_a_checkpoint_resumes_exactly(uninterrupted, tmp_path):
    run_dir = tmp_path / "run"
    process = start(command(run_dir, "save_every=8"))  # a checkpoint after every step: writes are most of the time

    def writing() -> bool:
        return any(name.endswith(".partial") for name in os.listdir(run_dir)) if run_dir.is_dir() else False

    kill_when(process, lambda: writing() and (run_dir / "step-32").is_dir())
    output = run([sys.executable, "train.py", f"resume={run_dir}"])
    assert "resuming" in output
    assert not [name for name in os.listdir(run_dir) if name.endswith((".partial", ".previous"))]
    assert_resumed_run_equals(run_dir, uninterrupted["BasicTrainer"])


def test_lengthening_a_finished_run_continues_it(uninterrupted, tmp_path):
    run_dir = tmp_path / "run"
    run(command(run_dir, "n_examples=128"))
    output = run([sys.executable, "train.py", f"resume={run_dir}", "n_examples=256"])
    assert "after 128 examples" in output
    resumed, expected = train_lines(run_dir), train_lines(uninterrupted["BasicTrainer"])
    assert [line["step"] for line in resumed] == STEPS
    assert max(relative(a["loss/train"], b["loss/train"]) for a, b in zip(resumed, expected)) < 1e-6
    assert OmegaConf.load(run_dir / "config.yaml").n_examples == 256  # a later resume continues the longer run


def test_resume_refuses_what_would_change_the_run_and_a_finished_run(uninterrupted, tmp_path):
    finished = uninterrupted["BasicTrainer"]
    process = start([sys.executable, "train.py", f"resume={finished}", "lr=0.5"])
    output = finish(process)
    assert process.returncode == 1
    assert "error: cannot resume with lr=0.5: it changes lr from 0.001" in output
    process = start([sys.executable, "train.py", f"resume={finished}"])
    output = finish(process)
    assert process.returncode == 1
    assert f"error: resume={finished}: the run already trained on all 256 examples" in output
    assert "pass a larger n_epochs or n_examples" in output


def test_resume_with_another_number_of_processes_is_refused(uninterrupted, tmp_path):
    run_dir = tmp_path / "run"  # a copy: the refusal must leave the run as it was
    subprocess.run(["cp", "-r", str(uninterrupted["FSDPTrainer"]), str(run_dir)], check=True)
    for name in ("LATEST", "step-256", "step-192", "step-128"):
        subprocess.run(["rm", "-rf", str(run_dir / name)], check=True)
    before = (run_dir / "metrics.jsonl").read_text()
    process = start([sys.executable, "train.py", f"resume={run_dir}", "nproc_per_node=1"])
    output = finish(process)
    assert process.returncode == 1
    assert ("was written by trainer=FSDPTrainer with 2 processes; resume it with the same trainer and number of "
            "processes (now trainer=FSDPTrainer with 1)") in output
    assert "Traceback" not in output
    assert (run_dir / "metrics.jsonl").read_text() == before  # refused before anything was changed
    assert sorted(os.listdir(run_dir / "step-64")) == ["optimizer", "policy.pt", "scheduler.pt", "train_state.pt"]


# ---- failures end the whole job --------------------------------------------------------------------


@pytest.mark.parametrize("launcher", ["torchrun", "self-launcher"])
def test_killing_one_process_ends_the_job_promptly(tmp_path, launcher):
    run_dir = tmp_path / "run"
    long_run = ["n_examples=100000", "save_every=100000"]
    process = start(command(run_dir, *long_run, "nproc_per_node=2", trainer="FSDPTrainer",
                            torchrun=launcher == "torchrun"))
    deadline = time.time() + RUN_TIMEOUT_S
    while len(train_lines(run_dir)) < 2:
        assert process.poll() is None and time.time() < deadline, process.stdout.read()[-3000:]
        time.sleep(0.05)
    marker = "train.py" if launcher == "torchrun" else "spawn_main"
    workers = [pid for pid in descendants(process.pid) if marker in command_line(pid)
               and "torch.distributed.run" not in command_line(pid)]
    assert len(workers) == 2, [command_line(pid) for pid in descendants(process.pid)]
    killed_at = time.time()
    os.kill(workers[1], signal.SIGKILL)
    output = finish(process, timeout=60)
    assert time.time() - killed_at < 60
    assert process.returncode != 0
    assert not [pid for pid in workers if os.path.exists(f"/proc/{pid}") and "Z" not in
                Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]]
    if launcher == "self-launcher":
        assert "error: process 1 of 2 was killed by SIGKILL; the other processes were stopped" in output
    else:
        assert "exitcode  : -9" in output


def _raise_in_process_one(marker_dir: str) -> None:
    if os.environ["RANK"] == "1":
        raise ValueError("a bug in process one")
    time.sleep(120)  # process zero would wait for it forever; the launcher must stop it


def test_a_process_that_raises_stops_the_others_and_its_error_is_shown(tmp_path):
    started = time.time()
    with pytest.raises(LaunchError) as error:
        launch(_raise_in_process_one, str(tmp_path), n_processes=2)
    assert time.time() - started < 60
    assert "process 1 of 2 failed (the other processes were stopped)" in str(error.value)
    assert "ValueError: a bug in process one" in str(error.value)


# ---- layout of the global batch over processes -----------------------------------------------------


def test_each_process_reads_its_own_slice_of_every_global_batch():
    tokenizer = build_char_tokenizer()
    options = dict(names=["toy"], tokenizer=tokenizer, split="train", batch_size=8, max_length=64,
                   max_prompt_length=48, n_examples=64, seed=3, silent=True)
    whole = list(get_batch_iterator(**options))
    parts = [list(get_batch_iterator(**options, dp_rank=rank, dp_size=2)) for rank in range(2)]
    for batch, first, second in zip(whole, *parts):
        assert len(first["prompt"]) == len(second["prompt"]) == 4
        assert first["chosen"] + second["chosen"] == batch["chosen"]
        assert torch.equal(first["chosen_input_ids"], batch["chosen_input_ids"][:4, :first["chosen_input_ids"].shape[1]])
    resumed = list(get_batch_iterator(**options, start_batch=5, dp_rank=1, dp_size=2))
    assert [batch["chosen"] for batch in resumed] == [batch["chosen"] for batch in parts[1][5:]]


def test_an_uneven_eval_batch_is_filled_up_and_marked():
    tokenizer = build_char_tokenizer()
    options = dict(names=["toy"], tokenizer=tokenizer, split="test", batch_size=8, max_length=64,
                   max_prompt_length=48, n_epochs=1, n_examples=11, shuffle=False, drop_last=False, silent=True)
    whole = list(get_batch_iterator(**options))
    parts = [list(get_batch_iterator(**options, dp_rank=rank, dp_size=2)) for rank in range(2)]
    last_whole, (last_first, last_second) = whole[-1], (parts[0][-1], parts[1][-1])
    assert len(last_whole["prompt"]) == 3
    assert last_first["is_padding"] + last_second["is_padding"] == [False, False, False, True]
    assert last_first["prompt"] + last_second["prompt"][:1] == last_whole["prompt"]


def test_a_global_batch_that_does_not_split_evenly_is_refused():
    with pytest.raises(ConfigError, match=r"batch_size=12 \(the global batch\) must be divisible by "
                                          r"gradient_accumulation_steps \(2\) x data-parallel processes \(4\) = 8"):
        check_batch_layout(12, 2, Processes(world_size=4, dp_size=4))
    check_batch_layout(16, 2, Processes(world_size=4, dp_size=4))


# ---- mixed precision, activation checkpointing and sampling in the parallel trainers -----------------


SAMPLING = ["n_examples=32", "eval_every=16", "n_eval_examples=12", "eval_batch_size=8", "n_eval_model_samples=6",
            "sample_during_eval=true"]


def samples(run_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "samples.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("trainer, options", [
    ("FSDPTrainer", ["model.fsdp_policy_mp=bfloat16", "activation_checkpointing=true"]),
    ("TensorParallelTrainer", []),
])
def test_parallel_trainers_sample_the_same_prompts_and_honour_mixed_precision(tmp_path, trainer, options):
    run(command(tmp_path / "basic", *SAMPLING))
    run(command(tmp_path / "parallel", *SAMPLING, *options, trainer=trainer))
    expected, got = samples(tmp_path / "basic"), samples(tmp_path / "parallel")
    assert [(row["step"], row["prompt"]) for row in got] == [(row["step"], row["prompt"]) for row in expected]
    assert [row["step"] for row in got] == [16] * 6 + [32] * 6
    assert all(row["policy"] and row["reference"] and "judge_policy" in row for row in got)
    basic, parallel = train_lines(tmp_path / "basic"), train_lines(tmp_path / "parallel")
    tolerance = 2e-2 if options else 1e-4  # bfloat16 compute rounds to ~3 significant digits
    assert max(relative(a["loss/train"], b["loss/train"]) for a, b in zip(basic, parallel)) < tolerance
    if options:  # and it really computed in bfloat16
        assert max(relative(a["loss/train"], b["loss/train"]) for a, b in zip(basic, parallel)) > 1e-6
