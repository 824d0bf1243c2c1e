"""Patient KD (Sun et al. 2019): Hinton KD + β·Σ ‖normalised CLS_S^i − normalised CLS_T^{m(i)}‖²."""
from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor

from trainer.losses.common import (check_map, fail, gold_labels, is_word_student, kd_rows, kl_rows, masked_mean, project,
                                   require, scalar, teacher_depth, teacher_layer)
from trainer.losses.logit import check_alpha_t
from trainer.losses.registry import register


def pkd_layer_map(mode: str, k: int, n: int) -> list[tuple[int, int]]:
    """(student layer, teacher layer) for student layers 1..k−1 (the top pair is left to the logits).
    skip: i -> i·N/k (k=6, N=12: 2,4,6,8,10); last: i -> N−k+i (7..11)."""
    if not 1 <= k <= n:
        raise ValueError(f"student depth {k} must be in 1..{n} (teacher depth)")
    if mode == "skip":
        return [(i, i * n // k) for i in range(1, k)]
    if mode == "last":
        return [(i, n - k + i) for i in range(1, k)]
    raise ValueError(f"PKD mode must be 'skip' or 'last', got {mode!r}")


def resolve_pkd_map(p, out, batch, loss: str) -> list[tuple[int, int]]:
    hidden = require(out, "hidden", loss)
    k, n = len(hidden) - 1, teacher_depth(batch)
    pairs = check_map(p.layer_map, k, n, loss) if p.layer_map else pkd_layer_map(p.mode, k, n)
    if not pairs:
        fail(loss, f"no intermediate layer pairs for student depth {k} (mode {p.mode!r}); set layer_map")
    return pairs


def student_sentence_state(out, i: int, d_t: int, loss: str) -> Tensor:
    """(B, d_T): CLS state of layer i (BERT students), or for word-level students the masked mean
    of layer i's token states through a learned projection out.projections["pkd_{i}"|"pkd"]."""
    h = out.hidden_states[i]
    if not is_word_student(out):
        return project(out, (f"pkd_{i}", "pkd", f"hid_{i}", "hid"), h[:, 0], d_t, loss)
    keys = (f"pkd_{i}", "pkd")
    if out.projections is None or not any(k in out.projections for k in keys):
        fail(loss, f"word-level student: PKD needs a learned projection out.projections[{keys[0]!r} or 'pkd'] "
                   f"of its layer-{i} states to the teacher width {d_t}")
    return project(out, keys, masked_mean(h, out.mask), d_t, loss)


def patient_rows(out, batch, pairs, loss: str) -> Tensor:
    """(B,) Σ_{(i, m)} ‖ s_i/‖s_i‖ − t_m/‖t_m‖ ‖² (student state i vs teacher CLS of layer m)."""
    total = 0.0
    for i, m in pairs:
        t = teacher_layer(batch, "cls", m, loss)
        s = student_sentence_state(out, i, t.shape[-1], loss)
        total = total + ((F.normalize(s, dim=-1) - F.normalize(t, dim=-1)) ** 2).sum(-1)
    return total


@dataclass
class PKDParams:
    mode: str = "skip"  # "skip" | "last"
    alpha: float = 0.5  # soft weight; (1−α) on CE
    t: float = 10.0
    beta: float = 100.0
    layer_map: list[list[int]] | None = None  # [[student_layer, teacher_layer], ...] overrides mode
    pseudo_label: bool = False

    def __post_init__(self):
        check_alpha_t(self)
        if self.mode not in ("skip", "last"):
            raise ValueError(f"PKD mode must be 'skip' or 'last', got {self.mode!r}")
        if self.layer_map is not None and any(len(x) != 2 for x in self.layer_map):
            raise ValueError("PKD layer_map must be a list of [student_layer, teacher_layer] pairs")


@register("pkd", params=PKDParams, fields=("logits", "cls"), student_needs=("hidden",), needs_labels=True)
def pkd(out, batch, p: PKDParams, state):
    """mean_rows[ (1−α)·CE + α·t²·KL + β·Σ_i ‖ĥ_S^i − ĥ_T^{m(i)}‖² ]."""
    z_t = batch["teacher_logits"]
    y = gold_labels(batch, z_t, p.pseudo_label)
    pairs = resolve_pkd_map(p, out, batch, "pkd")
    pt = patient_rows(out, batch, pairs, "pkd")
    kd = kd_rows(out.logits, z_t, y, p.alpha, p.t)
    loss = (kd + p.beta * pt).mean()
    return loss, scalar(loss=loss, kd=kd.mean(), patient=pt.mean(), kl=kl_rows(out.logits.detach(), z_t, p.t).mean())

