"""bench/gpu.py, the prepared GPU run, dry-run on the CPU with tiny shapes so it cannot rot while no
GPU is at hand (every section runs its real code; only the shapes, the device and compilation differ)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent


@pytest.mark.extended  # 80-120 s on 2 cores: CI runs it after the default set
def test_gpu_bench_dry_run_runs_every_section(tmp_path):
    out = tmp_path / "gpu"
    proc = subprocess.run([sys.executable, "-m", "bench.gpu", "--dry-run", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sections = json.loads((out / "gpu.json").read_text())["sections"]
    errors = {k: v["error"] for k, v in sections.items() if "error" in v}
    assert not errors, errors
    assert {"env", "7b-d", "official", "7b-d-compiled", "lora", "4bit", "moe", "correctness", "8bit"} <= set(sections)
    d = sections["7b-d"]
    assert d["ttft_ms"] > 0 and d["decode_b1_eager"] > 0 and d["decode_b8_eager"] > 0 and d["prompt_tokens"] > 100
    assert sections["env"]["bandwidth_gbs"] > 0
    for mode in ("4bit", "8bit"):
        assert sections[mode]["decode_b1_eager"] > 0
    assert sections["4bit"]["qlora_tokens_per_s"] > 0 and sections["lora"]["lora_tokens_per_s"] > 0
    moe = sections["moe"]
    assert moe["greedy_equal_prefix_vs_loop"] == 4  # stacked experts give the loop's tokens
    assert moe["loop_decode_b1_eager"] > 0 and moe["stacked_decode_b1_eager"] > 0
    c = sections["correctness"]
    assert c["batched_equals_single_fp32"] is True and c["bf16_vs_fp32_argmax_equal"] is True
    o = sections["official"]
    if "skipped" not in o:  # the official files are git-ignored: present only where someone fetched them
        assert o["greedy_equal_prefix"] == o["greedy_tokens"] and o["logits_max_abs_diff"] < 1e-4
    table = (out / "gpu.md").read_text()
    assert "| section" in table and "decode_b1_eager" in table and "time to first token" in table
