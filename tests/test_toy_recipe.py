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

# The targets, each a margin below the lowest score measured over seeds (docs/miniature-world.md, "The spread"): a
# pass says alignment worked on this machine, not that it reproduced one run's digits.
TARGETS = {
    "caption_exact_match": 0.93,
    "vqa_accuracy": 0.95,
    "conversation_turn2_accuracy": 0.93,
    "conversation_turn3_accuracy": 0.93,
    "pope_random_accuracy": 0.92,
    "pope_popular_accuracy": 0.92,
    "pope_adversarial_accuracy": 0.92,
    "choice_accuracy": 0.92,
}
BEFORE_AT_MOST = {
    "caption_exact_match": 0.10,
    "vqa_accuracy": 0.45,
    "pope_random_accuracy": 0.60,
    "pope_popular_accuracy": 0.60,
    "pope_adversarial_accuracy": 0.60,
    "choice_accuracy": 0.45,
}
"""Before alignment the LM sees noise in the image slots: captions are never right, answers about chance (yes/no
0.5; multiple choice among 2-4 options)."""
DRAFT_TARGETS = {
    "caption_exact_match": 0.90,
    "vqa_accuracy": 0.92,
    "conversation_turn2_accuracy": 0.90,
    "conversation_turn3_accuracy": 0.90,
}
"""The draft LM reads yes/no and multiple choice less well than the LM (0.78 and 0.88 of text prompts), so its
adapter is held to captions and open questions; speculative decoding gives the target's answers whatever it drafts."""


def test_toy_recipe_aligns_the_projector(toy_adapter: Path) -> None:
    report = json.loads((toy_adapter / "eval.json").read_text())
    print(f"toy eval: {json.dumps({k: v for k, v in report.items() if k != 'details'})}")
    assert report["details"]["n"]["captions"] >= 200 and report["details"]["n"]["vqa"] >= 200
    for name, target in TARGETS.items():
        assert report[name] >= target, (name, report[name])
    for name, most in BEFORE_AT_MOST.items():
        assert report["before"][name] <= most, (name, report["before"][name])
    assert report["seed"] == 0 and report["versions"]["torch"] and report["cpu"]["torch_kernels"]
    summary = json.loads((toy_adapter / "summary.json").read_text())
    assert summary["skipped"] == 0 and summary["nonfinite_steps"] == 0
    assert summary["final_loss"] < 0.2


def test_toy_recipe_aligns_the_draft_too(toy_adapter: Path) -> None:
    """The draft LM (half the LM's layers, distilled from it) proposes the LM's greedy tokens, and its own adapter,
    started from the target's projector, answers captions and open questions well and as the target does."""
    report = json.loads((toy_adapter / "eval.json").read_text())
    draft = report["draft"]
    print(f"toy draft: {json.dumps(draft)}")
    for name, target in DRAFT_TARGETS.items():
        assert draft[name] >= target, (name, draft[name])
    assert draft["init_projector"] == str(toy_adapter)  # the draft's projector started from the target's
    assert draft["lm_agreement"]["token_agreement"] >= 0.88 and draft["lm_context_accuracy"] >= 0.80
    assert draft["lm_size"]["layer_cost_vs_teacher"] <= 0.5
    assert draft["answers_equal_target"]["captions"] >= 0.9 and draft["answers_equal_target"]["vqa"] >= 0.9
    # speculative decoding with the pair: exactly the target's answers, over 1.3 tokens per decoding forward of the
    # target (1.42 measured: most held-out answers are one word and `<|im_end|>`, which leaves one forward per answer)
    spec = draft["speculative"]
    assert set(spec["answers_identical_to_target"].values()) == {1.0}
    assert spec["acceptance_rate"] >= 0.9 and spec["tokens_per_target_forward"] >= 1.3, spec
    draft_dir = Path(draft["dir"])
    assert draft_dir == toy_adapter.with_name(f"{toy_adapter.name}-draft")
    assert json.loads((draft_dir / "eval.json").read_text())["caption_exact_match"] == draft["caption_exact_match"]
    assert json.loads((draft_dir / "summary.json").read_text())["final_loss"] < 0.2


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


def test_the_toy_model_writes_around_a_blocked_word(toy_adapter: Path, toy_world) -> None:
    """Blocked at sampling time, the colour is replaced by another word the model chooses, not by the text filter's
    marker: the ban steers generation (the filter is the net behind it). Without the ban the filter would show
    "[filtered]" where the colour was. The tiny LM often glues the colour onto the word before ("a smallred": 13 of
    24 held-out captions, seed 0), which the whole-word rule lets through, as it lets "class" through for "ass"; the
    others name another colour (6 of the first 12)."""
    import vlm
    from projector_training.toy.world import COLOURS
    from vlm.generation import FILTERED

    model = vlm.load(toy_adapter, device="cpu")
    records = load_records(toy_world.eval_captions_json)[:12]
    images = [str(toy_world.root / r["image"]) for r in records]
    right = [  # the held-out images the adapter captions right (the recipe's test allows a few wrong)
        (image, caption)
        for image, record, caption in zip(images, records, model.caption_batch(images), strict=True)
        if caption == record["conversations"][1]["value"]
    ]
    assert len(right) >= 10
    recoloured = 0
    for image, caption in right:
        colour = next(w for w in caption.split() if w in COLOURS)  # every toy caption names its colour
        banned = model.caption(image, blocked_words=[colour])
        print(f"{caption!r} with {colour!r} blocked -> {banned!r}")
        assert colour not in banned.split() and FILTERED not in banned and banned.strip()
        recoloured += any(w in COLOURS for w in banned.split())
    assert recoloured >= len(right) // 3
