"""Every save through the Tinker API is a catalog revision, and the export endpoints hand it out as PEFT.

Driven by the official SDKs against a real server; the catalog, the blob store and a Hugging Face PEFT
model are then the witnesses.
"""

import io
import json
import tarfile
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from mintd.config import EngineSettings
from mintd.engine.engine import Engine
from mintd.engine.train import Datum, TrainGroup
from mintd.residency.device import load_packed_into
from mintd.service.checkpoints import run_adapter_name
from mintd.store.packed import read_packed
from mintd.store.peft import CONFIG_FILE, README_FILE, WEIGHTS_FILE, load_peft_folder
from tests.sdk import run_sdk_json

TRAIN = """
import json, os, urllib.request
import tinker
from tinker import types

service = tinker.ServiceClient(base_url={url!r}, api_key="tml-e2e")
training = service.create_lora_training_client(
    base_model="tiny", rank=4, seed=0, user_metadata={{"adapter_name": "poet"}}
).result()
tok = training.get_tokenizer()
ids = tok.encode("The cat sat on the mat.")
datum = types.Datum(
    model_input=types.ModelInput.from_ints(ids[:-1]),
    loss_fn_inputs={{"target_tokens": ids[1:], "weights": [1.0] * (len(ids) - 1)}},
)
adam = types.AdamParams(learning_rate=2e-2, weight_decay=0.01)

def step():
    training.forward_backward([datum], "cross_entropy").result()
    training.optim_step(adam).result()

out = {{"model_id": training.model_id}}
step()
out["state"] = training.save_state("s1", user_metadata={{"data_fingerprint": "sha256:abc"}}).result().path
out["sampler"] = training.save_weights_for_sampler("p1").result().path
step()
out["external"] = training.save_weights_external("e1").result().path
rest = service.create_rest_client()
urls = rest.get_external_weights_urls(out["external"]).result().urls
os.makedirs({folder!r}, exist_ok=True)
for name, link in urls.items():
    with urllib.request.urlopen(link) as r, open(os.path.join({folder!r}, name), "wb") as f:
        f.write(r.read())
out["files"] = sorted(urls)
listed = rest.list_checkpoints(training.model_id).result().checkpoints
out["listed"] = sorted((c.checkpoint_id, c.checkpoint_type) for c in listed)

# an alias, spelled as a tinker:// path (the SDK insists on the scheme), samples that revision
promote = urllib.request.Request(
    {url!r} + "/api/v1/catalog/adapters/poet/aliases/prod", data=json.dumps({{"ref": "2"}}).encode(),
    headers={{"X-API-Key": "tml-e2e", "Content-Type": "application/json"}}, method="POST",
)
urllib.request.urlopen(promote).read()

def scores(model_path):
    client = service.create_sampling_client(model_path=model_path)
    client = client.result() if hasattr(client, "result") and not hasattr(client, "sample") else client
    return client.compute_logprobs(types.ModelInput.from_ints(ids)).result()

out["by_alias"], out["by_path"] = scores("tinker://adapters/poet:prod"), scores(out["sampler"])
out["by_number"] = scores("tinker://adapters/local/poet@2")
print(json.dumps(out))
"""

ARCHIVE = """
import json, urllib.request
import tinker
from tinker import types

service = tinker.ServiceClient(base_url={url!r}, api_key="tml-e2e")
training = service.create_lora_training_client(base_model="tiny", rank=4, seed=1)
ids = list(range(5, 25))
datum = types.Datum(
    model_input=types.ModelInput.from_ints(ids[:-1]),
    loss_fn_inputs={{"target_tokens": ids[1:], "weights": [1.0] * (len(ids) - 1)}},
)
training.forward_backward([datum], "cross_entropy").result()
training.optim_step(types.AdamParams(learning_rate=2e-2)).result()
path = training.save_weights_for_sampler("p1").result().path
rest = service.create_rest_client()
link = rest.get_checkpoint_archive_url_from_tinker_path(path).result()
with urllib.request.urlopen(link.url) as r, open({archive!r}, "wb") as f:
    f.write(r.read())
print(json.dumps({{"path": path, "url": link.url}}))
"""


def _score(engine: Engine, slot: int, tokens: list[int]) -> torch.Tensor:
    seq = torch.tensor(tokens)
    datum = Datum(seq[:-1], {"target_tokens": seq[1:]})
    return engine.forward_backward([TrainGroup(slot, [datum])], forward_only=True)[0].logprobs[0]


def _peft_score(model_dir: Path, folder: Path, tokens: list[int]) -> torch.Tensor:
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), folder).eval()
    with torch.no_grad():
        logits = model(torch.tensor([tokens[:-1]])).logits[0].float()
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(tokens[1:])[:, None])[:, 0]


