"""End-to-end: the Hydra configs, `train.py`'s workflow on the tiny model, and every user error it reports."""

import copy
import gzip
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import MissingConfigException
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import train as train_script  # noqa: E402
from dpo.batching import get_batch_iterator  # noqa: E402
from dpo.checkpoints import to_current_names  # noqa: E402
from dpo.errors import UserError  # noqa: E402
from dpo.losses import build_loss  # noqa: E402
from dpo.models import build_char_tokenizer, load_model  # noqa: E402
from dpo.trainers import BasicTrainer  # noqa: E402

METRIC_NAMES = {
    "train": ["loss/train", "rewards_train/accuracies", "rewards_train/chosen", "rewards_train/rejected",
              "rewards_train/margins", "logps_train/chosen", "logps_train/rejected", "examples_per_second",
              "grad_norm", "counters/examples", "counters/updates"],
    "eval": ["loss/eval", "rewards_eval/accuracies", "rewards_eval/chosen", "rewards_eval/rejected",
             "rewards_eval/margins", "logps_eval/chosen", "logps_eval/rejected", "judge_eval/policy",
             "judge_eval/reference", "counters/examples"],
}


def make_config(*overrides):
    with initialize_config_dir(config_dir=str(REPO / "config"), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def quick(run_dir, *overrides):
    """A config for a short run of the tiny model on the toy task."""
    return make_config(f"local_run_dir={run_dir}", "wandb.enabled=false", "n_examples=256", "eval_every=128",
                       "n_eval_examples=64", "eval_batch_size=32", "n_eval_model_samples=8", *overrides)


def read_metrics(run_dir):
    with open(Path(run_dir) / "metrics.jsonl") as file:
        return [json.loads(line) for line in file]


# ---- configs -------------------------------------------------------------------------------------

def test_reference_models_keep_the_reference_defaults():
    config = make_config("model=pythia28", "loss=dpo", "loss.beta=0.1")
    assert (config.lr, config.batch_size, config.optimizer, config.warmup_steps) == (5e-7, 4, "RMSprop", 150)
    assert (config.max_length, config.max_prompt_length, config.n_epochs, config.eval_every) == (512, 256, 1, 20000)
    assert list(config.datasets) == ["hh"]
    assert config.model.name_or_path == "EleutherAI/pythia-2.8b"
    assert config.model.block_name == "GPTNeoXLayer"
    assert (config.model.policy_dtype, config.model.reference_dtype) == ("float32", "float16")
    assert dict(config.loss) == {"name": "dpo", "beta": 0.1, "label_smoothing": 0, "reference_free": False,
                                 "rpo_alpha": 0}  # rpo_alpha: ours, off


def test_default_is_the_tiny_model_on_the_toy_task_with_settings_per_loss():
    sft = make_config()
    assert sft.loss.name == "sft" and list(sft.datasets) == ["toy"] and sft.model.from_config.model_type == "gpt_neox"
    assert sft.lr == 2e-3
    dpo = make_config("loss=dpo", "loss.beta=0.1")
    assert (dpo.lr, dpo.n_epochs) == (3e-5, 1)
    assert make_config("loss=ipo", "loss.beta=0.1").lr == 3e-5
    assert make_config("datasets=[hh]").datasets == ["hh"]  # the command line still wins


@pytest.mark.parametrize("group", ["model", "loss"])
def test_unknown_config_choice_lists_the_valid_ones(group):
    with pytest.raises(MissingConfigException) as error:
        make_config(f"{group}=nonexistent")
    assert "nonexistent" in str(error.value)
    assert ("pythia28" if group == "model" else "ipo") in str(error.value)


# ---- the workflow --------------------------------------------------------------------------------

def test_sft_then_dpo_end_to_end(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    sft_dir = tmp_path / "sft"
    # One epoch of SFT teaches the tiny model enough of the task for DPO to have something to sharpen.
    train_script.train(quick(sft_dir, "loss=sft", "n_examples=4096", "warmup_steps=5", "eval_every=2048"))
    assert (sft_dir / "config.yaml").exists() and (sft_dir / "samples.jsonl").exists()
    for checkpoint in ("step-2048", "LATEST"):
        for filename in ("policy.pt", "optimizer.pt", "scheduler.pt"):
            assert (sft_dir / checkpoint / filename).exists(), f"{checkpoint}/{filename}"
    archive = torch.load(sft_dir / "LATEST" / "policy.pt", weights_only=True)
    assert set(archive) == {"step_idx", "state", "metrics"} and archive["step_idx"] == 4096
    assert "embed_out.weight" in archive["state"]  # the reference's (transformers 4) name for GPT-NeoX
    hf_model = AutoModelForCausalLM.from_pretrained(sft_dir / "LATEST")
    tokenizer = AutoTokenizer.from_pretrained(sft_dir / "LATEST")
    archive_state = to_current_names(archive["state"], hf_model)
    for key, value in hf_model.state_dict().items():
        torch.testing.assert_close(value, archive_state[key])
    assert tokenizer("reverse", add_special_tokens=False)["input_ids"] == build_char_tokenizer()(
        "reverse", add_special_tokens=False)["input_ids"]
    sft_records = read_metrics(sft_dir)
    assert {"loss/train", "logps_train/chosen", "grad_norm", "counters/updates"} <= set(sft_records[1])

    dpo_dir = tmp_path / "dpo"
    final = train_script.train(quick(dpo_dir, "loss=dpo", "loss.beta=0.1", "n_examples=2048", "lr=3e-4",
                                     "warmup_steps=0", "eval_every=512", "n_eval_examples=256",
                                     f"model.archive={sft_dir / 'LATEST' / 'policy.pt'}"))
    records = read_metrics(dpo_dir)
    first_eval = records[0]
    assert first_eval["event"] == "eval" and first_eval["step"] == 0
    # The reference model is the SFT policy, so before training every implicit reward is 0.
    assert first_eval["loss/eval"] == pytest.approx(math.log(2), abs=1e-6)
    assert first_eval["rewards_eval/margins"] == pytest.approx(0, abs=1e-6)
    for event, names in METRIC_NAMES.items():
        record = next(r for r in records if r["event"] == event and r["step"] > 0)
        assert set(names) <= set(record), set(names) - set(record)
    # Held-out reward accuracy: 0 before training (all rewards tie), chance is 0.5 +- 0.03 on 256
    # pairs, 0.84 measured after 2048 pairs (half of them reversal vs near miss, the harder kind).
    assert final["rewards_eval/accuracies"] > 0.75
    assert final["rewards_eval/margins"] > 0
    assert records[-1]["event"] == "eval" and records[-1]["step"] == 2048


SHARED = REPO.parent / "shared"
STORIES = SHARED / "models" / "stories260K"
HH_ROWS = SHARED / "data" / "hh-rlhf" / "harmless-base-test.jsonl.gz"


@pytest.mark.skipif(not (STORIES.exists() and HH_ROWS.exists()), reason="../shared (real model and data) is absent")
def test_pretrained_local_model_directory_on_real_hh_rows(tmp_path):
    """The real loading path: a pretrained Llama with a SentencePiece tokenizer from a local directory,
    the real HH-RLHF file as a local dataset, and the reference's defaults (model=blank_model)."""
    from transformers import AutoModelForCausalLM

    config = make_config("model=blank_model", f"model.name_or_path={STORIES}", f"datasets=[{HH_ROWS}]", "loss=dpo",
                         "loss.beta=0.1", "model.reference_dtype=bfloat16", "n_examples=16", "eval_every=8",
                         "n_eval_examples=8", "eval_batch_size=4", "n_eval_model_samples=2", "max_length=256",
                         "max_prompt_length=192", "lr=1e-4", "wandb.enabled=false", f"local_run_dir={tmp_path}")
    assert (config.batch_size, config.optimizer) == (4, "RMSprop")
    final = train_script.train(config)
    first_eval = read_metrics(tmp_path)[0]
    # bf16 reference vs fp32 policy: equal weights, so the margin is only rounding noise.
    assert first_eval["loss/eval"] == pytest.approx(math.log(2), abs=0.05)
    assert math.isfinite(final["loss/eval"]) and 0 <= final["rewards_eval/accuracies"] <= 1
    archive = torch.load(tmp_path / "LATEST" / "policy.pt", weights_only=True)
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "LATEST")
    assert type(exported).__name__ == "LlamaForCausalLM"
    for key, value in exported.state_dict().items():
        torch.testing.assert_close(value, archive["state"][key])
    assert (tmp_path / "step-8" / "policy.pt").exists()


def test_reference_free_dpo_loads_no_reference_model(tmp_path):
    config = quick(tmp_path, "loss=dpo", "loss.beta=0.1", "loss.reference_free=true", "n_examples=64")
    final = train_script.train(config)
    assert "judge_eval/reference" not in final and "judge_eval/policy" in final


def test_local_dataset_path_trains(tmp_path):
    rows = [{"prompt": f"\n\nHuman: say {w}\n\nAssistant:", "chosen": f" {w}", "rejected": f" not {w}"}
            for w in ("yes", "no", "maybe", "always", "never", "often", "seldom", "twice")]
    with gzip.open(tmp_path / "train.jsonl.gz", "wt") as file:
        file.writelines(json.dumps(row) + "\n" for row in rows)
    (tmp_path / "test.json").write_text(json.dumps(rows[:3]))
    final = train_script.train(quick(tmp_path / "run", "loss=dpo", "loss.beta=0.1", f"datasets=[{tmp_path}]",
                                     "batch_size=4", "n_examples=16", "eval_every=8"))
    assert "rewards_eval/accuracies" in final and "judge_eval/policy" not in final


def test_wandb_runs_offline_without_credentials(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    config = quick(tmp_path / "run", "wandb.enabled=true", "n_examples=64", "n_eval_examples=32")
    train_script.train(config)
    offline_runs = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(offline_runs) == 1
    assert list(offline_runs[0].glob("*.wandb"))  # the run's logged data, samples table included


# ---- gradient accumulation ---------------------------------------------------------------------------

def tiny_model_and_toy_batch(batch_size):
    """The default tiny model (seed 0) and one toy batch of `batch_size` pairs."""
    torch.manual_seed(0)
    tokenizer = build_char_tokenizer()
    model = load_model(make_config().model, tokenizer, torch.float32)
    batch = next(iter(get_batch_iterator(["toy"], tokenizer, batch_size=batch_size, n_examples=batch_size,
                                         max_length=64, max_prompt_length=48)))
    return tokenizer, model, batch


def _trainer_after_one_step(accumulation_steps, model, batch, tmp_path):
    config = OmegaConf.merge(quick(tmp_path), {"gradient_accumulation_steps": accumulation_steps, "batch_size": 8,
                                               "optimizer": "SGD", "lr": 0.1, "warmup_steps": 0, "max_grad_norm": 1e9})
    trainer = BasicTrainer(config, copy.deepcopy(model), build_char_tokenizer(), build_loss({"name": "dpo", "beta": 0.1}),
                           [], [], str(tmp_path), reference_model=copy.deepcopy(model).requires_grad_(False))
    return trainer, trainer.train_step(batch)


def test_gradient_accumulation_changes_nothing_but_memory(tmp_path):
    _, model, batch = tiny_model_and_toy_batch(8)
    # Different response lengths across the batch, so that micro-batches pad differently.
    assert len({len(r) for r in batch["chosen_response_only"]}) > 1
    whole, whole_metrics = _trainer_after_one_step(1, model, batch, tmp_path)
    split, split_metrics = _trainer_after_one_step(8, model, batch, tmp_path)
    for key in ("loss/train", "grad_norm", "rewards_train/margins", "logps_train/rejected"):
        assert split_metrics[key] == pytest.approx(whole_metrics[key], rel=1e-5, abs=1e-6), key
    assert whole_metrics["grad_norm"] > 0
    for (name, a), b in zip(whole.policy.named_parameters(), split.policy.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


# ---- user errors -----------------------------------------------------------------------------------------

def _write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return path


@pytest.mark.parametrize("overrides, message", [
    (["datasets=[nonexistent]"], "unknown dataset 'nonexistent' in datasets=[...]: valid names are hh, se, shp, toy"),
    (["loss=dpo"], "loss.beta is required for loss=dpo: pass it on the command line, e.g. loss.beta=0.1"),
    (["loss=ipo"], "loss.beta is required for loss=ipo"),
    (["loss=dpo", "loss.beta=0"], "loss.beta must be a positive number"),
    (["loss=dpo", "loss.beta=-0.5"], "loss.beta must be a positive number"),
    (["loss=dpo", "loss.beta=0.1", "loss.label_smoothing=0.5"], "loss.label_smoothing must be in [0, 0.5)"),
    (["loss=dpo", "loss.beta=0.1", "loss.label_smoothing=-0.1"], "loss.label_smoothing must be in [0, 0.5)"),
    (["loss=cdpo", "loss.beta=0.1", "loss.label_smoothing=0"], "must be above 0 for loss=cdpo"),
    (["trainer=DeepSpeedTrainer"], "trainer=DeepSpeedTrainer is not available: valid trainers are BasicTrainer, "
                                   "FSDPTrainer, TensorParallelTrainer"),
    (["optimizer=Adamm"], "optimizer=Adamm is not a torch.optim optimizer: valid are"),
    (["batch_size=10", "gradient_accumulation_steps=4"], "batch_size=10 must be divisible by gradient_accumulation_steps=4"),
    (["max_prompt_length=64"], "max_prompt_length=64 must be below max_length=64"),
    (["n_epochs=null", "n_examples=null"], "set n_epochs or n_examples"),
    (["model.policy_dtype=float31"], "model.policy_dtype=float31 is not a supported model dtype"),
    (["model.policy_dtype=float8_e4m3fn"], "model.policy_dtype=float8_e4m3fn is not a supported model dtype: use "
                                           "float32, bfloat16 or float16"),
    (["seed=abc"], "seed must be a non-negative integer at most 4294967295, got 'abc'"),
    (["seed=-1"], "seed must be a non-negative integer at most 4294967295, got -1"),
    (["lr=true"], "lr must be a positive number (e.g. lr=5e-7), got True"),
    (["lr=nan"], "lr must be a positive number (e.g. lr=5e-7), got nan"),
    (["lr=inf"], "lr must be a positive number (e.g. lr=5e-7), got inf"),
    (["max_grad_norm=-1"], "max_grad_norm must be a positive number, or null for no clipping, got -1"),
    (["max_grad_norm=0"], "max_grad_norm must be a positive number, or null for no clipping, got 0"),
    (["max_grad_norm=abc"], "max_grad_norm must be a positive number, or null for no clipping, got 'abc'"),
    (["minimum_log_interval_secs=abc"], "minimum_log_interval_secs must be a non-negative number of seconds"),
    (["debug=abc"], "debug must be true or false, got 'abc'"),
    (["wandb.enabled=1"], "wandb.enabled must be true or false, got 1"),
    (["nan_policy=ignore"], "nan_policy=ignore is not valid: use stop or skip"),
    (["+resume_from=x"], "resume_from is not a config key (the valid keys are in config/config.yaml); remove it"),
    (["+model.archiv=x.pt"], "model.archiv is not a config key (the valid keys are in config/model/blank_model.yaml)"),
    (["datasets=[/nonexistent/prefs.jsonl]"], "dataset path /nonexistent/prefs.jsonl does not exist"),
    (["model.archive=/nonexistent/policy.pt"], "model.archive=/nonexistent/policy.pt does not exist"),
    (["model=blank_model"], "model.name_or_path is required"),
])
def test_bad_config_gets_one_clear_message(tmp_path, overrides, message):
    with pytest.raises(UserError) as error:
        train_script.train(quick(tmp_path / "run", *overrides))
    assert message in str(error.value)
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_bad_data_gets_one_clear_message(tmp_path):
    good = json.dumps({"prompt": "Q:", "chosen": " a", "rejected": " b"})
    cases = {
        "malformed.jsonl": ([good, '{"prompt": "Q:", "chosen": " a",'], "malformed.jsonl line 2 is not valid JSON"),
        "missing.jsonl": ([good, json.dumps({"prompt": "Q2:", "chosen": " a"})], "line 2 has no 'rejected' field"),
        "eos.jsonl": ([good, json.dumps({"prompt": "Q2:", "chosen": " a<|endoftext|>", "rejected": " b"})] * 2,
                      "contains the tokenizer's EOS text '<|endoftext|>'"),
        "hh.jsonl": ([json.dumps({"chosen": "\n\nHuman: hi\n\nAssistant: yo", "rejected": "\n\nHuman: hi\n\nAssistant: no"}),
                      json.dumps({"chosen": "Human: hi there", "rejected": "Human: hi there!"})],
                     "hh.jsonl line 2 is not an HH transcript"),
    }
    for filename, (lines, message) in cases.items():
        path = _write_lines(tmp_path / filename, lines)
        with pytest.raises(UserError) as error:
            train_script.train(quick(tmp_path / "run", "loss=dpo", "loss.beta=0.1", f"datasets=[{path}]"))
        assert message in str(error.value), filename


def test_mismatched_archive_is_explained(tmp_path):
    other = load_model({"from_config": {"model_type": "gpt_neox", "hidden_size": 64, "num_hidden_layers": 1,
                                        "num_attention_heads": 4, "intermediate_size": 128}},
                       build_char_tokenizer(), torch.float32)
    torch.save({"step_idx": 0, "state": other.state_dict(), "metrics": {}}, tmp_path / "policy.pt")
    with pytest.raises(UserError) as error:
        train_script.train(quick(tmp_path / "run", f"model.archive={tmp_path / 'policy.pt'}"))
    assert "does not fit model GPTNeoXForCausalLM" in str(error.value)
    assert "missing keys" in str(error.value) and "shape mismatches" in str(error.value)


def test_command_line_error_is_one_line_without_traceback(tmp_path):
    result = subprocess.run([sys.executable, "train.py", "loss=dpo", "loss.beta=-1", f"local_run_dir={tmp_path}"],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.strip() == "error: loss.beta must be a positive number (e.g. loss.beta=0.1), got -1"


def test_sampling_during_eval_leaves_the_training_random_stream_alone(tmp_path):
    tokenizer, model, batch = tiny_model_and_toy_batch(4)
    trainer = BasicTrainer(quick(tmp_path), model, tokenizer, build_loss({"name": "sft"}), [], [], str(tmp_path))
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    first = trainer.generate(model, batch)
    assert torch.equal(torch.rand(3), expected_next)
    assert trainer.generate(model, batch) == first  # the same randomness at every eval


def test_debug_mode_writes_no_checkpoint_and_no_wandb(tmp_path):
    train_script.train(quick(tmp_path, "debug=true", "wandb.enabled=true", "n_examples=64"))
    assert not list(tmp_path.glob("step-*")) and not (tmp_path / "LATEST").exists()
    assert not (tmp_path / "wandb").exists()
    assert (tmp_path / "metrics.jsonl").exists()


def test_activation_checkpointing_gives_the_same_step(tmp_path):
    results = []
    for checkpointing in ("false", "true"):
        final = train_script.train(quick(tmp_path / checkpointing, f"activation_checkpointing={checkpointing}",
                                         "n_examples=64", "sample_during_eval=false", "do_first_eval=false"))
        results.append(final["loss/eval"])
    assert results[0] == pytest.approx(results[1], rel=1e-5)


def test_activation_checkpointing_is_switched_on(tmp_path):
    tokenizer, model, _ = tiny_model_and_toy_batch(1)
    trainer = BasicTrainer(quick(tmp_path, "activation_checkpointing=true"), model, tokenizer,
                           build_loss({"name": "sft"}), [], [], str(tmp_path))
    policy = trainer.policy
    assert policy.is_activation_checkpointing if hasattr(policy, "is_activation_checkpointing") \
        else policy.is_gradient_checkpointing


@pytest.mark.parametrize("name_or_path", ["/nonexistent/model", "EMPTY_DIR"])
def test_model_that_cannot_be_loaded_is_explained(tmp_path, name_or_path):
    if name_or_path == "EMPTY_DIR":
        name_or_path = str(tmp_path / "not_a_model")
        os.makedirs(name_or_path)
    with pytest.raises(UserError) as error:
        train_script.train(quick(tmp_path / "run", "model=blank_model", f"model.name_or_path={name_or_path}"))
    assert f"could not load model.name_or_path={name_or_path}: " in str(error.value)
    assert "local directory saved with save_pretrained" in str(error.value)


def test_hub_dataset_that_cannot_be_loaded_is_explained(tmp_path, monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'Anthropic/hh-rlhf' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(UserError) as error:
        train_script.train(quick(tmp_path / "run", "datasets=[hh]"))
    assert str(error.value).startswith("could not load Anthropic/hh-rlhf (train split) from the Hugging Face hub: "
                                       "Couldn't reach 'Anthropic/hh-rlhf' on the Hub")
    assert "datasets=[/path/to/files]" in str(error.value)


def test_reference_module_name_still_imports():
    import preference_datasets

    from dpo.batching import get_batch_iterator as ours

    assert preference_datasets.get_batch_iterator is ours
    assert preference_datasets.extract_anthropic_prompt("\n\nHuman: hi\n\nAssistant: yo") == "\n\nHuman: hi\n\nAssistant:"
    assert len(preference_datasets.get_dataset("toy", "test", silent=True)) == 256


# ---- settings the reference accepts, and settings that would train silently wrong ---------------------------


def test_the_reference_ipo_command_runs_ipo():
    from dpo.config import validate_config
    from dpo.losses import IPOLoss

    config = make_config("loss=dpo", "loss.name=ipo", "loss.beta=0.1")  # the reference's only working IPO form
    validate_config(config)
    loss = build_loss(OmegaConf.to_container(config.loss))
    assert type(loss) is IPOLoss and loss.beta == 0.1 and loss.needs_reference
    with pytest.raises(UserError, match="loss.label_smoothing is not a setting of loss 'ipo': its settings are beta, "
                                        "average, reference_free, rpo_alpha"):
        build_loss(OmegaConf.to_container(make_config("loss=dpo", "loss.name=ipo", "loss.beta=0.1",
                                                      "loss.label_smoothing=0.1").loss))


def test_a_dataset_listed_twice_is_warned_about(capsys):
    from dpo.config import validate_config

    validate_config(make_config("datasets=[toy,toy]"))
    assert capsys.readouterr().out == ("warning: datasets lists toy 2 times, so each of its examples is used 2 times "
                                       "per epoch; list it once unless you mean to up-weight it\n")


def test_max_grad_norm_null_means_no_clipping(tmp_path):
    tokenizer, model, batch = tiny_model_and_toy_batch(8)
    norms_after = {}
    for max_grad_norm in (None, 1e-3):
        config = OmegaConf.merge(quick(tmp_path), {"max_grad_norm": max_grad_norm, "batch_size": 8})
        trainer = BasicTrainer(config, copy.deepcopy(model), tokenizer, build_loss({"name": "sft"}), [], [],
                               str(tmp_path))
        trainer.batch_metrics(batch, train=True)[0].backward()
        before = torch.cat([p.grad.flatten() for p in trainer.policy.parameters()]).clone()
        norm = trainer.clip_gradient()
        after = torch.cat([p.grad.flatten() for p in trainer.policy.parameters()])
        assert norm == pytest.approx(before.norm().item(), rel=1e-4)  # the norm before clipping is reported
        norms_after[max_grad_norm] = after.norm().item()
    assert norms_after[None] == pytest.approx(norm, rel=1e-4)  # untouched
    assert norms_after[1e-3] == pytest.approx(1e-3, rel=1e-3)  # clipped


def test_trainer_settings_are_the_configs_keys_with_its_values():
    from dataclasses import fields

    from dpo.config import TrainerSettings

    config = make_config("model=pythia28", "loss=dpo", "loss.beta=0.1", "max_grad_norm=null", "compile=true")
    settings = TrainerSettings.from_config(config)
    renamed = {"policy_dtype": config.model.policy_dtype, "mixed_precision": config.model.fsdp_policy_mp,
               "block_name": config.model.block_name, "datasets": tuple(config.datasets)}
    for field in fields(TrainerSettings):
        expected = renamed[field.name] if field.name in renamed else config[field.name]  # a renamed key fails here
        assert getattr(settings, field.name) == expected, field.name
    assert settings.max_grad_norm is None and settings.compile and settings.block_name == "GPTNeoXLayer"
    assert TrainerSettings() == TrainerSettings.from_config({})  # the dataclass's defaults are the yaml's
