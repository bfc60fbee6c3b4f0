"""Saved adapters share resident copies and stay under the device byte budget, end to end over HTTP:
a wave of more adapters than fit completes with the answers each adapter gives served alone."""

from __future__ import annotations

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
