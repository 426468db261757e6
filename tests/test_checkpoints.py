"""Checkpoints: the reference format, atomic writes (also under SIGKILL), safe reads, clear errors.

The format is the original DPO reference implementation's: `policy.pt`, `optimizer.pt` and
`scheduler.pt`, each a `torch.save`d dict `{"step_idx": int, "state": state_dict, "metrics": dict}`.
Models are tiny GPT-NeoX models built from a config, so nothing is downloaded.
"""

from __future__ import annotations

import os
import random
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM, AutoTokenizer

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # train.py (and dpo/) live in the repo root
    sys.path.insert(0, str(REPO_ROOT))

import dpo.checkpoints  # noqa: E402
import dpo.models  # noqa: E402
from dpo.checkpoints import CHECKPOINT_FILES, load_policy_state, read_archive, write_checkpoint  # noqa: E402
from dpo.errors import CheckpointError, UserError  # noqa: E402
from dpo.models import build_char_tokenizer, load_model  # noqa: E402

TINY = {"model_type": "gpt_neox", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
        "intermediate_size": 64, "max_position_embeddings": 64}


def tiny_model(seed: int = 0, dtype: torch.dtype = torch.float32, **overrides):
    torch.manual_seed(seed)
    return load_model({"from_config": {**TINY, **overrides}}, build_char_tokenizer(), dtype)


def assert_states_equal(actual: dict, expected: dict) -> None:
    assert list(actual) == list(expected)
    for key in expected:
        assert torch.equal(actual[key], expected[key]), key


