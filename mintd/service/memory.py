"""δ-mem instances: per-user states of a δ-mem adapter, kept as catalog `memory` revisions.

An instance is a catalog adapter of the caller, `<weights adapter>.mem.<instance>`, whose revisions are
states (store/memory) and whose alias `live` names the newest committed one. Its first revision is the
empty state (parents: the weights revision); each later one has parents (previous state, weights),
provenance naming the weights (ref and content hash), the state's digest and the head of the transcript
hash chain (`data_fingerprint`), and metadata `{instance, weights}`. Rolling `live` back forgets what
was written since; erasing the instance (`Checkpoints.erase`) tombstones its revisions and deletes
their blobs. A read-only binding reads the `live` state and writes, commits and holds nothing.

A state is bound to the weights revision that wrote it: a request whose `model` resolves to any other
revision is refused (409), whatever the names say. One writer per instance (a lease held from admission
to commit, in this process): a second request for an instance with a request in flight is refused (409).

Write-once: the state's revision keeps the tokens written since the conversation last started over (its
session). A prompt that begins with the whole session writes only what follows it; any other prompt is a
new conversation and is written whole on top of the state (that is the memory across conversations).
An edited or regenerated earlier turn is therefore written again as new; to forget the old one instead,
roll `live` back first.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from mintd.catalog import CatalogConflict, CatalogNotFound, Provenance, Revision, RevisionKind, validate
from mintd.engine.delta_mem.state import GENESIS, chain, state_digest
from mintd.engine.sampling import MemoryInput, SampleResult
from mintd.store.memory import MemoryState, pack_memory, read_memory

if TYPE_CHECKING:
    from mintd.engine.engine import Engine
    from mintd.service.checkpoints import Checkpoints

LIVE = "live"
SEPARATOR = ".mem."
USER_SUFFIX = "#user="  # Tinker: model_path `<weights ref>#user=<instance>` binds an instance


def is_delta_mem(rev: Revision) -> bool:
    """A δ-mem weights revision (its states are `memory` revisions, never served as a model)."""
    return rev.kind != RevisionKind.MEMORY and "delta_mem" in rev.provenance.lora_config


def refuse_state(rev: Revision, field_name: str) -> None:
    """A `memory` revision is never a model: it means something only under its weights."""
    if rev.kind == RevisionKind.MEMORY:
        raise ValueError(
            f"{field_name}: {rev.ref} is a δ-mem instance's state; name the weights that wrote it "
            f"({rev.metadata.get('weights')}) and bind the instance (see README, serving δ-mem)"
        )


def instance_adapter(weights: Revision, instance: str, field_name: str = "user") -> str:
    """The catalog adapter holding an instance's states: `<weights adapter>.mem.<instance>`."""
    name = f"{weights.adapter}{SEPARATOR}{instance}"
    if not validate.NAME_RE.fullmatch(instance) or not validate.NAME_RE.fullmatch(name):
        raise ValueError(
            f"{field_name}: {instance!r} cannot name a δ-mem instance: use letters, digits, '.', '_' or '-' "
            f"(starting with a letter or digit), at most {128 - len(weights.adapter) - len(SEPARATOR)} "
            "characters here"
        )
    return name


@dataclass
class Binding:
    """One request's instance: the state it starts from and, when it writes, what to commit after."""

    memories: Memories
    owner: str
    weights: Revision
    prompt: list[int]
    start: MemoryState
    adapter: str | None = None  # None: read-only, nothing is committed
    live: Revision | None = None  # the state revision the request starts from
    written: int = 0  # prompt tokens already in the state (write-once)
    _held: bool = field(default=False, repr=False)

    @property
    def writes(self) -> bool:
        return self.adapter is not None

    def input(self) -> MemoryInput:
        if not self.writes:  # every prompt token counts as written and nothing generated writes
            return MemoryInput(self.start.state, len(self.prompt), write_generated=False)
        return MemoryInput(self.start.state, self.written)

    def commit(self, result: SampleResult) -> Revision | None:
        """Register the state after the request as a `memory` revision and move `live` to it; nothing
        when read-only or when the sample was cancelled. Releases the lease either way."""
        try:
            sample = result.sequences[0]
            if not self.writes or sample.stop_reason == "cancelled" or sample.memory is None:
                return None
            session = [*self.prompt, *sample.tokens[:-1]]
            segment = session[self.written :]
            assert self.live is not None and self.adapter is not None
            head = chain(self.live.provenance.data_fingerprint or GENESIS, segment)
            total = self.start.tokens_written + len(segment)
            state = MemoryState(sample.memory.detach().cpu(), total, tuple(session), self.start.instance)
            return self.memories.commit(self.owner, self.adapter, self.weights, state, head, self.live)
        finally:
            self.release()

    def release(self) -> None:
        if self._held:
            self._held = False
            self.memories.leases.release(self.owner, self.adapter or "")


