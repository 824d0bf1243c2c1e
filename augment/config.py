"""Typed configuration of `python -m augment.run` (filled by data.config.parse_cli)."""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field

from data.config import ConfigError

METHODS = ("tang", "tinybert")


@dataclass
class TangParams:
    """Tang et al. 2019 rules; defaults are the paper's."""

    p_mask: float = 0.1  # word -> [MASK]
    p_pos: float = 0.1  # word -> another corpus word with the same POS tag (unigram draw)
    p_ng: float = 0.25  # keep only a random n-gram of the sample
    ng_min: int = 1
    ng_max: int = 5
    n_iter: int = 20  # samples drawn per example (duplicates are dropped, so <= n_iter kept)
    tokenizer: str = "tweet"  # tweet | treebank | wordpunct (NLTK, no NLTK data needed)
    tagger: str = "auto"  # auto (NLTK perceptron if its data is installed, else textblob) | nltk | textblob
    mask_token: str = "[MASK]"


@dataclass
class TinyBertParams:
    """TinyBERT (Jiao et al. 2020) substitution; defaults are the reference script's (SST-2)."""

    n_samples: int = 20  # N draws per example
    k: int = 15  # K candidates per word
    p_t: float = 0.4  # replacement probability per candidate word
    mlm: str = "minilm-mlm"  # "minilm-mlm" (built offline, see augment/mlm.py) or any AutoModelForMaskedLM path / hub name
    mlm_dir: str = "work/mlm"  # where "minilm-mlm" is built once and reused
    mlm_steps: int = 300  # minilm-mlm: head-training steps (encoder frozen)
    mlm_texts: int = 2000  # minilm-mlm: train-split texts whose masked states train the head
    mlm_batch: int = 256  # minilm-mlm: masked positions per step
    mlm_lr: float = 3e-3
    mlm_layers: int = 0  # minilm-mlm: 0 = all 6 encoder layers (tests use 1)
    mlm_seed: int = 0  # minilm-mlm: its own seed, so a new augmentation seed reuses the same MLM
    batch: int = 256  # masked copies per MLM forward
    mlm_dtype: str = "float32"  # float32 (candidates = the reference's) | bfloat16 (~2x faster on CPU; candidates drift)
    max_length: int = 512  # tokens of `[CLS] masked [SEP] original [SEP]`
    glove: str = "shipped"  # "shipped" (GloVe 6B 50d package) or a GloVe / word2vec text or .bin file
    glove_vocab: int = 100_000  # search the first V GloVe words (the reference reads 100,000); 0 = all
    skip_stopwords: bool = True  # the reference leaves stop words and non-alphabetic words alone
    drop_special: bool = True  # drop [UNK]/[CLS]/... from MLM candidates (the reference keeps them)
    word_candidates: bool = True  # keep only alphabetic non-stop-word candidates (the reference keeps all but "##")
    protect_twitter: bool = True  # leave words inside URLs, @mentions and #hashtags alone
    device: str = "auto"  # auto (cuda when available, else cpu) | cpu | cuda | cuda:N; where, not what: not in provenance


@dataclass
class AugmentConfig:
    data_dir: str = "work/data/tweets"
    split: str = "train"
    methods: list[str] = field(default_factory=lambda: ["tang"])
    tang: TangParams = field(default_factory=TangParams)
    tinybert: TinyBertParams = field(default_factory=TinyBertParams)
    seed: int = 13
    workers: int = 1  # processes over chunks (TinyBERT: each with one torch thread, so bytes never depend on it)
    max_rows: int = 0  # 0 = all rows of the split, else the first max_rows
    chunk_rows: int = 1000  # rows per part file (the resume unit)
    out_dir: str = "work/augment"
    cache_dir: str = "work/augment/cache"  # POS tags and GloVe neighbour tables (Parquet), reused across runs
    progress: bool = True

    def __post_init__(self) -> None:
        bad = [m for m in self.methods if m not in METHODS]
        if bad or not self.methods:
            raise ConfigError(f"methods: {bad or self.methods} not known; choose from {list(METHODS)}")
        if len(set(self.methods)) != len(self.methods):
            raise ConfigError(f"methods: {self.methods} lists a method twice")
        for name, v in (("workers", self.workers), ("chunk_rows", self.chunk_rows)):
            if v < 1:
                raise ConfigError(f"{name} must be >= 1, got {v}")
        if self.max_rows < 0:
            raise ConfigError(f"max_rows must be >= 0, got {self.max_rows}")
        t, b = self.tang, self.tinybert
        for name, v in (("tang.p_mask", t.p_mask), ("tang.p_pos", t.p_pos), ("tang.p_ng", t.p_ng),
                        ("tinybert.p_t", b.p_t)):
            if not 0.0 <= v <= 1.0:
                raise ConfigError(f"{name} must be in [0, 1], got {v}")
        if t.p_mask + t.p_pos > 1.0:
            raise ConfigError(f"tang.p_mask + tang.p_pos must be <= 1, got {t.p_mask + t.p_pos}")
        if not 1 <= t.ng_min <= t.ng_max:
            raise ConfigError(f"tang n-gram bounds need 1 <= ng_min <= ng_max, got {t.ng_min}..{t.ng_max}")
        for name, v in (("tang.n_iter", t.n_iter), ("tinybert.n_samples", b.n_samples), ("tinybert.k", b.k),
                        ("tinybert.batch", b.batch)):
            if v < 1:
                raise ConfigError(f"{name} must be >= 1, got {v}")
        if b.mlm_dtype not in ("float32", "bfloat16"):
            raise ConfigError(f"tinybert.mlm_dtype: {b.mlm_dtype!r} is not float32 or bfloat16")
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", b.device):
            raise ConfigError(f"tinybert.device: {b.device!r} is not auto, cpu, cuda or cuda:N")
        if t.tokenizer not in ("tweet", "treebank", "wordpunct"):
            raise ConfigError(f"tang.tokenizer: {t.tokenizer!r} is not tweet, treebank or wordpunct")
        if t.tagger not in ("auto", "nltk", "textblob"):
            raise ConfigError(f"tang.tagger: {t.tagger!r} is not auto, nltk or textblob")


OPERATIONAL = {"mlm_dir", "device"}  # where, not what: kept out of provenance (CPU output bytes never change)


def method_params(cfg: AugmentConfig, method: str) -> dict:
    """The parameters that define a method's output (recorded in provenance and run keys)."""
    return {k: v for k, v in dataclasses.asdict(getattr(cfg, method)).items() if k not in OPERATIONAL}
