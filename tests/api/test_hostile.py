"""Hostile input against the real server: memory probes, bodies too large or too deep, integers and
ids beyond every bound, reading other owners' results by guessing ids, idle and finished sessions,
quotas, server faults, and a well-behaved client whose losses do not move while all of that goes on."""

from __future__ import annotations

import contextlib
import random
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from mintd.api import proto
from mintd.server import ServerThread
from mintd.service.tinker import TinkerService
from tests.api.conftest import LiveServer, start_server
from tests.api.http import TinkerHTTP, batch, datum
from tests.api.test_tinker_errors import rejected
from tests.servers import free_port, rss_mb, serve

MB = 2**20
JSON, PROTOBUF = "application/json", "application/x-protobuf"


def post_raw(c: TinkerHTTP, route: str, content: Any, content_type: str = JSON) -> httpx.Response:
    return c.http.post(f"/{route}", content=content, headers={"Content-Type": content_type})


TWO_OWNERS = ["alice=tml-a", "bob=tml-b"]


def _start(qwen3_dir: Path, data_dir: Path, keys: list[str] | None = TWO_OWNERS, **settings: Any) -> Any:
    return start_server(qwen3_dir, data_dir, keys, **settings)


@pytest.fixture(scope="module")
def live(qwen3_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    thread, service = _start(qwen3_dir, tmp_path_factory.mktemp("hostile"))
    with thread:
        yield LiveServer(thread.url, service, qwen3_dir)
    service.close()


@pytest.fixture
def alice(live: LiveServer) -> Iterator[TinkerHTTP]:
    with TinkerHTTP(live.url, api_key="tml-a") as c:
        yield c


@pytest.fixture
def bob(live: LiveServer) -> Iterator[TinkerHTTP]:
    with TinkerHTTP(live.url, api_key="tml-b") as c:
        yield c


def sparse_request(model_id: str, rows: int, cols: int, seq_id: int = 1) -> bytes:
    """A ~100-byte ForwardBackwardRequest whose `weights` claim a rows x cols CSR tensor."""
    csr = proto.Writer().blob(1, b"").blob(2, (b"\0" * 8) * (rows + 1) if rows < 10 else b"").blob(3, b"")
    tensor = proto.Writer().message(2, csr).varint(3, proto.DTYPE_FLOAT32).packed_varints(4, [rows, cols])
    entry = proto.Writer().string(1, "weights").message(2, tensor)
    text = proto.Writer().blob(1, b"\x01\0\0\0\x02\0\0\0")
    datum_msg = proto.Writer().message(1, proto.Writer().message(1, text)).message(2, entry)
    body = (
        proto.Writer().string(1, model_id).varint(2, seq_id).message(3, datum_msg).string(4, "cross_entropy")
    )
    return body.getvalue()


# memory probes: against a `mintd serve` process of its own, so its memory is the server's alone ---


@pytest.fixture(scope="module")
def probed(qwen3_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[TinkerHTTP, int]]:
    port = free_port()
    server = serve(qwen3_dir, tmp_path_factory.mktemp("probed"), port, "--api-key", "alice=tml-a")
    try:
        with TinkerHTTP(f"http://127.0.0.1:{port}", api_key="tml-a") as c:
            yield c, server.pid
    finally:
        server.kill()
        server.wait(10)


@pytest.mark.parametrize("cols", [5 * 10**7, 10**12], ids=["5e7", "1e12"])
def test_a_tiny_sparse_tensor_claiming_a_huge_shape_is_refused_before_allocating(
    probed: tuple[TinkerHTTP, int], cols: int
) -> None:
    alice, pid = probed
    model_id = alice.new_model()
    run_still_trains(alice, model_id)  # the first step's own allocations are not the probe's growth
    body = sparse_request(model_id, 1, cols, seq_id=3)
    assert len(body) < 200
    before = rss_mb(pid)
    r = post_raw(alice, "forward_backward", body, PROTOBUF)
    rejected(r, 400, "shape", "elements")
    grown = rss_mb(pid) - before
    assert grown < 100, f"the server grew by {grown:.0f} MB for a {len(body)}-byte body"
    run_still_trains(alice, model_id, seq_id=4)  # the refusal consumed seq 3


def run_still_trains(c: TinkerHTTP, model_id: str, seq_id: int = 1) -> None:
    assert c.step(model_id, seq_id, batch(3)) > 0


def test_bodies_beyond_the_cap_are_413_and_leave_nothing(probed: tuple[TinkerHTTP, int]) -> None:
    alice, pid = probed
    sessions = len(alice.get("sessions").json()["sessions"])
    before = rss_mb(pid)
    huge_tags = '{"tags": ["' + "x" * (50 * MB) + '"]}'
    for _ in range(3):  # declared length: refused before reading
        r = alice.http.post(
            "/create_session", content=huge_tags, headers={"Content-Type": "application/json"}
        )
        rejected(r, 413, "request body")

    def chunks() -> Iterator[bytes]:  # no declared length: refused once the cap is passed
        yield b'{"tags": ["'
        for _ in range(50):
            yield b"x" * MB
        yield b'"]}'

    r = post_raw(alice, "create_session", chunks())
    rejected(r, 413, "request body")
    assert len(alice.get("sessions").json()["sessions"]) == sessions, "a refused body created something"
    assert rss_mb(pid) - before < 100
    assert alice.session()  # and the server goes on


def test_json_nested_200k_deep_is_400(alice: TinkerHTTP) -> None:
    deep = "[" * 200_000 + "]" * 200_000
    for route in ("forward_backward", "forward", "create_session", "catalog/adapters/x/evaluations"):
        r = post_raw(alice, route, deep)
        rejected(r, 400, "nested")
    # brackets inside strings do not count
    assert alice.ok("create_session", {"tags": ["[" * 200], "user_metadata": {"a": "{" * 1000}})


@pytest.mark.parametrize(
    "method,path,params",
    [
        ("GET", "catalog/adapters", {"offset": 2**64}),
        ("GET", "catalog/adapters/x/log", {"before": 10**30}),
        ("GET", "catalog/audit", {"before": 2**63}),
        ("GET", "training_runs", {"offset": 2**70}),
        ("GET", "training_runs", {"limit": -1}),
    ],
)
def test_integers_beyond_64_bits_are_422(alice: TinkerHTTP, method: str, path: str, params: dict) -> None:
    rejected(alice.http.request(method, f"/{path}", params=params), 422)


def test_ids_beyond_every_bound_are_4xx(alice: TinkerHTTP) -> None:
    for length in (255, 256, 300, 5000):  # a run id reaches the file system: never as a raw name
        rejected(alice.get(f"training_runs/{'r' * length}"), {404, 422})
        rejected(alice.get(f"training_runs/s-{'a' * 32}:train:{'9' * length}"), {404, 422})
    session = alice.session()
    body = {"session_id": session, "model_seq_id": 10**30, "base_model": "tiny", "lora_config": {"rank": 4}}
    rejected(alice.post("create_model", body), 422, "model_seq_id")
    rejected(alice.forward_backward("m" * 1000, 1, batch(0)), {400, 422}, "model_id")
    rejected(alice.post("create_session", {"tags": ["t"] * 65}), 422, "tags")
    rejected(alice.post("create_session", {"user_metadata": {"k": "v" * 70_000}}), 422, "user_metadata")
    token_lo = {"model_input": {"chunks": [{"type": "encoded_text", "tokens": [2**70]}]}}
    r = alice.forward_backward(alice.new_model(), 1, [{**datum([1, 2, 3]), **token_lo}])
    rejected(r, 400, "token")


# ownership ----------------------------------------------------------------------------------------


def test_bob_reads_nothing_of_alices_by_guessing_ids(alice: TinkerHTTP, bob: TinkerHTTP) -> None:
    model_id = alice.new_model()
    session = model_id.split(":")[0]
    assert re.fullmatch(r"s-[0-9a-f]{32}", session), "session ids carry 128 random bits"
    loss = alice.forward_backward(model_id, 1, batch(0)).json()
    saved = alice.ok("save_weights_for_sampler", {"model_id": model_id, "seq_id": 2, "path": "p"})
    sampler = alice.ok("create_sampling_session", {"session_id": session, "sampling_session_seq_id": 7})
    sample_body = {
        "sampling_session_id": sampler["sampling_session_id"],
        "seq_id": 1,
        "prompt": {"chunks": [{"type": "encoded_text", "tokens": [1, 2]}]},
        "sampling_params": {"max_tokens": 2, "seed": 1},
    }
    sampled = alice.ok("asample", sample_body)
    alice_ids = [loss["request_id"], saved["request_id"], sampled["request_id"]]
    for rid in alice_ids:
        assert re.fullmatch(r"req-[A-Za-z0-9_-]{22,}", rid), rid
        alice.result(rid)

    unknown = bob.post("retrieve_future", {"request_id": "req-" + "A" * 22})
    for rid in alice_ids:  # bob's poll of alice's id answers exactly like a made-up one
        r = bob.post("retrieve_future", {"request_id": rid})
        assert (r.status_code, r.json()["detail"].replace(rid, "ID")) == (
            unknown.status_code,
            unknown.json()["detail"].replace("req-" + "A" * 22, "ID"),
        )
        assert "loss" not in r.text and "tinker://" not in r.text
    rejected(bob.post("asample", {**sample_body, "seq_id": 2}), 404)
    rejected(bob.get(f"samplers/{sampler['sampling_session_id']}"), 404)
    rejected(bob.post("session_heartbeat", {"session_id": session}), 404)
    rejected(bob.post(f"sessions/{session}/finish", {}), 404)
    rejected(bob.post("unload_model", {"model_id": model_id}), 404)
    rejected(bob.post("optim_step", {"model_id": model_id, "seq_id": 3, "adam_params": {}}), 404)
    body = {"session_id": session, "sampling_session_seq_id": 8}
    rejected(bob.post("create_sampling_session", body), 404)
    assert bob.get("sessions").json()["sessions"] == []
    # alice's objects are untouched and her session is still live
    assert alice.result(alice.ok("asample", {**sample_body, "seq_id": 2}))["sequences"]
    assert alice.get(f"sessions/{session}").status_code == 200


# sessions end: finished or idle -------------------------------------------------------------------


@pytest.fixture
def reaping(qwen3_dir: Path, tmp_path: Path) -> Iterator[LiveServer]:
    thread, service = _start(qwen3_dir, tmp_path / "data", session_idle_timeout_s=3.0, reap_interval_s=0.2)
    with thread:
        yield LiveServer(thread.url, service, qwen3_dir)
    service.close()


def _slots(service: TinkerService) -> int:
    """Engine slots something holds: all but the saved adapters residency merely caches (evictable)."""
    cached = service.models["tiny"].worker.residency.stats()
    return len(service.models["tiny"].engine.slots) - cached["resident_adapters"] + cached["adapters_in_use"]


def _hold_memory(c: TinkerHTTP) -> tuple[str, str, str]:
    """A session holding a trained run, an ephemeral snapshot and a sampler of a saved revision."""
    model_id = c.new_model()
    session = model_id.split(":")[0]
    run_still_trains(c, model_id)
    path = c.result(c.ok("save_weights_for_sampler", {"model_id": model_id, "seq_id": 3, "path": "keep"}))
    c.result(c.ok("save_weights_for_sampler", {"model_id": model_id, "seq_id": 4}))
    body = {"session_id": session, "sampling_session_seq_id": 0, "model_path": path["path"]}
    sampler = c.ok("create_sampling_session", body)["sampling_session_id"]
    prompt = {"chunks": [{"type": "encoded_text", "tokens": [1, 2]}]}
    sample = {
        "sampling_session_id": sampler,
        "seq_id": 1,
        "prompt": prompt,
        "sampling_params": {"max_tokens": 1},
    }
    c.result(c.ok("asample", sample))
    return model_id, sampler, path["path"]


def _wait(predicate: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


def test_idle_sessions_are_closed_and_free_their_memory(reaping: LiveServer) -> None:
    empty = _slots(reaping.service)
    with TinkerHTTP(reaping.url, api_key="tml-a") as alice, TinkerHTTP(reaping.url, api_key="tml-b") as bob:
        kept = alice.new_model()  # kept alive by heartbeats while the other one idles
        stop = threading.Event()

        def heartbeat() -> None:
            while not stop.wait(0.3):
                alice.post("session_heartbeat", {"session_id": kept.split(":")[0]})

        beats = threading.Thread(target=heartbeat)
        beats.start()
        try:
            model_id, sampler, path = _hold_memory(alice)
            assert _slots(reaping.service) >= empty + 3  # run, kept run, snapshot (the sampler's is cached)
            session = model_id.split(":")[0]
            _wait(lambda: session not in reaping.service.session_ids("alice"), timeout=20)
            _wait(lambda: _slots(reaping.service) == empty + 1)  # only the heartbeating run remains
        finally:
            stop.set()
            beats.join()
        for r in (
            alice.post("get_info", {"model_id": model_id}),
            alice.forward_backward(model_id, 5, batch(0)),
            alice.get(f"samplers/{sampler}"),
            alice.post("session_heartbeat", {"session_id": session}),
        ):
            rejected(r, 410, session, "idle", "saved checkpoints remain")
        rejected(bob.post("get_info", {"model_id": model_id}), 404)  # to anyone else: never existed
        assert alice.ok("weights_info", {"tinker_path": path})["lora_rank"] == 4  # the save stays
        assert alice.step(kept, 1, batch(1)) > 0


def test_finished_sessions_are_closed_once_their_work_is_done(reaping: LiveServer) -> None:
    empty = _slots(reaping.service)
    with TinkerHTTP(reaping.url, api_key="tml-a") as alice:
        model_id, _, _ = _hold_memory(alice)
        session = model_id.split(":")[0]
        assert alice.post(f"sessions/{session}/finish", {"reason": {"type": "success"}}).status_code == 200
        _wait(lambda: _slots(reaping.service) == empty, timeout=5)
        rejected(alice.post("get_info", {"model_id": model_id}), 410, "finished")


def test_sessions_per_owner_are_bounded(qwen3_dir: Path, tmp_path: Path) -> None:
    thread, service = _start(qwen3_dir, tmp_path / "data", max_sessions_per_owner=3, reap_interval_s=0.2)
    with (
        thread,
        TinkerHTTP(thread.url, api_key="tml-a") as alice,
        TinkerHTTP(thread.url, api_key="tml-b") as bob,
    ):
        held = [alice.session() for _ in range(3)]
        r = alice.post("create_session", {"tags": []})
        rejected(r, 429, "live sessions")
        assert r.headers["retry-after"]
        assert bob.session()  # another owner's quota is its own
        alice.post(f"sessions/{held[0]}/finish", {})
        _wait(lambda: alice.post("create_session", {"tags": []}).status_code == 200, timeout=5)
    service.close()


# server faults and links --------------------------------------------------------------------------


def test_a_server_fault_is_a_500_with_a_request_id_and_no_internals(
    live: LiveServer, alice: TinkerHTTP, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*_: Any) -> Any:
        raise RuntimeError("/secret/server/path exploded")

    monkeypatch.setattr(live.service, "session_ids", broken)
    r = alice.get("sessions")
    assert r.status_code == 500
    detail = r.json()["detail"]
    assert "/secret" not in r.text and "Traceback" not in r.text
    assert r.headers["x-request-id"] in detail
    ok = alice.get("healthz")
    assert ok.headers["x-request-id"] != r.headers["x-request-id"]


def test_links_follow_the_public_url_and_expire(qwen3_dir: Path, tmp_path: Path) -> None:
    public = "https://mintd.example.com/tenant-1"
    thread, service = _start(qwen3_dir, tmp_path / "data", None, public_url=public)
    with thread, TinkerHTTP(thread.url) as c:
        model_id = c.new_model()
        c.result(c.ok("save_weights_for_sampler", {"model_id": model_id, "seq_id": 1, "path": "p"}))
        urls = c.get(f"training_runs/{model_id}/checkpoints/sampler_weights/p/external_weights_urls").json()
        link = urls["urls"]["adapter_config.json"]
        assert link.startswith(f"{public}/api/v1/downloads/"), link
        local = thread.url + link[len(public) :]
        assert httpx.get(local).status_code == 200  # replayable until it expires, like a signed S3 URL
        claims = {"aud": "download", "sub": "local", "ref": f"{model_id.replace(':', '.')}@1"}
        expired = service_auth(thread).sign({**claims, "file": "adapter_config.json"}, -1)
        r = httpx.get(f"{thread.url}/api/v1/downloads/{expired}/adapter_config.json")
        rejected(r, 401, "expired")
    service.close()


def service_auth(thread: ServerThread) -> Any:
    return thread._server.config.app.state.auth  # noqa: SLF001 - the running app's own signer


# abuse beside a well-behaved client ---------------------------------------------------------------


def _train(c: TinkerHTTP, steps: int = 4) -> list[float]:
    model_id = c.new_model(seed=3)
    return [c.step(model_id, 1 + 2 * i, batch(i, rows=3)) for i in range(steps)]


def _abuse(url: str, stop: threading.Event) -> None:
    rnd = random.Random(0)
    with TinkerHTTP(url, api_key="tml-b") as bob:
        victim = bob.new_model()
        while not stop.is_set():
            with contextlib.suppress(httpx.HTTPError):  # a refused upload may end in a reset connection
                _one_abuse(bob, victim, rnd)


def _one_abuse(bob: TinkerHTTP, victim: str, rnd: random.Random) -> None:
    kind = rnd.randrange(6)
    if kind == 0:
        post_raw(bob, "forward_backward", sparse_request(victim, 1, 10**9), PROTOBUF)
    elif kind == 1:
        post_raw(bob, "create_session", b"[" * 100_000)
    elif kind == 2:
        bob.post("retrieve_future", {"request_id": f"req-{rnd.getrandbits(128):x}"})
    elif kind == 3:
        post_raw(bob, "forward", bytes(rnd.getrandbits(8) for _ in range(200)), PROTOBUF)
    elif kind == 4:
        post_raw(bob, "create_session", b"x" * (33 * MB))
    else:
        bob.forward_backward(victim, 10**6 + rnd.randrange(10**6), [{"model_input": 5}])


def test_abuse_does_not_move_a_well_behaved_clients_losses(live: LiveServer, alice: TinkerHTTP) -> None:
    quiet = _train(alice)
    stop = threading.Event()
    abusers = [threading.Thread(target=_abuse, args=(live.url, stop)) for _ in range(3)]
    for t in abusers:
        t.start()
    try:
        time.sleep(0.5)
        under_attack = _train(alice)
    finally:
        stop.set()
        for t in abusers:
            t.join()
    assert under_attack == pytest.approx(quiet, rel=1e-6), (quiet, under_attack)
