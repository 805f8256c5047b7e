"""The model-based metrics beside the same model called by hand in batches of the same size.

Rows for benchmarks/metrics.py. Each metric scores the same texts with a small random BERT
(2 layers, 128 wide, a word-level vocabulary of the 8,000 commonest words of the WMT17 data),
saved to a temporary directory; the peer is a plain loop that tokenizes the same batches (the
texts sorted by length, in batches of 32, as the metrics batch them) and calls the same model
under ``torch.inference_mode()``, with the same arithmetic after it. Results are checked to
agree before anything is timed; the runs of both sides alternate, and each side's median is
reported. BERTScore also runs beside bert-score's own ``bert_cos_score_idf`` on the same loaded
model.

    python benchmarks/_model_based_bench.py     # print the rows alone
"""

from __future__ import annotations

import gc
import math
import re
import statistics
import sys
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from llmkit.metrics.model_based import AnswerRelevance, BERTScore, Faithfulness, Toxicity
from llmkit.metrics.model_based.faithfulness import split_sentences
from tests.conftest import WMT17_PATH, load_wmt17
from tests.metrics import tiny_hf

NUM_TEXTS = 256
BATCH_SIZE = 32
PEER = "by hand, same batches"


def texts(num: int = NUM_TEXTS) -> tuple[list[str], list[str], list[str]]:
    """``(outputs, references, contexts)``: WMT17 system outputs and references, or tiny_hf sentences."""
    if WMT17_PATH.exists():
        systems, reference = load_wmt17()
        outputs = systems[0][1][:num]
        contexts = [f"{reference[i]} {reference[(i + 1) % len(reference)]}" for i in range(num)]
        return outputs, reference[:num], contexts
    words = tiny_hf.WORDS
    make = lambda i, n: " ".join(words[(i * 7 + k * 3) % len(words)] for k in range(n))  # noqa: E731
    outputs, refs = [make(i, 12) for i in range(num)], [make(i + 1, 10) for i in range(num)]
    return outputs, refs, [make(i + 2, 30) for i in range(num)]


def build_models(root: Path, corpus: list[str]) -> dict[str, Path]:
    """Save the tokenizer and the models (classifier, NLI classifier, encoder) under ``root``."""
    from transformers import BertConfig, BertForSequenceClassification, BertModel, BertTokenizer

    counts = Counter(word for text in corpus for word in re.findall(r"\w+|[^\w\s]", text.lower()))
    vocab = tiny_hf.SPECIALS + [word for word, _ in counts.most_common(8000)]
    tokenizer = BertTokenizer(vocab={word: index for index, word in enumerate(vocab)}, model_max_length=128)
    config = {
        "vocab_size": len(vocab), "hidden_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2,
        "intermediate_size": 512, "max_position_embeddings": 128,
    }  # fmt: skip
    torch.manual_seed(0)
    models = {
        "toxic": BertForSequenceClassification(BertConfig(**config, id2label={0: "ok", 1: "toxic"})),
        "nli": BertForSequenceClassification(
            BertConfig(**config, id2label={0: "contradiction", 1: "neutral", 2: "entailment"})
        ),
        "encoder": BertModel(BertConfig(**config)),
    }
    paths = {}
    for name, model in models.items():
        paths[name] = root / name
        model.save_pretrained(paths[name])
        tokenizer.save_pretrained(paths[name])
    return paths


def _tokenize(tokenizer: Any, first: list[str], second: list[str] | None = None) -> dict[str, torch.Tensor]:
    kwargs = {"padding": True, "truncation": True, "return_tensors": "pt"}
    return dict(tokenizer(first, text_pair=second, **kwargs) if second is not None else tokenizer(first, **kwargs))


