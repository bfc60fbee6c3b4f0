"""/api/v1/catalog on a real server; revisions are registered through `Catalog` on the same data dir."""

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from mintd.catalog import Catalog, CatalogDB, Provenance
from mintd.config import CatalogSettings, ServeSettings
from mintd.server import ServerThread, build_app
from mintd.store.blobs import BlobStore
from tests.api.conftest import LiveServer

FP = "f" * 64


def _catalog(data_dir: Path) -> Catalog:
    return Catalog(CatalogDB.from_settings(CatalogSettings(), data_dir))


def _register(cat: Catalog, data_dir: Path, owner: str, adapter: str, content: bytes, **kw) -> str:
    sha = BlobStore(data_dir / "blobs").put(content)
    kind = kw.pop("kind", "sampler")
    rev = cat.register_revision(
        owner, adapter, sha, kind, provenance=Provenance(FP, base_model="tiny"), size_bytes=len(content), **kw
    )
    return rev.ref


@pytest.fixture
def api(server: LiveServer, tmp_path: Path) -> Iterator[tuple[httpx.Client, Catalog, Path]]:
    data = tmp_path / "data"
    with httpx.Client(base_url=f"{server.url}/api/v1/catalog", headers={"X-API-Key": "tml-x"}) as http:
        yield http, _catalog(data), data


def _ok(resp: httpx.Response) -> dict:
    assert resp.status_code == 200, resp.text
    return resp.json()


def test_browse_resolve_lineage(api) -> None:
    http, cat, data = api
    assert _ok(http.get("/adapters")) == {"adapters": []}
    r1 = _register(cat, data, "local", "math", b"one", tinker_path="tinker://run1/sampler_weights/s1")
    r2 = _register(cat, data, "local", "math", b"two", parents=[r1])
    _register(cat, data, "local", "mathy", b"three")
    _register(cat, data, "local", "code", b"four")
    assert r1 == "local/math@1" and r2 == "local/math@2"

    names = [a["name"] for a in _ok(http.get("/adapters"))["adapters"]]
    assert names == ["code", "math", "mathy"]
    assert [a["name"] for a in _ok(http.get("/adapters", params={"prefix": "math"}))["adapters"]] == [
        "math",
        "mathy",
    ]
    page = _ok(http.get("/adapters", params={"limit": 1, "offset": 1}))["adapters"]
    assert [a["name"] for a in page] == ["math"]

    show = _ok(http.get("/adapters/math"))
    assert show["adapter"]["name"] == "math" and show["adapter"]["last_number"] == 2
    assert [r["ref"] for r in show["revisions"]] == [r2, r1]
    assert show["revisions"][1]["provenance"]["base_fingerprint"] == FP
    assert show["aliases"] == []
    assert [r["number"] for r in _ok(http.get("/adapters/math/log"))["revisions"]] == [2, 1]
    assert [r["number"] for r in _ok(http.get("/adapters/math/log", params={"before": 2}))["revisions"]] == [
        1
    ]

    _ok(http.post("/adapters/math/aliases/prod", json={"ref": "1"}))
    for ref, number in [
        ("math", 2),
        ("math@1", 1),
        ("math:prod", 1),
        ("local/math", 2),
        ("local/math@2", 2),
        ("local/math:prod", 1),
        ("tinker://run1/sampler_weights/s1", 1),
    ]:
        got = _ok(http.get("/resolve", params={"ref": ref}))
        assert (got["adapter"], got["number"]) == ("math", number), ref
    assert http.get("/resolve", params={"ref": "math@9"}).status_code == 404
    assert http.get("/resolve", params={"ref": "someone/math"}).status_code == 404
    bad = http.get("/resolve", params={"ref": "math@x"})
    assert bad.status_code == 400 and "ref" in bad.json()["detail"]
    assert http.get("/adapters/nope").status_code == 404

    lineage = _ok(http.get("/lineage", params={"ref": "math"}))
    assert lineage["revision"]["ref"] == r2
    assert [r["ref"] for r in lineage["ancestors"]] == [r1]


