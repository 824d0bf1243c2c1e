"""DistilBERT (Sanh et al. 2019) objective for task distillation: soft KD + CE + hidden cosine."""
from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F

from trainer.losses.common import (ce_rows, gold_labels, kl_rows, project, require, scalar, teacher_depth,
                                   teacher_layer, token_mask)
from trainer.losses.registry import register


@dataclass
class DistilBERTParams:
    w_soft: float = 5.0  # DistilBERT's alpha_ce (soft-target term)
    w_ce: float = 2.0  # in place of its alpha_mlm (the hard-label task term)
    w_cos: float = 1.0  # alpha_cos
    t: float = 2.0
    pseudo_label: bool = False

    def __post_init__(self):
        if self.t <= 0:
            raise ValueError(f"temperature t must be > 0, got {self.t}")
        if min(self.w_soft, self.w_ce, self.w_cos) < 0:
            raise ValueError("DistilBERT weights must be >= 0")


@register("distilbert", params=DistilBERTParams, fields=("logits", "hidden"), student_needs=("hidden",),
          needs_labels=True, token_level=True)
def distilbert(out, batch, p: DistilBERTParams, state):
    """mean_rows[w_soft·t²·KL + w_ce·CE] + w_cos·mean_valid_tokens[1 − cos(h_S^k, h_T^N)]."""
    name = "distilbert"
    z_t = batch["teacher_logits"]
    y = gold_labels(batch, z_t, p.pseudo_label)
    kl, ce = kl_rows(out.logits, z_t, p.t), ce_rows(out.logits, y)
    rows = (p.w_soft * p.t ** 2 * kl + p.w_ce * ce).mean()
    cos = out.logits.sum() * 0.0
    if p.w_cos:
        mask = token_mask(out, batch, name)
        hidden = require(out, "hidden", name)
        t = teacher_layer(batch, "hidden", teacher_depth(batch), name)
        s = project(out, ("cos", f"hid_{len(hidden) - 1}", "hid"), hidden[-1], t.shape[-1], name)
        cos = (1 - F.cosine_similarity(s[mask], t[mask], dim=-1)).mean()
    loss = rows + p.w_cos * cos
    return loss, scalar(loss=loss, kl=kl.mean(), ce=ce.mean(), cos=cos)
