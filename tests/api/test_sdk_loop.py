"""The official SDKs, unmodified, through the whole training and sampling loop against a real server.

Each script runs under its own SDK's venv (tests/sdk.py) and prints one JSON line of observations;
the assertions live here. tinker 0.38 speaks protobuf for forward_backward and results, 0.22 and
mint speak JSON; mint authenticates with an `sk-` key through the JWT exchange.
"""

import math

import pytest

from tests.sdk import run_sdk_json

CLIENTS = {
    "tinker-0.22": ("tinker", "tml-e2e"),
    "tinker-0.38": ("tinker", "tml-e2e"),
    "mint-0.2": ("mint", "sk-e2e"),
}

PRELUDE = """
import json, math
import {module} as tinker
from {module} import types

def ready(x):  # 0.38 returns futures from client factories; 0.22 returns the client
    return x.result() if hasattr(x, "result") and not hasattr(x, "sample") else x

service = tinker.ServiceClient(base_url={url!r}, api_key={key!r})
training = ready(service.create_lora_training_client(base_model="tiny", rank=8, seed=0))
tok = training.get_tokenizer()  # the tokenizer id from get_info must load offline

def datum(text):
    ids = tok.encode(text)
    return types.Datum(
        model_input=types.ModelInput.from_ints(ids[:-1]),
        loss_fn_inputs={{"target_tokens": ids[1:], "weights": [1.0] * (len(ids) - 1)}},
    )

batch = [datum("The cat sat on the mat."), datum("3 + 4 = 7"), datum("Red, green and blue.")]
adam = types.AdamParams(learning_rate=1e-2, grad_clip_norm=1.0)
out = {{}}
"""

LOOP = """
losses = []
for _ in range(8):
    fb = training.forward_backward(batch, "cross_entropy")
    training.optim_step(adam).result()
    losses.append(fb.result().metrics["loss:sum"])
out["losses"] = losses
out["logprob_lengths"] = [len(o["logprobs"].data) for o in fb.result().loss_fn_outputs]
out["target_lengths"] = [len(d.loss_fn_inputs["target_tokens"].data) for d in batch]

sampler_path = training.save_weights_for_sampler("sampler-1").result().path
sampler = ready(training.create_sampling_client(sampler_path))
prompt = tok.encode("The cat")
params = types.SamplingParams(max_tokens=6, temperature=1.0, seed=7, stop=[])
result = sampler.sample(types.ModelInput.from_ints(prompt), num_samples=2, sampling_params=params).result()
seq = result.sequences[0]
scored = sampler.compute_logprobs(types.ModelInput.from_ints(prompt + list(seq.tokens))).result()
out["sampled"] = [list(s.tokens) for s in result.sequences]
out["sampled_logprobs"] = list(seq.logprobs)
out["scored_logprobs"] = scored[len(prompt):]
out["prompt_logprob0"] = scored[0]

state_path = training.save_state("state-1").result().path
resumed = ready(service.create_training_client_from_state_with_optimizer(state_path))
for client in (training, resumed):  # one more identical step on both: same optimizer state, same loss
    client.forward_backward(batch, "cross_entropy").result()
    client.optim_step(adam).result()
out["after_resume"] = [
    c.forward(batch, "cross_entropy").result().metrics["loss:sum"] for c in (training, resumed)
]

rest = service.create_rest_client()
listed = rest.list_checkpoints(training.model_id).result().checkpoints
out["checkpoints"] = sorted(c.checkpoint_id for c in listed)
out["sampler_path"], out["state_path"] = sampler_path, state_path
print(json.dumps(out))
"""

RL = """
prompt = tok.encode("User: count")
rewards = []
for it in range(3):
    sampler = ready(training.save_weights_and_get_sampling_client())
    params = types.SamplingParams(max_tokens=5, temperature=1.0, seed=it, stop=[])
    prompt_input = types.ModelInput.from_ints(prompt)
    seqs = sampler.sample(prompt_input, num_samples=8, sampling_params=params).result().sequences
    reward = [sum(t % 2 == 0 for t in s.tokens) / len(s.tokens) for s in seqs]
    mean = sum(reward) / len(reward)
    data = []
    for s, r in zip(seqs, reward):
        ids = prompt + list(s.tokens)
        pad = [0.0] * (len(prompt) - 1)
        data.append(types.Datum(
            model_input=types.ModelInput.from_ints(ids[:-1]),
            loss_fn_inputs={"target_tokens": ids[1:], "logprobs": pad + list(s.logprobs),
                            "advantages": pad + [r - mean] * len(s.tokens)},
        ))
    fb = training.forward_backward(data, "importance_sampling").result()
    training.optim_step(adam).result()
    rewards.append(mean)
    assert all(len(s.logprobs) == len(s.tokens) for s in seqs)
out["rl_loss"] = fb.metrics["loss:sum"]
out["rl_rewards"] = rewards

def custom(data, logprobs):  # the same objective as cross_entropy, computed client-side
    loss = sum(-(lp * d.loss_fn_inputs["weights"].to_torch()).sum() for d, lp in zip(data, logprobs))
    return loss, {"custom_loss": float(loss)}

out["ce_loss"] = training.forward(batch, "cross_entropy").result().metrics["loss:sum"]
custom_out = training.forward_backward_custom(batch, custom).result()
out["custom_metrics"] = custom_out.metrics
print(json.dumps(out))
"""


def script(env: str, url: str, body: str) -> str:
    module, key = CLIENTS[env]
    return PRELUDE.format(module=module, url=url, key=key) + body


@pytest.mark.parametrize("env", list(CLIENTS))
def test_train_sample_save_resume_list(server, env):
    out = run_sdk_json(env, script(env, server.url, LOOP), timeout=180)

    assert out["losses"][-1] < 0.5 * out["losses"][0], out["losses"]
    assert out["logprob_lengths"] == out["target_lengths"]  # one logprob per target token, per datum
    assert len(out["sampled"]) == 2 and all(len(s) == 6 for s in out["sampled"])
    assert out["prompt_logprob0"] is None
    for sampled, scored in zip(out["sampled_logprobs"], out["scored_logprobs"], strict=True):
        assert math.isclose(sampled, scored, abs_tol=1e-4)
    assert math.isclose(*out["after_resume"], rel_tol=1e-5), out["after_resume"]
    assert out["checkpoints"] == ["sampler_weights/sampler-1", "weights/state-1"]
    assert out["sampler_path"].startswith("tinker://") and "/sampler_weights/" in out["sampler_path"]


@pytest.mark.parametrize("env", list(CLIENTS))
def test_rl_loop_and_custom_loss(server, env):
    out = run_sdk_json(env, script(env, server.url, RL), timeout=180)

    assert math.isfinite(out["rl_loss"])
    assert len(out["rl_rewards"]) == 3
    # forward_backward_custom = a forward, then cross_entropy with weights −∂C/∂lp: same objective
    assert math.isclose(out["custom_metrics"]["custom_loss"], out["ce_loss"], rel_tol=1e-4)