def batches(lengths: list[int]) -> list[list[int]]:
    """Indices in batches of ``BATCH_SIZE`` by increasing length: the batches the metrics run."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    return [order[start : start + BATCH_SIZE] for start in range(0, len(order), BATCH_SIZE)]


def hand_toxicity(model: Any, tokenizer: Any, outputs: list[str]) -> float:
    scores = []
    with torch.inference_mode():
        for batch in batches([len(text) for text in outputs]):
            logits = model(**_tokenize(tokenizer, [outputs[i] for i in batch])).logits
            scores.append(logits.softmax(-1)[:, 1])
    return torch.cat(scores).double().mean().item()


def hand_faithfulness(model: Any, tokenizer: Any, outputs: list[str], contexts: list[str]) -> float:
    premises, hypotheses, owners = [], [], []
    for index, (output, context) in enumerate(zip(outputs, contexts, strict=True)):
        for sentence in split_sentences(output):
            premises.append(context)
            hypotheses.append(sentence)
            owners.append(index)
    probs, order = [], []
    with torch.inference_mode():
        for batch in batches([len(p) + len(h) for p, h in zip(premises, hypotheses, strict=True)]):
            encoded = _tokenize(tokenizer, [premises[i] for i in batch], [hypotheses[i] for i in batch])
            probs.append(model(**encoded).logits.softmax(-1)[:, 2])
            order.extend(batch)
    best = [math.inf] * len(outputs)
    for pair, prob in zip(order, torch.cat(probs).tolist(), strict=True):
        best[owners[pair]] = min(best[owners[pair]], prob)
    return sum(best) / len(best)


def _mean_pooled(model: Any, tokenizer: Any, batch: list[str]) -> torch.Tensor:
    encoded = _tokenize(tokenizer, batch)
    mask = encoded["attention_mask"].unsqueeze(-1).float()
    return (model(**encoded).last_hidden_state * mask).sum(1) / mask.sum(1)


def hand_relevance(model: Any, tokenizer: Any, outputs: list[str], questions: list[str]) -> float:
    scores = []
    with torch.inference_mode():
        for batch in batches([len(q) + len(r) for q, r in zip(questions, outputs, strict=True)]):
            q = _mean_pooled(model, tokenizer, [questions[i] for i in batch])
            r = _mean_pooled(model, tokenizer, [outputs[i] for i in batch])
            scores.append(torch.nn.functional.cosine_similarity(q, r, dim=-1))
    return torch.cat(scores).double().mean().item()


def _unit_states(model: Any, tokenizer: Any, batch: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    encoded = _tokenize(tokenizer, [text.strip() for text in batch])
    hidden = model(**encoded).last_hidden_state
    mask = encoded["attention_mask"].bool()
    special = (encoded["input_ids"] == tokenizer.cls_token_id) | (encoded["input_ids"] == tokenizer.sep_token_id)
    return hidden / hidden.norm(dim=-1, keepdim=True), mask, (mask & ~special).double()


def hand_bertscore(model: Any, tokenizer: Any, outputs: list[str], refs: list[str]) -> float:
    f1 = []
    with torch.inference_mode():
        for batch in batches([len(h) + len(r) for h, r in zip(outputs, refs, strict=True)]):
            hyp, hyp_mask, hyp_w = _unit_states(model, tokenizer, [outputs[i] for i in batch])
            ref, ref_mask, ref_w = _unit_states(model, tokenizer, [refs[i] for i in batch])
            sim = torch.bmm(hyp, ref.transpose(1, 2)).masked_fill(~(hyp_mask[:, :, None] & ref_mask[:, None, :]), -2)
            precision = (sim.amax(2).double() * hyp_w).sum(1) / hyp_w.sum(1)
            recall = (sim.amax(1).double() * ref_w).sum(1) / ref_w.sum(1)
            f1.append(2 * precision * recall / (precision + recall))
    return torch.cat(f1).mean().item()


def _alternating(ours: Callable[[], Any], peer: Callable[[], Any], runs: int) -> tuple[float, float]:
    """Medians of ``runs`` timed calls of each, alternating (after one warm-up call of each)."""
    ours()
    peer()
    times: dict[str, list[float]] = {"ours": [], "peer": []}
    for _ in range(runs):
        for name, fn in (("ours", ours), ("peer", peer)):
            gc.collect()
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return statistics.median(times["ours"]), statistics.median(times["peer"])


def _metric_run(metric: Any, key: str, *args: Any) -> Callable[[], float]:
    def run() -> float:
        metric.reset()
        metric.update(*args)
        return metric.compute()[key].item()

    return run


def bench_rows(runs: int) -> list[tuple[str, float, str, float]]:
    """``(task, llmkit seconds, peer name, peer seconds)`` for each model-based metric."""
    from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer, logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()  # transformers' "Loading weights" bars would split the table
    warnings.filterwarnings("ignore")
    outputs, refs, contexts = texts()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        paths = build_models(Path(tmp), outputs + refs)
        tokenizer = AutoTokenizer.from_pretrained(paths["toxic"], local_files_only=True)
        classifier = AutoModelForSequenceClassification.from_pretrained(paths["toxic"], local_files_only=True).eval()
        nli = AutoModelForSequenceClassification.from_pretrained(paths["nli"], local_files_only=True).eval()
        encoder = AutoModel.from_pretrained(paths["encoder"], local_files_only=True).eval()
        cases = [
            (
                f"Toxicity {len(outputs)} texts",
                _metric_run(Toxicity(classifier, tokenizer, batch_size=BATCH_SIZE), "toxicity", outputs),
                lambda: hand_toxicity(classifier, tokenizer, outputs),
            ),
            (
                f"Faithfulness {len(outputs)} texts",
                _metric_run(Faithfulness(nli, tokenizer, batch_size=BATCH_SIZE), "faithfulness", outputs, contexts),
                lambda: hand_faithfulness(nli, tokenizer, outputs, contexts),
            ),
            (
                f"AnswerRelevance {len(outputs)} pairs",
                _metric_run(
                    AnswerRelevance(encoder, tokenizer, batch_size=BATCH_SIZE), "answer_relevance", outputs, refs
                ),
                lambda: hand_relevance(encoder, tokenizer, outputs, refs),
            ),
            (
                f"BERTScore {len(outputs)} pairs",
                _metric_run(BERTScore(encoder, tokenizer, batch_size=BATCH_SIZE), "bertscore_f1", outputs, refs),
                lambda: hand_bertscore(encoder, tokenizer, outputs, refs),
            ),
        ]
        for task, ours, peer in cases:
            assert abs(ours() - peer()) < 1e-5, task
            ours_t, peer_t = _alternating(ours, peer, runs)
            rows.append((task, ours_t, PEER, peer_t))
        try:
            from bert_score.utils import bert_cos_score_idf
        except ImportError:  # bert-score is a test oracle, not always installed
            return rows
        idf = {tokenizer.cls_token_id: 0.0, tokenizer.sep_token_id: 0.0}
        weights = type("Weights", (dict,), {"__missing__": lambda self, key: 1.0})(idf)

        def bert_score_f1() -> float:
            scores = bert_cos_score_idf(encoder, refs, outputs, tokenizer, weights, batch_size=BATCH_SIZE, device="cpu")
            return scores[:, 2].double().mean().item()

        ours = _metric_run(BERTScore(encoder, tokenizer, batch_size=BATCH_SIZE), "bertscore_f1", outputs, refs)
        assert abs(ours() - bert_score_f1()) < 1e-5
        ours_t, peer_t = _alternating(ours, bert_score_f1, runs)
        rows.append((f"BERTScore {len(outputs)} pairs", ours_t, "bert-score bert_cos_score_idf", peer_t))
    return rows


if __name__ == "__main__":
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; ratio = peer time / llmkit time")
    for task, ours_t, peer_name, peer_t in bench_rows(runs=3):
        print(f"| {task:<34} | {ours_t:8.3f} s | {peer_name:<30} | {peer_t:8.3f} s | {peer_t / ours_t:5.2f}x |")
