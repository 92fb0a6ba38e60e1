"""Request and response schemas of the files and fine-tuning API, in OpenAI's shapes."""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ---- files -------------------------------------------------------------------------------------
class FileObject(BaseModel):
    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: Literal["processed"] = "processed"
    status_details: str | None = None
    expires_at: int | None = None


class FileList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FileObject]
    has_more: bool = False


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"] = "file"
    deleted: bool = True


# ---- jobs --------------------------------------------------------------------------------------
Auto = Literal["auto"]


class Hyperparameters(_Strict):
    n_epochs: int | Auto | None = Field(None, description="passes over the training file (1-100)")
    batch_size: int | Auto | None = Field(None, description="examples per step (1-512)")
    learning_rate_multiplier: float | Auto | None = Field(
        None, description="times the method's default learning rate (1e-3 LoRA/QLoRA, 3e-2 prompt tuning)")


class Supervised(_Strict):
    hyperparameters: Hyperparameters | None = None


class Method(_Strict):
    type: str = Field("supervised", description="only 'supervised' is trained by hotpeft")
    supervised: Supervised | None = None
    dpo: dict | None = None
    reinforcement: dict | None = None


class JobCreate(_Strict):
    model: str = Field(..., description="the base model's id (or 'base'): adapters are trained on the served base")
    training_file: str
    validation_file: str | None = None
    suffix: str | None = Field(None, description="the adapter's name (default ft-<job id>)")
    seed: int | None = None
    hyperparameters: Hyperparameters | None = Field(None, description="deprecated by OpenAI; use method")
    method: Method | None = None
    metadata: dict[str, str] | None = None
    integrations: list[dict] | None = None
    hotpeft: dict[str, Any] | None = Field(
        None, description="hotpeft's training options (send with extra_body): method (lora, qlora, prompt_tuning), "
                          "rank, alpha, dropout, target_modules, rslora, num_virtual_tokens, prompt_init_text, template, "
                          "max_length, max_steps, min_improvement, ... — the flags of `hotpeft train`")


class JobError(BaseModel):
    code: str
    message: str
    param: str | None = None


class JobHyperparameters(BaseModel):
    n_epochs: float | int
    batch_size: int
    learning_rate_multiplier: float


class JobMethodSupervised(BaseModel):
    hyperparameters: JobHyperparameters


class JobMethod(BaseModel):
    type: Literal["supervised"] = "supervised"
    supervised: JobMethodSupervised


class HotpeftJobInfo(BaseModel):
    method: str
    adapter: str = Field(..., description="the name the adapter is registered under")
    stage: str | None = Field(None, description="while running: starting, training, registering")
    progress: dict | None = Field(None, description="step, total_steps, train_loss, elapsed_s, eta_s")
    config: dict
    metrics: dict | None = Field(None, description="held-out metrics of the base and the adapter, training figures")


class Job(BaseModel):
    id: str
    object: Literal["fine_tuning.job"] = "fine_tuning.job"
    created_at: int
    finished_at: int | None
    model: str
    fine_tuned_model: str | None
    organization_id: str = "hotpeft"
    result_files: list[str] = []
    status: Literal["validating_files", "queued", "running", "succeeded", "failed", "cancelled"]
    validation_file: str | None
    training_file: str
    hyperparameters: JobHyperparameters
    trained_tokens: int | None
    error: JobError | None
    seed: int
    estimated_finish: int | None
    integrations: list = []
    metadata: dict[str, str] | None
    method: JobMethod
    user_provided_suffix: str | None
    hotpeft: HotpeftJobInfo


class JobList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Job]
    has_more: bool


class JobEvent(BaseModel):
    id: str
    object: Literal["fine_tuning.job.event"] = "fine_tuning.job.event"
    created_at: int
    level: Literal["info", "warn", "error"]
    message: str
    type: Literal["message", "metrics"]
    data: dict | None = None


class JobEventList(BaseModel):
    object: Literal["list"] = "list"
    data: list[JobEvent]
    has_more: bool
