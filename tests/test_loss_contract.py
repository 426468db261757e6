"""The loss contract seen from the trainer: what a loss declares it needs is what it gets, every loss
trains the tiny model through the real trainer, its metrics are logged under their names, running
statistics survive a checkpoint, and every preference loss gets the tiny model's preference settings.
"""

import copy
import math
import os
import re
import sys
from pathlib import Path

import pytest
import torch
import yaml
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dpo.batching import get_batch_iterator  # noqa: E402
from dpo.config import register_resolvers, validate_config  # noqa: E402
from dpo.errors import ConfigError, DataError  # noqa: E402
from dpo.logps import LogpsOptions, SequenceLogps, forward_logps  # noqa: E402
from dpo.losses import LOSSES, LogRatioLoss, LossOutput, PreferenceLoss, build_loss, register_loss  # noqa: E402
from dpo.models import build_char_tokenizer, load_model  # noqa: E402
from dpo.trainers import BasicTrainer, split_metric_name  # noqa: E402
import train as train_script  # noqa: E402
from test_losses import restore_losses  # noqa: E402,F401  (the registry fixture)
from test_train import make_config, quick  # noqa: E402

REQUIRED = {name: ["loss.beta=0.1"] for name in ("dpo", "cdpo", "ipo", "rpo")}
REQUIRED["weighted_sum"] = ["loss.terms={dpo:{weight:1.0,beta:0.1},sft:{weight:0.05}}"]


def loss_overrides(name: str) -> list[str]:
    """`loss=<name>` and what its yaml leaves to the command line."""
    return [f"loss={name}", *REQUIRED.get(name, [])]


def loss_config(name: str) -> dict:
    """The loss's yaml defaults, as `loss=<name>` composes them."""
    return OmegaConf.to_container(make_config(*loss_overrides(name)).loss)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    tokenizer = build_char_tokenizer()
    model = load_model(make_config().model, tokenizer, torch.float32)
    batches = list(get_batch_iterator(["toy"], tokenizer, batch_size=8, n_examples=16, max_length=64,
                                      max_prompt_length=48))
    return tokenizer, model, batches


def trainer_for(loss, tiny, tmp_path, *overrides):
    tokenizer, model, _ = tiny
    config = OmegaConf.merge(quick(tmp_path, *overrides), {"batch_size": 8, "warmup_steps": 0, "lr": 1e-3})
    reference = copy.deepcopy(model).requires_grad_(False) if loss.needs_reference else None
    return BasicTrainer(config, copy.deepcopy(model), tokenizer, loss, [], [], str(tmp_path), reference_model=reference)


# ---- every loss through the trainer ----------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(LOSSES))
def test_every_loss_trains_the_tiny_model_through_the_trainer(name, tiny, tmp_path):
    loss = build_loss(loss_config(name))
    trainer = trainer_for(loss, tiny, tmp_path)
    before = {key: value.clone() for key, value in trainer.policy.state_dict().items()}
    batch = tiny[2][0]
    if not loss.uses_pairs:  # SFT batches hold the chosen response only
        batch = {key: value for key, value in batch.items() if not key.startswith("rejected")}
    metrics = trainer.train_step(batch)
    assert math.isfinite(metrics["loss/train"]) and math.isfinite(metrics["grad_norm"]) and metrics["grad_norm"] > 0
    assert any(not torch.equal(before[key], value) for key, value in trainer.policy.state_dict().items())
    assert {"logps_train/chosen", "logps_train/chosen_per_token"} <= set(metrics)
    if loss.uses_pairs:
        assert {"rewards_train/chosen", "rewards_train/rejected", "rewards_train/accuracies",
                "rewards_train/margins", "logps_train/rejected_per_token"} <= set(metrics)
        assert 0 <= metrics["rewards_train/accuracies"] <= 1
    else:
        assert not any(key.startswith("rewards_") for key in metrics)


def test_a_reference_free_loss_runs_without_a_reference_model(tmp_path):
    final = train_script.train(quick(tmp_path, "loss=orpo", "n_examples=64"))
    assert "judge_eval/reference" not in final and "judge_eval/policy" in final  # no reference model to sample
    assert {"rewards_eval/accuracies", "orpo_eval/log_odds_ratio"} <= set(final)


def test_a_loss_s_own_metrics_are_logged_under_their_names(tiny, tmp_path):
    metrics = trainer_for(build_loss({"name": "orpo"}), tiny, tmp_path).train_step(tiny[2][0])
    for key in ("orpo_train/nll", "orpo_train/odds_ratio_loss", "orpo_train/log_odds_ratio"):
        assert math.isfinite(metrics[key])
    # ORPO's loss is its NLL plus lambda times its odds-ratio term, example by example and so on average
    expected = metrics["orpo_train/nll"] + 0.1 * metrics["orpo_train/odds_ratio_loss"]
    assert metrics["loss/train"] == pytest.approx(expected, rel=1e-5)
    assert metrics["orpo_train/nll"] == pytest.approx(-metrics["logps_train/chosen_per_token"], rel=1e-5)


