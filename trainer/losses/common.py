"""Shared pieces of the losses: per-row logit terms, masked means, layer look-ups, checks.

Normalisation convention (docs/losses.md): row-level terms are computed per row and
averaged over ALL B rows of the batch; a term that does not apply to a row (CE on a row
without a gold label) contributes 0 for that row, the other terms keep their weights.
Token-level terms average over valid tokens (or valid token pairs) of the whole batch.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from trainer.losses.types import StudentOutput

IGNORE = -100


# ---------------------------------------------------------------- checks
def fail(loss: str, msg: str) -> None:
    raise ValueError(f"loss {loss!r}: {msg}")


def require(out: StudentOutput, what: str, loss: str):
    """out.hidden_states / out.attentions / out.values, or a one-line ValueError."""
    attr = {"hidden": "hidden_states", "attention": "attentions", "values": "values"}[what]
    value = getattr(out, attr)
    if value is None:
        fail(loss, f"the student returned no {attr} (forward it with want containing {what!r}; "
                   f"students without {what} cannot use this loss)")
    return value


def is_word_student(out: StudentOutput) -> bool:
    """Students that set `pooled` (BiLSTM, TextCNN) have word positions, not the teacher's tokens."""
    return out.pooled is not None


def token_mask(out: StudentOutput, batch: dict, loss: str) -> Tensor:
    """(B, L) bool valid tokens, shared by student and teacher; refuses unaligned students."""
    if is_word_student(out):
        fail(loss, "needs token states aligned with the teacher's tokens (a small-BERT student reading "
                   "the teacher's input_ids); word-level students (BiLSTM/TextCNN) cannot use it")
    tm = batch["teacher_mask"].bool()
    if out.mask is not None and (out.mask.shape != tm.shape or not torch.equal(out.mask.bool(), tm)):
        fail(loss, f"student mask {tuple(out.mask.shape)} differs from teacher_mask {tuple(tm.shape)}: "
                   "token positions are not aligned")
    return tm


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """(B, L, d) -> (B, d): the mean over the valid positions of `mask` (B, L); a row without any reads 0."""
    m = mask.to(x.dtype)[..., None]
    return (x * m).sum(1) / m.sum(1).clamp(min=1)


def project(out: StudentOutput, keys: tuple[str, ...], x: Tensor, d_t: int, loss: str) -> Tensor:
    """x (.., d_S) through the first of out.projections[keys] present; identity when widths match."""
    if out.projections is not None:
        for k in keys:
            if k in out.projections:
                return out.projections[k](x)
    if x.shape[-1] != d_t:
        fail(loss, f"student width {x.shape[-1]} != teacher width {d_t} and out.projections has none of "
                   f"{list(keys)} (nn.Linear(d_S, d_T))")
    return x


# ---------------------------------------------------------------- teacher layers
def layout_get(layout, key: str):
    return layout[key] if isinstance(layout, dict) else getattr(layout, key)


def teacher_depth(batch: dict, layout_key: str = "layout") -> int:
    return int(layout_get(batch[layout_key], "num_layers"))


def teacher_layer(batch: dict, field: str, layer: int, loss: str, prefix: str = "teacher",
                  layout_key: str = "layout") -> Tensor:
    """batch[f"{prefix}_{field}"][:, j] for the position j of teacher layer `layer` in the layout."""
    list_key = {"cls": "cls_layers", "hidden": "hidden_layers", "attention": "attention_layers"}[field]
    layers = [int(x) for x in layout_get(batch[layout_key], list_key)]
    if layer not in layers:
        fail(loss, f"teacher {field} layer {layer} is not in the cache (stored {list_key}: {layers})")
    return batch[f"{prefix}_{field}"][:, layers.index(layer)]


