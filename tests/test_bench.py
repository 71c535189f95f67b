"""The GPU benchmark's --tiny mode (the same code on the CPU, printing JSON with both sides measured), its profile
summary, the weights its decode floor reads, and the operator count of a decode layer."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

from torch.autograd import DeviceType

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_gpu.py"


def test_tiny_benchmark_runs_and_reports_both_sides(tmp_path):
    out = tmp_path / "bench.json"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--tiny", "--profile", "--out", str(out)],
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
    floor = tiny["decode_floor"]
    assert floor["gemv_ms"] > 0 and floor["copy_tb_s"] > 0 and floor["ours_share"] > 0
    reply = tiny["first_fast_reply_s"]
    assert 0 <= reply["ours_first_token"] + reply["ours_first_step"] <= reply["ours"]
    profile = tiny["profile"]
    assert set(profile) == {"ours_first_token", "ours_16_tokens", "stock_first_token"}
    assert all(p["wall_ms"] > 0 and len(p["heaviest"]) == 8 for p in profile.values())


def test_tiny_speculative_section_runs_on_the_cpu(tmp_path):
    """The speculative section in tiny shapes: every alpha x gamma, the target's own tokens each time, acceptance
    that follows alpha (all drafts at 1.0), and the costs it reports."""
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--tiny", "--skip-training", "--skip-generation", "--speculative"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    section = json.loads(done.stdout)["models"]["tiny"]["speculative"]
    assert (section["target"], section["draft"]) == ("tiny", "tiny-draft")
    runs = section["runs"]
    assert {(r["alpha"], r["gamma"]) for r in runs} == {(a, g) for a in (1.0, 0.9, 0.8, 0.6) for g in (2, 3, 4, 6)}
    assert all(r["same_tokens_as_plain"] and r["tokens_per_s"] > 0 for r in runs)
    assert all(r["acceptance_rate"] == 1.0 and r["tokens_per_target_forward"] > 2 for r in runs if r["alpha"] == 1.0)
    assert min(r["acceptance_rate"] for r in runs if r["alpha"] == 0.6) < 0.9
    assert section["draft_step_cost"] > 0 and set(section["verify_cost"]) == {"step_ms", "3", "4", "5", "7"}
    assert set(section["best"]) == {"1.0", "0.9", "0.8", "0.6"}


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_gpu", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_profile_summary_counts_each_kernel_once():
    """A GPU profile lists a kernel twice: as its own row and inside the host op that launched it. The summary
    reads the kernel rows only, so device time, launches and the heaviest list are the kernels'."""
    bench = load_bench()

    def row(key, device_type, count, device_us, cpu_us=0):
        return SimpleNamespace(
            key=key, device_type=device_type, count=count, self_device_time_total=device_us, self_cpu_time_total=cpu_us
        )

    rows = [
        row("aten::mm", DeviceType.CPU, 4, 3000, cpu_us=40),  # its kernels' time, again
        row("aten::add", DeviceType.CPU, 2, 100, cpu_us=20),
        row("aten::view", DeviceType.CPU, 6, 0, cpu_us=5),
        row("gemm_kernel", DeviceType.CUDA, 4, 3000),
        row("add_kernel", DeviceType.CUDA, 2, 100),
        row("Memcpy HtoD", DeviceType.CUDA, 1, 50),
    ]
    report = bench.summarize_profile(rows, wall_s=0.005, on_device=True, top=2)
    assert report == {
        "wall_ms": 5.0,
        "kernel_ms": 3.15,
        "busy": 0.63,
        "kernel_launches": 7,
        "heaviest": [["gemm_kernel", 4, 3.0], ["add_kernel", 2, 0.1]],
    }
    on_cpu = bench.summarize_profile(rows[:3], wall_s=0.001, on_device=False, top=2)
    assert on_cpu == {"wall_ms": 1.0, "heaviest": [["aten::mm", 4, 0.04], ["aten::add", 2, 0.02]]}


def test_a_decode_layer_dispatches_at_most_32_operators():
    """Each operator is a kernel inside the captured step; q and k are rotated together (5 fewer than apart)."""
    spec = importlib.util.spec_from_file_location("ops_per_step", SCRIPT.parent / "ops_per_step.py")
    ops = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ops)
    report = ops.report()
    for name in ("prefill", "step"):
        assert report[name]["ops_per_layer"] <= 32, report[name]
        assert report[name]["per_layer_by_op"]["neg"] == 1  # one rotate_half per layer


def test_decode_floor_reads_every_projection_once_and_the_lm_head():
    """The floor's matrices are exactly the weights a step streams: every linear layer of the decoder (fused
    q/k/v and gate/up count once, as the row blocks they are) and the LM head, and no embedding or norm."""
    import torch

    bench = load_bench()
    ours, _ = bench.build("tiny", torch.device("cpu"), torch.float32)
    matrices = bench.step_matrices(ours)
    decoder = ours.module.lm.get_decoder()
    linears = [m.weight for m in decoder.layers.modules() if isinstance(m, torch.nn.Linear)]
    assert len(matrices) == 4 * len(decoder.layers) + 1  # fused: q/k/v, o, gate/up, down per layer; the head
    assert sum(m.numel() for m in matrices) == sum(w.numel() for w in linears) + ours.module.lm.lm_head.weight.numel()
    assert matrices[-1].data_ptr() == ours.module.lm.lm_head.weight.data_ptr()
    assert {m.data_ptr() for m in matrices[:-1]} <= {w.data_ptr() for w in linears}  # the model's own storage
