"""`mintd adapters ...`: the adapter catalog from the command line, working directly on a data dir.

Every command opens the catalog (and, where bytes are involved, the blob store) under --data-dir, acting
as --owner (`local` by default: the owner a server without API keys uses). Errors print one red line and
exit 1; heavy imports (torch, PEFT, SQLAlchemy) happen inside the commands.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

if TYPE_CHECKING:
    from mintd.catalog import Catalog, Gate, Revision
    from mintd.store.blobs import Blobs

adapters_app = typer.Typer(
    name="adapters",
    help=(
        "Browse and manage the adapter catalog: revisions, aliases, evaluations, import/export and "
        "garbage collection.\n\nWorks directly on a data dir (the server's --data-dir); run it while the "
        "server runs or not."
    ),
    no_args_is_help=True,
    add_completion=False,
)
eval_app = typer.Typer(help="Record and list evaluations of revisions.", no_args_is_help=True)
adapters_app.add_typer(eval_app, name="eval")

console = Console()
err_console = Console(stderr=True)

DataDir = Annotated[
    Path, typer.Option("--data-dir", help="The data dir holding catalog.db and blobs/ (the server's).")
]
Owner = Annotated[
    str,
    typer.Option("--owner", help="Act as this owner; 'local' is the owner of a server run without API keys."),
]
_GATE = re.compile(r"^([^:]+):(.+?)>=(.+)$")


@contextmanager
def _errors() -> Iterator[None]:
    """Expected failures (bad input, missing objects, unreadable files) -> one red line, exit 1."""
    try:
        yield
    except (ValueError, LookupError, OSError) as exc:
        err_console.print(f"[red]error:[/red] {escape(str(exc) or type(exc).__name__)}", soft_wrap=True)
        raise typer.Exit(1) from None


def _catalog(data_dir: Path, create: bool = False) -> Catalog:
    """The catalog under `data_dir`; only `import` may start a new data dir (a typo should not)."""
    from mintd.catalog import Catalog, CatalogDB
    from mintd.config import CatalogSettings

    if not create and not Path(data_dir).is_dir():
        raise ValueError(f"--data-dir: {data_dir} does not exist")

    return Catalog(CatalogDB.from_settings(CatalogSettings(), data_dir))


def _blobs(data_dir: Path) -> Blobs:
    """The server's blob store: DATA_DIR/blobs, or MINTD_BLOB_URL (a folder or s3://BUCKET/PREFIX)."""
    from mintd.config import BlobSettings
    from mintd.store.blobs import open_blobs

    settings = BlobSettings()
    return open_blobs(settings.blob_url, data_dir, int(settings.blob_cache_budget))


def _when(ts: float | None) -> str:
    if ts is None:
        return "-"
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S")


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _revision_table(title: str, revisions: list[Revision]) -> Table:
    table = Table(title=title, title_justify="left")
    table.add_column("ref", no_wrap=True)
    for col in ("kind", "created", "size", "hash", "base model", "run / step"):
        table.add_column(col)
    for r in revisions:
        p = r.provenance
        run = (
            "-"
            if p.training_run_id is None
            else f"{p.training_run_id} / {p.step if p.step is not None else '-'}"
        )
        state = " (deleted)" if r.deleted_at is not None else ""
        table.add_row(
            escape(r.ref) + state,
            r.kind,
            _when(r.created_at),
            _size(r.size_bytes),
            r.content_hash[:12],
            escape(p.base_model or p.base_fingerprint[:12]),
            escape(run),
        )
    return table


def parse_gate(text: str) -> Gate:
    """`suite:metric>=threshold` -> Gate."""
    from mintd.catalog import Gate

    m = _GATE.match(text)
    if m is None:
        raise ValueError(f"--gate: {text!r} must look like suite:metric>=threshold")
    try:
        threshold = float(m.group(3))
    except ValueError:
        raise ValueError(f"--gate: threshold {m.group(3)!r} is not a number") from None
    return Gate(m.group(1).strip(), m.group(2).strip(), threshold)


