"""The `mintd` command line.

Heavy imports (torch, transformers) happen inside the commands that need them, so
`mintd --help` stays instant.
"""

from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

app = typer.Typer(
    name="mintd",
    help=(
        "mintd: many LoRA adapter policies trained and served over a few resident base models.\n\n"
        "Train adapters through a Tinker-compatible API, serve them through an OpenAI-compatible "
        "API, and keep them in a catalog, all sharing a small set of base models kept in memory."
    ),
    no_args_is_help=True,
    add_completion=False,
)
console = Console()


class Arch(StrEnum):
    """Architectures `make-tiny-model` can build."""

    qwen3 = "qwen3"
    llama = "llama"
    qwen3_moe = "qwen3-moe"


class Size(StrEnum):
    """Size presets `make-tiny-model` can build."""

    test = "test"
    small = "small"
    base = "base"


@app.command(
    "make-tiny-model",
    help=(
        "Build a small random Hugging Face model folder, offline, for tests and demos.\n\n"
        "It holds config.json, model.safetensors, generation_config.json and a byte-level BPE tokenizer "
        "with a Qwen-style chat template, and loads with AutoModelForCausalLM and AutoTokenizer like any "
        "downloaded base model."
    ),
)
def make_tiny_model_cmd(
    out_dir: Annotated[
        Path,
        typer.Argument(
            help="Folder to write the model into (created if missing; existing model files are replaced).",
            metavar="DIR",
            file_okay=False,
        ),
    ],
    arch: Annotated[
        Arch,
        typer.Option(help="Architecture: qwen3 (dense), llama (dense) or qwen3-moe (4 experts, 2 active)."),
    ] = Arch.qwen3,
    seed: Annotated[
        int,
        typer.Option(help="Seed for the random weights; the same arch, size and seed give identical files."),
    ] = 0,
    size: Annotated[
        Size,
        typer.Option(
            help="Preset: test (a few 100k parameters, for unit tests), small (20M+) or base (100M+, for "
            "benchmarks)."
        ),
    ] = Size.test,
) -> None:
    from transformers import AutoConfig

    from mintd.engine.tiny import count_parameters, make_tiny_model

    path = make_tiny_model(out_dir, arch=arch.value, seed=seed, size=size.value)
    params = count_parameters(AutoConfig.from_pretrained(path))
    console.print(
        f"[green]wrote[/green] {escape(str(path))}  ({arch.value}, size {size.value}, {params:,} parameters)",
        soft_wrap=True,
    )


@app.command()
def demo() -> None:
    """Placeholder: the end-to-end demo arrives with the service. For now it only says so and exits 0."""
    console.print("The mintd demo arrives with the training and serving service; nothing to run yet.")


if __name__ == "__main__":
    app()
