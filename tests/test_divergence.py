"""Training that goes bad: a non-finite loss or gradient stops the run at the step where it appears (or
skips that step with nan_policy=skip), and never reaches the weights or a checkpoint."""

import copy
import math
import subprocess
import sys

import pytest
import torch

from test_run_directory import snapshot
from test_train import REPO, quick, read_metrics, tiny_model_and_toy_batch

from dpo.batching import get_batch_iterator
from dpo.errors import TrainingError
from dpo.losses import build_loss
from dpo.trainers import MAX_CONSECUTIVE_SKIPS, BasicTrainer


def test_a_learning_rate_that_diverges_stops_the_run_with_one_sentence(tmp_path):
    run_dir = tmp_path / "run"
    result = subprocess.run([sys.executable, "train.py", "wandb.enabled=false", f"local_run_dir={run_dir}", "lr=1e8",
                             "n_examples=512", "eval_every=128", "n_eval_examples=32"],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "error: training stopped at the step after 32 examples: loss/train is nan; the learning rate is likely too "
        "high (lr=100000000.0): lower it, or set nan_policy=skip to skip such steps; that step was not applied and "
        "no checkpoint was written")
    assert not (run_dir / "LATEST").exists() and not list(run_dir.glob("step-*"))


def test_float16_on_cpu_is_named_as_the_likely_cause(tmp_path):
    result = subprocess.run([sys.executable, "train.py", "wandb.enabled=false", f"local_run_dir={tmp_path / 'run'}",
                             "model.policy_dtype=float16", "n_examples=128", "n_eval_examples=32"],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    assert "float16 likely overflowed (model.policy_dtype=float16, which needs loss scaling): use bfloat16 or " \
           "float32" in result.stderr.strip().splitlines()[-1]


def _trainer(tmp_path, *overrides, n_examples=256):
    config = quick(tmp_path, "eval_every=64", "n_eval_examples=32", "sample_during_eval=false", "warmup_steps=0",
                   *overrides)
    tokenizer, model, _ = tiny_model_and_toy_batch(1)
    batches = list(get_batch_iterator(["toy"], tokenizer, batch_size=32, n_examples=n_examples, max_length=64,
                                      max_prompt_length=48, sft_mode=True))
    eval_batches = list(get_batch_iterator(["toy"], tokenizer, split="test", batch_size=32, n_examples=32,
                                           max_length=64, max_prompt_length=48, sft_mode=True))
    return BasicTrainer(config, model, tokenizer, build_loss({"name": "sft"}), batches, eval_batches, str(tmp_path))


def test_divergence_after_a_checkpoint_leaves_it_intact_and_writes_no_other(tmp_path):
    trainer = _trainer(tmp_path)
    blow_up_after = 64  # examples: the step right after the step-64 checkpoint

    original = list(trainer.train_batches)

    def batches():
        for batch in original:
            if trainer.example_counter == blow_up_after:
                trainer.scheduler.base_lrs = [1e8]  # AdamW moves every weight by ~lr: the next loss overflows
            yield batch

    trainer.train_batches = batches()
    with pytest.raises(TrainingError) as error:
        trainer.train()
    # The step after 64 examples still had a finite loss, so it was applied; the next made the weights
    # non-finite, and the evaluation at 128 examples, which comes before the step-128 checkpoint, caught it.
    assert str(error.value) == (
        "evaluation after 128 examples gives loss/eval nan, so the weights are broken; the learning rate is likely "
        "too high (lr=0.002): lower it, or set nan_policy=skip to skip such steps; the last complete checkpoint is "
        f"{tmp_path / 'step-64'}")
    assert sorted(p.name for p in tmp_path.glob("step-*")) == ["step-64"]
    assert not (tmp_path / "LATEST").exists()
    checkpoint = snapshot(tmp_path / "step-64")
    state = torch.load(tmp_path / "step-64" / "policy.pt", weights_only=True)
    assert state["step_idx"] == 64 and all(torch.isfinite(v).all() for v in state["state"].values() if v.is_floating_point())
    assert snapshot(tmp_path / "step-64") == checkpoint


def test_a_checkpoint_of_non_finite_weights_is_refused(tmp_path):
    trainer = _trainer(tmp_path)
    trainer.save(str(tmp_path / "step-32"))
    good = snapshot(tmp_path / "step-32")
    with torch.no_grad():
        trainer.policy.gpt_neox.final_layer_norm.weight[3] = math.inf
    with pytest.raises(TrainingError) as error:
        trainer.save(str(tmp_path / "step-32"))
    assert str(error.value).startswith(f"not writing {tmp_path / 'step-32'}: the policy's "
                                       "gpt_neox.final_layer_norm.weight holds non-finite values; ")
    assert str(error.value).endswith(f"the last complete checkpoint is {tmp_path / 'step-32'}")
    assert snapshot(tmp_path / "step-32") == good


def _poison_gradient_at_steps(model, steps):
    """Make the gradient non-finite during the given 1-based backward passes, as an overflow would."""
    calls = {"n": 0}
    parameter = next(model.parameters())

    def hook(grad):
        calls["n"] += 1
        return grad * math.nan if calls["n"] in steps else grad

    parameter.register_hook(hook)


def test_nan_policy_skip_skips_the_step_and_trains_on(tmp_path):
    trainer = _trainer(tmp_path, "nan_policy=skip", n_examples=128)
    _poison_gradient_at_steps(trainer.policy, {2})
    before_step_2 = {}
    for index, batch in enumerate(trainer.train_batches, start=1):
        if index == 2:
            before_step_2 = copy.deepcopy(trainer.policy.state_dict())
        metrics = trainer.train_step(batch)
        if index == 2:
            assert math.isnan(metrics["grad_norm"])
            for key, value in trainer.policy.state_dict().items():
                assert torch.equal(value, before_step_2[key]), key  # the skipped step changed nothing
    assert metrics["counters/skipped_steps"] == 1
    assert metrics["counters/updates"] == 3 and metrics["counters/examples"] == 128
    assert all(torch.isfinite(p).all() for p in trainer.policy.parameters())


def test_nan_policy_skip_stops_when_the_model_does_not_recover(tmp_path, capsys):
    trainer = _trainer(tmp_path, "nan_policy=skip", n_examples=32 * (MAX_CONSECUTIVE_SKIPS + 3))
    _poison_gradient_at_steps(trainer.policy, set(range(2, 100)))
    with pytest.raises(TrainingError) as error:
        for batch in trainer.train_batches:
            trainer.train_step(batch)
    assert str(error.value).startswith(f"training stopped at the step after {32 * (MAX_CONSECUTIVE_SKIPS + 1)} "
                                       f"examples: grad_norm is nan for {MAX_CONSECUTIVE_SKIPS + 1} steps in a row; ")
    assert capsys.readouterr().out.count("skipping that step (nan_policy=skip)") == MAX_CONSECUTIVE_SKIPS


def test_skipped_steps_are_logged(tmp_path):
    trainer = _trainer(tmp_path, "nan_policy=skip", n_examples=96)
    _poison_gradient_at_steps(trainer.policy, {1})
    trainer.train()
    train_records = [r for r in read_metrics(tmp_path) if r["event"] == "train"]
    assert [r["counters/skipped_steps"] for r in train_records] == [1, 1, 1]
    assert train_records[0]["grad_norm"] is None  # NaN is written as null: metrics.jsonl stays valid JSON
