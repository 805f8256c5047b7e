"""QuantizationAwareTraining against torchao's own QAT flow and a plain training loop.

- prepared and converted outputs equal ``quantize_(QATConfig(..., "prepare" / "convert"))`` applied
  by hand; fake quantization is off until ``start_step``; the losses equal a plain QAT loop;
- multi-input and keyword forwards: Seq2SeqTransformer, VAE, Lightning's ``LightningTransformer``;
- the converted model validates, tests, predicts, is smaller and saves/reloads for inference;
- the default layer filter follows the config's granularity (a torchao config's own included);
- checkpoints: float ones load into the converted model (embeddings too), converted ones load into a
  fresh float model (``load_from_checkpoint``, ``torch.load(weights_only=True)``), the whole module
  pickles; a converted model is not fine-tuned again;
- bf16-mixed, two processes (``ddp_spawn``: the main process gets the converted model), together with
  KnowledgeDistillation, save -> resume before and after ``start_step``; bad input.
"""

from __future__ import annotations

import copy
import pickle

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
from torchao.quantization import (  # noqa: E402
    Int8DynamicActivationIntxWeightConfig,
    IntxWeightOnlyConfig,
    quantize_,
)
from torchao.quantization.granularity import PerAxis, PerGroup  # noqa: E402
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


@pytest.mark.parametrize("granularity", [PerAxis(0), PerGroup(40)])
def test_default_filter_follows_a_torchao_configs_granularity(granularity):
    """A config's own granularity decides (the default `group_size=32` divides no 200-wide layer)."""
    torch.manual_seed(0)
    demo = LightningTransformer(vocab_size=40).eval()  # no dropout
    expected = copy.deepcopy(demo)
    config = Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int8, weight_granularity=granularity)
    qat = QuantizationAwareTraining(scheme=config)
    qat.convert(demo)
    linears = [name for name, layer in expected.named_modules()
               if isinstance(layer, nn.Linear) and ".self_attn." not in name and ".multihead_attn." not in name]
    assert qat.prepared_names == linears and len(linears) == 9
    # By hand: torchao's flow on every nn.Linear outside nn.MultiheadAttention.
    quantize_(expected, QATConfig(config, step="prepare"), filter_fn=lambda _, name: name in linears)
    quantize_(expected, QATConfig(config, step="convert"))
    tokens = torch.randint(0, 40, (2, 2, 10))
    with torch.no_grad():
        torch.testing.assert_close(demo(tokens[:, 0], tokens[:, 1]), expected(tokens[:, 0], tokens[:, 1]))


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


class RankZeroOutputs(L.Callback):
    """After QAT converted the model: rank 0's outputs on fixed inputs, sent back as a callback metric."""

    def on_fit_end(self, trainer, pl_module):
        if trainer.global_rank == 0:
            with torch.no_grad():
                trainer.callback_metrics["rank_zero_outputs"] = pl_module(fixed_inputs()).detach().clone()


def fixed_inputs() -> Tensor:
    return torch.randn(5, 32, generator=torch.Generator().manual_seed(1))


def test_ddp_spawn_main_process_gets_the_converted_model(ddp_spawn):
    """Lightning loads rank 0's weights into the main process with a callable `map_location`."""
    torch.manual_seed(0)
    model = Regressor()
    fit = trainer(devices=2, strategy=ddp_spawn, max_steps=3, callbacks=[QuantizationAwareTraining(), RankZeroOutputs()])
    fit.fit(model, regression_data())
    assert type(model.net[0].weight).__name__ == "IntxUnpackedToInt8Tensor"
    with torch.no_grad():  # (the workers ran one thread each: float sums in another order)
        torch.testing.assert_close(model(fixed_inputs()), fit.callback_metrics["rank_zero_outputs"])


# ---------------------------------------------------------------------------------------------
# 3. Checkpoints and pickling of the converted model


def converted_regressor() -> tuple[Regressor, L.Trainer]:
    """A Regressor after a fit with QAT (8da4w), and the Trainer that fit it."""
    torch.manual_seed(0)
    model = Regressor()
    fit = trainer(max_steps=2, callbacks=[QuantizationAwareTraining()])
    fit.fit(model, regression_data())
    return model, fit


