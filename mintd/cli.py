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

from mintd.cli_adapters import adapters_app
from mintd.cli_eval import HELP as EVAL_HELP
from mintd.cli_eval import eval_cmd

app = typer.Typer(
    name="mintd",
    help=(
        "mintd: many LoRA adapter policies trained and sampled over a few resident base models.\n\n"
        "Train and sample adapters through the Tinker API (the official tinker and mint SDKs work "
        "unmodified against `mintd serve`), and keep every save as an immutable revision in a catalog "
        "with provenance, evaluations and aliases. Start with `mintd demo`."
    ),
    no_args_is_help=True,
    add_completion=False,
)
app.add_typer(adapters_app, name="adapters")
app.command("eval", help=EVAL_HELP)(eval_cmd)
console = Console()


class Arch(StrEnum):
    """Architectures `make-tiny-model` can build."""

    qwen3 = "qwen3"
    llama = "llama"
    qwen3_moe = "qwen3-moe"
    deepseek_v3 = "deepseek-v3"
    gpt_oss = "gpt-oss"
    qwen3_next = "qwen3-next"


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
        typer.Option(
            help="Architecture: qwen3, llama (dense); qwen3-moe (4 experts, 2 active); deepseek-v3 (MLA, "
            "MoE with a shared expert, layer 0 dense); gpt-oss (attention sinks, sliding windows, MoE with "
            "biases); qwen3-next (Gated DeltaNet linear attention between full attention, MoE)."
        ),
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


@app.command(
    help=(
        "The main job: train three policies at once through the official tinker SDK.\n\n"
        "Builds a tiny base model if absent, starts an in-process mintd server, and runs a supervised "
        "then an RL phase (importance sampling, group-relative advantages) for three LoRA policies "
        "concurrently, each with its own goal and reward. Prints progress, then each policy's reward "
        "before and after."
    )
)
def demo(
    data_dir: Annotated[Path, typer.Option(help="Where the demo keeps its model and server state.")] = Path(
        "data/demo"
    ),
    sl_steps: Annotated[int, typer.Option(min=1, help="Supervised steps per policy.")] = 30,
    rl_steps: Annotated[int, typer.Option(min=1, help="RL iterations per policy.")] = 12,
) -> None:
    from mintd.demo import run_demo

    outcomes = run_demo(data_dir, sl_steps, rl_steps, console)
    if any(o.error for _, o in outcomes):
        raise typer.Exit(1)


def _parse_models(items: list[str]) -> dict[str, Path]:
    models = {}
    for item in items:
        name, sep, folder = item.partition("=")
        if not sep or not name or not folder:
            raise typer.BadParameter(f"{item!r} must be NAME=DIR", param_hint="--model")
        if not (Path(folder) / "config.json").is_file():
            raise typer.BadParameter(f"{folder} is not a Hugging Face model folder", param_hint="--model")
        models[name] = Path(folder)
    return models


