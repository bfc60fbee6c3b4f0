"""Several clients on one base model: their work is merged into shared engine calls, yet no client's
results change because of the others, and a busy client cannot starve a quiet one."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from mintd.engine.train import TrainGroup
from mintd.residency import RunKey
from tests.api.conftest import LiveServer
from tests.api.http import TinkerHTTP, batch
from tests.sdk import run_sdk_json
from tests.service.worker_gate import Gate

STEPS = 5

# Two LoRA clients (different data and init seeds, same hyperparameters) train in two threads at
# once; then, in a second session, each trains again alone. Each step is two forward_backward calls
# (gradient accumulation) and one optim_step; a barrier starts the clients' steps together.
SCRIPT = """
import json, sys, threading
import tinker
from tinker import types

URL, KEY, STEPS = {url!r}, "tml-test", {steps}

def ready(x):  # 0.38 returns futures from client factories
    return x.result() if hasattr(x, "result") and not hasattr(x, "forward_backward") else x

def data(seed, half):  # the same two half-batches every step
    rows = []
    for r in range(3):
        ids = [(seed * 7919 + half * 97 + r * 131 + i * 17) % 1000 for i in range(10 + r)]
        rows.append(types.Datum(
            model_input=types.ModelInput.from_ints(ids[:-1]),
            loss_fn_inputs={{"target_tokens": ids[1:], "weights": [1.0] * (len(ids) - 1)}},
        ))
    return rows

adam = types.AdamParams(learning_rate=1e-2, grad_clip_norm=1.0)

def train(client, seed, out, barrier=None):
    losses = []
    for step in range(STEPS):
        if barrier is not None:
            barrier.wait(timeout=60)
        first = client.forward_backward(data(seed, 0), "cross_entropy")
        second = client.forward_backward(data(seed, 1), "cross_entropy")
        opt = client.optim_step(adam)
        losses.append([first.result().metrics["loss:sum"], second.result().metrics["loss:sum"]])
        losses[-1].append(opt.result().metrics["grad_norm"])
    out[seed] = losses

def run_all(jobs, barrier=None):
    out, errors = {{}}, []
    def guarded(client, seed):
        try:
            train(client, seed, out, barrier)
        except BaseException as exc:
            errors.append(exc)
            if barrier is not None:
                barrier.abort()
            raise
    threads = [threading.Thread(target=guarded, args=job) for job in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return out

service = tinker.ServiceClient(base_url=URL, api_key=KEY)
clients = {{seed: ready(service.create_lora_training_client(base_model="tiny", rank=4, seed=seed))
           for seed in (1, 2)}}
concurrent = run_all([(c, seed) for seed, c in clients.items()], threading.Barrier(2))

alone_service = tinker.ServiceClient(base_url=URL, api_key=KEY)  # a second session
alone = {{}}
for seed in (1, 2):
    client = ready(alone_service.create_lora_training_client(base_model="tiny", rank=4, seed=seed))
    alone.update(run_all([(client, seed)]))

print(json.dumps({{
    "concurrent": concurrent,
    "alone": alone,
    "model_ids": {{seed: c.model_id for seed, c in clients.items()}},
}}))
"""


def test_concurrent_clients_get_the_results_they_would_get_alone(
    server: LiveServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = server.service.models["tiny"].engine
    real = engine.forward_backward
    calls: list[set[int]] = []

    def spy(groups: list[TrainGroup], forward_only: bool = False) -> Any:
        calls.append({g.slot for g in groups})
        time.sleep(0.05)  # a slower engine: work of both clients piles up between calls, as on a GPU
        return real(groups, forward_only)

    monkeypatch.setattr(engine, "forward_backward", spy)
    out = run_sdk_json("tinker-0.38", SCRIPT.format(url=server.url, steps=STEPS), timeout=180)

    for seed in ("1", "2"):
        together, alone = np.array(out["concurrent"][seed]), np.array(out["alone"][seed])
        assert together.shape == alone.shape == (STEPS, 3)
        np.testing.assert_allclose(together, alone, rtol=1e-4, err_msg=f"client seed={seed}")
        assert together[-1, 0] < together[0, 0], "each client learns"
    assert not np.allclose(out["concurrent"]["1"], out["concurrent"]["2"], rtol=1e-2), "different data"

    residency = server.service.models["tiny"].worker.residency
    slots = {residency.slot_of(RunKey(m)) for m in out["model_ids"].values()}
    merged = [c for c in calls if slots <= c]
    assert merged, f"no engine call held both concurrent clients' work: {calls}"


@pytest.fixture
def client(server: LiveServer) -> Iterator[TinkerHTTP]:
    with TinkerHTTP(server.url) as c:
        yield c


def test_a_flooding_client_does_not_starve_another(client: TinkerHTTP, server: LiveServer) -> None:
    flood_model, quiet_model = client.new_model(seed=0), client.new_model(seed=1)
    worker = server.service.models["tiny"].worker
    per_round = worker.limits.max_train_ops_per_run
    flood_size = 10 * per_round
    with Gate(worker):  # the flood is all queued before the quiet client's one request arrives
        flood = []
        for seq_id in range(1, flood_size + 1):
            r = client.forward_backward(flood_model, seq_id, batch(seq_id, rows=4))
            assert r.status_code == 200, r.text
            flood.append(r.json()["request_id"])
        r = client.forward_backward(quiet_model, 1, batch(99, rows=1))
        assert r.status_code == 200, r.text
        quiet = r.json()["request_id"]

    client.result(quiet)
    for rid in flood:
        client.result(rid)
    futures = server.service.futures
    quiet_done = futures.get(quiet, "local").done_at
    flood_done = sorted(futures.get(rid, "local").done_at for rid in flood)
    ahead = sum(t <= quiet_done for t in flood_done)
    assert quiet_done < flood_done[-1], "the quiet client waited for the whole flood"
    assert ahead <= per_round, f"{ahead} flood requests ran before the quiet client's one (fair share)"


def test_interleaved_clients_on_one_server_keep_their_own_order(client: TinkerHTTP) -> None:
    """Requests of many runs, interleaved and each run's sent out of order, all land on their run."""
    models = [client.new_model(seed=i) for i in range(3)]
    controls = [client.new_model(seed=i) for i in range(3)]
    pending = []
    for seq_id in (2, 1, 4, 3):  # optim_steps at 2 and 4, in each run's own order once sorted
        for i, model_id in enumerate(models):
            if seq_id % 2:
                r = client.forward_backward(model_id, seq_id, batch(10 * i + seq_id))
            else:
                r = client.optim_step(model_id, seq_id)
            assert r.status_code == 200, r.text
            pending.append((i, seq_id, r.json()["request_id"]))
    got: dict[tuple[int, int], float] = {}
    for i, seq_id, rid in pending:
        result = client.result(rid)
        if seq_id % 2:
            got[i, seq_id] = result["metrics"]["loss:sum"]
    for i, model_id in enumerate(controls):  # one at a time, in order
        assert client.step(model_id, 1, batch(10 * i + 1)) == pytest.approx(got[i, 1], rel=1e-5)
        assert client.step(model_id, 3, batch(10 * i + 3)) == pytest.approx(got[i, 3], rel=1e-5)
