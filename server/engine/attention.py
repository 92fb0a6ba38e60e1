"""Attention of a packed step over the paged KV cache, behind one interface with two kernels.

A step holds R rows; row i owns `takes[i]` consecutive packed queries (1 when decoding, a prompt
chunk when prefilling) at positions [kv_len - take, kv_len) of its sequence, and attends
causally to its own positions [0, kv_len), which live in its blocks (`kv.py`).

- `PagedVarlen` (CUDA): one fused varlen Flash-Attention call for every row, decode and prompt
  chunks alike. It reads the rows' K/V straight from the pool through their block tables (or,
  where the installed torch's kernel takes no block table, from a packed gather of exactly the
  rows' positions); no padding to the longest row, no mask. It is chosen only after a probe at
  start-up gave the reference's output on this device.
- `GatheredSDPA` (every device; the CPU's only choice, torch has no varlen kernel there): each
  row's positions gathered from its blocks up to the longest row, then two SDPA calls per layer,
  whatever the batch: one for the decoding rows (a length mask) and one for all the prompt chunks
  together (a causal mask, chunks padded to the longest).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F

log = logging.getLogger("hotpeft.engine")


@dataclass
class StepShape:
    """What the host knows of a step: per row its token count and length after the step."""

    takes: list[int]
    kv_lens: list[int]
    takes_t: torch.Tensor  # (R,) long on the device
    lens_t: torch.Tensor  # (R,) long on the device
    table: torch.Tensor  # (R, width) long on the device: each row's blocks, the null block 0 past its end
    block_size: int


def _ints(values: list[int], device: torch.device) -> torch.Tensor:
    host = torch.tensor(values, dtype=torch.long)
    return host.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else host


class GatheredSDPA:
    name = "sdpa-gathered"
    reads_tables = False  # its cost follows the padded width, not the rows' lengths

    def prepare(self, s: StepShape) -> dict:
        device, bs = s.takes_t.device, s.block_size
        read = max(s.kv_lens)
        r = len(s.takes)
        span = torch.arange(read, device=device)
        gather = s.table.gather(1, (span // bs).expand(r, -1)) * bs + span % bs  # (R, read)
        gather = gather.masked_fill(span.unsqueeze(0) >= s.lens_t.unsqueeze(1), 0)
        ends = s.takes_t.cumsum(0)
        meta = {"gather": gather, "n_tok": sum(s.takes)}
        singles = [i for i, t in enumerate(s.takes) if t == 1]
        chunked = [i for i, t in enumerate(s.takes) if t > 1]
        if singles:
            idx = _ints(singles, device) if chunked else None
            lens = s.lens_t if idx is None else s.lens_t[idx]
            meta["single"] = (idx, ends[idx] - 1 if idx is not None else ends - 1,
                              (span.unsqueeze(0) < lens.unsqueeze(1)).view(len(singles), 1, 1, read))
        if chunked:
            idx = _ints(chunked, device)
            cmax = max(s.takes[i] for i in chunked)
            takes, lens = s.takes_t[idx], s.lens_t[idx]
            offset = torch.arange(cmax, device=device)
            # query j of chunk row i is packed token start + j at position len - take + j; padded
            # queries repeat the chunk's last token (their output is written to a spare row).
            clamped = torch.minimum(offset.unsqueeze(0), takes.unsqueeze(1) - 1)  # (C, cmax)
            src = (ends[idx] - takes).unsqueeze(1) + clamped
            dst = torch.where(offset.unsqueeze(0) < takes.unsqueeze(1), src, meta["n_tok"])
            q_pos = (lens - takes).unsqueeze(1) + clamped  # (C, cmax)
            causal = span.view(1, 1, read) <= q_pos.unsqueeze(2)  # (C, cmax, read)
            meta["chunked"] = (idx, src, dst, causal, cmax)
        return meta

    def __call__(self, q: torch.Tensor, K: torch.Tensor, V: torch.Tensor, meta: dict, n_kv: int,
                 scale: float) -> torch.Tensor:
        """q (N, nh, d) against the pool's K/V (rows, n_kv, d) -> (N, nh, d)."""
        n_tok, nh, d = q.shape
        g = nh // n_kv
        Kr, Vr = K[meta["gather"]].transpose(1, 2), V[meta["gather"]].transpose(1, 2)  # (R, n_kv, read, d)
        single, chunked = meta.get("single"), meta.get("chunked")
        if single is not None and chunked is None and n_tok == Kr.shape[0]:  # decode only: rows are tokens
            o = F.scaled_dot_product_attention(q.view(n_tok, n_kv, g, d), Kr, Vr, attn_mask=single[2], scale=scale)
            return o.view(n_tok, nh, d)
        out = q.new_empty(n_tok + 1, nh, d)  # the last row takes the padded chunk queries' output
        if single is not None:
            idx, tok, keep = single
            o = F.scaled_dot_product_attention(q[tok].view(-1, n_kv, g, d), Kr[idx], Vr[idx], attn_mask=keep,
                                               scale=scale)
            out[tok] = o.view(-1, nh, d)
        if chunked is not None:
            idx, src, dst, causal, cmax = chunked
            c = idx.shape[0]
            # query heads of one KV head stacked along the query axis: (C, n_kv, g * cmax, d), no K/V repeat
            qc = q[src].view(c, cmax, n_kv, g, d).permute(0, 2, 3, 1, 4).reshape(c, n_kv, g * cmax, d)
            mask = causal.unsqueeze(1).expand(c, g, cmax, -1).reshape(c, 1, g * cmax, -1)
            o = F.scaled_dot_product_attention(qc, Kr[idx], Vr[idx], attn_mask=mask, scale=scale)
            out[dst] = o.view(c, n_kv, g, cmax, d).permute(0, 3, 1, 2, 4).reshape(c, cmax, nh, d)
        return out[:n_tok]