@app.command(
    help=(
        "Serve the Tinker training and sampling API for one or more base models.\n\n"
        "One process: the Tinker API under /api/v1, signed checkpoint downloads, the catalog REST API "
        "under /api/v1/catalog, and its OpenAPI schema at /docs. State (catalog.db, adapter blobs, run "
        "records) lives under --data-dir. Point the official SDK at it with "
        "tinker.ServiceClient(base_url='http://HOST:PORT') (or TINKER_BASE_URL). Limits and timeouts "
        "(body size, sessions per owner, idle-session timeout, ...) are set by environment as "
        "MINTD_<NAME>; the README lists them."
    )
)
def serve(
    model: Annotated[
        list[str],
        typer.Option(help="A base model as NAME=DIR (a local Hugging Face folder); repeat for several."),
    ],
    host: Annotated[
        str, typer.Option(help="Address to bind; beyond loopback needs --api-key.")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    data_dir: Annotated[Path, typer.Option(help="Where checkpoints and server state are kept.")] = Path(
        "data"
    ),
    api_key: Annotated[
        list[str] | None,
        typer.Option(
            help="Accepted key, as KEY or OWNER=KEY; repeat for several. None: any key, loopback only."
        ),
    ] = None,
    catalog_url: Annotated[
        str | None,
        typer.Option(
            help="The catalog database as a SQLAlchemy URL, e.g. postgresql+psycopg://USER@HOST/DB to share "
            "it between replicas. Default: sqlite under --data-dir (or MINTD_CATALOG_URL).",
            show_default=False,
        ),
    ] = None,
    blob_url: Annotated[
        str | None,
        typer.Option(
            help="Where adapter bytes live: a local folder, or s3://BUCKET/PREFIX on any S3-compatible store "
            "(endpoint and credentials from AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_PROFILE, ...). "
            "Default: DATA_DIR/blobs (or MINTD_BLOB_URL).",
            show_default=False,
        ),
    ] = None,
    blob_cache_budget: Annotated[
        str | None,
        typer.Option(
            help="With s3:// blobs: bytes the local disk cache under DATA_DIR/blob-cache may hold, "
            "e.g. 20GiB (the default).",
            show_default=False,
        ),
    ] = None,
    adapter_device_budget: Annotated[
        str | None,
        typer.Option(
            help="Bytes adapters may occupy on each base model's device, e.g. 512MiB or 4GiB (the default): "
            "saved adapters being sampled, snapshots and training runs; beyond it the least recently used "
            "ones not in use are evicted, idle training runs parked in host memory.",
            show_default=False,
        ),
    ] = None,
    adapter_host_budget: Annotated[
        str | None,
        typer.Option(
            help="Bytes of verified adapter blobs kept in host memory per base model, e.g. 1GiB (default "
            "8GiB): a reload after a device eviction then neither reads the disk nor re-hashes.",
            show_default=False,
        ),
    ] = None,
    replica_id: Annotated[
        str | None,
        typer.Option(
            help="This server's name among replicas sharing one catalog; a training run is held by the "
            "replica that created it. Default: HOSTNAME:PORT.",
            show_default=False,
        ),
    ] = None,
    public_url: Annotated[
        str | None,
        typer.Option(
            help="The URL clients reach this server at (e.g. https://mintd.example.com behind a proxy that "
            "rewrites Host): checkpoint download links, and the URL other replicas name in a 409 for a run "
            "held here, are built from it. Default: links from the request's Host; http://HOST:PORT.",
            show_default=False,
        ),
    ] = None,
) -> None:
    import torch
    import uvicorn
    from pydantic import ValidationError

    from mintd.config import BlobSettings, CatalogSettings, ServeSettings
    from mintd.server import build_app, freeze_startup_heap

    given = {
        "replica_id": replica_id,
        "public_url": public_url,
        "adapter_device_budget": adapter_device_budget,
        "adapter_host_budget": adapter_host_budget,
    }
    blob_given = {"blob_url": blob_url, "blob_cache_budget": blob_cache_budget}
    try:
        settings = ServeSettings(
            host=host, port=port, data_dir=data_dir, **{k: v for k, v in given.items() if v is not None}
        )
        blobs = BlobSettings(**{k: v for k, v in blob_given.items() if v is not None})
        catalog = CatalogSettings(**({"catalog_url": catalog_url} if catalog_url else {}))
    except ValidationError as exc:
        err = exc.errors()[0]
        raise typer.BadParameter(f"--{str(err['loc'][0]).replace('_', '-')}: {err['msg']}") from None
    if settings.intra_op_threads:
        torch.set_num_threads(settings.intra_op_threads)
    try:
        models = _parse_models(model)
        app_, _ = build_app(models, settings, api_key or [], catalog_settings=catalog, blob_settings=blobs)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    freeze_startup_heap()
    console.print(f"mintd serving {', '.join(models)} on http://{host}:{port}")
    uvicorn.run(app_, host=host, port=port, log_level="info")


@app.command(
    help=(
        "Show a running server's adapter residency, per base model: budgets and bytes per tier (device, "
        "host, parked runs), resident adapters, snapshots and runs, hits, misses, evictions, parks, loads "
        "queued and in flight, and load times (GET /api/v1/residency)."
    )
)
def residency(
    url: Annotated[str, typer.Option(help="The server's base URL.")] = "http://127.0.0.1:8000",
    api_key: Annotated[
        str, typer.Option(envvar="TINKER_API_KEY", help="An API key the server accepts (or TINKER_API_KEY).")
    ] = "tml-local",
) -> None:
    import httpx
    from rich.table import Table

    try:
        reply = httpx.get(f"{url.rstrip('/')}/api/v1/residency", headers={"X-API-Key": api_key}, timeout=10)
    except httpx.HTTPError as exc:
        raise typer.BadParameter(f"cannot reach {url}: {exc}", param_hint="--url") from None
    if reply.status_code != 200:
        detail = reply.json().get("detail") if reply.content else reply.reason_phrase
        raise typer.BadParameter(f"{url} answered {reply.status_code}: {detail}", param_hint="--url")
    models = reply.json()["models"]
    table = Table(title=f"adapter residency at {url}")
    table.add_column("")
    for name in models:
        table.add_column(name, justify="right")
    for stat in next(iter(models.values()), {}):
        table.add_row(stat.replace("_", " "), *(_cell(m[stat]) for m in models.values()))
    console.print(table)


def _cell(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:,.1f}" if isinstance(value, float) else f"{value:,}"


if __name__ == "__main__":
    app()
