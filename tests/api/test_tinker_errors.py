"""Malformed requests: a 4xx whose JSON `detail` names the problem, never 409/5xx (which the SDKs retry
for minutes) and never an empty body; the run and the server go on working afterwards.

A request that names a (model_id, seq_id) and is refused must still consume that seq_id: the SDK's
counter has moved on, so otherwise every later request of the run would wait for it (protocol §6.2).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from mintd.config import ServeSettings
from mintd.server import ServerThread, build_app
from tests.api.conftest import start_server
from tests.api.http import ADAM, TinkerHTTP, batch, datum

VOCAB = 1024  # the tiny test model's
CONTEXT = 4096
CLIENT_ERRORS = {400, 401, 404, 410, 413, 422, 429}


@pytest.fixture(scope="module")
def url(qwen3_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One server for the whole module: every test works in its own sessions."""
    thread, service = start_server(qwen3_dir, tmp_path_factory.mktemp("errors"))
    with thread:
        yield thread.url
    service.close()


@pytest.fixture
def client(url: str) -> Iterator[TinkerHTTP]:
    with TinkerHTTP(url) as c:
        yield c


def rejected(r: httpx.Response, status: int | set[int], *words: str) -> str:
    """Assert a client error with a JSON detail that mentions every one of `words`; the detail."""
    allowed = {status} if isinstance(status, int) else status
    assert allowed <= CLIENT_ERRORS
    assert r.status_code in allowed, f"expected {allowed}, got {r.status_code}: {r.text}"
    assert r.content, "an error body must never be empty (the SDK reads that as a connection reset)"
    assert r.headers["content-type"].startswith("application/json")
    detail = r.json().get("detail")
    assert isinstance(detail, str) and detail, r.text
    for word in words:
        assert word.lower() in detail.lower(), f"{word!r} not in detail {detail!r}"
    return detail


class Bystander:
    """Another client's training run on the same server, going on between the bad requests."""

    def __init__(self, url: str) -> None:
        self.client = TinkerHTTP(url)
        self.model_id = self.client.new_model(seed=1)
        self.seq = 1
        self.losses: list[float] = []

    def still_trains(self) -> None:
        """A good forward_backward and optim_step succeed, and the run keeps learning."""
        self.losses.append(self.client.step(self.model_id, self.seq, batch(0)))
        self.seq += 2
        assert self.losses[-1] > 0
        if len(self.losses) > 1:
            assert self.losses[-1] < self.losses[0]


@pytest.fixture(scope="module")
def bystander(url: str) -> Iterator[Bystander]:
    b = Bystander(url)
    yield b
    b.client.close()


def run_goes_on(c: TinkerHTTP, model_id: str, seq_id: int) -> None:
    """The refused seq_id was consumed: the run's next request (seq_id + 1) completes."""
    nxt = c.forward_backward(model_id, seq_id + 1, batch(1))
    assert nxt.status_code == 200, nxt.text
    c.result(nxt.json(), timeout=10)
    opt = c.optim_step(model_id, seq_id + 2)
    assert opt.status_code == 200, opt.text
    c.result(opt.json(), timeout=10)


# forward_backward bodies that must be refused ----------------------------------------------------


def _ints(data: list[Any], **extra: Any) -> dict[str, Any]:
    return {"data": data, "dtype": "int64", **extra}


def _floats(data: list[Any], **extra: Any) -> dict[str, Any]:
    return {"data": data, "dtype": "float32", **extra}


def raw(tokens: list[int], **inputs: Any) -> dict[str, Any]:
    """A Datum with exactly these loss_fn_inputs (TensorData dicts, or anything else to send as is)."""
    return {
        "model_input": {"chunks": [{"type": "encoded_text", "tokens": tokens}]},
        "loss_fn_inputs": inputs,
    }


