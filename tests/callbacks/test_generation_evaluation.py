"""GenerationEvaluation and its core, GenerationScorer: decoding and scoring in validation, for any module.

Oracles: the module's ``generate`` (or a Hugging Face model's) called by hand on the same batches,
scored by sacrebleu, rouge-score and torchmetrics' functional metrics; for DDP, one process's
computation on the predictions of both; for the loggers, the examples built by hand; for
composition and resuming, the same run in another callback order or uninterrupted.
"""

from __future__ import annotations

import csv
import json
import os
import warnings
from datetime import timedelta
from pathlib import Path
from typing import Any
from unittest import mock

import lightning.pytorch as L
import pytest
import sacrebleu
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.demos.boring_classes import BoringModel
from lightning.pytorch.loggers import CSVLogger, Logger
from lightning.pytorch.strategies import DDPStrategy
from rouge_score import rouge_scorer
from torch import Tensor, nn
from torch.utils.data import DataLoader
from torchmetrics import Metric
from torchmetrics.functional.text import char_error_rate
from torchmetrics.text import CharErrorRate

from llmkit import Seq2SeqTransformer
from llmkit.callbacks import GenerationEvaluation
from llmkit.generation.scoring import Example, GenerationScorer
from llmkit.metrics import BLEUScore, ROUGEScore
from tests.callbacks.helpers import seq2seq_batch, trainer, translator
from tests.conftest import _free_port, spawn_group

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 9  # PAD 0, BOS 1, EOS 2, words 3..8
PAD, BOS, EOS = 0, 1, 2
SPECIAL = (PAD, EOS)


# ---------------------------------------------------------------------------------------------
# Fixtures and oracles


def toy_batches(n: int, *, batch_size: int = 4, width: int = 6, seed: int = 0) -> list[dict[str, Tensor]]:
    """``n`` seq2seq batches: ``src`` words EOS, ``tgt`` BOS words EOS, right-padded; row 0 full, row 1 short."""
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n):
        rows: dict[str, list[Tensor]] = {"src": [], "tgt": []}
        for key, bos in (("src", []), ("tgt", [BOS])):
            lengths = torch.randint(1, width - len(bos), (batch_size,), generator=g)
            lengths[0], lengths[1] = width - 1 - len(bos), 1
            for length in lengths.tolist():
                words = torch.randint(3, VOCAB, (length,), generator=g).tolist()
                row = [*bos, *words, EOS]
                rows[key].append(torch.tensor(row + [PAD] * (width - len(row))))
        batches.append({key: torch.stack(value) for key, value in rows.items()})
    return batches


def loader(batches: list[Any]) -> DataLoader:
    return DataLoader(batches, batch_size=None, shuffle=False)  # type: ignore[arg-type]


def tiny_translator(seed: int = 0) -> Seq2SeqTransformer:
    """A one-layer translator that does not decode in validation itself."""
    torch.manual_seed(seed)
    return Seq2SeqTransformer(
        VOCAB, VOCAB, d_model=16, num_heads=2, num_encoder_layers=1, num_decoder_layers=1, dim_feedforward=32,
        dropout=0.0, max_len=10, lr=1e-2, warmup_steps=1, val_generate_batches=0,
    )


def text(row: list[int], ignore: tuple[int, ...] = SPECIAL) -> str:
    """A row of ids as the scorer writes it: kept ids joined with spaces (negatives and ``ignore`` dropped)."""
    return " ".join(str(i) for i in row if i >= 0 and i not in ignore)


def by_hand(model: Seq2SeqTransformer, batches: list[dict[str, Tensor]]) -> tuple[list[str], list[str], list[str]]:
    """``(sources, hypotheses, references)`` as text, from ``model.generate`` called on each batch."""
    sources, hyps, refs = [], [], []
    for batch in batches:
        sources += [text(row) for row in batch["src"].tolist()]
        hyps += [text(row) for row in model.generate(batch["src"]).tolist()]
        refs += [text(row) for row in batch["tgt"][:, 1:].tolist()]
    return sources, hyps, refs


