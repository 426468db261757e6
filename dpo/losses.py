"""Loss functions for preference optimization.

Each loss is a small `nn.Module`: `loss(policy, reference)` takes the per-sequence log-probs of
the policy and, when `needs_reference`, of the frozen reference model (both `SequenceLogps`), and
returns `(losses, chosen_rewards, rejected_rewards)`, one value per example. The rewards are the
implicit rewards `beta * (log pi(y|x) - log pi_ref(y|x))`, detached, used only for metrics.

A new loss is one class here (or in any imported module) decorated with `@register_loss`, plus
one `config/loss/<name>.yaml` holding its hyper-parameters; `build_loss` turns that config into
the module and reports unknown, missing or out-of-range values.

`preference_loss` keeps the reference implementation's functional form for notebooks.
"""

from __future__ import annotations

import inspect
import math
from typing import Any, ClassVar, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dpo.errors import ConfigError
from dpo.logps import SequenceLogps

LossOutput = tuple[Tensor, Optional[Tensor], Optional[Tensor]]


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


class PreferenceLoss(nn.Module):
    """Base class: `forward(policy, reference) -> (losses, chosen_rewards, rejected_rewards)`.

    `needs_reference` tells the trainer whether to load and run the reference model;
    `uses_pairs` whether batches hold chosen and rejected responses (False: SFT, chosen only).
    """

    name: ClassVar[str] = ""
    uses_pairs: ClassVar[bool] = True

    @property
    def needs_reference(self) -> bool:
        return False

    def forward(self, policy: SequenceLogps, reference: Optional[SequenceLogps] = None) -> LossOutput:
        raise NotImplementedError


LOSSES: dict[str, type[PreferenceLoss]] = {}


