"""TinyBERT substitution with a real (1-layer, briefly trained) MiniLM MLM and real GloVe."""
from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from augment.config import AugmentConfig, TinyBertParams
from augment.glove import NeighbourTable
from augment.mlm import META, load_mlm
from augment.run import augment
from augment.tinybert import TinyBertAugmenter, match_case
from data.io import UserError
from data.rows import ROW_SCHEMA, write_rows

TEXTS = [
    "My car drives itself to work while the commuters watch",
    "I played the xylophone at the concert last night",
    "Driverless cars are scary on the highway",
    "",
    "the and of",
    "😀😀 🚗",
    "Tweeting from the autonomous bus http://t.co/abc #driverless @bob",
    "Happy",
]


def rows_table(texts: list[str]) -> pa.Table:
    n = len(texts)
    return pa.Table.from_pydict({
        "row_id": [f"id{i:03d}" for i in range(n)], "text": texts, "text_b": [None] * n, "label": [0] * n,
        "split": ["train"] * n, "source_id": [None] * n, "method": ["original"] * n, "provenance": [None] * n},
        schema=ROW_SCHEMA)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("tinybert")
    data = root / "data"
    write_rows(rows_table(TEXTS * 3), data / "train.parquet")
    params = TinyBertParams(n_samples=6, mlm_dir=str(root / "mlm"), mlm_layers=1, mlm_steps=3, mlm_texts=16,
                            mlm_batch=64, batch=8)
    aug = TinyBertAugmenter(params, seed=7, cache_dir=root / "cache", data_dir=data)
    ident = aug.prepare(rows_table(TEXTS))
    return {"root": root, "data": data, "params": params, "aug": aug, "ident": ident}


def test_minilm_mlm_is_built_once_as_a_safetensors_folder(env):
    folders = list((env["root"] / "mlm").iterdir())
    assert len(folders) == 1
    folder = folders[0]
    assert (folder / "model.safetensors").is_file() and (folder / META).is_file()
    meta = json.loads((folder / META).read_text())
    assert meta["steps"] == 3 and meta["layers"] == 1 and meta["corpus_fingerprint"]
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    again = TinyBertAugmenter(env["params"], seed=7, cache_dir=env["root"] / "cache", data_dir=env["data"])
    assert again.prepare(rows_table(TEXTS[:2]))["mlm"] == env["ident"]["mlm"]
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp, "the MLM must be reused, not rebuilt"


def test_single_piece_words_take_mlm_candidates_multi_piece_take_glove(env):
    aug = env["aug"]
    counts = Counter()
    (words, cands), = aug.candidates([TEXTS[0]], counts)
    by_word = {w.norm: (w, c) for w, c in zip(words, cands)}
    car, car_cands = by_word["car"]
    assert len(car.pieces) == 1
    (seg_words, ids), = aug.segment([TEXTS[0]])
    alone = aug.mlm.topk([(ids, car.pieces[0])], aug.p.k)[0]
    assert car_cands == aug._keep(alone), "MLM candidates do not depend on the batch"
    com, com_cands = by_word["commuters"]
    assert len(com.pieces) > 1
    assert com_cands and com_cands == aug._keep(aug.glove.get("commuters"))
    assert "commuter" in com_cands or "commuting" in com_cands
    assert "itself" not in by_word and "the" not in by_word, "stop words are left alone"
    assert counts["mlm_words"] >= 3 and counts["glove_words"] == 1


def test_batched_candidates_match_one_at_a_time(env):
    aug = env["aug"]
    items = []
    for words, ids in aug.segment(TEXTS):
        items += [(ids, w.pieces[0]) for w in words if len(w.pieces) == 1]
    batched = aug.mlm.topk(items, 15)
    single = [aug.mlm.topk([it], 15)[0] for it in items]
    same = sum(a == b for a, b in zip(batched, single))
    assert same >= 0.9 * len(items)  # float noise may swap near-ties only


def test_glove_table_is_kept_on_disk_and_missing_words_counted(env):
    table = NeighbourTable("shipped", 100_000, 15, env["root"] / "cache")
    assert table.path().is_file()
    got = table.ensure({"commuters", "xylophone", "driverless"})
    assert got == {"computed": 0, "not_in_vectors": 0, "cached": 3}
    assert table.get("driverless") == [] and len(table.get("xylophone")) == 15
    s = env["aug"].process(rows_table(TEXTS), 0)
    assert s.counts["glove_missing_words"] >= 1  # "driverless" is kept as it is
    assert s.counts["skip:empty or whitespace-only text"] == 1
    assert s.counts["skip:no replaceable word (stop words / non-alphabetic only)"] == 2
    assert s.counts["non_ascii_rows"] == 1
    for i, t in zip(s.src, s.text):
        if i == 6:
            assert "http://t.co/abc #driverless @bob" in t, "URLs, hashtags and mentions are protected"
    assert all("Driverless" in t for i, t in zip(s.src, s.text) if i == 2)


def test_user_glove_text_file_and_missing_files(env, tmp_path):
    glove = tmp_path / "tiny.txt"
    vecs = {"king": [1, 0, 0], "queen": [0.9, 0.1, 0], "prince": [0.8, 0.2, 0.1], "apple": [0, 0, 1]}
    glove.write_text("".join(f"{w} {' '.join(map(str, v))}\n" for w, v in vecs.items()))
    t = NeighbourTable(str(glove), 0, 2, tmp_path)
    t.ensure({"king", "banana"})
    assert t.get("king") == ["queen", "prince"] and t.get("banana") == []
    with pytest.raises(UserError, match="not found"):
        NeighbourTable(str(tmp_path / "nope.txt"), 0, 2, tmp_path)
    with pytest.raises(UserError, match="cannot load masked LM"):
        load_mlm(str(tmp_path / "no-such-model"))


