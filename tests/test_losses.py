"""Losses against independent float64 references written from the papers' formulas.

DPO (Rafailov et al. 2023, Eq. 7), conservative DPO (label smoothing eps) and IPO (Azar et al.
2023, Eq. 17) with h = (pc - rc) - (pr - rr), or h = pc - pr when reference-free.
"""

import math

import pytest
import torch

from dpo.errors import ConfigError, UserError
from dpo.logps import SequenceLogps
from dpo.losses import LOSSES, LossOutput, PreferenceLoss, build_loss, preference_loss, register_loss

BETAS = [0.01, 0.1, 0.5, 1.0]
EPSILONS = [0.0, 0.1, 0.3, 0.49]


# ---------------------------------------------------------------- math-level references

def log_sigmoid(x: float) -> float:
    """log(1 / (1 + e^-x)) without overflow for large |x|."""
    if x >= 0:
        return -math.log1p(math.exp(-x))
    return x - math.log1p(math.exp(x))


def sigmoid(x: float) -> float:
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    z = math.exp(x)
    return z / (1.0 + z)


def ref_h(pc, pr, rc, rr, reference_free=False):
    return pc - pr if reference_free else (pc - rc) - (pr - rr)


def ref_dpo_loss(h, beta, eps=0.0):
    return -(1 - eps) * log_sigmoid(beta * h) - eps * log_sigmoid(-beta * h)


def ref_dpo_dloss_dh(h, beta, eps=0.0):
    # d/dx log sigmoid(x) = sigmoid(-x)
    return -(1 - eps) * beta * sigmoid(-beta * h) + eps * beta * sigmoid(beta * h)


def ref_ipo_loss(h, beta):
    return (h - 1 / (2 * beta)) ** 2


def ref_ipo_dloss_dh(h, beta):
    return 2 * (h - 1 / (2 * beta))


def reference_losses(kind, beta, eps, pc, pr, rc, rr, reference_free=False):
    """Per-example losses and dL/dpc (= -dL/dpr) as float64 tensors, one Python float at a time."""
    losses, grads = [], []
    for a, b, c, d in zip(pc.tolist(), pr.tolist(), rc.tolist(), rr.tolist()):
        h = ref_h(a, b, c, d, reference_free)
        if kind == "ipo":
            losses.append(ref_ipo_loss(h, beta))
            grads.append(ref_ipo_dloss_dh(h, beta))
        else:
            losses.append(ref_dpo_loss(h, beta, eps))
            grads.append(ref_dpo_dloss_dh(h, beta, eps))
    return torch.tensor(losses, dtype=torch.float64), torch.tensor(grads, dtype=torch.float64)


def random_logps(seed=0, n=64, h_max=200.0):
    """(pc, pr, rc, rr) in float64 whose margins h span [-h_max, h_max], extremes and 0 included."""
    g = torch.Generator().manual_seed(seed)
    pr, rc, rr = (-300 * torch.rand(n, generator=g, dtype=torch.float64) for _ in range(3))
    h = (2 * torch.rand(n, generator=g, dtype=torch.float64) - 1) * h_max
    h[:3] = torch.tensor([h_max, -h_max, 0.0], dtype=torch.float64)
    pc = h + pr + rc - rr
    return pc, pr, rc, rr


def close(actual, expected, **kw):
    torch.testing.assert_close(actual, expected, rtol=kw.get("rtol", 1e-10), atol=kw.get("atol", 1e-10))


def leaf(x):
    return x.clone().requires_grad_(True)


def pair(chosen, rejected):
    return SequenceLogps(chosen=chosen, rejected=rejected)


# ---------------------------------------------------------------- the references themselves

def test_reference_log_sigmoid_is_stable_and_matches_direct_formula():
    for x in [-30.0, -1.0, 0.0, 2.5, 30.0]:
        assert log_sigmoid(x) == pytest.approx(math.log(1 / (1 + math.exp(-x))), rel=1e-12)
    assert log_sigmoid(-1000.0) == -1000.0
    assert log_sigmoid(1000.0) == 0.0


# ---------------------------------------------------------------- functional preference_loss

@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("eps", EPSILONS)
def test_functional_dpo_and_cdpo_losses_and_gradients_match_reference(beta, eps):
    pc, pr, rc, rr = random_logps(seed=1)
    pc_, pr_ = leaf(pc), leaf(pr)
    losses, _, _ = preference_loss(pc_, pr_, rc, rr, beta=beta, label_smoothing=eps)
    expected, dldh = reference_losses("dpo", beta, eps, pc, pr, rc, rr)
    assert losses.dtype == torch.float64 and torch.isfinite(losses).all()
    close(losses, expected)
    losses.sum().backward()
    close(pc_.grad, dldh)
    close(pr_.grad, -dldh)


