"""The attention kernels of a packed step against attention written out row by row."""
from __future__ import annotations

import pytest
import torch

from hotpeft.server.engine.attention import GatheredSDPA, StepShape, choose, probe

BS = 4


def reference(q, K, V, takes, lens, tables, n_kv, scale):
    """Row by row: each query attends to its row's positions up to its own, read through the block table."""
    out, start = [], 0
    g = q.shape[1] // n_kv
    for take, length, blocks in zip(takes, lens, tables):
        rows = torch.tensor([blocks[p // BS] * BS + p % BS for p in range(length)])
        k, v = K[rows].repeat_interleave(g, 1), V[rows].repeat_interleave(g, 1)  # (L, nh, d)
        for j in range(take):
            pos = length - take + j
            w = torch.softmax(torch.einsum("hd,lhd->hl", q[start + j], k[:pos + 1]) * scale, -1)
            out.append(torch.einsum("hl,lhd->hd", w, v[:pos + 1]))
        start += take
    return torch.stack(out)


@pytest.mark.parametrize("takes,lens", [
    ([1, 1, 1], [9, 3, 14]),  # decode only
    ([6, 3], [6, 11]),  # prompt chunks only, the second after a cached prefix
    ([1, 7, 1, 2, 5], [13, 7, 2, 10, 5]),  # decode rows between chunks of different lengths
])
def test_gathered_sdpa_equals_attention_row_by_row(takes, lens):
    gen = torch.Generator().manual_seed(0)
    n_heads, n_kv, d, n_blocks = 6, 2, 8, 24
    K, V = torch.randn(n_blocks * BS, n_kv, d, generator=gen), torch.randn(n_blocks * BS, n_kv, d, generator=gen)
    perm = torch.randperm(n_blocks - 1, generator=gen).add(1).tolist()  # blocks scattered, null block 0 unused
    width = max(-(-n // BS) for n in lens)
    tables = []
    for n in lens:
        need = -(-n // BS)
        tables.append([perm.pop() for _ in range(need)] + [0] * (width - need))
    q = torch.randn(sum(takes), n_heads, d, generator=gen)
    shape = StepShape(takes, lens, torch.tensor(takes), torch.tensor(lens), torch.tensor(tables), BS)
    kernel = GatheredSDPA()
    got = kernel(q, K, V, kernel.prepare(shape), n_kv, d ** -0.5)
    want = reference(q, K, V, takes, lens, tables, n_kv, d ** -0.5)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_the_cpu_gets_gathered_sdpa():
    assert isinstance(choose(torch.device("cpu"), torch.float32, 6, 2, 8, 16), GatheredSDPA)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_kernel_passes_its_probe():
    kernel = choose(torch.device("cuda"), torch.bfloat16, 32, 8, 128, 16)
    assert probe(kernel, torch.device("cuda"), torch.bfloat16, 32, 8, 128, 16) < 2e-2
