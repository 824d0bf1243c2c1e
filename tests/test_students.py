"""Students: word vocab + vectors, BiLSTM/TextCNN/small-BERT forward, capture, save/load."""
from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from data.assets import glove_paths, minilm_path
from data.io import UserError
from trainer.students import build_student, load_student, save_student
from trainer.students.smallbert import pick_layers
from trainer.vocab import MASK, Vocab, load_embeddings, tokenize

TEXTS = ["The movie was great !", "a terrible , boring film", "great fun", "[MASK] film was fun",
         "zqxwv blorptastic movie"]
ALL = frozenset({"hidden", "attention", "values"})


@pytest.fixture(scope="module")
def vocab():
    return Vocab.build(TEXTS)


@pytest.fixture(scope="module")
def glove(vocab):
    return load_embeddings(vocab, "glove50")


@pytest.fixture(scope="module")
def minilm_sd():
    return load_file(str(minilm_path() / "model.safetensors"))


def small_bert(**kw):
    torch.manual_seed(0)
    return build_student("smallbert", {"num_labels": 3, "num_layers": 2, **kw})


# ---------------------------------------------------------------- vocab + vectors

def test_tokenize_and_vocab(tmp_path):
    assert tokenize("I don't [mask] it... 😀!") == ["i", "do", "n't", MASK, "it", "...", "😀", "!"]
    assert tokenize("") == [] and tokenize(None) == []
    v = Vocab.build(["a a a b b c", "[MASK] d"], min_freq=2)
    assert v.itos == ["<pad>", "<unk>", MASK, "a", "b"]
    assert Vocab.build(["a a b c"], max_size=1).itos[3:] == ["a"]
    ids, lengths = v.encode(["a b zz", "", "[MASK]"])
    assert ids.tolist() == [[3, 4, 1], [1, 0, 0], [2, 0, 0]] and lengths.tolist() == [3, 1, 1]
    v.save(tmp_path / "v.json")
    assert Vocab.load(tmp_path / "v.json").itos == v.itos
    with pytest.raises(UserError):
        Vocab.load(tmp_path / "nope.json")


def test_glove_init_and_missing_count(vocab, glove):
    weights, missing = glove
    assert weights.shape == (len(vocab), 50)
    words = pq.read_table(glove_paths()[1]).column("index").to_pylist()
    row = words.index("movie")
    assert torch.equal(weights[vocab.stoi["movie"]], torch.from_numpy(np.load(glove_paths()[0])[row]))
    assert missing == 2  # zqxwv, blorptastic
    assert torch.all(weights[0] == 0)
    again, _ = load_embeddings(vocab, "glove50")
    assert torch.equal(again, weights)  # random rows are seeded


def test_user_vector_files(tmp_path, vocab):
    glove_txt = tmp_path / "g.txt"
    glove_txt.write_text("movie 1 2 3\nfilm 4 5 6\n")
    w, missing = load_embeddings(vocab, glove_txt)
    assert w.shape == (len(vocab), 3) and missing == len(vocab) - 3 - 2
    assert w[vocab.stoi["film"]].tolist() == [4, 5, 6]
    w2v = tmp_path / "w.txt"
    w2v.write_text("1 2\nMovie 7 8\n")  # header + a cased word
    w, _ = load_embeddings(vocab, w2v)
    assert w[vocab.stoi["movie"]].tolist() == [7, 8]
    with pytest.raises(UserError, match="not found"):
        load_embeddings(vocab, tmp_path / "missing.vec")


# ---------------------------------------------------------------- word students

@pytest.mark.parametrize("kind", ["bilstm", "textcnn"])
@pytest.mark.parametrize("pair", [False, True])
def test_word_student_forward_backward(kind, pair, vocab, glove):
    torch.manual_seed(0)
    s = build_student(kind, {"num_labels": 3, "pair": pair}, vocab=vocab, embeddings=glove[0])
    b_texts = ["fun", "", "a great great movie film was fun"] if pair else None
    batch = s.encode_texts(["the movie was great", "fun", "😀 🤷‍♀️"], b_texts)
    out = s(batch)
    assert out.logits.shape == (3, 3) and out.hidden_states is None and out.attentions is None
    out = s(batch, want=frozenset({"hidden"}))
    L = batch["word_ids"].size(1) + (batch["word_ids_b"].size(1) if pair else 0)
    emb, enc = out.hidden_states
    d = {"bilstm": 300, "textcnn": 1000}[kind]  # 2 directions x 150; 5 widths x 200 maps
    pooled = {"bilstm": 2 * d, "textcnn": d}[kind]  # the BiLSTM's max and mean over time
    assert emb.shape == (3, L, 50) and enc.shape == (3, L, d) and out.mask.shape == (3, L)
    assert out.pooled.shape == (3, 4 * pooled if pair else pooled)
    out.logits.square().sum().backward()
    assert s.embedding.weight.grad[vocab.stoi["movie"]].abs().sum() > 0
    assert s.embedding.weight.grad[0].abs().sum() == 0  # <pad> row stays fixed


