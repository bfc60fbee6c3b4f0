"""Evaluation runs end to end against a real server: a population of saved revisions sampled in shared
batches under the device budget, scored like one-at-a-time sampling would score them, recorded in the
catalog for gated promotes, tallied into the population's majority answers; failures reported, not
fatal."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from transformers import AutoTokenizer

from mintd.catalog import Provenance, Revision
from mintd.eval import ScorerSpec, parse_items
from tests.api.conftest import start_server
from tests.api.http import TinkerHTTP
from tests.populations import copy_revision, resident_bytes, save_population

POPULATION, FIT = 200, 16
PROMPTS: list[Any] = ["2+2=", "hello there", "The cat sat", [{"role": "user", "content": "1 2 3"}]]
PARAMS = {"max_tokens": 4}


@pytest.fixture(scope="module")
def population(qwen3_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Revision], int]:
    """Two hundred distinct sampler revisions pop-000 ... pop-199 of the tiny base model, and the bytes
    one of them occupies when resident."""
    data_dir = tmp_path_factory.mktemp("evaluations")
    _, service = start_server(qwen3_dir, data_dir)
    revisions = save_population(service, [f"pop-{i:03d}" for i in range(POPULATION)])
    size = resident_bytes(service, revisions[0])
    service.close()
    return data_dir, revisions, size


def items(expected: list[str]) -> list[dict[str, Any]]:
    """The eval set: plain prompts, and one chat (rendered with the base model's template)."""
    return [
        {"id": f"q{j}", "messages" if isinstance(p, list) else "prompt": p, "expected": e}
        for j, (p, e) in enumerate(zip(PROMPTS, expected, strict=True))
    ]


def start(c: TinkerHTTP, revisions: dict[str, Any], expected: list[str], **body: Any) -> dict[str, Any]:
    body = {
        "revisions": revisions,
        "eval_set": items(expected),
        "suite": "smoke",
        "sampling_params": PARAMS,
        **body,
    }
    return c.ok("evaluations/runs", body)


def finish(c: TinkerHTTP, run: dict[str, Any]) -> dict[str, Any]:
    """The run's final view, through its future (retrieve_future long-polls like any Tinker future)."""
    final = c.result(run["request_id"], timeout=300)
    assert final["status"] == "done", final
    assert c.get(f"evaluations/runs/{run['run_id']}").json() == final
    return final


def rows(c: TinkerHTTP, run_id: str, kind: str) -> list[dict[str, Any]]:
    import json

    reply = c.get(f"evaluations/runs/{run_id}/results")
    assert reply.status_code == 200 and reply.headers["content-type"].startswith("application/x-ndjson")
    return [r for r in map(json.loads, reply.text.splitlines()) if r["type"] == kind]


def outputs(c: TinkerHTTP, run_id: str) -> dict[str, list[str]]:
    """Per revision, its output for each prompt in order."""
    found: dict[str, list[str]] = {}
    for row in rows(c, run_id, "sample"):
        found.setdefault(row["revision"], []).append(row["output"])
    return found


def encode(tokenizer: Any, prompt: str | list[dict[str, str]]) -> list[int]:
    if isinstance(prompt, str):
        return tokenizer.encode(prompt)
    return tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=False)


