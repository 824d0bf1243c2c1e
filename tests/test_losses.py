"""Every registered loss against an independent loop/numpy computation of its published formula.

Tiny random tensors: B=4 rows of ragged lengths, K=3 classes, teacher depth N=6 (width 8,
2 heads), BERT-like student depth k=3 (width 6 != 8, learned projections).
"""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from torch import nn

from trainer.losses import StudentOutput, TinyBERTSchedule, get_loss, loss_names, make_params
from trainer.losses.dynamic import hard_split, top_fraction
from trainer.losses.pkd import pkd_layer_map
from trainer.losses.registry import CACHE_FIELDS, register

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
def ref_tinybert(out, batch, clip=False):
    mask = np_(batch["teacher_mask"]).astype(bool)
    th, ta = np_(batch["teacher_hidden"]), np_(batch["teacher_attention"])

    def hid(i, m, key):
        s, tot, n = lin(np_(out.hidden_states[i]), out.projections[key]), 0.0, 0
        for b in range(B):
            for q in range(LENGTHS[b]):
                tot += np.sum((s[b, q] - th[b, m, q]) ** 2)
                n += DT
        return tot / n

    def att(i, m):
        s, per_head = np_(out.attentions[i]), []
        for h in range(H):
            tot, n = 0.0, 0
            for b in range(B):
                for q, k in itertools.product(range(LENGTHS[b]), repeat=2):
                    a, t = s[b, h, q, k], ta[b, m - 1, h, q, k]
                    if clip:
                        a, t = (0.0 if a <= -100 else a), (0.0 if t <= -100 else t)
                    tot += (a - t) ** 2
                    n += 1
            per_head.append(tot / n)
        return np.mean(per_head)

    assert mask.sum() == sum(LENGTHS)
    pairs = [(1, 2), (2, 4), (3, 6)]
    return hid(0, 0, "emb"), sum(hid(i, m, "hid") for i, m in pairs), sum(att(i, m) for i, m in pairs)


@pytest.mark.parametrize("clip", [False, True])
def test_tinybert_intermediate(clip):
    out, batch = make_student(), make_batch()
    with torch.no_grad():
        out.attentions[1][0, 0, 1, 2] = -500.0  # a valid-block score the official code would zero
    loss, parts = run("tinybert_intermediate", out, batch, official_clip=clip, w_emb=1.0, w_hid=2.0, w_att=3.0)
    emb, hid, att = ref_tinybert(out, batch, clip)
    assert parts["emb"] == pytest.approx(emb, rel=1e-5) and parts["hid"] == pytest.approx(hid, rel=1e-5)
    assert parts["att"] == pytest.approx(att, rel=1e-5)
    assert loss.item() == pytest.approx(emb + 2 * hid + 3 * att, rel=1e-5)


def test_tinybert_normalise_options_relate():
    out, batch = make_student(), make_batch()
    n_tok, n_pairs = sum(LENGTHS), sum(x * x for x in LENGTHS)
    _, rag = run("tinybert_intermediate", out, batch, normalise="ragged")
    _, pad = run("tinybert_intermediate", out, batch, normalise="padded128")
    assert pad["att"] * B * H * 128 * 128 == pytest.approx(rag["att"] * H * n_pairs, rel=1e-5)
    assert pad["hid"] * B * 128 * DT == pytest.approx(rag["hid"] * n_tok * DT, rel=1e-5)
    with pytest.raises(ValueError, match="pad_length"):
        run("tinybert_intermediate", out, batch, normalise="padded128", pad_length=4)


def test_tinybert_pred_and_schedule():
    out, batch = make_student(), make_batch()
    loss, _ = run("tinybert_pred", out, batch)
    zs, zt = np_(out.logits), np_(batch["teacher_logits"])
    ref = np.mean([-np.sum(softmax(zt[b]) * np.log(softmax(zs[b]))) for b in range(B)])
    assert loss.item() == pytest.approx(ref, rel=1e-5)
    s1, s2 = TinyBERTSchedule().stages()
    assert (s1.loss, s1.epochs, s1.lr, s2.loss, s2.epochs, s2.lr) == \
        ("tinybert_intermediate", 10, 5e-5, "tinybert_pred", 3, 3e-5)


