"""Saved checkpoints as catalog revisions, through the Tinker HTTP API of a real server: aliases resolve
for sampling, deletion is guarded, saves survive a restart, and bad input changes nothing."""

from __future__ import annotations

import io
import json
import tarfile
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from mintd.catalog import Provenance
from mintd.config import ServeSettings
from mintd.server import ServerThread, build_app
from tests.api.conftest import LiveServer, start_server
from tests.api.http import TinkerHTTP, batch
from tests.api.test_tinker_errors import rejected

PROMPT = list(range(10, 30))


def _run(c: TinkerHTTP, adapter: str | None = None, base_model: str = "tiny") -> str:
    body: dict[str, Any] = {
        "session_id": c.session(),
        "model_seq_id": 0,
        "base_model": base_model,
        "lora_config": {"rank": 4, "seed": 0},
        "user_metadata": {"adapter_name": adapter} if adapter else {},
    }
    return c.result(c.ok("create_model", body))["model_id"]


def _save(c: TinkerHTTP, model_id: str, seq: int, name: str, kind: str = "save_weights_for_sampler") -> str:
    return c.result(c.ok(kind, {"model_id": model_id, "seq_id": seq, "path": name}))["path"]


def _sample_prompt(c: TinkerHTTP, model_path: str) -> dict[str, Any]:
    """Submit one sample of PROMPT (with prompt logprobs) from a sampler made from `model_path`."""
    body = {"session_id": c.session(), "sampling_session_seq_id": 0, "model_path": model_path}
    sampler = c.ok("create_sampling_session", body)["sampling_session_id"]
    body = {
        "sampling_session_id": sampler,
        "seq_id": 0,
        "prompt": {"chunks": [{"type": "encoded_text", "tokens": PROMPT}]},
        "num_samples": 1,
        "sampling_params": {"max_tokens": 1, "temperature": 1.0, "seed": 0},
        "prompt_logprobs": True,
    }
    return c.ok("asample", body)


def _prompt_logprobs(c: TinkerHTTP, model_path: str) -> list[float]:
    """Score PROMPT under a sampler made from `model_path` (any ref)."""
    return c.result(_sample_prompt(c, model_path))["prompt_logprobs"][1:]


@pytest.fixture
def c(server: LiveServer):
    with TinkerHTTP(server.url) as client:
        yield client


def test_aliases_and_refs_name_the_same_revisions_and_guard_deletion(server: LiveServer, c: TinkerHTTP):
    model_id = _run(c, adapter="bot")
    c.step(model_id, 1, batch(0))
    first = _save(c, model_id, 3, "a")
    c.step(model_id, 4, batch(1))
    second = _save(c, model_id, 6, "b")
    catalog = httpx.Client(base_url=f"{server.url}/api/v1/catalog", headers={"X-API-Key": "tml-test"})
    assert catalog.post("/adapters/bot/aliases/prod", json={"ref": "1"}).status_code == 200

    by_path = _prompt_logprobs(c, first)
    assert _prompt_logprobs(c, "bot:prod") == by_path
    assert _prompt_logprobs(c, "local/bot@1") == by_path
    assert _prompt_logprobs(c, "bot") == _prompt_logprobs(c, second)  # newest revision
    assert _prompt_logprobs(c, "bot") != by_path

    # a revision an alias points at cannot be deleted, through the Tinker REST route either
    rejected(c.http.delete(f"/training_runs/{model_id}/checkpoints/sampler_weights/a"), 400, "prod")
    listed = c.get(f"training_runs/{model_id}/checkpoints").json()["checkpoints"]
    assert [x["checkpoint_id"] for x in listed] == ["sampler_weights/a", "sampler_weights/b"]
    assert [x["revision"] for x in listed] == ["local/bot@1", "local/bot@2"]

    assert catalog.post("/adapters/bot/aliases/prod", json={"ref": "2"}).status_code == 200
    assert c.http.delete(f"/training_runs/{model_id}/checkpoints/sampler_weights/a").status_code == 200
    listed = c.get(f"training_runs/{model_id}/checkpoints").json()["checkpoints"]
    assert [x["checkpoint_id"] for x in listed] == ["sampler_weights/b"]
    session = c.session()
    for seq, ref in enumerate([first, "bot@1"]):
        body = {"session_id": session, "sampling_session_seq_id": seq, "model_path": ref}
        rejected(c.post("create_sampling_session", body), 404, "model_path", "deleted")
    body = {"session_id": session, "sampling_session_seq_id": 5, "model_path": "bot:nope"}
    rejected(c.post("create_sampling_session", body), 404, "model_path", "bot:nope")
    catalog.close()


