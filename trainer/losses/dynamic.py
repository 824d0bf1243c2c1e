"""Dynamic KD (Li et al. 2021): teacher adjustment, data selection, supervision adjustment.

Student uncertainty u = Entropy(σ(z_S)) / log K ∈ [0, 1], computed without gradient.
Teachers: T2 (strong) = the primary cache, batch["teacher_logits"]/["teacher_cls"];
          T1 (weak)   = the second cache joined by row id, batch["teacher2_logits"].
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from trainer.losses.common import ce_rows, gold_labels, kd_rows, kl_rows, scalar, uncertainty
from trainer.losses.logit import check_alpha_t
from trainer.losses.pkd import patient_rows, resolve_pkd_map
from trainer.losses.registry import register


def hard_split(u: Tensor) -> Tensor:
    """(B,) bool, True for the floor(B/2) most uncertain rows (ties: lower row index first)."""
    order = torch.argsort(u, descending=True, stable=True)
    sel = torch.zeros(u.shape, dtype=torch.bool, device=u.device)
    sel[order[: u.numel() // 2]] = True
    return sel


def top_fraction(u: Tensor, ratio: float) -> Tensor:
    """(B,) bool, True for the ceil(ratio·B) (>= 1) most uncertain rows (ties: lower index first)."""
    n = max(1, math.ceil(ratio * u.numel()))
    sel = torch.zeros(u.shape, dtype=torch.bool, device=u.device)
    sel[torch.argsort(u, descending=True, stable=True)[:n]] = True
    return sel


@dataclass
class DynaKDTeacherParams:
    mode: str = "hard"  # "hard": uncertain half <- T1, confident half <- T2 | "soft": u-weighted mix
    alpha: float = 0.5  # Hinton row loss α·t²·KL + (1−α)·CE against each teacher
    t: float = 2.0
    pseudo_label: bool = False

    def __post_init__(self):
        check_alpha_t(self)
        if self.mode not in ("hard", "soft"):
            raise ValueError(f"mode must be 'hard' or 'soft', got {self.mode!r}")


@register("dynakd_teacher", params=DynaKDTeacherParams, fields=("logits",), needs_labels=True,
          second_teacher=True)
def dynakd_teacher(out, batch, p: DynaKDTeacherParams, state):
    """hard: mean_rows[KD^{T1} if row in the uncertain half else KD^{T2}];
    soft: mean_rows[(u/U)·KD^{T1} + (1 − u/U)·KD^{T2}]."""
    z1, z2 = batch["teacher2_logits"], batch["teacher_logits"]
    kd1 = kd_rows(out.logits, z1, gold_labels(batch, z1, p.pseudo_label), p.alpha, p.t)
    kd2 = kd_rows(out.logits, z2, gold_labels(batch, z2, p.pseudo_label), p.alpha, p.t)
    u = uncertainty(out.logits)
    if p.mode == "hard":
        to_t1 = hard_split(u)
        loss = torch.where(to_t1, kd1, kd2).mean()
        w1 = to_t1.float()
    else:
        w1 = u
        loss = (u * kd1 + (1 - u) * kd2).mean()
    return loss, scalar(loss=loss, kd_t1=kd1.mean(), kd_t2=kd2.mean(), u=u.mean(), t1_weight=w1.mean())


@dataclass
class DynaKDDataParams:
    ratio: float = 0.5  # fraction of each batch (most uncertain) kept for the KD term
    alpha: float = 0.5  # α on the KD term, (1−α) on CE
    t: float = 2.0
    ce_on_all: bool = True  # CE over all labelled rows (False: only the selected ones)

    def __post_init__(self):
        check_alpha_t(self)
        if not 0.0 < self.ratio <= 1.0:
            raise ValueError(f"ratio must be in (0, 1], got {self.ratio}")


@register("dynakd_data", params=DynaKDDataParams, fields=("logits",), needs_labels=True)
def dynakd_data(out, batch, p: DynaKDDataParams, state):
    """α·mean_{S}[t²·KL] + (1−α)·mean_{C}[CE], S = top-r rows by u, C = all rows (or S)."""
    keep = top_fraction(uncertainty(out.logits), p.ratio)
    kl = kl_rows(out.logits, batch["teacher_logits"], p.t)
    ce = ce_rows(out.logits, gold_labels(batch))
    kd_term = (p.t ** 2 * kl)[keep].mean()
    ce_term = ce.mean() if p.ce_on_all else ce[keep].mean()
    loss = p.alpha * kd_term + (1 - p.alpha) * ce_term
    return loss, scalar(loss=loss, kd=kd_term, ce=ce_term, kept=keep.sum())


@dataclass
class DynaKDSupervisionParams:
    lambda_pred: float = 1.0
    lambda_hid: float = 100.0  # PKD's β, so the patient term keeps its PKD scale
    alpha: float = 0.5  # L_pred = Hinton row loss α·t²·KL + (1−α)·CE
    t: float = 2.0
    mode: str = "skip"  # PKD layer map of L_hidden: "skip" | "last"
    layer_map: list[list[int]] | None = None
    pseudo_label: bool = False

    def __post_init__(self):
        check_alpha_t(self)
        if self.mode not in ("skip", "last"):
            raise ValueError(f"mode must be 'skip' or 'last', got {self.mode!r}")


@register("dynakd_supervision", params=DynaKDSupervisionParams, fields=("logits", "cls"),
          student_needs=("hidden",), needs_labels=True)
def dynakd_supervision(out, batch, p: DynaKDSupervisionParams, state):
    """mean_rows[λ_pred·(1 − u/U)·L_pred + λ_hid·(u/U)·L_hidden], L_hidden = PKD patient loss."""
    name = "dynakd_supervision"
    z_t = batch["teacher_logits"]
    pred = kd_rows(out.logits, z_t, gold_labels(batch, z_t, p.pseudo_label), p.alpha, p.t)
    hid = patient_rows(out, batch, resolve_pkd_map(p, out, batch, name), name)
    u = uncertainty(out.logits)
    loss = (p.lambda_pred * (1 - u) * pred + p.lambda_hid * u * hid).mean()
    return loss, scalar(loss=loss, pred=pred.mean(), hidden=hid.mean(), u=u.mean())
