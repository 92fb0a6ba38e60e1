"""Model work for the engine: adapter residency, soft-prompt splicing, prefill and decode steps."""
from __future__ import annotations

import torch
from transformers import DynamicCache

from hotpeft.adapters.catalog import AdapterVersion
from hotpeft.server.engine.lora import LoraBank


class ModelRunner:
    def __init__(self, model: torch.nn.Module, bank: LoraBank, eos_ids: set[int]):
        self.model = model
        self.bank = bank
        self.eos_ids = eos_ids
        self.embed = model.get_input_embeddings()
        self.device = self.embed.weight.device
        self.dtype = bank.dtype

    def make_resident(self, adapter: AdapterVersion | None) -> None:
        if adapter is not None and adapter.kind == "lora":
            self.bank.load(adapter.key, adapter.adapter.lora)

    def _lora_key(self, adapter: AdapterVersion | None) -> str | None:
        return adapter.key if adapter is not None and adapter.kind == "lora" else None

    def prefill(self, rows: list[list[int]], adapters: list[AdapterVersion | None]):
        """Run the prompt of one row; returns last-position logits (1, V) and the KV cache."""
        if len(rows) != 1:
            raise NotImplementedError("this runner prefills one row at a time")
        ids, adapter = rows[0], adapters[0]
        self.make_resident(adapter)
        input_ids = torch.tensor([ids], dtype=torch.long, device=self.device)  # (1, T)
        embeds = self.embed(input_ids)  # (1, T, H)
        if adapter is not None and adapter.kind == "prompt_tuning":
            # Soft prompt: virtual-token embeddings before the input, positions 0..n-1 (as PEFT does).
            soft = adapter.adapter.soft_prompt.to(device=self.device, dtype=embeds.dtype)  # (n, H)
            embeds = torch.cat([soft.unsqueeze(0), embeds], dim=1)
        self.bank.set_rows([self._lora_key(adapter)])
        cache = DynamicCache(config=self.model.config)
        out = self.model(inputs_embeds=embeds, past_key_values=cache, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1, :], cache

    def decode(self, tokens: list[list[int]], cache, adapters: list[AdapterVersion | None]) -> torch.Tensor:
        """One decode step; returns logits (B, V)."""
        self.bank.set_rows([self._lora_key(a) for a in adapters])
        input_ids = torch.tensor(tokens, dtype=torch.long, device=self.device)  # (B, 1)
        out = self.model(input_ids=input_ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1, :]
