"""Two `mintd serve` processes on one PostgreSQL catalog and one S3 bucket (moto on loopback), driven by
the official tinker SDK: what one replica trains and saves, the other samples by path, resumes, and
follows through an alias promoted on the first; a request for the first's training run reaching the
second gets a 409 naming the first; and after the first is SIGKILLed the second still serves it all.
"""

from __future__ import annotations

import json
import signal
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from tests.sdk import run_sdk_json
from tests.servers import free_port, serve

KEY = "tml-replicas"
PRELUDE = """
import json
import tinker
from tinker import types

def ready(x):
    return x.result() if hasattr(x, "result") and not hasattr(x, "sample") else x

service = tinker.ServiceClient(base_url={url!r}, api_key={key!r})
params = types.SamplingParams(max_tokens=6, temperature=1.0, seed=7, stop=[])
PROMPT = [5, 9, 13, 2]

def sample(path):
    sampler = ready(service.create_sampling_client(model_path=path))
    prompt = types.ModelInput.from_ints(PROMPT)
    return list(sampler.sample(prompt, num_samples=1, sampling_params=params).result().sequences[0].tokens)

def datum(ids):
    return types.Datum(
        model_input=types.ModelInput.from_ints(ids[:-1]),
        loss_fn_inputs={{"target_tokens": ids[1:], "weights": [1.0] * (len(ids) - 1)}},
    )

batch = [datum([1, 2, 3, 4, 5, 6, 7, 8]), datum([9, 8, 7, 6, 5, 4])]
adam = types.AdamParams(learning_rate=5e-2)
out = {{}}
"""

TRAIN_ON_FIRST = """
training = ready(service.create_lora_training_client(base_model="tiny", rank=4, seed=0))
for _ in range(4):
    training.forward_backward(batch, "cross_entropy").result()
    training.optim_step(adam).result()
out["model_id"] = training.model_id
out["sampler_path"] = training.save_weights_for_sampler("s1").result().path
out["state_path"] = training.save_state("st1").result().path
out["tokens"] = sample(out["sampler_path"])
print(json.dumps(out))
"""

USE_ON_SECOND = """
out["by_path"] = sample({sampler_path!r})
out["by_alias"] = sample({alias!r})
resumed = ready(service.create_training_client_from_state_with_optimizer({state_path!r}))
resumed.forward_backward(batch, "cross_entropy").result()
resumed.optim_step(adam).result()
out["resumed_path"] = resumed.save_weights_for_sampler("after-resume").result().path
out["resumed_tokens"] = sample(out["resumed_path"])
print(json.dumps(out))
"""

FOLLOW_AFTER_KILL = """
out["by_path"] = sample({sampler_path!r})
out["by_alias"] = sample({alias!r})
out["resumed_tokens"] = sample({resumed_path!r})
print(json.dumps(out))
"""


def script(url: str, body: str, **values: str) -> str:
    return PRELUDE.format(url=url, key=KEY) + body.format(**values)


def call(url: str, method: str = "GET", body: dict[str, Any] | None = None) -> tuple[int, dict, Any]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers={"X-API-Key": KEY})
    req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, dict(resp.headers), json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), json.loads(e.read())


@contextmanager
def replica(name: str, model_dir: Path, data_dir: Path, catalog_url: str, blob_url: str) -> Iterator[Any]:
    """`mintd serve` in its own process; yields the Popen with `.url` set once it answers."""
    port = free_port()
    shared = ["--catalog-url", catalog_url, "--blob-url", blob_url]
    args = [*shared, "--replica-id", name, "--blob-cache-budget", "64MiB"]
    env = {"MINTD_RUN_LEASE_S": "2", "MINTD_LONG_POLL_S": "2"}
    proc = serve(model_dir, data_dir, port, *args, env=env, log=data_dir.parent / f"{name}.log")
    proc.url = f"http://127.0.0.1:{port}"
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(timeout=30)


def test_two_replicas_share_revisions_state_aliases_and_survive_a_kill(
    qwen3_dir: Path, pg_url: str, s3_url: str, tmp_path: Path
) -> None:
    with ExitStack() as stack:
        first = stack.enter_context(replica("r1", qwen3_dir, tmp_path / "d1", pg_url, s3_url))
        second = stack.enter_context(replica("r2", qwen3_dir, tmp_path / "d2", pg_url, s3_url))

        trained = run_sdk_json("tinker-0.38", script(first.url, TRAIN_ON_FIRST), timeout=240)
        status, _, rev = call(f"{second.url}/api/v1/catalog/resolve?ref={trained['sampler_path']}")
        assert status == 200, rev  # the tinker:// path resolves on the other replica
        adapter = rev["adapter"]
        status, _, moved = call(
            f"{first.url}/api/v1/catalog/adapters/{adapter}/aliases/prod", "POST", {"ref": rev["ref"]}
        )
        assert status == 200, moved
        status, _, followed = call(f"{second.url}/api/v1/catalog/resolve?ref={adapter}:prod")
        assert status == 200 and followed["ref"] == rev["ref"], followed
        alias = f"tinker://adapters/{adapter}:prod"  # the SDK samples the alias itself on the second

        used = run_sdk_json(
            "tinker-0.38",
            script(second.url, USE_ON_SECOND, alias=alias, **trained),
            timeout=240,
        )
        assert used["by_path"] == trained["tokens"]  # the same adapter bytes, loaded from the bucket
        assert used["by_alias"] == trained["tokens"]
        assert used["resumed_path"].startswith("tinker://")

        # The first replica's run is held there: the second names it (409) instead of a 404.
        info = {"model_id": trained["model_id"]}
        status, headers, body = call(f"{second.url}/api/v1/get_info", "POST", info)
        assert status == 409, body
        assert headers["x-mintd-replica"] == "r1" and headers["x-mintd-replica-url"] == first.url
        assert "r1" in body["detail"] and first.url in body["detail"]
        assert headers["x-should-retry"] == "false"
        status, _, view = call(f"{second.url}/api/v1/training_runs/{trained['model_id']}")
        assert status == 200 and view["training_run_id"] == trained["model_id"]

        # Revision numbers of one adapter stay consecutive across replicas: the run resumed on the
        # second replica continues the adapter, so its save is the third revision.
        status, _, log = call(f"{second.url}/api/v1/catalog/adapters/{adapter}/log")
        assert status == 200
        numbers = {r["tinker_path"]: r["number"] for r in log["revisions"]}
        assert sorted(numbers.values()) == [1, 2, 3] and numbers[used["resumed_path"]] == 3, numbers

        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)

        after = run_sdk_json(
            "tinker-0.38",
            script(second.url, FOLLOW_AFTER_KILL, alias=alias, **trained, resumed_path=used["resumed_path"]),
            timeout=240,
        )
        assert after["by_path"] == after["by_alias"] == trained["tokens"]
        status, _, followed = call(f"{second.url}/api/v1/catalog/resolve?ref={adapter}:prod")
        assert status == 200 and followed["ref"] == rev["ref"], followed
        assert after["resumed_tokens"] == used["resumed_tokens"]

        # Its lease lapses: the 409 now says the replica stopped and how to go on.
        deadline = time.monotonic() + 60
        while True:
            status, _, body = call(f"{second.url}/api/v1/get_info", "POST", info)
            assert status == 409, body
            if "lapsed" in body["detail"] or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert "resume it from its last saved state" in body["detail"]
