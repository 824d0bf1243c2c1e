"""Docs that run: every ```yaml block of README.md and docs/*.md fills its config dataclass through the
project's own loader (unknown keys and bad types fail), and README's inference example runs on a tiny
student. docs/losses.md's ```python block is an API sketch (undefined `student`, `batch`): not run here."""
from __future__ import annotations

import ast
import re

import pytest
import torch
import yaml

from augment.config import AugmentConfig
from data.config import load_config
from pipeline.run_config import RunConfig, check_settings
from tests.conftest import REPO
from recipes.compare import CompareConfig
from trainer.run_key import check_config
from trainer.train import TrainConfig, plan_runs

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)


def _check_train(cfg: TrainConfig) -> None:
    check_config(cfg, plan_runs(cfg))  # student and loss names, loss params, stages


# the config a block fills: the first whose fields hold every top-level key, then its own checks
CONFIGS = [(TrainConfig, _check_train), (RunConfig, lambda cfg: check_settings(cfg.cache)),
           (AugmentConfig, lambda cfg: None), (CompareConfig, lambda cfg: _check_train(cfg.train))]


def blocks(lang: str) -> list:
    """The fenced blocks of `lang`, each with its file and line as the test id."""
    found = []
    for doc in DOCS:
        text = doc.read_text()
        for m in FENCE.finditer(text):
            if m.group(1) == lang:
                found.append(pytest.param(m.group(2), id=f"{doc.name}:{text.count(chr(10), 0, m.start()) + 1}"))
    return found


def test_docs_have_yaml_examples():
    assert blocks("yaml"), "no ```yaml block left in README.md or docs/: this test would check nothing"


@pytest.mark.parametrize("body", blocks("yaml"))
def test_yaml_block_fills_its_config(body, tmp_path):
    keys = set(yaml.safe_load(body))
    fits = [(cls, check) for cls, check in CONFIGS if keys <= set(cls.__dataclass_fields__)]
    assert fits, f"top-level keys {sorted(keys)} fit no config dataclass ({', '.join(c.__name__ for c, _ in CONFIGS)})"
    cls, check = fits[0]
    path = tmp_path / "block.yaml"
    path.write_text(body)
    check(load_config(cls, path))


def test_readme_inference_example_runs(tmp_path, monkeypatch):
    """The README's `trainer.load(...).predict(...)`, verbatim, on a tiny BiLSTM saved where it looks."""
    from trainer.students import build_student, save_student
    from trainer.vocab import Vocab, load_embeddings

    (code,) = [b.values[0] for b in blocks("python") if "trainer.load" in b.values[0]]
    folder = re.search(r'trainer\.load\("([^"]+)"\)', code).group(1)
    vocab = Vocab.build(["what a great ride", "never getting in one of those"])
    torch.manual_seed(0)
    student = build_student("bilstm", {"num_labels": 2}, vocab=vocab, embeddings=load_embeddings(vocab, "glove50")[0])
    save_student(student, tmp_path / folder, label_names=["negative", "positive"])
    monkeypatch.chdir(tmp_path)
    *body, last = ast.parse(code).body
    scope: dict = {}
    exec(compile(ast.Module(body, []), "README.md", "exec"), scope)
    predicted = eval(compile(ast.Expression(last.value), "README.md", "eval"), scope)
    assert len(predicted) == 2 and set(predicted) <= {"negative", "positive"}


def test_cache_format_example_reads_a_shard(tiny_cache):
    """docs/cache-format.md's plain pyarrow + zarr example, verbatim but for the cache path, on a real cache."""
    import numpy as np

    from pipeline.cache_reader import TeacherCache

    (code,) = [b.values[0] for b in blocks("python") if "pa.ipc.open_file" in b.values[0]]
    assert '"work/cache/minilm-tweets"' in code
    scope: dict = {}
    exec(compile(code.replace('"work/cache/minilm-tweets"', repr(str(tiny_cache[1]))), "cache-format.md", "exec"),
         scope)
    cache = TeacherCache(tiny_cache[1])
    info = cache.manifest.shards[0]
    block = cache.reader(info).read(0, info.rows, ("logits", "hidden"))
    np.testing.assert_array_equal(scope["logits"], block["logits"])
    np.testing.assert_array_equal(scope["row0"], block["hidden"][0])
