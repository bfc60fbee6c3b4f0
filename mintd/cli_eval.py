"""`mintd eval`: score many revisions on an eval set through a running server, with a progress bar and a
final table (best revisions, failures, the population's score next to the best single and the mean)."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

if TYPE_CHECKING:
    from mintd.eval.client import EvalReport

console = Console()
err_console = Console(stderr=True)
BUILTIN = ("exact_match", "contains", "regex", "numeric")

HELP = (
    "Evaluate many revisions on an eval set in shared batches on a running server, and record each "
    "revision's score as a catalog evaluation (so `mintd adapters promote --gate` can use it).\n\n"
    'EVAL_SET is JSONL, one item per line: {"id": ..., "prompt": "..." or "messages": [...], '
    '"expected": ...}. Revisions: REFS, --adapter (all its live revisions) and/or --prefix (each '
    "matching adapter's newest revision, or its --alias). Sampling is greedy unless --temperature is "
    "given. --scorer is exact_match, contains, regex (--pattern), numeric (--tolerance, "
    "--rel-tolerance) or MODULE:FUNCTION, a Python function(output, item) -> bool | float imported from "
    "the current directory or the Python path and run here. Prints the best revisions, failures, and "
    "the population's majority-vote score next to the best single revision and the mean."
)


def eval_cmd(
    eval_set: Annotated[Path, typer.Argument(help="The eval set (JSONL).", exists=True, dir_okay=False)],
    suite: Annotated[str, typer.Option(help="The evaluation suite the scores are recorded under.")],
    refs: Annotated[list[str] | None, typer.Argument(help="Revisions: name, name@N, name:alias, ...")] = None,
    adapter: Annotated[str | None, typer.Option(help="Every live revision of this adapter.")] = None,
    prefix: Annotated[str | None, typer.Option(help="Adapters whose names start with this.")] = None,
    alias: Annotated[
        str | None, typer.Option(help="With --prefix: each adapter's revision under it.")
    ] = None,
    limit: Annotated[int, typer.Option(min=1, max=10_000, help="Refuse sets of more revisions.")] = 10_000,
    scorer: Annotated[
        str, typer.Option(help="exact_match | contains | regex | numeric | MODULE:FUNCTION")
    ] = ("exact_match"),
    pattern: Annotated[str | None, typer.Option(help="regex: the answer's pattern (first group).")] = None,
    tolerance: Annotated[float, typer.Option(min=0, help="numeric: absolute tolerance.")] = 0.0,
    rel_tolerance: Annotated[float, typer.Option(min=0, help="numeric: relative tolerance.")] = 0.0,
    case_sensitive: Annotated[bool, typer.Option(help="Compare answers case-sensitively.")] = False,
    metric: Annotated[str | None, typer.Option(help="Metric name; default: the scorer's name.")] = None,
    max_tokens: Annotated[int, typer.Option(min=1, help="Tokens to sample per prompt.")] = 128,
    temperature: Annotated[float, typer.Option(min=0, help="0 is greedy.")] = 0.0,
    top_p: Annotated[float, typer.Option(min=0, max=1, help="Nucleus sampling.")] = 1.0,
    top_k: Annotated[int, typer.Option(help="-1: no limit.")] = -1,
    seed: Annotated[int | None, typer.Option(help="Sampling seed (with a temperature).")] = None,
    stop: Annotated[list[str] | None, typer.Option(help="Stop string; repeat for several.")] = None,
    record: Annotated[bool, typer.Option(help="Record each revision's score in the catalog.")] = True,
    results: Annotated[Path | None, typer.Option(help="Write every row (JSONL) to this file.")] = None,
    top: Annotated[int, typer.Option(min=1, help="Revisions shown in the table.")] = 10,
    url: Annotated[str, typer.Option(help="The server's base URL.")] = "http://127.0.0.1:8000",
    api_key: Annotated[
        str, typer.Option(envvar="TINKER_API_KEY", help="An API key the server accepts (or TINKER_API_KEY).")
    ] = "tml-local",
) -> None:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from mintd.eval.client import EvalError, evaluate
    from mintd.eval.scorers import ScorerSpec

    revisions: dict[str, Any] = {"refs": refs or [], "limit": limit}
    revisions |= {
        k: v for k, v in (("adapter", adapter), ("prefix", prefix), ("alias", alias)) if v is not None
    }
    params = {"max_tokens": max_tokens, "temperature": temperature, "top_p": top_p, "top_k": top_k}
    params |= {k: v for k, v in (("seed", seed), ("stop", stop)) if v is not None}
    progress = Progress(
        TextColumn("[bold]sampling"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.description}"),
        TimeElapsedColumn(), console=err_console,
    )  # fmt: skip
    task = progress.add_task("", total=None)

    def show(view: dict[str, Any]) -> None:
        p = view["progress"]
        failed = f", {p['revisions_failed']} failed" if p["revisions_failed"] else ""
        note = f"revisions {p['revisions_done']}/{p['revisions_total']}{failed}"
        progress.update(task, completed=p["samples_done"], total=p["samples_total"], description=note)

    try:
        if ":" in scorer:
            sys.path.insert(0, os.getcwd())  # a scorer module next to the eval set, as `python -m` finds it
            chosen: ScorerSpec | str = scorer
        elif scorer in BUILTIN:
            chosen = ScorerSpec(
                kind=scorer,
                pattern=pattern,
                tolerance=tolerance,
                rel_tolerance=rel_tolerance,
                case_sensitive=case_sensitive,
            )
        else:
            raise ValueError(f"--scorer: {scorer!r} is none of {', '.join(BUILTIN)} and not MODULE:FUNCTION")
        with progress:
            report = evaluate(
                url,
                eval_set,
                revisions,
                suite=suite,
                scorer=chosen,
                sampling_params=params,
                metric=metric,
                record=record,
                api_key=api_key,
                on_progress=show,
            )
    except (EvalError, ValueError, OSError) as exc:
        err_console.print(f"[red]error:[/red] {escape(_message(exc))}", soft_wrap=True)
        raise typer.Exit(1) from None
    if results is not None:
        report.write_jsonl(results)
    _print(report, top, record, results)


def _message(exc: Exception) -> str:
    """One line: a pydantic error's messages, else the first line of the error."""
    from pydantic import ValidationError

    if isinstance(exc, ValidationError):
        return "; ".join(e["msg"].removeprefix("Value error, ") for e in exc.errors())
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def _print(report: EvalReport, top: int, record: bool, results: Path | None) -> None:
    run, summary = report.run, report.summary
    scored = [r for r in report.revisions if r["error"] is None]
    failed = [r for r in report.revisions if r["error"] is not None]
    eval_set = run["eval_set"]
    title = f"{run['suite']}/{run['metric']} on {eval_set['items']} items ({eval_set['fingerprint'][:19]}…)"
    table = Table(title=escape(title), title_justify="left")
    for column in ("#", "revision", "score", "n"):
        table.add_column(column, justify="left" if column == "revision" else "right")
    for rank, r in enumerate(scored[:top], start=1):
        table.add_row(str(rank), escape(r["revision"]), f"{r['score']:.4f}", str(r["n"]))
    console.print(table)
    if failed:
        errors = Table(title=f"{len(failed)} revision(s) not evaluated", title_justify="left")
        errors.add_column("revision")
        errors.add_column("error")
        for r in failed:
            errors.add_row(escape(r["revision"]), escape(r["error"]))
        console.print(errors)
    population, best = summary.get("population"), summary.get("best")
    if population and population["score"] is not None and best is not None:
        pop = Table(
            title=f"population of {summary['scored']} revision(s), majority vote", title_justify="left"
        )
        for column in ("population", "best single", "mean", "ties", "abstained"):
            pop.add_column(column, justify="right")
        pop.add_row(
            f"{population['score']:.4f}",
            f"{best['score']:.4f} ({escape(best['revision'])})",
            f"{summary['mean']:.4f}",
            f"{population['ties']}/{population['prompts']}",
            str(population["abstained"]),
        )
        console.print(pop)
    status = run["status"]
    if status != "done":
        console.print(f"[yellow]run {run['run_id']} {status}[/yellow]")
    if record and scored:
        console.print(
            f"recorded {len(scored)} evaluation(s) as {escape(run['suite'])}/{escape(run['metric'])}"
        )
    if results is not None:
        console.print(f"results: {escape(str(results))}")