def training_states(model) -> dict:
    """policy/optimizer/scheduler state dicts as a trainer saves them, after one real optimizer step."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / 10))
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    model(ids, labels=ids).loss.backward()
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad()
    return {"policy.pt": model.state_dict(), "optimizer.pt": optimizer.state_dict(),
            "scheduler.pt": scheduler.state_dict()}


def load_file(path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def siblings(directory: Path) -> list[str]:
    return sorted(os.listdir(directory.parent))


@pytest.fixture(scope="module")
def tokenizer():
    return build_char_tokenizer()


# ---- 1. the format, and Hugging Face format alongside ---------------------------------------------


def test_write_checkpoint_reference_format_round_trips(tmp_path):
    model = tiny_model(seed=1)
    states = training_states(model)
    metrics = {"loss/train": 1.25, "rewards_train/accuracies": 0.5, "counter": 3}
    directory = tmp_path / "LATEST"
    write_checkpoint(str(directory), 128, metrics, states)

    assert sorted(os.listdir(directory)) == sorted(CHECKPOINT_FILES)
    assert siblings(directory) == ["LATEST"]
    for filename in CHECKPOINT_FILES:
        loaded = load_file(directory / filename)
        assert type(loaded) is dict and set(loaded) == {"step_idx", "state", "metrics"}, filename
        assert loaded["step_idx"] == 128 and type(loaded["step_idx"]) is int
        assert loaded["metrics"] == metrics
    assert_states_equal(load_file(directory / "policy.pt")["state"], model.state_dict())

    optimizer = load_file(directory / "optimizer.pt")["state"]
    expected = states["optimizer.pt"]
    assert optimizer["param_groups"] == expected["param_groups"]
    assert set(optimizer["state"]) == set(expected["state"]) and len(expected["state"]) > 0
    for index, param_state in expected["state"].items():
        for name, value in param_state.items():
            assert torch.equal(optimizer["state"][index][name], value), (index, name)
    scheduler = load_file(directory / "scheduler.pt")["state"]
    assert scheduler["last_epoch"] == states["scheduler.pt"]["last_epoch"] == 1
    assert scheduler["_last_lr"] == states["scheduler.pt"]["_last_lr"]

    # the loaded state restores an optimizer that a fresh model's optimizer accepts
    fresh = tiny_model(seed=2)
    load_policy_state(fresh, load_file(directory / "policy.pt")["state"], "policy.pt")
    new_optimizer = torch.optim.AdamW(fresh.parameters(), lr=1e-3)
    new_optimizer.load_state_dict(optimizer)
    assert new_optimizer.state_dict()["param_groups"] == expected["param_groups"]


def test_write_checkpoint_with_hf_model_loads_with_auto_classes(tmp_path, tokenizer):
    model = tiny_model(seed=3)
    states = training_states(model)  # weights differ from a fresh init
    directory = tmp_path / "LATEST"
    write_checkpoint(str(directory), 64, {"loss": 0.5}, states, hf_model=model, tokenizer=tokenizer)

    files = set(os.listdir(directory))
    assert set(CHECKPOINT_FILES) <= files and "config.json" in files
    assert siblings(directory) == ["LATEST"]

    loaded_tokenizer = AutoTokenizer.from_pretrained(str(directory))
    text = "Human: hi\nAssistant: hello!"
    assert loaded_tokenizer(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert loaded_tokenizer.pad_token_id == tokenizer.pad_token_id
    assert loaded_tokenizer.eos_token_id == tokenizer.eos_token_id

    loaded = AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32)
    assert_states_equal({k: v for k, v in loaded.state_dict().items() if k in states["policy.pt"]},
                        states["policy.pt"])
    ids = torch.tensor([tokenizer(text)["input_ids"]])
    model.eval()
    loaded.eval()
    with torch.no_grad():
        expected, actual = model(ids).logits, loaded(ids).logits
    assert actual.shape == expected.shape == (1, ids.shape[1], len(tokenizer))
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-6)
    # and the logits are not those of a freshly initialised model
    with torch.no_grad():
        assert not torch.allclose(tiny_model(seed=3)(ids).logits, expected)


def test_hf_copy_holds_the_given_policy_state(tmp_path, tokenizer):
    # trainers pass the gathered policy state dict, which a wrapped (e.g. FSDP) module does not hold
    module = tiny_model(seed=15)
    state = tiny_model(seed=16).state_dict()
    directory = tmp_path / "LATEST"
    write_checkpoint(str(directory), 8, {}, {"policy.pt": state}, hf_model=module, tokenizer=tokenizer)
    loaded = AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32)
    assert_states_equal({k: v for k, v in loaded.state_dict().items() if k in state}, state)
    assert_states_equal(read_archive(str(directory / "policy.pt"))["state"], state)


# ---- 2. compatibility with the reference implementation, both ways --------------------------------


def test_reads_a_checkpoint_written_by_the_reference_code(tmp_path):
    source = tiny_model(seed=4)
    path = tmp_path / "policy.pt"
    # exactly as the reference's BasicTrainer.write_state_dict writes it
    torch.save({"step_idx": 7, "state": source.state_dict(), "metrics": {"loss": 1.0}}, str(path))

    archive = read_archive(str(path))
    assert archive["step_idx"] == 7 and archive["metrics"] == {"loss": 1.0}
    target = tiny_model(seed=5)
    assert not torch.equal(target.state_dict()["lm_head.weight"], source.state_dict()["lm_head.weight"])
    load_policy_state(target, archive["state"], str(path))
    assert_states_equal(target.state_dict(), source.state_dict())


def test_reads_a_gpt_neox_checkpoint_with_transformers_4_key_names(tmp_path):
    # The reference ran transformers 4.x, whose GPTNeoXForCausalLM (Pythia, the reference's main
    # model family) names its output layer `embed_out`; transformers 5 calls it `lm_head` and
    # renames the key when loading with from_pretrained. A reference policy.pt must still load.
    source = tiny_model(seed=4)
    legacy_state = {("embed_out.weight" if key == "lm_head.weight" else key): value
                    for key, value in source.state_dict().items()}
    assert "embed_out.weight" in legacy_state and "lm_head.weight" not in legacy_state
    path = tmp_path / "policy.pt"
    torch.save({"step_idx": 7, "state": legacy_state, "metrics": {"loss": 1.0}}, str(path))

    target = tiny_model(seed=5)
    load_policy_state(target, read_archive(str(path))["state"], str(path))
    assert_states_equal(target.state_dict(), source.state_dict())


def test_policy_file_uses_the_reference_names_and_reads_back(tmp_path):
    from dpo.checkpoints import to_reference_names

    source = tiny_model(seed=8)
    reference_state = to_reference_names(source.state_dict(), source)
    assert "embed_out.weight" in reference_state and "lm_head.weight" not in reference_state
    write_checkpoint(str(tmp_path / "ckpt"), 1, {}, {"policy.pt": reference_state}, hf_model=source,
                     hf_state=source.state_dict())
    target = tiny_model(seed=9)
    load_policy_state(target, read_archive(str(tmp_path / "ckpt" / "policy.pt"))["state"], "policy.pt")
    assert_states_equal(target.state_dict(), source.state_dict())
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt")
    assert_states_equal(exported.state_dict(), source.state_dict())


def test_buffers_that_old_transformers_saved_are_ignored(tmp_path):
    source = tiny_model(seed=10)
    old_state = dict(source.state_dict())
    old_state["gpt_neox.layers.0.attention.bias"] = torch.ones(1, 1, 4, 4, dtype=torch.bool)
    old_state["gpt_neox.layers.0.attention.masked_bias"] = torch.tensor(-1e9)
    old_state["gpt_neox.layers.0.attention.rotary_emb.inv_freq"] = torch.ones(4)
    target = tiny_model(seed=11)
    load_policy_state(target, old_state, "policy.pt")
    assert_states_equal(target.state_dict(), source.state_dict())
    old_state["gpt_neox.layers.0.attention.surprise"] = torch.ones(2)
    with pytest.raises(CheckpointError, match="unexpected keys .e.g. gpt_neox.layers.0.attention.surprise"):
        load_policy_state(target, old_state, "policy.pt")


def test_reference_loading_code_accepts_our_policy_file(tmp_path):
    source = tiny_model(seed=6)
    directory = tmp_path / "step-64"
    write_checkpoint(str(directory), 64, {"loss": 2.0}, {"policy.pt": source.state_dict()})

    # the reference's loading code in train.py, verbatim (it does not pass weights_only)
    state_dict = torch.load(str(directory / "policy.pt"), map_location="cpu")
    assert type(state_dict) is dict
    step, metrics = state_dict["step_idx"], state_dict["metrics"]
    assert (step, metrics) == (64, {"loss": 2.0})
    target = tiny_model(seed=7)
    target.load_state_dict(state_dict["state"])
    assert_states_equal(target.state_dict(), source.state_dict())


# ---- 3. atomicity --------------------------------------------------------------------------------


def small_states(step: int) -> dict:
    return {"policy.pt": {"w": torch.full((4, 4), float(step)), "b": torch.arange(3) + step},
            "optimizer.pt": {"state": {}, "param_groups": [{"lr": 0.1, "params": [0], "step": step}]},
            "scheduler.pt": {"last_epoch": step}}


def assert_checkpoint_at_step(directory: Path, step: int) -> None:
    assert sorted(os.listdir(directory)) == sorted(CHECKPOINT_FILES)
    for filename in CHECKPOINT_FILES:
        loaded = load_file(directory / filename)
        assert loaded["step_idx"] == step and loaded["metrics"] == {"step": step}, filename
    policy = load_file(directory / "policy.pt")["state"]
    assert torch.equal(policy["w"], torch.full((4, 4), float(step)))
    assert torch.equal(policy["b"], torch.arange(3) + step)
    assert load_file(directory / "scheduler.pt")["state"] == {"last_epoch": step}


def test_overwrite_replaces_content_and_leaves_no_debris(tmp_path, tokenizer):
    directory = tmp_path / "LATEST"
    model = tiny_model(seed=8)
    # first with Hugging Face files, then without: none of the old files may survive
    write_checkpoint(str(directory), 1, {"step": 1}, small_states(1) | {"policy.pt": model.state_dict()},
                     hf_model=model, tokenizer=tokenizer)
    assert "config.json" in os.listdir(directory)
    write_checkpoint(str(directory), 2, {"step": 2}, small_states(2))
    assert siblings(directory) == ["LATEST"]
    assert_checkpoint_at_step(directory, 2)
    write_checkpoint(str(directory) + "/", 3, {"step": 3}, small_states(3))  # a trailing slash too
    assert siblings(directory) == ["LATEST"]
    assert_checkpoint_at_step(directory, 3)


def test_crash_mid_write_keeps_previous_checkpoint(tmp_path, monkeypatch):
    directory = tmp_path / "LATEST"
    write_checkpoint(str(directory), 1, {"step": 1}, small_states(1))

    real_save = torch.save
    calls = []

    def save_then_fail(*args, **kwargs):
        calls.append(1)
        if len(calls) > 1:
            raise OSError("No space left on device (simulated)")
        return real_save(*args, **kwargs)

    monkeypatch.setattr(dpo.checkpoints.torch, "save", save_then_fail)
    with pytest.raises(OSError, match="simulated"):  # writes stale.pt, then fails on policy.pt
        write_checkpoint(str(directory), 2, {"step": 2}, {"stale.pt": {"x": torch.ones(2)}} | small_states(2))
    assert len(calls) == 2  # the first file was written, the second failed
    assert_checkpoint_at_step(directory, 1)  # intact and complete, with the old content
    assert not (tmp_path / "LATEST.previous").exists()
    monkeypatch.undo()

    write_checkpoint(str(directory), 3, {"step": 3}, small_states(3))
    assert siblings(directory) == ["LATEST"]  # the debris of the failed write is gone
    assert_checkpoint_at_step(directory, 3)


def test_next_write_after_kill_between_renames_recovers(tmp_path):
    # the state a kill between the two renames leaves: no LATEST, a complete LATEST.previous,
    # and (possibly) a complete LATEST.partial
    write_checkpoint(str(tmp_path / "LATEST"), 1, {"step": 1}, small_states(1))
    os.replace(tmp_path / "LATEST", tmp_path / "LATEST.previous")
    write_checkpoint(str(tmp_path / "other"), 2, {"step": 2}, small_states(2))
    os.replace(tmp_path / "other", tmp_path / "LATEST.partial")

    write_checkpoint(str(tmp_path / "LATEST"), 5, {"step": 5}, small_states(5))
    assert siblings(tmp_path / "LATEST") == ["LATEST"]
    assert_checkpoint_at_step(tmp_path / "LATEST", 5)


def test_read_archive_names_previous_checkpoint_when_directory_is_missing(tmp_path):
    write_checkpoint(str(tmp_path / "LATEST.previous"), 1, {"step": 1}, small_states(1))
    missing = tmp_path / "LATEST" / "policy.pt"
    with pytest.raises(CheckpointError) as caught:
        read_archive(str(missing))
    message = str(caught.value)
    assert str(missing) in message and "does not exist" in message
    assert str(tmp_path / "LATEST.previous" / "policy.pt") in message
    # and the file it names is a readable checkpoint
    assert read_archive(str(tmp_path / "LATEST.previous" / "policy.pt"))["step_idx"] == 1

    # no hint when there is no previous checkpoint
    with pytest.raises(CheckpointError) as caught:
        read_archive(str(tmp_path / "elsewhere" / "policy.pt"))
    assert ".previous" not in str(caught.value)


WRITER = r"""
import sys, time, torch
sys.path.insert(0, sys.argv[2])
from dpo.checkpoints import write_checkpoint
target = sys.argv[1]
policy = {f"layer{i}.weight": torch.empty(1024, 1024) for i in range(8)}  # 32 MB
step = 0
while True:
    step += 1
    start = time.perf_counter()
    for tensor in policy.values():
        tensor.fill_(float(step))
    states = {"policy.pt": policy,
              "optimizer.pt": {"state": {}, "param_groups": [{"lr": 0.1, "params": [0], "step": step}]},
              "scheduler.pt": {"last_epoch": step}}
    write_checkpoint(target, step, {"step": step}, states)
    print(step, time.perf_counter() - start, flush=True)