def register_loss(cls: type[PreferenceLoss]) -> type[PreferenceLoss]:
    """Class decorator: make `cls` selectable as `loss.name=<cls.name>`."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} must set a non-empty `name` to be registered")
    LOSSES[cls.name] = cls
    return cls


# Settings of other losses that are harmless at the value that switches them off. The reference's only
# working IPO command is `loss=dpo loss.name=ipo`, which carries dpo.yaml's `label_smoothing: 0` along.
_SWITCHED_OFF = {"label_smoothing": lambda value: value == 0 and not isinstance(value, bool),
                 "reference_free": lambda value: value is False}


def build_loss(config: Mapping[str, Any]) -> PreferenceLoss:
    """Build the loss named `config['name']` from the other keys of `config` (the `loss.*` config)."""
    params = dict(config)
    name = params.pop("name", None)
    if name not in LOSSES:
        raise ConfigError(f"unknown loss.name '{name}': valid losses are {', '.join(sorted(LOSSES))}")
    cls = LOSSES[name]
    settings = {name: spec for name, spec in inspect.signature(cls.__init__).parameters.items()
                if name != "self" and spec.kind not in (spec.VAR_POSITIONAL, spec.VAR_KEYWORD)}
    accepted = list(settings)
    params = {key: value for key, value in params.items()
              if key in accepted or not _SWITCHED_OFF.get(key, lambda value: False)(value)}
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise ConfigError(
            f"loss.{unknown[0]} is not a setting of loss '{name}': its settings are "
            f"{', '.join(accepted) if accepted else 'none'}"
        )
    missing = [p for p, spec in settings.items() if spec.default is inspect.Parameter.empty and p not in params]
    if missing:
        raise ConfigError(f"loss.{missing[0]} is required for loss '{name}': pass e.g. loss.{missing[0]}=0.1")
    return cls(**params)


def _check_beta(beta: Any) -> float:
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not math.isfinite(beta) or beta <= 0:
        raise ConfigError(f"loss.beta must be a positive number (e.g. loss.beta=0.1), got {beta!r}")
    return float(beta)


def _check_flag(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"loss.{key} must be true or false, got {value!r}")
    return value


def _check_label_smoothing(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 0.5:
        raise ConfigError(f"loss.label_smoothing must be in [0, 0.5) (e.g. loss.label_smoothing=0.1), got {value!r}")
    return float(value)


class _PairwiseLoss(PreferenceLoss):
    """Shared parts of losses on h = policy log-ratio minus reference log-ratio."""

    def __init__(self, beta: float, reference_free: bool = False):
        super().__init__()
        self.beta = _check_beta(beta)
        self.reference_free = _check_flag("reference_free", reference_free)

    @property
    def needs_reference(self) -> bool:
        return not self.reference_free

    def _reference_logps(self, policy: SequenceLogps, reference: Optional[SequenceLogps]) -> tuple[Tensor, Tensor]:
        """Reference log-probs; zeros (a uniform reference) when the loss is reference-free."""
        if self.reference_free:
            return torch.zeros_like(policy.chosen), torch.zeros_like(policy.rejected)
        if reference is None:
            raise ValueError(f"loss '{self.name}' needs reference log-probs")
        return reference.chosen, reference.rejected

    def logits_and_rewards(self, policy: SequenceLogps,
                           reference: Optional[SequenceLogps]) -> tuple[Tensor, Tensor, Tensor]:
        ref_chosen, ref_rejected = self._reference_logps(policy, reference)
        chosen_logratios = policy.chosen - ref_chosen
        rejected_logratios = policy.rejected - ref_rejected
        logits = chosen_logratios - rejected_logratios
        return logits, self.beta * chosen_logratios.detach(), self.beta * rejected_logratios.detach()


@register_loss
class SFTLoss(PreferenceLoss):
    """Supervised fine-tuning: the negative log-likelihood of the target response.

        L = -log pi(y | x)   (summed over response tokens, averaged over the batch)

    as in the reference implementation's SFT stage. It has no implicit reward.
    """

    name = "sft"
    uses_pairs = False

    def forward(self, policy: SequenceLogps, reference: Optional[SequenceLogps] = None) -> LossOutput:
        return -policy.chosen, None, None


@register_loss
class DPOLoss(_PairwiseLoss):
    """Direct Preference Optimization (Rafailov et al. 2023, "Direct Preference Optimization:
    Your Language Model is Secretly a Reward Model", Eq. 7), with optional label smoothing.

        h = [log pi(y_w|x) - log pi_ref(y_w|x)] - [log pi(y_l|x) - log pi_ref(y_l|x)]
        L = -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)

    eps = `label_smoothing` in [0, 0.5) assumes each label is flipped with probability eps
    (conservative DPO, Mitchell 2023); eps = 0 is plain DPO. `reference_free` drops pi_ref.
    """

    name = "dpo"

    def __init__(self, beta: float, label_smoothing: float = 0.0, reference_free: bool = False):
        super().__init__(beta, reference_free)
        self.label_smoothing = _check_label_smoothing(label_smoothing)

    def forward(self, policy: SequenceLogps, reference: Optional[SequenceLogps] = None) -> LossOutput:
        logits, chosen_rewards, rejected_rewards = self.logits_and_rewards(policy, reference)
        eps = self.label_smoothing
        losses = -(1 - eps) * F.logsigmoid(self.beta * logits) - eps * F.logsigmoid(-self.beta * logits)
        return losses, chosen_rewards, rejected_rewards


@register_loss
class ConservativeDPOLoss(DPOLoss):
    """Conservative DPO (Mitchell 2023, "A note on DPO with noisy preferences & relationship to
    IPO"): DPO whose labels are each assumed flipped with probability eps = `label_smoothing`.

        L = -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h),   0 < eps < 0.5

    Same as `loss=dpo loss.label_smoothing=eps`; this name insists on eps > 0.
    """

    name = "cdpo"

    def __init__(self, beta: float, label_smoothing: float = 0.1, reference_free: bool = False):
        super().__init__(beta, label_smoothing, reference_free)
        if self.label_smoothing == 0:
            raise ConfigError("loss.label_smoothing must be above 0 for loss=cdpo (e.g. 0.1); use loss=dpo for eps = 0")


@register_loss
class IPOLoss(_PairwiseLoss):
    """Identity Preference Optimization (Azar et al. 2023, "A General Theoretical Paradigm to
    Understand Learning from Human Preferences", Eq. 17), on summed log-probs as in the reference.

        h = [log pi(y_w|x) - log pi_ref(y_w|x)] - [log pi(y_l|x) - log pi_ref(y_l|x)]
        L = (h - 1/(2 beta))^2

    beta plays the role of the paper's regularisation tau. `reference_free` drops pi_ref.
    """

    name = "ipo"

    def forward(self, policy: SequenceLogps, reference: Optional[SequenceLogps] = None) -> LossOutput:
        logits, chosen_rewards, rejected_rewards = self.logits_and_rewards(policy, reference)
        losses = (logits - 1 / (2 * self.beta)) ** 2
        return losses, chosen_rewards, rejected_rewards
