"""Time llmkit's metrics beside sacrebleu, rouge-score and torchmetrics, in one process.

Every row scores the same work with each library (the 16 WMT17 en-de systems against the
reference, 10,000 question-answer pairs, texts through a small local model, or one batch of
logits) and prints the median of several runs and the ratio
peer time / llmkit time (above 1: llmkit is faster). Scores are checked to agree first.

    python benchmarks/metrics.py               # the full table
    python benchmarks/metrics.py --quick       # fewer systems and runs
    python benchmarks/metrics.py --only rouge perplexity   # some groups of rows
"""

from __future__ import annotations

import argparse
import gc
import logging
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._model_based_bench import bench_rows as model_based_bench_rows
from benchmarks._qa_bench import bench_rows as qa_bench_rows
from llmkit.metrics import BLEUScore, CHRFScore
from llmkit.metrics.functional import bleu_score, chrf_score, perplexity, rouge_score, ter_score
from llmkit.metrics.significance import paired_approximate_randomization, paired_bootstrap
from llmkit.metrics.tokenizers import tokenize_bleu
from tests.conftest import WMT17_PATH, load_wmt17

#: The groups of rows, in the order they are printed (``--only`` picks some).
GROUPS = ("bleu", "rouge", "chrf", "ter", "significance", "qa", "model-based", "perplexity")