# browsing ------------------------------------------------------------------------------------------


@adapters_app.command("list", help="List the owner's adapters by name.")
def list_cmd(
    prefix: Annotated[str | None, typer.Option(help="Only names starting with this.")] = None,
    limit: Annotated[int, typer.Option(min=1, max=10_000, help="At most this many.")] = 100,
    data_dir: DataDir = Path("data"),
    owner: Owner = "local",
) -> None:
    with _errors():
        adapters = _catalog(data_dir).list_adapters(owner, prefix=prefix, limit=limit)
    table = Table(title=f"adapters of {escape(owner)}", title_justify="left")
    table.add_column("name", no_wrap=True)
    for col in ("revisions", "created", "id"):
        table.add_column(col)
    for a in adapters:
        table.add_row(escape(a.name), str(a.last_number), _when(a.created_at), a.id)
    console.print(table)
    if not adapters:
        console.print("no adapters")


@adapters_app.command("show", help="One adapter: its live revisions (newest first) and its aliases.")
def show_cmd(
    name: Annotated[str, typer.Argument(help="Adapter name.")],
    data_dir: DataDir = Path("data"),
    owner: Owner = "local",
) -> None:
    with _errors():
        view = _catalog(data_dir).show(owner, name)
    a = view.adapter
    console.print(
        f"[bold]{escape(a.owner)}/{escape(a.name)}[/bold]  id {a.id}  created {_when(a.created_at)}"
    )
    aliases = Table(title="aliases", title_justify="left")
    for col in ("alias", "revision", "updated"):
        aliases.add_column(col)
    for al in view.aliases:
        aliases.add_row(escape(al.name), f"@{al.number}", _when(al.updated_at))
    console.print(aliases)
    console.print(_revision_table("revisions", list(view.revisions)))


@adapters_app.command("log", help="An adapter's live revisions, newest first.")
def log_cmd(
    name: Annotated[str, typer.Argument(help="Adapter name.")],
    limit: Annotated[int, typer.Option(min=1, max=10_000, help="At most this many.")] = 100,
    data_dir: DataDir = Path("data"),
    owner: Owner = "local",
) -> None:
    with _errors():
        revisions = _catalog(data_dir).log(owner, name, limit=limit)
    console.print(_revision_table(f"log of {escape(name)}", revisions))


@adapters_app.command("lineage", help="A revision and its ancestors through their parents, nearest first.")
def lineage_cmd(
    ref: Annotated[str, typer.Argument(help="A ref: name, name@N, name:alias or tinker://...")],
    data_dir: DataDir = Path("data"),
    owner: Owner = "local",
) -> None:
    with _errors():
        cat = _catalog(data_dir)
        start = cat.resolve(owner, ref)
        ancestors = cat.lineage(owner, ref)
    console.print(_revision_table(f"lineage of {escape(start.ref)}", [start, *ancestors]))


# evaluations ---------------------------------------------------------------------------------------


@eval_app.command("add", help="Record an evaluation result for a revision.")
def eval_add_cmd(
    ref: Annotated[str, typer.Argument(help="The evaluated revision: name, name@N, name:alias, ...")],
    suite: Annotated[str, typer.Option(help="Evaluation suite, e.g. 'gsm8k'.")],
    metric: Annotated[str, typer.Option(help="Metric name, e.g. 'accuracy'.")],
    value: Annotated[float, typer.Option(help="The metric's value.")],
    dataset_fingerprint: Annotated[
        str | None, typer.Option(help="Identifies the exact evaluation data.")
    ] = None,
    evaluator: Annotated[str | None, typer.Option(help="Who or what ran the evaluation.")] = None,
    data_dir: DataDir = Path("data"),
    owner: Owner = "local",
) -> None:
    with _errors():
        e = _catalog(data_dir).add_evaluation(
            owner, ref, suite, metric, value, dataset_fingerprint=dataset_fingerprint, evaluator=evaluator
        )
    console.print(
        f"[green]recorded[/green] {escape(e.suite)}/{escape(e.metric)} = {e.value} for {escape(e.revision)}"
    )


