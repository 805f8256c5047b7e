"""What only a GPU has: the tests marked ``gpu`` (``pytest -m gpu tests/gpu``, run by scripts/gpu-check.sh).

Each CUDA case skips, with the reason, where ``torch.cuda.is_available()`` is False. The
``accelerator`` parameter (it overrides the fixture of that name) gives each test its devices; where
CPUs can run a twin, the ``cpu`` case runs in the normal suite: fp16 loss scaling (Lightning's
``MixedPrecision`` with the ``GradScaler`` it makes for CUDA), bf16-mixed with all three callbacks
(Seq2SeqTransformer and VAE), QAT's prepare -> fit -> convert.

Oracles:
- ``16-mixed`` with AdversarialTraining (fgm, pgd, freelb): the same step in 32 bits (the
  perturbation's direction, the loss and the parameters' update), the epsilon ball;
- ``bf16-mixed`` for Seq2SeqTransformer and VAE with each callback and all three: the same fit in 32 bits;
- QAT: the fake-quantized model just before conversion (outputs and score);
- ``strategy="fsdp"`` on one GPU with KD, QAT and AdversarialTraining: the same fit on the default strategy;
- metrics on CUDA tensors: the same metrics on CPU tensors;
- generation on CUDA: the same weights' tokens on CPU (greedy, beam; sampling with ``top_k=1``);
  a static cache and ``compile=True`` on CUDA: eager decoding.
"""

from __future__ import annotations

import copy
import importlib.util
import math
from collections.abc import Callable
from typing import Any

import lightning.pytorch as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.plugins.precision import MixedPrecision
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from llmkit import VAE, Seq2SeqTransformer
from llmkit.callbacks import AdversarialTraining, KnowledgeDistillation, QuantizationAwareTraining
from llmkit.metrics import BLEUScore, Perplexity, ROUGEScore
from llmkit.metrics.functional import bleu_score, perplexity, rouge_score
from tests.callbacks.helpers import RecordLosses, seq2seq_batch, translator

NO_CUDA = "needs a CUDA GPU: torch.cuda.is_available() is False"
CUDA = pytest.param(
    "cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)], id="cuda"
)
CPU = pytest.param("cpu", id="cpu")

pytestmark = [
    # Tiny layers narrower than a quantization group stay in float, and QAT says which.
    pytest.mark.filterwarnings("ignore:QuantizationAwareTraining leaves"),
    pytest.mark.filterwarnings("ignore:The number of training batches"),
]


def fit(
    module: L.LightningModule, data: DataLoader, accelerator: str, *, callbacks: list[L.Callback] | tuple[()] = (),
    steps: int = 2, **kwargs: Any,
) -> tuple[L.Trainer, list[float]]:
    """Fit quietly for ``steps`` steps on one device; returns the trainer and every step's loss."""
    record = RecordLosses()
    defaults: dict[str, Any] = dict(
        accelerator=accelerator, devices=1, max_steps=steps, max_epochs=-1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, log_every_n_steps=1,
    )
    trainer = L.Trainer(**{**defaults, **kwargs, "callbacks": [*callbacks, record]})
    trainer.fit(module, data)
    return trainer, record.losses


def assert_finite(losses: list[float], steps: int) -> None:
    assert len(losses) == steps and all(math.isfinite(loss) for loss in losses), losses


# ---------------------------------------------------------------------------------------------
# 1. fp16 loss scaling: AdversarialTraining's in-step gradients are taken of the scaled loss
#    and divided back


VOCAB, DIM, EPS = 12, 8, 0.5
STEPS = {"fgm": 1, "pgd": 3, "freelb": 2}