def sacre_bleu(hyps: list[str], refs: list[str], tokenize: str = "none") -> float:
    return sacrebleu.corpus_bleu(hyps, [refs], tokenize=tokenize).score / 100


def rouge1_f(hyps: list[str], refs: list[str]) -> float:
    scorer = rouge_scorer.RougeScorer(["rouge1"])
    return sum(scorer.score(ref, hyp)["rouge1"].fmeasure for hyp, ref in zip(hyps, refs, strict=True)) / len(hyps)


class Recorder(Logger):
    """A logger that keeps what it is given, with a W&B-style ``log_text``."""

    def __init__(self) -> None:
        super().__init__()
        self.metrics: list[tuple[int | None, dict[str, float]]] = []
        self.texts: list[dict[str, Any]] = []

    @property
    def name(self) -> str:
        return "recorder"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.metrics.append((step, dict(metrics)))

    def log_text(self, key: str, columns: list[str] | None = None, data: list[list[str]] | None = None,
                 step: int | None = None) -> None:
        self.texts.append({"key": key, "columns": columns, "data": data, "step": step})

    def logged(self, name: str) -> list[tuple[int, float]]:
        """``(epoch, value)`` of every time ``name`` was logged."""
        return [(int(m["epoch"]), m[name]) for _, m in self.metrics if name in m]


def metrics() -> dict[str, Metric]:
    return {"bleu": BLEUScore(ignore_index=PAD), "rouge": ROUGEScore(rouge_keys=("rouge1",), ignore_index=PAD)}


# ---------------------------------------------------------------------------------------------
# 1. Seq2SeqTransformer: the values are those of generate() by hand


def test_values_equal_sacrebleu_and_rouge_score_on_generate_by_hand():
    model, batches = tiny_translator(), toy_batches(3)
    evaluation = GenerationEvaluation(metrics(), num_batches=2, ignore_ids=SPECIAL, num_examples=5)
    recorder = Recorder()
    fit = trainer(max_epochs=1, callbacks=[evaluation], limit_val_batches=3, logger=recorder, num_sanity_val_steps=0)
    fit.fit(model, loader(toy_batches(2, seed=1)), loader(batches))
    sources, hyps, refs = by_hand(model, batches[:2])  # the weights of that validation: the last ones
    assert any(hyps) and sacre_bleu(hyps, refs) > 0
    assert float(fit.callback_metrics["val_bleu"]) == pytest.approx(sacre_bleu(hyps, refs), abs=1e-6)
    assert float(fit.callback_metrics["val_rouge_rouge1_fmeasure"]) == pytest.approx(rouge1_f(hyps, refs), abs=1e-6)
    # The examples: the first five samples (four of batch 0, one of batch 1).
    (logged,) = recorder.texts
    assert logged["key"] == "val_generation_examples" and logged["columns"] == ["source", "prediction", "reference"]
    assert logged["data"] == [list(triple) for triple in zip(sources, hyps, refs, strict=True)][:5]
    assert logged["step"] == fit.global_step


def decode_log(record: list[tuple[int, bool]]):
    """A ``generate_fn`` that decodes as the module's default and records (epoch, sanity checking)."""

    def generate_fn(module: L.LightningModule, batch: dict[str, Tensor]) -> Tensor:
        record.append((module.current_epoch, module.trainer.sanity_checking))
        return module.generate(batch["src"])

    return generate_fn


