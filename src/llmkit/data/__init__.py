"""Embedded datasets that download nothing, and the word-level vocabulary they share.

``NumberWordsDataModule`` translates numbers written in words (``num2words``) between two
languages; ``DigitsDataModule`` serves scikit-learn's bundled 8x8 handwritten digits.
"""

from llmkit.data.digits import DigitsDataModule
from llmkit.data.numbers import NumberWordsDataModule, detokenize, tokenize
from llmkit.data.vocab import Vocab

__all__ = ["DigitsDataModule", "NumberWordsDataModule", "Vocab", "detokenize", "tokenize"]
