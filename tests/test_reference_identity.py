"""The reference model's identity, through the real entry points (`python train.py`, the API in a fresh process):
cached reference log-probs belong to the weights that computed them (in-memory models, a replaced model
directory), a resume refuses an archive that changed since the run started, an unreadable cache file is named
and recomputed, the precompute line tells what every process did, and the API prints no config and no empty
eval lines."""

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dpo.errors import CheckpointError  # noqa: E402
from dpo.reference_cache import (IDENTITY_FILE, ReferenceLogpsCache, check_resumed_reference,  # noqa: E402
                                 reference_identity)

LOG2 = math.log(2)
# 16 train pairs in 2 steps, 8 eval pairs evaluated before training: 24 distinct pairs for the cache.
SHORT = ("loss=dpo", "loss.beta=0.1", "wandb.enabled=false", "n_examples=16", "batch_size=8", "eval_batch_size=8",
         "n_eval_examples=8", "do_first_eval=true", "eval_every=100000", "sample_during_eval=false")
TIMEOUT_S = 300


def python(*arguments: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    environment = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, *arguments], cwd=cwd, capture_output=True, text=True, timeout=TIMEOUT_S,
                          env=environment)


def train(*overrides: str) -> subprocess.CompletedProcess:
    return python("train.py", *overrides)


def ok(finished: subprocess.CompletedProcess) -> str:
    assert finished.returncode == 0 and "Traceback" not in finished.stderr, finished.stderr[-3000:]
    return finished.stdout


def first_eval_loss(run_dir: Path) -> float:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return next(row["loss/eval"] for row in rows if "loss/eval" in row)


def save_tiny_gpt2(directory: Path, seed: int) -> None:
    """A small Hugging Face model directory (as an SFT run's LATEST/ is), for the character tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    config = AutoConfig.for_model("gpt2", n_embd=32, n_layer=1, n_head=2, n_positions=128, vocab_size=100,
                                  bos_token_id=1, eos_token_id=1, pad_token_id=0)
    AutoModelForCausalLM.from_config(config).save_pretrained(directory)


def cache_files(cache_dir: Path) -> list[Path]:
    return sorted(cache_dir.rglob("reference_logps/*.pt"))  # under <local dir>/<user>/


def test_a_replaced_model_directory_gets_its_own_reference_logps(tmp_path):
    """The fingerprint used to hold the path only: a redone SFT run's directory read the old run's log-probs."""
    model_dir, cache_dir = tmp_path / "sft" / "LATEST", tmp_path / "cache"
    common = (*SHORT, "model=blank_model", f"model.name_or_path={model_dir}", "model.tokenizer_name_or_path=char",
              "model.reference_dtype=float32", "datasets=[toy]", "max_length=64", "max_prompt_length=48",
              "cache_reference_logps=true", "debug=true", f"local_dirs=[{cache_dir}]")
    save_tiny_gpt2(model_dir, seed=0)
    first = ok(train(*common, f"local_run_dir={tmp_path / 'first'}"))
    assert "exp_name:" in first  # train.py still prints its whole config
    assert "reference log-probs: computed all 24 pairs" in first
    save_tiny_gpt2(model_dir, seed=1)  # the SFT run redone: same path, other weights
    second = ok(train(*common, f"local_run_dir={tmp_path / 'second'}"))
    assert "reference log-probs: computed all 24 pairs" in second and "read from" not in second
    assert first_eval_loss(tmp_path / "second") == pytest.approx(LOG2, abs=1e-6)  # policy == reference
    assert len(cache_files(cache_dir)) == 2


def write_archive(path: Path, seed: int) -> None:
    """A reference-format policy.pt of the tiny model (as `model.archive` names an SFT run's)."""
    from dpo.models import build_char_tokenizer, load_model
    from tests.test_train import make_config

    torch.manual_seed(seed)
    model = load_model(make_config().model, build_char_tokenizer(), torch.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"step_idx": 0, "state": model.state_dict(), "metrics": {}}, path)


