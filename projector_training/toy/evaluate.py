"""Held-out evaluation of a miniature-world adapter: every question kind, per attribute and per turn.

Sets (see `WorldFiles`): captions (exact match), open questions, POPE-style yes/no questions on three kinds of
negatives, multiple choice (the option's letter) and three-question conversations, whose later questions are
asked after the earlier ones with their right answers (so each turn is scored on its own). Per-attribute and
per-turn scores point at the cause of a failure (a colour the tower cannot see, a second turn the LM ignores)
where a single number cannot. Answers are greedy.
"""

from __future__ import annotations

import platform
import subprocess
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from projector_training.data import load_records, record_to_messages
from projector_training.toy.world import ATTRIBUTES, NEGATIVE_SAMPLING, WorldFiles, parse_caption

__all__ = ["evaluate", "headline", "normalise", "pope_answer", "pope_scores", "provenance", "same_answers"]

MAX_NEW_TOKENS = 12


def normalise(text: str) -> str:
    return " ".join(text.strip().lower().rstrip(".").split())


def pope_answer(text: str) -> str:
    """ "yes" or "no", read from a free answer with POPE's own rule: the first sentence, commas dropped, is "no" if
    it holds the word "no", "No" or "not", else "yes"."""
    words = text.split(".")[0].replace(",", "").split(" ")
    return "no" if any(w in ("No", "not", "no") for w in words) else "yes"


def pope_scores(predicted: Sequence[str], gold: Sequence[str]) -> dict[str, float]:
    """POPE's metrics with "yes" as the positive class: accuracy, precision, recall, F1 and the share of yes."""
    pairs = [(pope_answer(p), normalise(g)) for p, g in zip(predicted, gold, strict=True)]
    tp = sum(p == g == "yes" for p, g in pairs)
    fp = sum(p == "yes" != g for p, g in pairs)
    fn = sum(p == "no" != g for p, g in pairs)
    precision = tp / max(1, tp + fp)
    recall = tp / max(1, tp + fn)
    return {
        "accuracy": _mean([p == g for p, g in pairs]),
        "precision": round(precision, 4),
        "recall": round(recall, 4),
        "f1": round(2 * precision * recall / max(1e-12, precision + recall), 4),
        "yes_ratio": _mean([p == "yes" for p, _ in pairs]),
    }


def _mean(values: Sequence[bool | float]) -> float:
    return round(sum(values) / max(1, len(values)), 4)


def _asked(records: list[dict[str, Any]], root: Path) -> list[tuple[list[dict[str, Any]], str, dict[str, Any]]]:
    """Every turn of every record as (messages up to its question, the right answer, what it asks); a later
    turn's messages hold the earlier questions with their right answers."""
    out = []
    for record in records:
        messages = record_to_messages(record, root)
        for k, meta in enumerate(record["turns"]):
            meta = {**meta, "turn": k + 1, "category": record.get("category")}
            out.append((messages[: 2 * k + 1], messages[2 * k + 1]["content"][0]["text"], meta))
    return out


def _by(rows: list[tuple[dict[str, Any], bool]], key: str) -> dict[str, float]:
    groups: dict[str, list[bool]] = {}
    for meta, ok in rows:
        groups.setdefault(str(meta[key]), []).append(ok)
    return {name: _mean(hits) for name, hits in sorted(groups.items())}


def evaluate(
    model: Any, world_dir: str | Path, batch_size: int = 48, limit: int | None = None, keep_answers: bool = False
) -> dict[str, Any]:
    """Greedy answers to every held-out set of the world in `world_dir`; `limit` caps the records per set.
    `keep_answers` adds every answer, per set in order (`answers`), to compare two models with `same_answers`."""
    files = WorldFiles.at(Path(world_dir))
    asked = {name: _asked(load_records(path)[:limit], files.root) for name, path in files.eval_sets.items()}
    flat = [item for items in asked.values() for item in items]
    answers = iter(model.chat_batch([m for m, _, _ in flat], batch_size=batch_size, max_new_tokens=MAX_NEW_TOKENS))
    results = {name: [(meta, next(answers), gold) for _, gold, meta in items] for name, items in asked.items()}

    report: dict[str, Any] = {"n": {name: len(items) for name, items in results.items()}}
    captions = results["captions"]
    report["caption_exact_match"] = _mean([normalise(p) == normalise(g) for _, p, g in captions])
    report["caption_attributes"] = {
        a: _mean([parse_caption(p)[a] == parse_caption(g)[a] for _, p, g in captions]) for a in ATTRIBUTES
    }
    scored = {
        name: [(meta, normalise(p) == normalise(g)) for meta, p, g in results[name]]
        for name in ("vqa", "choice", "conversations")
    }
    for name, rows in scored.items():
        report[f"{name}_accuracy"] = _mean([ok for _, ok in rows])
        report[f"{name}_attributes"] = _by(rows, "attribute")
    report["conversation_turns"] = _by(scored["conversations"], "turn")
    report["conversation_kinds"] = _by(scored["conversations"], "kind")
    yesno = results["yesno"]
    report["pope"] = {}
    for sampling in NEGATIVE_SAMPLING:
        split = [(m, p, g) for m, p, g in yesno if m["category"] == sampling]
        report["pope"][sampling] = pope_scores([p for _, p, _ in split], [g for _, _, g in split])
    report["pope_attributes"] = _by([(m, pope_answer(p) == normalise(g)) for m, p, g in yesno], "attribute")
    report["examples"] = [{"gold": g, "predicted": p} for _, p, g in captions[:5]]
    if keep_answers:
        report["answers"] = {name: [p for _, p, _ in rows] for name, rows in results.items()}
    return report


def same_answers(answers: dict[str, list[str]], reference: dict[str, list[str]]) -> dict[str, float]:
    """The share of held-out answers (`evaluate(..., keep_answers=True)["answers"]`) written exactly as in
    `reference`, per set and over all (`all`)."""
    if answers.keys() != reference.keys() or any(len(answers[k]) != len(reference[k]) for k in answers):
        raise ValueError("the two sets of answers are not to the same questions")
    same = {name: [a == r for a, r in zip(answers[name], reference[name], strict=True)] for name in answers}
    return {**{name: _mean(hits) for name, hits in same.items()}, "all": _mean([h for v in same.values() for h in v])}


def headline(report: dict[str, Any]) -> dict[str, float]:
    """The numbers the toy's targets are stated in, flat."""
    return {
        "caption_exact_match": report["caption_exact_match"],
        "vqa_accuracy": report["vqa_accuracy"],
        **{f"pope_{k}_accuracy": v["accuracy"] for k, v in report["pope"].items()},
        "choice_accuracy": report["choice_accuracy"],
        **{f"conversation_turn{k}_accuracy": v for k, v in report["conversation_turns"].items()},
    }


PACKAGES = ("torch", "transformers", "open_clip_torch", "tokenizers", "pillow", "numpy", "accelerate", "safetensors")
"""The packages whose versions can move the toy's scores (kernels, initialisation, rendering, tokenizing)."""


def provenance() -> dict[str, Any]:
    """What a result was made with: package versions, Python, the CPU kernels torch picked, the commit."""
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    repo = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(
            ["git", "-C", str(repo), "describe", "--always", "--dirty", "--abbrev=12"],
            capture_output=True, text=True, check=True, timeout=10,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        commit = None  # not a git checkout (an installed wheel)
    return {
        "versions": {"python": platform.python_version(), **versions},
        "cpu": {"machine": platform.machine(), "torch_kernels": torch.backends.cpu.get_cpu_capability()},
        "commit": commit,
    }