THREE = _ints([2, 3, 4])  # targets for tokens [1, 2, 3]
ONES = _floats([1.0, 1.0, 1.0])
LONG = [i % 1000 for i in range(CONTEXT + 1)]
BAD_DATA: dict[str, tuple[list[dict[str, Any]], str, tuple[str, ...]]] = {
    # name: (data, loss_fn, words the detail must contain)
    "input token >= vocab": (
        [raw([1, VOCAB + 5, 3], target_tokens=THREE)],
        "cross_entropy",
        ("model_input", str(VOCAB)),
    ),
    "negative input token": ([raw([1, -2, 3], target_tokens=THREE)], "cross_entropy", ("model_input",)),
    "target token >= vocab": (
        [raw([1, 2, 3], target_tokens=_ints([2, 3, VOCAB]))],
        "cross_entropy",
        ("target_tokens", str(VOCAB)),
    ),
    "unknown loss_fn": ([raw([1, 2, 3], target_tokens=THREE)], "no_such_loss", ("loss_fn", "no_such_loss")),
    "target_tokens length != tokens": (
        [raw([1, 2, 3], target_tokens=_ints([2, 3]))],
        "cross_entropy",
        ("target_tokens", "3"),
    ),
    "weights length != tokens": (
        [raw([1, 2, 3], target_tokens=THREE, weights=_floats([1.0, 1.0]))],
        "cross_entropy",
        ("weights",),
    ),
    "weights shape != target shape": (
        [raw([1, 2, 3], target_tokens=_ints([1, 2, 3, 4, 5, 6], shape=[3, 2]), weights=ONES)],
        "cross_entropy",
        ("weights", "(3, 2)"),
    ),
    "zero-dim weights": (
        [raw([1, 2, 3], target_tokens=THREE, weights=_floats([1.0], shape=[]))],
        "cross_entropy",
        ("weights",),
    ),
    "RL loss without advantages": (
        [raw([1, 2, 3], target_tokens=THREE, logprobs=_floats([-1.0, -1.0, -1.0]))],
        "importance_sampling",
        ("advantages",),
    ),
    "ppo without logprobs": ([raw([1, 2, 3], target_tokens=THREE, advantages=ONES)], "ppo", ("logprobs",)),
    "advantages length != tokens": (
        [raw([1, 2, 3], target_tokens=THREE, logprobs=ONES, advantages=_floats([1.0]))],
        "cispo",
        ("advantages",),
    ),
    "datum longer than the context": (
        [raw(LONG, target_tokens=_ints(LONG))],
        "cross_entropy",
        (str(CONTEXT + 1), str(CONTEXT)),
    ),
    "empty data": ([], "cross_entropy", ("data",)),
    "empty model_input": ([raw([], target_tokens=_ints([]))], "cross_entropy", ("model_input",)),
    "no target_tokens": ([raw([1, 2, 3], weights=ONES)], "cross_entropy", ("target_tokens",)),
    "image chunk": (
        [
            {
                "model_input": {"chunks": [{"type": "image", "data": "xx"}]},
                "loss_fn_inputs": {"target_tokens": THREE},
            }
        ],
        "cross_entropy",
        ("chunks[0]", "image"),
    ),
    "tensor with a null": (
        [raw([1, 2, 3], target_tokens=[2, None, 4])],
        "cross_entropy",
        ("target_tokens", "malformed"),
    ),
    "sparse indices out of range": (
        [
            raw(
                [1, 2, 3],
                target_tokens=THREE,
                advantages=_floats(
                    [1.0], shape=[3, 1], sparse_crow_indices=[0, 1, 1, 9], sparse_col_indices=[7]
                ),
            )
        ],
        "cross_entropy",
        ("advantages", "malformed"),
    ),
    "unknown dtype": (
        [raw([1, 2, 3], target_tokens=THREE, weights={"data": [1, 1, 1], "dtype": "bfloat16"})],
        "cross_entropy",
        ("weights", "dtype"),
    ),
    "shape does not fit data": (
        [raw([1, 2, 3], target_tokens=_ints([2, 3, 4], shape=[2, 2]))],
        "cross_entropy",
        ("target_tokens",),
    ),
}


