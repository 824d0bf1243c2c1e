"""TinyBERT (Jiao et al. 2020): intermediate-layer loss, prediction loss, two-stage schedule."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from trainer.losses.common import (check_map, fail, masked_sum_sq, project, require, scalar, soft_ce_rows,
                                   teacher_depth, teacher_layer, token_mask, uniform_map)
from trainer.losses.registry import register

CLIP = -1e2  # official code: scores <= -1e2 (i.e. masked by the additive −1e4) are set to 0


@dataclass
class TinyBERTIntermediateParams:
    w_emb: float = 1.0
    w_hid: float = 1.0
    w_att: float = 1.0
    layer_map: list[list[int]] | None = None  # [[student, teacher], ...] for layers >= 1; default i -> i·N/M
    official_clip: bool = False  # zero scores <= -1e2 (student and teacher) before the attention MSE
    normalise: str = "ragged"  # "ragged": mean over valid elements | "padded128": sum / padded size
    pad_length: int = 128  # the padded length of "padded128" (official max_seq_length)

    def __post_init__(self):
        if self.normalise not in ("ragged", "padded128"):
            raise ValueError(f"normalise must be 'ragged' or 'padded128', got {self.normalise!r}")
        if self.pad_length < 1:
            raise ValueError(f"pad_length must be >= 1, got {self.pad_length}")


def _denominator(p, mask: Tensor, per_position: int, pairs: bool) -> Tensor:
    """Elements the MSE is averaged over: valid ones (ragged) or the padded-to-128 tensor's."""
    b = mask.shape[0]
    if p.normalise == "padded128":
        if mask.shape[1] > p.pad_length:
            raise ValueError(f"normalise='padded128': batch length {mask.shape[1]} > pad_length {p.pad_length}")
        return torch.tensor(float(b * per_position * p.pad_length ** (2 if pairs else 1)), device=mask.device)
    n = mask.sum(1).to(torch.float32)
    return ((n * n).sum() if pairs else n.sum()).clamp(min=1) * per_position


def hidden_term(out, batch, p, i: int, m: int, mask: Tensor, keys: tuple[str, ...], loss: str) -> Tensor:
    t = teacher_layer(batch, "hidden", m, loss)
    s = project(out, keys, out.hidden_states[i], t.shape[-1], loss)
    return masked_sum_sq(s, t, mask) / _denominator(p, mask, t.shape[-1], pairs=False)


def attention_term(out, batch, p, i: int, m: int, mask: Tensor, loss: str) -> Tensor:
    """(1/h)·Σ_heads MSE(A_S^i, A_T^m) over the valid×valid block of pre-softmax scores."""
    s, t = out.attentions[i], teacher_layer(batch, "attention", m, loss)
    if s.shape[1] != t.shape[1]:
        fail(loss, f"student layer {i} has {s.shape[1]} heads, teacher layer {m} has {t.shape[1]}: "
                   "attention MSE needs equal head counts")
    if p.official_clip:  # on the valid block the additive mask is 0, so "mask then clip" = clip
        s = torch.where(s <= CLIP, torch.zeros_like(s), s)
        t = torch.where(t <= CLIP, torch.zeros_like(t), t)
    pair = (mask[:, :, None] & mask[:, None, :])[:, None]  # (B, 1, L, L)
    return masked_sum_sq(s, t, pair) / _denominator(p, mask, s.shape[1], pairs=True)


def tinybert_pairs(p, k: int, n: int, loss: str) -> list[tuple[int, int]]:
    return check_map(p.layer_map, k, n, loss, lowest=1) if p.layer_map else uniform_map(k, n)


@register("tinybert_intermediate", params=TinyBERTIntermediateParams, fields=("hidden", "attention"),
          student_needs=("hidden", "attention"), token_level=True)
def tinybert_intermediate(out, batch, p: TinyBERTIntermediateParams, state):
    """w_emb·MSE(E_S W_e, E_T) + Σ_i [w_hid·MSE(H_S^i W_h, H_T^{m(i)}) + w_att·(1/h)Σ_h MSE(A_S^i, A_T^{m(i)})]."""
    name = "tinybert_intermediate"
    mask = token_mask(out, batch, name)
    hidden = require(out, "hidden", name)
    k, n = len(hidden) - 1, teacher_depth(batch)
    pairs = tinybert_pairs(p, k, n, name)
    zero = out.logits.sum() * 0.0
    emb = hidden_term(out, batch, p, 0, 0, mask, ("emb", "hid"), name) if p.w_emb else zero
    hid = sum((hidden_term(out, batch, p, i, m, mask, (f"hid_{i}", "hid"), name) for i, m in pairs), zero) \
        if p.w_hid else zero
    att = zero
    if p.w_att:
        atts = require(out, "attention", name)
        missing = [i for i, _ in pairs if i not in atts]
        if missing:
            fail(name, f"student returned no attention scores for layers {missing}")
        att = sum((attention_term(out, batch, p, i, m, mask, name) for i, m in pairs), zero)
    loss = p.w_emb * emb + p.w_hid * hid + p.w_att * att
    return loss, scalar(loss=loss, emb=emb, hid=hid, att=att)


@dataclass
class TinyBERTPredParams:
    t: float = 1.0

    def __post_init__(self):
        if self.t <= 0:
            raise ValueError(f"temperature t must be > 0, got {self.t}")


@register("tinybert_pred", params=TinyBERTPredParams, fields=("logits",))
def tinybert_pred(out, batch, p: TinyBERTPredParams, state):
    """mean_rows[ −Σ σ(z_T/t)·log σ(z_S/t) ] (soft cross-entropy; no gold labels)."""
    loss = soft_ce_rows(out.logits, batch["teacher_logits"], p.t).mean()
    return loss, scalar(loss=loss, soft_ce=loss)


@dataclass
class DistillStage:
    """One training stage of a run: a loss with its own optimiser and learning rate."""

    loss: str
    epochs: int
    lr: float = 0.0  # 0: the student's default_lr (BiLSTM 2e-3, TextCNN 1e-3, small-BERT 1e-4), as RunSpec.lr
    params: dict = field(default_factory=dict)  # the loss's parameters (a one-stage run adds the run's loss_params)


@dataclass
class TinyBERTSchedule:
    """Task distillation: stage 1 intermediate layers, then stage 2 prediction layer."""

    stage1: DistillStage = field(default_factory=lambda: DistillStage("tinybert_intermediate", 10, 5e-5))
    stage2: DistillStage = field(default_factory=lambda: DistillStage("tinybert_pred", 3, 3e-5))

    def stages(self) -> list[DistillStage]:
        return [self.stage1, self.stage2]
