"""The official tinker 0.38 SDK trains (memorisation to greedy exactness) and samples every model family
through one `mintd serve`; capabilities, get_info and every revision name what LoRA adapted, and the saved
adapter holds a LoRA pair for every weight the family's contract adapts."""

import json
import urllib.request

import pytest

from mintd.config import ServeSettings
from mintd.engine.tiny import ARCHS
from mintd.server import ServerThread, build_app
from mintd.store.packed import read_packed
from tests.sdk import run_sdk_json

SCRIPT = """
import json
import tinker
from tinker import types

service = tinker.ServiceClient(base_url={url!r}, api_key="tml-e2e")
out = {{}}
for arch in {archs!r}:
    training = service.create_lora_training_client(base_model=arch, rank=16, seed=0)
    tok = training.get_tokenizer()
    prompt, answer = tok.encode("User: What is your name?\\n"), tok.encode("My name is Mint.")
    ids = prompt + answer
    weights = [0.0] * (len(prompt) - 1) + [1.0] * len(answer)
    datum = types.Datum(
        model_input=types.ModelInput.from_ints(ids[:-1]),
        loss_fn_inputs={{"target_tokens": ids[1:], "weights": weights}},
    )
    losses = []  # the loss after each step (a forward pass), so the last one is the saved weights' loss
    for step in range(150):  # a decaying learning rate: tiny random bases oscillate at a fixed one
        training.forward_backward([datum], "cross_entropy")
        adam = types.AdamParams(learning_rate=1e-2 * 0.97**step, grad_clip_norm=1.0)
        training.optim_step(adam).result()
        losses.append(training.forward([datum], "cross_entropy").result().metrics["loss:sum"])
        if losses[-1] < 0.1:
            break
    path = training.save_weights_for_sampler("final").result().path
    sampler = training.create_sampling_client(path)
    greedy = types.SamplingParams(max_tokens=len(answer), temperature=0.0, stop=[])
    seq = sampler.sample(types.ModelInput.from_ints(prompt), num_samples=1, sampling_params=greedy).result()
    free = types.SamplingParams(max_tokens=8, temperature=1.0, seed=3, stop=[])
    sampled = sampler.sample(types.ModelInput.from_ints(prompt), num_samples=2, sampling_params=free).result()
    out[arch] = {{
        "losses": losses,
        "answer": answer,
        "greedy": list(seq.sequences[0].tokens),
        "sampled": [list(s.tokens) for s in sampled.sequences],
        "path": path,
        "model_id": training.model_id,
    }}
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def families(tiny_model_dir, tmp_path_factory):
    models = {arch: tiny_model_dir(arch) for arch in ARCHS}
    settings = ServeSettings(data_dir=tmp_path_factory.mktemp("families") / "data", long_poll_s=2.0)
    app, service = build_app(models, settings)
    with ServerThread(app) as thread:
        out = run_sdk_json("tinker-0.38", SCRIPT.format(url=thread.url, archs=list(ARCHS)), timeout=600)
        caps = json.load(urllib.request.urlopen(f"{thread.url}/api/v1/get_server_capabilities"))
        yield service, out, caps
    service.close()


@pytest.mark.parametrize("arch", ARCHS)
def test_sdk_memorises_to_greedy_exactness_and_samples(families, arch):
    _, out, _ = families
    got = out[arch]
    assert got["losses"][-1] < 0.1 < got["losses"][0], got["losses"][-5:]
    assert got["greedy"] == got["answer"]
    assert [len(s) for s in got["sampled"]] == [8, 8]


@pytest.mark.parametrize("arch", ARCHS)
def test_adapted_set_is_visible_and_every_target_is_saved(families, arch):
    service, out, caps = families
    engine = service.models[arch].engine
    lora = next(m["lora"] for m in caps["supported_models"] if m["model_name"] == arch)
    assert lora == engine.coverage()
    assert lora["attn"] and lora["unembed"] == ["lm_head"] and lora["excluded"]
    info = service.get_info(out[arch]["model_id"], "local")
    assert info["lora_adapted"] == {k: lora[k] for k in ("attn", "mlp", "unembed")}

    rev = service.revision("local", out[arch]["path"])
    assert rev.provenance.lora_config["adapted"] == info["lora_adapted"]
    assert rev.provenance.lora_config["base_model_type"] == engine.model.config.model_type
    packed = read_packed(service.checkpoints.blobs.path(rev.content_hash))
    saved = {k.rpartition(".")[0] for k in packed.tensors}
    assert saved == set(engine.slots.targets)  # every adapted weight of every layer, no more
