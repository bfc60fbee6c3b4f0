"""A tiny raw-HTTP Tinker client for tests that need precise control over what goes on the wire.

Bodies follow the 0.22 JSON forms of tinker-protocol.md §2; results are fetched by polling
retrieve_future (no protobuf Accept header, so forward_backward results come back as JSON).
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import httpx

API_KEY = "tml-test"
ADAM = {"learning_rate": 1e-2, "beta1": 0.9, "beta2": 0.95, "eps": 1e-8, "weight_decay": 0.0}


def datum(
    tokens: list[int],
    targets: list[int] | None = None,
    weights: list[float] | None = None,
    **extra: dict[str, Any],
) -> dict[str, Any]:
    """A Datum: by default `tokens[:-1]` predicts `tokens[1:]` with unit weights."""
    if targets is None:
        tokens, targets = tokens[:-1], tokens[1:]
    inputs: dict[str, Any] = {"target_tokens": {"data": list(targets), "dtype": "int64"}}
    inputs["weights"] = {"data": list(weights or [1.0] * len(targets)), "dtype": "float32"}
    inputs.update(extra)
    return {
        "model_input": {"chunks": [{"type": "encoded_text", "tokens": list(tokens)}]},
        "loss_fn_inputs": inputs,
    }


def batch(seed: int, rows: int = 2, length: int = 12, vocab: int = 1000) -> list[dict[str, Any]]:
    """Deterministic training data: `rows` next-token datums of `length` tokens."""
    return [datum([(seed * 7919 + r * 131 + i * 17) % vocab for i in range(length)]) for r in range(rows)]


class TinkerHTTP:
    def __init__(self, url: str, api_key: str | None = API_KEY, timeout: float = 30.0) -> None:
        headers = {} if api_key is None else {"X-API-Key": api_key}
        self.http = httpx.Client(base_url=f"{url}/api/v1", headers=headers, timeout=timeout)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> TinkerHTTP:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # raw ----------------------------------------------------------------------------------------

    def post(self, path: str, body: dict[str, Any] | None = None, **kwargs: Any) -> httpx.Response:
        return self.http.post(f"/{path}", json=body if body is not None else {}, **kwargs)

    def get(self, path: str, **kwargs: Any) -> httpx.Response:
        return self.http.get(f"/{path}", **kwargs)

    def ok(self, path: str, body: dict[str, Any] | None = None, **kwargs: Any) -> dict[str, Any]:
        """POST and return the JSON body, failing unless the answer is 200."""
        r = self.post(path, body, **kwargs)
        assert r.status_code == 200, f"{path}: {r.status_code} {r.text}"
        return r.json()

    def poll(self, request_id: str, timeout: float = 30.0) -> dict[str, Any]:
        """retrieve_future until it is no longer try_again; the final JSON (result or error)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            r = self.post("retrieve_future", {"request_id": request_id})
            assert r.status_code == 200, f"retrieve_future {request_id}: {r.status_code} {r.text}"
            body = r.json()
            if body.get("type") != "try_again":
                return body
        raise AssertionError(f"future {request_id} did not complete within {timeout}s")

    def result(self, submitted: dict[str, Any] | str, timeout: float = 30.0) -> dict[str, Any]:
        """Poll a submitted future (its POST answer or request id) and require success."""
        rid = submitted if isinstance(submitted, str) else submitted["request_id"]
        body = self.poll(rid, timeout)
        assert "error" not in body, f"future {rid} failed: {body}"
        return body

    def error(self, submitted: dict[str, Any] | str, timeout: float = 30.0) -> str:
        """Poll a submitted future and require that it failed; its error message."""
        rid = submitted if isinstance(submitted, str) else submitted["request_id"]
        body = self.poll(rid, timeout)
        assert "error" in body, f"future {rid} should have failed: {body}"
        return body["error"]

    # conveniences -------------------------------------------------------------------------------

    def session(self) -> str:
        return self.ok("create_session", {"tags": [], "type": "create_session"})["session_id"]

    def create_model(
        self, session_id: str, model_seq_id: int = 0, rank: int = 4, seed: int | None = 0, **lora: Any
    ) -> str:
        body = {
            "session_id": session_id,
            "model_seq_id": model_seq_id,
            "base_model": "tiny",
            "lora_config": {"rank": rank, "seed": seed, **lora},
            "type": "create_model",
        }
        out = self.result(self.ok("create_model", body))
        return out["model_id"]

    def new_model(self, **kwargs: Any) -> str:
        """A fresh session with one LoRA training run in it."""
        return self.create_model(self.session(), **kwargs)

    def forward_backward(
        self,
        model_id: str,
        seq_id: int,
        data: list[dict[str, Any]],
        loss_fn: str = "cross_entropy",
        **kwargs: Any,
    ) -> httpx.Response:
        body = {
            "model_id": model_id,
            "seq_id": seq_id,
            "forward_backward_input": {"data": data, "loss_fn": loss_fn},
            "type": "forward_backward",
        }
        return self.post("forward_backward", body, **kwargs)

    def optim_step(
        self, model_id: str, seq_id: int, adam: dict[str, Any] | None = None, **kwargs: Any
    ) -> httpx.Response:
        body = {"model_id": model_id, "seq_id": seq_id, "adam_params": adam or ADAM, "type": "optim_step"}
        return self.post("optim_step", body, **kwargs)

    def loss(self, model_id: str, seq_id: int, data: list[dict[str, Any]]) -> float:
        """forward_backward and wait: the summed loss (the gradient accumulates until optim_step)."""
        r = self.forward_backward(model_id, seq_id, data)
        assert r.status_code == 200, r.text
        return self.result(r.json())["metrics"]["loss:sum"]

    def step(self, model_id: str, seq_id: int, data: list[dict[str, Any]]) -> float:
        """One training step on seq ids `seq_id` and `seq_id + 1`; the loss before the update."""
        loss = self.loss(model_id, seq_id, data)
        r = self.optim_step(model_id, seq_id + 1)
        assert r.status_code == 200, r.text
        self.result(r.json())
        return loss


def idempotency_headers() -> dict[str, str]:
    """What the SDK sends on every attempt: a fresh idempotency key."""
    return {"X-Idempotency-Key": uuid.uuid4().hex}
