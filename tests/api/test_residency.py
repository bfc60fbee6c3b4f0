"""Saved adapters share resident copies and stay under the device byte budget, end to end over HTTP:
a wave of more adapters than fit completes with the answers each adapter gives served alone."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tests.api.conftest import start_server
from tests.api.http import TinkerHTTP, batch

ADAPTERS, FIT = 8, 3
PROMPT = {"chunks": [{"type": "encoded_text", "tokens": [5, 17, 33, 2]}]}


def _sample_body(sampler: str, seq_id: int) -> dict[str, Any]:
    params = {"max_tokens": 6, "temperature": 0.0}
    return {"sampling_session_id": sampler, "seq_id": seq_id, "prompt": PROMPT, "sampling_params": params}


def _sampler(c: TinkerHTTP, session: str, seq: int, path: str) -> str:
    body = {"session_id": session, "sampling_session_seq_id": seq, "model_path": path}
    return c.ok("create_sampling_session", body)["sampling_session_id"]


def _tokens(result: dict[str, Any]) -> list[int]:
    return result["sequences"][0]["tokens"]


@pytest.fixture(scope="module")
def saved(qwen3_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str], list, int]:
    """Eight distinct trained adapters saved on one server, and what each samples served alone."""
    data_dir = tmp_path_factory.mktemp("residency")
    server, service = start_server(qwen3_dir, data_dir)
    paths, alone = [], []
    with server, TinkerHTTP(server.url) as c:
        session = c.session()
        for i in range(ADAPTERS):
            model_id = c.create_model(session, i, seed=i)
            c.step(model_id, 1, batch(i, rows=2))
            out = c.result(c.ok("save_weights_for_sampler", {"model_id": model_id, "seq_id": 3, "path": "s"}))
            paths.append(out["path"])
            alone.append(
                _tokens(c.result(c.ok("asample", _sample_body(_sampler(c, session, i, out["path"]), 1))))
            )
        size = max(service.catalog.resolve("local", p).size_bytes for p in paths)
    service.close()
    assert len({tuple(t) for t in alone}) > 1, "the adapters should answer differently"
    return data_dir, paths, alone, size


def test_a_wave_larger_than_the_budget_completes_within_it(qwen3_dir: Path, saved: Any) -> None:
    data_dir, paths, alone, size = saved
    server, service = start_server(qwen3_dir, data_dir, adapter_device_budget=FIT * size)
    residency = service.models["tiny"].worker.residency
    with server, TinkerHTTP(server.url) as c:
        session = c.session()
        samplers = [_sampler(c, session, i, p) for i, p in enumerate(paths)]
        for round_no in (1, 2):  # the whole wave at once, twice: the second finds only FIT resident
            submitted = [c.ok("asample", _sample_body(s, round_no)) for s in samplers]
            got = [_tokens(c.result(s)) for s in submitted]
            assert got == alone
            stats = residency.stats()
            assert stats["device_peak_bytes"] <= FIT * size, stats
            assert stats["resident_adapters"] <= FIT
        assert stats["evictions"] >= ADAPTERS, stats
        assert c.get("residency").json()["models"]["tiny"]["device_budget_bytes"] == FIT * size
    service.close()


def test_samplers_of_one_revision_share_one_copy(qwen3_dir: Path, saved: Any) -> None:
    data_dir, paths, alone, _ = saved
    server, service = start_server(qwen3_dir, data_dir)
    residency = service.models["tiny"].worker.residency
    with server, TinkerHTTP(server.url) as c:
        adapter = service.catalog.resolve("local", paths[0])
        service.catalog.promote("local", adapter.adapter, "prod", adapter.number)
        refs = [paths[0], f"tinker://adapters/{adapter.adapter}:prod", f"tinker://adapters/{adapter.ref}"]
        session = c.session()
        samplers = [_sampler(c, session, i, refs[i % len(refs)]) for i in range(20)]
        got = [_tokens(c.result(c.ok("asample", _sample_body(s, 1)))) for s in samplers]
        assert got == [alone[0]] * 20
        stats = residency.stats()
        assert (stats["misses"], stats["resident_adapters"]) == (1, 1), stats
        assert stats["hits"] == 19
    service.close()


def test_the_cli_shows_a_running_servers_residency(qwen3_dir: Path, saved: Any) -> None:
    from typer.testing import CliRunner

    from mintd.cli import app as cli

    data_dir, paths, _, _ = saved
    server, service = start_server(qwen3_dir, data_dir)
    with server, TinkerHTTP(server.url) as c:
        c.result(c.ok("asample", _sample_body(_sampler(c, c.session(), 0, paths[0]), 1)))
        shown = CliRunner().invoke(cli, ["residency", "--url", server.url], env={"COLUMNS": "250"})
    service.close()
    assert shown.exit_code == 0, shown.output
    assert "tiny" in shown.output and "4,294,967,296" in shown.output  # the default 4 GiB budget
    refused = CliRunner().invoke(cli, ["residency", "--url", "http://127.0.0.1:9"])
    assert refused.exit_code != 0 and "cannot reach" in refused.output


def test_a_corrupt_blob_fails_only_its_own_requests_and_is_not_kept(qwen3_dir: Path, saved: Any) -> None:
    data_dir, paths, alone, _ = saved
    server, service = start_server(qwen3_dir, data_dir)
    residency = service.models["tiny"].worker.residency
    blob = service.checkpoints.blobs.path(service.catalog.resolve("local", paths[1]).content_hash)
    good = blob.read_bytes()
    bad = bytearray(good)
    bad[-100] ^= 0xFF
    blob.chmod(0o644)
    try:
        blob.write_bytes(bytes(bad))
        with server, TinkerHTTP(server.url) as c:
            session = c.session()
            samplers = [_sampler(c, session, i, p) for i, p in enumerate(paths[:3])]
            submitted = [c.ok("asample", _sample_body(s, 1)) for s in samplers]  # one wave, one batch
            assert "checksum" in c.error(submitted[1])
            assert [_tokens(c.result(submitted[i])) for i in (0, 2)] == [alone[0], alone[2]]
            assert residency.stats()["resident_adapters"] == 2  # the corrupt one was not kept
            blob.write_bytes(good)  # repaired, the same revision loads and serves
            assert _tokens(c.result(c.ok("asample", _sample_body(samplers[1], 2)))) == alone[1]
    finally:
        blob.write_bytes(good)
        service.close()


def _cold_wave_gate(service: Any, cold: set[str]) -> threading.Event:
    """Hold the loader's reads of the `cold` revisions until the returned event is set (a slow disk)."""
    opened = threading.Event()
    read = service.checkpoints.read_for

    def slow_read(engine: Any, rev: Any, field: str = "path") -> Any:
        if rev.content_hash in cold:
            opened.wait(30)
        return read(engine, rev, field)

    service.checkpoints.read_for = slow_read
    return opened