class PagedVarlen:
    """Flash-Attention varlen over the block tables (CUDA only)."""

    def __init__(self, paged: bool):
        from torch.nn.attention.varlen import varlen_attn  # CUDA builds only use it

        self.varlen, self.paged = varlen_attn, paged
        self.reads_tables = paged
        self.name = "flash-varlen-paged" if paged else "flash-varlen-packed"

    def prepare(self, s: StepShape) -> dict:
        device = s.takes_t.device
        zero = torch.zeros(1, dtype=torch.int32, device=device)
        cu_q = torch.cat([zero, s.takes_t.cumsum(0).to(torch.int32)])
        cu_k = torch.cat([zero, s.lens_t.cumsum(0).to(torch.int32)])
        meta = {"cu_q": cu_q, "cu_k": cu_k, "max_q": max(s.takes), "max_k": max(s.kv_lens)}
        if self.paged:
            meta |= {"table": s.table.to(torch.int32), "used": s.lens_t.to(torch.int32), "bs": s.block_size}
        else:  # exactly each row's positions, packed: sum(kv_lens) rows, no padding
            total, bs = sum(s.kv_lens), s.block_size
            row = torch.repeat_interleave(torch.arange(len(s.takes), device=device), s.lens_t, output_size=total)
            pos = torch.arange(total, device=device) - (cu_k[:-1].long())[row]
            meta["gather"] = s.table[row, pos // bs] * bs + pos % bs
        return meta

    def __call__(self, q: torch.Tensor, K: torch.Tensor, V: torch.Tensor, meta: dict, n_kv: int,
                 scale: float) -> torch.Tensor:
        q = q.contiguous()
        if self.paged:
            bs = meta["bs"]
            return self.varlen(q, K.view(-1, bs, *K.shape[1:]), V.view(-1, bs, *V.shape[1:]), meta["cu_q"],
                               meta["cu_k"], meta["max_q"], meta["max_k"], scale=scale, window_size=(-1, 0),
                               enable_gqa=True, seqused_k=meta["used"], block_table=meta["table"])
        Kp, Vp = K[meta["gather"]], V[meta["gather"]]
        return self.varlen(q, Kp, Vp, meta["cu_q"], meta["cu_k"], meta["max_q"], meta["max_k"], scale=scale,
                           window_size=(-1, 0), enable_gqa=True)


def choose(device: torch.device, dtype: torch.dtype, n_heads: int, n_kv: int, head_dim: int, block_size: int):
    """The fastest kernel that gives the reference's output here: a varlen Flash-Attention kernel
    on CUDA when the probe passes (paged first, then packed), gathered SDPA otherwise."""
    if device.type == "cuda":
        for paged in (True, False):
            try:
                kernel = PagedVarlen(paged)
                error = probe(kernel, device, dtype, n_heads, n_kv, head_dim, block_size)
            except Exception as e:  # noqa: BLE001 - an older torch or a kernel this GPU lacks: try the next
                log.info("attention: %s unavailable here (%s: %s)", "paged varlen" if paged else "packed varlen",
                         type(e).__name__, str(e).splitlines()[0][:200] if str(e) else "")
                continue
            if error < 2e-2:
                log.info("attention: %s (probe max error %.1e against SDPA)", kernel.name, error)
                return kernel
            log.warning("attention: %s differs from SDPA by %.1e in the probe; not used", kernel.name, error)
    return GatheredSDPA()


def probe(kernel, device: torch.device, dtype: torch.dtype, n_heads: int, n_kv: int, head_dim: int,
          block_size: int) -> float:
    """Largest difference between `kernel` and gathered SDPA on random rows (a decode row, a prompt
    chunk after a cached prefix, a whole prompt) over scattered blocks."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    n_blocks = 16
    K = torch.randn(n_blocks * block_size, n_kv, head_dim, generator=gen).to(device, dtype)
    V = torch.randn(n_blocks * block_size, n_kv, head_dim, generator=gen).to(device, dtype)
    takes, lens = [1, 5, 19], [37, 21, 19]
    width = 3
    table = torch.tensor([[7, 2, 9], [4, 11, 0], [13, 1, 0]], device=device)
    q = torch.randn(sum(takes), n_heads, head_dim, generator=gen).to(device, dtype)
    shape = StepShape(takes, lens, torch.tensor(takes, device=device), torch.tensor(lens, device=device),
                      table[:, :width], block_size)
    scale = head_dim ** -0.5
    want = GatheredSDPA()
    ref = want(q.float(), K.float(), V.float(), want.prepare(shape), n_kv, scale)
    got = kernel(q, K, V, kernel.prepare(shape), n_kv, scale)
    return float((got.float() - ref).abs().max())
