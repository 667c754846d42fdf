"""Preference losses: pure functions of sequence log-probs (DPO family, SimPO, ORPO, KTO).

Inputs are per-sequence sums of completion-token log-probs under the policy (`chosen`,
`rejected`) and the reference (`ref_chosen`, `ref_rejected`), and the completion lengths
in tokens. Each pairwise loss returns per-pair losses and the implicit rewards that TRL
logs (`rewards/chosen`, `rewards/rejected`); the stage reduces them over the global batch.
With d = (chosen - ref_chosen) - (rejected - ref_rejected):

* `sigmoid` (DPO, Rafailov et al., arXiv:2305.18290): -log sigmoid(beta d). With
  `label_smoothing` e > 0 it is conservative DPO (cDPO): -(1-e) log s(beta d) - e log s(-beta d).
* `robust` (Chowdhury et al., arXiv:2403.00409): the unbiased estimate under label noise e,
  ((1-e)(-log s(beta d)) + e log s(-beta d)) / (1 - 2e).
* `hinge` (SLiC, arXiv:2305.10425): max(0, 1 - beta d).
* `ipo` (Azar et al., arXiv:2310.12036, Eq. 17): (d_avg - 1/(2 beta))^2, with each log-ratio
  divided by its completion length (TRL's normalisation, confirmed by the IPO authors).
* `simpo` (Meng et al., arXiv:2405.14734): reference-free, on mean token log-probs:
  -log s(beta (avg_chosen - avg_rejected) - gamma), with cDPO-style label smoothing.
* `orpo` (Hong et al., arXiv:2403.07691): reference-free; NLL on the chosen completion plus
  -beta log s(log odds(chosen) - log odds(rejected)), odds from mean token log-probs.
* `kto` (Ethayarajh et al., arXiv:2402.01306, Eq. 7): unpaired; a desirable completion costs
  1 - s(beta (logratio - z0)), an undesirable one 1 - s(beta (z0 - logratio)), with z0 the
  detached KL estimate max(0, mean(logratio of mismatched prompt/completion pairs)).

Deviations, on purpose:
* The NLL term (ORPO's, and `sft_weight` for the others, RPO-style, arXiv:2404.19733) is
  the mean over chosen *completion* tokens of the global batch, as the ORPO paper writes it;
  TRL's ORPOTrainer also counts the prompt tokens. TRL averages per micro-batch.
* TRL 1.16's DPO `sigmoid` ignores `label_smoothing`; here it gives cDPO (TRL's CPO and its
  older DPO did the same), and the remaining losses refuse a smoothing they do not use.

`PreferenceLoss.is_reference_free` is the one property the stage asks to decide whether a
reference policy is built at all (torchtune's `PreferenceLoss` seam).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

Tensor = torch.Tensor
PairOut = tuple[Tensor, Tensor, Tensor]
"""(per-pair loss [B], chosen reward [B], rejected reward [B]); rewards are detached."""


@dataclass(frozen=True)
class PairBatch:
    """Sequence log-probs of B pairs (policy and reference sums, completion lengths)."""

    chosen: Tensor
    rejected: Tensor
    chosen_len: Tensor
    rejected_len: Tensor
    ref_chosen: Tensor | None = None
    ref_rejected: Tensor | None = None

    def margin(self) -> Tensor:
        """d = (chosen - ref_chosen) - (rejected - ref_rejected)."""
        return (self.chosen - self.ref_chosen) - (self.rejected - self.ref_rejected)

    def avg(self) -> tuple[Tensor, Tensor]:
        """Mean token log-probs of chosen and rejected (length 0 counts as 1)."""
        return self.chosen / self.chosen_len.clamp(min=1), self.rejected / self.rejected_len.clamp(min=1)

    def dpo_rewards(self, beta: float) -> tuple[Tensor, Tensor]:
        return (
            (beta * (self.chosen - self.ref_chosen)).detach(),
            (beta * (self.rejected - self.ref_rejected)).detach(),
        )


def smoothed_sigmoid(z: Tensor, label_smoothing: float) -> Tensor:
    """-(1-e) log s(z) - e log s(-z): the logistic loss with labels flipped with probability e."""
    return -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)


def sigmoid_loss(b: PairBatch, beta: float, label_smoothing: float = 0.0, gamma: float = 0.0) -> PairOut:
    return (smoothed_sigmoid(beta * b.margin(), label_smoothing), *b.dpo_rewards(beta))


def robust_loss(b: PairBatch, beta: float, label_smoothing: float = 0.0, gamma: float = 0.0) -> PairOut:
    z, e = beta * b.margin(), label_smoothing
    losses = (-(1 - e) * F.logsigmoid(z) + e * F.logsigmoid(-z)) / (1 - 2 * e)
    return (losses, *b.dpo_rewards(beta))


def hinge_loss(b: PairBatch, beta: float, label_smoothing: float = 0.0, gamma: float = 0.0) -> PairOut:
    return (torch.relu(1 - beta * b.margin()), *b.dpo_rewards(beta))


def ipo_loss(b: PairBatch, beta: float, label_smoothing: float = 0.0, gamma: float = 0.0) -> PairOut:
    chosen = (b.chosen - b.ref_chosen) / b.chosen_len.clamp(min=1)
    rejected = (b.rejected - b.ref_rejected) / b.rejected_len.clamp(min=1)
    return ((chosen - rejected - 1 / (2 * beta)) ** 2, *b.dpo_rewards(beta))


def simpo_loss(b: PairBatch, beta: float, label_smoothing: float = 0.0, gamma: float = 0.0) -> PairOut:
    chosen, rejected = b.avg()
    losses = smoothed_sigmoid(beta * (chosen - rejected) - gamma, label_smoothing)
    return losses, (beta * chosen).detach(), (beta * rejected).detach()


def log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x < 0, accurate on both sides of -log 2 (Maechler, 2012); torch has
    no such op."""
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def orpo_loss(b: PairBatch, beta: float, label_smoothing: float = 0.0, gamma: float = 0.0) -> PairOut:
    """The odds-ratio term only; the stage adds ORPO's NLL (`PreferenceLoss.nll_weight`)."""
    chosen, rejected = (t.float() for t in b.avg())
    log_odds = (chosen - rejected) - (log1mexp(chosen) - log1mexp(rejected))
    return -beta * F.logsigmoid(log_odds), (beta * chosen).detach(), (beta * rejected).detach()