def test_every_n_epochs_num_batches_and_no_decoding_in_the_sanity_check():
    model, record, recorder = tiny_translator(), [], Recorder()
    evaluation = GenerationEvaluation(metrics(), every_n_epochs=2, num_batches=2, generate_fn=decode_log(record),
                                      ignore_ids=SPECIAL)
    fit = trainer(max_epochs=4, callbacks=[evaluation], limit_val_batches=3, logger=recorder, num_sanity_val_steps=2)
    fit.fit(model, loader(toy_batches(1, seed=1)), loader(toy_batches(3)))
    assert record == [(1, False), (1, False), (3, False), (3, False)]
    assert [epoch for epoch, _ in recorder.logged("val_bleu")] == [1, 3]
    # trainer.validate decodes whatever the epoch.
    record.clear()
    trainer(callbacks=[evaluation], limit_val_batches=3).validate(model, loader(toy_batches(3)), verbose=False)
    assert len(record) == 2


def test_the_module_is_left_as_it_was():
    from tests.callbacks.test_composition import snapshot

    model = tiny_translator()
    before = snapshot(model)
    evaluation = GenerationEvaluation(metrics(), ignore_ids=SPECIAL)
    trainer(max_epochs=1, callbacks=[evaluation], limit_val_batches=2).fit(model, loader(toy_batches(1)),
                                                                           loader(toy_batches(2)))
    assert snapshot(model) == before
    ours = {id(metric) for metric in evaluation.scorer.metrics.values()}
    assert ours and not ours & {id(module) for module in model.modules()}


# ---------------------------------------------------------------------------------------------
# 2. A Hugging Face T5 inside a user's module, generate_fn and decode_fn, a torchmetrics metric


def test_t5_with_generate_fn_decode_fn_and_a_torchmetrics_metric():
    hf = pytest.importorskip("tests.callbacks.hf")
    module = hf.HFModule(hf.build("t5", seed=0))
    batches = [hf.batch("t5", seed=7), hf.batch("t5", seed=8)]
    t5_ignore = (hf.PAD, 1)  # T5's pad (also its decoder start) and EOS

    def generate_fn(m: L.LightningModule, b: dict[str, Tensor]) -> Tensor:
        return m.model.generate(input_ids=b["input_ids"], attention_mask=b["attention_mask"], max_new_tokens=5,
                                do_sample=False)

    def decode_fn(rows: list[list[int]]) -> list[str]:
        return [" ".join(f"w{i}" for i in row) for row in rows]

    evaluation = GenerationEvaluation(
        {"bleu": BLEUScore(tokenize="char"), "cer": CharErrorRate()}, generate_fn=generate_fn, decode_fn=decode_fn,
        ignore_ids=t5_ignore,
    )
    results = trainer(callbacks=[evaluation], limit_val_batches=2).validate(module, loader(batches), verbose=False)
    hyps, refs = [], []
    with torch.no_grad():
        for b in batches:
            hyps += [" ".join(f"w{i}" for i in row if i not in t5_ignore) for row in generate_fn(module, b).tolist()]
            refs += [" ".join(f"w{i}" for i in row if i >= 0 and i not in t5_ignore) for row in b["labels"].tolist()]
    assert results[0]["val_bleu"] == pytest.approx(sacre_bleu(hyps, refs, tokenize="char"), abs=1e-6)
    assert results[0]["val_cer"] == pytest.approx(char_error_rate(hyps, refs).item(), abs=1e-6)
    assert 0 < results[0]["val_bleu"] < 1


# ---------------------------------------------------------------------------------------------
# 3. Two processes (gloo): each decodes its shard, the values are those of all the predictions


def ddp_batches() -> list[dict[str, Tensor]]:
    """Four batches; the DistributedSampler gives 0 and 2 (narrow sources) to rank 0, 1 and 3 (wide) to rank 1."""
    narrow, wide = toy_batches(2, width=4, seed=3), toy_batches(2, width=7, seed=4)
    return [narrow[0], wide[0], narrow[1], wide[1]]


