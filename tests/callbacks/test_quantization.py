"""QuantizationAwareTraining against torchao's own QAT flow and a plain training loop.

- prepared and converted outputs equal ``quantize_(QATConfig(..., "prepare" / "convert"))`` applied
  by hand; fake quantization is off until ``start_step``; the losses equal a plain QAT loop;
- multi-input and keyword forwards: Seq2SeqTransformer, VAE, Lightning's ``LightningTransformer``;
- the converted model validates, tests, predicts, is smaller and saves/reloads for inference;
- bf16-mixed, two processes (``ddp_spawn``), together with KnowledgeDistillation, save -> resume
  before and after ``start_step``; bad input.
"""

from __future__ import annotations

import copy

import lightning.pytorch as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.demos.transformer import LightningTransformer
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from llmkit import VAE
from llmkit.callbacks import KnowledgeDistillation, QuantizationAwareTraining
from llmkit.callbacks.quantization import quantized_weight_bytes
from tests.callbacks.helpers import RecordLosses, seq2seq_batch, trainer, translator

torchao = pytest.importorskip("torchao")
from torchao.quantization import Int8DynamicActivationIntxWeightConfig, quantize_  # noqa: E402
from torchao.quantization.granularity import PerGroup  # noqa: E402
from torchao.quantization.qat import QATConfig  # noqa: E402

pytestmark = [
    # Small test models have layers narrower than a quantization group: QAT says which it skips.
    pytest.mark.filterwarnings("ignore:QuantizationAwareTraining leaves"),
]


class Regressor(L.LightningModule):
    def __init__(self, width: int = 64, lr: float = 0.05) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(32, width), nn.ReLU(), nn.Linear(width, 4))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.mse_loss(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.mse_loss(self(x), y))

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.log("test_loss", F.mse_loss(self(x), y))

    def predict_step(self, batch, batch_idx):
        return self(batch[0])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)


def regression_data(n: int = 64, batch_size: int = 16) -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(n, 32, generator=generator)
    return DataLoader(TensorDataset(x, x[:, :4] * 2 - x[:, 4:8]), batch_size=batch_size)


def base() -> Int8DynamicActivationIntxWeightConfig:
    return Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4, weight_granularity=PerGroup(32))


# ---------------------------------------------------------------------------------------------
# 1. torchao's flow, by hand


