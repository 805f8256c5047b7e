"""Tokenizers that reproduce sacrebleu's and rouge-score's exactly, a whole corpus at a time.

sacrebleu tokenizes one line at a time with a chain of regular expressions. The results here
are the same token for token, but each tokenizer works on the whole corpus joined into one
string, with a separator chosen so that no rule can match across it, so that the regular
expressions run once per corpus instead of once per line. The first rule of ``13a`` (pad a
fixed set of ASCII characters with spaces) needs no context and runs as ``str.translate``.

rouge-score lowercases, keeps the runs of ``[a-z0-9]`` (so German "jähriger" gives "j",
"hriger") and, on request, stems tokens longer than three characters with nltk's Porter
stemmer; nothing is downloaded.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from functools import lru_cache
from typing import Any

BLEU_TOKENIZERS = ("13a", "intl", "char", "none")
# Stands between the lines of a token stream: a control character, which no tokenizer here
# splits, joins to a word or changes. BLEU takes the first that the text does not hold.
SEPARATOR = "\x01"
_SEPARATORS = (SEPARATOR, *map(chr, range(0x02, 0x09)), *map(chr, range(0x0E, 0x1C)))

# sacrebleu's 13a pads each character of `([\{-\~\[-\` -\&\(-\+\:-\@\/])` with spaces. The
# space itself is left alone: how many spaces stand in a row never changes a token.
_13A_PADDED = tuple(
    chr(code)
    for first, last in (("{", "~"), ("[", "`"), ("!", "&"), ("(", "+"), (":", "@"), ("/", "/"))
    for code in range(ord(first), ord(last) + 1)
)
_13A_PERIOD_COMMA_RUN = re.compile(r"[\.,]+")
_13A_DASH_AFTER_DIGIT = re.compile(r"([0-9])(-)")
_DIGITS = frozenset("0123456789")

# Separators for `intl`: digits (class N) that are neither punctuation nor symbols, so no rule
# of `intl` can match across one, exactly as at the start or end of a line.
_INTL_SEPARATORS = ("\U0001d7d8", "\U0001d7ce", "\U0001d7e2", "\U0001d7ec", "\U0001d7f6")

# rouge-score's tokens are the runs of [a-z0-9]: map every other ASCII byte to a space.
_ROUGE_BYTES = bytes(
    code if chr(code) in "0123456789abcdefghijklmnopqrstuvwxyz" + SEPARATOR else ord(" ") for code in range(256)
)
_ROUGE_VALID_TOKEN = re.compile(r"^[a-z0-9]+$")


def tokenize_bleu(lines: Sequence[str], tokenize: str, lowercase: bool = False) -> list[list[str]]:
    """Split each line into words exactly as ``sacrebleu.corpus_bleu`` does before counting.

    Args:
        lines: the sentences.
        tokenize: one of ``"13a"``, ``"intl"``, ``"char"``, ``"none"``.
        lowercase: lowercase before tokenizing, as sacrebleu's ``lowercase=True``.

    Returns:
        The list of words of each line.

    Raises:
        ValueError: If ``tokenize`` is not one of the names above.

    Examples:
        >>> tokenize_bleu(["Hello, world.", "It costs 1,000.50 $."], "13a")
        [['Hello', ',', 'world', '.'], ['It', 'costs', '1,000.50', '$', '.']]
    """
    return split_stream(*bleu_token_stream(lines, tokenize, lowercase), len(lines))


def split_stream(stream: list[str], separator: str, num_lines: int) -> list[list[str]]:
    """Cut a token stream of ``num_lines`` lines at its ``separator`` tokens."""
    lines: list[list[str]] = [[] for _ in range(num_lines)]
    line = 0
    for token in stream:
        if token == separator:
            line += 1
        else:
            lines[line].append(token)
    return lines


def bleu_token_stream(lines: Sequence[str], tokenize: str, lowercase: bool = False) -> tuple[list[str], str]:
    """Return the words of all ``lines`` as sacrebleu splits them, in one stream.

    One stream for the corpus lets the tokenizer run over one joined string, and lets the
    words be numbered without a Python loop per line.

    Returns:
        ``(stream, separator)``: the words, with the token ``separator`` (which is no word of
        the corpus) between consecutive lines.

    Raises:
        ValueError: If ``tokenize`` is not one of ``"13a"``, ``"intl"``, ``"char"``, ``"none"``.
    """
    if tokenize not in BLEU_TOKENIZERS:
        raise ValueError(f"`tokenize` must be one of {BLEU_TOKENIZERS}, got {tokenize!r}")
    # sacrebleu lowercases, then strips trailing white space, then tokenizes.
    lines = [line.lower().rstrip() for line in lines] if lowercase else [line.rstrip() for line in lines]
    separator = next((sep for sep in _SEPARATORS if not any(sep in line for line in lines)), None)
    if separator is None and len(lines) > 1:
        # The text holds every candidate: tokenize line by line, then join with a token that
        # is longer than any word.
        per_line = [bleu_token_stream([line], tokenize)[0] for line in lines]
        separator = SEPARATOR * (max((len(w) for words in per_line for w in words), default=0) + 1)
        return [w for index, words in enumerate(per_line) for w in ([separator] if index else []) + words], separator
    stream = _tokenize_lines(lines, tokenize, separator or SEPARATOR)
    if separator is None:
        # A single line: no separator enters the text, but the one returned must be no word.
        separator = SEPARATOR * (max(map(len, stream), default=0) + 1)
    return stream, separator


def _tokenize_lines(lines: list[str], tokenize: str, separator: str) -> list[str]:
    if not lines:
        return []
    if tokenize == "13a":
        return _tokenize_13a(lines, separator)
    if tokenize == "intl":
        return _tokenize_intl(lines, separator)
    if tokenize == "char":
        # sacrebleu joins the characters with spaces and splits on white space.
        return list(separator.join("".join(line.split()) for line in lines))
    return f" {separator} ".join(lines).split()


def _split_period_comma_run(match: re.Match[str]) -> str:
    r"""Space a run of periods and commas as 13a's two period/comma rules do, run in turn.

    The rules ``([^0-9])([\.,]) -> "\1 \2 "`` then ``([\.,])([^0-9]) -> " \1 \2"`` work on pairs
    of characters, left to right without overlap. Followed through for a run of ``L`` such
    characters between a character before (``b``) and one after (``a``): every character of
    the run ends up apart from the others; a single one between two digits stays attached to
    both ("1,000.50"); and the last one stays attached to a digit after it exactly when the
    first rule left no space behind the run, which is when ``L`` is even after a non-digit
    ``b`` or odd after a digit ``b``. Lines are padded with spaces, so ``b`` and ``a`` exist.
    """
    text, run = match.string, match.group()
    digit_before = text[match.start() - 1] in _DIGITS
    digit_after = text[match.end()] in _DIGITS
    if len(run) == 1:
        return run if digit_before and digit_after else f" {run} "
    space_behind = (len(run) % 2 == 1) != digit_before
    tail = "" if digit_after and not space_behind else " "
    return " " + " ".join(run) + tail


def _tokenize_13a(lines: list[str], separator: str) -> list[str]:
    """Tokenize as sacrebleu's ``Tokenizer13a`` (mteval-v13a), a corpus at a time."""
    # The language-independent rules that involve newlines run per line (and only on the
    # lines they can change), so that "\n" can then separate the lines.
    lines = [
        line.replace("<skipped>", "").replace("-\n", "").replace("\n", " ")
        if "\n" in line or "<skipped>" in line
        else line
        for line in lines
    ]
    # sacrebleu pads every line with a space on both sides; the separator sits between pads,
    # where no rule can match (each needs a period, comma or dash next to its match).
    text = " " + f" {separator} ".join(lines) + " "
    if "&" in text:
        text = text.replace("&quot;", '"').replace("&amp;", "&").replace("&lt;", "<").replace("&gt;", ">")
    for char in _13A_PADDED:
        if char in text:
            text = text.replace(char, f" {char} ")
    if "." in text or "," in text:
        text = _13A_PERIOD_COMMA_RUN.sub(_split_period_comma_run, text)
    if "-" in text:
        text = _13A_DASH_AFTER_DIGIT.sub(r"\1 \2 ", text)
    return text.split()


