"""Loss functions for preference optimization: every published pairwise loss as a small module.

The contract. A loss is an `nn.Module` called as `loss(policy, reference, batch)`:
  - `policy` and `reference` are `SequenceLogps`: per-sequence summed log-probs of the chosen (and
    rejected) responses and their token counts; `reference` is None unless `needs_reference`, in
    which case no reference model is built or run at all.
  - `batch` holds the batch fields named in `batch_fields` (e.g. preference scores), nothing else.
  - `needs_token_logps` asks for per-token log-probs as well (`SequenceLogps.chosen_token_logps`).
  - `uses_pairs` is False for chosen-only batches (SFT).
It returns a `LossOutput(losses, metrics)`: one loss per example, and named per-example metrics
("group/key", logged as "group_train/key" and "group_eval/key", the reference's metric names), such
as `rewards/chosen`, `rewards/margins` or the two terms of ORPO.

Pairwise losses subclass `PairwiseLoss` and write only `pair_losses`, torchtune's form: per-example
`(losses, chosen_rewards, rejected_rewards)` with the formula and the paper in the docstring. Every
pairwise loss also takes `rpo_alpha`, an NLL term on the chosen response (RPO, "DPO + NLL").

A new loss is one class here (or in any imported module) decorated with `@register_loss`, plus one
`config/loss/<name>.yaml` holding its hyper-parameters; `build_loss` turns that config into the
module and reports unknown, missing or out-of-range values. `preference_loss` keeps the reference
implementation's functional form for notebooks.

Lengths. A response's "average" log-prob divides its sum by its token count; a response with no
tokens (which the data pipeline never makes: every response ends with EOS) has sum and average 0.
"""

from __future__ import annotations

import inspect
import keyword
import math
from typing import Any, Callable, ClassVar, Mapping, NamedTuple, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from dpo.errors import ConfigError
from dpo.logps import SequenceLogps


class LossOutput(NamedTuple):
    """Per-example `losses` (the trainer averages them) and named per-example `metrics` ("group/key")."""

    losses: Tensor
    metrics: dict[str, Tensor]

    @property
    def chosen_rewards(self) -> Optional[Tensor]:
        return self.metrics.get("rewards/chosen")

    @property
    def rejected_rewards(self) -> Optional[Tensor]:
        return self.metrics.get("rewards/rejected")


class PairLosses(NamedTuple):
    """What `PairwiseLoss.pair_losses` returns: torchtune's triple, and optionally the loss's own metrics."""

    losses: Tensor
    chosen_rewards: Tensor
    rejected_rewards: Tensor
    metrics: Optional[dict[str, Tensor]] = None


def preference_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    beta: float,
    label_smoothing: float = 0.0,
    ipo: bool = False,
    reference_free: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """The DPO/cDPO/IPO loss with exactly the reference implementation's semantics.

    With h = (log pi(y_w) - log pi(y_l)) - (log pi_ref(y_w) - log pi_ref(y_l)), the second
    bracket being 0 when `reference_free`:
      - IPO:      (h - 1/(2 beta))^2                                   (Azar et al. 2023, Eq. 17)
      - DPO/cDPO: -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)
                  (Rafailov et al. 2023, Eq. 7 for eps = 0; Mitchell 2023, "A note on DPO with
                  noisy preferences", for eps = label_smoothing > 0)
    Rewards are beta * (log pi - log pi_ref), detached; with `reference_free` they still use the
    given reference log-probs, as the reference code does.
    """
    pi_logratios = policy_chosen_logps - policy_rejected_logps
    ref_logratios = reference_chosen_logps - reference_rejected_logps
    if reference_free:
        ref_logratios = 0
    logits = pi_logratios - ref_logratios
    if ipo:
        losses = (logits - 1 / (2 * beta)) ** 2
    else:
        losses = (-F.logsigmoid(beta * logits) * (1 - label_smoothing)
                  - F.logsigmoid(-beta * logits) * label_smoothing)
    chosen_rewards = beta * (policy_chosen_logps - reference_chosen_logps).detach()
    rejected_rewards = beta * (policy_rejected_logps - reference_rejected_logps).detach()
    return losses, chosen_rewards, rejected_rewards


# ---------------------------------------------------------------- the contract and the registry

class PreferenceLoss(nn.Module):
    """Base class: `forward(policy, reference=None, batch=None) -> LossOutput` (see the module docstring)."""

    name: ClassVar[str] = ""
    uses_pairs: ClassVar[bool] = True
    needs_token_logps: ClassVar[bool] = False
    batch_fields: ClassVar[tuple[str, ...]] = ()

    @property
    def needs_reference(self) -> bool:
        return False

    def forward(self, policy: SequenceLogps, reference: Optional[SequenceLogps] = None,
                batch: Optional[Mapping[str, Tensor]] = None) -> LossOutput:
        raise NotImplementedError