# ---------------------------------------------------------------- DistilBERT, MiniLM
def test_distilbert():
    out, batch = make_student(), make_batch()
    loss, _ = run("distilbert", out, batch)
    zs, zt = np_(out.logits), np_(batch["teacher_logits"])
    rows = [5.0 * 4 * kl(softmax(zt[b] / 2), softmax(zs[b] / 2)) + (2.0 * ce(zs[b], LABELS[b])
            if LABELS[b] != -100 else 0.0) for b in range(B)]
    s, t = lin(np_(out.hidden_states[-1]), out.projections["cos"]), np_(batch["teacher_hidden"])[:, N]
    cos = [1 - s[b, q] @ t[b, q] / np.linalg.norm(s[b, q]) / np.linalg.norm(t[b, q])
           for b in range(B) for q in range(LENGTHS[b])]
    assert loss.item() == pytest.approx(np.mean(rows) + np.mean(cos), rel=1e-5)


def ref_relation_kl(s_scores, t_scores):
    """(1/(h·L_b))·Σ_{h, valid q} KL(softmax_valid(T) ‖ softmax_valid(S)), mean over rows."""
    rows = []
    for b in range(B):
        n, tot = LENGTHS[b], 0.0
        for h in range(s_scores.shape[1]):
            for q in range(n):
                tot += kl(softmax(t_scores[b, h, q, :n]), softmax(s_scores[b, h, q, :n]))
        rows.append(tot / (s_scores.shape[1] * n))
    return np.array(rows)