@eval_app.command("list", help="Evaluations of one revision.")
def eval_list_cmd(
    ref: Annotated[str, typer.Argument(help="A revision: name, name@N, name:alias, ...")],
    data_dir: DataDir = Path("data"),
    owner: Owner = "local",
) -> None:
    with _errors():
        found = _catalog(data_dir).evaluations(owner, ref)
    table = Table(title=f"evaluations of {escape(ref)}", title_justify="left")
    for col in ("revision", "suite", "metric", "value", "evaluator", "when"):
        table.add_column(col)
    for e in found:
        table.add_row(
            escape(e.revision),
            escape(e.suite),
            escape(e.metric),
            f"{e.value:g}",
            escape(e.evaluator or "-"),
            _when(e.created_at),
        )
    console.print(table)


# aliases -------------------------------------------------------------------------------------------


@adapters_app.command("promote", help="Point NAME:ALIAS at a revision (created on first promote).")
def promote_cmd(
    name: Annotated[str, typer.Argument(help="Adapter name.")],
    alias: Annotated[str, typer.Argument(help="Alias, e.g. 'prod'.")],
    ref: Annotated[str, typer.Argument(help="Target revision: 3, @3, :canary or a full ref.")],
    gate: Annotated[
        str | None,
        typer.Option(help="Refuse unless the target has an evaluation suite:metric>=threshold."),
    ] = None,
    data_dir: DataDir = Path("data"),
    owner: Owner = "local",
) -> None:
    with _errors():
        parsed = None if gate is None else parse_gate(gate)
        a = _catalog(data_dir).promote(owner, name, alias, ref, gate=parsed)
    console.print(f"[green]{escape(a.adapter)}:{escape(a.name)}[/green] -> @{a.number}")


@adapters_app.command("rollback", help="Return NAME:ALIAS to its target before its newest promote.")
def rollback_cmd(
    name: Annotated[str, typer.Argument(help="Adapter name.")],
    alias: Annotated[str, typer.Argument(help="Alias to roll back.")],
    data_dir: DataDir = Path("data"),
    owner: Owner = "local",
) -> None:
    with _errors():
        a = _catalog(data_dir).rollback(owner, name, alias)
    console.print(f"[green]{escape(a.adapter)}:{escape(a.name)}[/green] -> @{a.number}")


# bytes: import, export, gc -------------------------------------------------------------------------


@adapters_app.command(
    "import",
    help=(
        "Import a Hugging Face PEFT LoRA folder as the next revision of NAME (kind 'external').\n\n"
        "The base model folder is only hashed (its fingerprint is recorded), not loaded."
    ),
)
def import_cmd(
    peft_dir: Annotated[Path, typer.Argument(help="PEFT folder (adapter_config.json + safetensors).")],
    name: Annotated[str, typer.Option(help="Adapter to add the revision to (created if missing).")],
    base_model_dir: Annotated[Path, typer.Option(help="The base model folder the adapter was trained on.")],
    data_dir: DataDir = Path("data"),
    owner: Owner = "local",
) -> None:
    with _errors():
        from mintd.catalog import Provenance, RevisionKind
        from mintd.engine.model import fingerprint
        from mintd.store.packed import pack
        from mintd.store.peft import adapted, load_peft_folder

        spec, tensors = load_peft_folder(peft_dir)
        if not (base_model_dir / "config.json").is_file():
            raise ValueError(f"{base_model_dir}: not a Hugging Face model folder (no config.json)")
        base_fp = fingerprint(base_model_dir)
        data = pack(spec, tensors, base_fp)
        cat = _catalog(data_dir, create=True)
        sha = _blobs(data_dir).put(data)
        rev = cat.register_revision(
            owner,
            name,
            sha,
            RevisionKind.EXTERNAL,
            provenance=Provenance(
                base_fingerprint=base_fp,
                base_model=base_model_dir.resolve().name,
                lora_config={**spec.model_dump(mode="json"), "adapted": adapted(tensors)},
            ),
            size_bytes=len(data),
            metadata={"imported_from": str(peft_dir.resolve())},
        )
    console.print(f"[green]imported[/green] {escape(rev.ref)}  ({_size(len(data))}, {sha[:12]})")