class TokenClassifier(L.LightningModule):
    """Mean of the non-padding token embeddings -> MLP -> 3 classes (SGD); keeps each pass's embeddings."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, DIM, padding_idx=0)
        self.head = nn.Sequential(nn.Linear(DIM, 16), nn.Tanh(), nn.Linear(16, 3))
        self.passes: list[Tensor] = []

    def forward(self, ids: Tensor) -> Tensor:
        e = self.emb(ids)  # [B, T, D], perturbed by the callback's hook
        self.passes.append(e.detach().float().cpu())
        mask = (ids != 0).unsqueeze(-1).to(e.dtype)
        return self.head((e * mask).sum(1) / mask.sum(1))

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        ids, y = batch
        return F.cross_entropy(self(ids), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.5)


def token_batch() -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, VOCAB, (8, 6), generator=g)
    ids[1, 3:] = 0  # padding, never perturbed
    ids[5, 4:] = 0
    return ids, torch.randint(0, 3, (8,), generator=g)


def adversarial_step(accelerator: str, method: str, half: bool) -> dict[str, Any]:
    """One optimizer step with AdversarialTraining: the final pass's perturbation, the loss, the update."""
    torch.manual_seed(0)
    model = TokenClassifier()
    before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    precision: dict[str, Any] = {"precision": "32-true"}
    if half:
        # Lightning makes this GradScaler itself for "16-mixed" on CUDA; on CPU the twin is given one.
        precision = (
            {"precision": "16-mixed"} if accelerator == "cuda"
            else {"plugins": [MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))]}
        )
    attack = AdversarialTraining(method, epsilon=EPS, steps=STEPS[method])
    trainer, losses = fit(model, DataLoader([token_batch()], batch_size=None), accelerator, callbacks=[attack],
                          steps=1, **precision)
    after = torch.cat([p.detach().flatten().cpu() for p in model.parameters()])
    return {
        "loss": losses, "passes": len(model.passes), "delta": model.passes[-1] - model.passes[0],
        "update": after - before, "scaler": getattr(trainer.precision_plugin, "scaler", None),
    }


@pytest.mark.parametrize("method", ["fgm", "pgd", "freelb"])
@pytest.mark.parametrize("accelerator", [CPU, CUDA])
def test_fp16_loss_scaling_unscales_the_adversarial_gradients(accelerator, method):
    full, half = adversarial_step(accelerator, method, half=False), adversarial_step(accelerator, method, half=True)
    scaler = half["scaler"]
    assert scaler is not None and scaler.is_enabled()
    # No inf/NaN in the scaled gradients: the scaler neither skipped the step nor lowered its scale.
    assert scaler.get_scale() == 2.0**16
    assert_finite(half["loss"], 1)
    assert half["loss"][0] == pytest.approx(full["loss"][0], rel=1e-2)
    assert half["passes"] == full["passes"] == STEPS[method] + 1  # clean, the attack's steps before the last, final

    ids, _ = token_batch()
    for run in (full, half):
        delta = run["delta"]  # [B, T, D]
        assert float(delta[ids == 0].abs().max()) == 0.0
        norms = delta.flatten(1).norm(dim=1)
        if method == "fgm":  # one step of size epsilon: on the sphere
            torch.testing.assert_close(norms, torch.full_like(norms, EPS), rtol=1e-4, atol=0.0)
        else:
            assert float(norms.max()) <= EPS * (1 + 1e-5), norms
    # The perturbation points where the 32-bit one does.
    cosine = F.cosine_similarity(half["delta"].flatten(1), full["delta"].flatten(1), dim=1)
    assert float(cosine.min()) > 0.99, cosine
    # The parameters moved, by the 32-bit step (not 2**16 times it: the carried gradients were unscaled).
    assert float(half["update"].norm()) > 0
    error = float((half["update"] - full["update"]).norm() / full["update"].norm())
    assert error < 2e-2, error


# ---------------------------------------------------------------------------------------------
# 2. bf16-mixed: each module with each callback and all three, against the same fit in 32 bits


def seq2seq_case(names: tuple[str, ...]) -> tuple[L.LightningModule, DataLoader, list[L.Callback]]:
    student, teacher = translator(d_model=32), translator(d_model=64)
    callbacks = {
        "kd": KnowledgeDistillation(teacher, ignore_index=0),
        "qat": QuantizationAwareTraining(),
        "adv": AdversarialTraining("pgd", epsilon=0.5, steps=2),
    }
    return student, DataLoader([seq2seq_batch()] * 2, batch_size=None), [callbacks[n] for n in names]


