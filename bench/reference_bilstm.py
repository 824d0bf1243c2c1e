"""A plain PyTorch BiLSTM written outside the project's trainer: the reference bench/quality.py compares with.

It imports nothing from this project. It reads the cache's Arrow shards with plain pyarrow (text, gold
label, teacher logits, set), builds its own vocabulary and GloVe embeddings, and trains the usual short
script: embeddings -> BiLSTM -> max over time -> ReLU MLP, Adam at a constant 1e-3, full shuffle, the best
dev epoch's test accuracy. `--mode plain`: CE on gold rows. `--mode distil`: α·CE over labelled rows +
(1−α)·logit MSE over all rows (TextBrewer / Tang-style regression, mean over classes). `--mode textbrewer`: the
same model and rows distilled by TextBrewer 0.2.1's BasicDistiller from the cached logits, with Hinton's loss as
TextBrewer writes it (soft cross-entropy at temperature 2, which it does not scale by T², so kd_loss_weight
0.5·2² = 2 weighs it as the project's `hinton` does, + 0.5·CE over labelled rows); TextBrewer is not a dependency:
the benchmark installs it apart (pip --target, no deps) and puts it on PYTHONPATH for this mode only.

  python bench/reference_bilstm.py CACHE_DIR GLOVE_NPY GLOVE_INDEX --mode distil --seed 0 --out result.json
"""
import argparse
import glob
import json
import re
import tempfile

import numpy as np
import pyarrow.ipc as ipc
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

TOKEN = re.compile(r"[a-z0-9]+(?:'[a-z]+)?|[^\sa-z0-9]")


def read_cache(cache_dir):
    tables = [ipc.open_file(p).read_all().select(["set", "text", "label", "logits"])
              for p in sorted(glob.glob(f"{cache_dir}/shards/*.arrow"))]
    rows = {}
    for t in tables:
        for s, text, y, z in zip(*(t.column(c).to_pylist() for c in ("set", "text", "label", "logits"))):
            rows.setdefault(s, []).append((TOKEN.findall(text.lower()), -100 if y is None else y, z))
    return rows


class BiLSTM(nn.Module):
    def __init__(self, vectors, num_labels, hidden=150, mlp=200, dropout=0.1):
        super().__init__()
        self.emb = nn.Embedding.from_pretrained(vectors, freeze=False, padding_idx=0)
        self.lstm = nn.LSTM(vectors.shape[1], hidden, batch_first=True, bidirectional=True)
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(2 * hidden, mlp), nn.ReLU(), nn.Dropout(dropout),
                                  nn.Linear(mlp, num_labels))

    def forward(self, ids, lengths):
        packed = pack_padded_sequence(self.emb(ids), lengths, batch_first=True, enforce_sorted=False)
        out, _ = pad_packed_sequence(self.lstm(packed)[0], batch_first=True, padding_value=float("-inf"))
        return self.head(out.max(dim=1).values)


def batch_of(rows, vocab):
    ids = [[vocab.get(w, 1) for w in r[0]] or [1] for r in rows]
    x = torch.zeros(len(ids), max(map(len, ids)), dtype=torch.long)
    for i, seq in enumerate(ids):
        x[i, : len(seq)] = torch.tensor(seq)
    return x, torch.tensor([len(s) for s in ids]), torch.tensor([r[1] for r in rows]), torch.tensor([r[2] for r in rows])


@torch.no_grad()
def accuracy(model, rows, vocab):
    model.eval()
    hits = 0
    for i in range(0, len(rows), 256):
        ids, lengths, y, _ = batch_of(rows[i:i + 256], vocab)
        hits += int((model(ids, lengths).argmax(-1) == y).sum())
    return hits / len(rows)


def hard_ce(logits, y):
    """CE over the labelled rows (-100: none); 0, still differentiable, when there are none."""
    labelled = y != -100
    return F.cross_entropy(logits[labelled], y[labelled]) if labelled.any() else logits.sum() * 0