def _ddp_worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank),
                      LOCAL_RANK=str(rank), NODE_RANK="0")
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    model = tiny_translator()
    seen: list[dict[str, Any]] = []

    def generate_fn(m: L.LightningModule, b: dict[str, Tensor]) -> Tensor:
        # Longer sources, longer generations: the two ranks decode for different numbers of steps.
        out = m.generate(b["src"], max_new_tokens=b["src"].shape[1] + 1)
        seen.append({"pred": out.tolist(), "ref": b["tgt"][:, 1:].tolist()})
        return out

    evaluation = GenerationEvaluation(metrics(), num_batches=2, generate_fn=generate_fn, ignore_ids=SPECIAL)
    fit = trainer(devices=2, strategy=DDPStrategy(process_group_backend="gloo", timeout=timedelta(seconds=60)),
                  callbacks=[evaluation], limit_val_batches=2)
    fit.validate(model, loader(ddp_batches()), verbose=False)
    logged = {name: float(value) for name, value in fit.callback_metrics.items()}
    (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps({"seen": seen, "logged": logged}))


@pytest.mark.slow  # starting two processes takes most of its ~15 s
def test_ddp_two_processes_score_the_union_of_their_shards(tmp_path):
    results = spawn_group(_ddp_worker, (_free_port(), str(tmp_path)), tmp_path)
    widths = [{len(s["pred"][0]) for s in result["seen"]} for result in results]
    assert widths[0].isdisjoint(widths[1]), widths  # uneven generation lengths
    hyps = [text(row) for result in results for s in result["seen"] for row in s["pred"]]
    refs = [text(row) for result in results for s in result["seen"] for row in s["ref"]]
    assert len(hyps) == 16
    for result in results:
        assert result["logged"]["val_bleu"] == pytest.approx(sacre_bleu(hyps, refs), abs=1e-6)
        assert result["logged"]["val_rouge_rouge1_fmeasure"] == pytest.approx(rouge1_f(hyps, refs), abs=1e-6)


# ---------------------------------------------------------------------------------------------
# 4. Loggers that take text


def test_csv_logger_gets_the_examples_appended_each_epoch(tmp_path):
    model, batches = tiny_translator(), toy_batches(1)
    logger = CSVLogger(tmp_path, name="run")
    evaluation = GenerationEvaluation(metrics(), num_batches=1, num_examples=3, ignore_ids=SPECIAL)
    fit = trainer(max_epochs=2, callbacks=[evaluation], limit_val_batches=1, logger=logger, num_sanity_val_steps=0)
    fit.fit(model, loader(toy_batches(1, seed=1)), loader(batches))
    with open(Path(logger.log_dir) / "generation_examples.csv", newline="") as handle:
        rows = list(csv.reader(handle))
    sources, hyps, refs = by_hand(model, batches)
    assert rows[0] == ["epoch", "step", "source", "prediction", "reference"]
    assert [row[:2] for row in rows[1:]] == [["0", "1"]] * 3 + [["1", "2"]] * 3
    assert [(row[2], row[4]) for row in rows[1:4]] == [(row[2], row[4]) for row in rows[4:]]  # the same samples
    assert [row[2:] for row in rows[4:]] == [list(t) for t in zip(sources, hyps, refs, strict=True)][:3]


def test_tensorboard_gets_a_markdown_table(tmp_path):
    pytest.importorskip("tensorboard", reason="TensorBoard is not installed (pip install tensorboard)")
    from lightning.pytorch.loggers import TensorBoardLogger

    model, batches = tiny_translator(), toy_batches(1)
    logger = TensorBoardLogger(tmp_path)
    evaluation = GenerationEvaluation(metrics(), num_batches=1, num_examples=2, ignore_ids=SPECIAL)
    fit = trainer(max_epochs=1, callbacks=[evaluation], limit_val_batches=1, logger=logger, num_sanity_val_steps=0)
    with mock.patch.object(type(logger.experiment), "add_text") as add_text:
        fit.fit(model, loader(toy_batches(1, seed=1)), loader(batches))
    sources, hyps, refs = by_hand(model, batches)
    table = "\n".join(["| source | prediction | reference |", "| --- | --- | --- |",
                       *(f"| {s} | {h} | {r} |" for s, h, r in list(zip(sources, hyps, refs, strict=True))[:2])])
    add_text.assert_called_once_with("val_generation_examples", table, global_step=fit.global_step)