@pytest.mark.parametrize("quantize_embeddings", [False, True])
def test_float_checkpoint_loads_into_the_converted_model(tmp_path, quantize_embeddings):
    torch.manual_seed(0)
    model = translator(32)
    qat = QuantizationAwareTraining(quantize_embeddings=quantize_embeddings)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=2, save_top_k=-1)
    data = DataLoader([seq2seq_batch()] * 3, batch_size=None)
    fit = trainer(max_steps=3, callbacks=[qat, checkpoint], enable_checkpointing=True)
    fit.fit(model, data)
    (path,) = tmp_path.glob("*step=2.ckpt")
    for run in (fit.validate, fit.test, fit.predict):
        run(model, data, ckpt_path=path, **({} if run == fit.predict else {"verbose": False}))
    # By hand: the checkpoint's float weights through torchao's prepare and convert steps.
    expected = translator(32)
    expected.load_state_dict(torch.load(path, weights_only=True)["state_dict"])
    quantize_(expected, QATConfig(base(), step="prepare"), filter_fn=lambda _, name: name in qat.prepared_names)
    quantize_(expected, QATConfig(base(), step="convert"))
    if quantize_embeddings:
        embedding = IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(32))
        embeddings = lambda layer, _: isinstance(layer, nn.Embedding)  # noqa: E731
        quantize_(expected, QATConfig(embedding, step="prepare"), filter_fn=embeddings)
        quantize_(expected, QATConfig(embedding, step="convert"), filter_fn=embeddings)
    assert type(model.src_embed.weight).__name__ == type(expected.src_embed.weight).__name__
    batch = seq2seq_batch()
    with torch.no_grad():
        torch.testing.assert_close(model(batch["src"], batch["tgt"]), expected(batch["src"], batch["tgt"]))


def test_load_from_checkpoint_of_the_converted_model(tmp_path):
    model, fit = converted_regressor()
    fit.save_checkpoint(tmp_path / "int4.ckpt")
    loaded = Regressor.load_from_checkpoint(tmp_path / "int4.ckpt")
    assert type(loaded.net[0].weight).__name__ == "IntxUnpackedToInt8Tensor"
    with torch.no_grad():  # 8da4w also quantizes activations: equal outputs mean the same quantized layers
        torch.testing.assert_close(loaded(fixed_inputs()), model(fixed_inputs()), rtol=0, atol=0)
        float_outputs = Regressor()
        float_outputs.load_state_dict({k: v.dequantize() if hasattr(v, "dequantize") else v
                                       for k, v in model.state_dict().items()})
        assert not torch.equal(loaded(fixed_inputs()), float_outputs(fixed_inputs()))


def test_converted_model_pickles_and_its_state_dict_loads_with_weights_only(tmp_path):
    model, _ = converted_regressor()
    torch.save(model, tmp_path / "model.pt")
    loaded = torch.load(tmp_path / "model.pt", weights_only=False)
    torch.save(model.state_dict(), tmp_path / "state.pt")
    # As Lightning loads checkpoints: weights only, a callable map_location.
    state = torch.load(tmp_path / "state.pt", weights_only=True, map_location=lambda storage, _: storage)
    fresh = Regressor()
    fresh.load_state_dict(state)
    with torch.no_grad():
        for other in (loaded, fresh):
            assert type(other.net[0].weight).__name__ == "IntxUnpackedToInt8Tensor"
            torch.testing.assert_close(other(fixed_inputs()), model(fixed_inputs()), rtol=0, atol=0)
    # The unpickled module kept its load hooks: float weights are quantized as conversion does.
    float_state = Regressor().state_dict()
    loaded.load_state_dict(float_state)
    expected = Regressor()
    expected.load_state_dict(float_state)
    quantize_(expected.net, QATConfig(base(), step="prepare"))
    quantize_(expected.net, QATConfig(base(), step="convert"))
    with torch.no_grad():
        torch.testing.assert_close(loaded(fixed_inputs()), expected(fixed_inputs()))
    pickle.dumps(model)


def test_a_converted_model_is_not_fine_tuned_again():
    model, _ = converted_regressor()
    with pytest.raises(ValueError, match=r"Regressor is already converted \(quantized weights in net\.0, net\.2\)"):
        trainer(max_steps=2, callbacks=[QuantizationAwareTraining()]).fit(model, regression_data())


# ---------------------------------------------------------------------------------------------
# 4. Resume


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
# 5. Bad input


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown quantization scheme 'int3'; valid schemes: 8da4w, 8da8w, 4w, 8w"):
        QuantizationAwareTraining(scheme="int3")
    with pytest.raises(ValueError, match="`start_step` must be >= 0, got -1"):
        QuantizationAwareTraining(start_step=-1)


@pytest.mark.parametrize(("group_size", "error"), [(2.5, TypeError), (True, TypeError), ("32", TypeError),
                                                   (0, ValueError), (-1, ValueError)])
def test_bad_group_size(group_size, error):
    message = "`group_size` must be a positive int or None" if error is TypeError else "`group_size` must be at least 1"
    with pytest.raises(error, match=rf"{message}.*got {group_size!r}"):
        QuantizationAwareTraining(group_size=group_size)


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
