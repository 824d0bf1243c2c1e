"""MiniLM (Wang et al. 2020): last-layer self-attention distribution + value-relation transfer."""
from __future__ import annotations

import math
from dataclasses import dataclass

from torch import Tensor

from trainer.losses.common import (ce_rows, fail, gold_labels, kl_rows, relation_kl_rows, require, scalar,
                                   teacher_depth, teacher_layer, token_mask)
from trainer.losses.registry import register


@dataclass
class MiniLMParams:
    w_at: float = 1.0  # attention-distribution transfer
    w_vr: float = 1.0  # value-relation transfer
    w_soft: float = 0.0  # optional α·t²·KL on logits
    w_ce: float = 0.0  # optional CE on gold labels
    t: float = 1.0
    relation_heads: int | None = None  # split values into this many relation heads (default: attention heads)

    def __post_init__(self):
        if self.t <= 0:
            raise ValueError(f"temperature t must be > 0, got {self.t}")
        if self.relation_heads is not None and self.relation_heads < 1:
            raise ValueError(f"relation_heads must be >= 1, got {self.relation_heads}")


def value_relation(v: Tensor, heads: int, loss: str, who: str) -> Tensor:
    """(B, L, d) -> (B, R, L, L) scaled dot products V_r·V_rᵀ/√(d/R) (pre-softmax)."""
    b, n, d = v.shape
    if d % heads:
        fail(loss, f"{who} value width {d} is not divisible by {heads} relation heads")
    vh = v.reshape(b, n, heads, d // heads).transpose(1, 2)
    return vh @ vh.transpose(-1, -2) / math.sqrt(d // heads)


@register("minilm", params=MiniLMParams, fields=("logits", "attention", "values"),
          student_needs=("attention", "values"), needs_labels=True, token_level=True)
def minilm(out, batch, p: MiniLMParams, state):
    """mean_rows[w_at·AT + w_vr·VR + w_soft·t²·KL + w_ce·CE], AT/VR = (1/(h·L_b))·Σ KL(T ‖ S)."""
    name = "minilm"
    mask = token_mask(out, batch, name)
    atts = require(out, "attention", name)
    a_s = atts[max(atts)]
    a_t = teacher_layer(batch, "attention", teacher_depth(batch), name)
    if a_s.shape[1] != a_t.shape[1]:
        fail(name, f"attention transfer needs equal head counts (student {a_s.shape[1]}, teacher {a_t.shape[1]})")
    at = relation_kl_rows(a_s, a_t, mask)
    zero = out.logits[:, 0] * 0.0  # keeps the classifier in the graph (DDP) when no logit term is on
    rows = p.w_at * at + zero
    vr = zero
    if p.w_vr:
        v_s = require(out, "values", name)
        r = p.relation_heads or a_t.shape[1]
        vr = relation_kl_rows(value_relation(v_s, r, name, "student"),
                              value_relation(batch["teacher_values"], r, name, "teacher"), mask)
        rows = rows + p.w_vr * vr
    kl = ce = zero
    if p.w_soft:
        kl = kl_rows(out.logits, batch["teacher_logits"], p.t)
        rows = rows + p.w_soft * p.t ** 2 * kl
    if p.w_ce:
        ce = ce_rows(out.logits, gold_labels(batch))
        rows = rows + p.w_ce * ce
    loss = rows.mean()
    return loss, scalar(loss=loss, at=at.mean(), vr=vr.mean(), kl=kl.mean(), ce=ce.mean())