def vae_case(names: tuple[str, ...]) -> tuple[L.LightningModule, DataLoader, list[L.Callback]]:
    student = VAE(input_shape=(64,), latent_dim=32, hidden_dims=(32,))
    teacher = VAE(input_shape=(64,), latent_dim=32, hidden_dims=(64,))
    callbacks = {
        "kd": KnowledgeDistillation(teacher, loss="mse"),
        "qat": QuantizationAwareTraining(),
        "adv": AdversarialTraining("fgsm", epsilon=0.05, target="inputs", input_range=(0.0, 1.0)),
    }
    x = torch.rand(16, 64, generator=torch.Generator().manual_seed(0))
    return student, DataLoader(TensorDataset(x), batch_size=8), [callbacks[n] for n in names]


CASES: dict[str, Callable[[tuple[str, ...]], tuple[L.LightningModule, DataLoader, list[L.Callback]]]] = {
    "seq2seq": seq2seq_case, "vae": vae_case,
}
LOGGED = {"kd": {"train_kd_loss", "train_task_loss"}, "adv": {"train_clean_loss", "train_adv_loss"}, "qat": set()}
COMBOS = {"kd": ("kd",), "qat": ("qat",), "adv": ("adv",), "all": ("kd", "qat", "adv")}


def _bf16_cases() -> list[Any]:
    cases = []
    for model in CASES:
        for combo in COMBOS:
            cases.append(pytest.param(CUDA.values[0], model, combo, marks=CUDA.marks, id=f"cuda-{model}-{combo}"))
        # On CPU only all three together: every pair would cost the normal suite seconds for little more.
        cases.append(pytest.param("cpu", model, "all", id=f"cpu-{model}-all"))
    return cases


def bf16_run(accelerator: str, model: str, combo: str, precision: str) -> tuple[L.LightningModule, L.Trainer, list[float]]:
    torch.manual_seed(0)
    module, data, callbacks = CASES[model](COMBOS[combo])
    torch.manual_seed(1)  # the same dropout, reparameterisation and random-start draws in both runs
    trainer, losses = fit(module, data, accelerator, callbacks=callbacks, steps=2, precision=precision)
    return module, trainer, losses


@pytest.mark.parametrize(("accelerator", "model", "combo"), _bf16_cases())
def test_bf16_mixed_with_the_callbacks_follows_the_32_bit_fit(accelerator, model, combo):
    module, trainer, losses = bf16_run(accelerator, model, combo, "bf16-mixed")
    _, _, expected = bf16_run(accelerator, model, combo, "32-true")
    assert_finite(losses, 2)
    # bf16 keeps 8 bits of mantissa (4e-3 relative); a fake-quantized activation may round to the next step.
    assert losses == pytest.approx(expected, rel=2e-2)
    logged = set().union(*(LOGGED[name] for name in COMBOS[combo]))
    assert logged <= set(trainer.callback_metrics), sorted(trainer.callback_metrics)
    if "qat" in COMBOS[combo]:
        # Converted at the end of fit: int4 weights that still run, on the accelerator too.
        layer = module.decoder.layers[0].feed_forward.linear1 if model == "seq2seq" else module.decoder.net[0]
        assert type(layer.weight).__name__ == "IntxUnpackedToInt8Tensor", type(layer.weight)
    module = module.to(accelerator).eval()
    with torch.no_grad():
        if model == "seq2seq":
            batch = {k: v.to(accelerator) for k, v in seq2seq_batch().items()}
            out = module(batch["src"], batch["tgt"][:, :-1])
        else:
            out = module(torch.rand(4, 64, device=accelerator))[0]
    assert out.device.type == accelerator and torch.isfinite(out).all()


# ---------------------------------------------------------------------------------------------
# 3. QAT: prepare -> fit -> convert on the accelerator; the converted model scores as the fake-quantized one


