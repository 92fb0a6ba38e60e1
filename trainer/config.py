"""Training configuration: one dataclass shared by `hotpeft train`, the fine-tuning API and the worker.

Every field is a CLI flag (`rank` -> `--rank`) and a key of the API's `hotpeft` object. Checks
run in `__post_init__` and name the flag and its range, so a bad value fails before any model
is loaded.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields

from hotpeft.adapters.errors import InvalidName
from hotpeft.adapters.names import validate_name
from hotpeft.model.arch import PROJECTIONS
from hotpeft.trainer.errors import ConfigInvalid

METHODS = ("lora", "qlora", "prompt_tuning")
FULL = "full"  # full fine-tuning: trained and evaluated by --sweep for comparison, never registered
ALL_LINEAR = list(PROJECTIONS)  # the projections the engine serves LoRA on
# Lower is better for loss; higher for the others. Improvement = how much the adapter beats the base.
METRICS = {"loss": -1, "rouge1": 1, "rouge2": 1, "rougeL": 1, "bleu": 1, "chrf": 1, "exact_match": 1}
GENERATION_METRICS = ("rouge1", "rouge2", "rougeL", "bleu", "chrf", "exact_match")  # loss is always computed
# LoRA: 2e-4 is the usual large-model figure; on a 135M model with a few hundred examples 1e-3
# converges in one or two epochs (BENCHMARKS.md). Prompt tuning needs a far larger rate (Lester et
# al. used 0.3 with Adafactor); 3e-2 with AdamW is stable here.
DEFAULT_LR = {"lora": 1e-3, "qlora": 1e-3, "prompt_tuning": 3e-2, FULL: 5e-5}


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


@dataclass
class TrainConfig:
    name: str
    """Adapter name to register (a new version when the name exists)."""
    method: str = "lora"
    """lora, qlora (4-bit nf4 base + LoRA) or prompt_tuning."""
    epochs: float = 3.0
    """Passes over the training set (ignored when --max-steps is set)."""
    max_steps: int | None = None
    """Optimizer steps to run; overrides --epochs."""
    learning_rate: float | None = None
    """Peak learning rate (default: 1e-3 for LoRA/QLoRA, 3e-2 for prompt tuning)."""
    batch_size: int = 8
    """Examples per optimizer step, before gradient accumulation."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step."""
    warmup_fraction: float = 0.06
    """Share of the steps with a linearly rising learning rate."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    max_length: int | None = None
    """Tokens per example, longer ones truncated and counted (default: the model's context, at most 1024)."""
    seed: int = 0
    """Seed of initialisation, shuffling and the held-out split."""
    rank: int = 16
    """LoRA rank r (gains plateau beyond 16)."""
    alpha: float | None = None
    """LoRA alpha (default: 2 x rank)."""
    dropout: float = 0.05
    """LoRA dropout."""
    target_modules: list[str] = field(default_factory=lambda: list(ALL_LINEAR))
    """Linear layers that get LoRA weights: attention and MLP by default."""
    rslora: bool = False
    """Rank-stabilised LoRA: scale alpha/sqrt(r) instead of alpha/r."""
    num_virtual_tokens: int = 20
    """Soft-prompt length for prompt tuning (20-100 is the usual range)."""
    prompt_init: str | None = None
    """random, or text (from --prompt-init-text); default: text when a text is given, else random."""
    prompt_init_text: str | None = None
    """Text whose token embeddings initialise the soft prompt."""
    template: str | None = None
    """Instruction template with one {prompt}, applied to prompts (and to user messages of chat data)."""
    validation_fraction: float = 0.1
    """Held-out share of the training file when no --validation file is given."""
    eval_max_new_tokens: int = 64
    """Tokens generated per held-out example for ROUGE and exact match."""
    eval_limit: int = 200
    """Held-out examples used for the generation metrics (loss uses all of them)."""
    metrics: list[str] = field(default_factory=lambda: list(GENERATION_METRICS))
    """Generation metrics of the evaluation: rouge1, rouge2, rougeL, bleu, chrf, exact_match (loss always)."""
    min_improvement: dict[str, float] = field(default_factory=dict)
    """METRIC=DELTA: register only if the adapter beats the base by DELTA on METRIC."""
    retention: str = "default"
    """Retention (forgetting) set of every evaluation: default (generated), none, or a JSONL file (API: file id)."""
    max_forgetting: float | None = None
    """Register only if the adapter loses at most this share of the retention set (0-1, e.g. 0.1)."""
    description: str = ""
    """Free text stored on the registered version."""

    def __post_init__(self) -> None:
        try:
            validate_name(self.name)
        except InvalidName as e:
            raise ConfigInvalid("name", f"{flag('name')}: {e.message}") from e
        if self.method not in METHODS + (FULL,):
            raise ConfigInvalid("method", f"{flag('method')} must be one of {', '.join(METHODS)}, got {self.method!r}")
        self._range("epochs", 0.01, 100)
        if self.max_steps is not None:
            self._range("max_steps", 1, 1_000_000)
        if self.learning_rate is None:
            self.learning_rate = DEFAULT_LR[self.method]
        self._range("learning_rate", 1e-7, 1.0)
        self._range("batch_size", 1, 512)
        self._range("grad_accum", 1, 1024)
        self._range("warmup_fraction", 0.0, 0.5)
        self._range("weight_decay", 0.0, 1.0)
        if self.max_length is not None:
            self._range("max_length", 8, 131072)
        self._range("seed", 0, 2**32 - 1)
        self._range("rank", 1, 256)
        if self.alpha is None:
            self.alpha = 2.0 * self.rank
        self._range("alpha", 1e-3, 4096)
        self._range("dropout", 0.0, 0.9)
        if not self.target_modules or any(not isinstance(m, str) for m in self.target_modules):
            raise ConfigInvalid("target_modules", f"{flag('target_modules')} needs at least one module name, e.g. "
                                                  f"{','.join(ALL_LINEAR)}")
        unservable = [m for m in self.target_modules if m not in ALL_LINEAR]
        if unservable:  # the engine applies LoRA to these projections only
            raise ConfigInvalid("target_modules", f"{flag('target_modules')}: {', '.join(unservable)} cannot be "
                                                  f"served; choose from {', '.join(ALL_LINEAR)}")
        self._range("num_virtual_tokens", 1, 512)
        if self.prompt_init is None:
            self.prompt_init = "text" if self.prompt_init_text else "random"
        if self.prompt_init not in ("random", "text"):
            raise ConfigInvalid("prompt_init", f"{flag('prompt_init')} must be random or text, got {self.prompt_init!r}")
        if self.prompt_init == "text" and not self.prompt_init_text:
            raise ConfigInvalid("prompt_init_text", f"{flag('prompt_init')} text needs {flag('prompt_init_text')}")
        if self.prompt_init_text and self.method != "prompt_tuning":
            raise ConfigInvalid("prompt_init_text", f"{flag('prompt_init_text')} applies to --method prompt_tuning "
                                                    f"only, not {self.method}")
        if self.template is not None and self.template.count("{prompt}") != 1:
            raise ConfigInvalid("template", f"{flag('template')} must contain {{prompt}} exactly once, e.g. "
                                            "'Summarize the following conversation.\\n\\n{prompt}\\n\\nSummary:'")
        if self.template is not None and self._template_fields():
            raise ConfigInvalid("template", f"{flag('template')} may use only {{prompt}}; write a literal brace as "
                                            f"{{{{ or }}}} (found {', '.join(self._template_fields())})")
        self._range("validation_fraction", 0.01, 0.5)
        self._range("eval_max_new_tokens", 1, 1024)
        self._range("eval_limit", 1, 100_000)
        check_metrics(self.metrics)
        if not isinstance(self.retention, str) or not self.retention.strip():
            raise ConfigInvalid("retention", f"{flag('retention')} takes default, none or a JSONL file, got "
                                             f"{self.retention!r}")
        if self.max_forgetting is not None:
            self._range("max_forgetting", 0.0, 1.0)
            if self.retention == "none":
                raise ConfigInvalid("max_forgetting", f"{flag('max_forgetting')} needs a retention set; drop "
                                                      f"{flag('retention')} none")
        for metric, delta in self.min_improvement.items():
            if metric != "loss" and metric in METRICS and metric not in self.metrics:
                raise ConfigInvalid("min_improvement", f"{flag('min_improvement')} {metric}: {metric} is not "
                                                       f"computed; add it to {flag('metrics')}")
            if metric not in METRICS:
                raise ConfigInvalid("min_improvement", f"{flag('min_improvement')}: unknown metric {metric!r}; one of "
                                                       f"{', '.join(METRICS)}")
            if not isinstance(delta, (int, float)) or not math.isfinite(delta):
                raise ConfigInvalid("min_improvement", f"{flag('min_improvement')} {metric}: the delta must be a "
                                                       f"number, got {delta!r}")

    def _range(self, name: str, low: float, high: float) -> None:
        value = getattr(self, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (low <= value <= high) \
                or (isinstance(value, float) and not math.isfinite(value)):
            raise ConfigInvalid(name, f"{flag(name)} must be between {low:g} and {high:g}, got {value!r}")
        if next(f for f in fields(self) if f.name == name).type in ("int", "int | None") and value != int(value):
            raise ConfigInvalid(name, f"{flag(name)} must be a whole number, got {value!r}")
        if next(f for f in fields(self) if f.name == name).type in ("int", "int | None"):
            setattr(self, name, int(value))

    def _template_fields(self) -> list[str]:
        import string

        try:
            names = [f for _, f, _, _ in string.Formatter().parse(self.template) if f is not None]
        except ValueError as e:
            return [str(e)]
        return sorted({n for n in names if n != "prompt"})

    def apply_template(self, prompt: str) -> str:
        return prompt if self.template is None else self.template.format(prompt=prompt)

    def to_dict(self) -> dict:
        return asdict(self)



def check_metrics(metrics: list[str], name: str = "metrics") -> list[str]:
    """Known generation metric names, at least one; ConfigInvalid naming the flag otherwise."""
    if not isinstance(metrics, list) or not metrics or any(m not in GENERATION_METRICS for m in metrics):
        bad = [m for m in metrics if m not in GENERATION_METRICS] if isinstance(metrics, list) else [metrics]
        raise ConfigInvalid(name, f"{flag(name)}: unknown metric(s) {', '.join(map(repr, bad)) or '(none given)'}; "
                                  f"choose from {', '.join(GENERATION_METRICS)}")
    return metrics


def parse_min_improvement(items: list[str]) -> dict[str, float]:
    """`METRIC=DELTA` items (CLI) -> {metric: delta}."""
    out: dict[str, float] = {}
    for item in items:
        metric, sep, delta = item.partition("=")
        try:
            out[metric.strip()] = float(delta)
        except ValueError:
            sep = ""
        if not sep:
            raise ConfigInvalid("min_improvement", f"{flag('min_improvement')} takes METRIC=DELTA (e.g. rougeL=0.05), "
                                                   f"got {item!r}")
    return out