"""


def check_killed_checkpoint(directory: Path) -> int:
    """The complete checkpoint a kill left, in `directory` or `<directory>.previous`; its step."""
    previous = Path(str(directory) + ".previous")
    if directory.exists():
        found = directory
    else:
        assert previous.is_dir(), f"neither {directory} nor {previous} exists: {siblings(directory)}"
        found = previous
        with pytest.raises(CheckpointError, match=str(previous / "policy.pt")):
            read_archive(str(directory / "policy.pt"))
    assert sorted(os.listdir(found)) == sorted(CHECKPOINT_FILES), found
    loaded = {filename: load_file(found / filename) for filename in CHECKPOINT_FILES}
    step = loaded["policy.pt"]["step_idx"]
    assert step >= 1
    for filename, content in loaded.items():
        assert content["step_idx"] == step and content["metrics"] == {"step": step}, filename
    policy = read_archive(str(found / "policy.pt"))["state"]
    assert len(policy) == 8
    for key, tensor in policy.items():
        assert tensor.shape == (1024, 1024) and bool((tensor == step).all()), key
    assert loaded["scheduler.pt"]["state"] == {"last_epoch": step}
    return step


def test_sigkill_mid_write_leaves_a_complete_checkpoint(tmp_path):
    directory = tmp_path / "LATEST"
    rng = random.Random(0)
    for _ in range(3):  # later rounds start from the debris the previous kill left
        process = subprocess.Popen([sys.executable, "-c", WRITER, str(directory), str(REPO_ROOT)],
                                   cwd=str(REPO_ROOT), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        line = ""
        try:
            # wait until one checkpoint is complete, then kill somewhere inside a later write
            ready, _, _ = select.select([process.stdout], [], [], 30)
            line = process.stdout.readline().decode() if ready else ""
            if line:
                time.sleep(rng.uniform(0.05, 0.95) * float(line.split()[1]))
        finally:
            process.send_signal(signal.SIGKILL)
            process.wait()
            errors = process.stderr.read().decode()
            process.stdout.close()
            process.stderr.close()
        assert line, f"the writer wrote no checkpoint in 30 s: {errors}"
        assert process.returncode == -signal.SIGKILL
        check_killed_checkpoint(directory)

    # the next successful write cleans whatever the kills left
    write_checkpoint(str(directory), 99, {"step": 99}, small_states(99))
    assert siblings(directory) == ["LATEST"]
    assert_checkpoint_at_step(directory, 99)


# ---- 4. safety -----------------------------------------------------------------------------------


class RunsCodeOnLoad:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_read_archive_never_runs_code_from_a_checkpoint(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "policy.pt"
    torch.save({"step_idx": 1, "state": {"w": torch.zeros(2)}, "metrics": {"x": RunsCodeOnLoad(str(marker))}},
               str(path))
    assert not marker.exists()
    with pytest.raises(CheckpointError, match="not a readable tensor checkpoint") as caught:
        read_archive(str(path))
    assert str(path) in str(caught.value)
    assert not marker.exists()

    # control: the payload is live, an unsafe load would have run it
    torch.load(str(path), weights_only=False)
    assert marker.exists()


# ---- 5. errors -----------------------------------------------------------------------------------


def test_missing_archive(tmp_path):
    path = tmp_path / "nowhere" / "policy.pt"
    with pytest.raises(CheckpointError, match="does not exist") as caught:
        read_archive(str(path))
    assert str(path) in str(caught.value)
    assert isinstance(caught.value, UserError)
    # a directory is not a file either
    with pytest.raises(CheckpointError, match="does not exist"):
        read_archive(str(tmp_path))


@pytest.mark.parametrize("content", [os.urandom(4096), b"", b"PK\x03\x04 not really a zip file"],
                         ids=["random-bytes", "empty", "broken-zip"])
def test_file_that_is_not_a_torch_file(tmp_path, content):
    path = tmp_path / "policy.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match="is not a readable tensor checkpoint") as caught:
        read_archive(str(path))
    message = str(caught.value)
    assert str(path) in message
    assert "\n" not in message  # one line


def test_torch_file_in_another_format(tmp_path):
    model = tiny_model(seed=9)
    bare = tmp_path / "bare.pt"
    torch.save(model.state_dict(), str(bare))  # a bare state_dict, as many projects save
    with pytest.raises(CheckpointError, match="is not a policy.pt checkpoint") as caught:
        read_archive(str(bare))
    message = str(caught.value)
    assert str(bare) in message and "'state'" in message and "lm_head.weight" in message

    as_list = tmp_path / "list.pt"
    torch.save([torch.zeros(2), torch.ones(2)], str(as_list))
    with pytest.raises(CheckpointError, match="is not a policy.pt checkpoint.*found list"):
        read_archive(str(as_list))

    not_a_dict_state = tmp_path / "tensor-state.pt"
    torch.save({"step_idx": 1, "state": torch.zeros(2), "metrics": {}}, str(not_a_dict_state))
    with pytest.raises(CheckpointError, match="is not a policy.pt checkpoint"):
        read_archive(str(not_a_dict_state))


def expect_mismatch(model, state, *fragments):
    before = {key: value.clone() for key, value in model.state_dict().items()}
    with pytest.raises(CheckpointError) as caught:
        load_policy_state(model, state, "/runs/x/LATEST/policy.pt")
    message = str(caught.value)
    assert "/runs/x/LATEST/policy.pt" in message and "GPTNeoXForCausalLM" in message
    assert "different model config" in message and "\n" not in message
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    assert_states_equal(model.state_dict(), before)  # nothing was loaded
    return message


def test_state_from_a_different_model_config(tmp_path):
    model = tiny_model(seed=10)
    state = dict(tiny_model(seed=11).state_dict())

    missing = {key: value for key, value in state.items() if key != "lm_head.weight"}
    message = expect_mismatch(model, missing, "1 missing keys (e.g. lm_head.weight)")
    assert "unexpected" not in message and "shape" not in message

    unexpected = {**state, "score.weight": state["lm_head.weight"]}
    message = expect_mismatch(model, unexpected, "1 unexpected keys (e.g. score.weight)")
    assert "missing" not in message and "shape" not in message

    wider = tiny_model(seed=11, hidden_size=48).state_dict()
    message = expect_mismatch(model, wider, "shape mismatches (e.g. gpt_neox.embed_in.weight (100, 48) vs (100, 32))")
    assert "missing" not in message and "unexpected" not in message

    deeper = tiny_model(seed=11, num_hidden_layers=3).state_dict()
    expect_mismatch(model, deeper, "unexpected keys (e.g. gpt_neox.layers.2.")
    shallower = tiny_model(seed=11, num_hidden_layers=1).state_dict()
    expect_mismatch(model, shallower, "missing keys (e.g. gpt_neox.layers.1.")

    # through a real file, as train.py does it
    path = tmp_path / "policy.pt"
    torch.save({"step_idx": 3, "state": wider, "metrics": {}}, str(path))
    with pytest.raises(CheckpointError, match="shape mismatches"):
        load_policy_state(model, read_archive(str(path))["state"], str(path))


# ---- 6. dpo.models.load_models -----------------------------------------------------------------------


def models_config(archive, **model_overrides):
    return OmegaConf.create({"seed": 0, "model": {
        "name_or_path": None, "tokenizer_name_or_path": "char", "from_config": dict(TINY),
        "archive": None if archive is None else str(archive), "policy_dtype": "float32",
        "reference_dtype": "bfloat16", **model_overrides}})


def load_models(config, tokenizer, needs_reference: bool, cache_dir: str):
    """dpo.models.load_models, given the archive as dpo.run reads it from model.archive."""
    archive = read_archive(config.model.archive) if config.model.archive else None
    return dpo.models.load_models(config, tokenizer, needs_reference, cache_dir, archive)


def test_load_models_from_archive(tmp_path, tokenizer, capsys):
    trained = tiny_model(seed=12)
    directory = tmp_path / "LATEST"
    write_checkpoint(str(directory), 640, {}, {"policy.pt": trained.state_dict()})
    expected = trained.state_dict()
    initial = tiny_model(seed=0).state_dict()  # what load_models would build without the archive
    assert not torch.equal(initial["lm_head.weight"], expected["lm_head.weight"])

    policy, reference = load_models(models_config(directory / "policy.pt"), tokenizer,
                                    needs_reference=True, cache_dir=str(tmp_path))
    assert "step 640" in capsys.readouterr().out
    assert_states_equal(policy.state_dict(), expected)
    assert all(p.dtype == torch.float32 and p.requires_grad for p in policy.parameters())

    assert reference is not None and reference is not policy
    reference_state = reference.state_dict()
    assert list(reference_state) == list(expected)
    for key, value in expected.items():
        assert reference_state[key].dtype == torch.bfloat16, key
        assert torch.equal(reference_state[key], value.to(torch.bfloat16)), key
    assert all(not p.requires_grad for p in reference.parameters())
    # the two models share no storage: training the policy must not move the reference
    assert not {p.data_ptr() for p in policy.parameters()} & {p.data_ptr() for p in reference.parameters()}

    policy_only, none = load_models(models_config(directory / "policy.pt"), tokenizer,
                                    needs_reference=False, cache_dir=str(tmp_path))
    assert none is None
    assert_states_equal(policy_only.state_dict(), expected)


def test_load_models_without_archive_and_with_a_bad_one(tmp_path, tokenizer):
    policy, reference = load_models(models_config(None, reference_dtype="float32"), tokenizer,
                                    needs_reference=True, cache_dir=str(tmp_path))
    assert_states_equal(policy.state_dict(), tiny_model(seed=0).state_dict())
    assert_states_equal(reference.state_dict(), policy.state_dict())
    assert all(not p.requires_grad for p in reference.parameters())

    wrong = tmp_path / "wrong.pt"
    torch.save({"step_idx": 1, "state": tiny_model(seed=1, hidden_size=48).state_dict(), "metrics": {}},
               str(wrong))
    with pytest.raises(CheckpointError, match="shape mismatches"):
        load_models(models_config(wrong), tokenizer, needs_reference=True, cache_dir=str(tmp_path))
    with pytest.raises(CheckpointError, match="does not exist"):
        load_models(models_config(tmp_path / "missing.pt"), tokenizer, needs_reference=False,
                    cache_dir=str(tmp_path))


def test_load_models_from_a_local_hf_directory_and_archive(tmp_path, tokenizer):
    # model.name_or_path: a Hugging Face directory (as written with hf_model), plus an archive
    base = tiny_model(seed=13)
    write_checkpoint(str(tmp_path / "base"), 0, {}, {"policy.pt": base.state_dict()}, hf_model=base,
                     tokenizer=tokenizer)
    trained = tiny_model(seed=14)
    write_checkpoint(str(tmp_path / "trained"), 320, {}, {"policy.pt": trained.state_dict()})

    config = models_config(tmp_path / "trained" / "policy.pt", name_or_path=str(tmp_path / "base"),
                           from_config=None)
    policy, reference = load_models(config, tokenizer, needs_reference=True, cache_dir=str(tmp_path))
    expected = trained.state_dict()
    assert_states_equal({k: v for k, v in policy.state_dict().items() if k in expected}, expected)
    for key, value in expected.items():
        assert torch.equal(reference.state_dict()[key], value.to(torch.bfloat16)), key
    assert all(not p.requires_grad for p in reference.parameters())
    assert all(p.requires_grad for p in policy.parameters())


# ---- 7. transformers 4.29.2 (the reference's pin) reads what we write, and we read what it writes ---
# scripts/check_reference_interop.sh runs 4.29.2 itself; these tests pin the layout it needs.

ARCHITECTURES = {  # one layer each, in config keys both 4.29.2 and 5.x read
    "gpt_neox": {"model_type": "gpt_neox", "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 4,
                 "intermediate_size": 64, "max_position_embeddings": 64, "rotary_pct": 0.5},
    "gpt2": {"model_type": "gpt2", "n_embd": 32, "n_layer": 1, "n_head": 4, "n_positions": 64},
    "gptj": {"model_type": "gptj", "n_embd": 32, "n_layer": 1, "n_head": 4, "n_positions": 64, "rotary_dim": 4},
    "llama": {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
              "num_attention_heads": 4, "max_position_embeddings": 64},
}
# The state-dict keys of these models under transformers 4.29.2, as it printed them.
KEYS_IN_4_29_2 = {
    "gpt_neox": [
        "gpt_neox.embed_in.weight",
        "gpt_neox.layers.0.input_layernorm.weight", "gpt_neox.layers.0.input_layernorm.bias",
        "gpt_neox.layers.0.post_attention_layernorm.weight", "gpt_neox.layers.0.post_attention_layernorm.bias",
        "gpt_neox.layers.0.attention.bias", "gpt_neox.layers.0.attention.masked_bias",
        "gpt_neox.layers.0.attention.rotary_emb.inv_freq",
        "gpt_neox.layers.0.attention.query_key_value.weight", "gpt_neox.layers.0.attention.query_key_value.bias",
        "gpt_neox.layers.0.attention.dense.weight", "gpt_neox.layers.0.attention.dense.bias",
        "gpt_neox.layers.0.mlp.dense_h_to_4h.weight", "gpt_neox.layers.0.mlp.dense_h_to_4h.bias",
        "gpt_neox.layers.0.mlp.dense_4h_to_h.weight", "gpt_neox.layers.0.mlp.dense_4h_to_h.bias",
        "gpt_neox.final_layer_norm.weight", "gpt_neox.final_layer_norm.bias",
        "embed_out.weight"],
    "gpt2": [
        "transformer.wte.weight", "transformer.wpe.weight",
        "transformer.h.0.ln_1.weight", "transformer.h.0.ln_1.bias",
        "transformer.h.0.attn.bias", "transformer.h.0.attn.masked_bias",
        "transformer.h.0.attn.c_attn.weight", "transformer.h.0.attn.c_attn.bias",
        "transformer.h.0.attn.c_proj.weight", "transformer.h.0.attn.c_proj.bias",
        "transformer.h.0.ln_2.weight", "transformer.h.0.ln_2.bias",
        "transformer.h.0.mlp.c_fc.weight", "transformer.h.0.mlp.c_fc.bias",
        "transformer.h.0.mlp.c_proj.weight", "transformer.h.0.mlp.c_proj.bias",
        "transformer.ln_f.weight", "transformer.ln_f.bias",
        "lm_head.weight"],
    "gptj": [
        "transformer.wte.weight",
        "transformer.h.0.ln_1.weight", "transformer.h.0.ln_1.bias",
        "transformer.h.0.attn.k_proj.weight", "transformer.h.0.attn.v_proj.weight",
        "transformer.h.0.attn.q_proj.weight", "transformer.h.0.attn.out_proj.weight",
        "transformer.h.0.mlp.fc_in.weight", "transformer.h.0.mlp.fc_in.bias",
        "transformer.h.0.mlp.fc_out.weight", "transformer.h.0.mlp.fc_out.bias",
        "transformer.ln_f.weight", "transformer.ln_f.bias",
        "lm_head.weight", "lm_head.bias"],
    "llama": [
        "model.embed_tokens.weight",
        "model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight",
        "model.layers.0.self_attn.v_proj.weight", "model.layers.0.self_attn.o_proj.weight",
        "model.layers.0.self_attn.rotary_emb.inv_freq",
        "model.layers.0.mlp.gate_proj.weight", "model.layers.0.mlp.down_proj.weight",
        "model.layers.0.mlp.up_proj.weight",
        "model.layers.0.input_layernorm.weight", "model.layers.0.post_attention_layernorm.weight",
        "model.norm.weight",
        "lm_head.weight"],
}
CAUSAL_MASK_64 = torch.tril(torch.ones(64, 64, dtype=torch.bool)).view(1, 1, 64, 64)
# buffer -> value 4.29.2 saves for it (shape and dtype included)
BUFFERS_IN_4_29_2 = {
    "gpt_neox": {"gpt_neox.layers.0.attention.bias": CAUSAL_MASK_64,
                 "gpt_neox.layers.0.attention.masked_bias": torch.tensor(-1e9),
                 # head size 8, rotary_pct 0.5: 4 rotary dims, base 10000
                 "gpt_neox.layers.0.attention.rotary_emb.inv_freq": torch.tensor([1.0, 10000 ** -0.5])},
    "gpt2": {"transformer.h.0.attn.bias": CAUSAL_MASK_64, "transformer.h.0.attn.masked_bias": torch.tensor(-1e4)},
    "gptj": {},
    "llama": {"model.layers.0.self_attn.rotary_emb.inv_freq":
              torch.tensor([1.0, 10000 ** -0.25, 10000 ** -0.5, 10000 ** -0.75])},
}


def architecture_model(architecture: str, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides):
    torch.manual_seed(seed)
    return load_model({"from_config": {**ARCHITECTURES[architecture], **overrides}}, build_char_tokenizer(), dtype)


def logits_of(model, ids=torch.tensor([[5, 17, 30, 41, 52, 63, 74, 85, 96]])):
    model.eval()
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("architecture", sorted(ARCHITECTURES))
def test_policy_file_has_exactly_the_keys_and_buffers_of_transformers_4_29_2(tmp_path, architecture):
    from dpo.checkpoints import to_reference_names

    source = architecture_model(architecture, seed=20)
    write_checkpoint(str(tmp_path / "ckpt"), 1, {}, {"policy.pt": to_reference_names(source.state_dict(), source)})
    written = read_archive(str(tmp_path / "ckpt" / "policy.pt"))["state"]

    assert sorted(written) == sorted(KEYS_IN_4_29_2[architecture])
    for key, expected in BUFFERS_IN_4_29_2[architecture].items():
        assert written[key].dtype == expected.dtype and written[key].shape == expected.shape, key
        torch.testing.assert_close(written[key], expected, rtol=1e-6, atol=0)
    # and it reads back here, from the 4.29.2 layout and from the current one
    for state in (written, source.state_dict()):
        target = architecture_model(architecture, seed=21)
        load_policy_state(target, state, "policy.pt")
        assert_states_equal(target.state_dict(), source.state_dict())


@pytest.mark.parametrize("architecture, overrides, rotary_dims", [
    ("gpt_neox", {"hidden_size": 64, "rotary_pct": 0.25, "rotary_emb_base": 5000}, 4),
    ("llama", {"rope_theta": 500000.0}, 8)])
def test_rope_frequencies_follow_the_config_as_in_4_29_2(architecture, overrides, rotary_dims):
    from dpo.checkpoints import to_reference_names

    base = overrides.get("rotary_emb_base", overrides.get("rope_theta"))
    formula = 1.0 / (base ** (torch.arange(0, rotary_dims, 2).float() / rotary_dims))  # 4.29.2's own line
    for dtype in (torch.float32, torch.bfloat16):
        model = architecture_model(architecture, dtype=dtype, num_hidden_layers=2, **overrides)
        written = to_reference_names(model.state_dict(), model)
        inv_freqs = [value for key, value in written.items() if key.endswith("rotary_emb.inv_freq")]
        assert len(inv_freqs) == 2
        for inv_freq in inv_freqs:  # float32 even in a bfloat16 model, as 4.29.2 keeps it
            assert inv_freq.dtype == torch.float32 and torch.equal(inv_freq, formula)
        assert inv_freqs[0] is inv_freqs[1]  # one tensor for all layers: torch.save stores it once
    live = next(buffer for name, buffer in architecture_model(architecture, **overrides).named_buffers()
                if name.endswith("original_inv_freq"))
    assert torch.equal(live, formula)  # what transformers 5 itself uses in float32


def test_policy_file_layout_follows_the_model_type_not_the_class_name():
    from dpo.checkpoints import to_reference_names

    model = architecture_model("gpt_neox")
    model.__class__ = type("FSDPGPTNeoXForCausalLM", (type(model),), {})  # as FSDP2's fully_shard renames it
    assert sorted(to_reference_names(model.state_dict(), model)) == sorted(KEYS_IN_4_29_2["gpt_neox"])


@pytest.mark.parametrize("architecture, legacy_keys", [
    ("gpt_neox", {"rotary_pct": 0.5, "rotary_emb_base": 10000}),
    ("llama", {"rope_theta": 10000.0, "rope_scaling": None}),
    ("gpt2", {}), ("gptj", {})])
def test_hf_config_carries_the_keys_4_29_2_reads_and_reloads_here_unchanged(tmp_path, tokenizer, architecture,
                                                                             legacy_keys):
    import json
    import warnings

    model = architecture_model(architecture, seed=22)
    state = model.state_dict()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # these configs are all 4.29.2 can represent: no warning
        write_checkpoint(str(tmp_path / "LATEST"), 1, {}, {"policy.pt": state}, hf_model=model, tokenizer=tokenizer)
    assert len(state) == len(model.state_dict())  # transformers 5's save_pretrained empties what it is given

    config = json.loads((tmp_path / "LATEST" / "config.json").read_text())
    assert {key: config.get(key, "absent") for key in legacy_keys} == legacy_keys
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "LATEST"), dtype=torch.float32)
    assert getattr(reloaded.config, "rope_parameters", None) == getattr(model.config, "rope_parameters", None)
    torch.testing.assert_close(logits_of(reloaded), logits_of(model), rtol=0, atol=1e-6)


def test_hf_export_warns_about_what_4_29_2_cannot_represent(tmp_path, tokenizer):
    from dpo.checkpoints import legacy_config_keys

    model = architecture_model("llama", num_key_value_heads=2, rope_theta=500000.0)
    keys, problems = legacy_config_keys(model.config)
    assert keys == {"rope_theta": 500000.0, "rope_scaling": None}
    assert any("num_key_value_heads=2" in problem for problem in problems)
    assert any("rope_theta=500000.0" in problem for problem in problems)
    with pytest.warns(UserWarning, match=r"4\.29\.2 .*different model.*num_key_value_heads=2.*transformers >= 5"):
        write_checkpoint(str(tmp_path / "LATEST"), 1, {}, {"policy.pt": model.state_dict()}, hf_model=model)
    # the export itself is complete for transformers 5
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "LATEST"), dtype=torch.float32)
    torch.testing.assert_close(logits_of(reloaded), logits_of(model), rtol=0, atol=1e-6)


def test_exported_tokenizers_use_formats_4_29_2_parses(tmp_path, tokenizer):
    import json

    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    from dpo.checkpoints import write_hf_export

    bpe = PreTrainedTokenizerFast(eos_token="<eos>", tokenizer_object=Tokenizer(models.BPE(
        vocab={"a": 0, "b": 1, "c": 2, "ab": 3, "abc": 4, "<eos>": 5}, merges=[("a", "b"), ("ab", "c")])))
    model = architecture_model("gpt2")
    for name, original in (("char", tokenizer), ("bpe", bpe)):
        write_hf_export(str(tmp_path / name), model, original)
        # tokenizers 0.13 knows neither the class name TokenizersBackend nor merges as pairs
        tokenizer_class = json.loads((tmp_path / name / "tokenizer_config.json").read_text())["tokenizer_class"]
        assert tokenizer_class == "PreTrainedTokenizerFast"
        merges = json.loads((tmp_path / name / "tokenizer.json").read_text())["model"].get("merges")
        assert merges in (None, ["a b", "ab c"]), merges
        text = "abcab cab\n\tHuman: hi"
        assert AutoTokenizer.from_pretrained(str(tmp_path / name))(text)["input_ids"] == original(text)["input_ids"]


# ---- 8. python -m dpo.export ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def run_config():
    """A run's resolved config, as train.py saves it, of a one-layer `tiny` model."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO_ROOT / "config"), version_base="1.3"):
        config = compose(config_name="config", overrides=["model.from_config.hidden_size=32",
                                                          "model.from_config.num_hidden_layers=1"])
    OmegaConf.resolve(config)
    return config


