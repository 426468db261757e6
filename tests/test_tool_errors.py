"""The tools around training with what people actually hand them: a LoRA run, malformed or BOM-prefixed prompt
files, `--out` naming a file, a temperature that overflows, a broken model directory, and a model whose context is
shorter than `max_length`. Each through its real entry point, checking the message, the exit code and the files."""

import json
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch

from test_train import REPO, quick, train_script
from dpo.errors import ConfigError
from dpo.generate import GenerationOptions, generate, load_side_by_side, main
from dpo.models import build_char_tokenizer

pytest.importorskip("peft")

SHORT = ("n_eval_examples=32", "eval_batch_size=32", "do_first_eval=false", "sample_during_eval=false")


class NotAWeight:
    """Pickled into a pytorch_model.bin: a class `torch.load(weights_only=True)` refuses to import."""


def run_module(*args, cwd=REPO, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONPATH": str(REPO)})


def one_error_line(stderr: str) -> str:
    """The one `error: ...` line a tool prints, checked to come with no traceback."""
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, stderr
    return errors[0]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A tiny SFT run from scratch, then a LoRA DPO run from its checkpoint (its reference: the adapters off)."""
    root = tmp_path_factory.mktemp("tool_errors")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("dpo.run.plot_run_quietly", lambda run_dir: "plots skipped by this test", raising=False)
        train_script.train(quick(root / "sft", "loss=sft", "n_examples=128", "eval_every=128", *SHORT))
        train_script.train(quick(root / "lora", "loss=dpo", "loss.beta=0.1", "lr=3e-4", "lora.rank=4",
                                 "lora.alpha=8", "n_examples=64", "eval_every=64", *SHORT,
                                 f"model.archive={root / 'sft' / 'LATEST' / 'policy.pt'}"))
    return root


@pytest.fixture(scope="module")
def broken_models(tmp_path_factory):
    """GPT-2 directories saved with save_pretrained, then broken: `truncated` (model.safetensors cut in half),
    `refused` (a pytorch_model.bin that pickles a class, and no safetensors) and `truncated_bin` (a pytorch_model.bin
    cut in half, and no safetensors)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    root = tmp_path_factory.mktemp("broken_models")
    tokenizer = build_char_tokenizer()
    model = GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=1, n_head=2, n_positions=64, vocab_size=len(tokenizer),
                                       bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id))
    for name in ("truncated", "refused", "truncated_bin"):
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    weights = root / "truncated" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:weights.stat().st_size // 2])
    (root / "refused" / "model.safetensors").unlink()
    torch.save({**model.state_dict(), "extra": NotAWeight()}, root / "refused" / "pytorch_model.bin")
    (root / "truncated_bin" / "model.safetensors").unlink()
    torch.save(model.state_dict(), root / "truncated_bin" / "pytorch_model.bin")
    weights = root / "truncated_bin" / "pytorch_model.bin"
    weights.write_bytes(weights.read_bytes()[:weights.stat().st_size // 2])
    return root


# ---- LoRA runs open in dpo.generate and dpo.demo -------------------------------------------------------------

def test_a_lora_run_opens_in_generate_with_the_adapters_off_as_its_reference(runs, tmp_path, capsys):
    # was: AttributeError: 'NoneType' object has no attribute 'to' (no reference model exists for a LoRA run)
    out = tmp_path / "lora"
    assert main([str(runs / "lora"), "--prompts", "toy", "--n", "12", "--greedy", "--max_new_tokens", "6",
                 "--out", str(out)]) == 0
    # --n 12 writes 12 rows and prints 8 of them: it says so
    assert f"(the first 8 of 12 rows; {out / 'generations.md'} has them all)" in capsys.readouterr().out
    rows = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    assert len(rows) == 12
    # the reference is the model the LoRA run started from: the SFT checkpoint, here run as a policy
    assert main([str(runs / "sft" / "LATEST"), "--prompts", "toy", "--n", "12", "--greedy", "--max_new_tokens", "6",
                 "--out", str(tmp_path / "sft")]) == 0
    sft_rows = [json.loads(line) for line in (tmp_path / "sft" / "generations.jsonl").read_text().splitlines()]
    assert [row["reference"] for row in rows] == [row["policy"] for row in sft_rows]


def test_a_lora_run_opens_in_the_demo(runs):
    pytest.importorskip("flask")
    from dpo.demo import DemoTask, create_app

    pair = load_side_by_side(str(runs / "lora"), device="cpu")
    client = create_app(pair, str(runs / "lora"), DemoTask()).test_client()
    answer = client.post("/api/generate", json={"prompt": "\n\nHuman: reverse abc\n\nAssistant:", "greedy": True,
                                                "max_new_tokens": 6})
    assert answer.status_code == 200, answer.get_json()
    assert {"policy", "reference"} <= set(answer.get_json())


# ---- prompt files, --out, --temperature ----------------------------------------------------------------------

def test_a_bom_prefixed_jsonl_is_read_and_fewer_prompts_than_n_are_announced(runs, tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_bytes("\ufeff".encode() + b'{"prompt": "first"}\r\n{"prompt": "second"}\n')  # as Notepad saves
    out = tmp_path / "out"
    assert main([str(runs / "sft"), "--prompts", str(prompts), "--n", "16", "--max_new_tokens", "4",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"note: --prompts {prompts} holds 2 prompts, fewer than --n 16: all of them were generated" in printed
    rows = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    assert [row["prompt"] for row in rows] == ["first", "second"]


@pytest.mark.parametrize("name, content, message", [
    ("bad.jsonl", b'{"prompt": "a"}\n{"prompt": "b"\n',
     r'line 2 of .*bad.jsonl is not valid JSON \(Expecting .,. delimiter at column 15\); write one JSON object per '
     r'line such as \{"prompt": "..."\}'),
    ("latin1.txt", "café\n".encode("latin-1"),
     r"--prompts .*latin1.txt is not UTF-8 text \(byte 0xe9 at offset 3\); save it as UTF-8"),
])
def test_malformed_and_non_utf8_prompt_files_are_one_sentence(runs, tmp_path, capsys, name, content, message):
    # was: json.decoder.JSONDecodeError / UnicodeDecodeError tracebacks
    path = tmp_path / name
    path.write_bytes(content)
    assert main([str(runs / "sft"), "--prompts", str(path), "--out", str(tmp_path / "out")]) == 1
    assert re.fullmatch(f"error: {message}", one_error_line(capsys.readouterr().err))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("out", ["a_file", "a_file/below"])
def test_out_naming_a_file_is_refused_before_the_models_load(runs, tmp_path, capsys, out):
    # was: FileExistsError / NotADirectoryError tracebacks, after generating
    (tmp_path / "a_file").write_text("kept")
    assert main([str(runs / "sft"), "--prompts", "toy", "--out", str(tmp_path / out)]) == 1
    error = one_error_line(capsys.readouterr().err)
    assert error.startswith(f"error: --out {tmp_path / out} is a file, not a directory")
    assert "give a directory (created if missing)" in error
    assert (tmp_path / "a_file").read_text() == "kept"


def test_a_temperature_that_overflows_is_refused_by_the_command_and_by_generate(runs, tmp_path, capsys):
    # was: RuntimeError: probability tensor contains either `inf`, `nan` or element < 0
    assert main([str(runs / "sft"), "--prompts", "toy", "--temperature", "1e-300", "--out", str(tmp_path)]) == 1
    error = one_error_line(capsys.readouterr().err)
    assert error.startswith("error: --temperature 1e-300 is out of range; give --temperature a finite number of at "
                            "least 0.01") and "or use --greedy" in error
    assert not list(tmp_path.iterdir())
    pair = load_side_by_side(str(runs / "sft"), device="cpu")
    with pytest.raises(ConfigError, match=r"^temperature 1e-300 is out of range; .* or use greedy for"):
        generate(pair.policy, pair.tokenizer, ["hi"], GenerationOptions(temperature=1e-300))
    assert len(generate(pair.policy, pair.tokenizer, ["hi"], GenerationOptions(temperature=0.01,
                                                                                max_new_tokens=3))) == 1


# ---- broken model directories --------------------------------------------------------------------------------

def test_a_truncated_safetensors_under_model_name_or_path_is_one_sentence(broken_models, tmp_path):
    # was: safetensors_rust.SafetensorError: Error while deserializing header: incomplete metadata, ...
    directory = broken_models / "truncated"
    finished = run_module("train.py", "loss=sft", f"model.name_or_path={directory}", "model.from_config=null",
                          "model.tokenizer_name_or_path=char", "wandb.enabled=false", "n_examples=32",
                          f"local_run_dir={tmp_path / 'run'}")
    assert finished.returncode == 1
    error = one_error_line(finished.stderr)
    assert error.startswith(f"error: could not load model.name_or_path={directory}: {directory}/model.safetensors "
                            "is damaged (Error while deserializing header")
    assert error.endswith("save the model again with save_pretrained, or download it again")
    assert not (tmp_path / "run" / "LATEST").exists()


@pytest.mark.parametrize("name, message", [
    ("truncated", "{dir}/model.safetensors is damaged (Error while deserializing header"),
    ("refused", "{dir}/pytorch_model.bin cannot be read as plain weights (it pickles {cls}, "
                "which torch.load(weights_only=True) refuses to run); save the model again with save_pretrained "
                "(safetensors) from a copy you trust, or download it again"),
    ("truncated_bin", "{dir}/pytorch_model.bin is damaged ("),
])
def test_a_broken_reference_directory_is_one_sentence(runs, broken_models, tmp_path, capsys, name, message):
    # was: SafetensorError / _pickle.UnpicklingError ("Weights only load failed ...", 10 lines) tracebacks
    directory = broken_models / name
    assert main([str(runs / "sft"), "--prompts", "toy", "--reference", str(directory), "--out", str(tmp_path)]) == 1
    error = one_error_line(capsys.readouterr().err)
    assert error.startswith(f"error: could not load --reference={directory}: ")
    assert message.format(dir=directory, cls=f"{NotAWeight.__module__}.NotAWeight") in error
    assert not list(tmp_path.iterdir())


# ---- a model context shorter than max_length, through the Python API -------------------------------------------

API_SCRIPT = textwrap.dedent("""
    import sys, torch
    from dpo import DPOTrainer
    from dpo.errors import ConfigError
    from dpo.models import build_char_tokenizer, load_model

    pairs = [("Once upon a", " time.", " tree."), ("The cat", " sat.", " ran.")] * 2
    tokenizer = build_char_tokenizer()
    gpt2 = {"model_type": "gpt2", "n_embd": 16, "n_layer": 1, "n_head": 2, "n_positions": 16}
    for max_length in (32, 16):
        torch.manual_seed(0)
        model = load_model({"from_config": gpt2}, tokenizer, torch.float32)
        trainer = DPOTrainer(model=model, tokenizer=tokenizer, dataset=pairs, beta=0.1, batch_size=2,
                             max_length=max_length, max_prompt_length=8)
        try:
            trainer.train()
            print(f"max_length={max_length}: trained")
        except ConfigError as error:
            print(f"max_length={max_length}: ConfigError: {error}")
""")


def test_a_max_length_past_the_models_positions_is_refused_naming_both(tmp_path):
    # was: IndexError: index out of range in self (GPT-2's position embedding), from deep in the forward pass
    finished = run_module("-c", API_SCRIPT, cwd=tmp_path)
    assert finished.returncode == 0, finished.stderr
    assert ("max_length=32: ConfigError: max_length=32 is longer than the model's context of 16 tokens "
            "(n_positions=16 in its config), whose position embeddings end there; set max_length to at most 16 "
            "(and max_prompt_length below it)") in finished.stdout
    assert "max_length=16: trained" in finished.stdout  # a sequence of exactly the context still fits