LOSSES: dict[str, type[PreferenceLoss]] = {}


def register_loss(cls: type[PreferenceLoss]) -> type[PreferenceLoss]:
    """Class decorator: make `cls` selectable as `loss.name=<cls.name>`."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} must set a non-empty `name` to be registered")
    LOSSES[cls.name] = cls
    return cls


def loss_uses_pairs(name: str) -> bool:
    """Whether loss `name` trains on preference pairs (unknown names count as pairs; `build_loss` rejects them)."""
    return LOSSES[name].uses_pairs if name in LOSSES else True


# Settings of other losses that are harmless at the value that switches them off. The reference's only
# working IPO command is `loss=dpo loss.name=ipo`, which carries dpo.yaml's `label_smoothing: 0` along.
_SWITCHED_OFF = {"label_smoothing": lambda value: value == 0 and not isinstance(value, bool),
                 "reference_free": lambda value: value is False}


def loss_settings(cls: type[PreferenceLoss]) -> dict[str, inspect.Parameter]:
    """A loss's config keys (its constructor's arguments; `lambda_` is configured as `lambda`)."""
    parameters = inspect.signature(cls.__init__).parameters.items()
    return {_config_key(name): spec for name, spec in parameters
            if name != "self" and spec.kind not in (spec.VAR_POSITIONAL, spec.VAR_KEYWORD)}


def _config_key(argument: str) -> str:
    stripped = argument.rstrip("_")
    return stripped if argument.endswith("_") and keyword.iskeyword(stripped) else argument


def _argument(key: str) -> str:
    return key + "_" if keyword.iskeyword(key) else key


def build_loss(config: Mapping[str, Any]) -> PreferenceLoss:
    """Build the loss named `config['name']` from the other keys of `config` (the `loss.*` config)."""
    params = dict(config)
    name = params.pop("name", None)
    if name not in LOSSES:
        raise ConfigError(f"unknown loss.name '{name}': valid losses are {', '.join(sorted(LOSSES))}")
    cls = LOSSES[name]
    settings = loss_settings(cls)
    params = {key: value for key, value in params.items()
              if key in settings or not _SWITCHED_OFF.get(key, lambda value: False)(value)}
    unknown = sorted(set(params) - set(settings))
    if unknown:
        raise ConfigError(f"loss.{unknown[0]} is not a setting of loss '{name}': its settings are "
                          f"{', '.join(settings) if settings else 'none'}")
    missing = [key for key, spec in settings.items() if spec.default is inspect.Parameter.empty and key not in params]
    if missing:
        raise ConfigError(f"loss.{missing[0]} is required for loss '{name}': pass e.g. loss.{missing[0]}=0.1")
    return cls(**{_argument(key): value for key, value in params.items()})


# ---------------------------------------------------------------- checks of settings

def _number(key: str, value: Any, in_range: Callable[[float], bool], wanted: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not in_range(value):
        raise ConfigError(f"loss.{key} must be {wanted}, got {value!r}")
    return float(value)


def _positive(key: str, value: Any, example: float = 0.1) -> float:
    return _number(key, value, lambda v: v > 0, f"a positive number (e.g. loss.{key}={example})")


def _flip_rate(key: str, value: Any) -> float:
    return _number(key, value, lambda v: 0 <= v < 0.5, f"in [0, 0.5) (e.g. loss.{key}=0.1)")


def _flag(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"loss.{key} must be true or false, got {value!r}")
    return value


def per_token(logps: Tensor, tokens: Optional[Tensor], loss: str) -> Tensor:
    """Summed log-probs divided by token counts; 0 for a response with no tokens."""
    if tokens is None:
        raise ValueError(f"loss '{loss}' averages log-probs per token, so it needs token counts: "
                         "pass SequenceLogps(..., chosen_tokens=..., rejected_tokens=...)")
    return logps / tokens.clamp(min=1)


def reward_metrics(chosen_rewards: Tensor, rejected_rewards: Tensor) -> dict[str, Tensor]:
    """The reference implementation's reward metrics, per example."""
    return {"rewards/chosen": chosen_rewards, "rewards/rejected": rejected_rewards,
            "rewards/accuracies": (chosen_rewards > rejected_rewards).to(chosen_rewards.dtype),
            "rewards/margins": chosen_rewards - rejected_rewards}


# ---------------------------------------------------------------- supervised fine-tuning

@register_loss
class SFTLoss(PreferenceLoss):
    """Supervised fine-tuning: the negative log-likelihood of the target response.

        L = -log pi(y | x)   (summed over response tokens, averaged over the batch)

    as in the reference implementation's SFT stage. It has no metrics of its own: the trainer logs
    `logps/chosen_per_token`, minus the log of the perplexity.
    """

    name = "sft"
    uses_pairs = False

    def forward(self, policy: SequenceLogps, reference: Optional[SequenceLogps] = None,
                batch: Optional[Mapping[str, Tensor]] = None) -> LossOutput:
        return LossOutput(-policy.chosen, {})