def test_metric_names_follow_the_reference_s_scheme():
    assert split_metric_name("rewards/chosen", "train") == "rewards_train/chosen"
    assert split_metric_name("loss", "eval") == "loss/eval"
    assert split_metric_name("ipo_rewards/margins", "eval") == "ipo_rewards_eval/margins"


# ---- what a loss declares ----------------------------------------------------------------------------

def test_a_declared_batch_field_reaches_the_loss_and_a_missing_one_is_named(tiny, tmp_path, restore_losses):
    seen = {}

    @register_loss
    class ScoreWeighted(PreferenceLoss):
        name = "test_score_weighted"
        batch_fields = ("score_margin",)

        def forward(self, policy, reference=None, batch=None):
            seen.update(batch)
            return LossOutput(-batch["score_margin"] * (policy.chosen - policy.rejected), {})

    trainer = trainer_for(build_loss({"name": "test_score_weighted"}), tiny, tmp_path)
    batch = dict(tiny[2][0])
    with pytest.raises(DataError, match="loss 'test_score_weighted' needs the batch field 'score_margin', which "
                                        r"the datasets \['toy'\] do not provide"):
        trainer.train_step(batch)
    batch["score_margin"] = [float(index) for index in range(8)]
    trainer.train_step(batch)
    assert set(seen) == {"score_margin"}
    assert torch.equal(seen["score_margin"], torch.arange(8, dtype=seen["score_margin"].dtype))


def test_per_token_logps_come_when_declared_and_agree_in_every_layout(tiny, restore_losses):
    _, model, batches = tiny
    batch = batches[0]
    plain = forward_logps(model, batch, LogpsOptions(lm_head_chunk_size=None))
    assert plain.chosen_token_logps is None  # not asked for: not made
    for options in (LogpsOptions(lm_head_chunk_size=None), LogpsOptions(lm_head_chunk_size=7, packing=True),
                    LogpsOptions(lm_head_chunk_size=7, prefix_sharing=True)):
        logps = forward_logps(model, batch, options, token_logps=True)
        for label in ("chosen", "rejected"):
            per_token = getattr(logps, f"{label}_token_logps")
            tokens = getattr(logps, f"{label}_tokens").long()
            assert per_token.shape == (8, int(tokens.max()))
            torch.testing.assert_close(per_token.sum(-1), getattr(plain, label), rtol=1e-5, atol=1e-5)
            for row, count in enumerate(tokens.tolist()):  # each response's tokens from column 0, zeros after
                assert torch.all(per_token[row, count:] == 0) and torch.all(per_token[row, :count] < 0)
            # the first response token's log-prob, computed alone from the full logits
            labels = batch[f"{label}_labels"]
            first = (labels != -100).float().argmax(-1)
            with torch.no_grad():
                logits = model(batch[f"{label}_input_ids"], attention_mask=batch[f"{label}_attention_mask"]).logits
            expected = torch.stack([logits[row, first[row] - 1].log_softmax(-1)[labels[row, first[row]]]
                                    for row in range(8)])
            torch.testing.assert_close(per_token[:, 0], expected, rtol=1e-4, atol=1e-5)


def test_a_loss_needing_per_token_logps_gets_them_and_refuses_the_reference_cache(tiny, tmp_path, restore_losses):
    shapes = []

    @register_loss
    class TokenLevel(LogRatioLoss):
        name = "test_token_level"
        needs_token_logps = True

        def pair_losses(self, policy, reference):
            shapes.append((policy.chosen_token_logps.shape, reference.chosen_token_logps.shape))
            return super().pair_losses(policy, reference)

        def ratio_losses(self, chosen, rejected):
            return -torch.nn.functional.logsigmoid(self.beta * (chosen - rejected))

    trainer = trainer_for(build_loss({"name": "test_token_level", "beta": 0.1}), tiny, tmp_path)
    trainer.train_step(tiny[2][0])
    assert shapes and shapes[0][0] == shapes[0][1] and shapes[0][0][0] == 8
    with pytest.raises(ConfigError, match="needs per-token reference log-probs, which cache_reference_logps does not "
                                          "keep"):
        trainer.precompute_reference_logps(tiny[2])


# ---- running statistics ----------------------------------------------------------------------------