@pytest.mark.parametrize("case", list(BAD_DATA))
def test_bad_forward_backward_is_refused_and_the_run_goes_on(
    client: TinkerHTTP, bystander: Bystander, case: str
) -> None:
    data, loss_fn, words = BAD_DATA[case]
    model_id = client.new_model()
    rejected(client.forward_backward(model_id, 1, data, loss_fn), 400, *words)
    run_goes_on(client, model_id, 1)
    bystander.still_trains()


def test_forward_refusal_also_consumes_its_seq_id(client: TinkerHTTP) -> None:
    model_id = client.new_model()
    body = {"model_id": model_id, "seq_id": 1, "forward_input": {"data": [datum([1, VOCAB])]}}
    rejected(client.post("forward", body), 400, "target_tokens")
    run_goes_on(client, model_id, 1)


def test_replaying_a_refused_request_reports_the_refusal(client: TinkerHTTP) -> None:
    """The SDK may resend a request whose answer it lost; the resend must not run, nor hang."""
    model_id = client.new_model()
    rejected(
        client.forward_backward(model_id, 1, [raw([1, 2, VOCAB], target_tokens=THREE)]), 400, "model_input"
    )
    again = client.forward_backward(model_id, 1, [datum([1, 2, 3])])
    assert again.status_code == 200, again.text
    assert "model_input" in client.error(again.json(), timeout=10)
    run_goes_on(client, model_id, 1)


# optim_step -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("params", "words"),
    [
        ({"optimizer_params": {"type": "dimuon", "learning_rate": 1e-3, "version": 1}}, ("dimuon",)),
        ({"adam_params": {**ADAM, "learning_rate": -1.0}}, ("learning_rate",)),
        ({"adam_params": {**ADAM, "beta1": 1.5}}, ("beta1",)),
    ],
    ids=["unsupported optimizer", "negative lr", "beta1 >= 1"],
)
def test_bad_optim_step_is_refused_and_the_run_goes_on(
    client: TinkerHTTP, bystander: Bystander, params: dict[str, Any], words: tuple[str, ...]
) -> None:
    model_id = client.new_model()
    assert client.loss(model_id, 1, batch(0)) > 0
    rejected(client.post("optim_step", {"model_id": model_id, "seq_id": 2, **params}), 400, *words)
    run_goes_on(client, model_id, 2)
    bystander.still_trains()


# unknown objects ----------------------------------------------------------------------------------


def test_unknown_base_model(client: TinkerHTTP, bystander: Bystander) -> None:
    session = client.session()
    body = {
        "session_id": session,
        "model_seq_id": 0,
        "base_model": "Qwen/Nope-7B",
        "lora_config": {"rank": 4},
    }
    rejected(client.post("create_model", body), 400, "base_model", "Qwen/Nope-7B", "tiny")
    body = {"session_id": session, "sampling_session_seq_id": 0, "base_model": "Qwen/Nope-7B"}
    rejected(client.post("create_sampling_session", body), 400, "base_model", "Qwen/Nope-7B")
    bystander.still_trains()


@pytest.mark.parametrize(
    ("lora", "words"),
    [
        ({"rank": 0}, ("rank",)),
        ({"rank": 4, "train_attn": False, "train_mlp": False, "train_unembed": False}, ("lora_config",)),
    ],
    ids=["rank 0", "nothing to train"],
)
def test_bad_lora_config(client: TinkerHTTP, lora: dict[str, Any], words: tuple[str, ...]) -> None:
    body = {"session_id": client.session(), "model_seq_id": 0, "base_model": "tiny", "lora_config": lora}
    rejected(client.post("create_model", body), 400, *words)