@pytest.mark.parametrize("beta", BETAS)
def test_functional_ipo_loss_and_gradients_match_reference(beta):
    pc, pr, rc, rr = random_logps(seed=2)
    pc_, pr_ = leaf(pc), leaf(pr)
    losses, _, _ = preference_loss(pc_, pr_, rc, rr, beta=beta, ipo=True)
    expected, dldh = reference_losses("ipo", beta, 0.0, pc, pr, rc, rr)
    close(losses, expected)
    losses.sum().backward()
    close(pc_.grad, dldh)
    close(pr_.grad, -dldh)


def test_dpo_gradient_at_eps_zero_is_minus_beta_sigmoid_minus_beta_h():
    pc, pr, rc, rr = random_logps(seed=3)
    pc_ = leaf(pc)
    beta = 0.1
    losses, _, _ = preference_loss(pc_, pr, rc, rr, beta=beta)
    losses.sum().backward()
    h = (pc - rc) - (pr - rr)
    close(pc_.grad, -beta * torch.sigmoid(-beta * h))


@pytest.mark.parametrize("ipo", [False, True])
def test_functional_reference_free_ignores_reference_in_loss_but_not_in_rewards(ipo):
    pc, pr, rc, rr = random_logps(seed=4)
    beta, eps = 0.2, 0.1
    losses, chosen_rewards, rejected_rewards = preference_loss(
        pc, pr, rc, rr, beta=beta, label_smoothing=0.0 if ipo else eps, ipo=ipo, reference_free=True)
    expected, _ = reference_losses("ipo" if ipo else "dpo", beta, eps, pc, pr, rc, rr, reference_free=True)
    close(losses, expected)
    close(chosen_rewards, beta * (pc - rc))
    close(rejected_rewards, beta * (pr - rr))


def test_functional_rewards_are_beta_logratios_and_detached():
    pc, pr, rc, rr = random_logps(seed=5)
    _, chosen_rewards, rejected_rewards = preference_loss(leaf(pc), leaf(pr), rc, rr, beta=0.3)
    close(chosen_rewards, 0.3 * (pc - rc))
    close(rejected_rewards, 0.3 * (pr - rr))
    assert not chosen_rewards.requires_grad and not rejected_rewards.requires_grad


# ---------------------------------------------------------------- modules from build_loss

@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("config", [
    {"name": "dpo"},
    {"name": "dpo", "label_smoothing": 0.2},
    {"name": "cdpo"},  # default eps = 0.1
    {"name": "cdpo", "label_smoothing": 0.49},
    {"name": "ipo"},
])
@pytest.mark.parametrize("reference_free", [False, True])
def test_module_losses_gradients_and_rewards_match_reference(config, beta, reference_free):
    loss = build_loss({**config, "beta": beta, "reference_free": reference_free})
    eps = config.get("label_smoothing", 0.1 if config["name"] == "cdpo" else 0.0)
    kind = "ipo" if config["name"] == "ipo" else "dpo"
    pc, pr, rc, rr = random_logps(seed=6)
    pc_, pr_ = leaf(pc), leaf(pr)
    reference = None if reference_free else pair(rc, rr)
    losses, metrics = loss(pair(pc_, pr_), reference)
    chosen_rewards, rejected_rewards = metrics["rewards/chosen"], metrics["rewards/rejected"]

    expected, dldh = reference_losses(kind, beta, eps, pc, pr, rc, rr, reference_free)
    assert losses.shape == (len(pc),)
    close(losses, expected)
    losses.sum().backward()
    close(pc_.grad, dldh)
    close(pr_.grad, -dldh)

    if reference_free:  # the module's reference is uniform: rewards are beta * policy logps
        close(chosen_rewards, beta * pc)
        close(rejected_rewards, beta * pr)
    else:
        close(chosen_rewards, beta * (pc - rc))
        close(rejected_rewards, beta * (pr - rr))
    assert not chosen_rewards.requires_grad and not rejected_rewards.requires_grad


@pytest.mark.parametrize("config", [
    {"name": "dpo", "beta": 0.1},
    {"name": "dpo", "beta": 1.0, "label_smoothing": 0.3},
    {"name": "cdpo", "beta": 0.5, "label_smoothing": 0.2},
    {"name": "ipo", "beta": 0.1},
    {"name": "dpo", "beta": 0.5, "reference_free": True},
    {"name": "ipo", "beta": 0.5, "reference_free": True},
])
def test_module_passes_gradcheck_in_float64(config):
    loss = build_loss(config)
    pc, pr, rc, rr = random_logps(seed=7, n=8, h_max=50.0)
    reference = pair(rc, rr)

    def losses_only(chosen, rejected):
        return loss(pair(chosen, rejected), reference)[0]

    assert torch.autograd.gradcheck(losses_only, (leaf(pc), leaf(pr)))


