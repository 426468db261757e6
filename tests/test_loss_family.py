"""Every registered loss against an independent float64 reference written from its paper's formula.

The references below use Python `math` on one example at a time (two losses, AOT and BCO, look at
the whole batch). With a = log pi(y_w) - log pi_ref(y_w), b = log pi(y_l) - log pi_ref(y_l), h = a - b
(the reference log-probs count as 0 when `reference_free`), and avg(y) = sum / max(|y|, 1):

  dpo/cdpo  -(1-e) ls(B h) - e ls(-B h)           rso        max(0, 1 - G h)
  rpo       dpo + alpha (-log pi(y_w) / |y_w|)    hinge      max(0, 1 - B (log pi(y_w) - log pi(y_l)))
  robust    [-(1-e) ls(B h) + e ls(-B h)]/(1-2e)  exo        s(B h)[ls(B h) - log(1-e)] + s(-B h)[ls(-B h) - log e]
  ipo       (h - 1/(2B))^2 (average: h of avgs)   nca        -ls(B a) - ls(-B a)/2 - ls(-B b)/2
  bco       -ls(B a - d) - ls(d - B b), d = running mean of every training reward (no gradient)
  sppo_hard (a - 1/(2B))^2 + (b + 1/(2B))^2       apo_zero   1 - s(B a) + s(B b)
  apo_down  s(B a) + 1 - s(B h)                   aot        smoothed ls of B (sort(m) - sort(m_ref))
  discopop  x = B h, w = s(x/T): (1-w)(-ls(x)) + w e^-x
  simpo     -ls(B avg_w - B avg_l - G)            orpo       -avg_w - L ls(logodds_w - logodds_l)
  sft       -log pi(y_w)                          weighted_sum  sum_k w_k L_k

(s = sigmoid, ls = log sigmoid), plus alpha times the chosen per-token NLL on every pairwise loss
(`rpo_alpha`). Gradients are central finite differences of the reference in float64.
"""

import math
import re
from typing import NamedTuple

import pytest
import torch

from dpo.errors import ConfigError
from dpo.logps import SequenceLogps
from dpo.losses import LOSSES, LossOutput, build_loss

# The losses this file knows; a newly registered loss fails `test_every_registered_loss_is_covered`.
LOSS_NAMES = ["aot", "aot_unpaired", "apo_down", "apo_zero", "bco", "cdpo", "discopop", "dpo", "exo", "hinge",
              "ipo", "nca", "orpo", "robust", "rpo", "rso", "sft", "simpo", "sppo_hard", "weighted_sum"]
LOG_RATIO_LOSSES = ["aot", "aot_unpaired", "apo_down", "apo_zero", "bco", "cdpo", "discopop", "dpo", "exo",
                    "ipo", "nca", "robust", "rpo", "rso", "sppo_hard"]
PAIRWISE_LOSSES = [name for name in LOSS_NAMES if name not in ("sft", "weighted_sum")]

# Hyper-parameter defaults as documented; every pairwise loss also has reference_free=False (where it
# applies) and rpo_alpha=0.
DEFAULTS = {
    "dpo": {"label_smoothing": 0.0}, "cdpo": {"label_smoothing": 0.1},
    "rpo": {"rpo_alpha": 1.0, "label_smoothing": 0.0}, "robust": {"beta": 0.1, "label_smoothing": 0.1},
    "ipo": {"average": False}, "rso": {"gamma": 0.1}, "hinge": {"beta": 0.1},
    "exo": {"beta": 0.1, "epsilon": 1e-3}, "nca": {"beta": 0.1}, "bco": {"beta": 0.1},
    "sppo_hard": {"beta": 0.1}, "apo_zero": {"beta": 0.1}, "apo_down": {"beta": 0.1},
    "aot": {"beta": 0.1, "label_smoothing": 0.0}, "aot_unpaired": {"beta": 0.1, "label_smoothing": 0.0},
    "discopop": {"beta": 0.05, "tau": 0.05}, "simpo": {"beta": 2.0, "gamma": 1.0}, "orpo": {"lambda": 0.1},
}
# The settings without a default.
REQUIRED = {"dpo": {"beta": 0.1}, "cdpo": {"beta": 0.1}, "rpo": {"beta": 0.1}, "ipo": {"beta": 0.1},
            "weighted_sum": {"terms": {"sft": {"weight": 1.0}}}}