def test_unknown_session(client: TinkerHTTP) -> None:
    body = {"session_id": "s-nope", "model_seq_id": 0, "base_model": "tiny", "lora_config": {"rank": 4}}
    rejected(client.post("create_model", body), 404, "s-nope")
    body = {"session_id": "s-nope", "sampling_session_seq_id": 0, "base_model": "tiny"}
    rejected(client.post("create_sampling_session", body), 404, "s-nope")
    rejected(client.post("session_heartbeat", {"session_id": "s-nope"}), 404, "s-nope")


def test_unknown_model_id(client: TinkerHTTP, bystander: Bystander) -> None:
    ghost = f"{client.session()}:train:7"
    rejected(client.forward_backward(ghost, 1, batch(0)), 404, "model_id", ghost)
    rejected(client.optim_step(ghost, 1), 404, "model_id", ghost)
    rejected(client.post("get_info", {"model_id": ghost}), 404, ghost)
    rejected(client.post("save_weights", {"model_id": ghost, "seq_id": 1, "path": "x"}), 404, ghost)
    rejected(client.get(f"training_runs/{ghost}"), 404, ghost)
    rejected(client.get(f"training_runs/{ghost}/checkpoints"), 404, ghost)
    bystander.still_trains()


def test_unknown_sampler_and_future(client: TinkerHTTP) -> None:
    body = {"sampling_session_id": "s-nope:sample:0", "seq_id": 0, "prompt": {"chunks": []}}
    rejected(client.post("asample", body), 404, "s-nope:sample:0")
    rejected(client.get("samplers/s-nope:sample:0"), 404, "s-nope:sample:0")
    r = client.post("retrieve_future", {"request_id": "req-does-not-exist"})
    assert r.status_code == 410 and "req-does-not-exist" in r.json()["detail"]  # "expired": §3.2


# tinker:// paths ----------------------------------------------------------------------------------


def _saved_sampler_path(c: TinkerHTTP) -> tuple[str, str]:
    model_id = c.new_model()
    saved = c.ok("save_weights_for_sampler", {"model_id": model_id, "seq_id": 1, "path": "ckpt"})
    return model_id, c.result(saved)["path"]


def test_unknown_tinker_paths_are_404(client: TinkerHTTP, bystander: Bystander) -> None:
    model_id, path = _saved_sampler_path(client)
    session = client.session()
    for seq, bogus in enumerate(
        [
            "tinker://s-nope:train:0/sampler_weights/ckpt",  # no such run
            f"tinker://{model_id}/sampler_weights/not-saved",  # the run exists, the checkpoint does not
            f"tinker://{model_id}/weights/ckpt",  # only a sampler checkpoint of that name exists
        ]
    ):
        body = {"session_id": session, "sampling_session_seq_id": seq, "model_path": bogus}
        rejected(client.post("create_sampling_session", body), 404, "model_path", bogus)
        rejected(client.post("weights_info", {"tinker_path": bogus}), 404, bogus)
        body = {"session_id": session, "model_seq_id": seq, "path": bogus, "optimizer": False}
        refused_or_failed(client, client.post("load_weights", body), 404, bogus)  # create-via-load
    # a real path works (the 404s above were not a broken sampler path)
    body = {"session_id": session, "sampling_session_seq_id": 9, "model_path": path}
    assert client.ok("create_sampling_session", body)["sampling_session_id"]
    bystander.still_trains()


def refused_or_failed(c: TinkerHTTP, r: httpx.Response, status: int, *words: str) -> None:
    """Refused at once (4xx), or accepted as a future that fails with a message naming `words`.

    A checkpoint that is only missing on disk is found out when the engine worker reads it."""
    if r.status_code == 200:
        message = c.error(r.json(), timeout=10)
        for word in words:
            assert word in message, f"{word!r} not in {message!r}"
    else:
        rejected(r, status, *words)