def test_scores_equal_one_at_a_time_scoring(qwen3_dir: Path, population: Any) -> None:
    """Greedy: every revision's outputs, and so its score, are what sampling it alone through the
    sampling API gives, one prompt at a time."""
    data_dir, revisions, _ = population
    chosen = revisions[:8]
    tokenizer = AutoTokenizer.from_pretrained(qwen3_dir)
    server, service = start_server(qwen3_dir, data_dir)
    with server, TinkerHTTP(server.url) as c:
        session = c.session()
        alone: dict[str, list[str]] = {}
        for i, rev in enumerate(chosen):
            body = {"session_id": session, "sampling_session_seq_id": i, "model_path": rev.ref}
            sampler = c.ok("create_sampling_session", body)["sampling_session_id"]
            alone[rev.ref] = []
            for j, prompt in enumerate(PROMPTS):
                one = {
                    "sampling_session_id": sampler,
                    "seq_id": j,
                    "prompt": {"chunks": [{"type": "encoded_text", "tokens": encode(tokenizer, prompt)}]},
                    "sampling_params": {**PARAMS, "temperature": 0.0},
                }
                tokens = c.result(c.ok("asample", one))["sequences"][0]["tokens"]
                alone[rev.ref].append(tokenizer.decode(tokens, skip_special_tokens=True))
        # each prompt's expected answer is one revision's own output, so the scores differ
        expected = [alone[chosen[j].ref][j] for j in range(len(PROMPTS))]
        scorer = ScorerSpec(kind="exact_match").build()
        eval_items = parse_items(items(expected))
        one_at_a_time = {
            ref: sum(scorer.score(o, it) for o, it in zip(outs, eval_items, strict=True)) / len(PROMPTS)
            for ref, outs in alone.items()
        }
        assert len(set(one_at_a_time.values())) > 1
        run = finish(c, start(c, {"refs": [r.ref for r in chosen]}, expected, record=False))
        assert {r["revision"]: r["score"] for r in run["revisions"]} == one_at_a_time
        assert outputs(c, run["run_id"]) == alone
        assert run["progress"] == {
            "samples_done": 32,
            "samples_total": 32,
            "revisions_done": 8,
            "revisions_total": 8,
            "revisions_failed": 0,
        }
        assert service.catalog.evaluations("local", chosen[0].ref) == []  # record: false
    service.close()


def test_two_hundred_revisions_within_a_budget_of_sixteen_recorded_and_gating(
    qwen3_dir: Path, population: Any
) -> None:
    data_dir, revisions, size = population
    server, service = start_server(qwen3_dir, data_dir, adapter_device_budget=FIT * size)
    residency = service.models["tiny"].worker.residency
    with server, TinkerHTTP(server.url) as c:
        first = finish(c, start(c, {"refs": ["pop-000"]}, ["-"] * 4, scorer=None, record=False))
        expected = outputs(c, first["run_id"])[revisions[0].ref]  # pop-000's answers are the right ones
        run = finish(c, start(c, {"prefix": "pop-"}, expected, suite="arith"))
        stats = residency.stats()
        assert stats["device_peak_bytes"] <= FIT * size and stats["resident_adapters"] <= FIT, stats
        assert stats["misses"] >= POPULATION and stats["evictions"] >= POPULATION - FIT, stats
        scores = {r["revision"]: r["score"] for r in run["revisions"]}
        assert len(scores) == POPULATION and run["progress"]["revisions_failed"] == 0
        assert scores[revisions[0].ref] == 1.0
        assert run["summary"]["best"] == {"revision": revisions[0].ref, "score": 1.0}
        assert run["summary"]["mean"] == pytest.approx(sum(scores.values()) / POPULATION)
        assert 0 <= run["summary"]["population"]["score"] <= 1
        assert run["metric"] == "exact_match" and run["eval_set"]["fingerprint"].startswith("sha256:")
        for rev in revisions:  # every score landed in the catalog, with what it was measured on
            (evaluation,) = service.catalog.evaluations("local", rev.ref, suite="arith")
            assert (evaluation.metric, evaluation.value) == ("exact_match", scores[rev.ref])
            assert evaluation.dataset_fingerprint == run["eval_set"]["fingerprint"]
            assert evaluation.evaluator == "mintd eval"
            assert (
                evaluation.metadata["n"] == len(PROMPTS) and evaluation.metadata["eval_run"] == run["run_id"]
            )
            assert evaluation.metadata["sampling_params"] == run["sampling_params"]
            assert evaluation.metadata["sampling_params"]["temperature"] == 0.0
        # a gated promote reads them
        gate = {"suite": "arith", "metric": "exact_match", "threshold": 1.0}
        weak = next(rev for rev in revisions if scores[rev.ref] < 1.0)
        refused = c.post(f"catalog/adapters/{weak.adapter}/aliases/prod", {"ref": "1", "gate": gate})
        assert refused.status_code == 400 and "gate:" in refused.json()["detail"], refused.text
        promoted = c.ok(f"catalog/adapters/{revisions[0].adapter}/aliases/prod", {"ref": "1", "gate": gate})
        assert promoted["number"] == 1
    service.close()


