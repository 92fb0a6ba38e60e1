"""`hotpeft train --sweep`: full fine-tuning, LoRA at several ranks, QLoRA and prompt tuning trained and
evaluated on the same data, one table, nothing registered; the parameter counts are checked exactly."""
from __future__ import annotations

import httpx
from test_train import hotpeft

import tiny

# QLoRA is measured against the nf4 base it trained on: that base has a column of its own
COLUMNS = ["base", "base (nf4)", "full fine-tuning", "lora r=4", "lora r=8", "qlora r=4", "prompt tuning"]


def _row(table: str, label: str) -> list[str]:
    line = next(line for line in table.splitlines() if line.startswith(label))
    return line[len(label):].split()


def test_sweep_prints_every_method_with_exact_parameter_counts(trainer_server, tiny_dirs, word_data):
    done = hotpeft("train", "--sweep", "full,lora,qlora,prompt_tuning", "--rank", "4,8", "--num-virtual-tokens", "8",
                   "--model", str(tiny_dirs["base"]), "--home", str(trainer_server.home), "--data",
                   str(word_data["pairs"]), "--name", "sweep", "--max-steps", "3", "--eval-max-new-tokens", "4",
                   "--threads", "1", timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    table = done.stdout
    header = table.splitlines()[0]
    positions = [header.index(c) for c in COLUMNS]
    assert positions == sorted(positions), header  # every method, in order

    model = tiny.make_model()
    total = sum(p.numel() for p in model.parameters())
    cfg = model.config
    kv = cfg.num_key_value_heads * cfg.hidden_size // cfg.num_attention_heads
    h, i = cfg.hidden_size, cfg.intermediate_size
    # LoRA on q, k, v, o, gate, up, down: r * (in + out) for each, in every layer
    per_rank = cfg.num_hidden_layers * ((h + h) + (h + kv) * 2 + (h + h) + (h + i) * 2 + (i + h))
    expected = [total, 4 * per_rank, 8 * per_rank, 4 * per_rank, 8 * h]
    assert _row(table, "trainable params") == ["-", "-"] + [f"{n:,}" for n in expected]
    percent = [100.0] + [100 * n / (total + n) for n in expected[1:3]]
    assert [float(x) for x in _row(table, "trainable %")[2:5]] == [round(p, 3) for p in percent]
    for label in ("held-out loss", "peak memory (MiB)", "training time (s)", "adapter size (bytes)", "ROUGE-L"):
        assert len(_row(table, label)) == len(COLUMNS)
    assert "full fine-tuning is evaluated for comparison and never registered" in table
    assert httpx.get(f"{trainer_server.url}/v1/adapters/sweep").status_code == 404