@pytest.mark.parametrize("config, functional_kwargs", [
    ({"name": "dpo", "beta": 0.1}, {"beta": 0.1}),
    ({"name": "dpo", "beta": 0.7, "label_smoothing": 0.25}, {"beta": 0.7, "label_smoothing": 0.25}),
    ({"name": "cdpo", "beta": 0.3}, {"beta": 0.3, "label_smoothing": 0.1}),
    ({"name": "ipo", "beta": 0.4}, {"beta": 0.4, "ipo": True}),
])
def test_module_agrees_with_functional(config, functional_kwargs):
    pc, pr, rc, rr = random_logps(seed=8)
    module_out = build_loss(config)(pair(pc, pr), pair(rc, rr))
    functional_out = preference_loss(pc, pr, rc, rr, **functional_kwargs)
    module_triple = (module_out.losses, module_out.chosen_rewards, module_out.rejected_rewards)
    for m, f in zip(module_triple, functional_out, strict=True):
        close(m, f)


@pytest.mark.parametrize("name, extra", [("dpo", {}), ("ipo", {}), ("dpo", {"label_smoothing": 0.2})])
def test_reference_free_module_loss_agrees_with_functional(name, extra):
    pc, pr, rc, rr = random_logps(seed=9)
    module_losses = build_loss({"name": name, "beta": 0.2, "reference_free": True, **extra})(pair(pc, pr))[0]
    functional_losses = preference_loss(pc, pr, rc, rr, beta=0.2, ipo=name == "ipo",
                                        reference_free=True, **extra)[0]
    close(module_losses, functional_losses)


def test_module_needing_reference_raises_without_one():
    pc, pr, _, _ = random_logps(seed=10)
    with pytest.raises(ValueError, match="needs reference log-probs"):
        build_loss({"name": "dpo", "beta": 0.1})(pair(pc, pr), None)


def test_sft_builds_from_its_name_alone():
    loss = build_loss({"name": "sft"})
    assert isinstance(loss, LOSSES["sft"])


def test_sft_loss_is_negative_chosen_logps_without_rewards():
    pc, _, _, _ = random_logps(seed=11)
    pc_ = leaf(pc)
    losses, metrics = LOSSES["sft"]()(SequenceLogps(chosen=pc_))
    close(losses, -pc)
    assert metrics == {}  # no implicit reward; the trainer logs its log-probs
    losses.sum().backward()
    close(pc_.grad, -torch.ones_like(pc))


@pytest.mark.parametrize("config, needs_reference, uses_pairs", [
    ({"name": "sft"}, False, False),
    ({"name": "dpo", "beta": 0.1}, True, True),
    ({"name": "dpo", "beta": 0.1, "reference_free": True}, False, True),
    ({"name": "cdpo", "beta": 0.1}, True, True),
    ({"name": "cdpo", "beta": 0.1, "reference_free": True}, False, True),
    ({"name": "ipo", "beta": 0.1}, True, True),
    ({"name": "ipo", "beta": 0.1, "reference_free": True}, False, True),
])
def test_needs_reference_and_uses_pairs(config, needs_reference, uses_pairs):
    loss = build_loss(config)
    assert loss.needs_reference is needs_reference
    assert loss.uses_pairs is uses_pairs


def test_build_loss_stores_settings_as_floats():
    loss = build_loss({"name": "cdpo", "beta": 1, "label_smoothing": 0.25})
    assert loss.beta == 1.0 and isinstance(loss.beta, float)
    assert loss.label_smoothing == 0.25
    assert build_loss({"name": "cdpo", "beta": 0.1}).label_smoothing == 0.1
    assert build_loss({"name": "dpo", "beta": 0.1}).label_smoothing == 0.0


# ---------------------------------------------------------------- config errors

def test_unknown_loss_name_lists_valid_losses():
    with pytest.raises(ConfigError, match="unknown loss.name 'dpoo'") as info:
        build_loss({"name": "dpoo", "beta": 0.1})
    for name in ["sft", "dpo", "cdpo", "ipo"]:
        assert name in str(info.value)
    assert "valid losses are" in str(info.value)


def test_missing_loss_name_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown loss.name"):
        build_loss({"beta": 0.1})


def test_config_errors_are_user_errors():
    assert issubclass(ConfigError, UserError)