def vr_scores(v, r):
    b, n, d = v.shape
    vh = v.reshape(b, n, r, d // r).transpose(0, 2, 1, 3)
    return vh @ vh.transpose(0, 1, 3, 2) / math.sqrt(d // r)


@pytest.mark.parametrize("relation_heads", [None, 1])
def test_minilm(relation_heads):
    out, batch = make_student(), make_batch()
    loss, parts = run("minilm", out, batch, relation_heads=relation_heads, w_soft=0.5, w_ce=0.25, t=2.0)
    at = ref_relation_kl(np_(out.attentions[KS]), np_(batch["teacher_attention"])[:, N - 1])
    r = relation_heads or H
    vr = ref_relation_kl(vr_scores(np_(out.values), r), vr_scores(np_(batch["teacher_values"]), r))
    zs, zt = np_(out.logits), np_(batch["teacher_logits"])
    extra = [0.5 * 4 * kl(softmax(zt[b] / 2), softmax(zs[b] / 2)) + (0.25 * ce(zs[b], LABELS[b])
             if LABELS[b] != -100 else 0.0) for b in range(B)]
    assert parts["at"] == pytest.approx(at.mean(), rel=1e-5) and parts["vr"] == pytest.approx(vr.mean(), rel=1e-5)
    assert loss.item() == pytest.approx((at + vr + np.array(extra)).mean(), rel=1e-5)


# ---------------------------------------------------------------- CKD
def huber(x):
    return 0.5 * x * x if abs(x) < 1 else abs(x) - 0.5


def cosv(a, b):
    return a @ b / np.linalg.norm(a) / np.linalg.norm(b)


def angle(ri, rj, rk):
    return cosv(ri - rj, rk - rj)


def pair_rel(vecs, kind):
    """{(i, j): φ} over ordered pairs i != j of one set; L2 divided by the set's mean distance."""
    ps = list(itertools.permutations(range(len(vecs)), 2))
    if kind == "cos":
        return {(i, j): cosv(vecs[i], vecs[j]) for i, j in ps}
    d = {(i, j): np.linalg.norm(vecs[i] - vecs[j]) for i, j in ps}
    mu = np.mean(list(d.values()))
    return {k: v / mu for k, v in d.items()}


def ref_ckd(out, batch, w=3, distance="cos", mis="huber"):
    err = huber if mis == "huber" else (lambda x: x * x)
    pairs = [(0, 0), (1, 2), (2, 4), (3, 6)]
    S = [np_(out.hidden_states[i]) for i, _ in pairs]
    T = [np_(batch["teacher_hidden"])[:, m] for _, m in pairs]
    wr_d, wr_a = [], []
    for s, t in zip(S, T):
        d, a = [], []
        for b in range(B):
            n = LENGTHS[b]
            ps, pt = pair_rel(s[b, :n], distance), pair_rel(t[b, :n], distance)
            d += [err(ps[k] - pt[k]) for k in ps]
            for j in range(n):
                for i, k in itertools.permutations(range(max(0, j - w), min(n, j + w + 1)), 2):
                    if i != j and k != j:
                        a.append(err(angle(s[b, i], s[b, j], s[b, k]) - angle(t[b, i], t[b, j], t[b, k])))
        wr_d.append(np.mean(d))
        wr_a.append(np.mean(a))
    ld, la = [], []
    for b in range(B):
        for q in range(LENGTHS[b]):
            ps, pt = pair_rel([x[b, q] for x in S], distance), pair_rel([x[b, q] for x in T], distance)
            ld += [err(ps[k] - pt[k]) for k in ps]
            for x, y, z in itertools.permutations(range(len(pairs)), 3):
                la.append(err(angle(S[x][b, q], S[y][b, q], S[z][b, q]) - angle(T[x][b, q], T[y][b, q], T[z][b, q])))
    return np.mean(wr_d), np.mean(wr_a), np.mean(ld), np.mean(la)


@pytest.mark.parametrize("distance,mis", [("cos", "huber"), ("l2", "mse")])
def test_ckd(distance, mis):
    out, batch = make_student(), make_batch()
    loss, parts = run("ckd", out, batch, distance=distance, mismatch=mis)
    wr_d, wr_a, ltr_d, ltr_a = ref_ckd(out, batch, distance=distance, mis=mis)
    for k, v in dict(wr_d=wr_d, wr_a=wr_a, ltr_d=ltr_d, ltr_a=ltr_a).items():
        assert parts[k] == pytest.approx(v, rel=1e-4, abs=1e-7), k
    logit = ref_kd(out, batch, 0.5, 3.0).mean()
    ref = 0.1 * logit + 0.9 * (wr_d + 16 * wr_a + 128 * ltr_d + 64 * ltr_a)
    assert loss.item() == pytest.approx(ref, rel=1e-4)
    with pytest.raises(ValueError, match="LTR needs"):
        run("ckd", out, batch, layer_map=[[1, 2], [3, 6]])


# ---------------------------------------------------------------- Dynamic KD
def test_dynakd_hard_split_rows():
    u = torch.tensor([0.1, 0.9, 0.5, 0.7, 0.2, 0.5, 0.3])
    assert hard_split(u).tolist() == [False, True, True, True, False, False, False]  # floor(7/2)=3, ties: low index
    assert top_fraction(u, 0.5).tolist() == [False, True, True, True, False, True, False]  # ceil(3.5)=4


@pytest.mark.parametrize("mode", ["hard", "soft"])
def test_dynakd_teacher(mode):
    out, batch = make_student(), make_batch()
    loss, parts = run("dynakd_teacher", out, batch, mode=mode, alpha=0.6, t=2.0)
    u = entropy_u(np_(out.logits))
    kd1 = ref_kd(out, batch, 0.6, 2.0, "teacher2_logits")  # T1 weak = second cache
    kd2 = ref_kd(out, batch, 0.6, 2.0)  # T2 strong = primary cache
    if mode == "hard":
        uncertain = set(np.argsort(-u, kind="stable")[: B // 2].tolist())
        ref = np.mean([kd1[b] if b in uncertain else kd2[b] for b in range(B)])
        assert parts["t1_weight"] == 0.5
    else:
        ref = np.mean(u * kd1 + (1 - u) * kd2)
    assert loss.item() == pytest.approx(ref, rel=1e-5)


@pytest.mark.parametrize("ce_on_all", [True, False])
def test_dynakd_data(ce_on_all):
    out, batch = make_student(), make_batch()
    loss, _ = run("dynakd_data", out, batch, ratio=0.5, alpha=0.4, t=2.0, ce_on_all=ce_on_all)
    zs, zt = np_(out.logits), np_(batch["teacher_logits"])
    keep = np.argsort(-entropy_u(zs), kind="stable")[:2]
    kd = np.mean([4 * kl(softmax(zt[b] / 2), softmax(zs[b] / 2)) for b in keep])
    rows = keep if not ce_on_all else range(B)
    ce_ = np.mean([ce(zs[b], LABELS[b]) if LABELS[b] != -100 else 0.0 for b in rows])
    assert loss.item() == pytest.approx(0.4 * kd + 0.6 * ce_, rel=1e-5)


def test_dynakd_supervision():
    out, batch = make_student(), make_batch()
    loss, _ = run("dynakd_supervision", out, batch, lambda_pred=1.0, lambda_hid=10.0)
    u = entropy_u(np_(out.logits))
    pred, hid = ref_kd(out, batch, 0.5, 2.0), ref_patient(out, batch, [(1, 2), (2, 4)])
    assert loss.item() == pytest.approx(np.mean((1 - u) * pred + 10.0 * u * hid), rel=1e-5)


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
