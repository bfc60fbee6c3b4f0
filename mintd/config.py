"""All tunables in one validated place. Every field can be set by environment (MINTD_<FIELD>)."""

from __future__ import annotations

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