def test_evaluations_promote_rollback_delete_audit(api) -> None:
    http, cat, data = api
    _register(cat, data, "local", "math", b"one")
    _register(cat, data, "local", "math", b"two")

    gate = {"suite": "gsm8k", "metric": "acc", "threshold": 0.5}
    refused = http.post("/adapters/math/aliases/prod", json={"ref": "@2", "gate": gate})
    assert refused.status_code == 400 and "gate" in refused.json()["detail"]

    ev = _ok(
        http.post(
            "/adapters/math/evaluations",
            json={"ref": "2", "suite": "gsm8k", "metric": "acc", "value": 0.7, "evaluator": "ci", "x": 1},
        )
    )
    assert ev["revision"] == "local/math@2" and ev["value"] == 0.7 and ev["evaluator"] == "ci"
    _ok(
        http.post(
            "/adapters/math/evaluations", json={"ref": "math@1", "suite": "s", "metric": "m", "value": 1}
        )
    )
    listed = _ok(http.get("/adapters/math/evaluations"))  # default: newest revision
    assert listed["revision"] == "local/math@2" and [e["suite"] for e in listed["evaluations"]] == ["gsm8k"]
    assert [
        e["suite"] for e in _ok(http.get("/adapters/math/evaluations", params={"ref": "@1"}))["evaluations"]
    ] == ["s"]
    _register(cat, data, "local", "other", b"three")
    wrong = http.post(
        "/adapters/math/evaluations", json={"ref": "other", "suite": "s", "metric": "m", "value": 1}
    )
    assert wrong.status_code == 400 and "not a revision of adapter" in wrong.json()["detail"]
    assert http.post("/adapters/math/evaluations", json={"ref": "1"}).status_code == 422

    alias = _ok(http.post("/adapters/math/aliases/prod", json={"ref": "@2", "gate": gate}))
    assert alias["number"] == 2 and alias["ref"] == "local/math:prod"
    _ok(http.post("/adapters/math/aliases/prod", json={"ref": "1"}))
    assert _ok(http.get("/resolve", params={"ref": "math:prod"}))["number"] == 1
    assert _ok(http.post("/adapters/math/aliases/prod/rollback"))["number"] == 2
    assert _ok(http.get("/resolve", params={"ref": "math:prod"}))["number"] == 2
    again = http.post("/adapters/math/aliases/prod/rollback")
    assert again.status_code == 400 and "roll back" in again.json()["detail"]
    assert http.post("/adapters/math/aliases/nope/rollback").status_code == 404

    protected = http.delete("/revisions", params={"ref": "math@2"})
    assert protected.status_code == 400 and "prod" in protected.json()["detail"]
    deleted = _ok(http.delete("/revisions", params={"ref": "math@1"}))
    assert deleted["deleted_at"] is not None
    assert http.get("/resolve", params={"ref": "math@1"}).status_code == 404

    actions = [e["action"] for e in _ok(http.get("/audit"))["entries"]]
    assert actions[0] == "revision.delete"
    assert {"alias.promote", "alias.rollback", "evaluation.add", "revision.register"} <= set(actions)
    math_only = _ok(http.get("/audit", params={"adapter": "math", "limit": 500}))["entries"]
    assert all(e["subject"].startswith("local/math") for e in math_only)
    assert len(_ok(http.get("/audit", params={"limit": 2}))["entries"]) == 2


def test_tenant_isolation(qwen3_dir: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    app, service = build_app(
        {"tiny": qwen3_dir}, ServeSettings(data_dir=data, long_poll_s=2.0), ["alice=key-a", "bob=key-b"]
    )
    cat = _catalog(data)
    _register(cat, data, "alice", "secret", b"one", tinker_path="tinker://runA/sampler_weights/s")
    _register(cat, data, "alice", "secret", b"two")
    cat.promote("alice", "secret", "prod", 1)
    try:
        with ServerThread(app) as thread:
            base = f"{thread.url}/api/v1/catalog"
            alice = httpx.Client(base_url=base, headers={"X-API-Key": "key-a"})
            bob = httpx.Client(base_url=base, headers={"X-API-Key": "key-b"})
            eval_body = {"ref": "1", "suite": "s", "metric": "m", "value": 1.0}
            calls = [
                ("GET", "/adapters/secret", None, None),
                ("GET", "/adapters/secret/log", None, None),
                ("GET", "/adapters/secret/evaluations", None, None),
                ("GET", "/resolve", {"ref": "secret"}, None),
                ("GET", "/resolve", {"ref": "alice/secret@1"}, None),
                ("GET", "/resolve", {"ref": "secret:prod"}, None),
                ("GET", "/resolve", {"ref": "tinker://runA/sampler_weights/s"}, None),
                ("GET", "/lineage", {"ref": "alice/secret"}, None),
                ("GET", "/audit", {"adapter": "secret"}, None),
                ("POST", "/adapters/secret/evaluations", None, eval_body),
                ("POST", "/adapters/secret/aliases/prod", None, {"ref": "2"}),
                ("POST", "/adapters/secret/aliases/prod/rollback", None, None),
                ("DELETE", "/revisions", {"ref": "alice/secret@2"}, None),
                ("GET", "/export", {"ref": "secret:prod"}, None),
                ("GET", "/export", {"ref": "tinker://runA/sampler_weights/s"}, None),
            ]
            for method, path, params, body in calls:
                resp = bob.request(method, path, params=params, json=body)
                assert resp.status_code == 404, (method, path, params, resp.text)
                assert "alice" not in resp.json()["detail"] or "alice/" in str(params)
            assert _ok(bob.get("/adapters")) == {"adapters": []}
            assert _ok(bob.get("/audit")) == {"entries": []}
            # nothing bob tried changed anything; alice still sees it all
            assert _ok(alice.get("/resolve", params={"ref": "secret:prod"}))["number"] == 1
            assert [a["name"] for a in _ok(alice.get("/adapters"))["adapters"]] == ["secret"]
            assert _ok(alice.get("/adapters/secret/evaluations", params={"ref": "1"}))["evaluations"] == []
            assert _ok(alice.get("/resolve", params={"ref": "secret@2"}))["deleted_at"] is None
            assert httpx.get(f"{base}/adapters", headers={"X-API-Key": "nope"}).status_code == 401
            alice.close()
            bob.close()
    finally:
        service.close()


def test_no_catalog_no_routes(qwen3_dir: Path) -> None:
    from fastapi.testclient import TestClient

    from mintd.api.app import create_app
    from mintd.api.auth import Authenticator

    app = create_app(object(), Authenticator({}, b"s"))  # type: ignore[arg-type]
    with TestClient(app) as client:
        assert client.get("/api/v1/catalog/adapters", headers={"X-API-Key": "k"}).status_code == 404
