"""The Python helper for evaluation runs on a mintd server (what `mintd eval` uses).

    from mintd.eval.client import evaluate
    report = evaluate("http://127.0.0.1:8000", "arith.jsonl", {"prefix": "user-"}, suite="arith",
                      scorer="numeric")
    print(report.summary["population"]["score"], report.summary["best"], report.summary["mean"])

The server samples every revision × item in shared batches. With a built-in scorer (a kind name or a
`ScorerSpec`) it also scores and records; with a Python scorer (`"module:function"`) the server only
samples, and this helper scores the outputs here, tallies the population the same way
(`mintd.eval.population`) and records each revision's score through the catalog REST API.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from mintd.eval.evalset import EvalItem, load_jsonl
from mintd.eval.population import Tally
from mintd.eval.scorers import PythonScorer, ScorerSpec

EVALUATOR = "mintd eval"


class EvalError(RuntimeError):
    """The server refused the run or it failed; the message is the server's, naming the field."""


@dataclass
class EvalReport:
    run: dict[str, Any]  # the finished run's view (status, settings, progress)
    revisions: list[dict[str, Any]]  # per revision: revision, score, n, correct, error; best first
    summary: dict[str, Any]  # best, mean, population score, ties, failures
    rows: list[dict[str, Any]]  # the JSONL results: samples, revisions, population answers, summary

    def write_jsonl(self, path: Path | str) -> None:
        with Path(path).open("w", encoding="utf-8") as out:
            for row in self.rows:
                out.write(json.dumps(row, ensure_ascii=False) + "\n")


class EvalClient:
    """The /api/v1/evaluations routes, and the catalog's evaluation route for client-side scores."""

    def __init__(self, url: str, api_key: str = "tml-local", timeout: float = 60.0) -> None:
        self.url = url.rstrip("/")
        self.http = httpx.Client(
            base_url=f"{self.url}/api/v1", headers={"X-API-Key": api_key}, timeout=timeout
        )

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> EvalClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            reply = self.http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise EvalError(f"cannot reach {self.url}: {exc}") from None
        if reply.status_code != 200:
            try:
                detail = reply.json().get("detail")
            except ValueError:
                detail = reply.text or reply.reason_phrase
            raise EvalError(f"{reply.status_code}: {detail}")
        return reply

    def start(self, body: dict[str, Any]) -> dict[str, Any]:
        return self._call("POST", "/evaluations/runs", json=body).json()

    def get(self, run_id: str) -> dict[str, Any]:
        return self._call("GET", f"/evaluations/runs/{run_id}").json()

    def cancel(self, run_id: str) -> dict[str, Any]:
        return self._call("POST", f"/evaluations/runs/{run_id}/cancel").json()

    def results(self, run_id: str) -> Iterator[dict[str, Any]]:
        text = self._call("GET", f"/evaluations/runs/{run_id}/results").text
        return (json.loads(line) for line in text.splitlines() if line)

    def wait(
        self, run_id: str, on_progress: Callable[[dict[str, Any]], None] | None = None, poll_s: float = 0.5
    ) -> dict[str, Any]:
        """Poll until the run leaves `running`; `on_progress(view)` after every poll."""
        while True:
            view = self.get(run_id)
            if on_progress is not None:
                on_progress(view)
            if view["status"] != "running":
                return view
            time.sleep(poll_s)

    def add_evaluation(self, ref: str, suite: str, metric: str, value: float, **fields: Any) -> None:
        adapter = ref.split("/", 1)[-1].split("@", 1)[0]
        body = {"ref": ref, "suite": suite, "metric": metric, "value": value, **fields}
        self._call("POST", f"/catalog/adapters/{adapter}/evaluations", json=body)