@pytest.mark.parametrize("kind,cfg", [("bilstm", {"pooling": "last"}), ("bilstm", {"pooling": "max"}),
                                      ("bilstm", {"pooling": "max_mean"}), ("bilstm", {"pooling": "last", "num_layers": 2}),
                                      ("textcnn", {})])
def test_word_student_padding_invariant(kind, cfg, vocab):
    torch.manual_seed(0)
    s = build_student(kind, {"num_labels": 2, **cfg}, vocab=vocab, embeddings=torch.randn(len(vocab), 8)).eval()
    texts = ["fun", "a terrible boring film was great fun movie"]
    together = s(s.encode_texts(texts)).logits
    alone = torch.cat([s(s.encode_texts([t])).logits for t in texts])
    assert torch.allclose(together, alone, atol=1e-5)


def test_bilstm_max_mean_widths(vocab):
    """max_mean doubles the sentence vector (max and mean over time); PKD's projection still reads the token states."""
    s = build_student("bilstm", {"hidden_size": 6, "pooling": "max_mean", "num_layers": 2, "project_to": 16},
                      vocab=vocab, embeddings=torch.randn(len(vocab), 8))
    out = s(s.encode_texts(["a terrible film", "fun"]), want=frozenset({"hidden"}))
    assert out.pooled.shape == (2, 24) and out.hidden_states[-1].shape[-1] == 12
    assert s.projections["pkd"].in_features == 12 and s.lstm.num_layers == 2
    with pytest.raises(ValueError, match="pooling"):
        build_student("bilstm", {"pooling": "mean"}, vocab=vocab, embeddings=torch.randn(len(vocab), 8))


def test_pair_student_needs_texts_b(vocab):
    s = build_student("textcnn", {"pair": True}, vocab=vocab, embeddings=torch.zeros(len(vocab), 4))
    with pytest.raises(ValueError, match="texts_b"):
        s.encode_texts(["a"])
    with pytest.raises(ValueError, match="want"):
        s(s.encode_texts(["a"], ["b"]), want=frozenset({"logits"}))


# ---------------------------------------------------------------- small-BERT

def test_pick_layers():
    assert pick_layers("first", 3, 6) == [1, 2, 3]
    assert pick_layers("every_other", 3, 6) == [1, 3, 5]
    assert pick_layers("2,6", 2, 6) == [2, 6]
    with pytest.raises(UserError):
        pick_layers("every_other", 4, 6)


@pytest.mark.parametrize("layers,expect", [("first", [1, 2]), ("every_other", [1, 3]), ([6, 4], [6, 4])])
def test_smallbert_copies_source_layers(layers, expect, minilm_sd):
    s = small_bert(layers=layers)
    assert s.config.source_layers == expect and s.num_layers == 2
    sd = s.model.state_dict()
    for i, src in enumerate(expect):
        for name in ("attention.self.query.weight", "intermediate.dense.bias", "output.LayerNorm.weight"):
            assert torch.equal(sd[f"bert.encoder.layer.{i}.{name}"], minilm_sd[f"encoder.layer.{src - 1}.{name}"])
    assert torch.equal(sd["bert.embeddings.word_embeddings.weight"], minilm_sd["embeddings.word_embeddings.weight"])
    assert s.model.classifier.out_features == 3 and s.projections is None


