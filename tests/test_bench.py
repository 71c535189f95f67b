"""The GPU benchmark's --tiny mode: the same code on the CPU, printing JSON with both sides measured."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def test_tiny_benchmark_runs_and_reports_both_sides(tmp_path):
    out = tmp_path / "bench.json"
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_gpu.py"
    done = subprocess.run(
        [sys.executable, str(script), "--tiny", "--profile", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(out.read_text())
    assert json.loads(done.stdout) == report
    assert len(report["code"]) == 12  # which sources were measured
    tiny = report["models"]["tiny"]
    assert (
        tiny["training"]["ours"]["best"]["samples_per_s"] > 0 and tiny["training"]["stock"]["best"]["samples_per_s"] > 0
    )
    assert tiny["training"]["auto_micro_batch"] == {"micro_batch": 4, "gradient_checkpointing": False}
    assert tiny["ttft_ms"]["ours"] > 0 and tiny["ttft_ms"]["stock"] > 0
    assert tiny["decode_tokens_per_s"]["ours"] > 0 and tiny["decode_tokens_per_s"]["stock"] > 0
    assert tiny["batched_captioning"]["ours_speedup"] > 0 and tiny["decode_modes"] == {"ours": "static"}
    profile = tiny["profile"]
    assert set(profile) == {"ours_first_token", "ours_16_tokens", "stock_first_token"}
    assert all(p["wall_ms"] > 0 and len(p["heaviest"]) == 8 for p in profile.values())