# ---------------------------------------------------------------- pairwise losses

class PairwiseLoss(PreferenceLoss):
    """A loss on (chosen, rejected) pairs; subclasses write `pair_losses`.

    `rpo_alpha` adds alpha times the chosen response's per-token NLL to every example's loss
    (Pang et al. 2024, "Iterative Reasoning Preference Optimization", Eq. 1: "DPO + NLL"), logged
    as `nll/chosen`; 0 switches it off.
    """

    def __init__(self, rpo_alpha: float = 0.0):
        super().__init__()
        self.rpo_alpha = _number("rpo_alpha", rpo_alpha, lambda v: v >= 0,
                                 "a non-negative number (e.g. loss.rpo_alpha=1.0; 0 switches the NLL term off)")

    def pair_losses(self, policy: SequenceLogps, reference: SequenceLogps) -> PairLosses:
        raise NotImplementedError

    def forward(self, policy: SequenceLogps, reference: Optional[SequenceLogps] = None,
                batch: Optional[Mapping[str, Tensor]] = None) -> LossOutput:
        if policy.rejected is None:
            raise ValueError(f"loss '{self.name}' needs rejected responses, but the batch holds chosen ones only")
        if self.needs_reference and reference is None:
            raise ValueError(f"loss '{self.name}' needs reference log-probs")
        losses, chosen_rewards, rejected_rewards, own = self.pair_losses(policy, reference)
        metrics = {**reward_metrics(chosen_rewards.detach(), rejected_rewards.detach()), **(own or {})}
        if self.rpo_alpha:
            nll = -per_token(policy.chosen, policy.chosen_tokens, self.name)
            losses = losses + self.rpo_alpha * nll
            metrics["nll/chosen"] = nll.detach()
        return LossOutput(losses, metrics)


class LogRatioLoss(PairwiseLoss):
    """A pairwise loss on the log-ratios a = log pi(y_w|x) - log pi_ref(y_w|x) and
    b = log pi(y_l|x) - log pi_ref(y_l|x); the implicit rewards are beta a and beta b.

    `reference_free` takes pi_ref uniform (a and b become the policy's log-probs), so no
    reference model is loaded.
    """

    def __init__(self, beta: float, reference_free: bool = False, rpo_alpha: float = 0.0):
        super().__init__(rpo_alpha)
        self.beta = _positive("beta", beta)
        self.reference_free = _flag("reference_free", reference_free)

    @property
    def needs_reference(self) -> bool:
        return not self.reference_free

    def log_ratios(self, policy: SequenceLogps, reference: Optional[SequenceLogps]) -> tuple[Tensor, Tensor]:
        """(a, b): the chosen and rejected log-ratios against the reference (or a uniform one)."""
        if self.reference_free:
            return policy.chosen, policy.rejected
        return policy.chosen - reference.chosen, policy.rejected - reference.rejected

    def pair_losses(self, policy: SequenceLogps, reference: Optional[SequenceLogps]) -> PairLosses:
        chosen, rejected = self.log_ratios(policy, reference)
        return PairLosses(self.ratio_losses(chosen, rejected), self.beta * chosen, self.beta * rejected)

    def ratio_losses(self, chosen: Tensor, rejected: Tensor) -> Tensor:
        """Per-example losses from the log-ratios a (`chosen`) and b (`rejected`)."""
        raise NotImplementedError


def smoothed_sigmoid_loss(x: Tensor, eps: float) -> Tensor:
    """-(1 - eps) log sigmoid(x) - eps log sigmoid(-x): the sigmoid loss with labels flipped at rate eps."""
    return -(1 - eps) * F.logsigmoid(x) - eps * F.logsigmoid(-x)


@register_loss
class DPOLoss(LogRatioLoss):
    """Direct Preference Optimization (Rafailov et al. 2023, "Direct Preference Optimization:
    Your Language Model is Secretly a Reward Model", Eq. 7), with optional label smoothing.

        h = a - b = [log pi(y_w|x) - log pi_ref(y_w|x)] - [log pi(y_l|x) - log pi_ref(y_l|x)]
        L = -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)

    eps = `label_smoothing` in [0, 0.5) assumes each label is flipped with probability eps
    (conservative DPO, Mitchell 2023); eps = 0 is plain DPO.
    """

    name = "dpo"

    def __init__(self, beta: float, label_smoothing: float = 0.0, reference_free: bool = False,
                 rpo_alpha: float = 0.0):
        super().__init__(beta, reference_free, rpo_alpha)
        self.label_smoothing = _flip_rate("label_smoothing", label_smoothing)

    def ratio_losses(self, chosen: Tensor, rejected: Tensor) -> Tensor:
        return smoothed_sigmoid_loss(self.beta * (chosen - rejected), self.label_smoothing)