def test_smallbert_from_finetuned_checkpoint(tmp_path):
    """A saved *ForSequenceClassification teacher ("bert." prefix, pooler, head) as source."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(str(minilm_path()))
    teacher = BertForSequenceClassification(BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=3,
                                                       num_attention_heads=4, intermediate_size=64, num_labels=5))
    teacher.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    s = build_student("smallbert", {"source": str(tmp_path), "layers": [3, 1], "num_labels": 2})
    t_sd, s_sd = teacher.state_dict(), s.model.state_dict()
    assert torch.equal(s_sd["bert.encoder.layer.0.output.dense.weight"], t_sd["bert.encoder.layer.2.output.dense.weight"])
    assert torch.equal(s_sd["bert.encoder.layer.1.output.dense.weight"], t_sd["bert.encoder.layer.0.output.dense.weight"])
    assert torch.equal(s_sd["bert.pooler.dense.weight"], t_sd["bert.pooler.dense.weight"])
    assert s.model.classifier.out_features == 2
    s.check_tokenizer(AutoTokenizer.from_pretrained(str(tmp_path)), tmp_path)  # the teacher's: taken
    tok.add_tokens(["blorptastic"])
    with pytest.raises(UserError, match="is not the teacher's"):
        s.check_tokenizer(tok, tmp_path)


def test_smallbert_capture_matches_hand_computation():
    s = small_bert(layers="every_other").eval()
    batch = s.encode_texts(["a fine film indeed", "bad"], ["yes", ""])
    out = s(batch, want=ALL)
    assert len(out.hidden_states) == 3 and set(out.attentions) == {1, 2}
    heads, d = 12, 384 // 12
    for layer in (1, 2):
        att = s.model.bert.encoder.layer[layer - 1].attention.self
        h = out.hidden_states[layer - 1]
        q = att.query(h).view(2, -1, heads, d).transpose(1, 2)
        k = att.key(h).view(2, -1, heads, d).transpose(1, 2)
        assert torch.allclose(out.attentions[layer], q @ k.transpose(-1, -2) / d**0.5, atol=1e-4)
    v = s.model.bert.encoder.layer[1].attention.self.value(out.hidden_states[1])
    assert torch.allclose(out.values, v, atol=1e-5) and out.values.shape == (2, batch["input_ids"].size(1), 384)
    assert torch.equal(out.mask, batch["attention_mask"].bool())
    plain = s(batch)
    assert plain.attentions is None and plain.hidden_states is None and plain.values is None
    assert torch.allclose(plain.logits, out.logits, atol=1e-5)


def test_smallbert_gradients_reach_student():
    s = small_bert()
    out = s(s.encode_texts(["good", "not good at all"]), want=frozenset({"attention", "values"}))
    (out.attentions[1].square().mean() + out.values.square().mean() + out.logits.sum()).backward()
    assert s.model.bert.encoder.layer[0].attention.self.query.weight.grad.abs().sum() > 0
    assert s.model.bert.encoder.layer[1].attention.self.value.weight.grad.abs().sum() > 0


def test_smallbert_scratch_with_projection():
    s = small_bert(init="scratch", num_layers=2, hidden_size=48, num_heads=4, intermediate_size=96, project_to=384)
    out = s(s.encode_texts(["hello 😀", ""]), want=ALL)
    assert out.hidden_states[0].shape[-1] == 48 and out.attentions[2].shape[1] == 4
    assert set(out.projections) == {"emb", "hid"} and out.projections["hid"](out.hidden_states[2]).shape[-1] == 384
    out.projections["emb"](out.hidden_states[0]).sum().backward()
    assert s.projections["emb"].weight.grad is not None


# ---------------------------------------------------------------- save / load

def test_save_load_round_trip(tmp_path, vocab, glove, monkeypatch):
    torch.manual_seed(0)
    students = {
        "bilstm": build_student("bilstm", {"num_labels": 3, "pair": True}, vocab=vocab, embeddings=glove[0]),
        "textcnn": build_student("textcnn", {"num_labels": 3}, vocab=vocab, embeddings=glove[0]),
        "smallbert": small_bert(project_to=512),
    }
    texts, texts_b = ["The movie was great 😀", "", "[MASK] fun"], ["ok", "fine film", ""]
    saved = {}
    for kind, s in students.items():
        s.eval()
        saved[kind] = s(s.encode_texts(texts, texts_b)).logits
        save_student(s, tmp_path / kind, label_names=["neg", "neu", "pos"])
    import trainer.students.smallbert as sb

    monkeypatch.setattr(sb, "resolve_model", lambda name: pytest.fail("load_student read the source"))
    for kind in students:
        loaded = load_student(tmp_path / kind)
        assert loaded.label_names == ["neg", "neu", "pos"] and not loaded.training
        assert torch.equal(loaded(loaded.encode_texts(texts, texts_b)).logits, saved[kind])
    assert set(load_student(tmp_path / "smallbert").projections) == {"emb", "hid"}
    with pytest.raises(UserError):
        load_student(tmp_path / "nothing")


def test_small_bert_sees_a_pair_as_in_training_and_as_the_teacher_did():
    """Cached batches hold input_ids and a mask only; the student derives the token types the teacher saw
    (pipeline.cache_schema.segment_ids), so training on cached ids and predicting raw pairs agree."""
    s = small_bert().eval()
    texts, texts_b = ["the ride was fine", "no"], ["i would go again tomorrow", "never ever again"]
    tokenized = s.encode_texts(texts, texts_b)
    assert tokenized["token_type_ids"].any()  # the second sentences are type 1
    cached = {k: tokenized[k] for k in ("input_ids", "attention_mask")}
    def cls_state(batch):  # the new head is near-constant: compare the [CLS] state it reads
        with torch.no_grad():
            return s(batch, want=frozenset({"hidden"})).hidden_states[-1][:, 0]

    as_served = cls_state(tokenized)
    assert torch.allclose(cls_state(cached), as_served, atol=1e-5)
    no_types = cls_state({**cached, "token_type_ids": torch.zeros_like(cached["input_ids"])})
    assert not torch.allclose(no_types, as_served, atol=1e-3)  # the check can fail: types change the states