class Leases:
    """One writer per instance in this process."""

    def __init__(self) -> None:
        self._held: set[tuple[str, str]] = set()
        self._lock = threading.Lock()

    def take(self, owner: str, adapter: str, instance: str, field_name: str = "user") -> None:
        with self._lock:
            if (owner, adapter) in self._held:
                raise CatalogConflict(
                    f"{field_name}: δ-mem instance {instance!r} is being written by another request; one "
                    "writer per instance, retry when it has finished"
                )
            self._held.add((owner, adapter))

    def release(self, owner: str, adapter: str) -> None:
        with self._lock:
            self._held.discard((owner, adapter))


class Memories:
    def __init__(self, checkpoints: Checkpoints) -> None:
        self.checkpoints = checkpoints
        self.catalog = checkpoints.catalog
        self.leases = Leases()

    def bind(
        self,
        owner: str,
        weights: Revision,
        engine: Engine,
        instance: str | None,
        prompt: list[int],
        read_only: bool = False,
    ) -> Binding:
        """The request's binding: read-only on an empty state without an instance; else the instance's
        `live` state (created empty on first use), checked against the weights, under the lease. With
        `read_only`, the instance's `live` state (empty if none) is read, nothing written or created."""
        if instance is None:
            return Binding(self, owner, weights, prompt, self._empty(weights, engine, ""))
        adapter = instance_adapter(weights, instance)
        empty = self._empty(weights, engine, f"{owner}/{adapter}")
        if read_only:
            live = self._live(owner, adapter, instance, weights)
            return Binding(self, owner, weights, prompt, empty if live is None else self.read(live))
        self.leases.take(owner, adapter, instance)
        binding = Binding(self, owner, weights, prompt, empty, adapter, _held=True)
        try:
            live = self._live(owner, adapter, instance, weights)
            binding.live = live or self.commit(owner, adapter, weights, empty, GENESIS, None)
            binding.start = self.read(binding.live)
            session = list(binding.start.session)
            binding.written = len(session) if session and prompt[: len(session)] == session else 0
        except BaseException:
            binding.release()
            raise
        return binding

    def read(self, rev: Revision) -> MemoryState:
        try:
            return read_memory(self.checkpoints.blobs.read(rev.content_hash, verify=True))
        except (ValueError, LookupError, OSError) as exc:
            raise ValueError(f"user: the stored state {rev.ref} is unreadable: {exc}") from None

    def _empty(self, weights: Revision, engine: Engine, instance: str) -> MemoryState:
        rank = int(weights.provenance.lora_config["delta_mem"]["rank"])
        layers = int(engine.model.config.num_hidden_layers)
        return MemoryState(torch.zeros(layers, rank, rank), 0, (), instance)

    def _live(self, owner: str, adapter: str, instance: str, weights: Revision) -> Revision | None:
        """The instance's `live` state revision, checked to belong to `weights`; None before its first
        use (or after an erase)."""
        try:
            live = self.catalog.resolve(owner, f"{adapter}:{LIVE}", field="user")
        except CatalogNotFound:
            return None
        if live.metadata.get("weights") != weights.ref:
            raise CatalogConflict(
                f"user: δ-mem instance {instance!r} holds a state written under "
                f"{live.metadata.get('weights')}, and model resolves to {weights.ref}: a state is valid "
                "only under the weights that wrote it (name that revision as the model, or erase the "
                "instance)"
            )
        return live

    def commit(
        self,
        owner: str,
        adapter: str,
        weights: Revision,
        state: MemoryState,
        head: str,
        previous: Revision | None,
    ) -> Revision:
        """Store the state, register it as the instance's next `memory` revision, point `live` at it."""
        digest = state_digest(state.state)
        provenance = Provenance(
            base_fingerprint=weights.provenance.base_fingerprint,
            base_model=weights.provenance.base_model,
            lora_config={
                "type": "delta_mem_state",
                "weights": weights.ref,
                "weights_hash": weights.content_hash,
                "layers": state.layers,
                "rank": state.rank,
                "tokens_written": state.tokens_written,
                "state_digest": digest,
                "write_generated": True,
            },
            data_fingerprint=head,  # the transcript hash chain's head
        )
        parents = [weights.ref] if previous is None else [previous.ref, weights.ref]
        metadata = {"instance": adapter[len(weights.adapter) + len(SEPARATOR) :], "weights": weights.ref}
        rev = self.checkpoints.add(
            owner,
            adapter,
            pack_memory(state),
            RevisionKind.MEMORY.value,
            provenance,
            parents=parents,
            metadata=metadata,
        )
        # `live` moves only from the state this one was written on: a writer on another replica that
        # moved it first leaves this state as a sibling revision, visible in the lineage, not live
        expect = None if previous is None else previous.number
        self.catalog.promote(owner, adapter, LIVE, rev.number, expect=expect)
        return rev

    def erase(self, owner: str, adapter: str) -> list[str]:
        """`Checkpoints.erase` under the instance's lease, so that no request in flight commits a state
        into it afterwards (409 while one writes)."""
        self.leases.take(owner, adapter, adapter, "name")
        try:
            return self.checkpoints.erase(owner, adapter)
        finally:
            self.leases.release(owner, adapter)
