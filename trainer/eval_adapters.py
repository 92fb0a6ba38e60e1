"""`hotpeft eval`: the base and registered adapters side by side on one JSONL file."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from hotpeft.adapters.errors import AdapterError
from hotpeft.model.load import eos_ids, load_base
from hotpeft.trainer import data as data_mod
from hotpeft.trainer import retention as ret
from hotpeft.trainer.assess import retained, retention_set
from hotpeft.trainer.errors import ConfigInvalid, DatasetInvalid
from hotpeft.trainer.evaluate import GEN_METRICS, evaluate, format_table
from hotpeft.trainer.env import TrainerEnv
from hotpeft.trainer.pipeline import open_catalog, resolve_base, torch_device
from hotpeft.trainer.train import compute_dtype, pad_id


def evaluate_adapters(env: TrainerEnv, adapters: list[str], path: Path, *, template: str | None, limit: int,
                      max_new_tokens: int, max_length: int, quantize: str = "none",
                      progress: Callable[[str, int, int], None] = lambda label, done, total: None,
                      metrics=GEN_METRICS, retention: str = "default") -> tuple[str, dict]:
    """The base and each adapter on every example of `path` and on the retention set (`retention`: default,
    none or a JSONL file, as `hotpeft train --retention`); `progress(label, done, total)` per batch."""
    from peft import PeftModel

    if template is not None and template.count("{prompt}") != 1:
        raise ConfigInvalid("template", "--template must contain {prompt} exactly once")
    apply = (lambda p: p) if template is None else (lambda p: template.format(prompt=p))
    records = data_mod.read_jsonl(path, what="evaluation file", min_examples=1)
    kept = retention_set(retention)
    if env.threads:
        torch.set_num_threads(env.threads)
    device = torch_device(env)
    base = load_base(resolve_base(env), quantize, device=device, dtype=compute_dtype(device))
    examples = [e for e in (data_mod.encode(r, base.tokenizer, max_length, apply) for r in records) if e is not None]
    if not examples:
        raise DatasetInvalid(f"no example of {path} has a completion within --max-length {max_length}")
    catalog = open_catalog(env, base)
    try:
        resolved = []
        for ref in adapters:
            try:
                record = catalog.resolve(ref, param="adapter").record
            except AdapterError as e:
                raise ConfigInvalid("adapter", f"--adapter {ref}: {e.message}") from e
            if record is None:
                raise ConfigInvalid("adapter", f"--adapter {ref} names the base model, which is always compared")
            resolved.append((record, catalog.store.verified_folder(record.store_key, record.sha256)))
    finally:
        catalog.close()
    common = dict(device=device, eos_ids=sorted(eos_ids(base)), pad=pad_id(base.tokenizer),
                  max_new_tokens=max_new_tokens, limit=limit, metrics=metrics)
    base_label = "base" + ("" if base.quantization == "none" else f" ({base.quantization})")
    columns = {base_label: evaluate(base.model, base.tokenizer, examples, **common,
                                    progress=lambda done, total: progress(base_label, done, total))}
    base_ok = retained(base.model, base.tokenizer, kept[1], base_ok=None, filtered=kept[2], common=common)
    _with_retention(columns[base_label], kept, base_ok, base_ok, base=True)
    model = base.model
    for record, folder in resolved:
        peft_model = PeftModel.from_pretrained(model, str(folder), adapter_name=record.name)
        columns[record.key] = evaluate(peft_model, base.tokenizer, examples, **common,
                                       progress=lambda done, total, key=record.key: progress(key, done, total))
        ok = retained(peft_model, base.tokenizer, kept[1], base_ok=base_ok, filtered=kept[2], common=common)
        _with_retention(columns[record.key], kept, base_ok, ok, base=False)
        # LoRA layers were injected into the base: take them out before the next adapter.
        model = peft_model.unload() if record.kind == "lora" else peft_model.get_base_model()
    return format_table(columns), columns


def _with_retention(column: dict, kept: tuple[str, list, bool], base_ok: list[bool], ok: list[bool], *,
                    base: bool) -> None:
    name, items, filtered = kept
    if name == "none":
        return
    summary = ret.summarize(items, base_ok, ok, name=name, filtered=filtered)
    column["retention_set"] = summary
    if summary["items"]:
        column["retention"] = summary["base" if base else "adapter"]
        if not base:
            column["retention_drop"] = summary["drop"]
