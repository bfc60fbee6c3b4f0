"""`mintd eval` against a live server: the final table and population summary, JSONL results, catalog
records under the suite, a Python scorer run client-side, and clear one-line errors."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mintd.cli import app
from mintd.eval import parse_items
from mintd.eval.client import evaluate
from mintd.service.tinker import TinkerService
from tests.api.conftest import start_server
from tests.populations import save_population

runner = CliRunner()
PROMPTS = ["2+2=", "hello there", "The cat sat"]
NAMES = [f"cli-{i}" for i in range(6)]


@pytest.fixture(scope="module")
def live(
    qwen3_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, TinkerService, Path]]:
    """A server with six revisions, and an eval set whose answers are what cli-0 says."""
    data_dir = tmp_path_factory.mktemp("cli-eval")
    server, service = start_server(qwen3_dir, data_dir)
    save_population(service, NAMES, seed=3)
    with server:
        items = parse_items([{"id": f"q{j}", "prompt": p, "expected": "-"} for j, p in enumerate(PROMPTS)])
        said = evaluate(
            server.url, items, ["cli-0"], suite="probe", record=False, sampling_params={"max_tokens": 4}
        )
        answers = [r["output"] for r in said.rows if r["type"] == "sample"]
        eval_set = data_dir / "set.jsonl"
        eval_set.write_text(
            "".join(
                json.dumps({"id": f"q{j}", "prompt": p, "expected": a}) + "\n"
                for j, (p, a) in enumerate(zip(PROMPTS, answers, strict=True))
            )
        )
        yield server.url, service, eval_set
    service.close()


def run(*args: str, code: int = 0) -> str:
    result = runner.invoke(app, ["eval", *args], env={"COLUMNS": "200"})
    assert result.exit_code == code, result.output
    return result.output


def test_a_population_run_prints_its_table_writes_results_and_records(live, tmp_path: Path) -> None:
    url, service, eval_set = live
    out = tmp_path / "results.jsonl"
    shown = run(
        str(eval_set),
        "--prefix",
        "cli-",
        "--suite",
        "cli",
        "--max-tokens",
        "4",
        "--url",
        url,
        "--results",
        str(out),
    )
    assert "local/cli-0@1" in shown and "1.0000" in shown  # cli-0 answers everything right and ranks first
    assert shown.index("local/cli-0@1") < shown.index("local/cli-1@1") or "cli-1@1" not in shown
    assert "population of 6 revision(s)" in shown and "recorded 6 evaluation(s) as cli/exact_match" in shown
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    kinds = [r["type"] for r in rows]
    assert kinds.count("sample") == 6 * len(PROMPTS) and kinds.count("revision") == 6
    assert kinds.count("population") == len(PROMPTS) and kinds[-1] == "summary"
    summary = rows[-1]
    assert summary["best"] == {"revision": "local/cli-0@1", "score": 1.0} and summary["scored"] == 6
    for name in NAMES:
        (evaluation,) = service.catalog.evaluations("local", name, suite="cli")
        assert evaluation.metric == "exact_match" and evaluation.metadata["n"] == len(PROMPTS)
    assert service.catalog.evaluations("local", "cli-0", suite="cli")[0].value == 1.0


def test_a_python_scorer_runs_here_and_its_scores_are_recorded(live, tmp_path: Path, monkeypatch) -> None:
    url, service, eval_set = live
    (tmp_path / "cli_scorer.py").write_text(
        "def same_start(output, item):\n    return output[:2] == item['expected'][:2]\n"
    )
    monkeypatch.chdir(tmp_path)
    shown = run(
        str(eval_set),
        "cli-0",
        "cli-1",
        "--suite",
        "py",
        "--scorer",
        "cli_scorer:same_start",
        "--max-tokens",
        "4",
        "--url",
        url,
    )
    assert "recorded 2 evaluation(s) as py/same_start" in shown
    (first,) = service.catalog.evaluations("local", "cli-0", suite="py")
    assert (first.metric, first.value, first.evaluator) == ("same_start", 1.0, "mintd eval")
    assert first.metadata["scorer"] == {"python": "cli_scorer:same_start"} and first.metadata["n"] == len(
        PROMPTS
    )
    assert first.dataset_fingerprint is not None and first.dataset_fingerprint.startswith("sha256:")
    assert len(service.catalog.evaluations("local", "cli-1", suite="py")) == 1


def test_errors_are_one_line(live) -> None:
    url, _, eval_set = live
    assert "revisions.refs[0]: 'nope' not found" in run(
        str(eval_set), "nope", "--suite", "x", "--url", url, code=1
    )
    assert "--scorer: 'bleu'" in run(
        str(eval_set), "cli-0", "--suite", "x", "--scorer", "bleu", "--url", url, code=1
    )
    assert "cannot import" in run(
        str(eval_set), "cli-0", "--suite", "x", "--scorer", "no_such_mod:f", "--url", url, code=1
    )
    assert "cannot reach" in run(
        str(eval_set), "cli-0", "--suite", "x", "--url", "http://127.0.0.1:9", code=1
    )
    assert "needs a pattern" in run(
        str(eval_set), "cli-0", "--suite", "x", "--scorer", "regex", "--url", url, code=1
    )
    assert "Traceback" not in run(str(eval_set), "--suite", "x", "--url", url, code=1)