class Regressor(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 4))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return F.mse_loss(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05)


def regression_data(n: int, seed: int) -> tuple[Tensor, Tensor]:
    x = torch.randn(n, 32, generator=torch.Generator().manual_seed(seed))
    return x, x[:, :4] * 2 - x[:, 4:8]


def _int4_cuda_config() -> Any:
    from torchao.quantization import Int4WeightOnlyConfig

    return Int4WeightOnlyConfig(group_size=32)


# scheme: (QAT's scheme, the converted weight's class, the Trainer's precision)
QAT_SCHEMES: dict[str, tuple[Callable[[], Any], str, str]] = {
    "8da4w": (lambda: "8da4w", "IntxUnpackedToInt8Tensor", "32-true"),
    "4w": (lambda: "4w", "IntxUnpackedToInt8Tensor", "32-true"),
    "8w": (lambda: "8w", "IntxUnpackedToInt8Tensor", "32-true"),
    # torchao's CUDA int4 kernel (int4 weights x bf16 activations); its QAT takes bf16 activations.
    "int4-cuda-kernel": (_int4_cuda_config, "Int4Tensor", "bf16-true"),
}


def _qat_cases() -> list[Any]:
    cases = [pytest.param(CUDA.values[0], scheme, marks=CUDA.marks, id=f"cuda-{scheme}") for scheme in QAT_SCHEMES]
    return [*cases, pytest.param("cpu", "8da4w", id="cpu-8da4w")]


@pytest.mark.parametrize(("accelerator", "scheme"), _qat_cases())
def test_qat_prepare_fit_convert_on_the_accelerator(accelerator, scheme):
    make_scheme, weight_class, precision = QAT_SCHEMES[scheme]
    if scheme == "int4-cuda-kernel" and importlib.util.find_spec("mslk") is None:
        pytest.skip("torchao's int4 CUDA kernels (Int4WeightOnlyConfig) need the mslk package, not installed here")
    torch.manual_seed(0)
    model = Regressor()
    qat = QuantizationAwareTraining(scheme=make_scheme(), convert_on_fit_end=False)
    x, y = regression_data(64, seed=0)
    _, losses = fit(model, DataLoader(TensorDataset(x, y), batch_size=16), accelerator, callbacks=[qat], steps=8,
                    precision=precision)
    assert_finite(losses, 8)
    assert losses[4] < losses[0]  # the first batch again, an epoch later
    assert qat.prepared_names == ["net.0", "net.2"]

    # Lightning hands the model back on CPU: convert it where it will run.
    model = model.to(accelerator).eval()
    dtype = next(model.parameters()).dtype
    x_test, y_test = (t.to(accelerator, dtype) for t in regression_data(256, seed=1))
    with torch.no_grad():
        fake = model(x_test)
        qat.convert(model)
        converted = model(x_test)
    for layer in (model.net[0], model.net[2]):
        assert type(layer.weight).__name__ == weight_class, type(layer.weight)
        assert layer.weight.device.type == accelerator
    assert converted.device.type == accelerator
    # Fake quantization simulates the converted arithmetic: the same outputs up to float rounding.
    scale = float(fake.float().abs().max())
    tolerance = 2e-2 if dtype == torch.bfloat16 else 1e-3
    torch.testing.assert_close(converted.float(), fake.float(), rtol=tolerance, atol=tolerance * scale)
    fake_score = F.mse_loss(fake.float(), y_test.float()).item()
    assert F.mse_loss(converted.float(), y_test.float()).item() == pytest.approx(fake_score, rel=2 * tolerance)


# ---------------------------------------------------------------------------------------------
# 4. FSDP on one GPU: KD's teacher outside the sharded module, QAT prepared before wrapping


class WrappedModel(L.Callback):
    """What the strategy wrapped, seen when training starts."""

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        kd = next(c for c in trainer.callbacks if isinstance(c, KnowledgeDistillation))
        wrapped = trainer.strategy.model
        self.wrapper = type(wrapped).__name__
        self.inside = [type(m).__name__ for m in wrapped.modules()]
        self.teacher_outside = all(m is not kd.teacher for m in wrapped.modules())


