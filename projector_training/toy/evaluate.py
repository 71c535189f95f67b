"""Held-out evaluation of a miniature-world adapter: caption exact match, VQA accuracy, per attribute.

Per-attribute scores point at the cause of a failure (a colour the tower cannot see, a size the
projector confuses) where a single exact-match number cannot.
"""

from __future__ import annotations

from typing import Any

from projector_training.toy.world import ATTRIBUTES, load_records, parse_caption, question_attribute

__all__ = ["evaluate", "normalise"]


def normalise(text: str) -> str:
    return " ".join(text.strip().lower().rstrip(".").split())


def _pairs(records: list[dict[str, Any]], root: Any) -> tuple[list[Any], list[str], list[str]]:
    images, questions, answers = [], [], []
    for record in records:
        human, gpt = record["conversations"][0]["value"], record["conversations"][1]["value"]
        images.append(root / record["image"])
        questions.append(human.replace("<image>", "").strip())
        answers.append(gpt)
    return images, questions, answers


def evaluate(model: Any, world: Any, batch_size: int = 48, limit: int | None = None) -> dict[str, Any]:
    """Greedy answers on the held-out caption and question records of `world` (a ToyWorld)."""
    captions = load_records(world.eval_captions_json)[:limit]
    questions = load_records(world.eval_vqa_json)[:limit]

    images, prompts, gold = _pairs(captions, world.world_dir)
    predicted = model.ask_batch(images, prompts, batch_size=batch_size, max_new_tokens=12)
    exact = [normalise(p) == normalise(g) for p, g in zip(predicted, gold, strict=True)]
    per_attribute = {name: 0 for name in ATTRIBUTES}
    for p, g in zip(predicted, gold, strict=True):
        truth, guess = parse_caption(g), parse_caption(p)
        for name in ATTRIBUTES:
            per_attribute[name] += guess[name] == truth[name]

    q_images, q_prompts, q_gold = _pairs(questions, world.world_dir)
    answers = model.ask_batch(q_images, q_prompts, batch_size=batch_size, max_new_tokens=6)
    correct = [normalise(a) == normalise(g) for a, g in zip(answers, q_gold, strict=True)]
    vqa_by_attribute: dict[str, list[bool]] = {name: [] for name in ATTRIBUTES}
    for prompt, ok in zip(q_prompts, correct, strict=True):
        vqa_by_attribute[question_attribute(prompt)].append(ok)

    return {
        "exact_match": round(sum(exact) / max(1, len(exact)), 4),
        "vqa_accuracy": round(sum(correct) / max(1, len(correct)), 4),
        "n": len(exact),
        "n_vqa": len(correct),
        "per_attribute": {
            "caption": {k: round(v / max(1, len(exact)), 4) for k, v in per_attribute.items()},
            "vqa": {k: round(sum(v) / max(1, len(v)), 4) for k, v in vqa_by_attribute.items()},
        },
        "examples": [{"gold": g, "predicted": p} for g, p in list(zip(gold, predicted, strict=True))[:5]],
    }
