"""BERTScore: greedy matching of contextual embeddings, equal to the bert-score package."""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, ClassVar, cast

import torch
from torch import Tensor, nn
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat
from torchmetrics.utilities.distributed import gather_all_tensors

from llmkit.metrics._state import add_update_config_state
from llmkit.metrics.model_based._base import ModelMetric, load_source, prepare_source, text_batch
from llmkit.metrics.model_based._loading import ModelSource, Tokenizer, output_tensor

_KEYS = ("bertscore_precision", "bertscore_recall", "bertscore_f1")
# Tokenizers to which bert-score gives `add_prefix_space=True` (byte-level BPE: GPT-2, RoBERTa).
_PREFIX_SPACE_TOKENIZERS = {"GPT2Tokenizer", "GPT2TokenizerFast", "RobertaTokenizer", "RobertaTokenizerFast"}


@dataclass(frozen=True)
class WeightTable:
    """Token weights: ``values[i]`` for the id ``keys[i]`` (sorted), ``default`` for any other id.

    ``default=None`` makes an id outside ``keys`` an error (an idf mapping without a default).
    """

    keys: Tensor
    values: Tensor
    default: float | None

    def __call__(self, ids: Tensor) -> Tensor:
        """The weights ``[N]`` (float64) of token ids ``[N]``.

        Raises:
            ValueError: If an id has no weight and there is no default.
        """
        keys = self.keys.to(ids.device)
        values = self.values.to(ids.device)
        if keys.numel() == 0:
            found = torch.zeros_like(ids, dtype=torch.bool)
            picked = torch.zeros(ids.shape, dtype=torch.float64, device=ids.device)
        else:
            position = torch.searchsorted(keys, ids).clamp(max=keys.numel() - 1)
            found = keys[position] == ids
            picked = values[position]
        if self.default is None:
            if not bool(found.all()):
                raise ValueError(f"token id {int(ids[~found][0])} has no weight in the `idf` mapping")
            return picked
        return torch.where(found, picked, torch.full_like(picked, self.default))


def uniform_weights(special_ids: Sequence[int | None]) -> WeightTable:
    """bert-score without idf: weight 1 for every token, 0 for the ``[CLS]``/``[SEP]`` ids."""
    keys = sorted({int(index) for index in special_ids if index is not None})
    return WeightTable(torch.tensor(keys, dtype=torch.long), torch.zeros(len(keys), dtype=torch.float64), 1.0)


def idf_weights(ids: Tensor, lengths: Tensor) -> WeightTable:
    """bert-score's ``get_idf_dict``: ``log((M + 1) / (df + 1))`` over ``M`` documents, ``log(M + 1)`` unseen.

    Args:
        ids: the documents' token ids, concatenated ``[N]``.
        lengths: each document's number of tokens ``[M]``.
    """
    num_docs = lengths.numel()
    if ids.numel() == 0:
        empty = torch.zeros(0, dtype=torch.long)
        return WeightTable(empty, empty.to(torch.float64), math.log(num_docs + 1))
    ids = ids.long().cpu()
    lengths = lengths.long().cpu()
    doc = torch.repeat_interleave(torch.arange(num_docs), lengths)
    width = int(ids.max()) + 1
    distinct = torch.unique(doc * width + ids) % width  # each id once per document
    keys, counts = torch.unique(distinct, return_counts=True)
    values = torch.log((num_docs + 1) / (counts.to(torch.float64) + 1))
    return WeightTable(keys, values, math.log(num_docs + 1))


def mapping_weights(mapping: Mapping[int, float]) -> WeightTable:
    """A given ``{token id: weight}`` (bert-score's ``idf=dict``); a ``defaultdict``'s factory gives the default."""
    keys = sorted(int(key) for key in mapping)
    factory = getattr(mapping, "default_factory", None)
    default = float(factory()) if callable(factory) else None
    values = torch.tensor([float(mapping[key]) for key in keys], dtype=torch.float64)
    return WeightTable(torch.tensor(keys, dtype=torch.long), values, default)