def test_majority_vote_on_a_constructed_population(qwen3_dir: Path, population: Any) -> None:
    """A's bytes three times against B and C once: the population answers what A answers. A twice and B
    twice: wherever they differ the vote is a tie, reported with both, scoring one half."""
    data_dir, revisions, _ = population
    a, b, cc = revisions[10:13]
    server, service = start_server(qwen3_dir, data_dir)
    with server, TinkerHTTP(server.url) as c:
        a2, a3 = (copy_revision(service, a, f"maj-a{i}") for i in (2, 3))
        b2 = copy_revision(service, b, "maj-b2")
        alone = finish(c, start(c, {"refs": [a.ref, b.ref]}, ["-"] * 4, scorer=None, record=False))
        said = outputs(c, alone["run_id"])
        expected = said[a.ref]
        norm = ScorerSpec().build().answer
        assert any(norm(x) != norm(y) for x, y in zip(said[a.ref], said[b.ref], strict=True))

        majority = finish(
            c, start(c, {"refs": [a.ref, a2.ref, a3.ref, b.ref, cc.ref]}, expected, record=False)
        )
        votes = rows(c, majority["run_id"], "population")
        assert [v["answer"] for v in votes] == [norm(x) for x in expected]
        assert all(
            v["votes"] >= 3 and v["voters"] == 5 and v["tied"] == [] and v["score"] == 1.0 for v in votes
        )
        assert majority["summary"]["population"]["score"] == 1.0
        assert majority["summary"]["population"]["ties"] == 0

        tie = finish(c, start(c, {"refs": [a.ref, a2.ref, b.ref, b2.ref]}, expected, record=False))
        votes = rows(c, tie["run_id"], "population")
        for vote, x, y in zip(votes, said[a.ref], said[b.ref], strict=True):
            if norm(x) == norm(y):
                assert (vote["tied"], vote["votes"], vote["score"]) == ([], 4, 1.0)
            else:
                assert (vote["tied"], vote["votes"], vote["score"]) == (sorted([norm(x), norm(y)]), 2, 0.5)
        differ = sum(norm(x) != norm(y) for x, y in zip(said[a.ref], said[b.ref], strict=True))
        assert tie["summary"]["population"]["ties"] == differ
        assert tie["summary"]["population"]["score"] == pytest.approx(1 - 0.5 * differ / len(PROMPTS))
        assert service.models["tiny"].worker.residency.stats()["misses"] == 3  # copies share one sampling
    service.close()


def test_a_corrupt_revision_is_reported_and_the_run_goes_on(qwen3_dir: Path, population: Any) -> None:
    data_dir, _, _ = population
    server, service = start_server(qwen3_dir, data_dir)
    good, bad, other = save_population(service, ["corrupt-0", "corrupt-1", "corrupt-2"], seed=7)
    elsewhere = Provenance(base_fingerprint="f" * 64, base_model="some-other-model")
    data = service.checkpoints.blobs.read(good.content_hash)
    foreign = service.checkpoints.add("local", "corrupt-3", data, "sampler", elsewhere)  # good's bytes
    blob = service.checkpoints.blobs.path(bad.content_hash)
    damaged = bytearray(blob.read_bytes())
    damaged[-100] ^= 0xFF
    blob.chmod(0o644)
    blob.write_bytes(bytes(damaged))
    with server, TinkerHTTP(server.url) as c:
        run = finish(c, start(c, {"prefix": "corrupt-"}, ["x"] * 4, suite="corrupt"))
        by_ref = {r["revision"]: r for r in run["revisions"]}
        assert "checksum" in by_ref[bad.ref]["error"] and by_ref[bad.ref]["score"] is None
        assert by_ref[good.ref]["error"] is None and by_ref[other.ref]["n"] == len(PROMPTS)
        assert "does not serve" in by_ref[foreign.ref]["error"]  # trained on a base not served here
        assert run["progress"]["revisions_failed"] == 2 and run["summary"]["failed"] == 2
        assert {r["revision"] for r in run["revisions"][-2:]} == {bad.ref, foreign.ref}  # failures rank last
        assert service.catalog.evaluations("local", bad.ref) == []
        assert len(service.catalog.evaluations("local", good.ref, suite="corrupt")) == 1
        assert {r["revision"] for r in rows(c, run["run_id"], "sample")} == {good.ref, other.ref}
    service.close()


