"""Word tokenisation and POS tagging for the Tang rules, offline.

NLTK's perceptron tagger needs downloaded data; when it is missing (as on these
machines) textblob's lexicon tagger (Penn tags, data inside the wheel) is used. The
tagger actually used is returned as an identity string and recorded in provenance.
"""
from __future__ import annotations

from typing import Callable

from data.io import UserError

Tokenize = Callable[[str], list[str]]
Tagger = Callable[[list[str]], list[str]]


def make_tokenizer(name: str) -> Tokenize:
    """NLTK tokenisers that need no downloaded data."""
    if name == "tweet":  # keeps @user, #tags, URLs and emoticons whole; splits sentence periods
        from nltk.tokenize import TweetTokenizer

        return TweetTokenizer().tokenize
    if name == "treebank":  # the reference's word_tokenize without punkt sentence splitting
        from nltk.tokenize import TreebankWordTokenizer

        return TreebankWordTokenizer().tokenize
    if name == "wordpunct":
        from nltk.tokenize import wordpunct_tokenize

        return wordpunct_tokenize
    raise UserError(f"unknown tokenizer {name!r}: use tweet, treebank or wordpunct")


def _nltk_tagger() -> tuple[Tagger, str]:
    import nltk
    from nltk.tag import PerceptronTagger

    tagger = PerceptronTagger()  # LookupError when the model data is not installed

    def tag(tokens: list[str]) -> list[str]:
        return [t for _, t in tagger.tag(tokens)]

    return tag, f"nltk-{nltk.__version__}-perceptron"


def _textblob_tagger() -> tuple[Tagger, str]:
    from importlib.metadata import version

    from textblob.en import parser

    def tag(tokens: list[str]) -> list[str]:
        # find_tags takes our tokens as they are (no re-tokenising), one tag per token.
        return [t for _, t in parser.find_tags(list(tokens))]

    return tag, f"textblob-{version('textblob')}"


def make_tagger(name: str) -> tuple[Tagger, str]:
    """(tag function, identity). `auto` prefers NLTK's perceptron and falls back to textblob."""
    if name in ("auto", "nltk"):
        try:
            return _nltk_tagger()
        except (LookupError, OSError) as e:
            if name == "nltk":
                raise UserError(f"NLTK perceptron tagger data is not installed ({type(e).__name__}); "
                                "use tang.tagger=textblob or auto") from None
    if name in ("auto", "textblob"):
        try:
            return _textblob_tagger()
        except ImportError:
            raise UserError("no POS tagger available: install textblob or NLTK's perceptron data") from None
    raise UserError(f"unknown tagger {name!r}: use auto, nltk or textblob")


def tag_rows(texts: list[str], tokenize: Tokenize, tagger: Tagger) -> tuple[list[list[str]], list[list[str]]]:
    """Tokenise and tag each text once; a tagger failure on a row leaves its tags empty ('')."""
    all_tokens, all_tags = [], []
    for text in texts:
        tokens = tokenize(text) if text and text.strip() else []
        tags = [""] * len(tokens)
        if tokens:
            try:
                got = tagger(tokens)
                if len(got) == len(tokens):
                    tags = [t if isinstance(t, str) else "" for t in got]
            except Exception:  # an odd token must not stop the file; counted as untagged words
                pass
        all_tokens.append(tokens)
        all_tags.append(tags)
    return all_tokens, all_tags
