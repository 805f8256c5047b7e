"""Score the demo's translators with intervals, and ask whether distillation's gain is significant.

``make demo`` trains a teacher, a student alone and a distilled student
(``examples/distill_translator.py``), and fine-tunes the teacher with QAT to int4 weights
(``examples/quantize_translator.py``). This script translates the test split with each model and
reports corpus BLEU, chrF++, TER and ROUGE-L, each with its bootstrap 95% interval (BLEU, chrF++,
TER: 1,000 resamples, as sacrebleu's ``--confidence``), and the paired tests (bootstrap and
approximate randomization, as sacrebleu's ``--paired-bs`` / ``--paired-ar``) of "distilled
student vs student alone". Then the same translations read as answers to questions such as
"what is four hundred and twenty-one in French?", scored with SQuAD's exact match and F1 against
two gold spellings (num2words' French and the 1990 reformed spelling, all hyphens).

    python examples/evaluate_translator.py     # after `make demo` (or the two scripts above)
    python examples/evaluate_translator.py --distill-dir DIR --qat PATH.pt
"""

from __future__ import annotations

import argparse
import copy
import time
import warnings
from pathlib import Path

import torch

from llmkit import Seq2SeqTransformer
from llmkit.callbacks import QuantizationAwareTraining
from llmkit.data import NumberWordsDataModule
from llmkit.metrics import BLEUScore, CHRFScore, QAScore, ROUGEScore, TERScore
from llmkit.metrics.significance import (
    confidence_interval,
    paired_approximate_randomization,
    paired_bootstrap,
)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--distill-dir", type=Path, default=Path("outputs/distill_translator"),
                        help="teacher.ckpt, student_alone.ckpt and student_distilled.ckpt")
    parser.add_argument("--qat", type=Path, default=Path("outputs/quantize_translator/qat_8da4w.pt"),
                        help="the converted QAT weights (of the teacher's architecture); skipped if absent")
    parser.add_argument("--scheme", default="8da4w")
    parser.add_argument("--group-size", type=int, default=32)
    # The split of the demo's data: the same arguments give the same unseen test numbers.
    parser.add_argument("--high", type=int, default=9_999)
    parser.add_argument("--val-size", type=int, default=500)
    parser.add_argument("--test-size", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples")
    parser.add_argument("--trials", type=int, default=10_000, help="approximate randomization trials")
    return parser.parse_args()


def load_models(args: argparse.Namespace) -> dict[str, Seq2SeqTransformer]:
    names = {"teacher": "teacher", "student alone": "student_alone", "student distilled": "student_distilled"}
    models = {}
    for name, stem in names.items():
        path = args.distill_dir / f"{stem}.ckpt"
        if not path.exists():
            raise SystemExit(f"{path} not found: run `make demo` (or examples/distill_translator.py) first")
        models[name] = Seq2SeqTransformer.load_from_checkpoint(path, map_location="cpu", weights_only=True)
    if args.qat.exists():
        # The QAT model has the teacher's architecture; converting a copy gives the layers its weights load into.
        qat = QuantizationAwareTraining(scheme=args.scheme, group_size=args.group_size)
        model = qat.convert(copy.deepcopy(models["teacher"]))
        assert isinstance(model, Seq2SeqTransformer)
        model.load_state_dict(torch.load(args.qat, map_location="cpu", weights_only=False))
        models[f"QAT {args.scheme}"] = model
    else:
        print(f"({args.qat} not found: no QAT row)")
    return models


@torch.inference_mode()
def translate(model: Seq2SeqTransformer, data: NumberWordsDataModule) -> list[str]:
    model.eval()
    return [data.decode(row) for batch in data.test_dataloader() for row in model.generate(batch["src"])]


def reformed(french: str) -> str:
    """The 1990 reformed spelling of a French number: every word joined by hyphens."""
    return "-".join(french.replace("-", " ").split())


def main() -> None:
    args = parse_args()
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    start = time.perf_counter()
    data = NumberWordsDataModule(high=args.high, val_size=args.val_size, test_size=args.test_size, seed=args.seed)
    data.setup("test")
    models = load_models(args)
    batches = list(data.test_dataloader())
    sources = [data.decode(src, side="src") for batch in batches for src in batch["src"]]
    references = [data.decode(tgt) for batch in batches for tgt in batch["tgt"]]
    per_sample = [[ref] for ref in references]
    outputs = {name: translate(model, data) for name, model in models.items()}

    corpus = {"BLEU": BLEUScore, "chrF++": lambda **kw: CHRFScore(word_order=2, **kw), "TER": TERScore}
    scored = {
        metric: {name: factory(keep_sentence_stats=True) for name in outputs} for metric, factory in corpus.items()
    }
    for metric in scored.values():
        for name, hyps in outputs.items():
            metric[name].update(hyps, per_sample)
    rouge = {name: ROUGEScore(rouge_keys=("rougeL",)) for name in outputs}
    for name, hyps in outputs.items():
        rouge[name].update(hyps, per_sample)

    print(f"\nen->fr number words: {len(references)} unseen test numbers; 95% bootstrap intervals "
          f"({args.resamples} resamples); TER: lower is better\n")
    header = " | ".join(f"{metric:^19}" for metric in (*corpus, "ROUGE-L"))
    print(f"| {'model':<18} | {header} |")
    print(f"|{'-' * 20}|" + "|".join("-" * 21 for _ in range(len(corpus) + 1)) + "|")
    for name in outputs:
        cells = []
        for metric in corpus:
            result = confidence_interval(scored[metric][name], num_resamples=args.resamples)
            cells.append(f"{result.score:.4f} ± {result.ci:.4f}".center(19))
        cells.append(f"{rouge[name].compute()['rougeL_fmeasure'].item():.4f}".center(19))
        print(f"| {name:<18} | " + " | ".join(cells) + " |")
    print(f"\nBLEU signature: {scored['BLEU']['teacher'].signature()}")
    print(f"chrF++ signature: {scored['chrF++']['teacher'].signature()}")
    print(f"TER signature: {scored['TER']['teacher'].signature()}")

    print("\nIs the distilled student better than the student alone? (paired tests, baseline: student alone)\n")
    print(f"| {'metric':<7} | {'alone':>7} | {'distilled':>9} | {'p (bootstrap)':>13} | {'p (rand.)':>9} |")
    print(f"|{'-' * 9}|{'-' * 9}|{'-' * 11}|{'-' * 15}|{'-' * 11}|")
    for metric in corpus:
        pair = {name: scored[metric][name] for name in ("student alone", "student distilled")}
        bootstrap = paired_bootstrap(pair, "student alone", num_resamples=args.resamples)
        randomized = paired_approximate_randomization(pair, "student alone", num_trials=args.trials)
        alone, distilled = bootstrap["student alone"], bootstrap["student distilled"]
        print(f"| {metric:<7} | {alone.score:7.4f} | {distilled.score:9.4f} | "
              f"{distilled.p_value:13.4f} | {randomized['student distilled'].p_value:9.4f} |")

    print('\nThe same translations as answers: "what is <English words> in French?"\n')
    golds = [[ref, reformed(ref)] for ref in references]
    print(f"  e.g. what is {sources[0]} in French?  gold: {golds[0][0]!r} or {golds[0][1]!r}")
    print(f"\n| {'model':<18} | {'exact match':>11} | {'F1':>6} |")
    print(f"|{'-' * 20}|{'-' * 13}|{'-' * 8}|")
    for name, hyps in outputs.items():
        qa = QAScore()
        qa.update(hyps, golds)
        scores = qa.compute()
        print(f"| {name:<18} | {scores['exact_match'].item():11.4f} | {scores['f1'].item():6.4f} |")
    print(f"\nevaluated in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