@register_loss
class ConservativeDPOLoss(DPOLoss):
    """Conservative DPO (Mitchell 2023, "A note on DPO with noisy preferences & relationship to
    IPO"): DPO whose labels are each assumed flipped with probability eps = `label_smoothing`.

        L = -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h),   0 < eps < 0.5

    Same as `loss=dpo loss.label_smoothing=eps`; this name insists on eps > 0.
    """

    name = "cdpo"

    def __init__(self, beta: float, label_smoothing: float = 0.1, reference_free: bool = False,
                 rpo_alpha: float = 0.0):
        super().__init__(beta, label_smoothing, reference_free, rpo_alpha)
        if self.label_smoothing == 0:
            raise ConfigError("loss.label_smoothing must be above 0 for loss=cdpo (e.g. 0.1); use loss=dpo for eps = 0")


@register_loss
class RPOLoss(DPOLoss):
    """DPO plus the chosen response's per-token NLL (Pang et al. 2024, "Iterative Reasoning
    Preference Optimization", Eq. 1; alpha = 1 in the paper).

        L = -log sigmoid(beta h) - alpha log pi(y_w|x) / |y_w|

    Same as `loss=dpo loss.rpo_alpha=alpha`; this name insists on alpha > 0.
    """

    name = "rpo"

    def __init__(self, beta: float, rpo_alpha: float = 1.0, label_smoothing: float = 0.0,
                 reference_free: bool = False):
        super().__init__(beta, label_smoothing, reference_free, rpo_alpha)
        if self.rpo_alpha == 0:
            raise ConfigError("loss.rpo_alpha must be above 0 for loss=rpo (e.g. 1.0); use loss=dpo for alpha = 0")


@register_loss
class RobustDPOLoss(LogRatioLoss):
    """Robust DPO (Chowdhury et al. 2024, "Provably Robust DPO: Aligning Language Models with
    Noisy Feedback", Eq. 9): unbiased when each label is flipped with known probability eps.

        L = [-(1 - eps) log sigmoid(beta h) + eps log sigmoid(-beta h)] / (1 - 2 eps)

    Unlike conservative DPO, the flipped term enters with the opposite sign, so the expected loss
    under noisy labels equals the DPO loss under clean ones. eps = `label_smoothing` in [0, 0.5).
    """

    name = "robust"

    def __init__(self, beta: float = 0.1, label_smoothing: float = 0.1, reference_free: bool = False,
                 rpo_alpha: float = 0.0):
        super().__init__(beta, reference_free, rpo_alpha)
        self.label_smoothing = _flip_rate("label_smoothing", label_smoothing)

    def ratio_losses(self, chosen: Tensor, rejected: Tensor) -> Tensor:
        x, eps = self.beta * (chosen - rejected), self.label_smoothing
        return (-(1 - eps) * F.logsigmoid(x) + eps * F.logsigmoid(-x)) / (1 - 2 * eps)


@register_loss
class IPOLoss(LogRatioLoss):
    """Identity Preference Optimization (Azar et al. 2023, "A General Theoretical Paradigm to
    Understand Learning from Human Preferences", Eq. 17).

        L = (h - 1/(2 beta))^2

    beta is the paper's regularisation tau. With `average=false` (the default) h uses summed
    log-probs, as the original DPO reference code does, so `loss=ipo` trains exactly as it did
    there; `average=true` uses per-token averages, h = a/|y_w| - b/|y_l|, the IPO authors' practice,
    which keeps the target margin 1/(2 beta) independent of response length (the rewards are then
    beta times the per-token log-ratios).
    """

    name = "ipo"

    def __init__(self, beta: float, average: bool = False, reference_free: bool = False, rpo_alpha: float = 0.0):
        super().__init__(beta, reference_free, rpo_alpha)
        self.average = _flag("average", average)

    def pair_losses(self, policy: SequenceLogps, reference: Optional[SequenceLogps]) -> PairLosses:
        chosen, rejected = self.log_ratios(policy, reference)
        if self.average:
            chosen = per_token(chosen, policy.chosen_tokens, self.name)
            rejected = per_token(rejected, policy.rejected_tokens, self.name)
        losses = (chosen - rejected - 1 / (2 * self.beta)) ** 2
        return PairLosses(losses, self.beta * chosen, self.beta * rejected)


