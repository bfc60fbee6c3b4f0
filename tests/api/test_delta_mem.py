"""δ-mem adapters through the official tinker SDKs, unmodified, against a real server: created from
`user_metadata`, trained on episodes with `segment_ids`, the service's numbers equal the engine's."""

import json
import math

import httpx
import pytest
import torch

from mintd.engine.adapters import LoraSpec
from mintd.engine.engine import Engine
from mintd.engine.optim import AdamParams
from mintd.engine.train import Datum, TrainGroup
from mintd.lora_config import DeltaMemSpec
from tests.sdk import run_sdk_json

VALUES = [101, 202, 303, 404]  # the fact of an episode: one of these tokens
QUESTION = [7, 8, 9, 10]
LR, STEPS, BATCH = 5e-3, 60, 16
METADATA = {"mintd.adapter": "delta_mem+lora", "mintd.delta_mem.readout_init": "base_slice"}


def episodes(count: int, seed: int) -> list[dict]:
    """Session 0 tells the fact among filler; session 1 asks a fixed question whose answer, the last
    target, is the fact. Session 1 cannot attend to session 0, so without the state its answer is the
    same for every episode: no state-free model beats log 4 on average over uniform facts."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        fact = VALUES[int(torch.randint(4, (1,), generator=g))]
        tell = torch.randint(500, 900, (4,), generator=g)
        tell[int(torch.randint(4, (1,), generator=g))] = fact
        ids = tell.tolist() + QUESTION + [fact]
        out.append(
            {
                "tokens": ids[:-1],
                "target_tokens": ids[1:],
                "weights": [0.0] * 7 + [1.0],
                "segment_ids": [0] * 4 + [1] * 4,
            }
        )
    return out


SCRIPT = """
import json
import tinker
from tinker import types

def ready(x):
    return x.result() if hasattr(x, "result") and not hasattr(x, "sample") else x

service = tinker.ServiceClient(base_url={url!r}, api_key="tml-e2e")
out = {{}}
try:
    bad = {{"mintd.adapter": "delta_mem", "mintd.delta_mem.rank": "0"}}
    ready(service.create_lora_training_client(base_model="tiny", rank=8, user_metadata=bad))
except Exception as e:
    out["refused"] = [type(e).__name__, str(e)]
training = ready(service.create_lora_training_client(
    base_model="tiny", rank=8, seed=0, train_mlp=False, train_attn=False, user_metadata={metadata!r}))

def data(raw):  # segment_ids is not a key the SDK knows how to convert: sent as TensorData
    return [types.Datum(
        model_input=types.ModelInput.from_ints(e["tokens"]),
        loss_fn_inputs={{"target_tokens": e["target_tokens"], "weights": e["weights"], "segment_ids":
                         types.TensorData(data=e["segment_ids"], dtype="int64", shape=[len(e["tokens"])])}},
    ) for e in raw]

with open({data_path!r}) as f:
    raw = json.load(f)
batches, held_out = [data(b) for b in raw["batches"]], data(raw["held_out"])
adam = types.AdamParams(learning_rate={lr!r})
bad = data(raw["held_out"][:1])
bad[0].loss_fn_inputs["segment_ids"] = types.TensorData(data=[1] * 4 + [0] * 4, dtype="int64", shape=[8])
try:
    training.forward_backward(bad, "cross_entropy").result()
except Exception as e:
    out["bad_segments"] = [type(e).__name__, str(e)]
out["held_out_before"] = training.forward(held_out, "cross_entropy").result().metrics["loss:sum"]
losses = []
for i, batch in enumerate(batches):
    fb = training.forward_backward(batch, "cross_entropy")
    training.optim_step(adam).result()
    result = fb.result()
    losses.append(result.metrics["loss:sum"])
    if i == 0:
        out["first_logprobs"] = [list(o["logprobs"].data) for o in result.loss_fn_outputs]
out["losses"] = losses
out["held_out_after"] = training.forward(held_out, "cross_entropy").result().metrics["loss:sum"]
out["state_path"] = training.save_state("dm1").result().path
resumed = ready(service.create_training_client_from_state_with_optimizer(out["state_path"]))
out["resumed_held_out"] = resumed.forward(held_out, "cross_entropy").result().metrics["loss:sum"]
out["model_id"] = training.model_id
print(json.dumps(out))
"""


@pytest.mark.parametrize("env", ["tinker-0.22", "tinker-0.38"])
def test_delta_mem_trains_through_the_sdk(server, env, tmp_path):
    batches = [episodes(BATCH, step) for step in range(STEPS)]
    data_path = tmp_path / "episodes.json"
    data_path.write_text(json.dumps({"batches": batches, "held_out": episodes(64, 10_000)}))
    script = SCRIPT.format(url=server.url, metadata=METADATA, data_path=str(data_path), lr=LR)
    out = run_sdk_json(env, script, timeout=300)

    name, message = out["refused"]
    assert name == "BadRequestError" and 'user_metadata["mintd.delta_mem.rank"]' in message, out["refused"]
    name, message = out["bad_segments"]
    assert name == "BadRequestError" and "data[0].loss_fn_inputs.segment_ids: must not decrease" in message
    # the answer is learned through the state: far below what any model that cannot carry it reaches
    assert out["held_out_before"] / 64 > math.log(4)
    assert out["held_out_after"] / 64 < 0.5 * math.log(4), out["held_out_after"] / 64

    # saved with its δ-mem weights: a run resumed from the state scores alike; PEFT export refuses it
    assert out["resumed_held_out"] == pytest.approx(out["held_out_after"], rel=1e-6)
    rev = server.service.catalog.resolve("local", out["state_path"])
    assert rev.provenance.lora_config["delta_mem"]["readout_init"] == "base_slice"
    archive = f"{server.url}/api/v1/training_runs/{out['model_id']}/checkpoints/weights/dm1/archive"
    response = httpx.get(archive, headers={"X-API-Key": "tml-e2e"}, follow_redirects=True)
    assert (
        response.status_code == 400
        and "PEFT export: this is a delta_mem adapter" in response.json()["detail"]
    )

    # the same steps straight on an engine: equal logprobs and losses (so equal gradients and steps)
    engine = Engine(server.model_dir)
    spec = DeltaMemSpec(readout_init="base_slice", seed=0, lora=True)
    slot = engine.create_adapter(LoraSpec(rank=8, seed=0, train_mlp=False, train_attn=False), spec)
    for step, batch in enumerate(batches[:3]):
        result = engine.forward_backward([TrainGroup(slot, [datum(e) for e in batch])])[0]
        engine.optim_step(slot, AdamParams(learning_rate=LR))
        assert out["losses"][step] == pytest.approx(result.loss, rel=1e-5), step
        if step == 0:
            for served, direct in zip(out["first_logprobs"], result.logprobs, strict=True):
                torch.testing.assert_close(torch.tensor(served), direct, rtol=1e-5, atol=1e-5)


def datum(raw: dict) -> Datum:
    inputs = {
        "target_tokens": torch.tensor(raw["target_tokens"]),
        "weights": torch.tensor(raw["weights"]),
        "segment_ids": torch.tensor(raw["segment_ids"], dtype=torch.float32),
    }
    return Datum(torch.tensor(raw["tokens"]), inputs)
