"""Embedded datasets that download nothing, and the word-level vocabulary they share.

``NumberWordsDataModule`` translates numbers written in words (``num2words``) between two
languages; ``DigitsDataModule`` serves scikit-learn's bundled 8x8 handwritten digits;
``PythonDocsDataModule`` is a language-modelling corpus: the English help texts that ship with
CPython (``pydoc_data.topics``), tokenized by a byte-level BPE (``tokenizers``, imported only when
the BPE is built) or as bytes.
"""

from llmkit.data.digits import DigitsDataModule
from llmkit.data.numbers import NumberWordsDataModule, detokenize, tokenize
from llmkit.data.python_docs import PythonDocsDataModule
from llmkit.data.vocab import Vocab

__all__ = ["DigitsDataModule", "NumberWordsDataModule", "PythonDocsDataModule", "Vocab", "detokenize", "tokenize"]
