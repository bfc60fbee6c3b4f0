"""Serving δ-mem instances end to end: the official `openai` client against a real server on 127.0.0.1.

A δ-mem adapter (base_slice readouts, so even untrained its state changes the logits) is created and
saved twice through the Tinker API (`dm@1`, `dm@2`: equal weights, two revisions). The `user` field binds
an instance, `dm.mem.<user>`, whose states are `memory` revisions with `live` on the newest. Everything
is greedy, so equal states give equal answers; token ids come back through `return_tokens_as_token_ids`.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import torch

from mintd.engine.delta_mem.state import GENESIS, chain, state_digest
from mintd.engine.engine import Engine
from mintd.engine.sampling import MemoryInput, SampleRequest, SamplingParams
from mintd.service.tinker import TinkerService
from mintd.store.memory import MemoryState, read_memory
from tests.api.conftest import start_server
from tests.api.http import TinkerHTTP

ALICE, BOB = "tml-alice", "tml-bob"
KEYS = [f"alice={ALICE}", f"bob={BOB}"]
METADATA = {"mintd.adapter": "delta_mem", "mintd.delta_mem.readout_init": "base_slice", "adapter_name": "dm"}
TELL = [311, 57, 902, 14, 660, 73, 128, 45]  # a first conversation
ASK = [19, 540, 233, 871]  # a second one


@dataclass
class Served:
    url: str
    service: TinkerService
    model_dir: Path

    def client(self, key: str = ALICE) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=120)

    def catalog(self, key: str = ALICE) -> httpx.Client:
        return httpx.Client(base_url=f"{self.url}/api/v1/catalog", headers={"X-API-Key": key}, timeout=30)

    def live(self, user: str, owner: str = "alice") -> tuple[Any, MemoryState]:
        rev = self.service.catalog.resolve(owner, f"dm.mem.{user}:live")
        return rev, read_memory(self.service.checkpoints.blobs.read(rev.content_hash))


@dataclass
class Turn:
    tokens: list[int]
    logprobs: list[float]
    committed: str | None


def save_weights(url: str, key: str, saves: int) -> None:
    """A δ-mem adapter `dm`, saved `saves` times without training (the readouts start non-zero)."""
    with TinkerHTTP(url, api_key=key) as c:
        body = {
            "session_id": c.session(),
            "model_seq_id": 0,
            "base_model": "tiny",
            "lora_config": {"rank": 8, "seed": 0},
            "user_metadata": METADATA,
        }
        model_id = c.result(c.ok("create_model", body))["model_id"]
        for i in range(saves):
            c.result(
                c.ok("save_weights_for_sampler", {"model_id": model_id, "seq_id": i + 1, "path": f"w{i}"})
            )


def turn(
    served: Served, user: str | None, prompt: list[int], model: str = "dm@1", length: int = 4, **kw: Any
) -> Turn:
    raw = served.client(kw.pop("key", ALICE)).completions.with_raw_response.create(
        model=model,
        prompt=prompt,
        max_tokens=length,
        temperature=0.0,
        logprobs=0,
        extra_body={"ignore_eos": True, "return_tokens_as_token_ids": True},
        **({} if user is None else {"user": user}),
        **kw,
    )
    lp = raw.parse().choices[0].logprobs
    tokens = [int(t.split(":")[1]) for t in lp.tokens]
    return Turn(tokens, list(lp.token_logprobs), raw.headers.get("x-mintd-memory"))


@pytest.fixture(scope="module")
def served(qwen3_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    thread, service = start_server(qwen3_dir, tmp_path_factory.mktemp("dmem-serve"), KEYS)
    with thread:
        save_weights(thread.url, ALICE, 2)
        save_weights(thread.url, BOB, 1)
        yield Served(thread.url, service, qwen3_dir)
    service.close()


def test_each_turn_commits_a_revision_with_parents_and_the_transcript_chain(served: Served):
    first = turn(served, "ann", TELL)
    rev, memory = served.live("ann")
    assert first.committed == rev.ref == "alice/dm.mem.ann@2" and rev.kind == "memory"
    genesis = served.service.catalog.resolve("alice", "dm.mem.ann@1")
    assert (
        genesis.provenance.data_fingerprint == GENESIS
        and not read_memory(served.service.checkpoints.blobs.read(genesis.content_hash)).state.any()
    )
    lineage = served.service.catalog.lineage("alice", rev.ref)
    assert [r.ref for r in lineage[:2]] == ["alice/dm.mem.ann@1", "alice/dm@1"]
    written = TELL + first.tokens[:-1]  # the prompt and the generated tokens but the last
    assert memory.session == tuple(written) and memory.tokens_written == len(written)
    assert rev.provenance.data_fingerprint == chain(GENESIS, written)
    assert rev.provenance.lora_config["state_digest"] == state_digest(memory.state)
    assert rev.metadata == {"instance": "ann", "weights": "alice/dm@1"}
    assert memory.state.any()

    # a second conversation is written whole on top; the chain and the count go on
    second = turn(served, "ann", ASK)
    rev2, memory2 = served.live("ann")
    assert rev2.number == 3 and [r.ref for r in served.service.catalog.lineage("alice", rev2.ref)[:2]] == [
        rev.ref,
        "alice/dm@1",
    ]
    asked = ASK + second.tokens[:-1]
    assert rev2.provenance.data_fingerprint == chain(chain(GENESIS, written), asked)
    assert memory2.tokens_written == len(written) + len(asked) and memory2.session == tuple(asked)

    # the state is read: the same conversation on a new instance scores otherwise; without an instance
    # the request is read-only on an empty state, which is the base model bit for bit, and leaves nothing
    fresh = turn(served, "ann-fresh", ASK)
    assert second.logprobs != fresh.logprobs
    empty = turn(served, None, ASK)
    assert empty.committed is None and empty.logprobs == turn(served, None, ASK, model="tiny").logprobs


def test_chat_binds_the_user_too(served: Served):
    messages = [{"role": "user", "content": "remember: the key is 42"}]
    client = served.client()
    client.chat.completions.create(model="dm@1", messages=messages, max_tokens=3, temperature=0.0, user="cat")
    rev, memory = served.live("cat")
    assert rev.number == 2 and memory.tokens_written > 0


def test_rollback_of_live_forgets(served: Served):
    turn(served, "rob", TELL)
    before = served.live("rob")[0]
    asked = turn(served, "rob", ASK)
    after, memory = served.live("rob")
    assert served.catalog().post("/adapters/dm.mem.rob/aliases/live/rollback").status_code == 200
    assert served.live("rob")[0] == before
    again = turn(served, "rob", ASK)  # the same question on the rolled-back state: the same answer
    assert again.tokens == asked.tokens and again.logprobs == asked.logprobs
    redone, memory_again = served.live("rob")
    assert redone.number == after.number + 1 and torch.equal(memory_again.state, memory.state)
    assert served.service.catalog.lineage("alice", redone.ref)[0] == before  # a fork, visible
    twice = turn(served, "rob", ASK)  # without the rollback it is written again: another state
    assert not torch.equal(served.live("rob")[1].state, memory.state) and twice.committed is not None


def test_write_once_a_resent_conversation_writes_only_its_suffix(served: Served):
    first = turn(served, "wo", TELL)
    _, before = served.live("wo")
    resent = TELL + first.tokens + ASK  # the client resends all of it, with one more message
    second = turn(served, "wo", resent)
    _, after = served.live("wo")
    assert after.tokens_written == len(resent) + 3 and after.session == (*resent, *second.tokens[:-1])

    # the same request straight on an engine: from the state after the first turn, the prompt's first
    # len(session) tokens read only (what serving sent) gives the committed state bit for bit; writing
    # them again (no write-once) gives another
    engine = Engine(served.model_dir)
    slot = served.service.checkpoints.load_into(
        engine, served.service.catalog.resolve("alice", "dm@1"), trainable=False, optimizer=False
    )
    params = SamplingParams(max_tokens=4, temperature=0.0, stop=[])

    def state(written: int) -> torch.Tensor:
        memory = MemoryInput(before.state, written)
        return engine.sample([SampleRequest(slot, resent, params, memory=memory)])[0].sequences[0].memory

    assert len(before.session) == len(TELL) + 3
    assert torch.equal(state(len(before.session)), after.state)
    assert not torch.allclose(state(0), after.state)


def test_delete_erases_the_instance(served: Served):
    turn(served, "eve", TELL)
    revs = served.service.catalog.log("alice", "dm.mem.eve")
    blobs = served.service.checkpoints.blobs
    assert all(blobs.exists(r.content_hash) for r in revs)
    catalog = served.catalog()
    assert catalog.delete("/adapters/dm.mem.eve", headers={"X-API-Key": BOB}).status_code == 404
    answer = catalog.delete("/adapters/dm.mem.eve")
    assert answer.status_code == 200
    assert sorted(answer.json()["erased_blobs"]) == sorted({r.content_hash for r in revs})
    assert not any(blobs.exists(r.content_hash) for r in revs)
    for ref in ("dm.mem.eve:live", "dm.mem.eve@2"):
        assert catalog.get("/resolve", params={"ref": ref}).status_code == 404
    restarted = turn(served, "eve", ASK)  # the next request starts from nothing again
    assert restarted.logprobs == turn(served, "eve-new", ASK).logprobs
    assert served.live("eve")[0].number == len(revs) + 2  # numbers are never reused


def test_a_state_is_refused_under_other_weights_and_the_server_serves_on(served: Served):
    turn(served, "pin", TELL)
    live = served.live("pin")[0]
    with pytest.raises(
        openai.ConflictError, match="written under alice/dm@1, and model resolves to alice/dm@2"
    ):
        turn(served, "pin", ASK, model="dm@2")
    with pytest.raises(openai.ConflictError, match="written under alice/dm@1"):
        turn(served, "pin", ASK, model="dm")  # the newest revision is dm@2
    with pytest.raises(openai.BadRequestError, match="is a δ-mem instance's state"):
        turn(served, None, ASK, model="dm.mem.pin:live")
    with pytest.raises(openai.BadRequestError, match="user: 'a b' cannot name a δ-mem instance"):
        turn(served, "a b", ASK)
    with pytest.raises(openai.BadRequestError, match="n: a δ-mem instance"):
        turn(served, "pin", ASK, n=2)
    assert served.live("pin")[0] == live  # nothing was written by the refused requests
    assert turn(served, "pin", ASK).committed == f"alice/dm.mem.pin@{live.number + 1}"


def test_another_owner_can_neither_see_nor_use_an_instance(served: Served):
    turn(served, "tom", TELL)
    with pytest.raises(openai.NotFoundError):
        turn(served, "tom", ASK, model="alice/dm@1", key=BOB)
    bob_catalog = served.catalog(BOB)
    assert bob_catalog.get("/resolve", params={"ref": "alice/dm.mem.tom:live"}).status_code == 404
    assert bob_catalog.post("/adapters/dm.mem.tom/aliases/live/rollback").status_code == 404
    # bob's own adapter of the same name and an instance of the same user: his own, from empty
    bobs = turn(served, "tom", TELL, model="dm", key=BOB)
    assert bobs.committed == "bob/dm.mem.tom@2"
    assert served.live("tom")[0].number == 2


def test_read_only_reads_the_live_state_and_keeps_nothing(served: Served):
    turn(served, "ro", TELL)
    live = served.live("ro")[0]
    read = {"extra_headers": {"x-mintd-memory": "read-only"}}
    looked = turn(served, "ro", ASK, **read)
    assert looked.committed is None and served.live("ro")[0] == live
    assert turn(served, "ro", ASK, **read).logprobs == looked.logprobs
    assert looked.logprobs != turn(served, None, ASK).logprobs  # the state is read
    # an instance that does not exist reads as empty and is not created
    assert turn(served, "nobody", ASK, **read).logprobs == turn(served, None, ASK).logprobs
    assert served.catalog().get("/resolve", params={"ref": "dm.mem.nobody"}).status_code == 404
    with pytest.raises(openai.BadRequestError, match="x-mintd-memory: 'write'"):
        turn(served, "ro", ASK, extra_headers={"x-mintd-memory": "write"})


def test_one_writer_per_instance(served: Served):
    turn(served, "solo", TELL)
    live = served.live("solo")[0]
    long = served.client().completions.create(
        model="dm@1",
        prompt=ASK,
        max_tokens=200,
        temperature=0.0,
        stream=True,
        user="solo",
        extra_body={"ignore_eos": True},
    )
    chunks = iter(long)
    next(chunks)  # admitted and writing
    with pytest.raises(openai.ConflictError, match="being written by another request"):
        turn(served, "solo", ASK)
    assert turn(served, "other", ASK).committed is not None  # other instances are not held up
    erase = served.catalog().delete("/adapters/dm.mem.solo")  # nor erased under a writer
    assert erase.status_code == 400 and "being written by another request" in erase.json()["detail"]
    long.close()  # the writer goes away: nothing committed, the lease released
    deadline = time.monotonic() + 60
    while True:
        try:
            done = turn(served, "solo", ASK)
            break
        except openai.ConflictError:
            assert time.monotonic() < deadline, "the lease was never released"
            time.sleep(0.2)
    assert done.committed == f"alice/dm.mem.solo@{live.number + 1}"


def test_a_restart_continues_bit_for_bit_and_a_replay_reproduces_the_digest(qwen3_dir: Path, tmp_path: Path):
    data = tmp_path / "data"
    thread, service = start_server(qwen3_dir, data, KEYS)
    with thread:
        served = Served(thread.url, service, qwen3_dir)
        save_weights(thread.url, ALICE, 1)
        first = turn(served, "u", TELL)
        turn(served, "v", TELL)
        straight = turn(served, "v", TELL + first.tokens + ASK)  # uninterrupted
        uninterrupted = served.live("v")[0]
    service.close()
    thread, service = start_server(qwen3_dir, data, KEYS)  # the same data dir: a restarted server
    with thread:
        served = Served(thread.url, service, qwen3_dir)
        resumed = turn(served, "u", TELL + first.tokens + ASK)
        rev, memory = served.live("u")
        assert resumed.tokens == straight.tokens and resumed.logprobs == straight.logprobs
        assert (
            rev.provenance.lora_config["state_digest"] == uninterrupted.provenance.lora_config["state_digest"]
        )
        assert rev.provenance.data_fingerprint == uninterrupted.provenance.data_fingerprint
        assert state_digest(memory.state) == rev.provenance.lora_config["state_digest"]
    service.close()


TINKER = """
import json
import tinker
from tinker import types

