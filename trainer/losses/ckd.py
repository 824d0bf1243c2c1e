"""Contextual KD (Park et al. 2021): word relations (WR) and layer-transforming relations (LTR).

Relations are read off Gram matrices computed in float32 (autocast off): one O(n²·d) product
per set, then O(1) per pair/angle; they are width-free, so student/teacher widths may differ:
  pair   φ(r_i, r_j): cosine, or L2 distance divided by the mean valid distance of its set;
  angle  ψ(r_i, r_j, r_k) = ⟨r_i−r_j, r_k−r_j⟩ / (‖r_i−r_j‖·‖r_k−r_j‖).
WR: among the tokens of one layer (angles only for i, k within `window` tokens of the centre
j, so O(L·w²)). LTR: among the mapped layers of one token. Default layer map: student
layer i -> teacher layer i·N/k for i = 0..k (embeddings included, so a 2-layer student has
the 3 layers an LTR angle needs).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from trainer.losses.common import (check_map, fail, gold_labels, kd_rows, require, scalar, teacher_depth,
                                   teacher_layer, token_mask, uniform_map)
from trainer.losses.logit import check_alpha_t
from trainer.losses.registry import register

EPS = 1e-12


def gram(r: Tensor) -> Tensor:
    with torch.autocast(device_type=r.device.type, enabled=False):
        r = r.float()
        return r @ r.transpose(-1, -2)


def _dist(g: Tensor, i, j) -> Tensor:
    gi, gj = g.diagonal(dim1=-2, dim2=-1)[..., i], g.diagonal(dim1=-2, dim2=-1)[..., j]
    return (gi + gj - 2 * g[..., i, j]).clamp(min=EPS).sqrt()


def pair_relation(r: Tensor, valid: Tensor, kind: str) -> Tensor:
    """(..., n, d) -> (..., n, n) φ; `valid` (..., n, n) marks the pairs of the set (for L2 scaling)."""
    if kind == "cos":
        return gram(F.normalize(r.float(), dim=-1))
    n = r.shape[-2]
    idx = torch.arange(n, device=r.device)
    d = _dist(gram(r), idx[:, None], idx[None, :])
    v = valid.to(d.dtype)
    scale = (d * v).sum((-1, -2), keepdim=True) / v.sum((-1, -2), keepdim=True).clamp(min=1)
    return d / scale.clamp(min=EPS)


def angle_relation(r: Tensor, i: Tensor, j: Tensor, k: Tensor) -> Tensor:
    """(..., n, d) and index vectors (T,) -> (..., T) ψ(r_i, r_j, r_k) (angle at r_j)."""
    g = gram(r)
    dj = g.diagonal(dim1=-2, dim2=-1)[..., j]
    num = g[..., i, k] - g[..., i, j] - g[..., j, k] + dj
    return num / (_dist(g, i, j) * _dist(g, k, j))


def mismatch(s: Tensor, t: Tensor, valid: Tensor, kind: str) -> Tensor:
    """Mean Huber (smooth L1, β = 1) or squared error over the valid relation entries."""
    s, t = torch.where(valid, s, 0.0), torch.where(valid, t, 0.0)  # padding entries never reach the loss
    e = F.smooth_l1_loss(s, t, reduction="none") if kind == "huber" else (s - t) ** 2
    v = valid.to(e.dtype)
    return (e * v).sum() / v.sum().clamp(min=1)


def window_triples(n: int, w: int, device) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(i, j, k, in_bounds) for centres j and distinct offsets a ≠ c in [−w, w] \\ {0}."""
    offs = [o for o in range(-w, w + 1) if o]
    pairs = [(a, c) for a in offs for c in offs if a != c]
    j = torch.arange(n, device=device).repeat_interleave(len(pairs))
    a = torch.tensor([p[0] for p in pairs], device=device).repeat(n)
    c = torch.tensor([p[1] for p in pairs], device=device).repeat(n)
    i, k = j + a, j + c
    ok = (i >= 0) & (i < n) & (k >= 0) & (k < n)
    return i.clamp(0, n - 1), j, k.clamp(0, n - 1), ok


def distinct_triples(n: int, device) -> tuple[Tensor, Tensor, Tensor]:
    t = torch.tensor(list(itertools.permutations(range(n), 3)), dtype=torch.long, device=device).reshape(-1, 3)
    return t[:, 0], t[:, 1], t[:, 2]


def word_relations(s: Tensor, t: Tensor, mask: Tensor, p) -> tuple[Tensor, Tensor]:
    """WR distance and angle mismatch of one layer pair, s (B, L, d_S), t (B, L, d_T)."""
    n = mask.shape[1]
    eye = torch.eye(n, dtype=torch.bool, device=mask.device)
    pv = mask[:, :, None] & mask[:, None, :] & ~eye
    wr_d = mismatch(pair_relation(s, pv, p.distance), pair_relation(t, pv, p.distance), pv, p.mismatch)
    i, j, k, ok = window_triples(n, p.window, mask.device)
    av = mask[:, i] & mask[:, j] & mask[:, k] & ok
    wr_a = mismatch(angle_relation(s, i, j, k), angle_relation(t, i, j, k), av, p.mismatch)
    return wr_d, wr_a


