"""The training step: a PEFT model (LoRA, QLoRA or prompt tuning) on the base, trained by the
transformers Trainer with completion-only labels. Saving and registering are the pipeline's."""
from __future__ import annotations

import resource
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from hotpeft.adapters.faults import failpoint
from hotpeft.model.load import LoadedBase, load_base
from hotpeft.model.source import ModelSource
from hotpeft.trainer.config import FULL, TrainConfig
from hotpeft.trainer.data import IGNORE, Encoded
from hotpeft.trainer.errors import ConfigInvalid, JobCancelled

Progress = Callable[[int, int, float, float], None]  # step, total steps, loss, seconds elapsed


@dataclass
class TrainStats:
    trainable_params: int
    total_params: int
    steps: int
    train_seconds: float
    train_tokens: int  # tokens through the model (all epochs, no padding)
    final_loss: float
    peak_memory_bytes: int

    @property
    def trainable_percent(self) -> float:
        return 100.0 * self.trainable_params / max(1, self.total_params)

    @property
    def tokens_per_s(self) -> float:
        return self.train_tokens / max(self.train_seconds, 1e-9)


def compute_dtype(device: torch.device) -> torch.dtype:
    """Training and evaluation precision: bf16 on CUDA, float32 on the CPU."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def load_training_base(source: ModelSource, method: str, device: torch.device) -> LoadedBase:
    """The base the adapter is trained on: nf4 for QLoRA, full precision otherwise."""
    return load_base(source, "nf4" if method == "qlora" else "none", device=device,
                     dtype=compute_dtype(device))


def parameter_counts(model) -> tuple[int, int]:
    """(trainable, total) parameters; PEFT's count when there is one (it counts 4-bit weights right)."""
    if hasattr(model, "get_nb_trainable_parameters"):
        return model.get_nb_trainable_parameters()
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def build_peft_model(base: LoadedBase, cfg: TrainConfig):
    """The model to train: the base wrapped by PEFT, or (method full) the base itself, every weight trainable."""
    from peft import LoraConfig, PromptTuningConfig, PromptTuningInit, get_peft_model, prepare_model_for_kbit_training

    model = base.model
    if cfg.method == FULL:
        torch.manual_seed(cfg.seed)
        return model.requires_grad_(True)
    if cfg.method in ("lora", "qlora"):
        present = {name.rpartition(".")[2] for name, m in model.named_modules() if hasattr(m, "in_features")}
        missing = [t for t in cfg.target_modules if t not in present]
        if missing:
            raise ConfigInvalid("target_modules", f"--target-modules: {', '.join(missing)} not in the base model; its "
                                                  f"linear layers: {', '.join(sorted(present))}")
        if cfg.method == "qlora":
            # Casts norms and embeddings to fp32 for stable gradients; the nf4 weights stay frozen.
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        config = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                            target_modules=list(cfg.target_modules), use_rslora=cfg.rslora, bias="none",
                            task_type="CAUSAL_LM")
    else:
        text = cfg.prompt_init == "text"
        config = PromptTuningConfig(
            task_type="CAUSAL_LM", num_virtual_tokens=cfg.num_virtual_tokens,
            prompt_tuning_init=PromptTuningInit.TEXT if text else PromptTuningInit.RANDOM,
            prompt_tuning_init_text=cfg.prompt_init_text if text else None,
            tokenizer_name_or_path=str(base.path) if text else None,
        )
    torch.manual_seed(cfg.seed)
    peft_model = get_peft_model(model, config)
    # The saved config names the base by the id the server knows it by, never a local path.
    saved = peft_model.peft_config["default"]
    saved.base_model_name_or_path = base.model_id
    if getattr(saved, "tokenizer_name_or_path", None):
        saved.tokenizer_name_or_path = base.model_id
    return peft_model


class _Collator:
    def __init__(self, pad_id: int):
        self.pad_id = pad_id
        self.tokens = 0  # real (unpadded) tokens handed to the model

    def __call__(self, batch: list[dict]) -> dict:
        width = max(len(b["input_ids"]) for b in batch)
        ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, b in enumerate(batch):
            n = len(b["input_ids"])
            ids[i, :n] = torch.tensor(b["input_ids"])
            labels[i, :n] = torch.tensor(b["labels"])
            mask[i, :n] = 1
        self.tokens += int(mask.sum())
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def pad_id(tokenizer) -> int:
    for value in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if value is not None:
            return int(value)
    return 0


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    # ru_maxrss: the process's peak resident set, KiB on Linux (bytes on macOS).
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def train(peft_model, base: LoadedBase, examples: list[Encoded], cfg: TrainConfig, workdir: Path, *,
          progress: Progress | None = None, should_stop: Callable[[], bool] = lambda: False) -> TrainStats:
    from transformers import PrinterCallback, Trainer, TrainerCallback, TrainingArguments

    started = time.perf_counter()
    losses: list[float] = []

    class Hooks(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))
                if progress is not None:
                    progress(state.global_step, state.max_steps, float(logs["loss"]), time.perf_counter() - started)

        def on_step_end(self, args, state, control, **kwargs):
            failpoint("trainer.step")
            if should_stop():
                raise JobCancelled("the job was cancelled during training")

    if base.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(base.device)
    args = TrainingArguments(
        output_dir=str(workdir / "trainer"), per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum, num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps if cfg.max_steps is not None else -1, learning_rate=cfg.learning_rate,
        warmup_steps=cfg.warmup_fraction, weight_decay=cfg.weight_decay, lr_scheduler_type="linear",
        logging_steps=1, save_strategy="no", eval_strategy="no", report_to="none", disable_tqdm=True,
        seed=cfg.seed, data_seed=cfg.seed, use_cpu=base.device.type != "cuda", bf16=base.dtype == torch.bfloat16,
        remove_unused_columns=False, dataloader_pin_memory=False, optim="adamw_torch",
    )
    rows = [{"input_ids": e.input_ids, "labels": e.labels} for e in examples]
    collator = _Collator(pad_id(base.tokenizer))
    trainer = Trainer(model=peft_model, args=args, train_dataset=rows, data_collator=collator, callbacks=[Hooks()])
    trainer.remove_callback(PrinterCallback)  # the caller reports progress (bar or job events)
    peft_model.train()
    t0 = time.perf_counter()
    result = trainer.train()
    seconds = time.perf_counter() - t0
    peft_model.eval()
    trainable, total = parameter_counts(peft_model)
    return TrainStats(trainable, total, result.global_step, seconds, collator.tokens,
                      losses[-1] if losses else float("nan"), peak_memory_bytes(base.device))
