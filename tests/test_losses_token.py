"""Token-level and dynamic losses (TinyBERT, DistilBERT, MiniLM, CKD, Dynamic KD) against independent numpy
computations of their published formulas, on the shared tiny batch (tests/loss_refs.py)."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from trainer.losses import TinyBERTSchedule
from trainer.losses.dynamic import hard_split, top_fraction
from tests.loss_refs import (
    B, ce, DT, entropy_u, H, kl, KS, LABELS, LENGTHS, lin, make_batch, make_student, N, np_, ref_kd,
    ref_patient, run, softmax,
)


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


