"""The ``llmkit`` command: fit, validate, test and predict from examples/configs/translate.yaml."""

from __future__ import annotations

import importlib.metadata
import math
import shutil
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch
import torch.nn.functional as F

from llmkit import VAE, CausalLMTransformer, Seq2SeqTransformer
from llmkit.cli import cli
from llmkit.data import DigitsDataModule, NumberWordsDataModule, PythonDocsDataModule
from tests.accelerator import ACCELERATOR

CONFIG = Path(__file__).resolve().parents[1] / "examples" / "configs" / "translate.yaml"

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    # No tensorboard here: the config's default logger is a CSVLogger.
    pytest.mark.filterwarnings("ignore:Starting from v1.9.0, `tensorboardX` has been removed"),
    # validate/test/predict write to another folder than fit did.
    pytest.mark.filterwarnings("ignore:The dirpath has changed from"),
    # Lightning's LightningCLI still calls jsonargparse APIs that jsonargparse 4.49 deprecated.
    pytest.mark.filterwarnings("ignore::jsonargparse._deprecated.JsonargparseDeprecationWarning"),
]



def run_cli(args: list[str]):
    """``cli(args)``, with pytest's own arguments out of ``sys.argv`` (LightningCLI warns about both)."""
    with mock.patch.object(sys, "argv", ["llmkit"]):
        return cli(args)


def small(tmp_path: Path) -> list[str]:
    """Overrides that make the config's run tiny."""
    return [
        "--config", str(CONFIG),
        "--data.init_args.high", "200", "--data.init_args.val_size", "20", "--data.init_args.test_size", "20",
        "--trainer.limit_val_batches", "1", "--trainer.default_root_dir", str(tmp_path),
        "--trainer.enable_progress_bar", "false", "--trainer.accelerator", ACCELERATOR,
        "--model.init_args.d_model", "16", "--model.init_args.dim_feedforward", "32",
        "--model.init_args.num_encoder_layers", "1", "--model.init_args.num_decoder_layers", "1",
    ]


@pytest.fixture(scope="module")
def fitted(tmp_path_factory: pytest.TempPathFactory):
    """``llmkit fit`` for 3 steps; returns the CLI object, the output folder and the last checkpoint."""
    root = tmp_path_factory.mktemp("cli")
    run = run_cli(["fit", *small(root), "--trainer.max_steps", "3", "--trainer.val_check_interval", "3"])
    checkpoints = sorted(root.rglob("last.ckpt"))
    assert len(checkpoints) == 1, sorted(root.rglob("*"))
    return run, root, checkpoints[0]


def test_fit_links_vocabulary_sizes_and_saves_a_checkpoint(fitted):
    run, _, last = fitted
    model, data = run.model, run.datamodule
    assert isinstance(model, Seq2SeqTransformer) and isinstance(data, NumberWordsDataModule)
    # The link: the model got the data module's vocabulary sizes.
    assert model.hparams.src_vocab_size == data.src_vocab_size
    assert model.hparams.tgt_vocab_size == data.tgt_vocab_size
    assert model.src_embed.num_embeddings == data.src_vocab_size
    assert model.output.out_features == data.tgt_vocab_size
    # The config and the overrides.
    assert model.hparams.d_model == 16 and model.hparams.num_heads == 4 and model.hparams.max_len == 24
    assert data.hparams.high == 200 and data.hparams.src_lang == "en" and data.hparams.tgt_lang == "fr"
    assert run.trainer.global_step == 3
    assert "val_loss" in run.trainer.callback_metrics
    # The checkpoint holds the fitted weights and the linked sizes.
    loaded = Seq2SeqTransformer.load_from_checkpoint(last)
    assert loaded.hparams.tgt_vocab_size == data.tgt_vocab_size
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


@torch.no_grad()
def first_val_batch_loss(model: Seq2SeqTransformer, data: NumberWordsDataModule) -> float:
    """The label-smoothed loss of the first validation batch (limit_val_batches=1), by hand."""
    model.eval()
    batch = next(iter(data.val_dataloader()))
    logits = model(batch["src"], batch["tgt"][:, :-1])
    return float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch["tgt"][:, 1:].reshape(-1),
                                 ignore_index=data.pad_id, label_smoothing=model.hparams.label_smoothing))


def test_validate_from_checkpoint(fitted, tmp_path):
    _, _, last = fitted
    run = run_cli(["validate", *small(tmp_path), "--ckpt_path", str(last)])
    loaded = Seq2SeqTransformer.load_from_checkpoint(last)
    logged = float(run.trainer.callback_metrics["val_loss"])
    assert math.isclose(logged, first_val_batch_loss(loaded, run.datamodule), rel_tol=1e-5)
    assert {"val_ppl", "val_bleu", "val_rougeL"} <= set(run.trainer.callback_metrics)