def test_a_log_text_without_step_is_called_without_it():
    class NoStep(Recorder):
        def log_text(self, key, columns=None, data=None):  # another logger's signature
            self.texts.append({"key": key, "columns": columns, "data": data})

    model, logger = tiny_translator(), NoStep()
    evaluation = GenerationEvaluation(metrics(), num_batches=1, num_examples=1, ignore_ids=SPECIAL)
    trainer(max_epochs=1, callbacks=[evaluation], limit_val_batches=1, logger=logger, num_sanity_val_steps=0).fit(
        model, loader(toy_batches(1, seed=1)), loader(toy_batches(1)))
    assert [len(t["data"]) for t in logger.texts] == [1]


# ---------------------------------------------------------------------------------------------
# 5. Checkpoints: test(ckpt_path), resume


def test_checkpoint_then_test_and_resume_log_what_an_uninterrupted_fit_logs(tmp_path):
    def run(max_epochs, ckpt_path=None, directory=None):
        model, recorder = tiny_translator(), Recorder()
        evaluation = GenerationEvaluation(metrics(), every_n_epochs=2, num_batches=1, ignore_ids=SPECIAL)
        extra = [ModelCheckpoint(dirpath=directory, save_top_k=-1, every_n_epochs=1)] if directory else []
        fit = trainer(max_epochs=max_epochs, callbacks=[evaluation, *extra], limit_val_batches=1, logger=recorder,
                      enable_checkpointing=bool(directory), num_sanity_val_steps=0)
        fit.fit(model, loader(toy_batches(1, seed=1)), loader(toy_batches(1)), ckpt_path=ckpt_path)
        return fit, model, recorder

    _, _, uninterrupted = run(4)
    fit, model, _ = run(2, directory=tmp_path)
    results = fit.test(model, loader(toy_batches(1)), ckpt_path=str(tmp_path / "epoch=1-step=2.ckpt"), verbose=False)
    assert results and "test_loss" in results[0]
    _, _, resumed = run(4, ckpt_path=str(tmp_path / "epoch=0-step=1.ckpt"))
    epochs, want = zip(*uninterrupted.logged("val_bleu"), strict=True)
    resumed_epochs, got = zip(*resumed.logged("val_bleu"), strict=True)
    assert epochs == resumed_epochs == (1, 3)
    assert got == pytest.approx(want, abs=1e-6)
    state = torch.load(tmp_path / "epoch=1-step=2.ckpt", weights_only=False)
    assert state["callbacks"].get(GenerationEvaluation(metrics()).state_key, {}) == {}  # nothing to save


# ---------------------------------------------------------------------------------------------
# 6. With the training callbacks, in two orders


def test_with_distillation_quantization_and_adversarial_training_in_two_orders():
    from tests.callbacks.test_composition import seq2seq_callbacks

    def run(order: list[str]) -> dict[str, float]:
        torch.manual_seed(0)
        student, teacher = translator(d_model=32), translator(d_model=64)
        callbacks: dict[str, L.Callback] = {
            **seq2seq_callbacks(teacher),
            "gen": GenerationEvaluation(metrics(), prefix="gen_", ignore_ids=SPECIAL),
        }
        data = loader([seq2seq_batch()] * 2)
        fit = trainer(max_epochs=1, callbacks=[callbacks[name] for name in order], limit_val_batches=2,
                      num_sanity_val_steps=0)
        fit.fit(student, data, data)
        return {name: float(value) for name, value in fit.callback_metrics.items() if name.startswith("gen_")}

    first, second = run(["kd", "qat", "adv", "gen"]), run(["gen", "adv", "qat", "kd"])
    assert set(first) == {f"gen_{name}" for name in ("bleu", *(f"rouge_rouge1_{k}" for k in ("fmeasure", "precision", "recall")))}
    assert first == second