@register_loss
class RSOLoss(LogRatioLoss):
    """The hinge loss on the normalised likelihood of Statistical Rejection Sampling Optimization
    (Liu et al. 2023, "Statistical Rejection Sampling Improves Preference Optimization", Eq. 8).

        L = max(0, 1 - gamma h)

    The likelihoods are normalised by the SFT (reference) model's; `gamma` is the paper's scale.
    """

    name = "rso"

    def __init__(self, gamma: float = 0.1, reference_free: bool = False, rpo_alpha: float = 0.0):
        super().__init__(_positive("gamma", gamma), reference_free, rpo_alpha)
        self.gamma = self.beta  # the implicit rewards are gamma a and gamma b

    def ratio_losses(self, chosen: Tensor, rejected: Tensor) -> Tensor:
        return torch.relu(1 - self.gamma * (chosen - rejected))


@register_loss
class ExoLoss(LogRatioLoss):
    """Efficient Exact Optimization, pairwise (Ji et al. 2024, "Towards Efficient Exact
    Optimization of Language Model Alignment", Eq. 16 with K = 2): the reverse KL from the policy's
    preference distribution q = (sigmoid(beta h), sigmoid(-beta h)) to the labels smoothed by eps.

        L = sigmoid(beta h) [log sigmoid(beta h) - log(1 - eps)]
          + sigmoid(-beta h) [log sigmoid(-beta h) - log eps]
    """

    name = "exo"

    def __init__(self, beta: float = 0.1, epsilon: float = 1e-3, reference_free: bool = False,
                 rpo_alpha: float = 0.0):
        super().__init__(beta, reference_free, rpo_alpha)
        self.epsilon = _number("epsilon", epsilon, lambda v: 0 < v < 0.5, "in (0, 0.5) (e.g. loss.epsilon=0.001)")

    def ratio_losses(self, chosen: Tensor, rejected: Tensor) -> Tensor:
        x = self.beta * (chosen - rejected)
        return (torch.sigmoid(x) * (F.logsigmoid(x) - math.log1p(-self.epsilon))
                + torch.sigmoid(-x) * (F.logsigmoid(-x) - math.log(self.epsilon)))


@register_loss
class NCALoss(LogRatioLoss):
    """Noise Contrastive Alignment, pairwise (Chen et al. 2024, "Noise Contrastive Alignment of
    Language Models with Explicit Rewards", Eq. 12 with K = 2), on the rewards r = beta a, beta b:

        L = -log sigmoid(r_w) - 1/2 log sigmoid(-r_w) - 1/2 log sigmoid(-r_l)

    Unlike DPO, it optimises each response's absolute reward, so the chosen likelihood cannot fall
    without bound.
    """

    name = "nca"

    def __init__(self, beta: float = 0.1, reference_free: bool = False, rpo_alpha: float = 0.0):
        super().__init__(beta, reference_free, rpo_alpha)

    def ratio_losses(self, chosen: Tensor, rejected: Tensor) -> Tensor:
        chosen, rejected = self.beta * chosen, self.beta * rejected
        return -F.logsigmoid(chosen) - 0.5 * F.logsigmoid(-chosen) - 0.5 * F.logsigmoid(-rejected)


@register_loss
class BCOLoss(LogRatioLoss):
    """Binary Classifier Optimization, pairwise (Jung et al. 2024, "Binary Classifier Optimization
    for Large Language Model Alignment", Eq. 8-9): chosen responses classified as good and
    rejected ones as bad, with rewards r = beta a, beta b shifted by delta:

        L = -log sigmoid(r_w - delta) - log sigmoid(-(r_l - delta))

    delta is the running mean of all rewards seen in training so far (both responses, every
    example, this step's included), kept in the loss's state and so in every checkpoint; in
    evaluation it is used, not updated. Logged as `bco/delta`.
    """

    name = "bco"

    def __init__(self, beta: float = 0.1, reference_free: bool = False, rpo_alpha: float = 0.0):
        super().__init__(beta, reference_free, rpo_alpha)
        self.register_buffer("reward_sum", torch.zeros((), dtype=torch.float64))
        self.register_buffer("reward_count", torch.zeros((), dtype=torch.float64))

    def pair_losses(self, policy: SequenceLogps, reference: Optional[SequenceLogps]) -> PairLosses:
        chosen, rejected = self.log_ratios(policy, reference)
        chosen, rejected = self.beta * chosen, self.beta * rejected
        if self.training:
            self.update_shift(torch.cat([chosen, rejected]).detach())
        delta = self.delta().to(chosen.dtype)
        losses = -F.logsigmoid(chosen - delta) - F.logsigmoid(-(rejected - delta))
        return PairLosses(losses, chosen, rejected, {"bco/delta": delta.expand_as(losses).detach()})

    def update_shift(self, rewards: Tensor) -> None:
        """Add this step's rewards to the running mean, over all processes when training is distributed."""
        totals = torch.stack([rewards.double().sum(), rewards.new_tensor(len(rewards), dtype=torch.float64)])
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(totals)  # tensor-parallel peers hold the same rows, so every row counts equally
        self.reward_sum = self.reward_sum.to(totals.device) + totals[0]
        self.reward_count = self.reward_count.to(totals.device) + totals[1]

    def delta(self) -> Tensor:
        return self.reward_sum / self.reward_count.clamp(min=1)