@pytest.mark.parametrize("config, message", [
    ({"name": "dpo", "beta": 0.1, "gamma": 1.0},
     "loss.gamma is not a setting of loss 'dpo': its settings are beta, label_smoothing, reference_free, rpo_alpha"),
    ({"name": "ipo", "beta": 0.1, "label_smoothing": 0.1},
     "loss.label_smoothing is not a setting of loss 'ipo': its settings are beta, average, reference_free, rpo_alpha"),
    ({"name": "sft", "beta": 0.1}, "loss.beta is not a setting of loss 'sft': its settings are none"),
])
def test_unknown_key_names_key_and_valid_settings(config, message):
    with pytest.raises(ConfigError) as info:
        build_loss(config)
    assert str(info.value) == message


@pytest.mark.parametrize("name", ["dpo", "cdpo", "ipo"])
def test_missing_beta_is_reported(name):
    with pytest.raises(ConfigError, match=f"loss.beta is required for loss '{name}'"):
        build_loss({"name": name})


@pytest.mark.parametrize("name", ["dpo", "cdpo", "ipo"])
@pytest.mark.parametrize("beta", [0, 0.0, -0.1, float("nan"), float("inf"), float("-inf"), True, False, "0.1", None])
def test_invalid_beta_is_rejected(name, beta):
    with pytest.raises(ConfigError, match=r"loss.beta must be a positive number \(e.g. loss.beta=0.1\), got"):
        build_loss({"name": name, "beta": beta})


@pytest.mark.parametrize("name", ["dpo", "cdpo"])
@pytest.mark.parametrize("eps", [-0.1, 0.5, 0.7, 1.0, float("nan"), True, "0.1"])
def test_label_smoothing_outside_zero_to_half_is_rejected(name, eps):
    with pytest.raises(ConfigError, match=r"loss.label_smoothing must be in \[0, 0.5\)") as info:
        build_loss({"name": name, "beta": 0.1, "label_smoothing": eps})
    assert repr(eps) in str(info.value)


def test_cdpo_rejects_zero_label_smoothing():
    with pytest.raises(ConfigError, match="loss.label_smoothing must be above 0 for loss=cdpo"):
        build_loss({"name": "cdpo", "beta": 0.1, "label_smoothing": 0.0})


@pytest.mark.parametrize("name", ["dpo", "cdpo", "ipo"])
@pytest.mark.parametrize("flag", [1, 0, "true", None])
def test_reference_free_must_be_bool(name, flag):
    with pytest.raises(ConfigError, match=f"loss.reference_free must be true or false, got {flag!r}"):
        build_loss({"name": name, "beta": 0.1, "reference_free": flag})


# ---------------------------------------------------------------- registry

@pytest.fixture
def restore_losses():
    saved = dict(LOSSES)
    yield
    LOSSES.clear()
    LOSSES.update(saved)


def test_registered_loss_is_buildable_by_name(restore_losses):
    @register_loss
    class HingeLoss(PreferenceLoss):
        name = "test_hinge"

        def __init__(self, margin: float, scale: float = 1.0):
            super().__init__()
            self.margin, self.scale = margin, scale

        def forward(self, policy, reference=None, batch=None):
            return LossOutput(self.scale * torch.relu(self.margin - (policy.chosen - policy.rejected)), {})

    loss = build_loss({"name": "test_hinge", "margin": 1.0})
    assert isinstance(loss, HingeLoss) and loss.scale == 1.0
    losses, _ = loss(pair(torch.tensor([0.0, 3.0]), torch.tensor([0.5, 0.0])))
    close(losses, torch.tensor([1.5, 0.0]))

    with pytest.raises(ConfigError, match="valid losses are .*test_hinge"):
        build_loss({"name": "nope"})
    with pytest.raises(ConfigError, match="loss.margin is required for loss 'test_hinge'"):
        build_loss({"name": "test_hinge"})
    with pytest.raises(ConfigError, match="its settings are margin, scale"):
        build_loss({"name": "test_hinge", "margin": 1.0, "beta": 0.1})


def test_registry_is_restored_after_registration_test():
    assert "test_hinge" not in LOSSES


def test_register_loss_requires_a_name(restore_losses):
    class Nameless(PreferenceLoss):
        pass

    with pytest.raises(ValueError, match="non-empty `name`"):
        register_loss(Nameless)


def test_registered_loss_without_settings_builds_from_its_name_alone(restore_losses):
    @register_loss
    class Margin(PreferenceLoss):
        name = "test_margin"

        def forward(self, policy, reference=None, batch=None):
            return LossOutput(policy.rejected - policy.chosen, {})

    assert isinstance(build_loss({"name": "test_margin"}), Margin)
    with pytest.raises(ConfigError, match="loss.beta is not a setting of loss 'test_margin': its settings are none"):
        build_loss({"name": "test_margin", "beta": 0.1})