def test_resident_traffic_keeps_flowing_while_a_cold_wave_loads(qwen3_dir: Path, saved: Any) -> None:
    data_dir, paths, alone, size = saved
    server, service = start_server(qwen3_dir, data_dir, adapter_device_budget=FIT * size)
    hot, cold = paths[:2], paths[2:]
    with server, TinkerHTTP(server.url) as c:
        session = c.session()
        hot_samplers = [_sampler(c, session, i, p) for i, p in enumerate(hot)]
        for s in hot_samplers:  # resident now
            c.result(c.ok("asample", _sample_body(s, 1)))
        gate = _cold_wave_gate(service, {service.catalog.resolve("local", p).content_hash for p in cold})
        cold_samplers = [_sampler(c, session, 10 + i, p) for i, p in enumerate(cold)]
        waiting = [c.ok("asample", _sample_body(s, 1)) for s in cold_samplers]
        for seq in range(2, 6):  # the hot adapters answer while every cold load is still held
            got = [_tokens(c.result(c.ok("asample", _sample_body(s, seq)))) for s in hot_samplers]
            assert got == alone[:2]
        stats = service.models["tiny"].worker.residency.stats()
        assert stats["loads_queued"] + stats["loads_in_flight"] == len(cold), stats
        assert all(
            c.post("retrieve_future", {"request_id": w["request_id"]}).json().get("type") == "try_again"
            for w in waiting
        )
        gate.set()
        assert [_tokens(c.result(w)) for w in waiting] == alone[2:]
        assert service.models["tiny"].worker.residency.stats()["device_peak_bytes"] <= FIT * size
    service.close()