# ---------------------------------------------------------------------------------------------
# 7. The scorer on its own: batch forms, ids vs text, n-best rows


class Fixed(nn.Module):
    """A "model" whose generate returns given ids."""

    def __init__(self, output: Any) -> None:
        super().__init__()
        self.output = output

    def generate(self, src: Tensor) -> Any:
        return self.output


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), strip=st.booleans())
def test_token_ids_score_as_their_text_without_the_ignored_ids(seed, strip):
    """Ids with EOS/pad/-100 set to ignore_index == decode_fn's text with them removed == sacrebleu."""
    g = torch.Generator().manual_seed(seed)
    preds = torch.randint(0, 7, (5, 6), generator=g)
    target = torch.randint(0, 7, (5, 7), generator=g)
    target[:, -1] = -100
    batch = (torch.zeros(5, 3, dtype=torch.long), target)
    by_ids = GenerationScorer([BLEUScore(ignore_index=PAD)], ignore_ids=SPECIAL, strip_first_target_token=strip)
    by_text = GenerationScorer([BLEUScore(tokenize="none")], ignore_ids=SPECIAL, strip_first_target_token=strip,
                               decode_fn=lambda rows: [" ".join(map(str, row)) for row in rows])
    for scorer in (by_ids, by_text):
        scorer.update(Fixed(preds), batch)
    refs = [text(row) for row in (target[:, 1:] if strip else target).tolist()]
    want = sacre_bleu([text(row) for row in preds.tolist()], refs)
    assert by_ids.compute()["bleu"].item() == pytest.approx(want, abs=1e-6)
    assert by_text.compute()["bleu"].item() == pytest.approx(want, abs=1e-6)


def test_batch_forms_and_the_first_target_token():
    src = torch.tensor([[5, 2], [6, 2]])
    tgt = torch.tensor([[1, 5, 2], [1, 6, 2]])
    for batch, strips in (({"src": src, "tgt": tgt}, True), ((src, tgt, "extra"), True), ([src, tgt], True),
                          ({"input_ids": src, "labels": tgt}, False)):
        scorer = GenerationScorer([BLEUScore(ignore_index=PAD)], ignore_ids=SPECIAL)
        scorer.update(Fixed(torch.tensor([[5, 2], [6, 2]])), batch)
        assert scorer.examples[0].reference == ("5" if strips else "1 5"), batch
        scorer = GenerationScorer([BLEUScore(ignore_index=PAD)], ignore_ids=SPECIAL, strip_first_target_token=not strips)
        scorer.update(Fixed(torch.tensor([[5, 2], [6, 2]])), batch)
        assert scorer.examples[0].reference == ("1 5" if strips else "5"), batch
    scorer = GenerationScorer({"b": BLEUScore(n_gram=2)}, split_fn=lambda b: (b["x"], b["y"]),
                              decode_fn=lambda rows: [" ".join(map(str, r)) for r in rows])
    scorer.update(Fixed(torch.tensor([[5, 6]])), {"x": ["five six"], "y": [["5 6", "5 7"]]})
    assert scorer.compute()["b"].item() == pytest.approx(1.0)
    assert scorer.examples == [Example("five six", "5 6", "5 6 | 5 7")]


def test_n_best_rows_score_the_first_of_each_sample():
    batch = {"src": torch.tensor([[5, 2], [6, 2]]), "tgt": torch.tensor([[1, 5, 2], [1, 6, 2]])}
    nbest = torch.tensor([[5, 2], [7, 2], [6, 2], [7, 2]])  # two rows per sample, adjacent
    scorer = GenerationScorer([BLEUScore(ignore_index=PAD, n_gram=1)], ignore_ids=SPECIAL)
    scorer.update(Fixed(nbest), batch)
    assert scorer.compute()["bleu"].item() == pytest.approx(1.0)
    output = mock.Mock(sequences=nbest[::2])  # Hugging Face's GenerateOutput
    scorer.reset()
    scorer.update(Fixed(output), batch)
    assert scorer.compute()["bleu"].item() == pytest.approx(1.0)