def test_a_resume_whose_archive_was_rewritten_is_refused_naming_it(tmp_path):
    archive, run_dir = tmp_path / "sft" / "LATEST" / "policy.pt", tmp_path / "dpo"
    write_archive(archive, seed=0)
    ok(train(*SHORT, f"model.archive={archive}", f"local_run_dir={run_dir}"))
    recorded = json.loads((run_dir / IDENTITY_FILE).read_text())
    assert recorded["archive"]["path"] == str(archive) and recorded["archive"]["bytes"] == archive.stat().st_size
    original, log = archive.read_bytes(), (run_dir / "metrics.jsonl").read_text()

    write_archive(archive, seed=1)  # the SFT run redone after the DPO run started
    refused = train(f"resume={run_dir}", "n_examples=32")
    assert refused.returncode == 1 and "Traceback" not in refused.stderr, refused.stderr[-3000:]
    message = refused.stderr.strip().splitlines()[-1]
    assert message.startswith(f"error: resume={run_dir}: model.archive={archive} changed since the run started")
    assert f"recorded in {run_dir / IDENTITY_FILE}:" in message and message.count("sampled-content digest") == 2
    assert "put the original back, or start a new run (without resume=)" in message
    assert (run_dir / "metrics.jsonl").read_text() == log  # nothing trained

    # The same content again, with a new modification time, is the same reference (checked in this process: one
    # more resume would only add the cost of a run).
    archive.write_bytes(original)
    saved = OmegaConf.load(run_dir / "config.yaml")
    check_resumed_reference(str(run_dir), reference_identity(saved))
    write_archive(archive, seed=1)
    with pytest.raises(CheckpointError, match="changed since the run started"):
        check_resumed_reference(str(run_dir), reference_identity(saved))


def test_fsdp_precompute_counts_every_processs_pairs(tmp_path):
    """It printed 'computed 12 pairs, 12 from <file>' for a file that did not exist: the other process's pairs."""
    cache_dir = tmp_path / "cache"
    output = ok(train(*SHORT, "trainer=FSDPTrainer", "nproc_per_node=2", "cache_reference_logps=true", "debug=true",
                      f"local_dirs=[{cache_dir}]", f"local_run_dir={tmp_path / 'run'}"))
    files = cache_files(cache_dir)
    assert len(files) == 1 and len(ReferenceLogpsCache(str(files[0]))) == 24
    assert "reference log-probs: computed all 24 pairs by 2 processes in" in output
    assert f"; saved to {files[0]}" in output and "read from" not in output


API_SCRIPT = textwrap.dedent("""
    import json, os, sys
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from dpo import DPOTrainer
    from dpo.data import get_dataset
    from dpo.models import build_char_tokenizer

    CACHE = sys.argv[1]
    tokenizer = build_char_tokenizer()

    def pairs(split, n):
        data = get_dataset("toy", split)
        return [(p, e["responses"][i], e["responses"][j]) for p, e in list(data.items())[:n] for i, j in e["pairs"]]

    def model(seed):
        torch.manual_seed(seed)
        config = AutoConfig.for_model("gpt2", n_embd=32, n_layer=1, n_head=2, n_positions=128,
                                      vocab_size=len(tokenizer))
        return AutoModelForCausalLM.from_config(config)

    SETTINGS = dict(beta=0.1, n_examples=16, batch_size=8, eval_batch_size=8, do_first_eval=True, eval_every=10**6,
                    lr=1e-3, warmup_steps=0, max_length=64, max_prompt_length=48, local_dirs=[CACHE],
                    debug=True)  # no checkpoints, no plots: only what the cache does matters here

    def trainer(policy, ref_model=None, **settings):
        return DPOTrainer(model=policy, tokenizer=tokenizer, dataset=pairs("train", 8), eval_dataset=pairs("test", 4),
                          ref_model=ref_model, cache_reference_logps=True, **SETTINGS, **settings)

    def first_eval_loss(run_dir):
        rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
        return next(row["loss/eval"] for row in rows if "loss/eval" in row)

    def run(phase, policy, ref_model=None):
        print(f"PHASE {phase}", flush=True)
        t = trainer(policy, ref_model)
        t.train()
        result = {"loss": first_eval_loss(t.run_dir)}
        print("RESULT " + json.dumps({phase: result}), flush=True)
        return t

    run("first", model(0))
    folder = os.path.join(CACHE, os.listdir(CACHE)[0], "reference_logps")  # <local dir>/<user>/reference_logps
    first_file, = [os.path.join(folder, name) for name in os.listdir(folder)]
    print("FIRST_FILE " + first_file, flush=True)
    run("second", model(1))  # another in-memory model of the same class
    expected = trainer(model(0), ref_model=model(1)).evaluate()["loss/eval"]  # evaluate() reads no cache
    print("RESULT " + json.dumps({"explicit_expected": {"loss": expected}}), flush=True)
    run("explicit", model(0), ref_model=model(1))
    trained = model(0)
    run("same_weights", trained)  # model(0) again: the first run's reference, so its log-probs are read
    run("after_training", trained)  # the reference is a copy of the model as it is now: trained

    class Note:
        pass

    content = open(first_file, "rb").read()
    corruptions = {
        "truncated": lambda: open(first_file, "wb").write(content[:200]),
        "wrong_shapes": lambda: torch.save({"keys": torch.zeros(3, 8, dtype=torch.uint8), "values": torch.zeros(3, 2)},
                                           first_file),
        "refused_pickle": lambda: torch.save({"keys": Note()}, first_file),
    }
    for name, corrupt in corruptions.items():
        corrupt()
        run(name, model(0))
    run("again", model(0))

    print("PHASE no_eval", flush=True)
    DPOTrainer(model=model(0), tokenizer=tokenizer, dataset=pairs("train", 8), beta=0.1, batch_size=8,
               eval_every=8, max_length=64, max_prompt_length=48, local_dirs=[CACHE], debug=True).train()
    print("PHASE show_config", flush=True)
    DPOTrainer(model=model(0), tokenizer=tokenizer, dataset=pairs("train", 8), beta=0.1, batch_size=8,
               max_length=64, max_prompt_length=48, local_dirs=[CACHE], debug=True, show_config=True).train()
    print("PHASE end", flush=True)
""")