def read_baseline(path: str | os.PathLike[str], layer: int) -> Tensor:
    """The ``(P, R, F)`` baseline of ``layer`` from a bert-score baseline file.

    The file is comma-separated with the header ``LAYER,P,R,F`` and one row per layer from 0,
    as bert-score's ``rescale_baseline/<lang>/<model>.tsv`` files; the row is taken by position,
    as bert-score does.

    Raises:
        ValueError: If the file does not exist, lacks a column, or has no row for ``layer``.
    """
    file = Path(path).expanduser()
    if not file.is_file():
        raise ValueError(f"baseline file {str(path)!r} does not exist")
    with file.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    columns = list(rows[0]) if rows else []
    if not {"P", "R", "F"} <= set(columns):
        raise ValueError(f"baseline file {str(path)!r} must have the columns LAYER,P,R,F, got {columns}")
    if not 0 <= layer < len(rows):
        raise ValueError(f"baseline file {str(path)!r} has rows for layers 0..{len(rows) - 1}, not for layer {layer}")
    return torch.tensor([float(rows[layer][name]) for name in ("P", "R", "F")], dtype=torch.float64)


@dataclass
class Matches:
    """Greedy matches of (hypothesis, reference) pairs, token by token, concatenated.

    For each pair (in order), its hypothesis' tokens with their best similarity in the reference
    (``hyp_*``) and its reference's tokens with their best similarity in the hypothesis
    (``ref_*``); ``refs_per_sample`` groups consecutive pairs into samples.
    """

    hyp_ids: Tensor  # [N_h] long
    hyp_sims: Tensor  # [N_h] float32
    hyp_lens: Tensor  # [P] long
    ref_ids: Tensor  # [N_r] long
    ref_sims: Tensor  # [N_r] float32
    ref_lens: Tensor  # [P] long
    pair_empty: Tensor  # [P] long: 1 where the hypothesis or the reference is empty
    refs_per_sample: Tensor  # [S] long

    DTYPES: ClassVar[dict[str, torch.dtype]] = {
        "hyp_ids": torch.long,
        "hyp_sims": torch.float32,
        "hyp_lens": torch.long,
        "ref_ids": torch.long,
        "ref_sims": torch.float32,
        "ref_lens": torch.long,
        "pair_empty": torch.long,
        "refs_per_sample": torch.long,
    }

    @classmethod
    def empty(cls, device: torch.device) -> Matches:
        """No pairs."""
        return cls(**{name: torch.zeros(0, dtype=dtype, device=device) for name, dtype in cls.DTYPES.items()})

    @classmethod
    def cat(cls, parts: Sequence[Matches]) -> Matches:
        """The matches of several batches, one after the other."""
        return cls(**{f.name: torch.cat([getattr(part, f.name) for part in parts]) for f in fields(cls)})

    def prf(self, weights: WeightTable) -> Tensor:
        """Each sample's ``(P, R, F)``, ``[S, 3]`` float64: the best over its references, per column.

        As bert-score: P (R) is the weighted mean of the hypothesis' (reference's) token
        similarities, F their harmonic mean, a pair with an empty side scores 0, and each of P, R
        and F is the maximum over the sample's pairs separately. A side whose weights sum to 0
        scores 0 (bert-score gives NaN there).
        """
        num_pairs = self.hyp_lens.numel()
        device = self.hyp_sims.device

        def weighted(ids: Tensor, sims: Tensor, lengths: Tensor) -> Tensor:
            pair = torch.repeat_interleave(torch.arange(num_pairs, device=device), lengths.to(device))
            token_weights = weights(ids.to(device))
            total = torch.zeros(num_pairs, dtype=torch.float64, device=device).index_add(0, pair, token_weights)
            dot = torch.zeros_like(total).index_add(0, pair, token_weights * sims.to(torch.float64))
            return torch.where(total > 0, dot / torch.where(total > 0, total, 1.0), 0.0)

        precision = weighted(self.hyp_ids, self.hyp_sims, self.hyp_lens)
        recall = weighted(self.ref_ids, self.ref_sims, self.ref_lens)
        f1 = (2 * precision * recall / (precision + recall)).nan_to_num(0.0)
        empty = self.pair_empty.to(device).bool()
        pairs = torch.stack([precision, recall, f1], dim=-1).masked_fill(empty[:, None], 0.0)
        num_samples = self.refs_per_sample.numel()
        sample = torch.repeat_interleave(torch.arange(num_samples, device=device), self.refs_per_sample.to(device))
        out = torch.full((num_samples, 3), -math.inf, dtype=torch.float64, device=device)
        return out.scatter_reduce(0, sample[:, None].expand(-1, 3), pairs, reduce="amax")