@adapters_app.command("export", help="Write a revision's weights as a Hugging Face PEFT folder.")
def export_cmd(
    ref: Annotated[str, typer.Argument(help="The revision: name, name@N, name:alias, ...")],
    out_dir: Annotated[Path, typer.Argument(help="Folder to write (created if missing).")],
    data_dir: DataDir = Path("data"),
    owner: Owner = "local",
) -> None:
    with _errors():
        from mintd.store.packed import packed_to_peft_folder, read_packed

        rev = _catalog(data_dir).resolve(owner, ref)
        packed = read_packed(_blobs(data_dir).read(rev.content_hash))
        model_type = rev.provenance.lora_config.get("base_model_type")
        packed_to_peft_folder(packed, out_dir, rev.provenance.base_model or "", model_type)
    console.print(f"[green]exported[/green] {escape(rev.ref)} to {escape(str(out_dir))}")


@adapters_app.command(
    "interpolate",
    help=(
        "Write Σ cᵢ·Δᵢ of revisions of one base model as a new sampler revision of NAME (model soups).\n\n"
        "Exact by default (rank Σ rᵢ, any signs, ranks and target sets); --rank keeps the best rank-k "
        "approximation (SVD) and reports its relative error. The output's lineage names every source."
    ),
)
def interpolate_cmd(
    refs: Annotated[list[str], typer.Argument(help="Source revisions: name, name@N, tinker:// path, ...")],
    coef: Annotated[list[float], typer.Option("--coef", help="One coefficient per source, in order.")],
    name: Annotated[str, typer.Option(help="Adapter to write the result to (created if missing).")],
    rank: Annotated[int | None, typer.Option(min=1, max=1024, help="Compress to this rank by SVD.")] = None,
    data_dir: DataDir = Path("data"),
    owner: Owner = "local",
) -> None:
    with _errors():
        from mintd.service.checkpoints import Checkpoints
        from mintd.service.interpolate import interpolate, output_adapter

        checkpoints = Checkpoints(_catalog(data_dir), _blobs(data_dir))
        done = interpolate(checkpoints, owner, refs, coef, output_adapter(name), rank)
    error = "" if done.truncation_error is None else f", truncation error {done.truncation_error:.3g}"
    console.print(f"[green]interpolated[/green] {escape(done.revision.ref)}  (rank {done.rank}{error})")


@adapters_app.command(
    "gc",
    help=(
        "Expire revisions past their TTL, then delete blobs no live revision uses (all owners).\n\n"
        "Blobs younger than --min-age-s are kept: a save writes its blob before registering it. The blob "
        "store is the server's: DATA_DIR/blobs, or MINTD_BLOB_URL (with MINTD_CATALOG_URL for a shared "
        "catalog); several collectors may run at once."
    ),
)
def gc_cmd(
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only report what would be deleted.")] = False,
    min_age_s: Annotated[
        float, typer.Option(min=0, help="Keep unreferenced blobs younger than this many seconds.")
    ] = 3600.0,
    data_dir: DataDir = Path("data"),
) -> None:
    with _errors():
        cat = _catalog(data_dir)
        blobs = _blobs(data_dir)
        expired = 0 if dry_run else cat.expire()
        live = cat.referenced_hashes()
        # Each deletion is re-checked under the catalog's blob lock, so other replicas' saves are safe.
        doomed = blobs.stale(live, min_age_s) if dry_run else blobs.gc(live, min_age_s, claim=cat.claim_blob)
    verb = "would delete" if dry_run else "deleted"
    if not dry_run:
        console.print(f"expired {expired} revision(s)")
    console.print(f"{verb} {len(doomed)} blob(s)")
    for sha in doomed:
        console.print(f"  {sha}")
