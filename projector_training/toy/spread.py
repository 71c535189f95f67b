"""`python -m projector_training.toy.spread --seeds 0 1 2`: the toy recipe's scores over seeds, as JSON.

Each seed is a whole `vlm-train --recipe toy --seed S` run in its own process: a new world and alignments, with the
bundled backbones measured again on that world (cached per seed beside the default ones). `--kernels avx2` runs each
seed again with torch's AVX2 kernels (`ATEN_CPU_CAPABILITY`, and MKL's likewise): float results of CPU kernels
differ between instruction sets and a small training run amplifies that, so this stands in for another machine
(those runs cache their backbones apart). Prints, and with `--out` writes, each run's headline scores and the
minimum, mean and maximum of each over all runs, with the package versions and CPU kernels they were measured with.
Not part of the test suite: about 7 minutes a run on 2 cores, nothing cached (the draft included).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

from projector_training.recipes import toy_cache_dir

__all__ = ["main", "summarise"]


def summarise(runs: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Headline metric -> its min, mean and max over the runs (each run's eval.json, flat keys)."""
    metrics = [k for k, v in next(iter(runs.values())).items() if k.endswith(("_accuracy", "_match"))]
    metrics = [k for k in metrics if isinstance(next(iter(runs.values()))[k], float)]
    out = {}
    for name in metrics:
        values = [run[name] for run in runs.values()]
        out[name] = {"min": min(values), "mean": round(statistics.fmean(values), 4), "max": max(values)}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m projector_training.toy.spread", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--runs-dir", type=Path, default=Path("runs/spread"), help="one adapter per seed here")
    parser.add_argument("--kernels", nargs="+", default=["default"], choices=["default", "avx2"])
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args(argv)

    runs: dict[str, dict[str, Any]] = {}
    for kernels in args.kernels:
        env = dict(os.environ)
        if kernels != "default":
            cache = Path(f"{toy_cache_dir()}-{kernels}")
            env.update(ATEN_CPU_CAPABILITY=kernels, MKL_ENABLE_INSTRUCTIONS=kernels.upper(), VLM_TOY_CACHE=str(cache))
        for seed in args.seeds:
            name = f"seed{seed}" + ("" if kernels == "default" else f"-{kernels}")
            run_dir = args.runs_dir / f"toy-{name}"
            command = [sys.executable, "-m", "projector_training", "--recipe", "toy", "--seed", str(seed)]
            command += ["--output-dir", str(run_dir)]
            done = subprocess.run(command, stdout=subprocess.DEVNULL, env=env, check=False)
            if done.returncode != 0:
                print(f"{name}: vlm-train failed ({done.returncode}); rerun it alone to see why", file=sys.stderr)
                return 1
            report = json.loads((run_dir / "eval.json").read_text())
            runs[name] = {k: v for k, v in report.items() if k != "details"}
            print(f"{name}: caption exact match {report['caption_exact_match']}", file=sys.stderr)
    first = next(iter(runs.values()))
    result = {
        "command": "python -m projector_training.toy.spread --seeds "
        + " ".join(map(str, args.seeds))
        + " --kernels "
        + " ".join(args.kernels),
        "spread": summarise(runs),
        "runs": runs,
        "versions": first.get("versions"),
        "cpu": first.get("cpu"),
        "commit": first.get("commit"),
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
