"""All tunables in one validated place. Every field can be set by environment (MINTD_<FIELD>)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
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
