"""Every command the README names, run as a user runs it: a fresh process from the repository root.

Inside pytest's process, state left by other tests (a registered Hydra resolver, an imported module,
a changed working directory) can make a broken command pass; `benchmarks/dpo_step.py` was broken on
main exactly that way (it runs for real in test_benchmark.py, the API example in test_reference_identity.py,
train.py's command-line errors in test_command_line.py). Each test here checks the exit code, what the command printed and the files
it wrote. The commands that train for minutes (the quick start, the loss-family and HH benchmarks)
are checked as far as they go without training: their argument parsing and imports.
"""

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHORT = ("wandb.enabled=false", "n_examples=64", "eval_every=64", "n_eval_examples=16", "eval_batch_size=16",
         "sample_during_eval=false")


def run(*command: str, cwd: Path = REPO, timeout: int = 300) -> subprocess.CompletedProcess:
    environment = {**os.environ, "PYTHONPATH": ""}  # nothing of pytest's sys.path
    return subprocess.run([sys.executable, *command], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env=environment)


def succeeded(finished: subprocess.CompletedProcess) -> bool:
    return finished.returncode == 0 and "Traceback" not in finished.stderr


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("entry_points") / "sft"
    finished = run("train.py", "loss=sft", f"local_run_dir={run_dir}", *SHORT)
    assert succeeded(finished), finished.stderr[-3000:]
    return run_dir


def test_train_py_writes_a_run(sft_run):
    assert (sft_run / "LATEST" / "policy.pt").is_file() and (sft_run / "config.yaml").is_file()
    events = [json.loads(line)["event"] for line in (sft_run / "metrics.jsonl").read_text().splitlines()]
    assert "train" in events and events[-1] == "eval"


def test_train_py_from_another_directory_finds_its_configs(sft_run, tmp_path):
    # train.py resolves config/ next to itself, not in the working directory
    finished = run(str(REPO / "train.py"), "loss=sft", f"local_run_dir={tmp_path / 'elsewhere'}", *SHORT,
                   cwd=tmp_path)
    assert succeeded(finished), finished.stderr[-3000:]
    assert (tmp_path / "elsewhere" / "LATEST" / "policy.pt").is_file()


def test_plot(sft_run):
    pytest.importorskip("matplotlib")
    finished = run("-m", "dpo.plot", str(sft_run))
    assert succeeded(finished), finished.stderr[-3000:]
    assert list((sft_run / "plots").glob("*.png"))


def test_generate(sft_run):
    finished = run("-m", "dpo.generate", str(sft_run), "--prompts", "toy", "--n", "4", "--max_new_tokens", "8")
    assert succeeded(finished), finished.stderr[-3000:]
    written = list((sft_run / "generations").glob("*.jsonl"))
    assert written and len(written[0].read_text().splitlines()) == 4


def test_export(sft_run, tmp_path):
    out = tmp_path / "hf"
    finished = run("-m", "dpo.export", str(sft_run / "LATEST"), str(out))
    assert succeeded(finished), finished.stderr[-3000:]
    assert (out / "config.json").is_file() and list(out.glob("*.safetensors"))


def test_summarize_runs(sft_run):
    finished = run("scripts/summarize_runs.py", str(sft_run))
    assert succeeded(finished), finished.stderr[-3000:]
    assert f"{sft_run} after 64 examples: loss/eval" in finished.stdout


def test_demo_serves_its_page(sft_run):
    pytest.importorskip("flask")
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "dpo.demo", str(sft_run), "--port", str(port)], cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline, page = time.time() + 120, None
        while time.time() < deadline and server.poll() is None and page is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as response:
                    page = response.read().decode()
            except OSError:
                time.sleep(0.5)
        assert page is not None, server.communicate(timeout=10)[1][-3000:] if server.poll() is not None else "no page"
        assert "<html" in page.lower()
    finally:
        server.terminate()
        server.wait(timeout=30)


# benchmarks/dpo_step.py runs for real in test_benchmark.py
@pytest.mark.parametrize("script", ["benchmarks/loss_family.py", "benchmarks/hh_runs.py", "benchmarks/lora_vs_full.py",
                                    "scripts/reference_interop.py"])
def test_long_commands_start(script):
    finished = run(script, "--help")
    assert succeeded(finished), finished.stderr[-3000:]
    assert finished.stdout.startswith("usage:")


def test_quickstart_script_is_valid_shell():
    finished = subprocess.run(["bash", "-n", "scripts/quickstart.sh"], cwd=REPO, capture_output=True, text=True)
    assert finished.returncode == 0, finished.stderr
