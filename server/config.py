"""Server settings: one pydantic BaseSettings; env vars HOTPEFT_<NAME>; CLI flags map onto the same fields."""
from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from hotpeft.model.source import DEFAULT_MODEL_ID
from hotpeft.model.synthetic import SHAPES, check_name, is_synthetic
from hotpeft.trainer.env import TrainerEnv


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="HOTPEFT_", extra="forbid")

    model: str = Field(DEFAULT_MODEL_ID, description="base model: the embedded default id, a local HF model directory, a "
                                                     "hub id, or synthetic:<" + "|".join(SHAPES) + "> (a real model's "
                                                     "shapes with random weights, for benchmarks)")
    quantize: Literal["auto", "none", "int8", "nf4"] = Field(
        "auto", description="resident precision of the base: auto = nf4 on CUDA, none on the CPU"
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="compute dtype: auto = bfloat16 on CUDA and on CPUs with native bf16, else float32"
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto = cuda when present, else cpu")
    home: Path = Field(Path("~/.hotpeft"), description="home directory: model cache, adapters, registry, logs")
    host: str = Field("127.0.0.1", description="address to bind")
    port: int = Field(8000, ge=1, le=65535, description="port to bind")
    adapters_dir: Path | None = Field(
        None, description="folder of PEFT adapter folders to register at start-up, named by folder (a new version only "
                          "when a folder's content changed)")
    registry_url: str | None = Field(
        None, description="SQLAlchemy URL of the adapter registry (default: SQLite registry.db in the home); a "
                          "postgresql+psycopg:// URL lets several servers and training jobs share one catalogue")
    store_url: str | None = Field(
        None, description="fsspec URL of an adapter store shared by servers on several machines (s3://bucket/path "
                          "needs pip install s3fs; gs://, file:///...): objects are written there too and fetched "
                          "from there when --store-dir lacks them")
    store_dir: Path | None = Field(
        None, description="content-addressed adapter store (default: <home>/store); servers sharing a registry "
                          "must share it too")
    import_root: list[Path] = Field(
        default_factory=list, description="folder from which POST /v1/adapters may register by path (repeat the "
                                          "flag for several; none by default)")
    max_adapter_bytes: int = Field(1 << 30, ge=1, description="largest adapter upload or import accepted, in bytes")
    max_cpu_adapter_bytes: int = Field(
        4 << 30, ge=1, description="adapter weights kept in CPU memory (LRU by bytes; the rest is read from the store)")
    max_file_bytes: int = Field(256 << 20, ge=1, description="largest training file accepted by POST /v1/files, in bytes")
    max_running_jobs: int = Field(1, ge=1, le=64, description="fine-tuning jobs trained at once (the rest wait queued)")
    train_threads: int | None = Field(
        None, ge=1, le=1024, description="CPU threads of a training job's worker process (default: half the cores, at "
                                         "least 1); workers also run at a lower CPU priority than serving")
    metrics_max_adapters: int = Field(
        100, ge=1, le=10000, description="distinct adapter names given their own metrics label; the rest are "
                                         "counted as adapter=\"other\"")
    max_model_len: int | None = Field(None, ge=16, description="context limit in tokens (default: the model's)")
    max_num_seqs: int = Field(32, ge=1, le=1024, description="most sequences running at once")
    kv_cache_mib: int | None = Field(
        None, ge=1, description="KV cache budget in MiB, one pool of 16-token blocks (default: 30% of free GPU memory "
                                "on CUDA, 2048 on the CPU)"
    )
    prefix_cache: bool = Field(True, description="reuse the KV of prompt prefixes computed by the same weights "
                                                 "(--no-prefix-cache turns it off)")
    compile: Literal["auto", "off", "on"] = Field(
        "auto", description="decode steps at fixed shapes: on = CUDA graphs on a GPU (torch.compile on the CPU); auto "
                            "= CUDA graphs on a GPU, off on the CPU (where compiling took minutes and did not pay)")
    max_batch_tokens: int = Field(256, ge=16, le=65536, description="tokens per forward pass: decode rows + prefill chunk")
    max_queue: int = Field(256, ge=1, description="waiting requests before new ones get 429 with Retry-After")
    threads: int | None = Field(
        None, ge=1, le=1024, description="CPU threads for the model (default: cores - 1, at least 1: one core stays with HTTP)"
    )
    max_resident_adapter_bytes: int = Field(
        1 << 30, ge=1, description="LoRA weights the engine keeps ready; least recently used ones are evicted past it"
    )
    max_n: int = Field(8, ge=1, le=128, description="most choices per request: `n`, times the number of prompts of a "
                                                  "batched /v1/completions request")
    max_stop: int = Field(8, ge=0, le=64, description="most stop sequences per request")
    max_stop_length: int = Field(256, ge=1, le=65536, description="longest stop sequence accepted, in characters")
    max_schema_bytes: int = Field(
        32 << 10, ge=64, le=16 << 20, description="largest JSON schema, regex, grammar or tool list that constrains "
                                                  "decoding (structured outputs, tool calls), in bytes")
    max_prompt_tokens: int | None = Field(
        None, ge=1, description="longest prompt accepted, in tokens (default: the context length minus one)")
    max_total_tokens: int | None = Field(
        None, ge=2, description="most prompt + completion tokens per choice (default: the context length)")
    max_body_bytes: int = Field(
        2 << 20, ge=1024, description="largest JSON request body, in bytes (uploads have --max-adapter-bytes and "
                                      "--max-file-bytes)")
    api_key: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list, description="bearer key for the inference routes (/v1/models, /v1/chat/completions, "
                                          "/v1/completions); repeat the flag, or comma-separate the env var, for "
                                          "several. With any key set, every route but the public ones needs one")
    admin_key: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list, description="bearer key for every route, admin ones included (adapters, files, "
                                          "fine-tuning jobs, merge, load/unload); repeatable like --api-key")
    public_metrics: bool = Field(True, description="/metrics answers without a key (Prometheus scrapes it); "
                                                   "--no-public-metrics to require one")
    public_dashboard: bool = Field(False, description="/dashboard/data answers without a key (the /dashboard page "
                                                      "itself is static and always public; it asks for a key)")
    insecure_allow_remote: bool = Field(
        False, description="allow binding a non-loopback --host with no --api-key/--admin-key set")
    drain_timeout: float = Field(30.0, ge=0, le=3600, description="on SIGTERM, seconds running requests get to "
                                                                   "finish before the server exits")
    stall_timeout: float = Field(60.0, gt=0, le=3600, description="/ready turns 503 when the engine has work but has "
                                                                  "not finished a step for this many seconds")
    max_lora_rank: int = Field(64, ge=1, le=1024, description="largest LoRA rank accepted")
    allow_foreign_base: bool = Field(False, description="serve adapters whose config names another base model")
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="log level")
    ray: bool = Field(False, description="serve through Ray Serve: --replicas engine replicas behind one ingress "
                                         "(pip install hotpeft[ray])")
    replicas: int = Field(1, ge=1, le=1024, description="engine replicas with --ray")
    ray_address: str | None = Field(None, description="Ray cluster to join with --ray (default: start a local one)")

    @field_validator("model")
    @classmethod
    def _known_synthetic(cls, v: str) -> str:
        if is_synthetic(v):
            check_name(v)  # an unknown shape names the accepted ones
        return v

    @field_validator("home", "adapters_dir", "store_dir", mode="before")
    @classmethod
    def _expand(cls, v, info) -> Path | None:
        if v is None:
            return None
        if "://" in str(v):  # Path would quietly turn s3://bucket into the local folder s3:/bucket
            raise ValueError(f"--{info.field_name.replace('_', '-')} {v!r} is a URL; it must be a folder path"
                             + (" (a shared store at a URL is --store-url; --store-dir is then its local copy)"
                                if info.field_name == "store_dir" else ""))
        return Path(v).expanduser()

    @field_validator("store_url")
    @classmethod
    def _store_url(cls, v: str | None) -> str | None:
        if v is None:
            return None
        if "://" not in v:
            raise ValueError(f"--store-url {v!r} is not a URL (s3://bucket/path, file:///path, ...); a folder is "
                             "--store-dir")
        import fsspec

        try:
            fsspec.core.url_to_fs(v)
        except (ImportError, ValueError) as e:  # an unknown protocol, or its package is missing (s3fs, gcsfs)
            raise ValueError(f"--store-url {v!r}: {e}") from None
        return v

    @field_validator("api_key", "admin_key", mode="before")
    @classmethod
    def _keys(cls, v):
        # The environment gives one string: comma-separated keys.
        if isinstance(v, str):
            v = [v]
        keys = [k.strip() for item in v for k in (item.split(",") if isinstance(item, str) else [item]) if k]
        for k in keys:
            if isinstance(k, str) and len(k) < 8:
                raise ValueError("keys must be at least 8 characters long")
        return keys

    @model_validator(mode="after")
    def _remote_needs_keys(self):
        if not (self.api_key or self.admin_key or self.insecure_allow_remote or _is_loopback(self.host)):
            raise ValueError(
                f"--host {self.host} would open every route, admin ones included, to the network without a key: set "
                "--api-key and --admin-key (or HOTPEFT_API_KEY / HOTPEFT_ADMIN_KEY), or pass --insecure-allow-remote")
        return self

    @property
    def auth_enabled(self) -> bool:
        return bool(self.api_key or self.admin_key)

    @field_validator("import_root")
    @classmethod
    def _roots(cls, v: list[Path]) -> list[Path]:
        roots = [Path(p).expanduser() for p in v]
        for root in roots:
            if not root.is_dir():
                raise ValueError(f"--import-root {root} is not a directory")
        return roots

    @property
    def registry(self) -> str:
        return self.trainer_env().registry

    @property
    def store(self) -> Path:
        return self.trainer_env().store

    def trainer_env(self, threads: int | None = None) -> TrainerEnv:
        """What a training job of this server trains with: this server's base, registry and store."""
        return TrainerEnv(model=self.model, home=self.home, registry_url=self.registry_url, store_dir=self.store_dir,
                          store_url=self.store_url, device=self.device, threads=threads,
                          max_lora_rank=self.max_lora_rank, allow_foreign_base=self.allow_foreign_base)

    @field_validator("adapters_dir")
    @classmethod
    def _exists(cls, v: Path | None) -> Path | None:
        if v is not None and not v.is_dir():
            raise ValueError(f"--adapters-dir {v} is not a directory")
        return v


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