def median_seconds(fn: Callable[[], Any], runs: int) -> tuple[float, Any]:
    """Median wall time of ``runs`` calls of ``fn`` (after one warm-up call) and its last result."""
    result = fn()
    times = []
    for _ in range(runs):
        gc.collect()
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def row(task: str, ours: float, peer_name: str, peer: float | None, note: str = "") -> str:
    ratio = f"{peer / ours:7.2f}x" if peer is not None else "    n/a "
    peer_text = f"{peer:9.3f}" if peer is not None else "      n/a"
    return f"| {task:<34} | {ours:9.3f} | {peer_name:<28} | {peer_text} | {ratio} | {note}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5, help="timed runs per library (median reported)")
    parser.add_argument("--slow-peer-runs", type=int, default=3, help="timed runs of torchmetrics' text metrics")
    parser.add_argument("--systems", type=int, default=16, help="how many of the 16 WMT17 systems to score")
    parser.add_argument("--quick", action="store_true", help="4 systems, 3 runs, 1 run of the slowest peers")
    parser.add_argument("--only", nargs="+", choices=GROUPS, metavar="ROWS",
                        help=f"only these groups of rows, of {', '.join(GROUPS)} (default: all)")
    args = parser.parse_args()
    rows = set(args.only or GROUPS)
    if args.quick:
        args.runs, args.slow_peer_runs, args.systems = 3, 1, 4
    if not WMT17_PATH.exists():
        sys.exit(f"WMT17 data not found at {WMT17_PATH}")
    logging.getLogger("sacrebleu").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")

    import sacrebleu
    from rouge_score import rouge_scorer
    from sacrebleu.metrics import BLEU, CHRF, TER
    from sacrebleu.significance import PairedTest
    from torchmetrics.functional.text import bleu_score as tm_bleu_score
    from torchmetrics.functional.text import chrf_score as tm_chrf_score
    from torchmetrics.functional.text import rouge_score as tm_rouge_score
    from torchmetrics.functional.text import sacre_bleu_score as tm_sacre_bleu_score
    from torchmetrics.functional.text import translation_edit_rate as tm_ter
    from torchmetrics.text import Perplexity as TMPerplexity

    systems, reference = load_wmt17()
    systems = systems[: args.systems]
    hyps_list = [hyps for _, hyps in systems]
    ref_per_sample = [[ref] for ref in reference]
    sentences = sum(map(len, hyps_list))
    lines = [
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; {len(systems)} WMT17 systems x "
        f"{len(reference)} sentences = {sentences} hypotheses; median of {args.runs} runs "
        f"({args.slow_peer_runs} for torchmetrics' text metrics). Ratio = peer time / llmkit time.",
        "",
        f"| {'task':<34} | {'llmkit s':>9} | {'peer':<28} | {'peer s':>9} | {'ratio':>8} | note",
        f"|{'-' * 36}|{'-' * 11}|{'-' * 30}|{'-' * 11}|{'-' * 10}|------",
    ]
    print("\n".join(lines), flush=True)

    if "bleu" in rows:
        # BLEU on strings, sacrebleu's default 13a tokenizer and exp smoothing.
        ours_t, ours = median_seconds(lambda: [bleu_score(h, ref_per_sample).item() for h in hyps_list], args.runs)
        sacre_t, sacre = median_seconds(
            lambda: [sacrebleu.corpus_bleu(h, [reference]).score / 100 for h in hyps_list], args.runs
        )
        assert max(abs(a - b) for a, b in zip(ours, sacre, strict=True)) < 1e-6
        print(row("BLEU strings (13a)", ours_t, "sacrebleu corpus_bleu", sacre_t), flush=True)
        tm_t, tm = median_seconds(
            lambda: [tm_sacre_bleu_score(h, ref_per_sample).item() for h in hyps_list], args.slow_peer_runs
        )
        tm_diff = max(abs(a - b) for a, b in zip(ours, tm, strict=True))
        note = f"max diff {tm_diff:.1e}"
        print(row("BLEU strings (13a)", ours_t, "torchmetrics SacreBLEUScore", tm_t, note), flush=True)

        for tokenize in ("intl", "char"):
            ours_t, ours = median_seconds(
                lambda tok=tokenize: [bleu_score(h, ref_per_sample, tokenize=tok).item() for h in hyps_list], args.runs
            )
            sacre_t, sacre = median_seconds(
                lambda tok=tokenize: [
                    sacrebleu.corpus_bleu(h, [reference], tokenize=tok).score / 100 for h in hyps_list
                ],
                args.runs,
            )
            assert max(abs(a - b) for a, b in zip(ours, sacre, strict=True)) < 1e-6
            print(row(f"BLEU strings ({tokenize})", ours_t, "sacrebleu corpus_bleu", sacre_t), flush=True)

        # BLEU on token ids: the 13a words numbered; llmkit gets padded id tensors (a model's
        # output), the peers the same ids as space-joined strings.
        vocab: dict[str, int] = {}

        def numbered(lines: list[str]) -> list[list[int]]:
            return [[vocab.setdefault(w, len(vocab) + 1) for w in words] for words in tokenize_bleu(lines, "13a")]

        def padded(rows: list[list[int]]) -> torch.Tensor:
            width = max(map(len, rows))
            return torch.tensor([r + [0] * (width - len(r)) for r in rows])

        ref_ids = numbered(reference)
        target = padded(ref_ids)
        ref_strings = [" ".join(map(str, r)) for r in ref_ids]
        hyp_ids = [numbered(h) for h in hyps_list]
        preds = [padded(h) for h in hyp_ids]
        hyp_strings = [[" ".join(map(str, r)) for r in h] for h in hyp_ids]
        ours_t, ours = median_seconds(lambda: [bleu_score(p, target, ignore_index=0).item() for p in preds], args.runs)
        sacre_t, sacre = median_seconds(
            lambda: [sacrebleu.corpus_bleu(h, [ref_strings], tokenize="none").score / 100 for h in hyp_strings],
            args.runs,
        )
        assert max(abs(a - b) for a, b in zip(ours, sacre, strict=True)) < 1e-6
        print(row("BLEU token ids", ours_t, "sacrebleu tokenize='none'", sacre_t), flush=True)
        ref_id_per_sample = [[r] for r in ref_strings]
        tm_t, _ = median_seconds(
            lambda: [tm_bleu_score(h, ref_id_per_sample).item() for h in hyp_strings], args.slow_peer_runs
        )
        print(row("BLEU token ids", ours_t, "torchmetrics BLEUScore", tm_t, "no smoothing: scores differ"), flush=True)

    if "rouge" in rows:
        # ROUGE-1/2/L and ROUGE-Lsum, the per-sample mean, as rouge-score's RougeScorer gives it.
        for label, keys in (("ROUGE-1/2/L", ("rouge1", "rouge2", "rougeL")), ("ROUGE-Lsum", ("rougeLsum",))):
            key, scorer = keys[-1], rouge_scorer.RougeScorer(list(keys))
            ours_t, ours = median_seconds(
                lambda keys=keys, key=key: [
                    rouge_score(h, reference, rouge_keys=keys)[f"{key}_fmeasure"].item() for h in hyps_list
                ],
                args.runs,
            )
            peer_t, peer = median_seconds(
                lambda scorer=scorer, key=key: [
                    statistics.fmean(scorer.score(r, h)[key].fmeasure for h, r in zip(hyps, reference, strict=True))
                    for hyps in hyps_list
                ],
                args.runs,
            )
            assert max(abs(a - b) for a, b in zip(ours, peer, strict=True)) < 1e-6
            print(row(label, ours_t, "rouge-score RougeScorer", peer_t), flush=True)
            if key == "rougeLsum":
                print(row(label, ours_t, "torchmetrics ROUGEScore", None, "downloads nltk punkt_tab: fails offline"))
                continue
            tm_t, _ = median_seconds(
                lambda keys=keys, key=key: [
                    tm_rouge_score(h, reference, rouge_keys=keys)[f"{key}_fmeasure"].item() for h in hyps_list
                ],
                args.slow_peer_runs,
            )
            print(row(label, ours_t, "torchmetrics ROUGEScore", tm_t), flush=True)

    if "chrf" in rows:
        # chrF / chrF++ and TER on strings, as sacrebleu's CHRF and TER.
        for word_order, label in ((0, "chrF"), (2, "chrF++")):
            ours_t, ours = median_seconds(
                lambda wo=word_order: [chrf_score(h, ref_per_sample, word_order=wo).item() for h in hyps_list],
                args.runs,
            )
            sacre_t, sacre = median_seconds(
                lambda wo=word_order: [CHRF(word_order=wo).corpus_score(h, [reference]).score / 100 for h in hyps_list],
                args.runs,
            )
            assert max(abs(a - b) for a, b in zip(ours, sacre, strict=True)) < 1e-6
            print(row(f"{label} strings", ours_t, "sacrebleu CHRF", sacre_t), flush=True)
        tm_t, tm = median_seconds(
            lambda: [tm_chrf_score(h, ref_per_sample, n_word_order=2).item() for h in hyps_list], args.slow_peer_runs
        )
        tm_diff = max(abs(a - b) for a, b in zip(ours, tm, strict=True))
        print(row("chrF++ strings", ours_t, "torchmetrics CHRFScore", tm_t, f"max diff {tm_diff:.1e}"), flush=True)
    if "ter" in rows:
        ours_t, ours = median_seconds(
            lambda: [ter_score(h, ref_per_sample).item() for h in hyps_list], args.slow_peer_runs
        )
        sacre_t, sacre = median_seconds(
            lambda: [TER().corpus_score(h, [reference]).score / 100 for h in hyps_list], args.slow_peer_runs
        )
        assert max(abs(a - b) for a, b in zip(ours, sacre, strict=True)) < 1e-6
        print(row("TER strings", ours_t, "sacrebleu TER", sacre_t), flush=True)
        tm_t, tm = median_seconds(lambda: [tm_ter(h, ref_per_sample).item() for h in hyps_list], args.slow_peer_runs)
        tm_diff = max(abs(a - b) for a, b in zip(ours, tm, strict=True))
        note = f"max diff {tm_diff:.1e}"
        print(row("TER strings", ours_t, "torchmetrics TranslationEditRate", tm_t, note), flush=True)

    if "significance" in rows:
        # Significance: every system against the first, from strings to p-values (sacrebleu's
        # `--paired-bs` / `--paired-ar` with one metric), and each system's 95% interval.
        named = [(name[len("newstest2017.") :] if name.startswith("newstest2017.") else name, h) for name, h in systems]
        tests = (("bs", "paired bootstrap, 1000", 1000), ("ar", "paired approx. rand., 10000", 10000))
        for test, label, count in tests:
            for metric_name, ours_factory, sacre_factory in (
                ("BLEU", lambda: BLEUScore(keep_sentence_stats=True), BLEU),
                ("chrF", lambda: CHRFScore(keep_sentence_stats=True), CHRF),
            ):
                if test == "ar" and metric_name == "chrF":
                    continue

                def ours_test(make=ours_factory, test=test, count=count) -> dict:
                    metrics = {}
                    for name, hyps in named:
                        metrics[name] = make()
                        metrics[name].update(hyps, ref_per_sample)
                    if test == "bs":
                        return paired_bootstrap(metrics, named[0][0], num_resamples=count)
                    return paired_approximate_randomization(metrics, named[0][0], num_trials=count)

                def sacre_test(make=sacre_factory, test=test, count=count) -> list:
                    scores = PairedTest(named, {"m": make()}, [reference], test_type=test, n_samples=count)()[1]
                    # sacrebleu keys the results by the score's name ("BLEU", "chrF2").
                    return next(value for key, value in scores.items() if key != "System")

                ours_t, ours = median_seconds(ours_test, args.slow_peer_runs)
                sacre_t, sacre = median_seconds(sacre_test, args.slow_peer_runs)
                assert [result.p_value for result in ours.values()] == [result.p_value for result in sacre]
                print(row(f"{metric_name} {label}", ours_t, f"sacrebleu PairedTest {test}", sacre_t,
                          f"{len(named)} systems, same p-values"), flush=True)

    if "qa" in rows:
        for name, ours_t, peer_name, peer_t in qa_bench_rows(args.runs):
            print(row(name, ours_t, peer_name, peer_t), flush=True)
    if "model-based" in rows:
        for name, ours_t, peer_name, peer_t in model_based_bench_rows(args.runs):
            note = f"llmkit = {ours_t / peer_t:.2f}x by hand" if "by hand" in peer_name else ""
            print(row(name, ours_t, peer_name, peer_t, note), flush=True)

    if "perplexity" in rows:
        # Perplexity of one batch of logits: [16, 128, 8000] float32.
        generator = torch.Generator().manual_seed(0)
        logits = torch.randn(16, 128, 8000, generator=generator)
        labels = torch.randint(8000, (16, 128), generator=generator)
        labels[:, 100:] = -100
        ours_t, ours_ppl = median_seconds(lambda: perplexity(logits, labels, ignore_index=-100), args.runs * 2)
        bare_t, bare_ppl = median_seconds(
            lambda: torch.exp(torch.nn.functional.cross_entropy(logits.view(-1, 8000), labels.view(-1))), args.runs * 2
        )

        def torchmetrics_perplexity() -> torch.Tensor:
            metric = TMPerplexity(ignore_index=-100)
            metric.update(logits, labels)
            return metric.compute()

        tm_t, _ = median_seconds(torchmetrics_perplexity, args.runs * 2)
        assert abs(ours_ppl.item() - bare_ppl.item()) < 1e-3 * bare_ppl.item()
        print(row("Perplexity [16,128,8000]", ours_t, "bare F.cross_entropy + exp", bare_t,
                  f"llmkit = {ours_t / bare_t:.2f}x the bare cross-entropy"))
        print(row("Perplexity [16,128,8000]", ours_t, "torchmetrics Perplexity", tm_t))


if __name__ == "__main__":
    main()
