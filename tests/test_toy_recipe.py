"""`vlm-train --recipe toy` end to end, as a new user runs it: the alignment targets, then `vlm caption`.

The `toy_adapter` fixture (conftest) runs `vlm-train --recipe toy` once per session, building whatever of the
miniature world is not cached; these tests read what that run wrote and use its adapter from the CLI.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from projector_training.data import load_records


def test_toy_recipe_aligns_the_projector(toy_adapter: Path) -> None:
    report = json.loads((toy_adapter / "eval.json").read_text())
    print(f"toy eval: {json.dumps(report)}")
    assert report["n"] >= 200 and report["n_vqa"] >= 200
    assert report["exact_match_before"] <= 0.10
    assert report["exact_match"] >= 0.90
    assert report["vqa_accuracy"] >= 0.90
    summary = json.loads((toy_adapter / "summary.json").read_text())
    assert summary["skipped"] == 0 and summary["nonfinite_steps"] == 0
    assert summary["final_loss"] < 0.2


def test_vlm_caption_prints_held_out_captions(toy_adapter: Path, toy_world) -> None:
    records = load_records(toy_world.eval_captions_json)[:20]
    images = [str(toy_world.root / r["image"]) for r in records]
    script = Path(sys.executable).with_name("vlm")
    command = [str(script)] if script.is_file() else [sys.executable, "-m", "vlm"]
    done = subprocess.run(
        [*command, "caption", "--model", str(toy_adapter), "--json", *images], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    printed = {line["image"]: line["caption"] for line in map(json.loads, done.stdout.splitlines())}
    right = sum(printed[image] == r["conversations"][1]["value"] for image, r in zip(images, records, strict=True))
    print(f"vlm caption: {right}/{len(records)} held-out captions exactly right")
    assert right >= 18