@register_loss
class SPPOHardLoss(LogRatioLoss):
    """Self-Play Preference Optimization with hard labels (Wu et al. 2024, "Self-Play Preference
    Optimization for Language Model Alignment", Eq. 4.7 with P(y_w > y_l) = 1, P(y_l > y_w) = 0):

        L = (a - 1/(2 beta))^2 + (b + 1/(2 beta))^2

    beta = 1/eta of the paper: the chosen log-ratio is pulled to +1/(2 beta), the rejected to -1/(2 beta).
    """

    name = "sppo_hard"

    def __init__(self, beta: float = 0.1, reference_free: bool = False, rpo_alpha: float = 0.0):
        super().__init__(beta, reference_free, rpo_alpha)

    def ratio_losses(self, chosen: Tensor, rejected: Tensor) -> Tensor:
        target = 1 / (2 * self.beta)
        return (chosen - target) ** 2 + (rejected + target) ** 2


@register_loss
class APOZeroLoss(LogRatioLoss):
    """Anchored Preference Optimization, zero (D'Oosterlinck et al. 2024, "Anchored Preference
    Optimization and Contrastive Revisions", Eq. 7): for chosen responses better than the model's.

        L = [1 - sigmoid(beta a)] + sigmoid(beta b)

    pushes the chosen likelihood up and the rejected likelihood down, each against the reference.
    """

    name = "apo_zero"

    def __init__(self, beta: float = 0.1, reference_free: bool = False, rpo_alpha: float = 0.0):
        super().__init__(beta, reference_free, rpo_alpha)

    def ratio_losses(self, chosen: Tensor, rejected: Tensor) -> Tensor:
        return 1 - torch.sigmoid(self.beta * chosen) + torch.sigmoid(self.beta * rejected)


@register_loss
class APODownLoss(LogRatioLoss):
    """Anchored Preference Optimization, down (D'Oosterlinck et al. 2024, Eq. 8): for chosen
    responses worse than the model's own.

        L = sigmoid(beta a) + [1 - sigmoid(beta (a - b))]

    pushes both likelihoods down, the rejected one more.
    """

    name = "apo_down"

    def __init__(self, beta: float = 0.1, reference_free: bool = False, rpo_alpha: float = 0.0):
        super().__init__(beta, reference_free, rpo_alpha)

    def ratio_losses(self, chosen: Tensor, rejected: Tensor) -> Tensor:
        return torch.sigmoid(self.beta * chosen) + 1 - torch.sigmoid(self.beta * (chosen - rejected))


@register_loss
class AOTLoss(LogRatioLoss):
    """Alignment via Optimal Transport, paired (Melnyk et al. 2024, "Distributional Preference
    Alignment of LLMs via Optimal Transport"): the policy's log-likelihood margins m_i = log pi(y_w)
    - log pi(y_l) should dominate the reference's m_ref,i in distribution (first-order stochastic
    dominance), enforced between the sorted margins of the batch:

        L_i = -(1 - eps) log sigmoid(beta d_i) - eps log sigmoid(-beta d_i),
        d = sort(m) - sort(m_ref)

    The sort runs over each micro-batch on each process, so the loss depends on the micro-batch
    size (the paper's setting: a batch is a sample of the distribution).
    """

    name = "aot"

    def __init__(self, beta: float = 0.1, label_smoothing: float = 0.0, reference_free: bool = False,
                 rpo_alpha: float = 0.0):
        super().__init__(beta, reference_free, rpo_alpha)
        self.label_smoothing = _flip_rate("label_smoothing", label_smoothing)

    def sorted_gaps(self, policy: SequenceLogps, reference: Optional[SequenceLogps]) -> Tensor:
        margins = policy.chosen - policy.rejected
        if self.reference_free:
            return torch.sort(margins).values
        return torch.sort(margins).values - torch.sort(reference.chosen - reference.rejected).values

    def pair_losses(self, policy: SequenceLogps, reference: Optional[SequenceLogps]) -> PairLosses:
        chosen, rejected = self.log_ratios(policy, reference)
        losses = smoothed_sigmoid_loss(self.beta * self.sorted_gaps(policy, reference), self.label_smoothing)
        return PairLosses(losses, self.beta * chosen, self.beta * rejected)


@register_loss
class AOTUnpairedLoss(AOTLoss):
    """Alignment via Optimal Transport, unpaired (Melnyk et al. 2024): the chosen log-ratios should
    dominate the rejected ones in distribution, so pairs need not match:

        L_i = -(1 - eps) log sigmoid(beta d_i) - eps log sigmoid(-beta d_i),   d = sort(a) - sort(b)

    over each micro-batch on each process, as for `aot`.
    """

    name = "aot_unpaired"

    def sorted_gaps(self, policy: SequenceLogps, reference: Optional[SequenceLogps]) -> Tensor:
        chosen, rejected = self.log_ratios(policy, reference)
        return torch.sort(chosen).values - torch.sort(rejected).values


