"""TinyBERT (Jiao et al. 2020) word substitution with a batched MLM and cached GloVe neighbours.

Words are the MLM tokenizer's pre-tokenised words (BERT: whitespace and punctuation
split), found with offsets so untouched text is kept verbatim. As in the reference,
only alphabetic non-stop-words are candidates. A word that is a single WordPiece gets
the top-K MLM predictions at its masked position; a multi-piece word gets its K GloVe
nearest neighbours. Each of N draws replaces every candidate word with probability p_t
by a uniformly chosen candidate (case matched to the original word).
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from augment.config import TinyBertParams
from augment.glove import NeighbourTable
from augment.mlm import BatchedMLM, ensure_minilm_mlm, load_mlm
from augment.parts import Samples, row_seed
from data.io import UserError, pick_device, quiet_transformers
from data.rows import table_fingerprint

# The reference script's stop-word list (NLTK's English list plus "'s", "'re").
STOPWORDS = frozenset("""i me my myself we our ours ourselves you you're you've you'll you'd your yours yourself
yourselves he him his himself she she's her hers herself it it's its itself they them their theirs themselves this
that that'll these those am is are was were be been being have has had having do does did doing a an the and but if
or because as until while of at by for with about against between into through during before after above below to
from up down in out on off over under again further then once here there all any both each few more most other some
such no nor not only own same so than too very s t can will just don don't should should've now d ll m o re ve y ain
aren aren't couldn couldn't didn didn't doesn doesn't hadn hadn't hasn hasn't haven haven't isn isn't ma mightn
mightn't mustn mustn't needn needn't shan shan't shouldn shouldn't wasn wasn't weren weren't won won't wouldn
wouldn't 's 're""".split())
_ALPHA = re.compile(r"[a-z]+")
_TWITTER = re.compile(r"(?:https?://|www\.)\S+|[@#]\w+", re.IGNORECASE)


@dataclass
class Word:
    start: int  # character span in the original text
    end: int
    norm: str  # lowercased, accent-stripped form (GloVe key)
    pieces: list[int]  # positions of its pieces in the sentence's piece list


def match_case(original: str, word: str) -> str:
    if len(original) > 1 and original.isupper():
        return word.upper()
    if original[:1].isupper():
        return word[:1].upper() + word[1:]
    return word


def _one_thread(fn, *args, device: str = "cpu"):
    """Run with one torch thread: float results, hence candidates, never depend on `workers`
    (parallelism comes from worker processes). The caller's thread setting is restored.
    On a GPU the MLM's floats do not depend on CPU threads and there are no workers: left as is."""
    import torch

    if device != "cpu":
        return fn(*args)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return fn(*args)
    finally:
        torch.set_num_threads(before)