@pytest.mark.parametrize("start_step", [0, 3])
def test_losses_and_converted_model_equal_torchaos_flow_by_hand(start_step):
    torch.manual_seed(0)
    model = Regressor()
    plain = copy.deepcopy(model.net)
    record = RecordLosses()
    qat = QuantizationAwareTraining(start_step=start_step)
    trainer(max_steps=8, callbacks=[qat, record]).fit(model, regression_data())

    quantize_(plain, QATConfig(base(), step="prepare"))
    optimizer = torch.optim.SGD(plain.parameters(), lr=0.05)
    expected = []
    step = 0
    for _ in range(2):
        for x, y in regression_data():
            for layer in plain.modules():
                if hasattr(layer, "weight_fake_quantizer"):
                    layer.activation_fake_quantizer.enabled = step >= start_step
                    layer.weight_fake_quantizer.enabled = step >= start_step
            loss = F.mse_loss(plain(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            expected.append(loss.item())
            step += 1
    assert record.losses == pytest.approx(expected, rel=1e-6)
    quantize_(plain, QATConfig(base(), step="convert"))
    x = torch.randn(5, 32)
    torch.testing.assert_close(model(x), plain(x))
    assert type(model.net[0].weight).__name__ == "IntxUnpackedToInt8Tensor"


def test_fake_quantization_switches_on_and_off():
    torch.manual_seed(0)
    model = Regressor()
    float_copy = copy.deepcopy(model)
    qat = QuantizationAwareTraining()
    qat.prepare(model)
    assert qat.prepared_names == ["net.0", "net.2"] or qat.prepared_names == ["net.0"]
    x = torch.randn(3, 32)
    qat._set_fake_quant(model, False)
    with torch.no_grad():
        torch.testing.assert_close(model(x), float_copy(x))
    qat._set_fake_quant(model, True)
    with torch.no_grad():
        assert not torch.allclose(model(x), float_copy(x))


# ---------------------------------------------------------------------------------------------
# 2. The converted model


def test_converted_model_validates_tests_predicts_and_reloads(tmp_path):
    torch.manual_seed(0)
    model = Regressor()
    qat = QuantizationAwareTraining()
    fit = trainer(max_steps=4, callbacks=[qat], limit_val_batches=2)
    fit.fit(model, regression_data(), regression_data())
    assert qat.converted
    stored, fp32 = quantized_weight_bytes(model)
    assert stored <= 0.35 * fp32
    (validated,) = fit.validate(model, regression_data(), verbose=False)
    (tested,) = trainer().test(model, regression_data(), verbose=False)
    x, y = regression_data(n=64, batch_size=64).dataset.tensors
    with torch.no_grad():
        assert tested["test_loss"] == pytest.approx(F.mse_loss(model(x), y).item(), rel=1e-5)
    assert validated["val_loss"] > 0
    predictions = torch.cat(fit.predict(model, regression_data()))
    assert predictions.shape == (64, 4)
    # Save the converted weights; a fresh model converted the same way loads them for inference.
    torch.save(model.state_dict(), tmp_path / "int4.pt")
    fresh = QuantizationAwareTraining().convert(Regressor())
    fresh.load_state_dict(torch.load(tmp_path / "int4.pt", weights_only=True), assign=True)
    x = torch.randn(6, 32)
    torch.testing.assert_close(fresh(x), model(x))


def test_trainer_test_with_ckpt_path_after_conversion(tmp_path):
    """Lightning 1.x's QAT callback broke this (#12896): the best checkpoint holds float weights."""
    torch.manual_seed(0)
    model = Regressor()
    checkpoint = ModelCheckpoint(dirpath=tmp_path, monitor="val_loss")
    fit = trainer(max_steps=6, val_check_interval=3, callbacks=[QuantizationAwareTraining(), checkpoint],
                  enable_checkpointing=True, limit_val_batches=None)
    fit.fit(model, regression_data(), regression_data())
    (tested,) = fit.test(model, regression_data(), ckpt_path="best", verbose=False)
    # By hand: the best float weights, converted with torchao's flow.
    expected_model = Regressor()
    expected_model.load_state_dict(torch.load(checkpoint.best_model_path, weights_only=True)["state_dict"])
    quantize_(expected_model.net, QATConfig(base(), step="prepare"))
    quantize_(expected_model.net, QATConfig(base(), step="convert"))
    x, y = regression_data(n=64, batch_size=64).dataset.tensors
    with torch.no_grad():
        assert tested["test_loss"] == pytest.approx(F.mse_loss(expected_model(x), y).item(), rel=1e-5)
    assert type(model.net[0].weight).__name__ == "IntxUnpackedToInt8Tensor"


def test_seq2seq_two_input_forward_trains_converts_and_generates():
    torch.manual_seed(0)
    model = translator()
    record = RecordLosses()
    trainer(max_steps=3, callbacks=[QuantizationAwareTraining(), record]).fit(
        model, DataLoader([seq2seq_batch()] * 3, batch_size=None)
    )
    assert len(record.losses) == 3
    assert type(model.encoder.layers[0].self_attn.qkv_proj.weight).__name__ == "IntxUnpackedToInt8Tensor"
    out = model.generate(seq2seq_batch()["src"], max_new_tokens=5)
    assert out.shape[0] == 3


def test_vae_keyword_free_forward_and_lightnings_demo_transformer():
    torch.manual_seed(0)
    vae = VAE(input_shape=(64,), latent_dim=4, hidden_dims=(64,))
    trainer(max_steps=2, callbacks=[QuantizationAwareTraining(scheme="8da8w")]).fit(
        vae, DataLoader(TensorDataset(torch.rand(32, 64)), batch_size=16)
    )
    assert vae.sample(2).shape == (2, 64)
    # Lightning's demo transformer is 200 wide: group 40 divides it (32 does not).
    demo = LightningTransformer(vocab_size=40)
    demo.prepare_data = lambda: None  # its own would download WikiText-2; the data here is local
    tokens = torch.randint(0, 40, (8, 2, 10))
    data = DataLoader(list(zip(tokens[:, 0], tokens[:, 1], strict=True)), batch_size=4)
    qat = QuantizationAwareTraining(scheme="4w", group_size=40)
    trainer(max_steps=2, callbacks=[qat]).fit(demo, data)
    assert qat.converted and "model.decoder" in qat.prepared_names
    assert demo(tokens[:2, 0], tokens[:2, 1]).shape == (20, 40)


def test_embeddings_are_optional():
    torch.manual_seed(0)
    model = translator(32)
    qat = QuantizationAwareTraining(quantize_embeddings=True)
    trainer(max_steps=2, callbacks=[qat]).fit(model, DataLoader([seq2seq_batch()] * 2, batch_size=None))
    assert qat.embedding_names == ["src_embed", "tgt_embed"]
    assert type(model.src_embed.weight).__name__ == "IntxUnpackedToInt8Tensor"
    assert model.generate(seq2seq_batch()["src"], max_new_tokens=4).shape[0] == 3
    plain = translator(32)
    trainer(max_steps=1, callbacks=[QuantizationAwareTraining()]).fit(plain, DataLoader([seq2seq_batch()], batch_size=None))
    assert type(plain.src_embed.weight).__name__ == "Parameter"


def test_keyword_only_forward():
    """Lightning 1.x's callback assumed one positional tensor input (#7926, #15862)."""

    class Keywords(Regressor):
        def forward(self, *, features: Tensor, scale: float = 1.0) -> Tensor:
            return self.net(features) * scale

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.mse_loss(self(features=x, scale=2.0), y)

    torch.manual_seed(0)
    model = Keywords()
    trainer(max_steps=2, callbacks=[QuantizationAwareTraining()]).fit(model, regression_data())
    assert model(features=torch.randn(2, 32)).shape == (2, 4)
    assert type(model.net[0].weight).__name__ == "IntxUnpackedToInt8Tensor"

    torch.manual_seed(0)
    model = translator()
    record = RecordLosses()
    trainer(max_steps=2, precision="bf16-mixed", callbacks=[QuantizationAwareTraining(), record]).fit(
        model, DataLoader([seq2seq_batch()] * 2, batch_size=None)
    )
    assert all(torch.isfinite(torch.tensor(record.losses)))


def test_with_knowledge_distillation():
    torch.manual_seed(0)
    student, teacher = translator(32), translator(64)
    record = RecordLosses()
    callbacks = [KnowledgeDistillation(teacher, ignore_index=0), QuantizationAwareTraining(), record]
    fit = trainer(max_steps=3, callbacks=callbacks)
    fit.fit(student, DataLoader([seq2seq_batch()] * 3, batch_size=None))
    assert {"train_task_loss", "train_kd_loss"} <= set(fit.callback_metrics) and len(record.losses) == 3
    assert type(student.output.weight).__name__ == "IntxUnpackedToInt8Tensor"
    assert type(teacher.output.weight).__name__ != "IntxUnpackedToInt8Tensor"  # the teacher is left alone


def test_ddp_spawn_two_processes(ddp_spawn):
    torch.manual_seed(0)
    model = Regressor()
    qat = QuantizationAwareTraining(convert_on_fit_end=False)
    trainer(devices=2, strategy=ddp_spawn, max_steps=3, callbacks=[qat]).fit(model, regression_data())
    # The trained (fake-quantized) weights came back to this process; convert them here.
    qat.convert(model)
    assert type(model.net[0].weight).__name__ == "IntxUnpackedToInt8Tensor"
    assert torch.isfinite(model(torch.randn(2, 32))).all()


# ---------------------------------------------------------------------------------------------
# 3. Resume


@pytest.mark.parametrize("start_step", [2, 6])
def test_resume_continues_with_the_same_losses(tmp_path, start_step):
    """One batch per epoch; the checkpoint after epoch 4 is after start_step 2 and before 6."""

    def run(max_epochs: int, ckpt_path: str | None = None, save: bool = False) -> list[float]:
        torch.manual_seed(0)
        record = RecordLosses()
        callbacks = [QuantizationAwareTraining(start_step=start_step, convert_on_fit_end=False), record]
        if save:
            callbacks.append(ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_epochs=1))
        fit = trainer(max_epochs=max_epochs, callbacks=callbacks, enable_checkpointing=save)
        fit.fit(Regressor(), regression_data(n=16), ckpt_path=ckpt_path)
        return record.losses

    uninterrupted = run(8)
    run(4, save=True)
    (mid,) = sorted(tmp_path.glob("epoch=3*.ckpt"))
    resumed = run(8, ckpt_path=str(mid))
    assert resumed == pytest.approx(uninterrupted[4:], rel=1e-6)


# ---------------------------------------------------------------------------------------------
# 4. Bad input


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown quantization scheme 'int3'; valid schemes: 8da4w, 8da8w, 4w, 8w"):
        QuantizationAwareTraining(scheme="int3")
    with pytest.raises(ValueError, match="`start_step` must be >= 0, got -1"):
        QuantizationAwareTraining(start_step=-1)
    with pytest.raises(ValueError, match="`group_size` must be at least 1"):
        QuantizationAwareTraining(group_size=0)


def test_nothing_to_quantize():
    class NoLinear(Regressor):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Conv1d(1, 1, 1))

    with pytest.raises(ValueError, match=r"nothing to quantize in NoLinear: no nn\.Linear layer is selected"):
        QuantizationAwareTraining().prepare(NoLinear())


def test_group_size_that_divides_no_layer():
    with pytest.raises(ValueError, match=r"group_size=48 divides the input width of none of \['net\.0 \(in_features 32\)'"):
        QuantizationAwareTraining(group_size=48).prepare(Regressor(width=40))


@pytest.mark.filterwarnings("default:QuantizationAwareTraining leaves")
def test_skipped_layers_are_listed_once_in_a_warning():
    with pytest.warns(UserWarning, match=r"leaves 1 linear layer\(s\) in float.*net\.2 \(in_features 40\)"):
        QuantizationAwareTraining(group_size=32).prepare(Regressor(width=40))
