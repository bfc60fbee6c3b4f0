"""The `mint` SDK's interpolate_checkpoints, unmodified, against a real server: exact linear
combinations of sampler checkpoints, checked on the exported PEFT weights and on logprobs."""

import json
import re

import pytest
import torch
from safetensors.torch import load as load_safetensors

from mintd.config import ServeSettings
from mintd.server import ServerThread, build_app
from mintd.store.peft import CONFIG_FILE, WEIGHTS_FILE
from tests.api.http import TinkerHTTP
from tests.sdk import run_sdk_json

SCRIPT = """
import json
import mint
from mint import types

service = mint.ServiceClient(base_url={url!r}, api_key="sk-e2e")

def trained(rank, text, **lora):
    client = service.create_lora_training_client(base_model="tiny", rank=rank, seed=rank, **lora)
    ids = client.get_tokenizer().encode(text)
    datum = types.Datum(model_input=types.ModelInput.from_ints(ids[:-1]),
                        loss_fn_inputs={{"target_tokens": ids[1:], "weights": [1.0] * (len(ids) - 1)}})
    for _ in range(3):
        client.forward_backward([datum], "cross_entropy").result()
        client.optim_step(types.AdamParams(learning_rate=5e-2)).result()
    return client.save_weights_for_sampler(f"r{{rank}}").result().path

a = trained(4, "The cat sat on the mat.")
b = trained(8, "Red, green and blue.", train_unembed=False)
probe = types.ModelInput.from_ints(list(range(3, 30)))

def scores(path):
    return service.create_sampling_client(model_path=path).compute_logprobs(probe).result()[1:]

only_a = mint.mint.interpolate_checkpoints(service, source_paths=[a, b], coefficients=[1.0, 0.0])
soup = mint.mint.interpolate_checkpoints(
    service, source_paths=[a, b], coefficients=[0.25, 0.75], output_path="soup"
)
print(json.dumps({{
    "a": a, "b": b, "only_a": only_a.path, "soup": soup.path, "soup_sources": soup.source_paths,
    "soup_coefficients": soup.coefficients, "checkpoint_type": soup.checkpoint_type,
    "scores_a": scores(a), "scores_only_a": scores(only_a.path), "scores_b": scores(b),
}}))
"""


def peft_deltas(files: dict[str, bytes]) -> dict[str, torch.Tensor]:
    """module -> scale·B·A, from a PEFT folder's files (what any PEFT user would load)."""
    config = json.loads(files[CONFIG_FILE])
    scale = config["lora_alpha"] / config["r"]
    tensors = load_safetensors(files[WEIGHTS_FILE])
    out = {}
    for key, a in tensors.items():
        if ".lora_A." in key:
            b = tensors[key.replace(".lora_A.", ".lora_B.")]
            out[key.replace(".lora_A.weight", "")] = scale * (b.double() @ a.double())
    return out


def test_interpolation_through_the_mint_sdk(server):
    out = run_sdk_json("mint-0.2", SCRIPT.format(url=server.url), timeout=240)
    svc, catalog = server.service, server.service.catalog

    # [1, 0] reproduces source A; and A and B really differ
    assert out["scores_only_a"] == pytest.approx(out["scores_a"], abs=1e-5)
    assert max(abs(x - y) for x, y in zip(out["scores_a"], out["scores_b"], strict=True)) > 1e-3

    # [0.25, 0.75] of ranks 4 and 8 with different targets: the exported PEFT weights hold the weighted delta
    a, b, soup = (svc.peft_files("local", out[k]) for k in ("a", "b", "soup"))
    da, db, ds = peft_deltas(a), peft_deltas(b), peft_deltas(soup)
    assert set(ds) == set(da) | set(db) and set(db) < set(da)  # b adapts no unembedding
    assert json.loads(soup[CONFIG_FILE])["r"] == 12
    for module, got in ds.items():
        expected = 0.25 * da[module] + 0.75 * db.get(module, torch.zeros(()))
        assert float((got - expected).norm()) <= 1e-5 * float(expected.norm()), module

    rev = catalog.resolve("local", out["soup"])
    assert rev.adapter == "soup" and rev.kind == "sampler"
    sources = [catalog.resolve("local", out[k]).ref for k in ("a", "b")]
    assert [r.ref for r in catalog.lineage("local", rev.ref)][:2] == sources  # several parents
    assert rev.metadata["interpolation"]["coefficients"] == [0.25, 0.75]
    assert rev.metadata["interpolation"]["sources"] == sources
    assert out["soup_sources"] == [out["a"], out["b"]] and out["soup_coefficients"] == [0.25, 0.75]
    assert out["checkpoint_type"] == "sampler"


def _sampler_path(c: TinkerHTTP, base_model: str, seed: int) -> str:
    body = {
        "session_id": c.session(),
        "model_seq_id": 0,
        "base_model": base_model,
        "lora_config": {"rank": 2, "seed": seed},
    }
    model = c.result(c.ok("create_model", body))["model_id"]
    saved = c.ok("save_weights_for_sampler", {"model_id": model, "seq_id": 1, "path": f"p{seed}"})
    return c.result(saved)["path"]


def test_bad_interpolations_name_the_field(qwen3_dir, llama_dir, tmp_path):
    app, service = build_app({"tiny": qwen3_dir, "other": llama_dir}, ServeSettings(data_dir=tmp_path))
    with ServerThread(app) as thread, TinkerHTTP(thread.url) as c:
        tiny, other = _sampler_path(c, "tiny", 1), _sampler_path(c, "other", 2)

        def post(**body):
            return c.post("mint/checkpoints/interpolate", body)

        cases = [
            (
                post(source_paths=[tiny, other], coefficients=[0.5, 0.5]),
                400,
                r"source_paths\[1\]: .* base model",
            ),
            (post(source_paths=[tiny], coefficients=[0.5, 0.5]), 400, "coefficients: 2 given for 1"),
            (post(source_paths=[tiny, "tinker://nope/sampler_weights/x"], coefficients=[1, 1]), 404, "nope"),
            (post(source_paths=[], coefficients=[]), 422, "source_paths"),
            (post(source_paths=[tiny], coefficients=[1], output_checkpoint_type="training"), 422, "output_"),
            (post(source_paths=[tiny], coefficients=[1], output_path="bad name!"), 400, "output_path"),
        ]
        for response, status, message in cases:
            assert response.status_code == status, response.text
            assert re.search(message, response.json()["detail"]), response.text
        body = {"source_paths": [tiny, tiny], "coefficients": [2, -1], "rank": 1}  # REST extension: SVD
        done = c.result(c.ok("mint/checkpoints/interpolate", body))
        assert done["rank"] == 1 and done["truncation_error"] == 0.0  # a fresh adapter's delta is 0
        assert service.catalog.resolve("local", done["path"]).provenance.lora_config["rank"] == 1
    service.close()
