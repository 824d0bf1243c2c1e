"""Logit-only losses: plain CE, Hinton KD, Tang et al. 2019 logit regression (MSE)."""
from __future__ import annotations

from dataclasses import dataclass

from trainer.losses.common import IGNORE, ce_mean, ce_rows, gold_labels, kl_rows, scalar
from trainer.losses.registry import register


def check_alpha_t(p) -> None:
    if not 0.0 <= p.alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {p.alpha}")
    if getattr(p, "t", 1.0) <= 0:
        raise ValueError(f"temperature t must be > 0, got {p.t}")


@dataclass
class CEParams:
    pass


@register("ce", params=CEParams, fields=(), needs_labels=True)
def ce(out, batch, p: CEParams, state):
    """Cross-entropy on gold labels, mean over labelled rows; 0 (still differentiable) if none."""
    y = gold_labels(batch)
    n = (y != IGNORE).sum()
    loss = ce_rows(out.logits, y).sum() / n.clamp(min=1)
    return loss, scalar(loss=loss, ce=loss, labelled=n)


@dataclass
class HintonParams:
    alpha: float = 0.5  # weight of the soft term
    t: float = 2.0
    pseudo_label: bool = False  # rows without a gold label get y = argmax z_T
    ce_over: str = "batch"  # batch: CE mean over all rows (unlabelled rows 0) | labelled: over labelled rows

    def __post_init__(self):
        check_alpha_t(self)


@register("hinton", params=HintonParams, fields=("logits",), needs_labels=True)
def hinton(out, batch, p: HintonParams, state):
    """α·t²·mean_rows KL(σ(z_T/t)‖σ(z_S/t)) + (1−α)·CE, CE averaged as `ce_over` says."""
    z_t = batch["teacher_logits"]
    y = gold_labels(batch, z_t, p.pseudo_label)
    kl, ce_ = kl_rows(out.logits, z_t, p.t).mean(), ce_mean(ce_rows(out.logits, y), y, p.ce_over)
    loss = p.alpha * p.t ** 2 * kl + (1 - p.alpha) * ce_
    return loss, scalar(loss=loss, kl=kl, ce=ce_)


@dataclass
class TangMSEParams:
    alpha: float = 0.5  # weight of CE; (1−α) on the logit MSE
    pseudo_label: bool = False
    class_mean: bool = False  # False: ‖z_T − z_S‖² summed over K (the formula); True: mean over K
    ce_over: str = "batch"  # batch: CE mean over all rows (unlabelled rows 0) | labelled: over labelled rows

    def __post_init__(self):
        check_alpha_t(self)


@register("tang_mse", params=TangMSEParams, fields=("logits",), needs_labels=True)
def tang_mse(out, batch, p: TangMSEParams, state):
    """α·CE + (1−α)·mean_rows ‖z_T − z_S‖² on raw logits, CE averaged as `ce_over` says."""
    z_t = batch["teacher_logits"]
    y = gold_labels(batch, z_t, p.pseudo_label)
    sq = (out.logits - z_t) ** 2
    mse = (sq.mean(-1) if p.class_mean else sq.sum(-1)).mean()
    ce_ = ce_mean(ce_rows(out.logits, y), y, p.ce_over)
    loss = p.alpha * ce_ + (1 - p.alpha) * mse
    return loss, scalar(loss=loss, mse=mse, ce=ce_)