class TinyBertAugmenter:
    name = "tinybert"
    parallel = True
    start_method = "spawn"  # workers load the MLM themselves: no fork of a process that ran torch

    def __init__(self, params: TinyBertParams, seed: int, cache_dir: str | Path, data_dir: str | Path,
                 log=print):
        self.p, self.seed, self.data_dir, self.log = params, seed, Path(data_dir), log
        self.glove = None if params.glove == "none" else NeighbourTable(params.glove, params.glove_vocab, params.k, cache_dir)
        self.mlm: BatchedMLM | None = None
        self.model_name = self.mlm_id = ""
        # The MLM runs on one device. On a GPU every chunk runs in this process (one CUDA
        # context; spawned workers would each load the model onto the same GPU).
        self.device = str(pick_device(params.device, "tinybert.device"))
        self.parallel = self.device == "cpu"

    def __getstate__(self) -> dict:
        """What a worker process needs: the model is reloaded there, not sent through a pipe."""
        return dict(self.__dict__, mlm=None, log=None)

    def _load(self) -> None:
        import torch

        quiet_transformers()
        model, tok, mlm_id = load_mlm(self.model_name, identify=not self.mlm_id)
        self.mlm_id = self.mlm_id or mlm_id
        if self.p.mlm_dtype == "bfloat16":
            model = model.to(torch.bfloat16)
        if self.device != "cpu":
            model = model.to(self.device)
        self.mlm = BatchedMLM(model, tok, batch=self.p.batch, max_length=self.p.max_length,
                              drop_special=self.p.drop_special)

    def _model_name(self) -> str:
        if self.p.mlm != "minilm-mlm":
            return self.p.mlm
        from data.prepare import load_split

        train = load_split(self.data_dir, "train")
        folder = ensure_minilm_mlm(self.p.mlm_dir, train.column("text").to_pylist(), table_fingerprint(train),
                                   steps=self.p.mlm_steps, batch=self.p.mlm_batch, lr=self.p.mlm_lr,
                                   layers=self.p.mlm_layers, n_texts=self.p.mlm_texts, seed=self.p.mlm_seed,
                                   log=self.log)
        return str(folder)

    def prepare(self, rows: pa.Table) -> dict:
        quiet_transformers()
        self.model_name = self._model_name()  # builds minilm-mlm once (all cores) when it is missing
        self._load()
        if self.device != "cpu" and self.log:
            self.log(f"tinybert: MLM on {self.device}; chunks run in this process (no worker processes)")
        glove_id = "none"
        if self.glove is not None:
            words = {w.norm for ws, _ in self.segment(rows.column("text").to_pylist()) for w in ws
                     if len(w.pieces) > 1}
            self.glove.ensure(words)  # every neighbour this input needs, computed once, kept on disk
            glove_id = self.glove.identity
        return {"mlm": self.mlm_id, "glove": glove_id}

    def segment(self, texts: list[str]) -> list[tuple[list[Word], list[int]]]:
        """Per text: its candidate words and its piece ids (no special tokens)."""
        tok = self.mlm.tok
        norm = tok.backend_tokenizer.normalizer
        enc = tok(texts, add_special_tokens=False, return_offsets_mapping=True)
        out = []
        for n, text in enumerate(texts):
            ids, offsets, wids = enc["input_ids"][n], enc["offset_mapping"][n], enc.word_ids(n)
            groups: dict[int, list[int]] = {}
            for i, w in enumerate(wids):
                if w is not None:
                    groups.setdefault(w, []).append(i)
            words = []
            shielded = [m.span() for m in _TWITTER.finditer(text)] if self.p.protect_twitter else []
            for pieces in groups.values():
                start, end = offsets[pieces[0]][0], offsets[pieces[-1]][1]
                if any(a < end and start < b for a, b in shielded):
                    continue
                surface = text[start:end]
                key = (norm.normalize_str(surface) if norm is not None else surface).lower()
                if not _ALPHA.fullmatch(key) or (self.p.skip_stopwords and key in STOPWORDS):
                    continue
                words.append(Word(start, end, key, pieces))
            out.append((words, ids))
        return out

    def candidates(self, texts: list[str], counts: Counter) -> list[tuple[list[Word], list[list[str]]]]:
        """Per text: its candidate words and each word's candidates (batched over all texts)."""
        seg = self.segment(texts)
        items, where = [], []
        cands: list[list[list[str]]] = []
        for n, (words, ids) in enumerate(seg):
            cands.append([[] for _ in words])
            for m, w in enumerate(words):
                if len(w.pieces) == 1:
                    items.append((ids, w.pieces[0]))
                    where.append((n, m))
                elif self.glove is None:
                    counts["glove_disabled_words"] += 1
                else:
                    nn = self.glove.get(w.norm) if w.norm in self.glove.table else self._glove_late(w.norm)
                    counts["glove_words" if nn else "glove_missing_words"] += 1
                    cands[n][m] = self._keep(nn)
        for (n, m), got in zip(where, _one_thread(self.mlm.topk, items, self.p.k, device=self.device)):
            counts["mlm_words" if got is not None else "mlm_word_beyond_max_length"] += 1
            cands[n][m] = self._keep(got or [])
        return [(seg[n][0], cands[n]) for n in range(len(texts))]

    def _keep(self, cands: list[str]) -> list[str]:
        """Content words replace content words: the offline MLM ranks frequent function words high."""
        if not self.p.word_candidates:
            return cands
        return [c for c in cands if c.isalpha() and c.lower() not in STOPWORDS]

    def _glove_late(self, word: str) -> list[str]:
        self.glove.ensure({word})
        return self.glove.get(word)

    def process(self, chunk: pa.Table, start: int) -> Samples:
        if not self.model_name:
            raise UserError("tinybert: prepare() must run before process()")
        if self.mlm is None:  # a worker process
            self._load()
        out = Samples()
        texts = chunk.column("text").to_pylist()
        ids = chunk.column("row_id").to_pylist()
        for j, (words, cands) in enumerate(self.candidates(texts, out.counts)):
            text = texts[j]
            if not text.strip():
                out.counts["skip:empty or whitespace-only text"] += 1
                continue
            if not text.isascii():
                out.counts["non_ascii_rows"] += 1
            if not words:
                out.counts["skip:no replaceable word (stop words / non-alphabetic only)"] += 1
                continue
            rng = np.random.default_rng(row_seed(self.seed, self.name, ids[j]))
            for i, sample in enumerate(self.sample(text, words, cands, rng)):
                if sample is None:
                    out.counts["duplicates"] += 1
                else:
                    out.add(j, sample, i)
        return out

    def sample(self, text: str, words: list[Word], cands: list[list[str]], rng: np.random.Generator) -> list[str | None]:
        """N draws; None marks a draw identical to the original or an earlier draw.

        Draw order per row is fixed: a (N, words) matrix for the candidate choice, then one
        for the replacement coin. A word without candidates keeps itself (as the reference).
        """
        n, w = self.p.n_samples, len(words)
        choice = rng.random((n, w))
        coin = rng.random((n, w)) < self.p.p_t
        seen, result = {text}, []
        for i in range(n):
            parts, last = [], 0
            for m, word in enumerate(words):
                if coin[i, m] and cands[m]:
                    original = text[word.start : word.end]
                    new = match_case(original, cands[m][int(choice[i, m] * len(cands[m]))])
                    parts.append(text[last : word.start])
                    parts.append(new)
                    last = word.end
            s = "".join(parts) + text[last:]
            result.append(None if s in seen else s)
            seen.add(s)
        return result