def test_sampling_replaces_with_candidates_and_matches_case(env):
    aug = env["aug"]
    text = "Happy CARS drive"
    words, cands = aug.candidates([text], Counter())[0]
    cands = [["glad"], ["trucks"], ["ride"]][: len(words)]
    out = aug.sample(text, words, cands, np.random.default_rng(0))
    kept = [s for s in out if s]
    assert kept and all(s != text for s in kept) and len(kept) == len(set(kept))
    assert any("Glad" in s or "TRUCKS" in s or "ride" in s for s in kept)
    assert match_case("Car", "truck") == "Truck" and match_case("CAR", "truck") == "TRUCK"


def test_union_of_both_methods_and_same_bytes_with_two_workers(env, tmp_path):
    cfg = AugmentConfig(data_dir=str(env["data"]), methods=["tang", "tinybert"], tinybert=env["params"],
                        out_dir=str(tmp_path / "out"), cache_dir=str(env["root"] / "cache"), chunk_rows=7,
                        progress=False, max_rows=16)
    cfg.tang.n_iter = 4
    summaries = {s["method"]: s for s in augment(cfg)}
    cfg.out_dir, cfg.workers, cfg.methods = str(tmp_path / "out2"), 2, ["tinybert"]
    augment(cfg)  # two spawned workers, each loading the MLM with one torch thread
    assert (tmp_path / "out2" / "tinybert.parquet").read_bytes() == (tmp_path / "out" / "tinybert.parquet").read_bytes()
    tang = pq.read_table(tmp_path / "out" / "tang.parquet")
    tiny = pq.read_table(tmp_path / "out" / "tinybert.parquet")
    union = pq.read_table(tmp_path / "out" / "union.parquet")
    assert union.num_rows == tang.num_rows + tiny.num_rows - summaries["union"]["duplicates_dropped"]
    assert set(union.column("method").to_pylist()) == {"tang", "tinybert"}
    assert len(set(union.column("row_id").to_pylist())) == union.num_rows
    prov = json.loads(tiny.column("provenance")[0].as_py())
    assert prov["mlm"] == env["ident"]["mlm"] and prov["glove"].startswith("glove-6B-50d")


def test_last_layer_at_the_mask_only_equals_the_full_forward(env):
    import torch

    mlm = env["aug"].mlm
    assert mlm.bert_like
    items = [(ids, w.pieces[0]) for words, ids in env["aug"].segment(TEXTS[:3]) for w in words if len(w.pieces) == 1]
    fast = mlm.topk(items, 15)
    mlm.bert_like = False
    try:
        full = mlm.topk(items, 15)
        built = [mlm.build(*it) for it in items[:4]]
        width = max(len(b[0]) for b in built)
        ids = torch.zeros((4, width), dtype=torch.long)
        att = torch.zeros_like(ids)
        types = torch.zeros_like(ids)
        for r, (x, t, _) in enumerate(built):
            ids[r, : len(x)], types[r, : len(t)], att[r, : len(x)] = torch.tensor(x), torch.tensor(t), 1
        pos = torch.tensor([b[2] for b in built])
        with torch.inference_mode():
            a = mlm.masked_states(ids, att, pos, {"token_type_ids": types})
            b = mlm.model.base_model(input_ids=ids, attention_mask=att, token_type_ids=types)[0][torch.arange(4), pos]
        assert torch.allclose(a, b, atol=1e-4)
    finally:
        mlm.bert_like = True
    assert fast == full


def test_device_option_is_validated_resolved_and_kept_out_of_provenance(env, monkeypatch):
    import torch

    from augment.config import method_params
    from data.config import ConfigError

    for bad in ("gpu", "cuda:x", "CPU", "cuda:0:1"):
        with pytest.raises(ConfigError, match="tinybert.device") as e:
            AugmentConfig(tinybert=TinyBertParams(device=bad))
        assert "\n" not in str(e.value)
    for ok in ("auto", "cpu", "cuda", "cuda:1"):
        AugmentConfig(tinybert=TinyBertParams(device=ok))
    assert "device" not in method_params(AugmentConfig(), "tinybert"), "where, not what: never in the rows"

    def augmenter(device):
        return TinyBertAugmenter(TinyBertParams(device=device, glove="none"), seed=7, cache_dir=env["root"] / "cache",
                                 data_dir=env["data"])

    assert augmenter("cpu").device == "cpu"
    assert augmenter("auto").device == ("cuda" if torch.cuda.is_available() else "cpu")
    assert env["aug"].parallel == (env["aug"].device == "cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match="tinybert.device=cuda:1 asked for"):
        augmenter("cuda:1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    gpu = augmenter("auto")
    assert gpu.device == "cuda" and not gpu.parallel, "on a GPU chunks run in the one process holding the model"


def test_cpu_and_auto_give_the_same_bytes_on_a_cpu_machine(env, tmp_path):
    import dataclasses

    import torch

    if torch.cuda.is_available():
        pytest.skip("auto means cuda here: candidates may differ from the CPU's by float noise")
    outs = []
    for device in ("cpu", "auto"):
        cfg = AugmentConfig(data_dir=str(env["data"]), methods=["tinybert"], out_dir=str(tmp_path / device),
                            tinybert=dataclasses.replace(env["params"], device=device),
                            cache_dir=str(env["root"] / "cache"), chunk_rows=4, progress=False, max_rows=8)
        augment(cfg)
        outs.append((tmp_path / device / "tinybert.parquet").read_bytes())
    assert outs[0] == outs[1]
