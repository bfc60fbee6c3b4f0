"""2,000 distinct saved adapters sampled through the official SDK, with a device budget of 16 of them:
residency keeps the working set under the budget and every answer equals the adapter served alone."""

from __future__ import annotations

from pathlib import Path

from mintd.catalog import NewRevision, Provenance
from mintd.engine.engine import Engine
from mintd.engine.sampling import SampleRequest, SamplingParams
from mintd.engine.tiny import random_adapter
from mintd.residency.device import load_packed_into
from mintd.store.packed import pack
from tests.api.conftest import start_server
from tests.sdk import run_sdk_json

ADAPTERS, FIT, RANKS = 2000, 16, (1, 2, 3, 4)
PROMPT, TOKENS = [5, 17, 33, 2], 3

SCRIPT = """
import asyncio, json
import tinker
from tinker import types

async def main():
    service = tinker.ServiceClient(base_url={url!r}, api_key="tml-e2e")
    params = types.SamplingParams(max_tokens={tokens}, temperature=0.0)
    prompt = types.ModelInput.from_ints({prompt!r})

    async def one(name):
        sampler = await service.create_sampling_client_async(model_path=f"tinker://adapters/{{name}}@1")
        result = await sampler.sample_async(prompt=prompt, num_samples=1, sampling_params=params)
        return result.sequences[0].tokens

    names = {names!r}
    answers = []
    for start in range(0, len(names), 100):  # waves far larger than the budget
        answers += await asyncio.gather(*(one(n) for n in names[start : start + 100]))
    print(json.dumps(answers))

asyncio.run(main())
"""


def test_sampling_2000_adapters_stays_within_a_budget_of_16(qwen3_dir: Path, tmp_path: Path) -> None:
    reference = Engine(qwen3_dir)
    adapters = [random_adapter(reference, RANKS[i % len(RANKS)], seed=i) for i in range(ADAPTERS)]
    blobs = [pack(spec, tensors, reference.fingerprint) for spec, tensors in adapters]
    budget = FIT * max(sum(t.numel() * 4 for t in tensors.values()) for _, tensors in adapters)

    server, service = start_server(
        qwen3_dir, tmp_path / "data", adapter_device_budget=budget, max_samplers_per_owner=ADAPTERS
    )
    names = [f"fleet{i}" for i in range(ADAPTERS)]
    rows = [
        NewRevision(
            name,
            service.checkpoints.blobs.put(data),
            "sampler",
            Provenance(reference.fingerprint, "tiny", reference.lora_provenance(spec)),
            size_bytes=len(data),
        )
        for name, data, (spec, _) in zip(names, blobs, adapters, strict=True)
    ]
    service.catalog.register_revisions_bulk("local", rows)
    with server:
        answers = run_sdk_json(
            "tinker-0.38",
            SCRIPT.format(url=server.url, tokens=TOKENS, prompt=PROMPT, names=names),
            timeout=900,
        )
    stats = service.models["tiny"].worker.residency.stats()
    service.close()

    assert stats["device_peak_bytes"] <= budget, stats
    assert stats["misses"] == ADAPTERS, stats  # each loaded once: its wave shared one copy
    assert stats["evictions"] == ADAPTERS - stats["resident_adapters"], stats
    params = SamplingParams(max_tokens=TOKENS, temperature=0.0)
    alone = []
    for data in blobs:  # each adapter served by itself, on an engine of its own
        slot = load_packed_into(reference, data)
        (result,) = reference.sample([SampleRequest(slot, PROMPT, params)])
        alone.append(result.sequences[0].tokens)
        reference.drop(slot)
    assert len({tuple(a) for a in alone}) > 20, "the adapters should answer differently"
    mismatched = [i for i, (got, want) in enumerate(zip(answers, alone, strict=True)) if got != want]
    assert not mismatched, (
        f"{len(mismatched)} adapters answered differently through the fleet, e.g. {mismatched[:5]}"
    )