@pytest.mark.parametrize(
    "path",
    ["tinker://s-nope:train:0/weights/ckpt", "tinker://{model_id}/weights/never-saved"],
    ids=["no such run", "no such checkpoint"],
)
def test_load_weights_with_unknown_path_leaves_the_run_going(client: TinkerHTTP, path: str) -> None:
    model_id = client.new_model()
    path = path.format(model_id=model_id)
    refused_or_failed(
        client, client.post("load_weights", {"model_id": model_id, "seq_id": 1, "path": path}), 404, path
    )
    run_goes_on(client, model_id, 1)


@pytest.mark.parametrize(
    ("bad", "named"),
    [
        ("s3://bucket/run/weights/x", "s3://bucket/run/weights/x"),
        ("tinker://only-two/parts", "tinker://only-two/parts"),
        ("tinker://run/weights/a/b", "tinker://run/weights/a/b"),
        ("tinker://run//x", "tinker://run//x"),
        ("tinker://run/checkpoints/x", "'checkpoints'"),  # names the unknown kind
    ],
)
def test_malformed_tinker_paths_are_400(client: TinkerHTTP, bad: str, named: str) -> None:
    session = client.session()
    body = {"session_id": session, "sampling_session_seq_id": 0, "model_path": bad}
    rejected(client.post("create_sampling_session", body), 400, "model_path", named)
    rejected(client.post("weights_info", {"tinker_path": bad}), 400, "tinker_path")
    body = {"session_id": session, "model_seq_id": 0, "path": bad, "optimizer": True}
    rejected(client.post("load_weights", body), 400, "path")
    model_id = client.create_model(session, model_seq_id=1)
    rejected(client.post("load_weights", {"model_id": model_id, "seq_id": 1, "path": bad}), 400, "path")
    run_goes_on(client, model_id, 1)


def test_bad_checkpoint_names_and_ttls(client: TinkerHTTP) -> None:
    model_id = client.new_model()
    body = {"model_id": model_id, "seq_id": 1, "path": "no/slashes"}
    rejected(client.post("save_weights", body), 400, "path", "no/slashes")
    body = {"model_id": model_id, "seq_id": 2, "path": "ok", "ttl_seconds": 5}
    rejected(client.post("save_weights", body), 400, "ttl_seconds")
    saved = client.ok("save_weights", {"model_id": model_id, "seq_id": 3, "path": "ok"})
    assert client.result(saved)["path"] == f"tinker://{model_id}/weights/ok"
    again = client.ok("save_weights", {"model_id": model_id, "seq_id": 4, "path": "ok"})
    assert "already exists" in client.error(again)  # a 4xx-category future error, not 409


# sampling -----------------------------------------------------------------------------------------


def _sampler(c: TinkerHTTP) -> str:
    body = {"session_id": c.session(), "sampling_session_seq_id": 0, "base_model": "tiny"}
    return c.ok("create_sampling_session", body)["sampling_session_id"]


def _sample(sampler: str, tokens: list[int], **extra: Any) -> dict[str, Any]:
    return {
        "sampling_session_id": sampler,
        "seq_id": 0,
        "prompt": {"chunks": [{"type": "encoded_text", "tokens": tokens}]},
        "num_samples": 1,
        "sampling_params": {"max_tokens": 4, "temperature": 1.0},
        **extra,
    }