def test_ttl_through_the_tinker_route_sets_the_revision_expiry(server: LiveServer, c: TinkerHTTP):
    model_id = _run(c)
    path = _save(c, model_id, 1, "short", "save_weights")
    url = f"/training_runs/{model_id}/checkpoints/weights/short/ttl"
    rejected(c.http.put(url, json={"ttl_seconds": 5}), 400, "ttl_seconds")
    before = time.time()
    assert c.http.put(url, json={"ttl_seconds": 7200}).status_code == 200
    rev = server.service.revision("local", path)
    assert before + 7200 <= rev.expires_at <= time.time() + 7200
    listed = c.get(f"training_runs/{model_id}/checkpoints").json()["checkpoints"]
    assert listed[0]["expires_at"] is not None


def test_acknowledged_saves_survive_a_restart(qwen3_dir: Path, tmp_path: Path):
    data = tmp_path / "data"
    thread, service = start_server(qwen3_dir, data)
    with thread, TinkerHTTP(thread.url) as c:
        model_id = _run(c)
        c.step(model_id, 1, batch(0))
        state = _save(c, model_id, 3, "state", "save_weights")
        sampler = _save(c, model_id, 4, "sampler")
        scored = _prompt_logprobs(c, sampler)
        loss = c.loss(model_id, 5, batch(2))
    service.close()

    thread, service = start_server(qwen3_dir, data)
    with thread, TinkerHTTP(thread.url) as c:
        listed = c.get(f"training_runs/{model_id}/checkpoints").json()["checkpoints"]
        assert [x["tinker_path"] for x in listed] == [state, sampler]
        assert c.get(f"training_runs/{model_id}").json()["last_checkpoint"]["tinker_path"] == state
        assert _prompt_logprobs(c, sampler) == scored
        body = {"session_id": c.session(), "model_seq_id": 0, "path": state, "optimizer": True}
        resumed = c.result(c.ok("load_weights", body))["model_id"]
        assert c.loss(resumed, 1, batch(2)) == pytest.approx(loss, rel=1e-6)
    service.close()


def test_a_corrupt_blob_is_refused_clearly_and_nothing_changes(server: LiveServer, c: TinkerHTTP):
    model_id = _run(c)
    path = _save(c, model_id, 1, "p")
    rev = server.service.revision("local", path)
    blob = server.service.checkpoints.blobs.path(rev.content_hash)
    good = blob.read_bytes()
    bad = bytearray(good)
    bad[-100] ^= 0xFF  # one flipped bit pattern inside the weights
    blob.chmod(0o644)
    blob.write_bytes(bytes(bad))

    message = c.error(_sample_prompt(c, path))
    assert "unreadable" in message and "checksum" in message and rev.ref in message
    other = _run(c)
    message = c.error(c.ok("load_weights", {"model_id": other, "seq_id": 1, "path": path}))
    assert "checksum" in message
    assert c.loss(other, 2, batch(0)) > 0  # the run keeps its own adapter and goes on
    assert c.get("catalog/export", params={"ref": path}).status_code == 400

    assert server.service.revision("local", path) == rev  # the catalog is untouched
    blob.write_bytes(good)  # and with the bytes repaired, the same revision serves again
    assert len(_prompt_logprobs(c, path)) == len(PROMPT) - 1


def test_a_revision_of_another_base_model_is_refused(qwen3_dir: Path, llama_dir: Path, tmp_path: Path):
    app, service = build_app(
        {"tiny": qwen3_dir, "other": llama_dir}, ServeSettings(data_dir=tmp_path / "data", long_poll_s=2.0)
    )
    try:
        with ServerThread(app) as thread, TinkerHTTP(thread.url) as c:
            path = _save(c, _run(c), 1, "p")
            other = _run(c, base_model="other")
            message = c.error(c.ok("load_weights", {"model_id": other, "seq_id": 1, "path": path}))
            assert "trained on base model 'tiny'" in message
            assert c.loss(other, 2, batch(0)) > 0

            # a revision of a base model this server does not serve at all
            sha = service.checkpoints.blobs.put(b"x")
            service.catalog.register_revision(
                "local", "elsewhere", sha, "external", provenance=Provenance("e" * 64, base_model="big")
            )
            body = {"session_id": c.session(), "sampling_session_seq_id": 0, "model_path": "elsewhere"}
            rejected(c.post("create_sampling_session", body), 400, "model_path", "'big'", "does not serve")
    finally:
        service.close()