@lru_cache(maxsize=1)
def _intl_rules() -> list[tuple[Any, str]]:
    """Compile sacrebleu's ``intl`` rules; they need the ``regex`` module's Unicode classes."""
    try:
        import regex
    except ModuleNotFoundError as err:  # pragma: no cover - regex is a runtime dependency
        raise ModuleNotFoundError("tokenize='intl' needs the `regex` package: pip install regex") from err
    return [
        (regex.compile(r"(\P{N})(\p{P})"), r"\1 \2 "),
        (regex.compile(r"(\p{P})(\P{N})"), r" \1 \2"),
        (regex.compile(r"(\p{S})"), r" \1 "),
    ]


def _tokenize_intl(lines: list[str], separator: str) -> list[str]:
    """Tokenize as sacrebleu's ``TokenizerV14International`` (mteval-v14), a corpus at a time."""
    rules = _intl_rules()
    digit = next((sep for sep in _INTL_SEPARATORS if not any(sep in line for line in lines)), None)
    if digit is None:  # pragma: no cover - the text holds every candidate
        return f" {separator} ".join(_apply_rules(rules, line) for line in lines).split()
    text = _apply_rules(rules, digit.join(lines))
    return text.replace(digit, f" {separator} ").split()


def _apply_rules(rules: list[tuple[Any, str]], text: str) -> str:
    for pattern, replacement in rules:
        text = pattern.sub(replacement, text)
    return text