@dataclass(frozen=True)
class _Embedded:
    embeddings: Tensor  # [B, T, H] float32, each row of unit norm
    ids: Tensor  # [B, T] long
    mask: Tensor  # [B, T] bool
    empty: Tensor  # [B] bool


def greedy_match(hyp: _Embedded, ref: _Embedded) -> tuple[Tensor, Tensor]:
    """Each real hypothesis token's best cosine in its reference ``[P, T_h]``, and the converse ``[P, T_r]``.

    Padding never wins a maximum (bert-score lets zero-padded positions compete, which changes
    nothing when similarities are non-negative, as with real BERT models).
    """
    sim = torch.bmm(hyp.embeddings, ref.embeddings.transpose(1, 2))  # (P, T_h, T_r)
    valid = hyp.mask[:, :, None] & ref.mask[:, None, :]
    sim = sim.masked_fill(~valid, -math.inf)
    precision = sim.amax(dim=2).masked_fill(~hyp.mask, 0.0)
    recall = sim.amax(dim=1).masked_fill(~ref.mask, 0.0)
    return precision, recall


def _references(target: object, num: int) -> list[list[str]]:
    """Each sample's references: a str or a non-empty sequence of str per sample.

    Raises:
        TypeError: If ``target`` or a sample's references are not strings.
        ValueError: If the lengths differ or a sample has no reference.
    """
    if isinstance(target, str) or not isinstance(target, Sequence):
        raise TypeError(f"`target` must be a sequence of references per sample, got {type(target).__name__}")
    if len(target) != num:
        raise ValueError(f"`preds` and `target` must have the same length, got {num} and {len(target)}")
    out = []
    for index, refs in enumerate(target):
        group = [refs] if isinstance(refs, str) else text_batch(refs, f"target[{index}]")
        if not group:
            raise ValueError(f"sample {index} has no reference")
        out.append(group)
    return out