def _tar(files: dict[str, bytes], gz: bool = True) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz" if gz else "w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def test_import_refuses_malformed_archives_and_stores_nothing(server: LiveServer, c: TinkerHTTP):
    path = _save(c, _run(c), 1, "p")
    files = server.service.peft_files("local", path)
    config = json.loads(files["adapter_config.json"])
    blobs = server.service.checkpoints.blobs

    def imported(archive: bytes, base_model: str = "tiny") -> httpx.Response:
        return c.http.post("/catalog/adapters/new/import", params={"base_model": base_model}, content=archive)

    before = sorted(blobs.iter_hashes())
    for archive, words in [
        (b"not an archive", ["archive", "tar"]),
        (_tar({"adapter_config.json": files["adapter_config.json"]}), ["adapter_model.safetensors"]),
        (_tar({**files, "../evil": b"x"}), ["unexpected member"]),
        (_tar({**files, "adapter_config.json": b"{oops"}), ["archive: adapter_config.json", "json"]),
        (_tar({**files, "adapter_config.json": json.dumps({**config, "r": 8}).encode()}), ["shape"]),
        (_tar({**files, "adapter_model.safetensors": b"garbage"}), ["safetensors"]),
        (_tar(files)[:200], ["archive"]),
    ]:
        detail = rejected(imported(archive), 400, *words)
        assert "/tmp" not in detail  # names the archive's files, not the server's temporary folder
    rejected(imported(_tar(files), base_model="nope"), 400, "base_model", "nope")
    assert sorted(blobs.iter_hashes()) == before
    assert c.get("catalog/adapters/new").status_code == 404

    ok = imported(_tar({f"folder/{k}": v for k, v in files.items()}, gz=False))
    assert ok.status_code == 200, ok.text
    assert ok.json()["ref"] == "local/new@1" and ok.json()["kind"] == "external"
    assert _prompt_logprobs(c, "new") == _prompt_logprobs(c, path)  # the same adapter, served


def test_download_links_are_bound_to_their_file_and_revision(server: LiveServer, c: TinkerHTTP):
    model_id = _run(c)
    _save(c, model_id, 1, "e", "save_weights_external")
    urls = c.get(f"training_runs/{model_id}/checkpoints/external_weights/e/external_weights_urls").json()
    link = urls["urls"]["adapter_model.safetensors"]
    assert httpx.get(link).status_code == 200
    token = link.split("/")[-2]
    assert httpx.get(link.replace(token, token[:-2] + "xx")).status_code == 401  # tampered
    assert httpx.get(link.replace("adapter_model.safetensors", "adapter_config.json")).status_code == 401
    rejected(c.get("training_runs", headers={"X-API-Key": token}), 401)  # not an API credential
    assert c.http.delete(f"/training_runs/{model_id}/checkpoints/external_weights/e").status_code == 200
    assert httpx.get(link).status_code == 404


def test_a_run_can_adapt_only_some_modules(server: LiveServer, c: TinkerHTTP):
    """lora_config.target_modules (an extension: PEFT's usual q_proj + v_proj) reaches the saved revision."""
    body = {
        "session_id": c.session(),
        "model_seq_id": 0,
        "base_model": "tiny",
        "lora_config": {"rank": 4, "seed": 0, "train_mlp": False, "target_modules": ["v_proj", "q_proj"]},
    }
    model_id = c.result(c.ok("create_model", body))["model_id"]
    c.step(model_id, 1, batch(0))
    rev = server.service.revision("local", _save(c, model_id, 3, "qv"))
    lora = rev.provenance.lora_config
    assert lora["target_modules"] == ["q_proj", "v_proj"] and not lora["train_unembed"]  # the list decides
    files = server.service.peft_files("local", rev.ref)
    assert sorted(json.loads(files["adapter_config.json"])["target_modules"]) == ["q_proj", "v_proj"]

    body = {**body, "model_seq_id": 1, "lora_config": {"rank": 4, "target_modules": ["nope_proj"]}}
    rejected(c.post("create_model", body), 400, "target_modules", "nope_proj")
