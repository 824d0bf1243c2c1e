"""A cache that travels and explains itself: it carries its teacher's tokenizer (a small-BERT student takes it or
is refused), it is checksummed once rather than on every read, and `pipeline.inspect` says what is in it."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

import pipeline.cache_reader as cache_reader
from data.io import UserError, sha256_files
from pipeline.cache_reader import TeacherCache
from pipeline.cache_schema import MANIFEST, STAMP, TOKENIZER_DIR, Manifest, arrow_path, tokenizer_files
from pipeline.cache_sync import pull, push
from trainer.students import RunInputs
from trainer.students.smallbert import SmallBertStudent
from trainer.train import TrainConfig


def _moved(cache_dir: Path, tmp_path: Path) -> Path:
    """The cache copied to 'another machine': the teacher folder its manifest names does not exist there."""
    dst = tmp_path / "moved"
    shutil.copytree(cache_dir, dst)
    manifest = json.loads((dst / MANIFEST).read_text())
    manifest["teacher"]["path"] = str(tmp_path / "no-such-teacher")
    (dst / MANIFEST).write_text(json.dumps(manifest))
    return dst


def test_cache_carries_the_teacher_tokenizer(tiny_cache, tmp_path):
    run, cache_dir = tiny_cache
    own = cache_dir / TOKENIZER_DIR
    assert [p.name for p in tokenizer_files(own)] == [p.name for p in tokenizer_files(Path(run.teacher.out_dir))]
    assert sha256_files(tokenizer_files(own)) == Manifest.load(cache_dir).teacher.tokenizer_sha256
    moved = TeacherCache(_moved(cache_dir, tmp_path))
    assert moved.tokenizer_dir == moved.dir / TOKENIZER_DIR
    (moved.dir / TOKENIZER_DIR / "tokenizer_config.json").write_text("{}")
    with pytest.raises(UserError, match="does not match the manifest's tokenizer checksum"):
        TeacherCache(moved.dir).tokenizer_dir
    shutil.rmtree(moved.dir / TOKENIZER_DIR)  # a cache built before caches carried one, far from its teacher
    assert TeacherCache(moved.dir).tokenizer_dir is None


def test_smallbert_takes_the_cache_tokenizer_or_is_refused(tiny_cache, tmp_path):
    from transformers import AutoTokenizer

    run, cache_dir = tiny_cache
    cache = TeacherCache(_moved(cache_dir, tmp_path))
    inputs = RunInputs(cache, ["train"], TrainConfig())
    student = SmallBertStudent.for_run({"source": run.teacher.out_dir, "num_layers": 1, "num_labels": 3}, inputs)
    assert student.tokenizer.name_or_path == str(cache.dir / TOKENIZER_DIR)
    assert student.config.max_length == cache.manifest.max_length == 48  # truncates where the teacher did

    other = tmp_path / "other-vocab"  # the teacher's weights, a tokenizer with one more token (MPNet vs MiniLM)
    shutil.copytree(run.teacher.out_dir, other)
    tok = AutoTokenizer.from_pretrained(str(other))
    tok.add_tokens(["blorptastic"])
    tok.save_pretrained(str(other))
    with pytest.raises(UserError, match=r"vocabulary of its source .* is not the teacher's"):
        SmallBertStudent.for_run({"source": str(other), "num_layers": 1, "num_labels": 3}, inputs)


def test_shards_are_checksummed_once(tiny_cache, tmp_path, monkeypatch):
    cache_dir = tmp_path / "copy"
    shutil.copytree(tiny_cache[1], cache_dir)
    (cache_dir / STAMP).unlink()  # as pulled or built by an older version
    hashed = []
    real = cache_reader.sha256_file
    monkeypatch.setattr(cache_reader, "sha256_file", lambda p, *a: hashed.append(Path(p).name) or real(p, *a))
    cache = TeacherCache(cache_dir)
    n = len(cache.manifest.shards)
    assert cache.verify() == n and len(hashed) >= n  # every shard once
    hashed.clear()
    assert TeacherCache(cache_dir).verify() == n and hashed == []  # then not again
    first = cache.manifest.shards[0]
    path = arrow_path(cache_dir, first.name)
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 1000))  # touched: checksummed again
    assert TeacherCache(cache_dir).verify() == n and hashed == [path.name]
    hashed.clear()
    assert TeacherCache(cache_dir).verify(full=True) == n and len(hashed) >= n
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(UserError, match=f"shard {first.name}: Arrow checksum mismatch"):
        TeacherCache(cache_dir).verify()


def test_pull_carries_the_tokenizer_and_checksums_once(tiny_cache, tmp_path, monkeypatch):
    cache_dir = tiny_cache[1]
    url = f"file://{tmp_path}/remote"
    push(cache_dir, url)
    assert sorted(p.name for p in (tmp_path / "remote" / TOKENIZER_DIR).iterdir()) == \
        [p.name for p in tokenizer_files(cache_dir / TOKENIZER_DIR)]
    mirror = tmp_path / "mirror"
    pull(url, mirror)
    assert TeacherCache(_moved(mirror, tmp_path)).tokenizer_dir is not None
    hashed = []
    real = cache_reader.sha256_file
    monkeypatch.setattr(cache_reader, "sha256_file", lambda p, *a: hashed.append(p) or real(p, *a))
    n = len(Manifest.load(mirror).shards)
    assert pull(url, mirror) == {"shards": 0, "bytes": 0, "kept": n} and hashed == []  # a second pull reads nothing


def test_inspect_reports_the_cache(tiny_cache, capsys):
    from pipeline.inspect import main

    cache = TeacherCache(tiny_cache[1])
    assert main([str(cache.dir), "--rows", "6", "--verify", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["schema_version"] == cache.manifest.schema_version and info["tokenizer"]["where"] == "cache"
    assert info["tokenizer"]["vocab_size"] == 30522 and info["verified"]
    test_rows = cache.row_table(["test"], ["label"]).column("label").to_pylist()
    test = info["sets"]["test"]
    assert test["rows"] == len(test_rows) and sum(test["labels"].values()) == len(test_rows)
    assert sum(test["length"]["histogram"].values()) == len(test_rows)
    logits = np.concatenate([cache.reader(s).read(0, s.rows)["logits"] for s in cache.shards(["test"])])
    assert test["teacher"]["accuracy"] == round(float(np.mean(logits.argmax(-1) == np.array(test_rows))), 4)
    per_row = info["bytes"]["per_row_by_field"]
    assert per_row["logits"] == 4 * len(cache.label_names)  # float32 per class
    assert {"hidden", "attention"} <= set(per_row) and info["data"]["quarantined"] is not None
    assert len(info["samples"]) == 6 and {r["teacher"] for r in info["samples"]} <= set(cache.label_names)
    assert main([str(cache.dir)]) == 0 and "teacher acc" in capsys.readouterr().out
    with pytest.raises(UserError, match="--rows -1"):
        main([str(cache.dir), "--rows", "-1"])


def test_student_from_a_moved_cache_predicts_as_the_teacher_tokenised(tiny_cache, tmp_path):
    """Copy the cache elsewhere, the teacher folder gone: a small BERT (initialised from the shipped MiniLM, which
    shares the teacher's vocabulary) trains, saves the cache's tokenizer and reads new text as the teacher did."""
    import numpy as np

    import trainer
    from data.config import load_config
    from trainer.train import train_all

    cache = TeacherCache(_moved(tiny_cache[1], tmp_path))
    items = {"cache": cache.dir, "out_dir": tmp_path / "out", "runs": "[{student: smallbert, loss: hinton, "
             "student_params: {source: minilm, num_layers: 1}}]", "epochs": 1, "batch_size": 32,
             "max_steps_per_epoch": 2, "checkpoint_every": 0, "measure_latency": False, "baseline": False,
             "tensorboard": False}
    (result,) = train_all(load_config(TrainConfig, None, [f"{k}={v}" for k, v in items.items()]))
    predictor = trainer.load(str(tmp_path / "out" / result["run"] / "best"))
    assert predictor.model.config.max_length == cache.manifest.max_length
    rows = cache.row_table(["test"], ["text", "input_ids"])
    texts, cached = rows.column("text").to_pylist(), rows.column("input_ids").to_pylist()
    batch = predictor.model.encode_texts(texts)
    for i, ids in enumerate(cached):  # the deployed student's ids are the ones the teacher saw (truncation too)
        assert batch["input_ids"][i][: len(ids)].tolist() == ids and batch["attention_mask"][i].sum() == len(ids)
    assert set(predictor.predict(texts[:5])) <= set(cache.label_names)
    assert np.isfinite(predictor.predict_proba(texts[:5]).numpy()).all()