def test_test_from_checkpoint(fitted, tmp_path):
    _, _, last = fitted
    run = run_cli(["test", *small(tmp_path), "--ckpt_path", str(last)])
    assert {"test_loss", "test_ppl", "test_bleu", "test_rougeL"} <= set(run.trainer.callback_metrics)
    # The checkpoint's weights were restored into the model before testing.
    loaded = Seq2SeqTransformer.load_from_checkpoint(last)
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(run.model.state_dict()[name], tensor), name


def test_predict_from_checkpoint(fitted, tmp_path):
    _, _, last = fitted
    run = run_cli(["predict", *small(tmp_path), "--ckpt_path", str(last)])
    loaded = Seq2SeqTransformer.load_from_checkpoint(last)
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(run.model.state_dict()[name], tensor), name
    # What predict_step returns for the first batch of the predict split: the loaded model's translation.
    batch = next(iter(run.datamodule.predict_dataloader()))
    assert torch.equal(run.model.predict_step(batch, 0), loaded.generate(batch["src"]))


def test_bad_subcommand_argument_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        run_cli(["fit", *small(tmp_path), "--model.init_args.no_such_argument", "3"])
    assert "no_such_argument" in capsys.readouterr().err


def test_console_script_is_installed():
    scripts = importlib.metadata.entry_points(group="console_scripts")
    assert any(entry.name == "llmkit" and entry.value == "llmkit.cli:main" for entry in scripts.select(name="llmkit"))
    assert shutil.which("llmkit", path=str(Path(sys.executable).parent)) is not None


def test_help_runs_as_a_subprocess():
    result = subprocess.run([sys.executable, "-m", "llmkit.cli", "--help"], capture_output=True, text=True,
                            timeout=300, check=False)
    assert result.returncode == 0, result.stderr
    for subcommand in ("fit", "validate", "test", "predict"):
        assert subcommand in result.stdout


VAE_CONFIG = CONFIG.parent / "vae_digits.yaml"


@pytest.mark.parametrize("flatten", [True, False])
def test_vae_config_fits_and_tests_with_the_data_modules_input_shape(tmp_path, flatten):
    architecture = "mlp" if flatten else "conv"
    args = [
        "--config", str(VAE_CONFIG), "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "3",
        "--trainer.limit_val_batches", "1", "--trainer.default_root_dir", str(tmp_path),
        "--trainer.enable_progress_bar", "false", "--data.init_args.flatten", str(flatten).lower(),
        "--model.init_args.architecture", architecture, "--model.init_args.hidden_dims", "[8, 16]",
        "--model.init_args.test_nll_samples", "5",
    ]
    run = run_cli(["fit", *args])
    assert isinstance(run.model, VAE) and isinstance(run.datamodule, DigitsDataModule)
    assert tuple(run.model.hparams.input_shape) == run.datamodule.input_shape == ((64,) if flatten else (1, 8, 8))
    (last,) = sorted(tmp_path.rglob("last.ckpt"))
    tested = run_cli(["test", *args, "--ckpt_path", str(last)])
    assert "test_nll" in tested.trainer.callback_metrics


def test_lm_config_fits_then_tests_from_its_checkpoint_with_the_data_modules_vocabulary(tmp_path):
    config = CONFIG.parent / "lm.yaml"
    tiny = [
        "--config", str(config), "--trainer.default_root_dir", str(tmp_path), "--trainer.accelerator", ACCELERATOR,
        "--trainer.enable_progress_bar", "false", "--trainer.limit_val_batches", "1",
        "--data.init_args.tokenizer_dir", str(tmp_path), "--data.init_args.vocab_size", "300",
        "--data.init_args.block_size", "16", "--data.init_args.batch_size", "4",
        "--model.init_args.d_model", "16", "--model.init_args.num_layers", "1", "--model.init_args.dim_feedforward", "32",
    ]
    run = run_cli(["fit", *tiny, "--trainer.max_steps", "2", "--trainer.val_check_interval", "2"])
    model, data = run.model, run.datamodule
    assert isinstance(model, CausalLMTransformer) and isinstance(data, PythonDocsDataModule)
    # The link: the model's vocabulary is the trained tokenizer's, and the tokenizer is beside the checkpoints.
    assert model.hparams.vocab_size == data.vocab_size == model.embed.num_embeddings
    assert (tmp_path / "tokenizer.json").exists()
    (last,) = sorted(tmp_path.rglob("last.ckpt"))
    tested = run_cli(["test", *tiny, "--ckpt_path", str(last), "--trainer.limit_test_batches", "2"])
    loaded = CausalLMTransformer.load_from_checkpoint(last).eval()
    # test_ppl equals the loaded model's perplexity over the two test batches, by hand.
    blocks = data.blocks("test")[:8]
    with torch.no_grad():
        logits = loaded(blocks[:, :-1])
    expected = math.exp(float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]).double(), blocks[:, 1:].reshape(-1))))
    assert math.isclose(float(tested.trainer.callback_metrics["test_ppl"]), expected, rel_tol=1e-5)