def test_saves_are_revisions_with_provenance_and_export_as_peft(server, tmp_path):
    folder = tmp_path / "external"
    out = run_sdk_json("tinker-0.38", TRAIN.format(url=server.url, folder=str(folder)), timeout=180)
    catalog = server.service.catalog

    state, sampler, external = (catalog.resolve("local", out[k]) for k in ("state", "sampler", "external"))
    assert [r.adapter for r in (state, sampler, external)] == ["poet"] * 3  # named by user_metadata
    assert [r.number for r in (state, sampler, external)] == [1, 2, 3]
    assert [r.kind for r in (state, sampler, external)] == ["state", "sampler", "external"]
    p = state.provenance
    assert p.training_run_id == out["model_id"] and p.base_model == "tiny" and p.step == 1
    assert p.loss_fn == "cross_entropy" and p.data_fingerprint == "sha256:abc"
    assert p.optimizer["learning_rate"] == pytest.approx(2e-2) and p.optimizer["weight_decay"] == 0.01
    assert p.lora_config["rank"] == 4
    assert p.base_fingerprint == server.service.models["tiny"].engine.fingerprint
    assert external.provenance.step == 2
    assert [r.ref for r in catalog.lineage("local", external.ref)] == [sampler.ref, state.ref]
    assert state.metadata == {"data_fingerprint": "sha256:abc"}

    blobs = server.service.checkpoints.blobs
    assert read_packed(blobs.path(state.content_hash)).optimizer  # save_state keeps the optimizer
    assert not read_packed(blobs.path(sampler.content_hash)).optimizer
    assert out["listed"] == [
        ["external_weights/e1", "external"],
        ["sampler_weights/p1", "sampler"],
        ["weights/s1", "training"],
    ]

    assert out["by_alias"] == out["by_path"] == out["by_number"]

    # The download is a PEFT folder whose weights are the revision's, and PEFT scores like our engine.
    assert out["files"] == sorted([CONFIG_FILE, README_FILE, WEIGHTS_FILE])
    assert json.loads((folder / CONFIG_FILE).read_text())["r"] == 4
    _, tensors = load_peft_folder(folder)
    packed = read_packed(blobs.path(external.content_hash))
    assert all(torch.equal(tensors[k], packed.tensors[k]) for k in packed.tensors)
    engine = Engine(server.model_dir, EngineSettings(device="cpu"))
    slot = load_packed_into(engine, blobs.path(external.content_hash))
    tokens = list(range(3, 40))
    ours, peft = _score(engine, slot, tokens), _peft_score(server.model_dir, folder, tokens)
    assert torch.allclose(ours, peft, atol=1e-4), (ours - peft).abs().max()
    assert not torch.allclose(ours, _score(engine, 0, tokens), atol=1e-3)  # trained: not the base model


def test_checkpoint_archive_for_tinker_0_22(server, tmp_path):
    archive = tmp_path / "ckpt.tar.gz"
    out = run_sdk_json("tinker-0.22", ARCHIVE.format(url=server.url, archive=str(archive)), timeout=180)
    assert out["url"].startswith(server.url + "/api/v1/downloads/")
    with tarfile.open(archive) as tar:
        files = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    assert files == server.service.peft_files("local", out["path"])
    assert sorted(files) == sorted([CONFIG_FILE, README_FILE, WEIGHTS_FILE])
    tar_bytes = io.BytesIO()  # the same folder is accepted back by the catalog's import
    tar_bytes.write(archive.read_bytes())
    rev = server.service.import_peft_archive("local", "imported", tar_bytes.getvalue(), "tiny")
    source = server.service.revision("local", out["path"])
    assert rev.kind == "external" and rev.provenance.base_fingerprint == source.provenance.base_fingerprint
    assert rev.content_hash == source.content_hash  # packing is deterministic: same adapter, same blob


RESUME = """
import json
import tinker
from tinker import types

service = tinker.ServiceClient(base_url={url!r}, api_key="tml-e2e")
ids = list(range(5, 25))
datum = types.Datum(
    model_input=types.ModelInput.from_ints(ids[:-1]),
    loss_fn_inputs={{"target_tokens": ids[1:], "weights": [1.0] * (len(ids) - 1)}},
)

def step(client):
    client.forward_backward([datum], "cross_entropy").result()
    client.optim_step(types.AdamParams(learning_rate=2e-2)).result()

first = service.create_lora_training_client(base_model="tiny", rank=4, seed=1).result()
step(first)
paths = [first.save_state("s1").result().path]
client = first
for i in (2, 3):  # killed and resumed twice: every resume continues the same adapter
    client = service.create_training_client_from_state_with_optimizer(paths[-1]).result()
    step(client)
    paths.append(client.save_state(f"s{{i}}").result().path)
plain = service.create_training_client_from_state(paths[-1]).result()
paths.append(plain.save_weights_for_sampler("p4").result().path)
fork = service.create_training_client_from_state(paths[0], user_metadata={{"adapter_name": "fork"}}).result()
paths.append(fork.save_weights_for_sampler("f1").result().path)
print(json.dumps({{"paths": paths, "runs": [first.model_id, client.model_id, plain.model_id]}}))
"""


def test_resume_from_state_continues_the_adapter(server):
    out = run_sdk_json("tinker-0.38", RESUME.format(url=server.url), timeout=180)
    catalog = server.service.catalog
    revs = [catalog.resolve("local", p) for p in out["paths"]]
    *chain, forked = revs
    assert {r.adapter for r in chain} == {run_adapter_name(out["runs"][0])}
    assert [r.number for r in chain] == [1, 2, 3, 4]
    assert len({r.provenance.training_run_id for r in chain}) == 4  # four runs, one adapter
    assert [r.provenance.step for r in chain] == [1, 2, 3, 3]
    assert [r.ref for r in catalog.lineage("local", chain[-1].ref)] == [r.ref for r in reversed(chain[:-1])]
    assert forked.adapter == "fork" and forked.number == 1
    assert [r.ref for r in catalog.lineage("local", forked.ref)] == [chain[0].ref]