@pytest.mark.parametrize(
    ("extra", "tokens", "status", "words"),
    [
        ({"sampling_params": {"max_tokens": CONTEXT}}, [1, 2, 3], 400, ("max_tokens", str(CONTEXT))),
        (
            {"sampling_params": {"max_tokens": 8}},
            [i % 1000 + 1 for i in range(CONTEXT - 1)],
            400,
            ("max_tokens", "context"),
        ),
        ({}, [1, VOCAB + 1], 400, ("prompt", str(VOCAB))),
        ({}, [], 400, ("prompt",)),
        ({"sampling_params": {"max_tokens": 0}}, [1, 2], 400, ("max_tokens",)),
        ({"sampling_params": {"top_k": 0}}, [1, 2], 400, ("top_k",)),
        ({"sampling_params": {"stop": [VOCAB + 3]}}, [1, 2], 400, ("stop",)),
        ({"num_samples": 0}, [1, 2], 422, ("num_samples",)),
        ({"topk_sample_logprobs": 3}, [1, 2], 400, ("topk_sample_logprobs",)),
        (
            {"num_samples": 64, "sampling_params": {"max_tokens": CONTEXT // 2}},
            [1, 2],
            400,
            ("max_tokens", "KV cache", "MINTD_KV_CACHE_TOKENS"),
        ),
    ],
    ids=[
        "max_tokens beyond context",
        "long prompt + max_tokens beyond context",
        "prompt token >= vocab",
        "empty prompt",
        "max_tokens 0",
        "top_k 0",
        "stop token >= vocab",
        "num_samples 0",
        "unsupported topk_sample_logprobs",
        "samples beyond the KV cache",
    ],
)
def test_bad_sample_requests(
    client: TinkerHTTP,
    bystander: Bystander,
    extra: dict[str, Any],
    tokens: list[int],
    status: int,
    words: tuple[str, ...],
) -> None:
    sampler = _sampler(client)
    rejected(client.post("asample", _sample(sampler, tokens, **extra)), status, *words)
    good = _sample(sampler, [1, 2, 3], seq_id=1, sampling_params={"max_tokens": 4, "stop": []})
    ok = client.ok("asample", good)  # the same sampler still samples
    assert len(client.result(ok)["sequences"][0]["tokens"]) == 4
    bystander.still_trains()


# bodies the schema refuses --------------------------------------------------------------------------


def test_schema_errors_are_4xx_naming_the_field(client: TinkerHTTP) -> None:
    rejected(
        client.post("create_model", {"session_id": client.session(), "model_seq_id": 0}), 422, "base_model"
    )
    rejected(client.post("optim_step", {"model_id": "m", "seq_id": "one"}), 422, "seq_id")
    rejected(client.post("retrieve_future", {}), 422, "request_id")
    r = client.http.post(
        "/forward_backward", content=b"{not json", headers={"content-type": "application/json"}
    )
    rejected(r, {400, 422})
    model_id = client.new_model()
    body = {"model_id": model_id, "seq_id": 0, "forward_backward_input": {"data": batch(0)}}
    rejected(client.post("forward_backward", body), 400, "seq_id")


# credentials --------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", [None, "", "k" * 5000], ids=["missing", "empty", "oversized"])
def test_missing_or_malformed_api_key_is_401(url: str, key: str | None) -> None:
    headers = {} if key is None else {"X-API-Key": key}
    with httpx.Client(base_url=f"{url}/api/v1", timeout=10) as http:
        for path in ("create_session", "auth/token", "retrieve_future"):
            r = http.post(f"/{path}", json={"tags": [], "request_id": "x"}, headers=headers)
            rejected(r, 401, "X-API-Key")
        r = http.get("/training_runs", headers=headers)
        rejected(r, 401)


def test_forged_or_garbled_jwt_is_401(url: str) -> None:
    with TinkerHTTP(url) as c:
        jwt = c.ok("auth/token")["jwt"]
    header, payload, _ = jwt.split(".")
    for token in (f"{header}.{payload}.AAAA", f"{header}.{payload[:-4]}xxxx.{jwt.split('.')[2]}"):
        with TinkerHTTP(url, api_key=token) as forged:
            rejected(forged.post("create_session", {"tags": []}), 401, "token")
    with TinkerHTTP(url, api_key=jwt) as real:
        assert real.session()


# owners -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def keyed_url(qwen3_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    settings = ServeSettings(data_dir=tmp_path_factory.mktemp("keyed"), long_poll_s=2.0)
    app, service = build_app({"tiny": qwen3_dir}, settings, api_keys=["alice=tml-a", "bob=tml-b"])
    with ServerThread(app) as thread:
        yield thread.url
    service.close()


def test_unknown_key_is_401_when_keys_are_configured(keyed_url: str) -> None:
    with TinkerHTTP(keyed_url, api_key="tml-test") as stranger:
        rejected(stranger.post("create_session", {"tags": []}), 401, "unknown API key")
        rejected(stranger.post("auth/token"), 401, "unknown API key")
    with TinkerHTTP(keyed_url, api_key="tml-a") as alice:
        assert alice.session()


def test_owners_cannot_see_each_others_runs(keyed_url: str) -> None:
    with TinkerHTTP(keyed_url, api_key="tml-a") as alice, TinkerHTTP(keyed_url, api_key="tml-b") as bob:
        model_id, path = _saved_sampler_path(alice)
        session = model_id.split(":")[0]
        assert alice.ok("get_info", {"model_id": model_id})["model_id"] == model_id
        assert alice.get(f"training_runs/{model_id}/checkpoints").json()["checkpoints"]

        rejected(bob.post("get_info", {"model_id": model_id}), 404, model_id)
        rejected(bob.get(f"training_runs/{model_id}/checkpoints"), 404, model_id)
        rejected(bob.get(f"training_runs/{model_id}"), 404, model_id)
        assert bob.get("training_runs").json()["training_runs"] == []
        rejected(bob.forward_backward(model_id, 2, batch(0)), 404, model_id)
        rejected(bob.post("weights_info", {"tinker_path": path}), 404)
        rejected(bob.get(f"sessions/{session}"), 404, session)
        bob_session = bob.session()
        body = {"session_id": bob_session, "sampling_session_seq_id": 0, "model_path": path}
        rejected(bob.post("create_sampling_session", body), 404, "model_path")
        body = {"session_id": bob_session, "model_seq_id": 0, "path": path, "optimizer": False}
        rejected(bob.post("load_weights", body), 404, "path")
        body = {"session_id": session, "model_seq_id": 1, "base_model": "tiny", "lora_config": {"rank": 4}}
        rejected(bob.post("create_model", body), 404, session)  # nor create runs in alice's session
        r = bob.http.delete(f"/training_runs/{model_id}/checkpoints/sampler_weights/ckpt")
        rejected(r, 404)
        checkpoint = f"training_runs/{model_id}/checkpoints/sampler_weights/ckpt"
        rejected(bob.http.put(f"/{checkpoint}/ttl", json={"ttl_seconds": 3600}), 404)
        rejected(bob.get(f"{checkpoint}/external_weights_urls"), 404)
        rejected(bob.get(f"{checkpoint}/archive", follow_redirects=False), 404)
        rejected(bob.get("catalog/export", params={"ref": path}), 404)
        revision = alice.get("catalog/resolve", params={"ref": path}).json()["ref"]
        rejected(bob.get("catalog/resolve", params={"ref": revision}), 404)
        link = alice.get(f"{checkpoint}/external_weights_urls").json()["urls"]["adapter_config.json"]
        assert httpx.get(link).status_code == 200  # a signed link is for whoever holds it, like S3's

        with TinkerHTTP(keyed_url, api_key=bob.ok("auth/token")["jwt"]) as bob_jwt:  # JWT: same owner
            rejected(bob_jwt.post("get_info", {"model_id": model_id}), 404, model_id)

        # bob's attempts changed nothing for alice: her run goes on and her checkpoint is still there
        assert alice.step(model_id, 2, batch(0)) > 0
        listed = alice.get(f"training_runs/{model_id}/checkpoints").json()["checkpoints"]
        assert [c["tinker_path"] for c in listed] == [path]
        server_still_works_as(keyed_url, "tml-b")


def server_still_works_as(url: str, key: str) -> None:
    with TinkerHTTP(url, api_key=key) as c:
        model_id = c.new_model()
        assert c.step(model_id, 1, batch(2)) > 0
