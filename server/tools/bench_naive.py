"""Benchmark scenario (a): what people write today, transformers `generate` + PEFT `set_adapter`,
requests served one after another."""
from __future__ import annotations

import time
from pathlib import Path

import torch

from hotpeft.model.load import load_base
from hotpeft.server.tools.workload import PROMPTS, Sample, summarize


class _Timestamps:
    """A transformers streamer that only notes when each new token arrives."""

    def __init__(self):
        self.times: list[float] = []
        self._prompt_seen = False

    def put(self, value):
        if not self._prompt_seen:  # generate() hands the prompt over first
            self._prompt_seen = True
            return
        self.times.append(time.perf_counter())

    def end(self):
        pass


def naive(source, quantization, device, dtype, adapters_dir: Path, models: list[str], duration: float,
          max_tokens: int) -> dict:
    """N clients, each sending its next request when the previous one ends; one `generate` at a time."""
    from peft import PeftModel

    loras = [m for m in dict.fromkeys(models) if m.startswith("lora")]
    softs = [m for m in dict.fromkeys(models) if m.startswith("soft")]
    base = load_base(source, quantization, device=device, dtype=dtype)
    tok = base.tokenizer
    peft_models = {}
    if loras:
        lm = PeftModel.from_pretrained(base.model, adapters_dir / loras[0], adapter_name=loras[0])
        for name in loras[1:]:
            lm.load_adapter(adapters_dir / name, adapter_name=name)
        peft_models.update({name: lm for name in loras})
    if softs:  # PEFT keeps prompt tuning and LoRA in separate models
        sm = PeftModel.from_pretrained(load_base(source, quantization, device=device, dtype=dtype).model,
                                       adapters_dir / softs[0], adapter_name=softs[0])
        for name in softs[1:]:
            sm.load_adapter(adapters_dir / name, adapter_name=name)
        peft_models.update({name: sm for name in softs})
    samples: list[Sample] = []
    t0 = time.perf_counter()
    ready = [t0] * len(models)  # when each client sent its current request
    k = 0
    while time.perf_counter() - t0 < duration:
        i = k % len(models)  # FIFO of back-to-back clients = round robin
        name = models[i]
        model = peft_models.get(name, base.model)
        if name in peft_models:
            model.set_adapter(name)
        ids = tok(PROMPTS[(i + k // len(models)) % len(PROMPTS)], return_tensors="pt")["input_ids"].to(device)
        stamps = _Timestamps()
        with torch.inference_mode():
            model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                           min_new_tokens=max_tokens, do_sample=False, streamer=stamps, pad_token_id=tok.eos_token_id)
        s = Sample(ready[i], stamps.times[0] if stamps.times else None, stamps.times, len(stamps.times))
        samples.append(s)
        ready[i] = time.perf_counter()
        k += 1
    return summarize(samples, time.perf_counter() - t0)