# Settings per loss: defaults, several values, reference_free and rpo_alpha where they apply.
CONFIGS = {
    "dpo": [{"beta": 0.1}, {"beta": 0.5, "label_smoothing": 0.2}, {"beta": 1.0, "reference_free": True},
            {"beta": 0.1, "rpo_alpha": 0.5}],
    "cdpo": [{"beta": 0.1}, {"beta": 0.3, "label_smoothing": 0.4, "reference_free": True}],
    "rpo": [{"beta": 0.1}, {"beta": 0.5, "rpo_alpha": 0.3, "label_smoothing": 0.1},
            {"beta": 0.2, "reference_free": True}],
    "robust": [{}, {"beta": 0.5, "label_smoothing": 0.3},
               {"beta": 0.2, "label_smoothing": 0.0, "reference_free": True}],
    "ipo": [{"beta": 0.1}, {"beta": 0.5, "average": True}, {"beta": 1.0, "average": True, "reference_free": True},
            {"beta": 0.05, "rpo_alpha": 1.0}],
    "rso": [{}, {"gamma": 0.5}, {"gamma": 0.05, "reference_free": True}],
    "hinge": [{}, {"beta": 0.02, "rpo_alpha": 1.0}],
    "exo": [{}, {"beta": 0.5, "epsilon": 0.1}, {"beta": 0.05, "epsilon": 0.3, "reference_free": True}],
    "nca": [{}, {"beta": 0.5}, {"beta": 0.05, "reference_free": True}],
    "bco": [{}, {"beta": 0.5}, {"beta": 0.05, "reference_free": True, "rpo_alpha": 0.2}],
    "sppo_hard": [{}, {"beta": 1.0}, {"beta": 0.05, "reference_free": True}],
    "apo_zero": [{}, {"beta": 0.5}, {"beta": 0.05, "reference_free": True}],
    "apo_down": [{}, {"beta": 0.5}, {"beta": 0.05, "reference_free": True}],
    "aot": [{}, {"beta": 0.5, "label_smoothing": 0.2}, {"beta": 0.05, "reference_free": True}],
    "aot_unpaired": [{}, {"beta": 0.5, "label_smoothing": 0.2}, {"beta": 0.05, "reference_free": True}],
    "discopop": [{}, {"beta": 0.1, "tau": 1.0}, {"beta": 0.5, "tau": 0.2, "reference_free": True}],
    "simpo": [{}, {"beta": 2.5, "gamma": 0.0}, {"beta": 0.5, "gamma": 1.5, "rpo_alpha": 0.5}],
    "orpo": [{}, {"lambda": 0.5}, {"lambda": 1.0, "rpo_alpha": 1.0}],
    "sft": [{}],
    "weighted_sum": [
        {"terms": {"dpo": {"weight": 1.0, "beta": 0.1}, "sft": {"weight": 0.05}}},
        {"terms": {"simpo": {"weight": 1.0}, "orpo": {"weight": 0.5, "lambda": 0.2},
                   "hinge": {"weight": 0.3, "rpo_alpha": 0.1},
                   "ipo": {"weight": 0.0, "beta": 0.1, "reference_free": True}}},
    ],
}


def config_id(config):
    if config["name"] == "weighted_sum":
        return "weighted_sum-" + "+".join(config.get("terms") or ["none"])
    return "-".join([config["name"]] + [f"{k}={v}" for k, v in config.items() if k != "name"])


ALL_CONFIGS = [pytest.param({"name": name, **settings}, id=config_id({"name": name, **settings}))
               for name in LOSS_NAMES for settings in CONFIGS[name]]
SEEDS = [0, 1, 2]


# ---------------------------------------------------------------- scalar references

def log_sigmoid(x):
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def sigmoid(x):
    return 1 / (1 + math.exp(-x)) if x >= 0 else math.exp(x) / (1 + math.exp(x))


def smoothed(x, eps):
    """-(1 - eps) log sigmoid(x) - eps log sigmoid(-x)."""
    return -(1 - eps) * log_sigmoid(x) - eps * log_sigmoid(-x)


def average(total, tokens):
    return total / max(tokens, 1)


def log_odds(mean_logp):
    """log(P / (1 - P)), P = exp(mean log-prob) capped at 1 - 1e-6."""
    capped = min(mean_logp, math.log(1 - 1e-6))
    return capped - math.log(-math.expm1(capped))


class Example(NamedTuple):
    pc: float  # policy chosen / rejected summed log-probs
    pr: float
    rc: float  # reference chosen / rejected
    rr: float
    nc: int  # token counts
    nr: int


def settings_of(config):
    return {"reference_free": False, "rpo_alpha": 0.0, **DEFAULTS.get(config["name"], {}), **config}


def term_config(name, settings):
    """A weighted_sum term's own config: its settings without the weight."""
    return {"name": name, **{key: value for key, value in settings.items() if key != "weight"}}


def ratios(s, ex):
    """(a, b): log-ratios against the reference, or the policy's log-probs when reference-free."""
    return (ex.pc, ex.pr) if s["reference_free"] else (ex.pc - ex.rc, ex.pr - ex.rr)


def ref_ipo(s, ex):
    a, b = ratios(s, ex)
    if s["average"]:
        a, b = average(a, ex.nc), average(b, ex.nr)
    return (a - b - 1 / (2 * s["beta"])) ** 2