def test_a_full_load_queue_answers_429_with_retry_after(qwen3_dir: Path, saved: Any) -> None:
    data_dir, paths, alone, _ = saved
    server, service = start_server(qwen3_dir, data_dir, max_load_queue=2)
    with server, TinkerHTTP(server.url) as c:
        gate = _cold_wave_gate(service, {service.catalog.resolve("local", p).content_hash for p in paths})
        session = c.session()
        samplers = [_sampler(c, session, i, p) for i, p in enumerate(paths[:3])]
        accepted = [c.ok("asample", _sample_body(s, 1)) for s in samplers[:2]]
        refused = c.post("asample", _sample_body(samplers[2], 1))
        assert refused.status_code == 429, refused.text
        assert int(refused.headers["Retry-After"]) >= 1
        assert "load" in refused.json()["detail"]
        again = c.post("asample", _sample_body(samplers[0], 2))  # its load is queued already: accepted
        assert again.status_code == 200, again.text
        gate.set()
        assert [_tokens(c.result(a)) for a in accepted] == alone[:2]
        assert _tokens(c.result(again.json())) == alone[0]
        retried = c.ok("asample", _sample_body(samplers[2], 1))  # the backlog drained: the retry goes in
        assert _tokens(c.result(retried)) == alone[2]
    service.close()


def _train_with_pauses(c: TinkerHTTP, pause_s: float) -> tuple[list[float], str]:
    """Three steps, pausing after each forward_backward (gradients held) and each optim_step; the
    losses and the content hash of the saved state (weights and optimizer state, bit for bit)."""
    model_id = c.create_model(c.session(), 0, seed=7)
    losses = []
    for k in range(3):
        losses.append(c.loss(model_id, 2 * k + 1, batch(k, rows=3)))
        time.sleep(pause_s)
        c.result(c.optim_step(model_id, 2 * k + 2).json())
        time.sleep(pause_s)
    losses.append(c.loss(model_id, 7, batch(9, rows=3)))
    body = {"model_id": model_id, "seq_id": 8, "path": "state", "type": "save_weights"}
    return losses, c.result(c.ok("save_weights", body))["revision"]


def test_a_parked_training_run_resumes_bit_exactly(qwen3_dir: Path, tmp_path: Path) -> None:
    outcomes = {}
    for name, park_after_s, pause_s in (("control", 3600.0, 0.0), ("parked", 0.2, 0.8)):
        server, service = start_server(qwen3_dir, tmp_path / name, run_park_after_s=park_after_s)
        with server, TinkerHTTP(server.url) as c:
            losses, ref = _train_with_pauses(c, pause_s)
            stats = service.models["tiny"].worker.residency.stats()
            outcomes[name] = (losses, service.catalog.resolve("local", ref).content_hash, stats)
        service.close()
    control, parked = outcomes["control"], outcomes["parked"]
    assert parked[2]["parks"] >= 6 and parked[2]["unparks"] >= 6, parked[2]
    assert control[2]["parks"] == 0
    assert parked[0] == control[0]  # exactly: the same tensors, moved and back
    assert parked[1] == control[1]  # weights and Adam state bit-identical
