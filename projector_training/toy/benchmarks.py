"""The miniature world's held-out sets as LLaVA-1.5 evaluation files, and lmms-eval tasks that read them.

`write_benchmarks(world_dir, out_dir)` writes LLaVA question files (JSONL; images relative to the world
directory, the `--image-folder`) that also carry their gold labels, so each is its own annotation file for
`vlm eval score`:

- `toy_pope.jsonl`: the yes/no questions, `category` random / popular / adversarial (POPE's three splits, the No
  questions' values drawn as POPE draws absent objects), `answer` yes or no;
- `toy_mme.jsonl`: per image an MME pair, the adversarial split's Yes and No question about one attribute,
  `category` the attribute (the subtask), `answer` yes or no;
- `toy_choice.jsonl`: the multiple-choice questions (options and LLaVA's "Answer with the option's letter"
  instruction in the text), `answer` the letter, `options` their count;
- `toy_vqa.jsonl`: the open questions with ten reference `answers` written as people write them (capitals,
  full stops, articles, a wordier or a wrong answer), so the VQA normalisation matters.

`lmms_tasks/` beside them holds lmms-eval task definitions (`toy_pope_random`, ..., `toy_mme`, `toy_choice`,
`toy_vqa`) that read the same files from disk and score with `vlm.evaluation` (projector_training.toy.lmms_tasks):
`lmms-eval --model causallm_vlm --model_args pretrained=runs/toy --include_path OUT/lmms_tasks --tasks toy_vqa`.

    python -m projector_training.toy.benchmarks --adapter runs/toy      # next to the adapter's world
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from projector_training.toy.world import ATTRIBUTES, NEGATIVE_SAMPLING, WorldFiles, load_records

__all__ = ["TASKS", "vqa_references", "world_of_adapter", "write_benchmarks"]

TASKS: dict[str, tuple[str, str]] = {
    **{f"toy_pope_{split}": ("toy_pope.jsonl", "pope") for split in NEGATIVE_SAMPLING},
    "toy_mme": ("toy_mme.jsonl", "mme"),
    "toy_choice": ("toy_choice.jsonl", "choice"),
    "toy_vqa": ("toy_vqa.jsonl", "vqa"),
}
"""lmms-eval task name -> (question file, metric kind)."""


def _question(record: dict[str, Any]) -> tuple[str, str]:
    """A held-out record's (question text without the image tag, gold answer)."""
    human, gpt = record["conversations"][0]["value"], record["conversations"][1]["value"]
    return human.removeprefix("<image>").strip(), gpt


def _base(record: dict[str, Any], **gold: Any) -> dict[str, Any]:
    text, _ = _question(record)
    return {"question_id": record["id"], "image": record["image"], "text": text, **gold}


def vqa_references(answer: str, attribute: str) -> list[str]:
    """Ten human-like answers: eight that normalise to `answer`, one wordier, one another value of the attribute."""
    other = next(v for v in ATTRIBUTES[attribute] if v != answer)
    same = [answer] * 4 + [answer.capitalize(), f"{answer}.", f"The {answer}", f"{answer}!"]
    return [*same, f"a {answer} one", other]


def _pope(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [_base(r, category=r["category"], answer=_question(r)[1].lower()) for r in records]


def _mme(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    pairs = [r for r in records if r["category"] == "adversarial"]
    return [_base(r, category=r["turns"][0]["attribute"], answer=_question(r)[1].lower()) for r in pairs]


def _choice(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for record in records:
        text, letter = _question(record)
        options = sum(1 for line in text.splitlines() if line[:3] in ("A. ", "B. ", "C. ", "D. ", "E. "))
        out.append(_base(record, category=record["turns"][0]["attribute"], answer=letter, options=options))
    return out


def _vqa(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for record in records:
        attribute, answer = record["turns"][0]["attribute"], _question(record)[1]
        out.append(_base(record, category=attribute, answer=answer, answers=vqa_references(answer, attribute)))
    return out


def _write_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


TASK_YAML = """\
task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: answer
{filter}generation_kwargs:
  max_new_tokens: 128
  temperature: 0
  do_sample: false
process_results: !function utils.{kind}_results
metric_list:
{metrics}metadata:
  version: 0.0
"""


def _task_yaml(task: str, data: Path, kind: str, category: str | None) -> str:
    from projector_training.toy.lmms_tasks import METRICS

    metrics = "".join(
        f"  - metric: {kind}_{name}\n    aggregation: !function utils.{kind}_{name}\n    higher_is_better: true\n"
        for name in METRICS[kind]
    )
    only = f"process_docs: !function utils.only_{category}\n" if category else ""
    return TASK_YAML.format(task=task, data=data, kind=kind, filter=only, metrics=metrics)


def write_lmms_tasks(out_dir: Path, world_dir: Path) -> Path:
    """lmms-eval task YAMLs (one per task in TASKS) and their utils.py in `out_dir / "lmms_tasks"`."""
    tasks = out_dir / "lmms_tasks"
    tasks.mkdir(parents=True, exist_ok=True)
    (tasks / "utils.py").write_text(
        '"""lmms-eval functions of the miniature world\'s tasks (written by projector_training.toy.benchmarks)."""\n\n'
        "from projector_training.toy.lmms_tasks import *  # noqa: F403\n"
        "from projector_training.toy.lmms_tasks import image_loader\n\n"
        f"doc_to_visual = image_loader({str(world_dir.resolve())!r})\n"
    )
    for task, (name, kind) in TASKS.items():
        category = task.removeprefix("toy_pope_") if kind == "pope" else None
        (tasks / f"{task}.yaml").write_text(_task_yaml(task, (out_dir / name).resolve(), kind, category))
    return tasks


def write_benchmarks(world_dir: str | Path, out_dir: str | Path | None = None) -> Path:
    """Write the question files and lmms-eval tasks of the world in `world_dir` into `out_dir` (default:
    `world_dir / "llava-eval"`) -> `out_dir`. Images stay where they are: `--image-folder world_dir`."""
    files = WorldFiles.at(Path(world_dir))
    out = Path(out_dir) if out_dir is not None else files.root / "llava-eval"
    out.mkdir(parents=True, exist_ok=True)
    yesno = load_records(files.eval_yesno_json)
    _write_jsonl(out / "toy_pope.jsonl", _pope(yesno))
    _write_jsonl(out / "toy_mme.jsonl", _mme(yesno))
    _write_jsonl(out / "toy_choice.jsonl", _choice(load_records(files.eval_choice_json)))
    _write_jsonl(out / "toy_vqa.jsonl", _vqa(load_records(files.eval_vqa_json)))
    write_lmms_tasks(out, files.root)
    return out


def world_of_adapter(adapter: str | Path) -> Path:
    """The world a toy adapter was trained on (beside its tiny CLIP)."""
    from vlm.adapter import read_config

    tower = read_config(Path(adapter)).vision_tower.removeprefix("local-dir:")
    return Path(tower).parent / "world"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--world", help="the world directory (with eval_*.json and images/)")
    where.add_argument("--adapter", help="a toy adapter: its world is used")
    parser.add_argument("--out", default=None, help="output directory (default: WORLD/llava-eval)")
    args = parser.parse_args(argv)
    world = Path(args.world) if args.world else world_of_adapter(args.adapter)
    out = write_benchmarks(world, args.out)
    print(json.dumps({"questions": str(out), "image_folder": str(world), "lmms_tasks": str(out / "lmms_tasks")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