def test_bco_s_reward_shift_moves_in_training_only_and_survives_a_checkpoint(tiny, tmp_path):
    trainer = trainer_for(build_loss({"name": "bco"}), tiny, tmp_path / "run")
    trainer.train_step(tiny[2][0])  # policy = reference: every reward is 0
    trainer.train_step(tiny[2][1])
    count_after_training = float(trainer.loss.reward_count)
    assert count_after_training == 32  # 8 chosen and 8 rejected rewards per step
    trainer.batch_metrics(tiny[2][1], train=False)
    assert float(trainer.loss.reward_count) == count_after_training  # evaluation uses the shift, never moves it
    trainer.save(str(tmp_path / "run" / "step-8"))
    delta = trainer.loss.delta().item()
    assert delta != 0

    resumed = trainer_for(build_loss({"name": "bco"}), tiny, tmp_path / "run")
    assert resumed.loss.delta().item() == 0
    resumed.load_checkpoint(str(tmp_path / "run" / "step-8"))
    assert resumed.loss.delta().item() == delta and float(resumed.loss.reward_count) == 32


# ---- the tiny model's settings per stage ------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(LOSSES))
def test_every_preference_loss_gets_the_tiny_preference_settings(name):
    overrides = loss_overrides(name)
    config = make_config(*overrides)
    OmegaConf.resolve(config)
    expected = (2e-3, 16, 16384) if name == "sft" else (3e-5, 1, 2048)
    assert (config.lr, config.n_epochs, config.eval_every) == expected
    assert make_config(*overrides, "lr=1e-4").lr == 1e-4  # the command line still wins


def test_a_loss_added_later_gets_them_too(restore_losses):
    register_resolvers()

    @register_loss
    class Later(PreferenceLoss):
        name = "test_later"

    config = make_config("loss=dpo", "loss.beta=0.1", "loss.name=test_later")
    OmegaConf.resolve(config)
    assert (config.lr, config.n_epochs) == (3e-5, 1)
    assert not os.path.exists(REPO / "config" / "model_loss")  # no per-loss files to keep in step


def test_weighted_sum_is_configured_from_the_command_line():
    config = make_config("loss=weighted_sum", "loss.terms={simpo:{weight:1.0},sft:{weight:0.5}}")
    loss = build_loss(OmegaConf.to_container(config.loss))
    assert set(loss.parts) == {"simpo", "sft"} and loss.weights == {"simpo": 1.0, "sft": 0.5}
    assert not loss.needs_reference and loss.uses_pairs
    added = make_config("loss=weighted_sum", "loss.terms={simpo:{weight:1.0}}", "+loss.terms.dpo={weight:0.5,beta:0.1}")
    assert build_loss(OmegaConf.to_container(added.loss)).needs_reference
    with pytest.raises(ConfigError, match="loss.terms is required for loss=weighted_sum: pass it on the command line, "
                                          r"e.g. 'loss.terms=\{dpo:\{weight:1.0,beta:0.1\},sft:\{weight:0.05\}\}'"):
        validate_config(make_config("loss=weighted_sum"))
    with pytest.raises(ConfigError, match="loss.terms.dpo.beta must be a positive number"):
        build_loss({"name": "weighted_sum", "terms": {"dpo": {"weight": 1.0, "beta": -1}}})


def test_the_readme_s_new_loss_is_one_class_and_one_yaml(tiny, tmp_path, restore_losses):
    section = (REPO / "README.md").read_text().split("## Adding a loss")[1].split("## Adding a dataset")[0]
    code, settings = (block.split("\n", 1)[1] for block in re.findall(r"```(?:python|yaml)\n.*?```", section, re.S))
    namespace = {"torch": torch, "register_loss": register_loss, "LogRatioLoss": LogRatioLoss}
    exec(code.rstrip("`"), namespace)
    loss = build_loss(yaml.safe_load(settings.rstrip("`")))
    assert loss.name == "squared_hinge" and loss.needs_reference
    metrics = trainer_for(loss, tiny, tmp_path).train_step(tiny[2][0])
    assert metrics["loss/train"] == pytest.approx(1.0) and metrics["rewards_train/margins"] == 0  # policy = reference


@pytest.mark.parametrize("tau, sign", [(0.05, 1), (0.1, 1), (0.103, -1), (0.2, -1), (1.0, -1)])
def test_discopop_s_documented_pitfall_at_zero_margin(tau, sign):
    """dL/dx at x = 0 is (1 - log 2)/(4 tau) - 3/4: for tau below 0.102 descent lowers the margin first."""
    loss = build_loss({"name": "discopop", "beta": 0.05, "tau": tau})
    chosen = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    zeros = torch.zeros(1, dtype=torch.float64)
    loss(SequenceLogps(chosen, zeros), SequenceLogps(zeros, zeros)).losses.sum().backward()
    expected = 0.05 * ((1 - math.log(2)) / (4 * tau) - 0.75)
    assert chosen.grad.item() == pytest.approx(expected, rel=1e-12) and math.copysign(1, expected) == sign