def ref_robust(s, ex):
    a, b = ratios(s, ex)
    x, eps = s["beta"] * (a - b), s["label_smoothing"]
    return (-(1 - eps) * log_sigmoid(x) + eps * log_sigmoid(-x)) / (1 - 2 * eps)


def ref_exo(s, ex):
    a, b = ratios(s, ex)
    x, eps = s["beta"] * (a - b), s["epsilon"]
    return (sigmoid(x) * (log_sigmoid(x) - math.log(1 - eps))
            + sigmoid(-x) * (log_sigmoid(-x) - math.log(eps)))


def ref_nca(s, ex):
    a, b = ratios(s, ex)
    rw, rl = s["beta"] * a, s["beta"] * b
    return -log_sigmoid(rw) - 0.5 * log_sigmoid(-rw) - 0.5 * log_sigmoid(-rl)


def ref_sppo_hard(s, ex):
    a, b = ratios(s, ex)
    target = 1 / (2 * s["beta"])
    return (a - target) ** 2 + (b + target) ** 2


def ref_apo_zero(s, ex):
    a, b = ratios(s, ex)
    return 1 - sigmoid(s["beta"] * a) + sigmoid(s["beta"] * b)


def ref_apo_down(s, ex):
    a, b = ratios(s, ex)
    return sigmoid(s["beta"] * a) + 1 - sigmoid(s["beta"] * (a - b))


def ref_discopop(s, ex):
    a, b = ratios(s, ex)
    x = s["beta"] * (a - b)
    w = sigmoid(x / s["tau"])
    # w e^-x written as exp(log w - x): the same number, without overflowing e^-x for x << 0
    return (1 - w) * -log_sigmoid(x) + math.exp(log_sigmoid(x / s["tau"]) - x)


def ref_simpo(s, ex):
    return -log_sigmoid(s["beta"] * average(ex.pc, ex.nc) - s["beta"] * average(ex.pr, ex.nr) - s["gamma"])


def ref_orpo(s, ex):
    avg_w, avg_l = average(ex.pc, ex.nc), average(ex.pr, ex.nr)
    return -avg_w - s["lambda"] * log_sigmoid(log_odds(avg_w) - log_odds(avg_l))


def ref_dpo(s, ex):
    a, b = ratios(s, ex)
    return smoothed(s["beta"] * (a - b), s["label_smoothing"])


PER_EXAMPLE = {
    "dpo": ref_dpo, "cdpo": ref_dpo, "rpo": ref_dpo, "robust": ref_robust, "ipo": ref_ipo,
    "rso": lambda s, ex: max(0.0, 1 - s["gamma"] * (ratios(s, ex)[0] - ratios(s, ex)[1])),
    "hinge": lambda s, ex: max(0.0, 1 - s["beta"] * (ex.pc - ex.pr)),
    "exo": ref_exo, "nca": ref_nca, "sppo_hard": ref_sppo_hard, "apo_zero": ref_apo_zero,
    "apo_down": ref_apo_down, "discopop": ref_discopop, "simpo": ref_simpo, "orpo": ref_orpo,
    "sft": lambda s, ex: -ex.pc,
}


def ref_aot(s, batch):
    if s["name"] == "aot":
        margins = sorted(ex.pc - ex.pr for ex in batch)
        ref_margins = [0.0] * len(batch) if s["reference_free"] else sorted(ex.rc - ex.rr for ex in batch)
        gaps = [m - m_ref for m, m_ref in zip(margins, ref_margins)]
    else:
        pairs = [ratios(s, ex) for ex in batch]
        gaps = [a - b for a, b in zip(sorted(a for a, _ in pairs), sorted(b for _, b in pairs))]
    return [smoothed(s["beta"] * gap, s["label_smoothing"]) for gap in gaps]


def bco_rewards(s, batch):
    return [s["beta"] * ratios(s, ex)[0] for ex in batch] + [s["beta"] * ratios(s, ex)[1] for ex in batch]


def ref_bco(s, batch, delta=None):
    """delta: the running mean; by default that of a fresh loss after this batch (its mean reward)."""
    if delta is None:
        delta = sum(bco_rewards(s, batch)) / (2 * len(batch))
    return [-log_sigmoid(s["beta"] * a - delta) - log_sigmoid(-(s["beta"] * b - delta))
            for a, b in (ratios(s, ex) for ex in batch)]


def reference_losses(config, batch, bco_delta=None):
    """Per-example losses of `config` on `batch` (a list of Example), as Python floats."""
    s = settings_of(config)
    name = s["name"]
    if name == "weighted_sum":
        totals = [0.0] * len(batch)
        for term, term_settings in s["terms"].items():
            part = reference_losses(term_config(term, term_settings), batch)
            totals = [t + term_settings["weight"] * x for t, x in zip(totals, part)]
        return totals
    if name in ("aot", "aot_unpaired"):
        losses = ref_aot(s, batch)
    elif name == "bco":
        losses = ref_bco(s, batch, bco_delta)
    else:
        losses = [PER_EXAMPLE[name](s, ex) for ex in batch]
    return [loss + s["rpo_alpha"] * -average(ex.pc, ex.nc) for loss, ex in zip(losses, batch)]


