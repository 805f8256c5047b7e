"""sacrebleu's ``TercomTokenizer`` (a Python port of Tercom's normaliser), rule for rule.

sacrebleu's TER lowercases (unless case-sensitive), optionally normalises (XML entities,
punctuation split from words, and with ``asian_support`` CJK split into characters) and
optionally removes punctuation, then splits on white space. It runs its tokenizer once on a
hypothesis but twice on a reference (once when it caches the references, once when it extracts
their words), which matters for normalisation (``&amp;quot;`` becomes ``&quot;``, then ``"``);
:func:`tercom_words` does the same.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from functools import partial

# The rules of sacrebleu's `tokenizer_ter.py`, in its order.
_GENERAL = (
    (re.compile(r"\n-"), ""),  # end-of-line hyphenation
    (re.compile(r"\n"), " "),
    (re.compile(r"&quot;"), '"'),
    (re.compile(r"&amp;"), "&"),
    (re.compile(r"&lt;"), "<"),
    (re.compile(r"&gt;"), ">"),
)
_WESTERN = (
    (re.compile(r"([{-~[-` -&(-+:-@/])"), r" \1 "),  # punctuation
    (re.compile(r"'s "), r" 's "),  # possessives
    (re.compile(r"'s$"), r" 's"),
    (re.compile(r"([^0-9])([\.,])"), r"\1 \2 "),  # period and comma unless after a digit
    (re.compile(r"([\.,])([^0-9])"), r" \1 \2"),  # ... unless before a digit
    (re.compile(r"([0-9])(-)"), r"\1 \2 "),  # dash after a digit
)
_ASIAN_PUNCT = r"([\u3001\u3002\u3008-\u3011\u3014-\u301f\uff61-\uff65\u30fb])"
_FULL_WIDTH_PUNCT = r"([\uff0e\uff0c\uff1f\uff1a\uff1b\uff01\uff02\uff08\uff09])"
_ASIAN = (
    (re.compile(r"([\u4e00-\u9fff\u3400-\u4dbf])"), r" \1 "),  # CJK ideographs
    (re.compile(r"([\u31c0-\u31ef\u2e80-\u2eff])"), r" \1 "),  # strokes, radicals
    (re.compile(r"([\u3300-\u33ff\uf900-\ufaff\ufe30-\ufe4f])"), r" \1 "),  # compatibility forms
    (re.compile(r"([\u3200-\u3f22])"), r" \1 "),  # enclosed letters and months (sacrebleu's range)
    # Hiragana, Katakana and the phonetic extensions, as sacrebleu writes the rule.
    (re.compile(r"(^|^[\u3040-\u309f])([\u3040-\u309f]+)(?=$|^[\u3040-\u309f])"), r"\1 \2 "),
    (re.compile(r"(^|^[\u30a0-\u30ff])([\u30a0-\u30ff]+)(?=$|^[\u30a0-\u30ff])"), r"\1 \2 "),
    (re.compile(r"(^|^[\u31f0-\u31ff])([\u31f0-\u31ff]+)(?=$|^[\u31f0-\u31ff])"), r"\1 \2 "),
    (re.compile(_ASIAN_PUNCT), r" \1 "),
    (re.compile(_FULL_WIDTH_PUNCT), r" \1 "),
)
_PUNCT = ((re.compile(r"[\.,\?:;!\"\(\)]"), ""),)
_ASIAN_PUNCT_REMOVAL = ((re.compile(_ASIAN_PUNCT), ""), (re.compile(_FULL_WIDTH_PUNCT), ""))


def tercom_normalizer(
    normalized: bool = False, no_punct: bool = False, asian_support: bool = False, case_sensitive: bool = False
) -> Callable[[str], str]:
    """The function of sacrebleu's ``TercomTokenizer(...)``: a line to its words, joined by single spaces."""
    steps: list[Callable[[str], str]] = []
    if not case_sensitive:
        steps.append(str.lower)
    rules: list[tuple[re.Pattern[str], str]] = []
    if normalized:
        steps.extend(partial(pattern.sub, replacement) for pattern, replacement in _GENERAL)
        steps.append(_pad)
        rules.extend(_WESTERN)
        if asian_support:
            rules.extend(_ASIAN)
    if no_punct:
        rules.extend(_PUNCT)
        if asian_support:
            rules.extend(_ASIAN_PUNCT_REMOVAL)
    steps.extend(partial(pattern.sub, replacement) for pattern, replacement in rules)

    def normalize(line: str) -> str:
        if not line:
            return ""
        for step in steps:
            line = step(line)
        return " ".join(line.split())

    return normalize


def _pad(line: str) -> str:
    # Tercom's Western rules see a space at each end of the line.
    return f" {line} "


def tercom_words(
    hyps: list[str],
    refs: list[list[str]],
    normalized: bool = False,
    no_punct: bool = False,
    asian_support: bool = False,
    case_sensitive: bool = False,
) -> tuple[list[list[str]], list[list[list[str]]]]:
    """The words of each hypothesis, and of each reference of each sample, as sacrebleu's TER splits them."""
    normalize = tercom_normalizer(normalized, no_punct, asian_support, case_sensitive)
    hyp_words = [normalize(hyp.rstrip()).split() for hyp in hyps]
    ref_words = [[normalize(normalize(ref.rstrip())).split() for ref in sample] for sample in refs]
    return hyp_words, ref_words
