"""Local models for the model-based metrics: a module with its tokenizer, or a checkpoint directory.

A metric takes its model in one of two forms:

- an ``nn.Module`` and a tokenizer callable. The tokenizer is called as a Hugging Face
  tokenizer is, ``tokenizer(texts, padding=True, truncation=True, max_length=max_length,
  return_tensors="pt")`` (with ``text_pair=second_texts`` for pairs), and returns a mapping of
  tensors ``[B, T]`` (``input_ids``, ``attention_mask``, ...) that the module is called with as
  keyword arguments;
- the path of a local Hugging Face checkpoint directory (``config.json``, weights, tokenizer
  files), loaded with ``local_files_only=True``: nothing is ever downloaded. Loading needs
  ``transformers`` (``pip install llmkit[eval]``), imported only then.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Literal

from torch import Tensor, nn

Tokenizer = Callable[..., Mapping[str, Any]]
ModelSource = nn.Module | str | os.PathLike[str]
Head = Literal["classifier", "encoder"]

_INSTALL_HINT = "pip install llmkit[eval]"
# The files a saved tokenizer consists of (one is enough); transformers 5 builds an empty-vocabulary
# tokenizer, silently, from a directory that has none of them.
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "spiece.model",
    "sentencepiece.bpe.model",
    "tokenizer.model",
)


@dataclass(frozen=True)
class LocalModel:
    """A model, its tokenizer and (for Hugging Face models) its config; not an ``nn.Module``.

    The metrics hold it as a plain attribute, so that the model stays out of their module tree
    and ``state_dict``: a metric's state is its sums alone.
    """

    module: nn.Module
    tokenizer: Tokenizer
    config: Any
    path: Path | None = None


def import_transformers() -> ModuleType:
    """``transformers``, imported on demand, or an ImportError that says how to install it."""
    try:
        return importlib.import_module("transformers")
    except ImportError as error:  # pragma: no cover - transformers is a test dependency
        raise ImportError(
            f"loading a model from a local checkpoint directory needs `transformers`: {_INSTALL_HINT}"
        ) from error


def checkpoint_dir(path: str | os.PathLike[str]) -> Path:
    """The checkpoint directory ``path``, checked to exist and to hold a ``config.json``.

    Raises:
        ValueError: If ``path`` does not exist, is not a directory or holds no ``config.json``.
    """
    directory = Path(path).expanduser()
    if not directory.exists():
        raise ValueError(
            f"model path {str(path)!r} does not exist (llmkit loads local checkpoint directories only "
            "and never downloads: save the model with `save_pretrained(dir)` and pass `dir`)"
        )
    if not directory.is_dir():
        raise ValueError(f"model path {str(path)!r} is not a directory (a Hugging Face checkpoint is a directory)")
    if not (directory / "config.json").is_file():
        raise ValueError(f"model path {str(path)!r} holds no config.json: it is not a Hugging Face checkpoint")
    return directory


def read_config(directory: Path) -> Any:
    """The ``transformers`` config of a checked checkpoint directory."""
    transformers = import_transformers()
    return transformers.AutoConfig.from_pretrained(directory, local_files_only=True)


def check_classifier_config(config: Any, directory: Path) -> None:
    """Raise unless the checkpoint was saved from a sequence-classification model.

    Loading a base model (``BertModel``) as a classifier would give a freshly initialised, random
    head; ``transformers`` only warns about it.

    Raises:
        ValueError: If ``config.architectures`` names no ``*ForSequenceClassification`` class.
    """
    architectures = list(getattr(config, "architectures", None) or [])
    if not any(name.endswith("ForSequenceClassification") for name in architectures):
        raise ValueError(
            f"model path {str(directory)!r} holds no sequence-classification head "
            f"(config.architectures = {architectures}); this metric needs a *ForSequenceClassification checkpoint"
        )


def is_classifier_config(config: Any) -> bool:
    """Whether a config was saved from a ``*ForSequenceClassification`` model."""
    return any(name.endswith("ForSequenceClassification") for name in getattr(config, "architectures", None) or [])


def load_checkpoint(directory: Path, config: Any, head: Head, tokenizer: Tokenizer | None) -> LocalModel:
    """Load the model (and, unless given, the tokenizer) of a checked checkpoint directory.

    Raises:
        ValueError: If the weights lack some of the model's parameters (a classifier head or
            layers that would be randomly initialised), or the directory holds no tokenizer and
            none is given.
    """
    transformers = import_transformers()
    if head == "classifier":
        module, info = transformers.AutoModelForSequenceClassification.from_pretrained(
            directory, config=config, local_files_only=True, output_loading_info=True
        )
        missing = sorted(info.get("missing_keys", ()))
        if missing:
            raise ValueError(
                f"model path {str(directory)!r} lacks weights for {missing}: its classifier head would be "
                "randomly initialised"
            )
    else:
        module, info = transformers.AutoModel.from_pretrained(
            directory, config=config, local_files_only=True, output_loading_info=True
        )
        # A pooler is not used by the metrics (they pool the hidden states themselves).
        missing = sorted(key for key in info.get("missing_keys", ()) if not key.startswith("pooler."))
        if missing:
            raise ValueError(f"model path {str(directory)!r} lacks weights for {missing}: they would be random")
    module.eval()
    if tokenizer is not None:
        return LocalModel(module=module, tokenizer=tokenizer, config=config, path=directory)
    if not any((directory / name).is_file() for name in _TOKENIZER_FILES):
        raise ValueError(f"model path {str(directory)!r} holds no tokenizer files; pass `tokenizer=`")
    try:
        loaded = transformers.AutoTokenizer.from_pretrained(directory, local_files_only=True)
    except (OSError, ValueError, TypeError) as error:
        raise ValueError(
            f"model path {str(directory)!r} holds no tokenizer that loads ({error}); pass `tokenizer=`"
        ) from error
    return LocalModel(module=module, tokenizer=loaded, config=config, path=directory)


def resolve_module(model: nn.Module, tokenizer: Tokenizer | None) -> LocalModel:
    """Wrap a given module and tokenizer callable.

    Raises:
        TypeError: If ``tokenizer`` is missing or not callable.
    """
    if tokenizer is None:
        raise TypeError("a model given as an nn.Module needs its tokenizer: pass `tokenizer=`")
    if not callable(tokenizer):
        raise TypeError(f"`tokenizer` must be callable, got {type(tokenizer).__name__}")
    return LocalModel(module=model, tokenizer=tokenizer, config=getattr(model, "config", None))


def check_model_arg(model: object) -> None:
    """Raise unless ``model`` is an ``nn.Module`` or a path.

    Raises:
        TypeError: If it is neither.
    """
    if not isinstance(model, nn.Module | str | os.PathLike):
        raise TypeError(
            f"`model` must be an nn.Module or the path of a local checkpoint directory, got {type(model).__name__}"
        )


def find_label(
    config: Any, label: str | int | None, *, role: str, argument: str, defaults: Iterable[str] = ()
) -> int:
    """The output index of a label, looked up case-insensitively in ``config.id2label``.

    Args:
        config: the model's config (``None`` for a module without one).
        label: a label name, an output index, or ``None`` for the one label named as in ``defaults``.
        role: what the label means, for messages (``"toxic"``, ``"entailment"``).
        argument: the metric's argument that sets the label, for messages.
        defaults: the lowercase names that ``None`` accepts.

    Raises:
        ValueError: If the name is not among the model's labels, ``None`` matches no label or
            several, or an index is out of range.
        TypeError: If ``label`` is neither a str, an int nor None.
    """
    id2label = getattr(config, "id2label", None) or {}
    labels = {int(index): str(name) for index, name in id2label.items()}
    if isinstance(label, bool) or not isinstance(label, str | int | None):
        raise TypeError(f"`{argument}` must be a label name, an output index or None, got {label!r}")
    if isinstance(label, int):
        if label < 0 or (labels and label >= len(labels)):
            raise ValueError(f"`{argument}`={label} is not an output index of the model's labels {labels}")
        return label
    if not labels:
        raise ValueError(
            f"the model has no config.id2label to find the {role} label in; pass `{argument}` as an output index"
        )
    if label is not None:
        matches = [index for index, name in labels.items() if name.lower() == label.lower()]
        if not matches:
            raise ValueError(f"{role} label {label!r} is not among the model's labels {labels} (config.id2label)")
        return matches[0]
    wanted = {name.lower() for name in defaults}
    matches = [index for index, name in labels.items() if name.lower() in wanted]
    if len(matches) != 1:
        raise ValueError(
            f"cannot tell the {role} label among the model's labels {labels} (config.id2label; looked for "
            f"{sorted(wanted)}): pass `{argument}`"
        )
    return matches[0]


def output_tensor(output: Any, name: str) -> Tensor:
    """The tensor ``name`` of a model's output: the output itself, its attribute, or its first item.

    Raises:
        TypeError: If the output is none of these.
    """
    if isinstance(output, Tensor):
        return output
    value = getattr(output, name, None)
    if isinstance(value, Tensor):
        return value
    if isinstance(output, tuple | list) and output and isinstance(output[0], Tensor):
        return output[0]
    raise TypeError(f"the model must return a tensor, an object with `.{name}` or a tuple, got {type(output).__name__}")
