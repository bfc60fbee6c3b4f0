"""All tunables in one validated place. Every field can be set by environment (MINTD_<FIELD>)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import ByteSize, Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class EngineSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MINTD_", extra="ignore")

    device: str = Field(
        "auto", description="'auto' (CUDA when present, else CPU), 'cpu', 'cuda', 'cuda:1', ..."
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="base-model dtype; 'auto' is float32 on CPU and bfloat16 on CUDA"
    )
    micro_batch_tokens: int = Field(
        16384, ge=1, description="padded tokens per forward pass; larger batches are accumulated"
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
    max_sample_rows: int = Field(64, ge=1, description="rows decoded together in one engine batch")
    max_train_tokens: int = Field(65536, ge=1, description="tokens merged into one forward_backward call")
    ephemeral_samplers_per_run: int = Field(8, ge=1, description="sampler snapshots kept per training run")
    download_ttl_s: int = Field(
        900, ge=60, description="how long a checkpoint download link (export, archive) stays valid"
    )
    replica_id: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}$",
        description="this process's name among replicas sharing one catalog; unset means HOSTNAME:PORT",
    )
    public_url: str | None = Field(
        None, description="where other replicas' clients reach this one; unset means http://HOST:PORT"
    )
    run_lease_s: float = Field(
        30.0, ge=1, description="a run's claim on its replica lapses this long after the replica's last beat"
    )


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