def tokenize_rouge(text: str, stemmer: Callable[[str], str] | None = None) -> list[str]:
    """Tokenize as rouge-score's default tokenizer.

    Lowercases, keeps the runs of ``[a-z0-9]`` and, when ``stemmer`` is given, stems the
    tokens longer than three characters.

    Args:
        text: the text.
        stemmer: a function from a word to its stem, e.g. :func:`porter_stem`.

    Returns:
        The tokens.

    Examples:
        >>> tokenize_rouge("Der 28-jährige Koch!")
        ['der', '28', 'j', 'hrige', 'koch']
    """
    return rouge_token_stream([text], stemmer)


def rouge_token_stream(texts: Sequence[str], stemmer: Callable[[str], str] | None = None) -> list[str]:
    """Return the tokens of all ``texts`` as rouge-score makes them, :data:`SEPARATOR` between texts."""
    if not texts:
        return []
    # The separator is no letter or digit, so in a text it is white space to rouge-score.
    texts = [text.replace(SEPARATOR, " ") if SEPARATOR in text else text for text in texts]
    joined = f" {SEPARATOR} ".join(texts).lower()
    # Every character but [a-z0-9] separates tokens; non-ASCII ones all become "?" first.
    stream = joined.encode("ascii", "replace").translate(_ROUGE_BYTES).decode("ascii").split()
    if stemmer is None:
        return stream
    stems = {
        word: stemmer(word) if len(word) > 3 else word for word in dict.fromkeys(stream) if word != SEPARATOR
    }
    stems[SEPARATOR] = SEPARATOR
    stream = list(map(stems.__getitem__, stream))
    if all(_ROUGE_VALID_TOKEN.match(stem) for stem in stems.values() if stem != SEPARATOR):
        return stream
    return [token for token in stream if token == SEPARATOR or _ROUGE_VALID_TOKEN.match(token)]


@lru_cache(maxsize=1)
def _porter_stemmer() -> Callable[[str], str]:
    try:
        from nltk.stem import porter
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError(
            "use_stemmer=True needs nltk's Porter stemmer (no data is downloaded): "
            "pip install 'llmkit[text]'"
        ) from err
    stem: Callable[[str], str] = porter.PorterStemmer().stem
    return stem


@lru_cache(maxsize=2**16)
def porter_stem(word: str) -> str:
    """Return nltk's Porter stem of ``word`` (the stemmer rouge-score uses), memoised.

    Examples:
        >>> porter_stem("running")
        'run'
    """
    return _porter_stemmer()(word)