@dataclass(frozen=True)
class PreferenceLoss:
    """A pairwise preference objective and what the stage must give it."""

    name: str
    fn: Callable[..., PairOut]
    is_reference_free: bool = False
    """No reference policy: the stage builds none and ships no reference log-probs."""
    length_normalized: bool = False
    """Uses mean token log-probs (SimPO, ORPO): `logps/*` metrics are means, not sums."""
    uses_label_smoothing: bool = False
    nll_weight: float = 0.0
    """Weight of the chosen-completion NLL the objective itself contains (ORPO: 1)."""

    def __call__(self, b: PairBatch, beta: float, label_smoothing: float = 0.0, gamma: float = 0.0) -> PairOut:
        return self.fn(b, beta, label_smoothing, gamma)


PREFERENCE_LOSSES: dict[str, PreferenceLoss] = {
    "sigmoid": PreferenceLoss("sigmoid", sigmoid_loss, uses_label_smoothing=True),
    "ipo": PreferenceLoss("ipo", ipo_loss),
    "hinge": PreferenceLoss("hinge", hinge_loss),
    "robust": PreferenceLoss("robust", robust_loss, uses_label_smoothing=True),
    "simpo": PreferenceLoss(
        "simpo", simpo_loss, is_reference_free=True, length_normalized=True, uses_label_smoothing=True
    ),
    "orpo": PreferenceLoss("orpo", orpo_loss, is_reference_free=True, length_normalized=True, nll_weight=1.0),
}


def kto_kl(kl_logps: Tensor, ref_kl_logps: Tensor) -> Tensor:
    """KTO's reference point z0: max(0, mean log-ratio of mismatched pairs), detached."""
    return (kl_logps - ref_kl_logps).mean().clamp(min=0).detach()


def kto_loss(
    logps: Tensor,
    ref_logps: Tensor,
    desirable: Tensor,
    kl: Tensor | float,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """Per-example KTO losses [N] (weighted) and rewards beta * logratio [N] (detached);
    `desirable` is a bool mask [N]."""
    logratio = logps - ref_logps
    good = desirable_weight * (1 - torch.sigmoid(beta * (logratio - kl)))
    bad = undesirable_weight * (1 - torch.sigmoid(beta * (kl - logratio)))
    return torch.where(desirable, good, bad), (beta * logratio).detach()


def sequence_logps(token_logps: Tensor, labels: Tensor, ignore_index: int = -100) -> tuple[Tensor, Tensor]:
    """Per-row sums of the log-probs of the target tokens (`labels[:, 1:] != ignore_index`) and
    their counts: token_logps [N, L-1] (position t predicts token t+1), labels [N, L]."""
    mask = labels[:, 1:] != ignore_index
    return (token_logps * mask).sum(-1), mask.sum(-1)
