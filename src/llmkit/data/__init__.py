"""Embedded datasets that download nothing, and the word-level vocabulary they share.

``NumberWordsDataModule`` translates numbers written in words (``num2words``) between two
languages.
"""

from llmkit.data.numbers import NumberWordsDataModule, detokenize, tokenize
from llmkit.data.vocab import Vocab

__all__ = ["NumberWordsDataModule", "Vocab", "detokenize", "tokenize"]