@pytest.mark.parametrize("accelerator", [CUDA])  # Lightning refuses strategy="fsdp" on CPU
def test_fsdp_with_distillation_qat_and_adversarial_equals_one_device(accelerator):
    def run(strategy: str) -> tuple[WrappedModel, list[float]]:
        torch.manual_seed(0)
        student, teacher = translator(d_model=32), translator(d_model=64)
        seen = WrappedModel()
        callbacks = [
            KnowledgeDistillation(teacher, ignore_index=0),
            # Conversion of FSDP's flat parameters after fit is not what this test is about.
            QuantizationAwareTraining(convert_on_fit_end=False),
            AdversarialTraining("pgd", epsilon=0.5, steps=2),
            seen,
        ]
        _, losses = fit(student, DataLoader([seq2seq_batch()] * 3, batch_size=None), accelerator,
                        callbacks=callbacks, steps=3, strategy=strategy)
        return seen, losses

    _, expected = run("auto")
    seen, losses = run("fsdp")
    assert seen.wrapper == "FullyShardedDataParallel"
    assert "FakeQuantizedLinear" in seen.inside  # prepared at setup, before the strategy wrapped the model
    assert seen.teacher_outside
    assert_finite(losses, 3)
    # One shard is the whole model: FSDP's steps are the single device's.
    assert losses == pytest.approx(expected, rel=1e-4, abs=1e-5)


# ---------------------------------------------------------------------------------------------
# 5. Metrics on CUDA tensors equal the same metrics on CPU tensors


def token_corpus() -> dict[str, Tensor]:
    """Token ids ``[16, 12]`` (0 pads), predictions that get 70% of them right, two references each, logits."""
    g = torch.Generator().manual_seed(0)
    target = torch.randint(3, 40, (16, 12), generator=g)
    target[::3, 8:] = 0
    preds = torch.where(torch.rand(target.shape, generator=g) < 0.3, torch.randint(3, 40, target.shape, generator=g),
                        target)
    preds[target == 0] = 0
    second = torch.where(torch.rand(target.shape, generator=g) < 0.5, target, preds)
    logits = torch.randn(16, 12, 40, generator=g) + 3 * F.one_hot(target, 40)
    return {"preds": preds, "target": target, "refs": torch.stack([target, second], dim=1), "logits": logits}


METRICS: dict[str, tuple[Callable[[], Any], Callable[..., Any], tuple[str, str]]] = {
    "bleu": (lambda: BLEUScore(ignore_index=0), lambda p, t: bleu_score(p, t, ignore_index=0), ("preds", "target")),
    "bleu-two-refs": (lambda: BLEUScore(ignore_index=0), lambda p, t: bleu_score(p, t, ignore_index=0),
                      ("preds", "refs")),
    "rouge": (lambda: ROUGEScore(rouge_keys=("rouge1", "rouge2", "rougeL"), ignore_index=0),
              lambda p, t: rouge_score(p, t, rouge_keys=("rouge1", "rouge2", "rougeL"), ignore_index=0),
              ("preds", "refs")),
    "perplexity": (lambda: Perplexity(ignore_index=0), lambda p, t: perplexity(p, t, ignore_index=0),
                   ("logits", "target")),
}


def _on(value: Tensor | dict[str, Tensor], device: str) -> dict[str, Tensor]:
    return {k: v.to(device) for k, v in value.items()} if isinstance(value, dict) else {"value": value.to(device)}