def test_names_of_a_sequence_and_of_dict_results():
    scorer = GenerationScorer([BLEUScore(ignore_index=PAD), ROUGEScore(rouge_keys=("rouge1",), ignore_index=PAD)],
                              ignore_ids=SPECIAL)
    assert scorer.compute() == {}  # nothing scored yet
    scorer.update(Fixed(torch.tensor([[5, 2]])), {"src": torch.tensor([[5]]), "tgt": torch.tensor([[1, 5, 2]])})
    assert sorted(scorer.compute()) == ["bleu", "rouge1_fmeasure", "rouge1_precision", "rouge1_recall"]


def test_one_reference_metrics_get_a_string_per_sample():
    scorer = GenerationScorer({"cer": CharErrorRate()}, decode_fn=lambda rows: ["ab" for _ in rows])
    scorer.update(Fixed(torch.tensor([[5], [6]])), ([0, 0], ["ab", "ac"]))
    assert scorer.compute()["cer"].item() == pytest.approx(0.25)


# ---------------------------------------------------------------------------------------------
# 8. Bad input


@pytest.mark.parametrize(("kwargs", "error", "match"), [
    ({"every_n_epochs": 0}, ValueError, r"`every_n_epochs` must be an int >= 1, got 0"),
    ({"num_batches": True}, ValueError, r"`num_batches` must be an int >= 1, got True"),
    ({"metrics": {}}, ValueError, r"`metrics` is empty"),
    ({"metrics": [object()]}, TypeError, r"metric 'object' must be a torchmetrics Metric, got object"),
    ({"metrics": "bleu"}, TypeError, r"`metrics` must be a torchmetrics Metric, a mapping .* got str"),
    ({"metrics": {"": BLEUScore(ignore_index=0)}}, ValueError, r"metric names must be non-empty strings, got ''"),
    ({"metrics": [BLEUScore(ignore_index=0), BLEUScore(ignore_index=0)]}, ValueError, r"two metrics are named 'bleu'"),
    ({"generate_fn": 3}, TypeError, r"`generate_fn` must be callable or None, got int"),
    ({"decode_fn": "words"}, TypeError, r"`decode_fn` must be callable or None, got str"),
    ({"num_examples": -1}, ValueError, r"`num_examples` must be an int >= 0, got -1"),
    ({"ignore_ids": ("eos",)}, TypeError, r"`ignore_ids` must be a sequence of int token ids, got \('eos',\)"),
    ({"prefix": 1}, TypeError, r"`prefix` must be a str, got int"),
    ({"strip_first_target_token": "yes"}, TypeError, r"`strip_first_target_token` must be a bool or None"),
    ({"generate_fn": len, "generate_kwargs": {"num_beams": 2}}, ValueError, r"either `generate_fn` or"),
    ({"metrics": [CharErrorRate()]}, ValueError, r"'charerrorrate' \(CharErrorRate\) scores text, not token ids"),
    ({"metrics": [BLEUScore()]}, ValueError, r"'bleu' \(BLEUScore\) has ignore_index=None"),
])
def test_bad_arguments(kwargs, error, match):
    arguments = {"metrics": [BLEUScore(ignore_index=0)], "ignore_ids": SPECIAL, **kwargs}
    with pytest.raises(error, match=match):
        GenerationEvaluation(**arguments)


def test_a_module_without_generate_fails_at_setup():
    evaluation = GenerationEvaluation([BLEUScore(ignore_index=0)])
    with pytest.raises(TypeError, match=r"BoringModel has no `generate` method: pass `generate_fn"):
        trainer(max_steps=1, callbacks=[evaluation]).fit(BoringModel())


BATCH = {"src": torch.tensor([[5, 2]]), "tgt": torch.tensor([[1, 5, 2]])}