def evaluate(
    url: str,
    eval_set: list[EvalItem] | Path | str,
    revisions: dict[str, Any] | list[str],
    *,
    suite: str,
    scorer: ScorerSpec | str = "exact_match",
    sampling_params: dict[str, Any] | None = None,
    metric: str | None = None,
    record: bool = True,
    api_key: str = "tml-local",
    on_progress: Callable[[dict[str, Any]], None] | None = None,
) -> EvalReport:
    """Run an evaluation on the server at `url` and wait for it.

    `eval_set`: items, or a JSONL file. `revisions`: a list of refs, or {"refs", "adapter", "prefix",
    "alias", "limit"}. `scorer`: a built-in kind ("exact_match", "contains", "regex", "numeric"), a
    `ScorerSpec`, or "module:function" (scored here). `sampling_params`: Tinker's, greedy by default.
    Raises EvalError with the server's message when the run is refused or fails.
    """
    items = eval_set if isinstance(eval_set, list) else load_jsonl(Path(eval_set).read_text(), str(eval_set))
    python = None
    if isinstance(scorer, str) and ":" in scorer:
        python = PythonScorer(scorer)
    elif isinstance(scorer, str):
        scorer = ScorerSpec(kind=scorer)
    body = {
        "revisions": {"refs": revisions} if isinstance(revisions, list) else revisions,
        "eval_set": [item.as_json() for item in items],
        "suite": suite,
        "metric": metric,
        "scorer": None if python else scorer.model_dump(),
        "sampling_params": sampling_params or {},
        "record": record and python is None,
    }
    with EvalClient(url, api_key) as client:
        run = client.start(body)
        try:
            run = client.wait(run["run_id"], on_progress)
        except KeyboardInterrupt:  # the server would go on sampling for no one
            client.cancel(run["run_id"])
            raise
        if run["status"] == "failed":
            raise EvalError(f"evaluation run {run['run_id']} failed: {run['failure']}")
        rows = list(client.results(run["run_id"]))
        if python is None:
            summary = next((r for r in rows if r["type"] == "summary"), {})
            return EvalReport(run, run["revisions"], _plain(summary), rows)
        return _score_here(client, run, items, python, rows, metric or python.name, suite, record)


def _score_here(
    client: EvalClient,
    run: dict[str, Any],
    items: list[EvalItem],
    scorer: PythonScorer,
    rows: list[dict[str, Any]],
    metric: str,
    suite: str,
    record: bool,
) -> EvalReport:
    """Score the server's outputs with a Python scorer, tally the population, record the scores."""
    tally = Tally(items, scorer)
    position = {item.id: i for i, item in enumerate(items)}
    outputs: dict[str, list[str]] = {}
    for row in rows:
        if row["type"] == "sample":
            outputs.setdefault(row["revision"], [""] * len(items))[position[row["item_id"]]] = row["output"]
    scored: list[dict[str, Any]] = []
    for row in rows:
        if row["type"] != "revision":
            continue
        if row["error"] is not None:
            result = tally.fail(row["revision"], row["error"])
            scored.append({"type": "revision", **result.as_json()})
            continue
        result, samples = tally.add(row["revision"], outputs[row["revision"]])
        scored += [s.row(result.revision) for s in samples]
        scored.append({"type": "revision", **result.as_json()})
        if record:
            client.add_evaluation(
                result.revision,
                suite,
                metric,
                result.score,
                dataset_fingerprint=run["eval_set"]["fingerprint"],
                evaluator=EVALUATOR,
                metadata={
                    "n": result.n,
                    "eval_run": run["run_id"],
                    "sampling_params": run["sampling_params"],
                    "scorer": {"python": scorer.target},
                },
            )
    votes = tally.votes()
    summary = tally.summary(votes)
    scored += [{"type": "population", **v.as_json()} for v in votes]
    scored.append({"type": "summary", **summary})
    revisions = sorted(tally.revisions, key=lambda r: (r.score is None, -(r.score or 0.0), r.revision))
    return EvalReport({**run, "metric": metric}, [r.as_json() for r in revisions], summary, scored)


def _plain(row: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in row.items() if k != "type"}