def layer_relations(s: Tensor, t: Tensor, mask: Tensor, p) -> tuple[Tensor, Tensor]:
    """LTR over stacked layers s (B, L, n, d_S), t (B, L, n, d_T) of each valid token."""
    n = s.shape[2]
    eye = torch.eye(n, dtype=torch.bool, device=mask.device)
    pv = mask[:, :, None, None] & ~eye
    ltr_d = mismatch(pair_relation(s, pv, p.distance), pair_relation(t, pv, p.distance), pv, p.mismatch)
    i, j, k = distinct_triples(n, mask.device)
    av = mask[:, :, None].expand(-1, -1, len(i))
    ltr_a = mismatch(angle_relation(s, i, j, k), angle_relation(t, i, j, k), av, p.mismatch)
    return ltr_d, ltr_a


@dataclass
class CKDParams:
    alpha: float = 0.9  # (1−α)·L_logit + α·relations
    t: float = 3.0
    logit_alpha: float = 0.5  # L_logit = Hinton row loss with this soft weight
    w_wr_d: float = 1.0
    w_wr_a: float = 16.0
    w_ltr_d: float = 128.0
    w_ltr_a: float = 64.0
    distance: str = "cos"  # pair relation φ: "cos" | "l2" (normalised by the mean distance)
    mismatch: str = "huber"  # "huber" (smooth L1, β = 1) | "mse"
    window: int = 3  # WR angles: i, k within this many tokens of the centre j
    layer_map: list[list[int]] | None = None  # [[student, teacher], ...]; default i -> i·N/k, i = 0..k
    pseudo_label: bool = False

    def __post_init__(self):
        check_alpha_t(self)
        if not 0.0 <= self.logit_alpha <= 1.0:
            raise ValueError(f"logit_alpha must be in [0, 1], got {self.logit_alpha}")
        if self.distance not in ("cos", "l2"):
            raise ValueError(f"distance must be 'cos' or 'l2', got {self.distance!r}")
        if self.mismatch not in ("huber", "mse"):
            raise ValueError(f"mismatch must be 'huber' or 'mse', got {self.mismatch!r}")
        if self.window < 1:
            raise ValueError(f"window must be >= 1, got {self.window}")


@register("ckd", params=CKDParams, fields=("logits", "hidden"), student_needs=("hidden",), needs_labels=True,
          token_level=True)
def ckd(out, batch, p: CKDParams, state):
    """(1−α)·mean_rows[KD+CE] + α·(w_wr_d·WR_d + w_wr_a·WR_a + w_ltr_d·LTR_d + w_ltr_a·LTR_a)."""
    name = "ckd"
    mask = token_mask(out, batch, name)
    hidden = require(out, "hidden", name)
    k, n = len(hidden) - 1, teacher_depth(batch)
    pairs = check_map(p.layer_map, k, n, name) if p.layer_map else uniform_map(k, n, start=0)
    if (p.w_ltr_a and len(pairs) < 3) or (p.w_ltr_d and len(pairs) < 2):
        fail(name, f"{len(pairs)} mapped layers: LTR needs >= 2 (distance) / >= 3 (angle); "
                   "set layer_map or w_ltr_d / w_ltr_a = 0")
    z_t = batch["teacher_logits"]
    logit = kd_rows(out.logits, z_t, gold_labels(batch, z_t, p.pseudo_label), p.logit_alpha, p.t).mean()
    s_layers = [hidden[i] for i, _ in pairs]
    t_layers = [teacher_layer(batch, "hidden", m, name) for _, m in pairs]
    wr = [word_relations(s, t, mask, p) for s, t in zip(s_layers, t_layers)]
    wr_d = torch.stack([x[0] for x in wr]).mean()
    wr_a = torch.stack([x[1] for x in wr]).mean()
    zero = logit * 0.0
    ltr_d = ltr_a = zero
    if p.w_ltr_d or p.w_ltr_a:
        ltr_d, ltr_a = layer_relations(torch.stack(s_layers, 2), torch.stack(t_layers, 2), mask, p)
    rel = p.w_wr_d * wr_d + p.w_wr_a * wr_a + p.w_ltr_d * ltr_d + p.w_ltr_a * ltr_a
    loss = (1 - p.alpha) * logit + p.alpha * rel
    return loss, scalar(loss=loss, logit=logit, wr_d=wr_d, wr_a=wr_a, ltr_d=ltr_d, ltr_a=ltr_a)
