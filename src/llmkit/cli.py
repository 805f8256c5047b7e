"""The ``llmkit`` command: LightningCLI over llmkit's modules and data modules.

    llmkit fit --config examples/configs/translate.yaml
    llmkit test --config examples/configs/translate.yaml --ckpt_path outputs/translate/lightning_logs/.../last.ckpt
    llmkit fit --config examples/configs/vae_digits.yaml
    llmkit fit --config examples/configs/lm.yaml

The model and the data module are chosen by ``class_path`` (LightningCLI's subclass mode), so
any LightningModule and LightningDataModule can be named. What the data module knows is handed
to the model, so a config need not repeat it: the vocabulary sizes (``data.src_vocab_size`` ->
``model.init_args.src_vocab_size``, the target side likewise, and a language model's
``data.vocab_size`` -> ``model.init_args.vocab_size``) and the example shape
(``data.input_shape`` -> ``model.init_args.input_shape``). A link applies where both sides have
the attribute.
"""

from __future__ import annotations

from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI


class LLMKitCLI(LightningCLI):
    """LightningCLI that hands the data module's vocabulary sizes and input shape to the model."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        """Link what the data module knows once it is built to the model's arguments."""
        for name in ("src_vocab_size", "tgt_vocab_size", "vocab_size", "input_shape"):
            parser.link_arguments(f"data.{name}", f"model.init_args.{name}", apply_on="instantiate")


def cli(args: list[str] | None = None, run: bool = True) -> LLMKitCLI:
    """Build (and by default run) the ``llmkit`` command.

    Args:
        args: the command line after ``llmkit`` (``None``: ``sys.argv``).
        run: run the subcommand; ``False`` only builds the model, data and trainer.
    """
    return LLMKitCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=args,
        run=run,
        save_config_kwargs={"overwrite": True},
    )


def main() -> None:
    """The ``llmkit`` console script."""
    cli()


if __name__ == "__main__":  # pragma: no cover
    main()