@register_loss
class DiscoPOPLoss(LogRatioLoss):
    """DiscoPOP, the log-ratio modulated loss found by LLM-driven discovery (Lu et al. 2024,
    "Discovering Preference Optimization Algorithms with and for Large Language Models", Eq. 5):
    a mix of the logistic (DPO) and exponential losses, weighted by sigmoid(beta h / tau).

        x = beta h,   w = sigmoid(x / tau)
        L = (1 - w) (-log sigmoid(x)) + w exp(-x)

    The exponential term is computed as exp(-x + log sigmoid(x / tau)), finite for every h when
    tau <= 1 (the paper uses tau = 0.05).

    A pitfall of the formula itself: at h = 0, where every run from an SFT checkpoint starts,
    dL/dx = (1 - log 2) / (4 tau) - 3/4, which is positive for tau < (1 - log 2) / 3 = 0.102, so
    gradient descent first pushes the margins negative (on the toy task, tau = 0.05 drives held-out
    reward accuracy to 0.01). A larger tau removes this.
    """

    name = "discopop"

    def __init__(self, beta: float = 0.05, tau: float = 0.05, reference_free: bool = False, rpo_alpha: float = 0.0):
        super().__init__(beta, reference_free, rpo_alpha)
        self.tau = _number("tau", tau, lambda v: 0 < v <= 1, "in (0, 1] (e.g. loss.tau=0.05)")

    def ratio_losses(self, chosen: Tensor, rejected: Tensor) -> Tensor:
        x = self.beta * (chosen - rejected)
        weight = torch.sigmoid(x / self.tau)
        return (1 - weight) * -F.logsigmoid(x) + torch.exp(-x + F.logsigmoid(x / self.tau))


# ---------------------------------------------------------------- reference-free losses

@register_loss
class SLiCHingeLoss(PairwiseLoss):
    """The SLiC-HF rank calibration loss (Zhao et al. 2023, "SLiC-HF: Sequence Likelihood
    Calibration with Human Feedback", Eq. 1), a hinge on the policy's own likelihoods:

        L = max(0, 1 - beta [log pi(y_w|x) - log pi(y_l|x)])  =  beta max(0, delta - [...]),  delta = 1/beta

    No reference model: SLiC-HF regularises with a cross-entropy term on the chosen response
    instead, which `rpo_alpha` adds. (Some libraries' `hinge` uses reference log-ratios: that is
    the RSO loss, `loss=rso`.)
    """

    name = "hinge"

    def __init__(self, beta: float = 0.1, rpo_alpha: float = 0.0):
        super().__init__(rpo_alpha)
        self.beta = _positive("beta", beta)

    def pair_losses(self, policy: SequenceLogps, reference: Optional[SequenceLogps]) -> PairLosses:
        losses = torch.relu(1 - self.beta * (policy.chosen - policy.rejected))
        return PairLosses(losses, self.beta * policy.chosen, self.beta * policy.rejected)


@register_loss
class SimPOLoss(PairwiseLoss):
    """Simple Preference Optimization (Meng et al. 2024, "SimPO: Simple Preference Optimization with
    a Reference-Free Reward", Eq. 6): the length-normalised likelihood is the reward, and the
    chosen one must beat the rejected one by the target margin gamma.

        L = -log sigmoid(beta log pi(y_w|x) / |y_w| - beta log pi(y_l|x) / |y_l| - gamma)

    The rewards are beta log pi(y|x) / |y|. No reference model.
    """

    name = "simpo"

    def __init__(self, beta: float = 2.0, gamma: float = 1.0, rpo_alpha: float = 0.0):
        super().__init__(rpo_alpha)
        self.beta = _positive("beta", beta, example=2.0)
        self.gamma = _number("gamma", gamma, lambda v: v >= 0, "a non-negative number (e.g. loss.gamma=1.0)")

    def pair_losses(self, policy: SequenceLogps, reference: Optional[SequenceLogps]) -> PairLosses:
        chosen = self.beta * per_token(policy.chosen, policy.chosen_tokens, self.name)
        rejected = self.beta * per_token(policy.rejected, policy.rejected_tokens, self.name)
        return PairLosses(-F.logsigmoid(chosen - rejected - self.gamma), chosen, rejected)


# A response's per-token likelihood P = exp(mean log-prob) is capped below 1 so that its odds P / (1 - P)
# stay finite when the model is (numerically) certain of it.
MAX_ODDS_LOG_PROB = math.log1p(-1e-6)