@pytest.fixture(scope="module")
def api_run(tmp_path_factory):
    """The API script above in a fresh process: its stdout by phase, its results, its cache folder."""
    root = tmp_path_factory.mktemp("api")
    (root / "script.py").write_text(API_SCRIPT)
    finished = python(str(root / "script.py"), str(root / "cache"), cwd=root)
    phases, name = {}, None
    for line in finished.stdout.splitlines():
        if line.startswith("PHASE "):
            name = line.split()[1]
            phases[name] = []
        elif name:
            phases[name].append(line)
    results = {}
    for line in finished.stdout.splitlines():
        if line.startswith("RESULT "):
            results.update(json.loads(line[len("RESULT "):]))
    first_file = next((line.split(" ", 1)[1] for line in finished.stdout.splitlines()
                       if line.startswith("FIRST_FILE ")), None)
    return finished, {key: "\n".join(lines) for key, lines in phases.items()}, results, first_file


def test_in_memory_models_each_get_their_own_reference_logps(api_run):
    """All were named `<in-memory GPT2LMHeadModel>`: the second model read the first one's log-probs (step-0 eval
    loss 0.6981 where policy == reference gives log 2), and an explicit ref_model= was ignored."""
    finished, phases, results, _ = api_run
    assert "second" in results, finished.stderr[-3000:]
    for phase in ("first", "second", "same_weights", "after_training"):
        assert results[phase]["loss"] == pytest.approx(LOG2, abs=1e-6), phase
    for phase in ("first", "second", "after_training"):
        assert "reference log-probs: computed all 24 pairs" in phases[phase], phase
    assert "reference log-probs: all 24 pairs read from" in phases["same_weights"]
    assert abs(results["explicit_expected"]["loss"] - LOG2) > 1e-3  # another reference: the rewards are not zero
    assert results["explicit"]["loss"] == pytest.approx(results["explicit_expected"]["loss"], abs=1e-6)
    assert "all 24 pairs read from" in phases["explicit"]  # model(1)'s log-probs, cached by "second": the same weights


@pytest.mark.parametrize("phase", ["truncated", "wrong_shapes", "refused_pickle"])
def test_an_unreadable_cache_file_is_named_and_recomputed(api_run, phase):
    finished, phases, results, first_file = api_run
    assert phase in results, finished.stderr[-3000:]
    assert f"warning: the reference log-prob cache {first_file} was unreadable (" in phases[phase]
    assert "computed again and the file replaced" in phases[phase]
    assert "reference log-probs: computed all 24 pairs" in phases[phase]
    assert results[phase]["loss"] == pytest.approx(LOG2, abs=1e-6)


def test_a_replaced_cache_file_is_read_by_the_next_run(api_run):
    finished, phases, results, first_file = api_run
    assert "again" in results, finished.stderr[-3000:]
    assert f"reference log-probs: all 24 pairs read from {first_file}" in phases["again"]
    assert "warning" not in phases["again"] and len(ReferenceLogpsCache(first_file)) == 24


def test_the_api_prints_no_config_and_no_empty_eval_lines(api_run):
    finished, phases, _, _ = api_run
    assert "end" in phases, finished.stderr[-3000:]
    assert "run directory:" in phases["no_eval"] and "exp_name:" not in phases["no_eval"]
    assert "eval stats" not in phases["no_eval"] and "train stats after 8 examples" in phases["no_eval"]
    assert "exp_name:" in phases["show_config"]


def test_the_api_example_saves_under_runs(tmp_path):
    """It left `fine-tuned-model/` in the directory it ran in (the repository root, as the README runs it)."""
    ok(python(str(REPO / "examples" / "python_api.py"), "--quick", cwd=tmp_path))
    assert (tmp_path / "runs" / "python_api" / "fine-tuned-model" / "config.json").is_file()
    assert not (tmp_path / "fine-tuned-model").exists()
