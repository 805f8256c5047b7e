"""GenerationScorer: decode batches with a module's ``generate``, score the outputs with text metrics.

The one code path that turns a batch into generated ids, the ids into what the metrics take
(text, or token ids with special tokens ignored), and updates the metrics: used by the
:class:`llmkit.callbacks.GenerationEvaluation` callback, and by any module that scores its own
generations in validation.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from torchmetrics import Metric
from torchmetrics.text import (
    CharErrorRate,
    EditDistance,
    MatchErrorRate,
    WordErrorRate,
    WordInfoLost,
    WordInfoPreserved,
)

GenerateFn = Callable[[nn.Module, Any], Any]
"""``generate_fn(module, batch)``: token ids ``[B, L]`` (or ``[B * k, L]``, or an object with ``.sequences``)."""
DecodeFn = Callable[[list[list[int]]], Sequence[str]]
"""``decode_fn(rows)``: one text per row of token ids."""
SplitFn = Callable[[Any], tuple[Any, Any]]
"""``split_fn(batch)``: ``(source, reference)``."""

# Metrics that take one reference per sample (`target: str | list[str]`); the others get a list of
# references per sample, torchmetrics' convention for translation metrics (llmkit's take both).
_ONE_REFERENCE = (CharErrorRate, WordErrorRate, MatchErrorRate, WordInfoLost, WordInfoPreserved, EditDistance)


class Example(NamedTuple):
    """One decoded sample, as text."""

    source: str
    prediction: str
    reference: str


class _RowCount(Metric):
    """The number of rows scored, summed across processes: tells an empty corpus from a scored one."""

    full_state_update = False
    rows: Tensor

    def __init__(self) -> None:
        super().__init__()
        self.add_state("rows", default=torch.tensor(0), dist_reduce_fx="sum")

    def update(self, rows: int) -> None:
        self.rows += rows

    def compute(self) -> Tensor:
        return self.rows


class GenerationScorer:
    """Generate for batches, score the generations with text metrics, and keep a few examples.

    :meth:`update` takes a module and a batch:

    1. **Source and reference.** From a mapping with ``"src"``/``"tgt"`` (llmkit's seq2seq batches)
       or ``"input_ids"``/``"labels"`` (Hugging Face's), a tuple or list ``(src, tgt, ...)``, or
       ``split_fn(batch) -> (source, reference)``. The reference is token ids ``[B, T]`` or text
       (``B`` strings, or ``B`` lists of strings for several references per sample).
    2. **Generation**, under ``torch.no_grad()``: ``generate_fn(module, batch)``, else
       ``module.generate(source, **generate_kwargs)``; token ids ``[B, L]`` (a Hugging Face
       ``GenerateOutput``'s ``.sequences`` too). With ``k`` rows per sample (``[B * k, L]``,
       ``num_return_sequences=k``) the first of each sample's rows is scored.
    3. **The first target token.** ``strip_first_target_token`` (default: ``True`` for
       ``"src"``/``"tgt"`` mappings and tuples, whose targets are ``BOS ... EOS`` as
       :class:`llmkit.Seq2SeqTransformer` trains on, while ``generate`` returns the ids after BOS;
       ``False`` for ``"input_ids"``/``"labels"``, whose labels hold no BOS, and with ``split_fn``)
       scores id references without their first column, ``tgt[:, 1:]``.
    4. **Scoring.** With ``decode_fn``, the metrics get text: each row of ids, with negative ids
       (Hugging Face's ``-100`` labels) and ``ignore_ids`` removed, becomes a ``list[int]``, and
       ``decode_fn(rows)`` gives one string per row. Without it, they get the token ids
       ``[B, L]`` and ``[B, T]``, with negative ids and ``ignore_ids`` (e.g. EOS and padding) set
       to each metric's ``ignore_index``, which drops them: every metric must then take token ids
       (llmkit's text metrics do) and, with ``ignore_ids``, have an ``ignore_index``. References go
       to the metrics as a list of references per sample (torchmetrics' convention for
       translation metrics), except to torchmetrics' error rates (``CharErrorRate``,
       ``WordErrorRate``, ``MatchErrorRate``, ``WordInfoLost``, ``WordInfoPreserved``,
       ``EditDistance``), which take one string per sample.
    5. **Examples.** The first ``num_examples`` samples are kept as :class:`Example` text triples:
       decoded as above (the source with ``source_decode_fn``, by default ``decode_fn``), or, with no
       decoding function, their kept ids joined with spaces.

    The metrics' states follow the generated ids' device. :meth:`compute` returns ``{name: value}``,
    synced across processes (each metric's states are torchmetrics'; every process must call it).
    Metrics passed as a mapping are named by its keys; passed as a sequence, by their class names
    in lower case without a trailing ``"score"`` (``BLEUScore`` -> ``"bleu"``, ``CharErrorRate`` ->
    ``"charerrorrate"``). A metric whose ``compute`` returns a dict (``ROUGEScore``) gives one entry
    per key, named ``f"{name}_{key}"`` when named by a mapping (``"rouge_rougeL_fmeasure"``), the
    key itself when passed in a sequence (``"rougeL_fmeasure"``).

    Args:
        metrics: torchmetrics ``Metric`` objects (llmkit's or torchmetrics' text metrics), by name or in a
            sequence (a single metric is a sequence of one).
        generate_fn: ``generate_fn(module, batch) -> ids``, instead of ``module.generate(source)``.
        decode_fn: ``decode_fn(rows: list[list[int]]) -> list[str]``, one text per row of ids.
        num_examples: how many samples :attr:`examples` keeps (0: none).
        ignore_ids: token ids that are not text (EOS, padding): removed before ``decode_fn``, set to the
            metrics' ``ignore_index`` without it.
        split_fn: ``split_fn(batch) -> (source, reference)``, for batches of other forms.
        source_decode_fn: decodes the source ids of the examples (default: ``decode_fn``; pass one when the
            source has its own vocabulary).
        strip_first_target_token: score id references without their first column (default: see 3. above).
        generate_kwargs: keyword arguments of ``module.generate`` (not with ``generate_fn``).

    Raises:
        TypeError: If ``metrics`` is not a metric, a mapping or a sequence of ``Metric`` objects, a
            function is not callable, or ``ignore_ids`` holds something else than ints.
        ValueError: If ``metrics`` is empty, two metrics of one class are passed in a sequence, a name is
            empty, ``num_examples < 0``, both ``generate_fn`` and ``generate_kwargs`` are given, or,
            without ``decode_fn``, a metric cannot take token ids or (with ``ignore_ids``) has no
            ``ignore_index``.

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> from llmkit.metrics import BLEUScore
        >>> class Echo(nn.Module):  # "translates" by copying its source
        ...     def generate(self, src):
        ...         return src
        >>> scorer = GenerationScorer({"bleu": BLEUScore(n_gram=2, ignore_index=0)}, ignore_ids=(0, 2))
        >>> batch = {"src": torch.tensor([[5, 6, 7, 2], [8, 9, 2, 0]]),
        ...          "tgt": torch.tensor([[1, 5, 6, 7, 2], [1, 8, 4, 2, 0]])}  # BOS ... EOS, padded
        >>> scorer.update(Echo(), batch)
        >>> {name: round(value.item(), 4) for name, value in scorer.compute().items()}  # sqrt(4/5 * 2/3)
        {'bleu': 0.7303}
        >>> scorer.examples[1]
        Example(source='8 9', prediction='8 9', reference='8 4')
    """

    def __init__(
        self,
        metrics: Mapping[str, Metric] | Sequence[Metric] | Metric,
        *,
        generate_fn: GenerateFn | None = None,
        decode_fn: DecodeFn | None = None,
        num_examples: int = 4,
        ignore_ids: Sequence[int] = (),
        split_fn: SplitFn | None = None,
        source_decode_fn: DecodeFn | None = None,
        strip_first_target_token: bool | None = None,
        generate_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        self.metrics, self._named = _named_metrics(metrics)
        for name, fn in (("generate_fn", generate_fn), ("decode_fn", decode_fn), ("split_fn", split_fn),
                         ("source_decode_fn", source_decode_fn)):
            if fn is not None and not callable(fn):
                raise TypeError(f"`{name}` must be callable or None, got {type(fn).__name__}")
        if isinstance(num_examples, bool) or not isinstance(num_examples, int) or num_examples < 0:
            raise ValueError(f"`num_examples` must be an int >= 0, got {num_examples!r}")
        if isinstance(ignore_ids, int) and not isinstance(ignore_ids, bool):
            ignore_ids = (ignore_ids,)
        if not isinstance(ignore_ids, Sequence) or not all(
            isinstance(i, int) and not isinstance(i, bool) for i in ignore_ids
        ):
            raise TypeError(f"`ignore_ids` must be a sequence of int token ids, got {ignore_ids!r}")
        if strip_first_target_token is not None and not isinstance(strip_first_target_token, bool):
            raise TypeError(f"`strip_first_target_token` must be a bool or None, got {strip_first_target_token!r}")
        if generate_fn is not None and generate_kwargs:
            raise ValueError(
                "pass either `generate_fn` or `generate_kwargs` (the keyword arguments of `module.generate`), not both"
            )
        self.generate_fn, self.decode_fn, self.split_fn = generate_fn, decode_fn, split_fn
        self.source_decode_fn = source_decode_fn if source_decode_fn is not None else decode_fn
        self.num_examples, self.ignore_ids = num_examples, tuple(ignore_ids)
        self.strip_first_target_token = strip_first_target_token
        self.generate_kwargs = dict(generate_kwargs or {})
        if decode_fn is None:
            self._check_token_id_metrics()
        self._rows = _RowCount()
        self._examples: list[Example] = []
        self._ignore_cache: dict[torch.device, Tensor] = {}

    def _check_token_id_metrics(self) -> None:
        for name, metric in self.metrics.items():
            if not hasattr(metric, "ignore_index"):
                raise ValueError(
                    f"metric {name!r} ({type(metric).__name__}) scores text, not token ids: pass `decode_fn` to turn "
                    "the generated ids into text, or use a metric that takes token ids (llmkit.metrics' text metrics)"
                )
            if self.ignore_ids and getattr(metric, "ignore_index") is None:  # noqa: B009
                raise ValueError(
                    f"metric {name!r} ({type(metric).__name__}) has ignore_index=None, so the ids of `ignore_ids` "
                    f"{self.ignore_ids} would count as words: construct it with `ignore_index` (e.g. the padding id), "
                    "or pass `decode_fn`"
                )

    # -----------------------------------------------------------------------------------------
    # The metric interface

    @property
    def examples(self) -> list[Example]:
        """The first ``num_examples`` samples since the last :meth:`reset`, as text."""
        return list(self._examples)

    def to(self, device: torch.device | str) -> GenerationScorer:
        """Move the metrics' states to ``device``; returns ``self``.

        :meth:`update` moves them to the generated ids' device anyway; a process that may decode
        nothing before :meth:`compute` syncs (under NCCL) needs them on its device first.
        """
        for metric in (*self.metrics.values(), self._rows):
            metric.to(device)
        return self

    def reset(self) -> None:
        """Forget every update: the metrics' states and the examples."""
        for metric in (*self.metrics.values(), self._rows):
            metric.reset()
        self._examples.clear()

    def check_module(self, module: nn.Module) -> None:
        """Raise now what :meth:`update` would raise for ``module`` at its first batch.

        Raises:
            TypeError: If no ``generate_fn`` was given and ``module`` has no ``generate`` method.
        """
        if self.generate_fn is None and not callable(getattr(module, "generate", None)):
            raise TypeError(
                f"{type(module).__name__} has no `generate` method: pass `generate_fn(module, batch)` returning the "
                "generated token ids [B, L]"
            )

    def _follow(self, device: torch.device) -> None:
        # The metrics' states live where the generations are (a module's own metrics are there already).
        for metric in (*self.metrics.values(), self._rows):
            if metric.device != device:
                metric.to(device)

    def compute(self) -> dict[str, Tensor]:
        """Every metric's value over the batches seen by every process; ``{}`` when none scored a row.

        Every process must call it (the metrics' states are gathered); the values are equal on all.

        Raises:
            TypeError: If a metric's ``compute`` returns something else than a number, a tensor or a dict of them.
            ValueError: If two metrics give the same name.
        """
        # A process that decoded nothing syncs too, from the metrics' device (NCCL needs CUDA tensors).
        self._rows.to(next(iter(self.metrics.values())).device)
        local_rows = int(self._rows.rows)
        with warnings.catch_warnings():
            if not local_rows:  # a process that scored nothing still takes part in the sync
                warnings.filterwarnings("ignore", message=r".*was called before the ``update`` method")
            if not int(self._rows.compute()):
                return {}
            values: dict[str, Tensor] = {}
            for name, metric in self.metrics.items():
                for key, value in _flatten(name, metric.compute(), named=self._named).items():
                    if key in values:
                        raise ValueError(
                            f"two metrics give the value {key!r}: pass the metrics as a mapping with other names"
                        )
                    values[key] = value
        return values

    # -----------------------------------------------------------------------------------------
    # One batch

    def update(self, module: nn.Module, batch: Any) -> None:
        """Generate for ``batch`` with ``module``, update every metric, and keep the first examples.

        Args:
            module: the model; in evaluation mode, as Lightning's validation sets it.
            batch: a batch of one of the forms above.

        Raises:
            ValueError: If the batch has no form read here and no ``split_fn`` was given, the generated ids or the
                reference have a wrong shape, or the reference is text and there is no ``decode_fn``.
            TypeError: If ``module`` has no ``generate`` and there is no ``generate_fn``, or the generated ids or
                the reference are of an unknown type.
        """
        source, reference, strip_default = self._split(batch)
        if isinstance(reference, Tensor):
            _check_ids("reference", reference)
            strip = self.strip_first_target_token if self.strip_first_target_token is not None else strip_default
            if strip:
                reference = reference[:, 1:]
        else:
            reference = _check_text_references(reference)
        self.check_module(module)
        with torch.no_grad():
            if self.generate_fn is not None:
                generated = self.generate_fn(module, batch)
            else:
                generated = getattr(module, "generate")(source, **self.generate_kwargs)  # noqa: B009
        predictions = _predicted_ids(generated, len(reference))
        self._follow(predictions.device)
        if isinstance(reference, Tensor):
            reference = reference.to(predictions.device)
        if self.decode_fn is not None:
            pred_text = self._decode(self.decode_fn, predictions, "decode_fn")
            ref_text = (
                [[text] for text in self._decode(self.decode_fn, reference, "decode_fn")]
                if isinstance(reference, Tensor) else reference
            )
            self._update_text(pred_text, ref_text)
        elif isinstance(reference, Tensor):
            self._update_ids(predictions, reference)
            pred_text, ref_text = None, None
        else:
            raise ValueError(
                "the references are text but the generated tokens are ids: pass `decode_fn` to turn ids into text"
            )
        self._rows.update(len(reference))
        self._keep_examples(source, predictions, reference, pred_text, ref_text)

    def _split(self, batch: Any) -> tuple[Any, Any, bool]:
        """``(source, reference, whether the reference starts with BOS by default)``."""
        if self.split_fn is not None:
            split = self.split_fn(batch)
            if not isinstance(split, tuple) or len(split) != 2:
                raise TypeError(f"`split_fn` must return a pair (source, reference), got {type(split).__name__}")
            return split[0], split[1], False
        if isinstance(batch, Mapping):
            if "src" in batch and "tgt" in batch:
                return batch["src"], batch["tgt"], True
            if "input_ids" in batch and "labels" in batch:
                return batch["input_ids"], batch["labels"], False
            keys = sorted(map(str, batch))
            raise ValueError(
                "a batch mapping needs keys 'src' and 'tgt' (llmkit's seq2seq batches) or 'input_ids' and 'labels' "
                f"(Hugging Face's), got {keys}: pass `split_fn(batch) -> (source, reference)` (and `generate_fn`)"
            )
        if isinstance(batch, tuple | list) and len(batch) >= 2:
            return batch[0], batch[1], True
        raise ValueError(
            "a batch must be a mapping with 'src' and 'tgt' or 'input_ids' and 'labels', or a tuple (src, tgt, ...), "
            f"got {type(batch).__name__}: pass `split_fn(batch) -> (source, reference)` (and `generate_fn`)"
        )

    def _ignored(self, ids: Tensor) -> Tensor:
        """``[B, T]`` bool: the positions that are not text (negative ids, ``ignore_ids``)."""
        mask = ids < 0
        if self.ignore_ids:
            ignore = self._ignore_cache.get(ids.device)
            if ignore is None:
                ignore = self._ignore_cache[ids.device] = torch.tensor(self.ignore_ids, device=ids.device)
            mask |= torch.isin(ids, ignore)
        return mask

    def _rows_of(self, ids: Tensor) -> list[list[int]]:
        """Each row's ids that are text, as lists (one host copy for the batch)."""
        keep = ~self._ignored(ids)
        flat, lengths = ids[keep].tolist(), keep.sum(1).tolist()
        rows, start = [], 0
        for length in lengths:
            rows.append(flat[start : start + length])
            start += length
        return rows

    def _decode(self, fn: DecodeFn, ids: Tensor, name: str) -> list[str]:
        texts = fn(self._rows_of(ids))
        if isinstance(texts, str) or not isinstance(texts, Sequence) or len(texts) != ids.shape[0]:
            got = f"a {type(texts).__name__}" + (f" of {len(texts)}" if isinstance(texts, Sequence) else "")
            raise ValueError(f"`{name}` must return one str per row ({ids.shape[0]}), got {got}")
        if not all(isinstance(text, str) for text in texts):
            bad = next(text for text in texts if not isinstance(text, str))
            raise TypeError(f"`{name}` must return strings, got a {type(bad).__name__}")
        return list(texts)

    def _update_text(self, predictions: list[str], references: list[list[str]]) -> None:
        for name, metric in self.metrics.items():
            if isinstance(metric, _ONE_REFERENCE):
                if any(len(refs) != 1 for refs in references):
                    raise ValueError(f"metric {name!r} ({type(metric).__name__}) takes one reference per sample")
                metric.update(predictions, [refs[0] for refs in references])
            else:
                metric.update(predictions, references)

    def _update_ids(self, predictions: Tensor, reference: Tensor) -> None:
        pred_ignored, ref_ignored = self._ignored(predictions), self._ignored(reference)
        filled: dict[int | None, tuple[Tensor, Tensor]] = {}
        for metric in self.metrics.values():
            fill = getattr(metric, "ignore_index")  # noqa: B009  # checked at construction
            if fill not in filled:
                filled[fill] = (predictions, reference) if fill is None else (
                    predictions.masked_fill(pred_ignored, fill), reference.masked_fill(ref_ignored, fill)
                )
            metric.update(*filled[fill])

    def _keep_examples(
        self, source: Any, predictions: Tensor, reference: Tensor | list[list[str]],
        pred_text: list[str] | None, ref_text: list[list[str]] | None,
    ) -> None:
        need = min(self.num_examples - len(self._examples), predictions.shape[0])
        if need <= 0:
            return
        preds = pred_text[:need] if pred_text is not None else self._texts(None, predictions[:need])
        if ref_text is not None:
            refs = [" | ".join(texts) for texts in ref_text[:need]]
        else:
            assert isinstance(reference, Tensor)  # text references need decode_fn, which gives ref_text
            refs = self._texts(None, reference[:need])
        if isinstance(source, Tensor) and source.ndim == 2:
            sources = self._texts(self.source_decode_fn, source[:need])
        elif isinstance(source, Sequence) and not isinstance(source, str):
            sources = [str(text) for text in source[:need]]
        else:
            sources = [""] * need
        self._examples.extend(Example(*triple) for triple in zip(sources, preds, refs, strict=True))

    def _texts(self, fn: DecodeFn | None, ids: Tensor) -> list[str]:
        if fn is not None:
            return self._decode(fn, ids, "source_decode_fn" if fn is self.source_decode_fn else "decode_fn")
        return [" ".join(map(str, row)) for row in self._rows_of(ids)]


def _named_metrics(metrics: Any) -> tuple[dict[str, Metric], bool]:
    """``({name: metric}, whether the user named them)``, checked."""
    if isinstance(metrics, Metric):
        metrics = [metrics]
    if isinstance(metrics, Mapping):
        items, named = list(metrics.items()), True
    elif isinstance(metrics, Sequence) and not isinstance(metrics, str):
        items, named = [(_class_name(metric), metric) for metric in metrics], False
    else:
        raise TypeError(
            "`metrics` must be a torchmetrics Metric, a mapping of names to metrics or a sequence of metrics, "
            f"got {type(metrics).__name__}"
        )
    if not items:
        raise ValueError("`metrics` is empty: pass at least one metric, e.g. {'bleu': llmkit.metrics.BLEUScore()}")
    out: dict[str, Metric] = {}
    for name, metric in items:
        if not isinstance(metric, Metric):
            raise TypeError(f"metric {name!r} must be a torchmetrics Metric, got {type(metric).__name__}")
        if not isinstance(name, str) or not name:
            raise ValueError(f"metric names must be non-empty strings, got {name!r}")
        if name in out:
            raise ValueError(
                f"two metrics are named {name!r} (metrics of one class): pass them as a mapping with distinct names"
            )
        out[name] = metric
    return out, named


def _class_name(metric: Any) -> str:
    name = type(metric).__name__.lower()
    return re.sub(r"score$", "", name) or name


def _flatten(name: str, value: Any, *, named: bool) -> dict[str, Tensor]:
    if isinstance(value, Mapping):
        return {
            (f"{name}_{key}" if named else str(key)): _as_tensor(f"{name}[{key!r}]", item)
            for key, item in value.items()
        }
    return {name: _as_tensor(name, value)}


def _as_tensor(name: str, value: Any) -> Tensor:
    if isinstance(value, Tensor):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return torch.tensor(float(value))
    raise TypeError(f"metric {name} returned a {type(value).__name__}; only numbers, tensors and dicts of them log")


def _check_ids(name: str, ids: Tensor) -> None:
    if ids.dtype == torch.bool or ids.is_floating_point() or ids.is_complex():
        raise TypeError(f"the {name} token ids must be an integer tensor, got dtype {ids.dtype}")
    if ids.ndim != 2:
        raise ValueError(f"the {name} token ids must have shape [batch, length], got {tuple(ids.shape)}")


def _check_text_references(reference: Any) -> list[list[str]]:
    """Text references as a list of references per sample."""
    if isinstance(reference, str) or not isinstance(reference, Sequence):
        raise TypeError(
            "the reference must be token ids [B, T] or a sequence of texts (one str, or a list of str, per sample), "
            f"got {type(reference).__name__}"
        )
    out = []
    for index, refs in enumerate(reference):
        texts = [refs] if isinstance(refs, str) else list(refs) if isinstance(refs, Sequence) else None
        if not texts or not all(isinstance(text, str) for text in texts):
            raise TypeError(f"reference {index} must be a str or a non-empty list of str, got {refs!r}")
        out.append(texts)
    return out


def _predicted_ids(generated: Any, batch_size: int) -> Tensor:
    """The generated ids ``[B, L]``: the first of each sample's rows when there are several."""
    ids = getattr(generated, "sequences", generated)
    if not isinstance(ids, Tensor):
        raise TypeError(
            "generation must return token ids [B, L] (a tensor, or an object with `.sequences`), "
            f"got {type(generated).__name__}"
        )
    _check_ids("generated", ids)
    rows = ids.shape[0]
    if rows != batch_size:
        if batch_size == 0 or rows % batch_size:
            raise ValueError(
                f"generation returned {rows} rows for {batch_size} samples; expected a multiple of {batch_size}"
            )
        ids = ids[:: rows // batch_size]  # rows of one sample are adjacent
    return ids