def trained_run(tmp_path, run_config, tokenizer):
    """A run directory with config.yaml and a step-64 checkpoint of a perturbed model; and that model."""
    from dpo.checkpoints import to_reference_names

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    OmegaConf.save(run_config, str(run_dir / "config.yaml"))
    model = load_model(run_config.model, tokenizer, torch.float32)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.1)
    write_checkpoint(str(run_dir / "step-64"), 64, {}, {"policy.pt": to_reference_names(model.state_dict(), model)})
    return run_dir, model


def test_export_writes_a_step_checkpoint_in_hugging_face_format(tmp_path, run_config, tokenizer, capsys):
    import json

    from dpo.export import main

    run_dir, model = trained_run(tmp_path, run_config, tokenizer)
    step = run_dir / "step-64"
    policy_before = (step / "policy.pt").read_bytes()
    assert main([str(step)]) == 0
    assert f"wrote {step}" in capsys.readouterr().out
    assert (step / "policy.pt").read_bytes() == policy_before
    assert not [name for name in os.listdir(step) if name.startswith(".export")]
    assert json.loads((step / "config.json").read_text())["rotary_pct"] == 1.0
    torch.testing.assert_close(logits_of(AutoModelForCausalLM.from_pretrained(str(step))), logits_of(model),
                               rtol=0, atol=1e-6)
    text = "reverse dgaf"
    assert AutoTokenizer.from_pretrained(str(step))(text)["input_ids"] == tokenizer(text)["input_ids"]

    # elsewhere, with the config named explicitly
    elsewhere = tmp_path / "exported"
    (run_dir / "config.yaml").rename(tmp_path / "saved.yaml")
    assert main([str(step), str(elsewhere), "--config", str(tmp_path / "saved.yaml")]) == 0
    torch.testing.assert_close(logits_of(AutoModelForCausalLM.from_pretrained(str(elsewhere))), logits_of(model),
                               rtol=0, atol=1e-6)