@pytest.mark.parametrize("name", list(METRICS))
@pytest.mark.parametrize("accelerator", [CUDA])
def test_metrics_on_cuda_tensors_equal_cpu(accelerator, name):
    make, functional, (preds_key, target_key) = METRICS[name]
    corpus = token_corpus()
    preds, target = corpus[preds_key], corpus[target_key]

    def scored(device: str) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        metric = make().to(device)
        for half in (slice(0, 8), slice(8, 16)):  # two updates: the sums accumulate on the device
            metric.update(preds[half].to(device), target[half].to(device))
        return _on(metric.compute(), "cpu"), _on(functional(preds.to(device), target.to(device)), "cpu")

    expected_metric, expected_functional = scored("cpu")
    metric = make().to(accelerator)
    metric.update(preds[:1].to(accelerator), target[:1].to(accelerator))
    assert all(getattr(metric, state).device.type == accelerator for state in metric._defaults)
    got_metric, got_functional = scored(accelerator)
    assert 0 < float(next(iter(expected_metric.values()))) < math.inf
    for got, expected in ((got_metric, expected_metric), (got_functional, expected_functional)):
        assert got.keys() == expected.keys()
        for key in expected:
            torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-7, msg=key)


# ---------------------------------------------------------------------------------------------
# 6. Generation on CUDA: the CPU's tokens with the same weights; static cache and compile as eager


def reversal_batches(n: int, seed: int) -> list[dict[str, Tensor]]:
    """Sources of 6 words and EOS; targets the words reversed (BOS ... EOS), over a 13-word vocabulary."""
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n):
        words = torch.randint(3, 13, (16, 6), generator=g)
        eos, bos = torch.full((16, 1), 2), torch.ones(16, 1, dtype=torch.long)
        batches.append({"src": torch.cat([words, eos], 1), "tgt": torch.cat([bos, words.flip(1), eos], 1)})
    return batches


@pytest.mark.parametrize("accelerator", [CUDA])
def test_generation_on_cuda_equals_cpu(accelerator, monkeypatch):
    # TF32 matrix products would round differently from the CPU's float32 and could flip a near tie.
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    torch.manual_seed(0)
    # Half-trained on the GPU: untrained translators repeat one token, which would compare little.
    on_cpu = Seq2SeqTransformer(13, 13, d_model=32, num_heads=2, num_encoder_layers=1, num_decoder_layers=1,
                                dim_feedforward=64, dropout=0.0, max_len=16, lr=1e-2, warmup_steps=1)
    fit(on_cpu, DataLoader(reversal_batches(8, seed=0), batch_size=None), accelerator, steps=40)
    on_cpu.eval()
    on_gpu = copy.deepcopy(on_cpu).to(accelerator)
    src = reversal_batches(1, seed=1)[0]["src"][:6]
    src[3, 4:] = 0  # padding
    gpu_src = src.to(accelerator)
    for search in ({}, {"num_beams": 3}):
        expected = on_cpu.generate(src, max_new_tokens=10, **search)
        eager = on_gpu.generate(gpu_src, max_new_tokens=10, **search)
        assert eager.device.type == accelerator
        assert torch.equal(eager.cpu(), expected), (search, eager, expected)
        static = on_gpu.generate(gpu_src, max_new_tokens=10, cache_implementation="static", **search)
        assert torch.equal(static.cpu(), expected), (search, static, expected)
        compiled = on_gpu.generate(gpu_src, max_new_tokens=10, compile=True, **search)
        assert torch.equal(compiled.cpu(), expected), (search, compiled, expected)
    # Sampling from the one most likely token is greedy search, whatever the generator draws.
    greedy = on_cpu.generate(src, max_new_tokens=10)
    generator = torch.Generator(device=accelerator).manual_seed(0)
    top1 = on_gpu.generate(gpu_src, max_new_tokens=10, do_sample=True, top_k=1, generator=generator)
    assert torch.equal(top1.cpu(), greedy)
    # Sampling on CUDA: valid ids, reproducible from the generator's seed.
    draws = [
        on_gpu.generate(gpu_src, max_new_tokens=10, do_sample=True, temperature=1.5,
                        generator=torch.Generator(device=accelerator).manual_seed(7))
        for _ in range(2)
    ]
    assert torch.equal(draws[0], draws[1])
    assert draws[0].shape[0] == src.shape[0] and int(draws[0].min()) >= 0 and int(draws[0].max()) < 13
