"""Tokenizers for the n-gram metrics: COCO's PTB tokenizer, a pure-Python stand-in, Chinese characters.

The COCO caption metrics are defined on text run through Stanford CoreNLP's PTBTokenizer
(lower-cased, punctuation removed). That needs Java; where Java is missing, `simple_tokenize`
approximates it (tests check that both agree on typical report text).
"""

from __future__ import annotations

import functools
import re
import shutil

# Tokens COCO drops after PTB tokenization (pycocoevalcap/tokenizer/ptbtokenizer.py). COCO compares
# them with lower-cased output, so its "-LRB-" entries never match: "(" survives as "-lrb-".
PTB_DROPPED: frozenset[str] = frozenset(
    ["''", "'", "``", "`", ".", "?", "!", ",", ":", "-", "--", "...", ";"]
)
_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
_CONTRACTION = re.compile(r"^(.+?)(n't|'s|'re|'ve|'ll|'d|'m)$")
# split , ; : unless they sit between digits (1,000 and 10:30 stay whole, as in PTB)
_INNER_SPLIT = re.compile(r"(?<!\d)([,;])|([,;])(?!\d)|(?<!\d)(:)|(:)(?!\d)")
_EDGE_PUNCT = "\"'`.,;:?!"

# One CJK ideograph per token; Latin words and numbers stay whole (e.g. "2.5", "cm", "t4").
_ZH_TOKEN = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]|[a-z0-9]+(?:\.[0-9]+)?")
_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
_LATIN = re.compile(r"[A-Za-z]")


def cjk_share(texts) -> float | None:
    """CJK ideographs / (CJK ideographs + Latin letters) over all `texts`; None when they hold neither.

    Digits and punctuation count for neither script, so "T4" in a Chinese report weighs little.
    """
    cjk = sum(len(_CJK.findall(t)) for t in texts)
    latin = sum(len(_LATIN.findall(t)) for t in texts)
    return cjk / (cjk + latin) if cjk + latin else None


def normalize_space(text: str) -> str:
    """One line, single spaces: PTB is run line-per-caption, so any line break would misalign it."""
    return " ".join(text.split())


def simple_tokenize(text: str) -> str:
    """Approximate COCO's PTB pipeline in Python: lower-case, split punctuation, drop what COCO drops."""
    text = normalize_space(text.lower()).replace('"', " ")
    for bracket, name in _BRACKETS.items():
        text = text.replace(bracket, f" {name} ")
    tokens: list[str] = []
    for raw in text.split():
        for piece in _INNER_SPLIT.sub(r" \1\2\3\4 ", raw).split():
            tokens.extend(_split_word(piece))
    return " ".join(t for t in tokens if t not in PTB_DROPPED)


def _split_word(word: str) -> list[str]:
    head: list[str] = []
    while word and word[0] in _EDGE_PUNCT:
        head.append(word[0])
        word = word[1:]
    tail: list[str] = []
    while word and word[-1] in _EDGE_PUNCT:
        tail.insert(0, word[-1])
        word = word[:-1]
    middle: list[str] = []
    if word.endswith("%") and len(word) > 1:
        middle = [word[:-1], "%"]
    elif m := _CONTRACTION.match(word):
        middle = [m.group(1), m.group(2)]
    elif word:
        middle = [word]
    return head + middle + tail


def zh_char_tokenize(text: str) -> str:
    """Chinese text as space-separated characters (Latin words and numbers kept whole, punctuation dropped)."""
    return " ".join(_ZH_TOKEN.findall(text.lower()))


def java_available() -> bool:
    return shutil.which("java") is not None


@functools.lru_cache(maxsize=8)
def ptb_tokenize(texts: tuple[str, ...]) -> tuple[str, ...]:
    """Run pycocoevalcap's PTBTokenizer (Java) over `texts`; empty texts stay empty.

    Cached because every COCO metric of one evaluation tokenizes the same texts, and each
    call starts a JVM.
    """
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    lines = [normalize_space(t) for t in texts]
    # PTB is fed one caption per line; an empty line could be dropped and shift every later one.
    nonempty = [i for i, t in enumerate(lines) if t]
    out = [""] * len(lines)
    if nonempty:
        tokenized = PTBTokenizer().tokenize({i: [{"caption": lines[i]}] for i in nonempty})
        if sorted(tokenized) != nonempty:
            raise RuntimeError("PTBTokenizer returned a different number of lines than it was given")
        for i in nonempty:
            out[i] = tokenized[i][0]
    return tuple(out)


def coco_tokenize(texts: list[str], language: str, tokenizer: str = "auto") -> tuple[list[str], str]:
    """Tokenize for the COCO metrics. Returns the tokens and a note naming the tokenizer used.

    language "zh": characters. Otherwise tokenizer "ptb" (Java), "simple" (Python), or "auto"
    (PTB where Java is installed, else simple).
    """
    if language == "zh":
        return [zh_char_tokenize(t) for t in texts], "tokens: Chinese characters"
    if tokenizer == "auto":
        if not java_available():
            return [simple_tokenize(t) for t in texts], "tokens: simple Python approximation of PTB (no java)"
        try:
            return list(ptb_tokenize(tuple(texts))), "tokens: PTBTokenizer (Stanford CoreNLP 3.4.1, Java)"
        except (OSError, RuntimeError) as e:
            # e.g. a read-only site-packages: pycocoevalcap writes its temp file beside the jar
            note = f"tokens: simple Python approximation of PTB (PTBTokenizer failed: {e})"
            return [simple_tokenize(t) for t in texts], note
    if tokenizer == "ptb":
        return list(ptb_tokenize(tuple(texts))), "tokens: PTBTokenizer (Stanford CoreNLP 3.4.1, Java)"
    if tokenizer == "simple":
        return [simple_tokenize(t) for t in texts], "tokens: simple Python approximation of PTB"
    raise ValueError(f"unknown tokenizer {tokenizer!r} (ptb, simple, auto)")