def test_export_errors_name_the_path_and_the_fix(tmp_path, run_config, tokenizer, capsys):
    from dpo.export import main

    run_dir, _ = trained_run(tmp_path, run_config, tokenizer)
    step = run_dir / "step-64"
    (tmp_path / "empty").mkdir()
    (tmp_path / "other.yaml").write_text("seed: 0\n")
    wider = OmegaConf.merge(run_config, {"model": {"from_config": {"hidden_size": 48}}})
    OmegaConf.save(wider, str(tmp_path / "wider.yaml"))
    cases = [
        ([str(tmp_path / "missing")], f"{tmp_path / 'missing'} is not a directory"),
        ([str(tmp_path / "empty")], f"{tmp_path / 'empty'} holds no policy.pt"),
        ([str(step), "--config", str(tmp_path / "none.yaml")], "does not exist, and the model cannot be rebuilt"),
        ([str(step), "--config", str(tmp_path / "other.yaml")], "has no model section"),
        ([str(step), "--config", str(tmp_path / "wider.yaml")], "shape mismatches"),
    ]
    for argv, fragment in cases:
        assert main(argv) == 1, argv
        error = capsys.readouterr().err
        assert error.startswith("error: ") and fragment in error and error.count("\n") == 1, (argv, error)
    (run_dir / "config.yaml").unlink()
    assert main([str(step)]) == 1
    assert "pass --config <run dir>/config.yaml" in capsys.readouterr().err