def uniform_map(k: int, n: int, start: int = 1) -> list[tuple[int, int]]:
    """Student layer i -> teacher layer floor(i·N/k), for i = start..k."""
    if k < 1 or k > n:
        raise ValueError(f"student depth {k} must be in 1..{n} (teacher depth)")
    return [(i, i * n // k) for i in range(start, k + 1)]


def check_map(pairs, k: int, n: int, loss: str, lowest: int = 0) -> list[tuple[int, int]]:
    pairs = [(int(s), int(t)) for s, t in pairs]
    bad = [(s, t) for s, t in pairs if not (lowest <= s <= k and lowest <= t <= n)]
    if bad:
        fail(loss, f"layer_map pairs {bad} outside student {lowest}..{k} / teacher {lowest}..{n}")
    return pairs


# ---------------------------------------------------------------- logits
def gold_labels(batch: dict, teacher_logits: Tensor | None = None, pseudo_label: bool = False) -> Tensor:
    """(B,) long, IGNORE where no gold label; with pseudo_label those rows get argmax z_T."""
    y = batch["labels"].long()
    if pseudo_label:
        y = torch.where(y == IGNORE, teacher_logits.argmax(-1), y)
    return y


def ce_rows(z_s: Tensor, y: Tensor) -> Tensor:
    """(B,) cross-entropy, 0 on rows with y == IGNORE."""
    return F.cross_entropy(z_s, y, ignore_index=IGNORE, reduction="none")


def ce_mean(ce: Tensor, y: Tensor, over: str) -> Tensor:
    """Mean of per-row CE over the batch ("batch": unlabelled rows count 0, so the gold signal shrinks with the
    share of augmented rows) or over its labelled rows only ("labelled": the gold weight stays α)."""
    if over == "labelled":
        return ce.sum() / (y != IGNORE).sum().clamp(min=1)
    if over != "batch":
        raise ValueError(f"ce_over must be 'labelled' or 'batch', got {over!r}")
    return ce.mean()


def kl_rows(z_s: Tensor, z_t: Tensor, t: float) -> Tensor:
    """(B,) KL(σ(z_T/t) ‖ σ(z_S/t))."""
    lt, ls = F.log_softmax(z_t / t, -1), F.log_softmax(z_s / t, -1)
    return (lt.exp() * (lt - ls)).sum(-1)


def soft_ce_rows(z_s: Tensor, z_t: Tensor, t: float) -> Tensor:
    """(B,) −Σ σ(z_T/t) log σ(z_S/t)."""
    return -(F.softmax(z_t / t, -1) * F.log_softmax(z_s / t, -1)).sum(-1)


def kd_rows(z_s: Tensor, z_t: Tensor, y: Tensor, alpha: float, t: float) -> Tensor:
    """(B,) Hinton row loss α·t²·KL + (1−α)·CE; rows without a label keep α·t²·KL only."""
    return alpha * t * t * kl_rows(z_s, z_t, t) + (1 - alpha) * ce_rows(z_s, y)


@torch.no_grad()
def uncertainty(z_s: Tensor) -> Tensor:
    """(B,) u_x/U: entropy of σ(z_S) divided by its maximum log K, in [0, 1]; no grad."""
    logp = F.log_softmax(z_s.detach().float(), -1)
    return -(logp.exp() * logp).sum(-1) / math.log(z_s.shape[-1])


# ---------------------------------------------------------------- masked reductions
def masked_sum_sq(a: Tensor, b: Tensor, mask: Tensor) -> Tensor:
    """Σ (a−b)² over positions where mask (broadcast over trailing dims of a) is True."""
    m = mask.to(a.dtype)
    while m.dim() < a.dim():
        m = m.unsqueeze(-1)
    return ((a - b) ** 2 * m).sum()


def masked_log_softmax(scores: Tensor, key_mask: Tensor) -> Tensor:
    """log_softmax over the last axis with invalid keys removed; those entries are 0 (not −inf)."""
    return F.log_softmax(scores.masked_fill(~key_mask, float("-inf")), -1).masked_fill(~key_mask, 0.0)


def relation_kl_rows(s_scores: Tensor, t_scores: Tensor, mask: Tensor) -> Tensor:
    """(B,) MiniLM-style KL(softmax(T) ‖ softmax(S)) of (B, H, L, L) scores: keys restricted to
    valid tokens, averaged over heads and valid query rows of each row: (1/(h·L_b))·Σ."""
    km = mask[:, None, None, :]
    lt, ls = masked_log_softmax(t_scores, km), masked_log_softmax(s_scores, km)
    kl = (lt.exp() * km * (lt - ls)).sum(-1)  # (B, H, L)
    qm = mask[:, None, :].to(kl.dtype)
    return (kl * qm).sum((1, 2)) / (qm.sum((1, 2)) * kl.shape[1])


def scalar(**parts) -> dict[str, float]:
    return {k: float(v.detach()) if isinstance(v, Tensor) else float(v) for k, v in parts.items()}