class WithLoss(nn.Module):
    """The BiLSTM as TextBrewer expects a student: it returns its logits and its own hard-label loss."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, ids, lengths, labels):
        logits = self.model(ids, lengths)
        return logits, hard_ce(logits, labels)


def train_textbrewer(model, opt, train, sets, vocab, a):
    """TextBrewer's BasicDistiller over the cached teacher logits (its `teacher_cache` batches: no teacher runs);
    its per-epoch callback keeps the best dev epoch's test accuracy."""
    from textbrewer import BasicDistiller, DistillationConfig, TrainingConfig

    def collate(rows):
        ids, lengths, y, z = batch_of(rows, vocab)
        return {"teacher": {}, "student": {"ids": ids, "lengths": lengths, "labels": y}, "teacher_cache": {"logits": z}}

    loader = torch.utils.data.DataLoader(train, batch_size=a.batch, shuffle=True, collate_fn=collate,
                                         generator=torch.Generator().manual_seed(a.seed))
    best = [(-1.0, 0.0, 0)]

    def callback(model, step):
        dev = accuracy(model.model, sets["dev"], vocab)
        if dev > best[0][0]:
            best[0] = (dev, accuracy(model.model, sets["test"], vocab), step // len(loader))

    with tempfile.TemporaryDirectory() as saved:  # TextBrewer saves the student there every epoch
        distiller = BasicDistiller(
            TrainingConfig(device="cpu", output_dir=saved),
            DistillationConfig(temperature=2, kd_loss_type="ce", kd_loss_weight=(1 - a.alpha) * 4,
                               hard_label_weight=a.alpha),
            None, WithLoss(model), lambda batch, out: {"logits": out["logits"]},
            lambda batch, out: {"logits": out[0], "losses": out[1]})
        distiller.train(opt, loader, num_epochs=a.epochs, callback=callback)
    return best[0]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("cache"), ap.add_argument("glove_npy"), ap.add_argument("glove_index")
    ap.add_argument("--mode", choices=["plain", "distil", "textbrewer"], default="plain")
    ap.add_argument("--seed", type=int, default=0), ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--alpha", type=float, default=0.5), ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    torch.manual_seed(a.seed)
    rng = np.random.default_rng(a.seed)
    sets = read_cache(a.cache)
    augmented = sum((v for k, v in sets.items() if k.startswith("aug-")), [])
    train = sets["train"] + (augmented if a.mode != "plain" else [])
    words = sorted({w for r in train for w in r[0]})
    vocab = {w: i + 2 for i, w in enumerate(words)}  # 0 pad, 1 unknown
    glove = np.load(a.glove_npy)
    index = {w: i for i, w in enumerate(pq.read_table(a.glove_index).column("index").to_pylist())}
    vectors = rng.normal(0, 0.3, (len(vocab) + 2, glove.shape[1])).astype(np.float32)
    vectors[0] = 0
    for w, i in vocab.items():
        if w in index:
            vectors[i] = glove[index[w]]
    model = BiLSTM(torch.from_numpy(vectors), len(train[0][2]))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    best = train_textbrewer(model, opt, train, sets, vocab, a) if a.mode == "textbrewer" else train_script(
        model, opt, train, sets, vocab, a, rng)
    json.dump({"dev_accuracy": best[0], "test_accuracy": best[1], "best_epoch": best[2], "train_rows": len(train)},
              open(a.out, "w"))


def train_script(model, opt, train, sets, vocab, a, rng):
    """The short script's own loop: a full shuffle per epoch, the best dev epoch's test accuracy."""
    best = (-1.0, 0.0, 0)
    for epoch in range(a.epochs):
        model.train()
        order = rng.permutation(len(train))
        for i in range(0, len(order), a.batch):
            ids, lengths, y, z = batch_of([train[j] for j in order[i:i + a.batch]], vocab)
            logits = model(ids, lengths)
            ce = hard_ce(logits, y)
            loss = ce if a.mode == "plain" else a.alpha * ce + (1 - a.alpha) * F.mse_loss(logits, z)
            opt.zero_grad()
            loss.backward()
            opt.step()
        dev = accuracy(model, sets["dev"], vocab)
        if dev > best[0]:
            best = (dev, accuracy(model, sets["test"], vocab), epoch + 1)
    return best


if __name__ == "__main__":
    main()