def test_bad_requests_are_named_and_runs_are_private(qwen3_dir: Path, population: Any) -> None:
    data_dir, _, _ = population
    server, service = start_server(qwen3_dir, data_dir, api_keys=["local=key-a", "bob=key-b"])
    with server, TinkerHTTP(server.url, "key-a") as c, TinkerHTTP(server.url, "key-b") as bob:

        def refused(status: int, needle: str, **body: Any) -> None:
            full = {"revisions": {"refs": ["pop-000"]}, "eval_set": items(["4"] * 4), "suite": "s", **body}
            reply = c.post("evaluations/runs", full)
            assert reply.status_code == status and needle in reply.json()["detail"], reply.text

        refused(404, "revisions.refs[1]: 'nope' not found", revisions={"refs": ["pop-000", "nope"]})
        refused(400, "revisions: no live revision matches", revisions={"prefix": "zzz"})
        refused(
            400,
            "eval_set[2].expected: 'x' is not a number",
            scorer={"kind": "numeric"},
            eval_set=items(["1", "2", "x", "4"]),
        )
        refused(422, "pattern", scorer={"kind": "regex"})
        refused(400, "scorer: required to record", scorer=None)
        refused(400, "eval_set[0]: max_tokens", sampling_params={"max_tokens": 100_000})
        refused(
            400,
            "eval_set[1]: give exactly one of prompt",
            eval_set=[{"prompt": "a", "expected": "1"}, {"expected": "2"}],
        )
        refused(400, "suite", suite="x" * 200)
        refused(422, "eval_set", eval_set=[])

        run = finish(c, start(c, {"refs": ["pop-000"]}, ["4"] * 4, record=False))
        assert bob.get(f"evaluations/runs/{run['run_id']}").status_code == 404  # another owner's: missing
        assert bob.get(f"evaluations/runs/{run['run_id']}/results").status_code == 404
        assert bob.post("retrieve_future", {"request_id": run["request_id"]}).status_code == 410
        assert bob.get("evaluations/runs").json() == {"runs": []}
        assert [r["run_id"] for r in c.get("evaluations/runs").json()["runs"]] == [run["run_id"]]
        bobs = bob.post(
            "evaluations/runs",
            {"revisions": {"refs": ["local/pop-000"]}, "eval_set": items(["4"] * 4), "suite": "s"},
        )
        assert bobs.status_code == 404  # nor can another owner evaluate your revisions
        assert c.get("evaluations/runs/eval-nope").status_code == 404
    service.close()


def test_a_cancelled_run_stops_submitting_and_reports_what_it_did_and_runs_are_limited(
    qwen3_dir: Path, population: Any
) -> None:
    data_dir, revisions, _ = population
    server, service = start_server(qwen3_dir, data_dir, max_eval_runs_per_owner=1)
    many = [{"id": f"q{j}", "prompt": f"count {j} and", "expected": "x"} for j in range(40)]
    with server, TinkerHTTP(server.url) as c:
        body = {
            "revisions": {"prefix": "pop-"},
            "eval_set": many,
            "suite": "cancel",
            "sampling_params": {"max_tokens": 8},
        }
        run = c.ok("evaluations/runs", body)  # 8000 samples: far from done when the cancel arrives
        second = c.post("evaluations/runs", body)
        assert second.status_code == 429 and "already has 1 running" in second.json()["detail"]
        assert c.ok(f"evaluations/runs/{run['run_id']}/cancel")["status"] in ("running", "cancelled")
        final = c.result(run["request_id"], timeout=300)
        assert final["status"] == "cancelled"
        done = [r for r in final["revisions"] if r["error"] is None]
        cancelled = [r for r in final["revisions"] if r["error"] == "cancelled before it was evaluated"]
        assert len(done) + len(cancelled) == POPULATION and len(cancelled) > POPULATION // 2
        assert final["progress"]["samples_done"] < final["progress"]["samples_total"]
        recorded = sum(len(service.catalog.evaluations("local", r.ref, suite="cancel")) for r in revisions)
        assert recorded == len(done)  # only complete revisions are recorded
    service.close()