def log_odds(mean_logps: Tensor) -> Tensor:
    """log(P / (1 - P)) with P = exp(mean_logps), stable for every mean_logps <= 0."""
    mean_logps = mean_logps.clamp(max=MAX_ODDS_LOG_PROB)
    # log(1 - e^x): log(-expm1(x)) near 0, log1p(-e^x) far from it (Maechler 2012)
    log_one_minus = torch.where(mean_logps > -math.log(2), torch.log(-torch.expm1(mean_logps)),
                                torch.log1p(-torch.exp(mean_logps)))
    return mean_logps - log_one_minus


@register_loss
class ORPOLoss(PairwiseLoss):
    """Odds Ratio Preference Optimization (Hong et al. 2024, "ORPO: Monolithic Preference
    Optimization without Reference Model", Eq. 6-7): SFT on the chosen response plus an
    odds-ratio term weighted by lambda, with P(y|x) = exp(log pi(y|x) / |y|) and odds(y) = P / (1 - P):

        L = -log pi(y_w|x) / |y_w|  -  lambda log sigmoid(log odds(y_w) - log odds(y_l))

    Logged as `orpo/nll` and `orpo/odds_ratio_loss` (the two terms, the second unweighted) and
    `orpo/log_odds_ratio`. The rewards are the per-token log-probs. No reference model.
    """

    name = "orpo"

    def __init__(self, lambda_: float = 0.1, rpo_alpha: float = 0.0):
        super().__init__(rpo_alpha)
        self.lambda_ = _positive("lambda", lambda_)

    def pair_losses(self, policy: SequenceLogps, reference: Optional[SequenceLogps]) -> PairLosses:
        chosen = per_token(policy.chosen, policy.chosen_tokens, self.name)
        rejected = per_token(policy.rejected, policy.rejected_tokens, self.name)
        log_odds_ratio = log_odds(chosen) - log_odds(rejected)
        odds_ratio_loss = -F.logsigmoid(log_odds_ratio)
        losses = -chosen + self.lambda_ * odds_ratio_loss
        metrics = {"orpo/nll": -chosen.detach(), "orpo/odds_ratio_loss": odds_ratio_loss.detach(),
                   "orpo/log_odds_ratio": log_odds_ratio.detach()}
        return PairLosses(losses, chosen, rejected, metrics)


# ---------------------------------------------------------------- combinations

@register_loss
class WeightedSumLoss(PreferenceLoss):
    """A weighted sum of registered losses, each with its own settings:

        L = sum_k w_k L_k

    configured as `terms: {dpo: {weight: 1.0, beta: 0.1}, sft: {weight: 0.05}}`. Each term's loss is
    logged as `terms/<name>` (unweighted), and its metrics under their own names; a name two terms
    share is prefixed with the later term's name (`ipo_rewards/chosen`). On pairs, `sft` trains on
    the chosen response. A reference model is loaded if any term needs one.
    """

    name = "weighted_sum"

    def __init__(self, terms: Mapping[str, Mapping[str, Any]]):
        super().__init__()
        if not isinstance(terms, Mapping) or not terms:
            raise ConfigError("loss.terms must map loss names to their settings and weight, "
                              "e.g. loss.terms={dpo:{weight:1.0,beta:0.1},sft:{weight:0.05}}")
        self.weights: dict[str, float] = {}
        parts = {}
        for name, settings in terms.items():
            settings = dict(settings or {})
            if "weight" not in settings:
                raise ConfigError(f"loss.terms.{name}.weight is required: pass e.g. loss.terms.{name}.weight=1.0")
            self.weights[name] = _number(f"terms.{name}.weight", settings.pop("weight"), lambda v: v >= 0,
                                         "a non-negative number (e.g. 1.0)")
            try:
                parts[name] = build_loss({"name": name, **settings})
            except ConfigError as error:  # name the term's keys as the user writes them
                raise ConfigError(str(error).replace("loss.", f"loss.terms.{name}.")) from None
        self.parts = nn.ModuleDict(parts)
        # decided by the terms, so these instance values shadow the class's
        self.uses_pairs = any(part.uses_pairs for part in parts.values())
        self.needs_token_logps = any(part.needs_token_logps for part in parts.values())
        self.batch_fields = tuple(dict.fromkeys(field for part in parts.values() for field in part.batch_fields))

    @property
    def needs_reference(self) -> bool:
        return any(part.needs_reference for part in self.parts.values())

    def forward(self, policy: SequenceLogps, reference: Optional[SequenceLogps] = None,
                batch: Optional[Mapping[str, Tensor]] = None) -> LossOutput:
        total, metrics = 0, {}
        for name, part in self.parts.items():
            losses, part_metrics = part(policy, reference, batch)
            total = total + self.weights[name] * losses
            metrics[f"terms/{name}"] = losses.detach()
            for key, value in part_metrics.items():
                metrics[f"{name}_{key}" if key in metrics else key] = value
        return LossOutput(total, metrics)
