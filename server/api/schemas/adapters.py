"""Request and response bodies of the adapter admin API (`/v1/adapters`)."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from hotpeft.server.api.schemas.openai import AdapterWeight, MergeStrategy


class AdapterImport(BaseModel):
    """POST /v1/adapters as JSON: register the PEFT folder at `path` (under an --import-root)."""

    model_config = ConfigDict(extra="forbid")
    name: str
    path: str = Field(min_length=1)
    description: str = Field("", max_length=4096)
    force_new_version: bool = Field(False, description="add a version even when the content is that of an existing one")


class AdapterPromote(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: int = Field(ge=1)


class AdapterResidency(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: int | None = Field(None, ge=1, description="default: the active version")
    pin: bool = False


class AdapterMerge(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    sources: list[AdapterWeight] = Field(min_length=1)
    strategy: MergeStrategy = "linear"
    density: float | None = Field(None, gt=0.0, le=1.0)
    description: str = Field("", max_length=4096)


class AdapterVersionPublic(BaseModel):
    name: str
    version: int
    kind: str
    active: bool
    residency: Literal["disk", "cpu", "device"]  # where its weights are now (never merged into the base)
    pinned: bool
    # Behind Ray Serve: the residency on each engine replica (`residency` is the best of them).
    replicas: dict[str, Literal["disk", "cpu", "device"]] | None = None
    base_model: str
    base_fingerprint: str
    rank: int | None
    alpha: float | None
    target_modules: list[str] | None
    num_virtual_tokens: int | None
    size_bytes: int
    sha256: str
    created: int
    source: str
    source_detail: dict | None
    metrics: dict | None
    description: str
    warnings: list[str]


class AdapterRegistered(AdapterVersionPublic):
    """POST /v1/adapters: the version that holds the content, and whether it was there already."""

    unchanged: bool = False


class AdapterPublic(BaseModel):
    object: Literal["adapter"] = "adapter"
    name: str
    active_version: int
    versions: list[AdapterVersionPublic]


class AdapterTiers(BaseModel):
    cpu_bytes: int
    max_cpu_bytes: int
    device_bytes: int
    max_device_bytes: int
    device_adapters: int


class AdapterList(BaseModel):
    object: Literal["list"] = "list"
    data: list[AdapterPublic]
    tiers: AdapterTiers


class AdapterDeleted(BaseModel):
    object: Literal["adapter.deleted"] = "adapter.deleted"
    name: str
    versions: list[int]  # the versions deleted
    deleted: bool = True
    active_version: int | None = None  # the active version after the deletion; None when none is left


class ResidencyChange(BaseModel):
    name: str
    version: int
    residency: Literal["disk", "cpu", "device"]
    pinned: bool
    changed: bool  # load: it was loaded now; unload: something was dropped