def reference_rewards(config, ex):
    """(chosen, rejected) reward of one example, or None for a loss without rewards."""
    s = settings_of(config)
    name = s["name"]
    if name == "sft":
        return None
    if name == "weighted_sum":  # the first term's rewards keep the plain names
        for term, term_settings in s["terms"].items():
            rewards = reference_rewards(term_config(term, term_settings), ex)
            if rewards is not None:
                return rewards
        return None
    if name == "hinge":
        return s["beta"] * ex.pc, s["beta"] * ex.pr
    if name == "simpo":
        return s["beta"] * average(ex.pc, ex.nc), s["beta"] * average(ex.pr, ex.nr)
    if name == "orpo":
        return average(ex.pc, ex.nc), average(ex.pr, ex.nr)
    a, b = ratios(s, ex)
    if name == "ipo" and s["average"]:  # the rewards of the averaged log-ratios IPO compares
        a, b = average(a, ex.nc), average(b, ex.nr)
    scale = s["gamma"] if name == "rso" else s["beta"]
    return scale * a, scale * b


STEP = 1e-5


def reference_gradients(config, batch, weights):
    """d(sum_i weights_i L_i)/d(policy chosen), .../d(policy rejected) by central differences.

    BCO's delta is a statistic of past rewards, held fixed (no gradient flows through it). Each
    derivative's one-sided differences must agree, so an input at a hinge's kink or at a tie of
    AOT's sort fails loudly instead of giving a meaningless reference.
    """
    s = settings_of(config)
    delta = sum(bco_rewards(s, batch)) / (2 * len(batch)) if s["name"] == "bco" else None

    def objective(examples):
        return sum(w * loss for w, loss in zip(weights, reference_losses(config, examples, delta)))

    centre = objective(batch)
    grads = {}
    for field in ("pc", "pr"):
        grads[field] = []
        for i, ex in enumerate(batch):
            def at(step):
                moved = list(batch)
                moved[i] = ex._replace(**{field: getattr(ex, field) + step})
                return objective(moved)
            up, down = (at(STEP) - centre) / STEP, (centre - at(-STEP)) / STEP
            assert abs(up - down) < 1e-3, f"{field}[{i}] sits at a kink: one-sided slopes {up} and {down}"
            grads[field].append((up + down) / 2)
    return grads["pc"], grads["pr"]


# ---------------------------------------------------------------- batches and calls

def random_batch(seed, n=6):
    """n examples with 1..50 tokens, per-token log-probs in (-3, -0.05), reference within +-10 of the policy."""
    g = torch.Generator().manual_seed(seed)

    def uniform(lo, hi):
        return (lo + (hi - lo) * torch.rand(n, generator=g, dtype=torch.float64)).tolist()

    nc, nr = torch.randint(1, 51, (n,), generator=g).tolist(), torch.randint(1, 51, (n,), generator=g).tolist()
    pc = [t * m for t, m in zip(nc, uniform(-3.0, -0.05))]
    pr = [t * m for t, m in zip(nr, uniform(-3.0, -0.05))]
    rc = [min(p + d, 0.0) for p, d in zip(pc, uniform(-10.0, 10.0))]
    rr = [min(p + d, 0.0) for p, d in zip(pr, uniform(-10.0, 10.0))]
    return [Example(*row) for row in zip(pc, pr, rc, rr, nc, nr)]


def random_weights(seed, n):
    return (0.5 + torch.rand(n, generator=torch.Generator().manual_seed(1000 + seed), dtype=torch.float64)).tolist()


def call(loss, batch, dtype=torch.float64):
    """Run `loss` on `batch`; returns (LossOutput, policy chosen leaf, policy rejected leaf)."""
    def column(field):
        return torch.tensor([getattr(ex, field) for ex in batch], dtype=dtype)

    pc, pr = column("pc").requires_grad_(True), column("pr").requires_grad_(True)
    policy = SequenceLogps(pc, pr, column("nc"), column("nr"))
    reference = SequenceLogps(column("rc"), column("rr"), column("nc"), column("nr")) if loss.needs_reference else None
    out = loss(policy, reference)
    assert isinstance(out, LossOutput)
    return out, pc, pr


def grad_or_zero(leaf):
    return torch.zeros_like(leaf) if leaf.grad is None else leaf.grad


def f64(values):
    return torch.tensor(values, dtype=torch.float64)


def close(actual, expected, rtol=1e-9, atol=1e-9):
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)