class BERTScore(ModelMetric):
    """BERTScore (Zhang et al., 2020) with a local model, equal to the ``bert-score`` package.

    Equals ``bert_score.score(preds, target, model_type=<the same checkpoint>, num_layers=...,
    idf=..., rescale_with_baseline=..., baseline_path=...)`` averaged over samples, within float
    rounding, as bert-score 0.3.13 computes it: each sentence is stripped, encoded with special
    tokens and truncated to the tokenizer's maximum length (GPT-2/RoBERTa tokenizers get
    ``add_prefix_space=True``, as bert-score passes it; transformers 5 ignores it); its
    embeddings are hidden state ``num_layers`` (0: the embedding layer), each normalised; every
    token is matched to its most similar token on the other side (greedy matching, special tokens
    included); P and R are the weighted means of the hypothesis' and the reference's best
    similarities, F their harmonic mean. A sample with several references takes the maximum of
    each of P, R and F over them. An empty sentence scores 0.

    Weights (``idf``):

    - ``False``: 1 for every token, 0 for ``[CLS]``/``[SEP]`` (the tokenizer's ``cls_token_id``
      and ``sep_token_id``). Constant-size sum states.
    - ``True`` with ``idf_sentences``: idf ``log((M + 1) / (df + 1))`` from those ``M`` sentences
      (``BERTScorer(idf_sents=...)``); fixed at construction, so constant-size sum states.
    - ``True`` alone: idf from the references of every update, as ``bert_score.score(idf=True)``
      gets from its references. The weights are known only at ``compute``, so the metric keeps
      each token's id and best similarity (concatenated list states, ~20 bytes a token, gathered
      across processes), not the embeddings; pass ``idf_sentences`` (for example the references,
      known ahead) to keep the state constant instead.
    - a mapping ``{token id: weight}`` (bert-score's ``idf=dict``; a ``defaultdict``'s factory
      gives unseen ids their weight). Constant-size sum states.

    ``compute()`` returns ``{"bertscore_precision", "bertscore_recall", "bertscore_f1"}``, the
    means over samples as 0-d tensors (NaN before any update), rescaled as
    ``(score - baseline) / (1 - baseline)`` when ``baseline_path`` is given. :meth:`scores` gives
    each sample's ``(P, R, F)``.

    Differences from bert-score, by design: a padded position never wins a maximum (bert-score
    lets its zero similarity compete, which matters only for negative similarities); a side whose
    weights sum to 0 scores 0 (bert-score: NaN); nothing is downloaded (baselines come from a file).

    Args:
        model: an ``nn.Module`` called as ``model(**batch)`` (with ``output_hidden_states=True``
            when ``num_layers`` is set) that returns hidden states ``[B, T, H]`` (a tensor, or an
            output with ``.last_hidden_state``, and ``.hidden_states`` for ``num_layers``), or the
            path of a local Hugging Face checkpoint directory (loaded with ``AutoModel``; the
            encoder alone for an encoder-decoder, as bert-score).
        tokenizer: the tokenizer callable; loaded from the directory when ``model`` is a path and
            this is ``None``.
        num_layers: which hidden state to use (bert-score's ``num_layers``); ``None`` takes the
            last one (the model's output).
        idf: ``False``, ``True`` or a mapping of token weights, as above.
        idf_sentences: the sentences to count document frequencies in, with ``idf=True``.
        baseline_path: a bert-score baseline file (``LAYER,P,R,F``) to rescale with.
        batch_size: how many sentences go through the model at once.
        max_length: the tokenizer's truncation length; ``None`` uses the tokenizer's own
            (bert-score truncates to ``tokenizer.model_max_length``).
        kwargs: the keyword arguments of :class:`torchmetrics.Metric`.

    ``update(preds, target)``: ``preds: Sequence[str]``; ``target: Sequence[str | Sequence[str]]``,
    the reference or references of each sample.

    Raises:
        TypeError: If ``model`` is neither a module nor a path, a module comes without a
            tokenizer, or ``idf`` is not a bool or a mapping.
        ValueError: If the path is not a local checkpoint directory, ``num_layers`` is out of the
            model's range, ``idf_sentences`` comes without ``idf=True``, or the baseline file is
            missing or has no row for the layer.
        ImportError: If ``model`` is a path and ``transformers`` is not installed.

    Examples:
        >>> import torch
        >>> def tokenizer(texts, **kwargs):  # one id per word
        ...     vocab = {"the": 1, "cat": 2, "sat": 3, "a": 4, "dog": 5}
        ...     ids = [[vocab[word] for word in text.split()] for text in texts]
        ...     width = max(map(len, ids))
        ...     return {"input_ids": torch.tensor([row + [0] * (width - len(row)) for row in ids]),
        ...             "attention_mask": torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in ids])}
        >>> class OneHot(torch.nn.Module):  # each word its own direction
        ...     def forward(self, input_ids, attention_mask):
        ...         return torch.nn.functional.one_hot(input_ids, 6).float()
        >>> metric = BERTScore(OneHot(), tokenizer)
        >>> metric.update(["the cat sat"], [["a cat sat", "the dog"]])
        >>> {name: round(value.item(), 4) for name, value in metric.compute().items()}
        {'bertscore_precision': 0.6667, 'bertscore_recall': 0.6667, 'bertscore_f1': 0.6667}
    """

    higher_is_better = True
    float64_states = ("precision_sum", "recall_sum", "f1_sum")

    precision_sum: Tensor
    recall_sum: Tensor
    f1_sum: Tensor
    total: Tensor

    def __init__(
        self,
        model: ModelSource,
        tokenizer: Tokenizer | None = None,
        *,
        num_layers: int | None = None,
        idf: bool | Mapping[int, float] = False,
        idf_sentences: Sequence[str] | None = None,
        baseline_path: str | os.PathLike[str] | None = None,
        batch_size: int = 64,
        max_length: int | None = None,
        **kwargs: Any,
    ) -> None:
        if not isinstance(idf, bool | Mapping):
            raise TypeError(f"`idf` must be a bool or a mapping of token ids to weights, got {type(idf).__name__}")
        if idf_sentences is not None and idf is not True:
            raise ValueError(f"`idf_sentences` needs `idf=True`, got idf={idf!r}")
        config, directory = prepare_source(model, tokenizer)
        depth = getattr(config, "num_hidden_layers", None)
        if num_layers is not None:
            if isinstance(num_layers, bool) or not isinstance(num_layers, int):
                raise TypeError(f"`num_layers` must be an int or None, got {num_layers!r}")
            if num_layers < 0 or (isinstance(depth, int) and num_layers > depth):
                raise ValueError(f"`num_layers` must be in [0, {depth}] (the model's layers), got {num_layers}")
        baseline = None
        if baseline_path is not None:
            layer = num_layers if num_layers is not None else depth
            if not isinstance(layer, int):
                raise ValueError("the model's number of layers is unknown: pass `num_layers` to pick the baseline row")
            baseline = read_baseline(baseline_path, layer)
        local = load_source(model, tokenizer, config, directory, "encoder")
        if directory is not None and hasattr(local.module, "encoder") and hasattr(local.module, "decoder"):
            encoder = cast(nn.Module, local.module.encoder)  # as bert-score
            local = type(local)(encoder, local.tokenizer, local.config, local.path)
        super().__init__(local, batch_size=batch_size, max_length=max_length, **kwargs)
        self.num_layers = num_layers
        self.baseline = baseline
        self.prefix_space = any(cls.__name__ in _PREFIX_SPACE_TOKENIZERS for cls in type(local.tokenizer).__mro__)
        self.streaming_idf = idf is True and idf_sentences is None
        self.weights: WeightTable | None
        if isinstance(idf, Mapping):
            self.weights = mapping_weights(idf)
        elif idf is False:
            tok = local.tokenizer
            self.weights = uniform_weights([getattr(tok, "cls_token_id", None), getattr(tok, "sep_token_id", None)])
        elif idf_sentences is not None:
            self.weights = self._idf_of(text_batch(idf_sentences, "idf_sentences"))
        else:
            self.weights = None
        for name in ("precision_sum", "recall_sum", "f1_sum"):
            self.add_state(name, default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0), dist_reduce_fx="sum")
        if self.streaming_idf:
            for name in Matches.DTYPES:
                self.add_state(name, default=[], dist_reduce_fx="cat")
        add_update_config_state(
            self,
            model=str(local.path or type(local.module).__qualname__),
            num_layers=num_layers,
            idf=repr(idf) if isinstance(idf, bool) else "mapping",
            idf_sentences=None if idf_sentences is None else len(idf_sentences),
            max_length=self.max_length,
        )

    def _encode(self, texts: Sequence[str]) -> dict[str, Tensor]:
        """bert-score's ``sent_encode``, batched: stripped texts, ``add_prefix_space=True`` for byte-level BPE."""
        extra: dict[str, Any] = {"add_prefix_space": True} if self.prefix_space else {}
        return self._tokenize([text.strip() for text in texts], None, **extra)

    def _idf_of(self, sentences: list[str]) -> WeightTable:
        ids, lengths = [], []
        for batch in self._batches([len(sentence) for sentence in sentences]):
            encoded = self._encode([sentences[i] for i in batch])
            mask = encoded.get("attention_mask", torch.ones_like(encoded["input_ids"])).bool()
            ids.append(encoded["input_ids"][mask].cpu())
            lengths.append(mask.sum(dim=1).cpu())
        if not ids:
            return idf_weights(torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long))
        return idf_weights(torch.cat(ids), torch.cat(lengths))

    def _embed(self, module: nn.Module, texts: list[str]) -> _Embedded:
        encoded = self._encode(texts)
        ids = encoded["input_ids"]
        mask = encoded.get("attention_mask", torch.ones_like(ids)).bool()
        if self.num_layers is None:
            hidden = output_tensor(module(**encoded), "last_hidden_state")
        else:
            hidden = module(**encoded, output_hidden_states=True).hidden_states[self.num_layers]
        hidden = hidden.float()
        embeddings = hidden / hidden.norm(dim=-1, keepdim=True)
        empty = torch.tensor([not text.strip() for text in texts], device=ids.device)
        return _Embedded(embeddings, ids, mask, empty)

    def _match(self, preds: Sequence[str], target: object) -> tuple[Matches, Tensor]:
        """The matches of every sample, and the samples' indices in the order the matches hold them."""
        hyps = text_batch(preds, "preds")
        references = _references(target, len(hyps))
        # Samples batched by length (hypothesis and longest reference), as bert-score sorts its sentences.
        batches = self._batches([len(hyp) + max(map(len, refs)) for hyp, refs in zip(hyps, references, strict=True)])
        parts = []
        with self._running() as module:
            for batch in batches:
                hyp = self._embed(module, [hyps[i] for i in batch])
                groups = [references[i] for i in batch]
                flat = [ref for group in groups for ref in group]
                sizes = torch.tensor([len(group) for group in groups], device=hyp.ids.device)
                owner = torch.repeat_interleave(torch.arange(len(sizes), device=hyp.ids.device), sizes)
                for ref_chunk in self._chunks(len(flat)):
                    ref = self._embed(module, flat[ref_chunk])
                    index = owner[ref_chunk]
                    pair_hyp = _Embedded(hyp.embeddings[index], hyp.ids[index], hyp.mask[index], hyp.empty[index])
                    hyp_sims, ref_sims = greedy_match(pair_hyp, ref)
                    parts.append(
                        Matches(
                            hyp_ids=pair_hyp.ids[pair_hyp.mask],
                            hyp_sims=hyp_sims[pair_hyp.mask],
                            hyp_lens=pair_hyp.mask.sum(dim=1),
                            ref_ids=ref.ids[ref.mask],
                            ref_sims=ref_sims[ref.mask],
                            ref_lens=ref.mask.sum(dim=1),
                            pair_empty=(pair_hyp.empty | ref.empty).long(),
                            # The samples of this batch, given with its first part.
                            refs_per_sample=sizes if ref_chunk.start == 0 else sizes[:0],
                        )
                    )
        order = torch.tensor([index for batch in batches for index in batch], dtype=torch.long)
        if not parts:
            return Matches.empty(self.device), order
        # Out of inference mode: clones are ordinary tensors, fit for states and collectives.
        matches = Matches.cat(parts)
        return Matches(**{f.name: getattr(matches, f.name).clone() for f in fields(Matches)}), order

    def scores(self, preds: Sequence[str], target: Sequence[str | Sequence[str]]) -> Tensor:
        """Each sample's ``(P, R, F)``, ``[B, 3]`` float64, before any baseline rescaling (the states are untouched).

        Equal to ``bert_score.score(preds, target, ...)`` stacked; with ``idf=True`` and no
        ``idf_sentences`` the idf comes from these references, as bert-score's does.
        """
        matches, order = self._match(preds, target)
        prf = matches.prf(self.weights or idf_weights(matches.ref_ids, matches.ref_lens))
        out = torch.empty_like(prf)
        out[order.to(prf.device)] = prf
        return out

    def update(self, preds: Sequence[str], target: Sequence[str | Sequence[str]]) -> None:
        """Match a batch of hypotheses with their references."""
        matches, _ = self._match(preds, target)
        if self.weights is None:
            for name in Matches.DTYPES:
                getattr(self, name).append(getattr(matches, name))
            return
        prf = matches.prf(self.weights)
        self.precision_sum += prf[:, 0].sum()
        self.recall_sum += prf[:, 1].sum()
        self.f1_sum += prf[:, 2].sum()
        self.total += prf.shape[0]

    def compute(self) -> dict[str, Tensor]:
        """The mean ``(P, R, F)`` over samples, rescaled by the baseline when there is one."""
        if self.weights is None:
            if isinstance(self.hyp_lens, list) and not self.hyp_lens:
                matches = Matches.empty(self.device)
            else:
                matches = Matches(**{name: dim_zero_cat(getattr(self, name)) for name in Matches.DTYPES})
            prf = matches.prf(idf_weights(matches.ref_ids, matches.ref_lens))
            sums, total = prf.sum(dim=0), torch.tensor(prf.shape[0])
        else:
            sums = torch.stack([self.precision_sum, self.recall_sum, self.f1_sum])
            total = self.total
        means = sums / total.to(sums)
        if self.baseline is not None:
            baseline = self.baseline.to(means)
            means = (means - baseline) / (1 - baseline)
        return dict(zip(_KEYS, means.unbind(), strict=True))

    def _apply(self, fn: Callable[[Tensor], Tensor], exclude_state: Sequence[str] = "") -> Metric:
        # The token-level states follow the device but keep their dtypes (ids long, similarities float32).
        this = super()._apply(fn, exclude_state=(*exclude_state, *Matches.DTYPES))
        for name in Matches.DTYPES:
            if name in this._defaults:
                value = getattr(this, name)
                moved = value.to(this.device) if isinstance(value, Tensor) else [item.to(this.device) for item in value]
                setattr(this, name, moved)
        return this

    def _sync_dist(self, dist_sync_fn: Callable[..., Any] = gather_all_tensors, process_group: Any = None) -> None:
        # torchmetrics gives a rank without updates an empty float tensor of the metric's dtype; the
        # other ranks' ids are long, and a collective with mixed dtypes fails: use the right dtypes.
        for name, dtype in Matches.DTYPES.items():
            if name in self._defaults and isinstance(getattr(self, name), list) and not getattr(self, name):
                setattr(self, name, [torch.zeros(0, dtype=dtype, device=self.device)])
        super()._sync_dist(dist_sync_fn, process_group)
