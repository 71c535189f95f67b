"""The benchmarks' own scoring rules, as pure functions over answers and gold labels.

Each rule follows the script the benchmark's numbers are reported with, quirks included, so a score here is the
score LLaVA-1.5's table would give:

- POPE (LLaVA's `eval_pope.py`): the first sentence of an answer, commas dropped, is "no" if one of its
  space-separated words is `No`, `no` or `not`, else "yes"; accuracy, precision, recall, F1 (yes is the positive
  class) and the share of yes answers.
- MME (its `calculation.py`): a lower-cased answer is "yes"/"no" as it is, else by which of the two its first four
  characters hold, else "other" (always wrong); per subtask accuracy and accuracy+ (both questions about an image
  right), a subtask's score is 100 x (accuracy + accuracy+), perception and cognition totals are sums of scores.
- Exact match (GQA as LLaVA submits it, `convert_gqa_for_eval.py`): trailing full stops stripped, lower case.
- VQA accuracy (VQAv2 / TextVQA / VizWiz, the EvalAI answer processor): answers and the ten human answers are
  normalised (lower case, punctuation, number words to digits, articles dropped, contractions restored) and an
  answer scores min(#humans that gave it / 3, 1) averaged over the ten leave-one-out subsets of nine humans.
- Multiple choice (ScienceQA as LLaVA's `eval_science_qa.py` reads answers, MMBench and SEED alike): the option
  letter is the answer if it is a bare letter, or the answer starts with "X. ", or holds "The answer is X".
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

__all__ = [
    "MME_COGNITION",
    "MME_PERCEPTION",
    "choice_letter",
    "choice_scores",
    "exact_match",
    "exact_normalize",
    "mme_label",
    "mme_scores",
    "pope_label",
    "pope_scores",
    "vqa_accuracy",
    "vqa_normalize",
]


# ----------------------------------------------------------------------------------------------------------------
# POPE


def pope_label(answer: str) -> str:
    """ "yes" or "no" for a free answer, by POPE's rule as LLaVA applies it: only the first sentence counts
    ("No. Yes." is no), commas are dropped, and it is "no" when a space-separated word is exactly `No`, `no` or
    `not` ("No," and "not," count; "NO", "No!" and "Nope" do not), otherwise "yes" (an empty answer is yes)."""
    first = answer.split(".", 1)[0].replace(",", "")
    return "no" if {"No", "no", "not"} & set(first.split(" ")) else "yes"


def _ratio(num: int | float, den: int | float) -> float:
    return num / den if den else 0.0


def pope_scores(answers: Sequence[str | None], labels: Sequence[str]) -> dict[str, float]:
    """POPE's metrics for answers (None: an answer that could not be made, counted wrong and left out of the
    precision, recall and yes ratio) against "yes"/"no" labels. A zero denominator gives 0.0."""
    if len(answers) != len(labels):
        raise ValueError(f"{len(answers)} answers but {len(labels)} labels")
    tp = fp = tn = fn = 0
    for answer, label in zip(answers, labels, strict=True):
        if answer is None:
            continue
        yes, positive = pope_label(answer) == "yes", label.strip().lower() == "yes"
        tp += yes and positive
        fp += yes and not positive
        tn += not yes and not positive
        fn += not yes and positive
    precision, recall = _ratio(tp, tp + fp), _ratio(tp, tp + fn)
    return {
        "accuracy": _ratio(tp + tn, len(labels)),
        "precision": precision,
        "recall": recall,
        "f1": _ratio(2 * precision * recall, precision + recall),
        "yes_ratio": _ratio(tp + fp, tp + fp + tn + fn),
        "n": len(labels),
    }


# ----------------------------------------------------------------------------------------------------------------
# MME

MME_PERCEPTION: tuple[str, ...] = (
    "existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork", "OCR",
)  # fmt: skip
MME_COGNITION: tuple[str, ...] = (
    "commonsense_reasoning",
    "numerical_calculation",
    "text_translation",
    "code_reasoning",
)


def mme_label(answer: str) -> str:
    """ "yes", "no" or "other", by MME's rule: the lower-cased answer as it is if it is yes or no, else whichever of
    the two its first four characters contain (yes first), else other."""
    text = answer.lower()
    if text in ("yes", "no"):
        return text
    head = text[:4]
    return "yes" if "yes" in head else "no" if "no" in head else "other"


@dataclass(frozen=True)
class MMEItem:
    """One MME question: its subtask, the image its pair shares, the answer (None: none could be made) and label."""

    category: str
    image: str
    answer: str | None
    label: str


def mme_scores(items: Iterable[MMEItem]) -> dict[str, object]:
    """Per subtask: accuracy, accuracy+ and score (100 x their sum); the perception and cognition totals (sums of
    the scores of MME's subtasks of each kind present) and the total over every subtask."""
    by_task: dict[str, dict[str, list[bool]]] = {}
    for item in items:
        right = item.answer is not None and mme_label(item.answer) == item.label.strip().lower()
        by_task.setdefault(item.category, {}).setdefault(item.image, []).append(right)
    tasks = {}
    for name, images in sorted(by_task.items()):
        marks = [right for pair in images.values() for right in pair]
        accuracy, plus = _ratio(sum(marks), len(marks)), _ratio(sum(all(p) for p in images.values()), len(images))
        tasks[name] = {"accuracy": accuracy, "accuracy_plus": plus, "score": 100 * (accuracy + plus), "n": len(marks)}
    return {
        "subtasks": tasks,
        "perception": sum(t["score"] for name, t in tasks.items() if name in MME_PERCEPTION),
        "cognition": sum(t["score"] for name, t in tasks.items() if name in MME_COGNITION),
        "total": sum(t["score"] for t in tasks.values()),
    }


# ----------------------------------------------------------------------------------------------------------------
# Exact match (GQA)


def exact_normalize(text: str) -> str:
    """LLaVA's GQA answer normalisation: trailing full stops stripped, then lower case."""
    return text.rstrip(".").lower()


def exact_match(answer: str, gold: str) -> bool:
    return exact_normalize(answer) == exact_normalize(gold)


# ----------------------------------------------------------------------------------------------------------------
# VQA accuracy (VQAv2, TextVQA, VizWiz)

_NUMBERS = "zero one two three four five six seven eight nine ten"
_NUMBER_WORDS = {word: str(value) for value, word in enumerate(_NUMBERS.split())}
_NUMBER_WORDS["none"] = "0"
_ARTICLES = frozenset({"a", "an", "the"})
_PUNCTUATION = ';/[]"{}()=+\\_-><@`,?!'
_FULL_STOP = re.compile(r"(?!<=\d)(\.)(?!\d)")
"""A full stop not followed by a digit. `(?!<=\\d)` is the official regex's typo for a look-behind (it looks ahead
for the text "<=" and a digit, which never follows a full stop that this removes): kept, to give its results."""
_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")
_CONTRACTED_WORDS = (
    "ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't haven't he'd "
    "he'd've he's how'd how'll how's I'd've I'm I've isn't it'd it'd've it'll ma'am mightn't mightn't've "
    "might've mustn't must've needn't not've o'clock oughtn't 'ow's'at shan't she'd've should've shouldn't "
    "shouldn't've somebody'd've somebody'll somebody's someone'd someone'd've someone'll someone's something'd "
    "something'd've something'll that's there'd there'd've there're there's they'd they'd've they'll they're "
    "they've 'twas wasn't we'd've weren't we've what'll what're what's what've when's where'd where's where've "
    "who'd who'd've who'll who's who've why'll why're why's won't would've wouldn't wouldn't've y'all y'all'll "
    "y'all'd've you'd you'd've you'll you're you've "
)
_CONTRACTED = _CONTRACTED_WORDS.split()
_CONTRACTIONS = {word[:i] + word[i + 1 :]: word for word in _CONTRACTED for i, c in enumerate(word) if c == "'"}
"""A contraction typed with one apostrophe missing -> the contraction ("dont" -> "don't", "couldnt've" ->
"couldn't've"), as the EvalAI table has it; that table also turns "somebody'd" into "somebodyd"."""
_CONTRACTIONS["somebody'd"] = "somebodyd"


def _strip_punctuation(text: str) -> str:
    """Each punctuation mark is deleted where the text has it next to a space (or has a digit-comma-digit), else
    replaced by a space; then full stops not before a digit go (at most 32 of them: the official code passes
    `re.UNICODE` as the count)."""
    glued = _DIGIT_COMMA_DIGIT.search(text) is not None
    out = text
    for mark in _PUNCTUATION:
        out = out.replace(mark, "" if glued or f"{mark} " in text or f" {mark}" in text else " ")
    return _FULL_STOP.sub("", out, count=re.UNICODE)


def vqa_normalize(text: str) -> str:
    """The EvalAI answer processor (VQAv2, TextVQA and VizWiz servers, LLaVA's m4c evaluator, lmms-eval)."""
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = _strip_punctuation(text.replace("\n", " ").replace("\t", " ").strip())
    words = [_NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def vqa_accuracy(answer: str, references: Sequence[str]) -> float:
    """min(#references equal to the answer / 3, 1) averaged over the leave-one-out subsets of the references,
    after normalising all of them: 1.0 with 4 or more matching of 10, 0.9 with 3, 0.6 with 2, 0.3 with 1."""
    if not references:
        raise ValueError("VQA accuracy needs reference answers")
    mine = vqa_normalize(answer)
    matches = sum(vqa_normalize(r) == mine for r in references)
    # Leaving out a matching reference leaves matches - 1; leaving out another leaves all of them.
    left_out = [matches - 1] * matches + [matches] * (len(references) - matches)
    return sum(min(1.0, m / 3) for m in left_out) / len(references)


# ----------------------------------------------------------------------------------------------------------------
# Multiple choice (ScienceQA, MMBench, SEED)

LETTERS = "ABCDE"
_LETTER_DOT = re.compile(r"^([A-E])\. ")
_THE_ANSWER_IS = re.compile(r"The answer is ([A-E])")


def choice_letter(answer: str, options: int = len(LETTERS)) -> str | None:
    """The option letter an answer picks (None if none): a bare letter, "X. ...", or "... The answer is X";
    only letters of the first `options` options count."""
    text = answer.replace("\n", ". ")
    match = _LETTER_DOT.match(text) or _THE_ANSWER_IS.search(text)
    bare = text.strip()
    letter = bare if len(bare) == 1 and bare in LETTERS else match.group(1) if match else None
    return letter if letter is not None and letter in LETTERS[:options] else None


def choice_scores(answers: Sequence[str | None], golds: Sequence[str], options: Sequence[int] | None = None) -> float:
    """The share of answers whose option letter is the gold letter (None answers are wrong)."""
    options = options or [len(LETTERS)] * len(golds)
    right = [
        a is not None and choice_letter(a, n) == g.strip().upper()
        for a, g, n in zip(answers, golds, options, strict=True)
    ]
    return _ratio(sum(right), len(right))