@pytest.mark.parametrize(("output", "batch", "kwargs", "error", "match"), [
    (torch.tensor([[5]]), {"x": torch.ones(1)}, {}, ValueError, r"needs keys 'src' and 'tgt' .* got \['x'\]"),
    (torch.tensor([[5]]), torch.ones(1, 2), {}, ValueError, r"a batch must be a mapping .* got Tensor"),
    ([[5, 2]], BATCH, {}, TypeError, r"generation must return token ids \[B, L\] .* got list"),
    (torch.tensor([[5.0]]), BATCH, {}, TypeError, r"the generated token ids must be an integer tensor, got dtype"),
    (torch.tensor([[5], [6], [7]]), {"src": torch.ones(2, 1), "tgt": torch.ones(2, 3, dtype=torch.long)}, {},
     ValueError, r"generation returned 3 rows for 2 samples"),
    (torch.tensor([[5]]), {"src": torch.ones(1, 1), "tgt": torch.ones(3, dtype=torch.long)}, {}, ValueError,
     r"the reference token ids must have shape \[batch, length\], got \(3,\)"),
    (torch.tensor([[5]]), {"src": ["a"], "tgt": ["five"]}, {}, ValueError, r"the references are text but"),
    (torch.tensor([[5]]), {"src": ["a"], "tgt": [3]}, {}, TypeError, r"reference 0 must be a str or a non-empty"),
    (torch.tensor([[5]]), BATCH, {"decode_fn": lambda rows: ["a", "b"]}, ValueError,
     r"`decode_fn` must return one str per row \(1\), got a list of 2"),
    (torch.tensor([[5]]), BATCH, {"decode_fn": lambda rows: [5]}, TypeError, r"`decode_fn` must return strings"),
    (torch.tensor([[5]]), BATCH, {"split_fn": lambda b: b["src"]}, TypeError, r"`split_fn` must return a pair"),
])
def test_bad_batches_and_outputs(output, batch, kwargs, error, match):
    scorer = GenerationScorer([BLEUScore(ignore_index=0)], **kwargs)
    with pytest.raises(error, match=match):
        scorer.update(Fixed(output), batch)


def test_bad_metric_outputs_and_references():
    class Words(Metric):
        def __init__(self, value: Any) -> None:
            super().__init__()
            self.value = value
            self.ignore_index = 0

        def update(self, preds: Any, target: Any) -> None:
            pass

        def compute(self) -> Any:
            return self.value

    scorer = GenerationScorer({"w": Words("text")})
    scorer.update(Fixed(torch.tensor([[5]])), BATCH)
    with pytest.raises(TypeError, match=r"metric w returned a str; only numbers, tensors and dicts of them log"):
        scorer.compute()
    scorer = GenerationScorer([Words({"bleu": torch.tensor(1.0)}), BLEUScore()])
    scorer.update(Fixed(torch.tensor([[5]])), BATCH)
    with pytest.raises(ValueError, match=r"two metrics give the value 'bleu'"):
        scorer.compute()
    scorer = GenerationScorer({"cer": CharErrorRate()}, decode_fn=lambda rows: ["a"] * len(rows))
    with pytest.raises(ValueError, match=r"metric 'cer' \(CharErrorRate\) takes one reference per sample"):
        scorer.update(Fixed(torch.tensor([[5]])), ([0], [["a", "b"]]))
    with pytest.raises(TypeError, match=r"BoringModel has no `generate` method"):
        scorer.update(BoringModel(), BATCH)


def test_examples_need_no_more_than_num_examples_and_reset_clears_them():
    scorer = GenerationScorer([BLEUScore(ignore_index=0)], ignore_ids=SPECIAL, num_examples=3)
    for batch in toy_batches(2):
        scorer.update(Fixed(batch["tgt"][:, 1:]), batch)
    assert len(scorer.examples) == 3
    assert scorer.compute()["bleu"].item() == pytest.approx(1.0)
    scorer.reset()
    assert scorer.examples == [] and scorer.compute() == {}
