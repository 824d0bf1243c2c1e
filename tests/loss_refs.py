"""What the loss tests share: a tiny random batch and student, and numpy references of the published formulas.

B=4 rows of ragged lengths, K=3 classes, teacher depth N=6 (width 8, 2 heads), BERT-like student depth k=3
(width 6 != 8, learned projections).
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from trainer.losses import StudentOutput, get_loss, make_params

B, L, K, N, KS, DS, DT, H = 4, 7, 3, 6, 3, 6, 8, 2
LENGTHS = [7, 5, 3, 6]
LABELS = [0, -100, 2, -100]


def np_(t):
    return t.detach().double().numpy()


def make_batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    mask = torch.arange(L)[None] < torch.tensor(LENGTHS)[:, None]
    hidden = r(B, N + 1, L, DT) * mask[:, None, :, None]
    return {
        "labels": torch.tensor(LABELS), "teacher_mask": mask,
        "teacher_logits": r(B, K) * 2, "teacher2_logits": r(B, K),
        "teacher_cls": hidden[:, :, 0] + 0.1 * r(B, N + 1, DT), "teacher_hidden": hidden,
        "teacher_attention": r(B, N, H, L, L) * 3 * (mask[:, None, None, :, None] & mask[:, None, None, None, :]),
        "teacher_values": r(B, L, DT),
        "layout": {"num_layers": N, "cls_layers": list(range(N + 1)), "hidden_layers": list(range(N + 1)),
                   "attention_layers": list(range(1, N + 1))},
    }


def make_student(seed=1, d_s=DS, proj=True, word=False):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g).requires_grad_()  # noqa: E731
    torch.manual_seed(seed)
    projections = nn.ModuleDict({n: nn.Linear(d_s, DT) for n in ("emb", "hid", "pkd", "cos")}) if proj else None
    mask = torch.arange(L)[None] < torch.tensor(LENGTHS)[:, None]
    return StudentOutput(logits=r(B, K), hidden_states=[r(B, L, d_s) for _ in range(KS + 1)],
                         attentions={i: r(B, H, L, L) for i in range(1, KS + 1)}, values=r(B, L, d_s), mask=mask,
                         pooled=r(B, d_s) if word else None, projections=projections)


def run(name, out, batch, **params):
    return get_loss(name).fn(out, batch, make_params(name, params), {})


# ---------------------------------------------------------------- numpy references
def softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def kl(pt, ps):
    return float(np.sum(pt * (np.log(pt) - np.log(ps))))


def ce(z, y):
    return -math.log(softmax(z)[y])


def lin(x, layer):
    return x @ np_(layer.weight).T + np_(layer.bias)


def kd_row(zs, zt, y, alpha, t):
    v = alpha * t * t * kl(softmax(zt / t), softmax(zs / t))
    return v + ((1 - alpha) * ce(zs, y) if y != -100 else 0.0)


def ref_kd(out, batch, alpha, t, teacher="teacher_logits"):
    zs, zt = np_(out.logits), np_(batch[teacher])
    return np.array([kd_row(zs[b], zt[b], LABELS[b], alpha, t) for b in range(B)])


def ref_patient(out, batch, pairs, word=False):
    rows = np.zeros(B)
    for i, m in pairs:
        for b in range(B):
            h = np_(out.hidden_states[i])[b]
            s = h[: LENGTHS[b]].mean(0) if word else h[0]
            s = lin(s, out.projections["pkd"])
            t = np_(batch["teacher_cls"])[b, m]
            rows[b] += np.sum((s / np.linalg.norm(s) - t / np.linalg.norm(t)) ** 2)
    return rows


def entropy_u(z):
    p = softmax(z)
    return -(p * np.log(p)).sum(-1) / math.log(z.shape[-1])


