"""Resent requests (the SDK retries with a fresh X-Idempotency-Key each time) run once.

The server deduplicates on natural keys (protocol §1.7): (model_id, seq_id) for training requests,
(session_id, model_seq_id) for create_model, (sampling_session_id, seq_id) for samples. A duplicate
gets the first request's id, and the training step is applied once: the losses and gradient norms of
a run that received every request twice equal those of a control run that received each once.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.api.conftest import LiveServer
from tests.api.http import TinkerHTTP, batch, idempotency_headers

DATA = batch(3, rows=3)


@pytest.fixture
def client(server: LiveServer) -> Iterator[TinkerHTTP]:
    with TinkerHTTP(server.url) as c:
        yield c


def submit(c: TinkerHTTP, kind: str, model_id: str, seq_id: int) -> dict[str, Any]:
    """POST a forward_backward or optim_step the way the SDK does (a new idempotency key each time)."""
    send = c.forward_backward if kind == "fb" else c.optim_step
    args = (DATA,) if kind == "fb" else ()
    r = send(model_id, seq_id, *args, headers=idempotency_headers())
    assert r.status_code == 200, r.text
    return r.json()


def trace(c: TinkerHTTP, model_id: str, script: list[str], first_seq: int = 1) -> list[float]:
    """Run `script` (fb / opt, seq ids first_seq, first_seq + 1, ...) on a run, each request sent once
    and waited for: the forward_backward losses and optim_step gradient norms, in order."""
    out = []
    for seq_id, kind in enumerate(script, start=first_seq):
        result = c.result(submit(c, kind, model_id, seq_id))
        out.append(result["metrics"]["loss:sum" if kind == "fb" else "grad_norm"])
    return out


SCRIPT = ["fb", "opt", "fb", "opt", "fb"]


def test_replayed_training_requests_run_once(client: TinkerHTTP) -> None:
    session = client.session()
    control = trace(client, client.create_model(session, 0, seed=5), SCRIPT)

    model_id = client.create_model(session, 1, seed=5)
    replayed = []
    for seq_id, kind in enumerate(SCRIPT, start=1):
        first = submit(client, kind, model_id, seq_id)
        again = submit(client, kind, model_id, seq_id)  # before the first has been polled
        assert again["request_id"] == first["request_id"]
        result = client.result(first)
        late = submit(client, kind, model_id, seq_id)  # and after it completed
        assert late["request_id"] == first["request_id"]
        assert client.result(late) == result
        replayed.append(result["metrics"]["loss:sum" if kind == "fb" else "grad_norm"])
    assert replayed == control  # identical: same seed, same data, same steps

    # The comparison can see a step applied twice: a duplicated forward_backward doubles the gradient
    # (Adam hides that in the loss, not in grad_norm), a duplicated optim_step moves the weights again.
    doubled_fb = trace(client, client.create_model(session, 2, seed=5), ["fb", "fb", "opt", "fb"])
    assert doubled_fb[2] == pytest.approx(2 * control[1], rel=1e-4)
    doubled_opt = trace(client, client.create_model(session, 3, seed=5), ["fb", "opt", "opt", "fb"])
    assert doubled_opt[3] != pytest.approx(control[2], rel=1e-6)


def test_lost_optim_step_response_resent_runs_once(client: TinkerHTTP, server: LiveServer) -> None:
    """The SDK's POST of an optim_step timed out after the server queued it: it sends the same request
    again (new idempotency key) without ever having seen the first request id."""
    session = client.session()
    control = trace(client, client.create_model(session, 0, seed=6), SCRIPT)

    model_id = client.create_model(session, 1, seed=6)
    losses = [client.result(submit(client, "fb", model_id, 1))["metrics"]["loss:sum"]]
    lost = submit(client, "opt", model_id, 2)  # its answer is "lost": never read, never polled
    resent = submit(client, "opt", model_id, 2)
    assert resent["request_id"] == lost["request_id"]
    losses.append(client.result(resent)["metrics"]["grad_norm"])
    lost_fb = submit(client, "fb", model_id, 3)  # the same for a forward_backward
    resent_fb = submit(client, "fb", model_id, 3)
    assert resent_fb["request_id"] == lost_fb["request_id"]
    losses.append(client.result(resent_fb)["metrics"]["loss:sum"])
    losses += trace(client, model_id, SCRIPT[3:], first_seq=4)
    assert losses == control

    optim_futures = [f for f in server.service.futures._futures.values() if f.kind == "OptimStep"]
    assert len(optim_futures) == 2 * SCRIPT.count("opt"), "one optim_step future per (run, seq_id)"


def test_duplicate_create_model_is_the_same_model(client: TinkerHTTP) -> None:
    session = client.session()
    body = {
        "session_id": session,
        "model_seq_id": 0,
        "base_model": "tiny",
        "lora_config": {"rank": 4, "seed": 0},
        "type": "create_model",
    }
    first = client.ok("create_model", body, headers=idempotency_headers())
    again = client.ok("create_model", body, headers=idempotency_headers())
    assert again == first and first["model_id"] == f"{session}:train:0"
    result = client.result(first)
    late = client.ok("create_model", body, headers=idempotency_headers())
    assert late["request_id"] == first["request_id"] and client.result(late) == result
    assert client.get(f"sessions/{session}").json()["training_run_ids"] == [first["model_id"]]

    other = client.ok("create_model", {**body, "model_seq_id": 1})  # a new model_seq_id: a new run
    assert other["model_id"] == f"{session}:train:1" and other["request_id"] != first["request_id"]
    client.result(other)
    assert client.get(f"sessions/{session}").json()["training_run_ids"] == [
        first["model_id"],
        other["model_id"],
    ]
    assert client.step(first["model_id"], 1, DATA) > 0  # the deduplicated run trains normally


def test_duplicate_sample_is_the_same_request_and_tokens(client: TinkerHTTP) -> None:
    session = client.session()
    body = {"session_id": session, "sampling_session_seq_id": 0, "base_model": "tiny"}
    sampler = client.ok("create_sampling_session", body)["sampling_session_id"]
    assert client.ok("create_sampling_session", body)["sampling_session_id"] == sampler

    def sample(seq_id: int) -> dict[str, Any]:
        request = {
            "sampling_session_id": sampler,
            "seq_id": seq_id,
            "prompt": {"chunks": [{"type": "encoded_text", "tokens": [5, 6, 7, 8]}]},
            "num_samples": 3,
            "sampling_params": {"max_tokens": 12, "temperature": 1.0, "stop": []},  # unseeded
        }
        return client.ok("asample", request, headers=idempotency_headers())

    first, again = sample(0), sample(0)
    assert again == first
    assert len(first["sample_sequence_ids"]) == 3
    tokens = [s["tokens"] for s in client.result(first)["sequences"]]
    late = sample(0)
    assert late == first
    assert [s["tokens"] for s in client.result(late)["sequences"]] == tokens

    other = sample(1)  # a new seq_id is a new request, sampled afresh
    assert other["request_id"] != first["request_id"]
    assert set(other["sample_sequence_ids"]).isdisjoint(first["sample_sequence_ids"])
    assert len(client.result(other)["sequences"]) == 3
