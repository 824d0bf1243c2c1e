"""The runner: byte-identical output across workers, resume, provenance, summaries, CLI errors."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from augment.config import AugmentConfig, TangParams, method_params
from augment.run import augment, main
from augment.tang import TangAugmenter
from data.io import run_cli
from data.rows import ROW_SCHEMA, make_row_id, write_rows

WORDS = "the a my your cat dog car train fast slow happy sad runs drives sleeps jumps over under near".split()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """120 synthetic sentences plus bad rows, in ROW_SCHEMA, some of them pairs."""
    root = tmp_path_factory.mktemp("augdata")
    texts = [" ".join(WORDS[(i * k) % len(WORDS)] for k in range(1, 4 + i % 9)) for i in range(120)]
    texts += ["", "  ", "solo", "🚗💨 vroom", "naïve café ☕"]
    n = len(texts)
    table = pa.Table.from_pydict({
        "row_id": [f"src{i:04d}" for i in range(n)], "text": texts,
        "text_b": [f"pair {i}" if i % 10 == 0 else None for i in range(n)], "label": [i % 3 for i in range(n)],
        "split": ["train"] * n, "source_id": [None] * n, "method": ["original"] * n, "provenance": [None] * n},
        schema=ROW_SCHEMA)
    write_rows(table, root / "train.parquet")
    return root


def config(data_dir, out, **kw) -> AugmentConfig:
    return AugmentConfig(data_dir=str(data_dir), out_dir=str(out), cache_dir=str(out / "cache"), chunk_rows=20,
                         progress=False, tang=TangParams(n_iter=5), **kw)


def test_same_bytes_whatever_the_number_of_workers(data_dir, tmp_path):
    one = augment(config(data_dir, tmp_path / "w1", workers=1))[0]
    two = augment(config(data_dir, tmp_path / "w2", workers=2))[0]
    a = (tmp_path / "w1" / "tang.parquet").read_bytes()
    assert a == (tmp_path / "w2" / "tang.parquet").read_bytes()
    assert one["rows_out"] == two["rows_out"] > 0
    other_seed = augment(config(data_dir, tmp_path / "s2", seed=99))[0]
    assert (tmp_path / "s2" / "tang.parquet").read_bytes() != a and other_seed["rows_in"] == one["rows_in"]


def test_provenance_round_trip_and_row_contract(data_dir, tmp_path):
    cfg = config(data_dir, tmp_path)
    summary = augment(cfg)[0]
    out = pq.read_table(tmp_path / "tang.parquet")
    assert out.schema.equals(ROW_SCHEMA)
    src = pq.read_table(data_dir / "train.parquet").to_pylist()
    by_id = {r["row_id"]: r for r in src}
    seen_samples = {}
    for r in out.to_pylist():
        p = json.loads(r["provenance"])
        assert p["method"] == "tang" == r["method"] and p["seed"] == cfg.seed
        assert p["params"] == method_params(cfg, "tang") and p["tagger"] and p["tokenizer"] == "tweet"
        assert 0 <= p["sample"] < cfg.tang.n_iter
        s = by_id[r["source_id"]]
        assert r["label"] is None and r["split"] == s["split"] and r["text_b"] == s["text_b"]
        assert r["row_id"] == make_row_id(r["source_id"], r["text"])
        seen_samples.setdefault(r["source_id"], []).append(p["sample"])
    assert all(v == sorted(set(v)) for v in seen_samples.values())  # one row per kept draw, in draw order
    order = [r["row_id"] for r in src]
    firsts = list(dict.fromkeys(out.column("source_id").to_pylist()))
    assert firsts == [i for i in order if i in set(firsts)], "rows are written in source order"
    assert summary["rows_in"] == len(src) and summary["rows_out"] == out.num_rows
    assert summary["skipped"] == {"empty or whitespace-only text": 2}
    assert summary["notes"]["one_token_rows"] == 1
    assert summary["rows_out"] + summary["duplicates_dropped"] == (len(src) - 2) * cfg.tang.n_iter
    saved = json.loads((tmp_path / "tang.summary.json").read_text())
    assert saved["rows_out"] == out.num_rows and saved["identity"]["tagger"]


class StopAfter(TangAugmenter):
    """The real augmenter, interrupted after `limit` chunks, counting the chunks it processes."""

    calls: list[int] = []
    limit = 10**9

    def process(self, chunk, start):
        if len(StopAfter.calls) >= StopAfter.limit:
            raise KeyboardInterrupt
        StopAfter.calls.append(start)
        return super().process(chunk, start)


def test_resume_after_interruption_gives_the_same_bytes(data_dir, tmp_path, monkeypatch):
    augment(config(data_dir, tmp_path / "full"))
    expected = (tmp_path / "full" / "tang.parquet").read_bytes()
    import augment.run as run_mod

    monkeypatch.setattr(run_mod, "make_augmenter",
                        lambda cfg, m: StopAfter(cfg.tang, cfg.seed, cfg.cache_dir, cfg.workers))
    StopAfter.calls, StopAfter.limit = [], 3
    with pytest.raises(KeyboardInterrupt):
        augment(config(data_dir, tmp_path / "cut"))
    assert not (tmp_path / "cut" / "tang.parquet").exists()
    assert len(list((tmp_path / "cut" / ".parts").rglob("part-*.parquet"))) == 3
    torn = next((tmp_path / "cut" / ".parts").rglob("part-00002.parquet"))
    torn.write_bytes(torn.read_bytes()[:100])  # as after a power cut: must be recomputed, not trusted
    StopAfter.calls, StopAfter.limit = [], 10**9
    augment(config(data_dir, tmp_path / "cut"))
    assert StopAfter.calls == [40, 60, 80, 100, 120], "complete parts must not be redone"
    assert (tmp_path / "cut" / "tang.parquet").read_bytes() == expected
    assert not list((tmp_path / "cut" / ".parts").iterdir()), "parts are removed once combined"
    assert augment(config(data_dir, tmp_path / "cut"))[0].get("reused") is True


def test_cli_prints_a_summary_and_one_line_errors(data_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        run_cli(main, [f"data_dir={data_dir}", f"out_dir={tmp_path}", f"cache_dir={tmp_path / 'c'}",
                       "tang.n_iter=2", "progress=false"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "tang: 125 rows in ->" in out and "2 skipped" in out
    for bad in (["methods=[eda]"], ["tang.p_mask=2"], [f"data_dir={tmp_path / 'missing'}"], ["nope=1"]):
        with pytest.raises(SystemExit) as e:
            run_cli(main, bad + [f"out_dir={tmp_path}"])
        assert e.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and "\n" not in err


def _cli(args: list[str], crash: str | None = None):
    """`python -m augment.run` in a child process, optionally SIGKILLed at a fault point."""
    env = dict(os.environ, DISTIL_CRASH_AT=crash or "")
    root = Path(__file__).resolve().parent.parent
    return subprocess.run([sys.executable, "-m", "augment.run", *args], cwd=root, env=env, capture_output=True,
                          text=True, timeout=120)


def test_kill_9_mid_run_then_rerun_gives_the_same_bytes(data_dir, tmp_path):
    augment(config(data_dir, tmp_path / "ref"))  # the same settings as `args`, in-process
    args = [f"data_dir={data_dir}", "chunk_rows=20", "tang.n_iter=5", "progress=false"]
    out = [f"out_dir={tmp_path / 'cut'}", f"cache_dir={tmp_path / 'c2'}"]
    killed = _cli(args + out, crash="augment-part-committed:3")
    assert killed.returncode == -9  # SIGKILL: no cleanup ran
    assert len(list((tmp_path / "cut" / ".parts").rglob("part-*.parquet"))) == 3
    worker_killed = _cli(args + out + ["workers=2"], crash="augment-part-committed:1")
    assert worker_killed.returncode == 2 and "worker process died" in worker_killed.stderr
    done = _cli(args + out + ["workers=2"])
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "cut" / "tang.parquet").read_bytes() == (tmp_path / "ref" / "tang.parquet").read_bytes()