# ---------------------------------------------------------------- 1. every loss: value and gradient

def test_every_registered_loss_is_covered():
    assert LOSS_NAMES == sorted(LOSSES)
    assert sorted(CONFIGS) == LOSS_NAMES
    assert set(PER_EXAMPLE) | {"aot", "aot_unpaired", "bco", "weighted_sum"} == set(LOSS_NAMES)


def test_reference_helpers_are_right():
    for x in (-30.0, -1.0, 0.0, 2.5, 30.0):
        assert log_sigmoid(x) == pytest.approx(math.log(1 / (1 + math.exp(-x))), rel=1e-12)
        assert sigmoid(x) == pytest.approx(1 / (1 + math.exp(-x)), rel=1e-12)
    assert log_sigmoid(-1e4) == -1e4 and log_sigmoid(1e4) == 0.0
    assert log_odds(math.log(0.25)) == pytest.approx(math.log(1 / 3), rel=1e-12)
    assert log_odds(0.0) == pytest.approx(math.log((1 - 1e-6) / 1e-6), rel=1e-9)
    assert average(-6.0, 3) == -2.0 and average(0.0, 0) == 0.0


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("config", ALL_CONFIGS)
def test_loss_value_and_gradient_match_reference(config, seed):
    batch = random_batch(seed)
    weights = random_weights(seed, len(batch))
    out, pc, pr = call(build_loss(config), batch)

    assert out.losses.shape == (len(batch),) and out.losses.dtype == torch.float64
    close(out.losses, f64(reference_losses(config, batch)))

    (out.losses * f64(weights)).sum().backward()
    expected_pc, expected_pr = reference_gradients(config, batch, weights)
    close(grad_or_zero(pc), f64(expected_pc), rtol=1e-6, atol=1e-6)
    close(grad_or_zero(pr), f64(expected_pr), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", PAIRWISE_LOSSES)
def test_rpo_alpha_adds_the_chosen_per_token_nll(name):
    """Every pairwise loss takes rpo_alpha: + alpha * (-log pi(y_w) / |y_w|), logged as nll/chosen."""
    batch, alpha = random_batch(3), 0.7
    base = {"name": name, **REQUIRED.get(name, {})}
    # rpo is dpo with the NLL term switched on, so it is compared with dpo
    plain, _, _ = call(build_loss({**base, "name": "dpo"} if name == "rpo" else base), batch)
    with_nll, _, _ = call(build_loss({**base, "rpo_alpha": alpha}), batch)

    nll = f64([-ex.pc / ex.nc for ex in batch])
    assert "nll/chosen" not in plain.metrics
    close(with_nll.losses - plain.losses, alpha * nll)
    close(with_nll.metrics["nll/chosen"], nll)


# ---------------------------------------------------------------- 2. extremes in float32

def extreme_batch():
    """Log-probs 0 and -1e4: |a|, |b|, |h| up to 1e4 (both with and without the reference), 1..50 tokens."""
    rows = [  # pc, pr, rc, rr, nc, nr
        (0.0, -1e4, 0.0, 0.0, 1, 1),        # h = +1e4, the rejected at -1e4 per token
        (-1e4, 0.0, 0.0, 0.0, 1, 1),        # h = -1e4
        (0.0, 0.0, -1e4, -1e4, 50, 1),      # a = b = +1e4, policy certain of both
        (-1e4, -1e4, 0.0, 0.0, 1, 50),      # a = b = -1e4
        (0.0, 0.0, 0.0, 0.0, 3, 7),         # all log-probs 0
        (0.0, -1e4, -1e4, -1e4, 1, 2),      # a = +1e4, b = 0
        (-1e4, 0.0, -1e4, -1e4, 2, 1),      # a = 0, b = +1e4
        (-5e3, -1.0, -1.0, -5e3, 1, 1),
    ]
    return [Example(*row) for row in rows]


@pytest.mark.parametrize("config", ALL_CONFIGS)
def test_extreme_float32_inputs_give_finite_losses_gradients_and_metrics(config):
    batch = extreme_batch()
    out, pc, pr = call(build_loss(config), batch, dtype=torch.float32)
    assert out.losses.dtype == torch.float32
    assert torch.isfinite(out.losses).all(), out.losses
    (out.losses * torch.linspace(0.5, 1.5, len(batch))).sum().backward()
    assert torch.isfinite(grad_or_zero(pc)).all() and torch.isfinite(grad_or_zero(pr)).all(), (pc.grad, pr.grad)
    for key, value in out.metrics.items():
        assert torch.isfinite(value).all(), (key, value)
    # and the float32 values are the float64 references' (the inputs are exact in float32)
    close(out.losses.double(), f64(reference_losses(config, batch)), rtol=1e-5, atol=1e-4)


# ---------------------------------------------------------------- 3. one- and zero-token responses

# A response with no tokens has sum 0 and average 0; a one-token response's average is its sum.
SHORT_BATCH = [Example(*row) for row in [
    # pc, pr, rc, rr, nc, nr
    (-2.0, 0.0, -1.0, 0.0, 1, 0),   # one-token chosen, empty rejected
    (0.0, -4.0, 0.0, -3.0, 0, 1),   # empty chosen, one-token rejected
    (0.0, 0.0, 0.0, 0.0, 0, 0),     # both empty
    (-3.5, -0.5, -2.0, -1.0, 1, 1),  # both one token
]]
SHORT_CONFIGS = [{"name": "ipo", "beta": 0.1, "average": True}, {"name": "simpo", "beta": 2.0, "gamma": 1.0},
                 {"name": "orpo", "lambda": 0.5}, {"name": "rpo", "beta": 0.1, "rpo_alpha": 1.0}]


@pytest.mark.parametrize("config", SHORT_CONFIGS, ids=config_id)
def test_one_and_zero_token_responses_have_defined_losses(config):
    out, pc, pr = call(build_loss(config), SHORT_BATCH)
    close(out.losses, f64(reference_losses(config, SHORT_BATCH)))
    out.losses.sum().backward()
    assert torch.isfinite(pc.grad).all() and torch.isfinite(pr.grad).all()
    for key, value in out.metrics.items():
        assert torch.isfinite(value).all(), (key, value)


def test_short_response_losses_by_hand():
    def losses(config):
        return call(build_loss(config), SHORT_BATCH)[0].losses.tolist()

    ipo, simpo, orpo, rpo = (losses(config) for config in SHORT_CONFIGS)
    # empty responses: averages 0
    assert ipo[2] == pytest.approx((0 - 1 / 0.2) ** 2)
    assert simpo[2] == pytest.approx(math.log1p(math.exp(1.0)))          # -log sigmoid(-gamma)
    assert orpo[2] == pytest.approx(0.5 * math.log(2))                    # equal odds, no NLL
    assert rpo[1] == pytest.approx(-log_sigmoid(0.1 * (0 - (-4.0 + 3.0))))  # no NLL term for the empty chosen
    # one token: the average is the sum
    assert ipo[0] == pytest.approx(((-2.0 + 1.0) - 0.0 - 5.0) ** 2)
    assert simpo[0] == pytest.approx(-log_sigmoid(2.0 * -2.0 - 1.0))
    assert rpo[0] == pytest.approx(-log_sigmoid(0.1 * (-1.0)) + 2.0)


# ---------------------------------------------------------------- 4. rewards metrics

@pytest.mark.parametrize("config", ALL_CONFIGS)
def test_reward_metrics_follow_their_definitions(config):
    batch = random_batch(4)
    out, _, _ = call(build_loss(config), batch)
    for key, value in out.metrics.items():
        assert value.shape == (len(batch),) and not value.requires_grad, key
    expected = [reference_rewards(config, ex) for ex in batch]
    if expected[0] is None:
        assert not [key for key in out.metrics if key.startswith("rewards/")]
        return
    chosen, rejected = f64([c for c, _ in expected]), f64([r for _, r in expected])
    close(out.metrics["rewards/chosen"], chosen)
    close(out.metrics["rewards/rejected"], rejected)
    close(out.metrics["rewards/margins"], chosen - rejected)
    close(out.metrics["rewards/accuracies"].double(), (chosen > rejected).double())  # a 0/1 float
    assert 0 < (chosen > rejected).sum() < len(batch)  # the batch holds wins and losses: a constant fails


def test_accuracies_count_only_strict_wins():
    loss = build_loss({"name": "dpo", "beta": 0.1})
    batch = [Example(-1.0, -1.0, -1.0, -1.0, 1, 1), Example(-1.0, -2.0, -1.0, -1.0, 1, 1),
             Example(-2.0, -1.0, -1.0, -1.0, 1, 1)]
    out, _, _ = call(loss, batch)
    assert out.metrics["rewards/accuracies"].tolist() == [0.0, 1.0, 0.0]  # a tie is no win
    close(out.metrics["rewards/margins"], f64([0.0, 0.1, -0.1]))


def test_loss_specific_metrics():
    batch = random_batch(5)
    orpo, _, _ = call(build_loss({"name": "orpo", "lambda": 0.3}), batch)
    log_ratio = f64([log_odds(average(ex.pc, ex.nc)) - log_odds(average(ex.pr, ex.nr)) for ex in batch])
    nll = f64([-average(ex.pc, ex.nc) for ex in batch])
    close(orpo.metrics["orpo/nll"], nll)
    close(orpo.metrics["orpo/log_odds_ratio"], log_ratio)
    close(orpo.metrics["orpo/odds_ratio_loss"], -torch.nn.functional.logsigmoid(log_ratio))
    close(orpo.losses, nll + 0.3 * orpo.metrics["orpo/odds_ratio_loss"])

    sft, _, _ = call(build_loss({"name": "sft"}), batch)
    assert sft.metrics == {}  # its per-token NLL is the trainer's logps/chosen_per_token


# ---------------------------------------------------------------- 5. BCO's running mean

def test_bco_delta_is_the_running_mean_of_all_training_rewards_and_is_saved():
    config = {"name": "bco", "beta": 0.2}
    s = settings_of(config)
    b1, b2, b3 = random_batch(20, n=3), random_batch(21, n=5), random_batch(22, n=4)
    rewards = {id(b): bco_rewards(s, b) for b in (b1, b2, b3)}

    def mean(*batches):
        values = [r for b in batches for r in rewards[id(b)]]
        return sum(values) / len(values)

    def check(out, batch, delta):
        close(out.metrics["bco/delta"], torch.full((len(batch),), delta, dtype=torch.float64))
        close(out.losses, f64(ref_bco(s, batch, delta)))

    loss = build_loss(config)
    check(call(loss, b1)[0], b1, mean(b1))              # this call's rewards included
    check(call(loss, b2)[0], b2, mean(b1, b2))          # every reward, not a mean of batch means
    assert mean(b1, b2) != pytest.approx((mean(b1) + mean(b2)) / 2)
    loss.eval()
    check(call(loss, b3)[0], b3, mean(b1, b2))          # evaluation uses delta ...
    check(call(loss, b3)[0], b3, mean(b1, b2))          # ... and does not move it

    fresh = build_loss(config).eval()
    check(call(fresh, b3)[0], b3, 0.0)                  # a fresh loss has seen nothing
    fresh.load_state_dict(loss.state_dict())
    check(call(fresh, b3)[0], b3, mean(b1, b2))
    fresh.train()
    check(call(fresh, b3)[0], b3, mean(b1, b2, b3))     # the count came back too, not only the mean


# ---------------------------------------------------------------- 6. config errors

BETA_LOSSES = [name for name in PAIRWISE_LOSSES if name not in ("rso", "orpo")]
BAD_CONFIGS = [
    *[({"name": name, "beta": -0.1}, "loss.beta") for name in BETA_LOSSES],
    ({"name": "rso", "gamma": -0.1}, "loss.gamma"),
    ({"name": "dpo"}, "loss.beta"),  # required
    *[({"name": name, "beta": 0.1, "label_smoothing": 0.5}, "loss.label_smoothing")
      for name in ("dpo", "cdpo", "rpo", "robust", "aot", "aot_unpaired")],
    ({"name": "cdpo", "beta": 0.1, "label_smoothing": 0}, "loss.label_smoothing"),
    ({"name": "rpo", "beta": 0.1, "rpo_alpha": 0}, "loss.rpo_alpha"),
    ({"name": "nca", "rpo_alpha": -1.0}, "loss.rpo_alpha"),
    ({"name": "exo", "epsilon": 0}, "loss.epsilon"),
    ({"name": "exo", "epsilon": 0.5}, "loss.epsilon"),
    ({"name": "discopop", "tau": 1.5}, "loss.tau"),
    ({"name": "discopop", "tau": 0.0}, "loss.tau"),
    ({"name": "simpo", "gamma": -1.0}, "loss.gamma"),
    ({"name": "orpo", "lambda": 0.0}, "loss.lambda"),
    ({"name": "ipo", "beta": 0.1, "average": 1}, "loss.average"),
    ({"name": "bco", "reference_free": "yes"}, "loss.reference_free"),
    # unknown keys
    ({"name": "simpo", "delta": 1.0}, "loss.delta"),
    ({"name": "hinge", "reference_free": True}, "loss.reference_free"),
    ({"name": "orpo", "beta": 0.1}, "loss.beta"),
    ({"name": "sft", "rpo_alpha": 1.0}, "loss.rpo_alpha"),
    ({"name": "ipo", "beta": 0.1, "label_smoothing": 0.1}, "loss.label_smoothing"),
    # a bool where a number is expected
    ({"name": "dpo", "beta": True}, "loss.beta"),
    ({"name": "rso", "gamma": True}, "loss.gamma"),
    ({"name": "simpo", "gamma": False}, "loss.gamma"),
    ({"name": "orpo", "lambda": True}, "loss.lambda"),
    ({"name": "discopop", "tau": True}, "loss.tau"),
    ({"name": "exo", "epsilon": True}, "loss.epsilon"),
    ({"name": "robust", "label_smoothing": False}, "loss.label_smoothing"),
    ({"name": "apo_zero", "rpo_alpha": True}, "loss.rpo_alpha"),
    # weighted_sum
    ({"name": "weighted_sum"}, "loss.terms"),
    ({"name": "weighted_sum", "terms": {}}, "loss.terms"),
    ({"name": "weighted_sum", "terms": {"dpo": {"beta": 0.1}}}, "loss.terms.dpo.weight"),
    ({"name": "weighted_sum", "terms": {"sft": {"weight": -1.0}}}, "loss.terms.sft.weight"),
    ({"name": "weighted_sum", "terms": {"sft": {"weight": True}}}, "loss.terms.sft.weight"),
    ({"name": "weighted_sum", "terms": {"sft": {"weight": 1.0}, "dpo": {"weight": 1.0, "beta": -1.0}}},
     "loss.terms.dpo.beta"),
    ({"name": "weighted_sum", "terms": {"dpoo": {"weight": 1.0}}}, "loss.terms.dpoo.name"),
]


@pytest.mark.parametrize("config, key", BAD_CONFIGS, ids=lambda v: config_id(v) if isinstance(v, dict) else v)
def test_bad_settings_raise_config_error_naming_the_key(config, key):
    with pytest.raises(ConfigError) as info:
        build_loss(config)
    assert re.search(re.escape(key) + r"(?![\w.])", str(info.value)), str(info.value)


def test_settings_at_the_edge_of_their_range_are_accepted():
    for config in ({"name": "discopop", "tau": 1.0}, {"name": "exo", "epsilon": 0.49},
                   {"name": "robust", "label_smoothing": 0.0}, {"name": "simpo", "gamma": 0},
                   {"name": "weighted_sum", "terms": {"sft": {"weight": 0}}}, {"name": "orpo", "lambda": 2}):
        build_loss(config)


# ---------------------------------------------------------------- 7. needs_reference

NEEDS_REFERENCE = [
    *[({"name": name}, False) for name in ("hinge", "simpo", "orpo", "sft")],
    *[({"name": name, **REQUIRED.get(name, {})}, True) for name in LOG_RATIO_LOSSES],
    *[({"name": name, **REQUIRED.get(name, {}), "reference_free": True}, False) for name in LOG_RATIO_LOSSES],
    ({"name": "weighted_sum", "terms": {"simpo": {"weight": 1.0}, "sft": {"weight": 0.1}}}, False),
    ({"name": "weighted_sum", "terms": {"sft": {"weight": 0.1}, "nca": {"weight": 1.0}}}, True),
    ({"name": "weighted_sum",
      "terms": {"sft": {"weight": 0.1}, "nca": {"weight": 1.0, "reference_free": True}}}, False),
]


@pytest.mark.parametrize("config, expected", NEEDS_REFERENCE, ids=lambda v: config_id(v) if isinstance(v, dict) else "")
def test_needs_reference(config, expected):
    loss = build_loss(config)
    assert loss.needs_reference is expected
    if not expected:  # and it really runs without one
        out, _, _ = call(loss, random_batch(6))
        assert torch.isfinite(out.losses).all()


# ---------------------------------------------------------------- 8. weighted_sum

def test_weighted_sum_is_the_weighted_sum_of_its_terms_built_alone():
    terms = {"dpo": {"weight": 1.0, "beta": 0.1}, "ipo": {"weight": 0.5, "beta": 0.2},
             "sft": {"weight": 0.05}, "orpo": {"weight": 0.3, "lambda": 0.2}}
    batch = random_batch(7)
    out, pc, pr = call(build_loss({"name": "weighted_sum", "terms": terms}), batch)
    out.losses.sum().backward()

    expected, grad_pc, grad_pr = 0, 0, 0
    parts = {}
    for name, settings in terms.items():
        part, part_pc, part_pr = call(build_loss(term_config(name, settings)), batch)
        part.losses.sum().backward()
        parts[name] = part
        expected = expected + settings["weight"] * part.losses.detach()
        grad_pc = grad_pc + settings["weight"] * part_pc.grad
        grad_pr = grad_pr + settings["weight"] * grad_or_zero(part_pr)
    close(out.losses, expected)
    close(pc.grad, grad_pc)
    close(pr.grad, grad_pr)

    rewards = ["rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins"]
    assert set(out.metrics) == {
        "terms/dpo", "terms/ipo", "terms/sft", "terms/orpo",
        *rewards,                                  # dpo's, the first
        *[f"ipo_{key}" for key in rewards],        # later collisions carry the term's name
        *[f"orpo_{key}" for key in rewards], "orpo/nll", "orpo/odds_ratio_loss", "orpo/log_odds_ratio",
    }
    for name, part in parts.items():
        close(out.metrics[f"terms/{name}"], part.losses.detach())  # unweighted
    for key in rewards:
        close(out.metrics[key], parts["dpo"].metrics[key])
        close(out.metrics[f"ipo_{key}"], parts["ipo"].metrics[key])
        close(out.metrics[f"orpo_{key}"], parts["orpo"].metrics[key])
    close(out.metrics["orpo/nll"], parts["orpo"].metrics["orpo/nll"])
