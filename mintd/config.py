"""All tunables in one validated place. Every field can be set by environment (MINTD_<FIELD>).

The wire-format bounds below are not tunable: they are part of the published API schema.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import ByteSize, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

MAX_ID_CHARS = 256  # ids, names and paths a request may carry (ours are far shorter)
MAX_INT = 2**63 - 1  # integers in bodies and query strings (seq ids, offsets) fit a signed 64-bit int
MAX_TAGS = 64  # per session, each at most MAX_ID_CHARS
MAX_METADATA_BYTES = 64 * 1024  # user_metadata as JSON (the catalog keeps revisions' metadata to this too)
MAX_EVAL_REVISIONS = 10_000  # revisions one evaluation run scores
MAX_EVAL_ITEMS = 10_000  # items (prompts) in one evaluation run's eval set


class EngineSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MINTD_", extra="ignore")

    device: str = Field(
        "auto", description="'auto' (CUDA when present, else CPU), 'cpu', 'cuda', 'cuda:1', ..."
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="base-model dtype; 'auto' is float32 on CPU and bfloat16 on CUDA"
    )
    attn_implementation: str = Field(
        "auto",
        description="transformers attention implementation: 'auto' takes the model family's choice "
        "(sdpa, or eager for gpt-oss's attention sinks); or 'sdpa', 'eager', 'flex_attention'",
    )
    micro_batch_tokens: int = Field(
        16384, ge=1, description="padded tokens per forward pass; larger batches are accumulated"
    )
    merge_min_tokens: int = Field(
        2048,
        ge=1,
        description="padded tokens a micro-batch of several runs' merged training work may hold even where "
        "each run alone is smaller: below this a forward pays more in per-call overhead than in compute, "
        "so many small runs (one row per adapter) train together, not one by one; above it merged runs use "
        "micro-batches no larger than the largest of them alone (merging never raises peak memory there)",
    )
    step_tokens: int = Field(
        1024,
        ge=1,
        description="tokens per sampling step: one per decoding sample, the rest for prompt chunks "
        "(bench/serve_load.py, small preset, 2 cores: 1024 served 5-7% more requests within the TTFT SLO "
        "than 512 and 15% more than 2048, vLLM's CPU default)",
    )
    max_running_rows: int = Field(256, ge=1, description="samples decoding together in the step engine")
    kv_cache_tokens: int = Field(
        65536, ge=16, description="token positions the paged KV cache holds (all running samples together)"
    )
    kv_block_size: int = Field(16, ge=1, description="token positions per KV cache block")
    cpu_kernels: bool = Field(
        True,
        description="on CPU: decode attention and the multi-adapter LoRA deltas through mintd's C++ kernels "
        "(built at first use, a few seconds; a 120-row decode step, bf16, 2 cores: attention 1.0 ms a "
        "layer against ~2 for gathering blocks into SDPA, LoRA 2.4-4x faster than float32 bmm); off, or "
        "without a C++ compiler: the pure-torch paths",
    )
    cpu_packed_linears: bool = Field(
        True,
        description="on CPU: run the base linears through oneDNN on weights packed in place (2-3x "
        "faster matmuls than F.linear in float32 and bfloat16; no extra copy; tied weights stay unpacked)",
    )
    cpu_packed_min_weight: int = Field(
        1 << 17,
        ge=0,
        description="base linears with fewer weight elements stay on F.linear: oneDNN's fixed cost per "
        "call (~20 us on a 2-core machine) outweighs its gain below about 256 x 512",
    )


class ServeSettings(BaseSettings):
    """`mintd serve`: the HTTP server and the control plane around the engines."""

    model_config = SettingsConfigDict(env_prefix="MINTD_", extra="ignore")

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    data_dir: Path = Field(Path("data"), description="checkpoints and server state live here")
    long_poll_s: float = Field(25.0, gt=0, description="how long retrieve_future holds a request")
    future_retention_s: float = Field(
        4 * 3600, gt=0, description="completed results kept this long, then 410"
    )
    seq_gap_timeout_s: float = Field(
        300.0, gt=0, description="a run whose next seq_id never comes fails after"
    )
    max_sample_rows: int = Field(
        128,
        ge=1,
        description="rows decoded together in one engine batch (128, as vLLM's CPU server: under "
        "bench/serve_load.py on 2 cores, 64 capped goodput at 8.8-9.3 req/s, 128 served 20 req/s within "
        "the 2 s TTFT SLO; the KV cache bounds the rows' memory either way)",
    )
    intra_op_threads: int = Field(
        0,
        ge=0,
        description="CPU threads each engine op may use (torch intra-op); 0: torch's default (the cores). "
        "Serving wants them all too once the engine thread's OpenMP team is the process's only one "
        "(2 cores, bench/serve_load.py at 12 req/s: goodput 9.3 req/s with 2 threads, 7.3 with 1), and "
        "so does training (a forward_backward of 8x256 tokens on the small preset: 3.3 s with 1 thread, "
        "1.7 s with 2)",
    )
    max_train_tokens: int = Field(65536, ge=1, description="tokens merged into one forward_backward call")
    heap_trim_interval_s: float = Field(
        10.0,
        ge=0,
        description="how often (at most) each engine worker hands the memory the C allocator kept after "
        "frees back to the OS, between rounds (glibc; ~tens of ms each on a large heap). 0 turns it off; "
        "without it resident memory grows under long training",
    )
    full_gc_interval_s: float = Field(
        60.0,
        ge=0,
        description="how often each engine worker runs Python's full garbage collection: when idle, or "
        "between rounds once overdue by another interval. Python's own full collections are off meanwhile "
        "(a pass stalls every request, and a wave of cold loads set off one every few hundred adapters). "
        "0 leaves them to Python",
    )
    max_pending_rows: int = Field(
        256,
        ge=1,
        description="OpenAI endpoint: sequences (n per request) a base model may hold waiting or decoding; "
        "a request beyond it gets 429 with Retry-After",
    )
    default_max_tokens: int = Field(
        256, ge=1, description="OpenAI endpoint: tokens generated when a request sets no max_tokens"
    )
    adapter_device_budget: ByteSize = Field(
        ByteSize(4 * 2**30),
        description="bytes the adapters on each base model's device may occupy (e.g. 512MiB, 4GiB): "
        "saved adapters being sampled, sampling snapshots and live training runs (weights, gradients and "
        "optimizer state); beyond it the least recently used unreferenced adapters are evicted and idle "
        "training runs parked in host memory",
    )
    adapter_host_budget: ByteSize = Field(
        ByteSize(8 * 2**30),
        description="bytes of verified adapter blobs each base model keeps in host memory, so a reload "
        "after a device eviction neither reads the disk nor re-hashes (e.g. 1GiB)",
    )
    run_park_after_s: float = Field(
        600.0,
        gt=0,
        description="a training run with no request for this long moves, with its optimizer state, from "
        "the device to host memory (it resumes bit-exactly on its next request)",
    )
    max_load_queue: int = Field(
        4096,
        ge=1,
        description="sample requests per base model that may wait for a cold adapter load; beyond it new "
        "ones get 429 with Retry-After",
    )
    ephemeral_samplers_per_run: int = Field(8, ge=1, description="sampler snapshots kept per training run")
    sequence_ttl_s: float = Field(
        86400.0,
        gt=0,
        description="sequences sampled with record_stability_info stay usable by stable_reinforce this "
        "long after their last use",
    )
    max_recorded_sequences: int = Field(
        1_000_000, ge=1, description="recorded sequences kept in memory; the least recently used go first"
    )
    download_ttl_s: int = Field(
        900, ge=60, description="how long a checkpoint download link (export, archive) stays valid"
    )
    public_url: str | None = Field(
        None,
        pattern=r"^https?://[^\s/?#]+(/[^\s?#]*)?$",
        description="base URL clients reach this server at (e.g. https://mintd.example.com behind a "
        "proxy that rewrites Host): download links, and the URL other replicas name in a 409, are built "
        "from it. Unset: links from each request's Host, the replica URL http://HOST:PORT",
    )
    replica_id: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}$",
        description="this process's name among replicas sharing one catalog; unset means HOSTNAME:PORT",
    )
    run_lease_s: float = Field(
        30.0, ge=1, description="a run's claim on its replica lapses this long after the replica's last beat"
    )

    # bounds on what one client can make the server hold (hardening; the README lists them)
    max_body_bytes: int = Field(
        32 * 2**20, ge=2**16, description="largest request body; 413 beyond it (the SDKs send ~5 MB chunks)"
    )
    max_upload_bytes: int = Field(
        2 * 2**30, ge=2**16, description="largest body of the catalog's PEFT archive import route"
    )
    max_json_depth: int = Field(64, ge=8, le=1000, description="deepest nesting a JSON body may have")
    max_tensor_elements: int = Field(
        2**24, ge=2**10, description="largest tensor a request may decode to (checked before allocating)"
    )
    max_sessions_per_owner: int = Field(256, ge=1, description="live sessions an owner may hold")
    max_runs_per_owner: int = Field(128, ge=1, description="live training runs an owner may hold")
    max_samplers_per_owner: int = Field(1024, ge=1, description="live sampling sessions an owner may hold")
    max_eval_runs_per_owner: int = Field(4, ge=1, description="evaluation runs an owner may have running")
    session_idle_timeout_s: float = Field(
        900.0,
        gt=0,
        description="a session with no heartbeat and no request for this long is closed: its training "
        "runs, samplers and in-memory state are freed (saved checkpoints stay)",
    )
    reap_interval_s: float = Field(5.0, gt=0, description="how often idle and finished sessions are reaped")


class CatalogSettings(BaseSettings):
    """The adapter catalog's database: SQLite in the data dir unless a URL (e.g. PostgreSQL) is given."""

    model_config = SettingsConfigDict(env_prefix="MINTD_", extra="ignore")

    catalog_url: str | None = Field(
        None,
        description="SQLAlchemy URL; unset means sqlite:///<data_dir>/catalog.db. "
        "PostgreSQL: postgresql+psycopg://user@host/db",
    )
    catalog_busy_timeout_ms: int = Field(
        10_000, ge=0, description="SQLite: how long a writer waits for the write lock before failing"
    )
    catalog_cache_mb: int = Field(
        64, ge=1, description="SQLite page cache per connection; bounds catalog memory at any catalog size"
    )


class BlobSettings(BaseSettings):
    """Where adapter bytes live: a local folder, or an S3-compatible bucket behind a bounded disk cache."""

    model_config = SettingsConfigDict(env_prefix="MINTD_", extra="ignore")

    blob_url: str | None = Field(
        None,
        description="a local folder, or s3://BUCKET/PREFIX (endpoint and credentials from the standard "
        "AWS settings: AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_PROFILE, ...); unset means <data_dir>/blobs",
    )
    blob_cache_budget: ByteSize = Field(
        ByteSize(20 * 2**30),
        gt=0,
        description="S3 only: bytes the local disk cache (<data_dir>/blob-cache) may hold, e.g. 20GiB",
    )
