"""Logit and [CLS] losses and the registry against independent numpy computations of their published formulas,
and what every loss must do (gradients, masking, refusals), on the shared tiny batch (tests/loss_refs.py)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from trainer.losses import get_loss, loss_names, make_params
from trainer.losses.pkd import pkd_layer_map
from trainer.losses.registry import CACHE_FIELDS, register
from tests.loss_refs import B, ce, K, kd_row, LABELS, make_batch, make_student, np_, ref_kd, ref_patient, run


# ---------------------------------------------------------------- registry
def test_registry_lists_all_losses_and_fields():
    names = set(loss_names())
    assert {"ce", "hinton", "tang_mse", "pkd", "tinybert_intermediate", "tinybert_pred", "distilbert", "minilm",
            "ckd", "dynakd_teacher", "dynakd_data", "dynakd_supervision"} <= names
    from pipeline.cache_schema import ALL_FIELDS
    assert CACHE_FIELDS == set(ALL_FIELDS)
    assert get_loss("hinton").fields == ("logits",) and not get_loss("hinton").student_needs
    assert get_loss("dynakd_teacher").needs_second_teacher
    assert get_loss("minilm").student_needs == {"attention", "values"}
    assert {n for n in names if get_loss(n).token_level} == {"tinybert_intermediate", "distilbert", "minilm", "ckd"}


def test_registry_errors():
    with pytest.raises(ValueError, match="unknown loss 'nope'; known: .*hinton"):
        get_loss("nope")
    with pytest.raises(ValueError, match="unknown key"):
        make_params("hinton", {"temperature": 3})
    with pytest.raises(ValueError, match="mode"):
        make_params("pkd", {"mode": "middle"})
    with pytest.raises(ValueError, match="alpha"):
        make_params("hinton", {"alpha": 1.5})
    with pytest.raises(ValueError, match="already registered"):
        register("hinton", params=type(make_params("hinton")), fields=("logits",))(lambda *a: None)
    with pytest.raises(ValueError, match="unknown cache fields"):
        register("x_bad", params=type(make_params("hinton")), fields=("logits", "pixels"))
    p = make_params("pkd", {"layer_map": [[1, 3], [2, 5]], "t": "5"})
    assert p.layer_map == [[1, 3], [2, 5]] and p.t == 5.0


# ---------------------------------------------------------------- logit losses
def test_ce_ignores_unlabelled_and_is_zero_without_labels():
    out, batch = make_student(), make_batch()
    loss, _ = run("ce", out, batch)
    zs = np_(out.logits)
    assert loss.item() == pytest.approx((ce(zs[0], 0) + ce(zs[2], 2)) / 2, rel=1e-5)
    batch["labels"] = torch.full((B,), -100)
    loss, _ = run("ce", out, batch)
    loss.backward()
    assert loss.item() == 0.0 and out.logits.grad is not None


@pytest.mark.parametrize("pseudo", [False, True])
def test_hinton(pseudo):
    out, batch = make_student(), make_batch()
    loss, parts = run("hinton", out, batch, alpha=0.7, t=3.0, pseudo_label=pseudo, ce_over="batch")
    zs, zt = np_(out.logits), np_(batch["teacher_logits"])
    rows = []
    for b in range(B):
        y = LABELS[b] if LABELS[b] != -100 else (int(zt[b].argmax()) if pseudo else -100)
        rows.append(kd_row(zs[b], zt[b], y, 0.7, 3.0))
    assert loss.item() == pytest.approx(np.mean(rows), rel=1e-5)
    assert parts["loss"] == pytest.approx(loss.item())


@pytest.mark.parametrize("class_mean", [False, True])
def test_tang_mse(class_mean):
    out, batch = make_student(), make_batch()
    loss, _ = run("tang_mse", out, batch, alpha=0.3, class_mean=class_mean, ce_over="batch")
    zs, zt = np_(out.logits), np_(batch["teacher_logits"])
    rows = []
    for b in range(B):
        mse = np.sum((zt[b] - zs[b]) ** 2) / (K if class_mean else 1)
        rows.append(0.7 * mse + (0.3 * ce(zs[b], LABELS[b]) if LABELS[b] != -100 else 0.0))
    assert loss.item() == pytest.approx(np.mean(rows), rel=1e-5)


@pytest.mark.parametrize("name", ["hinton", "tang_mse"])
def test_ce_over_labelled_rows_keeps_the_gold_weight(name):
    """ce_over=labelled: the CE term is the mean over labelled rows (2 of B here), not over all B rows."""
    out, batch = make_student(), make_batch()
    labelled, _ = run(name, out, batch, ce_over="labelled")
    over_batch, _ = run(name, out, batch, ce_over="batch")
    zs = np_(out.logits)
    ce_labelled = (ce(zs[0], 0) + ce(zs[2], 2)) / 2
    gold_weight = 0.5  # (1 − α) for hinton, α for tang_mse: both 0.5 by default
    assert labelled.item() - over_batch.item() == pytest.approx(gold_weight * ce_labelled * (1 - 2 / B), rel=1e-4)
    with pytest.raises(ValueError, match="ce_over"):
        run(name, out, batch, ce_over="rows")


# ---------------------------------------------------------------- PKD
def test_pkd_layer_maps():
    assert [m for _, m in pkd_layer_map("skip", 6, 12)] == [2, 4, 6, 8, 10]
    assert [m for _, m in pkd_layer_map("last", 6, 12)] == [7, 8, 9, 10, 11]
    assert [s for s, _ in pkd_layer_map("skip", 6, 12)] == [1, 2, 3, 4, 5]
    assert pkd_layer_map("skip", 3, 6) == [(1, 2), (2, 4)]


@pytest.mark.parametrize("mode,pairs", [("skip", [(1, 2), (2, 4)]), ("last", [(1, 4), (2, 5)])])
def test_pkd(mode, pairs):
    out, batch = make_student(), make_batch()
    loss, _ = run("pkd", out, batch, mode=mode, alpha=0.2, t=5.0, beta=10.0)
    ref = ref_kd(out, batch, 0.2, 5.0) + 10.0 * ref_patient(out, batch, pairs)
    assert loss.item() == pytest.approx(ref.mean(), rel=1e-5)
    loss, _ = run("pkd", out, batch, layer_map=[[3, 5]], alpha=0.2, t=5.0, beta=10.0)
    ref = ref_kd(out, batch, 0.2, 5.0) + 10.0 * ref_patient(out, batch, [(3, 5)])
    assert loss.item() == pytest.approx(ref.mean(), rel=1e-5)


def test_pkd_word_student_needs_projection():
    out, batch = make_student(word=True), make_batch()
    loss, _ = run("pkd", out, batch, layer_map=[[1, 3]])
    ref = ref_kd(out, batch, 0.5, 10.0) + 100.0 * ref_patient(out, batch, [(1, 3)], word=True)
    assert loss.item() == pytest.approx(ref.mean(), rel=1e-5)
    out.projections = None
    with pytest.raises(ValueError, match="word-level student.*projection"):
        run("pkd", out, batch, layer_map=[[1, 3]])
    with pytest.raises(ValueError, match="teacher cls layer 9|outside"):
        run("pkd", make_student(), batch, layer_map=[[1, 9]])


def test_width_mismatch_without_projection_raises():
    batch = make_batch()
    with pytest.raises(ValueError, match="width 6 != teacher width 8"):
        run("pkd", make_student(proj=False), batch)
    with pytest.raises(ValueError, match="width 6 != teacher width 8"):
        run("tinybert_intermediate", make_student(proj=False), batch)


# ---------------------------------------------------------------- TinyBERT


# ---------------------------------------------------------------- gradients, masking, refusals
ALL = ["ce", "hinton", "tang_mse", "pkd", "tinybert_intermediate", "tinybert_pred", "distilbert", "minilm", "ckd",
       "dynakd_teacher", "dynakd_data", "dynakd_supervision"]
TOKEN = ["tinybert_intermediate", "distilbert", "minilm", "ckd"]


@pytest.mark.parametrize("name", ALL)
def test_gradients_reach_student_only(name):
    out, batch = make_student(), make_batch()
    before = {k: v.clone() for k, v in batch.items() if torch.is_tensor(v)}
    loss, parts = run(name, out, batch)
    assert loss.dim() == 0 and math.isfinite(loss.item()) and all(math.isfinite(v) for v in parts.values())
    loss.backward()
    for k, v in batch.items():
        if torch.is_tensor(v):
            assert not v.requires_grad and v.grad is None and torch.equal(v, before[k]), k
    grads = [out.logits.grad, out.values.grad, *(h.grad for h in out.hidden_states),
             *(a.grad for a in out.attentions.values()), *(p.grad for p in out.projections.parameters())]
    assert out.logits.grad is not None  # zero for losses without a logit term, but in the graph
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
    assert all(torch.isfinite(g).all() for g in grads if g is not None)


@pytest.mark.parametrize("name", TOKEN)
def test_token_losses_ignore_padding(name):
    out, batch = make_student(), make_batch()
    loss, _ = run(name, out, batch)
    pad = ~batch["teacher_mask"]
    with torch.no_grad():
        for h in out.hidden_states:
            h[pad] += 100.0
        for a in out.attentions.values():
            a.masked_fill_(pad[:, None, None, :] | pad[:, None, :, None], 55.0)
        out.values[pad] = -7.0
    loss2, _ = run(name, out, batch)
    assert loss2.item() == pytest.approx(loss.item(), rel=1e-6)


@pytest.mark.parametrize("name", TOKEN)
def test_token_losses_refuse_word_students(name):
    with pytest.raises(ValueError, match="word-level students"):
        run(name, make_student(word=True), make_batch())


def test_attention_losses_refuse_students_without_attention():
    out, batch = make_student(), make_batch()
    out.attentions = None
    for name in ("minilm", "tinybert_intermediate"):
        with pytest.raises(ValueError, match="no attentions"):
            run(name, out, batch)
    run("tinybert_intermediate", out, batch, w_att=0.0)  # hidden/embedding terms alone are fine