service = tinker.ServiceClient(base_url={url!r}, api_key={key!r})
params = types.SamplingParams(max_tokens=4, temperature=0.0, stop=[])
out = {{}}
for user in ("sdk", None):
    path = {path!r} + ("" if user is None else "#user=" + user)
    client = service.create_sampling_client(model_path=path)
    turns = []
    for prompt in ({tell!r}, {ask!r}):  # one sample at a time: one writer per instance
        seq = client.sample(types.ModelInput.from_ints(prompt), 1, params).result().sequences[0]
        turns.append([list(seq.tokens), list(seq.logprobs)])
    out[str(user)] = turns
try:
    service.create_sampling_client(model_path="tinker://adapters/dm.mem.sdk:live").sample(
        types.ModelInput.from_ints({ask!r}), 1, params).result()
except Exception as e:
    out["refused"] = [type(e).__name__, str(e)]
print(json.dumps(out))
"""


def test_the_tinker_sdk_binds_an_instance_through_model_path(served: Served):
    """`<weights path>#user=<instance>`: the unmodified SDK's samples write the instance like `user` does."""
    from tests.sdk import run_sdk_json

    script = TINKER.format(url=served.url, key=ALICE, path="tinker://adapters/alice/dm@1", tell=TELL, ask=ASK)
    out = run_sdk_json("tinker-0.38", script, timeout=300)
    rev, memory = served.live("sdk")
    assert rev.number == 3  # empty, then one state per sample
    first, second = out["sdk"]
    assert memory.tokens_written == len(TELL) + len(ASK) + 6 and memory.session == (*ASK, *second[0][:-1])
    # the same two conversations through the OpenAI endpoint: the same answers and the same state
    assert turn(served, "sdk-oai", TELL).tokens == first[0]
    assert turn(served, "sdk-oai", ASK).tokens == second[0]
    assert served.live("sdk-oai")[1].state.equal(memory.state)
    # without #user=: read-only on an empty state, nothing committed anywhere
    assert out["None"][1][0] == turn(served, None, ASK).tokens
    name, message = out["refused"]
    assert name == "BadRequestError" and "is a δ-mem instance's state" in message
