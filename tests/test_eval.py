"""Evaluation: the benchmarks' scoring rules against hand-computed values, LLaVA's answer files written resumably
and in several processes, the miniature world's benchmark files, and the lmms-eval plugin."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from vlm.errors import VLMError
from vlm.evaluation import scorers
from vlm.evaluation.answer import answer_file
from vlm.evaluation.files import chunk, read_answers, read_questions
from vlm.evaluation.scoring import score_answers, score_files

# ------------------------------------------------------------------------------------------------------------------
# The scoring rules, by hand


@pytest.mark.parametrize(
    ("answer", "label"),
    [
        ("Yes", "yes"),
        ("No", "no"),
        ("no.", "no"),
        ("No, there is not.", "no"),
        ("There is no cat in the image.", "no"),
        ("I am not sure", "no"),
        ("Yes, there is a dog, not a cat.", "no"),  # "not" in the first sentence
        ("Yes. There is no cat.", "yes"),  # only the first sentence counts
        ("No! It is a dog", "yes"),  # "No!" is not the word "No"
        ("NO", "yes"),  # only No, no and not
        ("Nope", "yes"),
        ("", "yes"),
    ],
)
def test_pope_reads_free_answers_as_llavas_eval_pope_does(answer, label):
    assert scorers.pope_label(answer) == label


def test_pope_scores_by_hand():
    answers = ["Yes", "yes, it is", "No", "Yes", "No.", "There is no dog.", None]
    labels = ["yes", "yes", "yes", "no", "no", "no", "yes"]
    # TP 2 (first two), FN 1 (third), FP 1 (fourth), TN 2, one error (counted wrong, not in the confusion matrix).
    got = scorers.pope_scores(answers, labels)
    assert got == {
        "accuracy": 4 / 7,
        "precision": 2 / 3,
        "recall": 2 / 3,
        "f1": pytest.approx(2 / 3),
        "yes_ratio": 3 / 6,
        "n": 7,
    }


@pytest.mark.parametrize(
    ("answer", "label"),
    [("yes", "yes"), ("No", "no"), ("Yes, it is.", "yes"), ("no way", "no"), ("There is", "other"), (" yes", "yes")],
)
def test_mme_reads_answers_as_its_calculation_py(answer, label):
    assert scorers.mme_label(answer) == label


def test_mme_scores_by_hand():
    item = scorers.MMEItem
    items = [
        item("color", "1.jpg", "Yes", "yes"), item("color", "1.jpg", "No", "no"),  # pair right
        item("color", "2.jpg", "Yes", "yes"), item("color", "2.jpg", "Yes", "no"),  # one of two
        item("code_reasoning", "3.png", "Maybe", "yes"), item("code_reasoning", "3.png", "no", "no"),  # other: wrong
        item("shape", "4.png", None, "yes"), item("shape", "4.png", "no", "no"),  # an error: wrong
    ]  # fmt: skip
    got = scorers.mme_scores(items)
    assert got["subtasks"]["color"] == {"accuracy": 0.75, "accuracy_plus": 0.5, "score": 125.0, "n": 4}
    assert got["subtasks"]["code_reasoning"] == {"accuracy": 0.5, "accuracy_plus": 0.0, "score": 50.0, "n": 2}
    assert got["perception"] == 125.0 and got["cognition"] == 50.0 and got["total"] == 225.0


@pytest.mark.parametrize(
    ("answer", "gold", "right"),
    [("Red.", "red", True), ("red...", "red", True), ("RED", "red", True), ("red car", "red", False),
     (" red", "red", False)],
)  # fmt: skip
def test_exact_match_normalises_as_llava_submits_gqa(answer, gold, right):
    assert scorers.exact_match(answer, gold) is right


@pytest.mark.parametrize(
    ("raw", "normal"),
    [
        ("Two", "2"),  # number words
        ("none", "0"),
        ("ten dogs", "10 dogs"),
        ("The dog", "dog"),  # articles
        ("a cat.", "cat"),  # article and full stop
        ("an apple", "apple"),
        ("dont", "don't"),  # contractions
        ("isnt it", "isn't it"),
        ("couldnt've", "couldn't've"),
        ("somebody'd", "somebodyd"),  # the EvalAI table's quirk, kept
        ("Yes!", "yes"),  # punctuation
        ("x-ray", "x ray"),  # a mark between letters becomes a space
        ("left - right", "left right"),  # a mark next to a space goes
        ("3.5", "3.5"),  # a full stop before a digit stays
        ("1,000", "1000"),
        ("what?", "what"),
        ("the man's hat", "man 's hat"),
        ("Hello\tworld\n", "hello world"),
    ],
)
def test_vqa_normalisation_documented_cases(raw, normal):
    assert scorers.vqa_normalize(raw) == normal


@pytest.mark.parametrize(("matches", "accuracy"), [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_vqa_accuracy_averages_the_ten_leave_one_out_subsets(matches, accuracy):
    # 3 matches: 3 subsets leave one of them out (2/3 each), 7 keep all three (1 each): (3 * 2/3 + 7) / 10 = 0.9.
    references = ["Two"] * matches + ["three"] * (10 - matches)
    assert scorers.vqa_accuracy("2", references) == pytest.approx(accuracy)


@pytest.mark.parametrize(
    ("answer", "options", "letter"),
    [("A", 4, "A"), (" B ", 4, "B"), ("C. blue", 4, "C"), ("A\n", 4, "A"), ("The answer is D.", 4, "D"),
     ("I think the answer is B", 4, None), ("E", 4, None), ("AB", 4, None), ("a", 4, None), ("blue", 4, None)],
)  # fmt: skip
def test_choice_letter_as_llavas_scienceqa_reader(answer, options, letter):
    assert scorers.choice_letter(answer, options) == letter


def test_choice_scores_by_hand():
    assert scorers.choice_scores(["A", "B. x", "The answer is C.", None], ["A", "C", "C", "D"]) == 0.5


def test_the_vqa_rule_equals_lmms_evals_evalai_processor():
    from PIL import ImageFile

    before = ImageFile.LOAD_TRUNCATED_IMAGES
    try:
        lmms = pytest.importorskip("lmms_eval.tasks._task_utils.vqa_eval_metric")
        textvqa = pytest.importorskip("lmms_eval.tasks.textvqa.utils")
    finally:  # importing lmms-eval's task modules turns Pillow's truncated-image loading on for the whole process
        ImageFile.LOAD_TRUNCATED_IMAGES = before
    processor = lmms.EvalAIAnswerProcessor()
    cases = ["Two dogs.", "dont", "the man's hat", "x-ray; 1,000", "A (b) c!", "e.g. 3.5", "well - done", "none"]
    for case in cases:
        assert scorers.vqa_normalize(case) == processor(case)
    references = ["two", "2", "Two.", "three", "3", "the 3", "four", "4!", "five", "2 "]
    for answer in ["2", "three", "4", "six"]:
        theirs = textvqa.textvqa_process_results({"answers": list(references), "question_id": 0}, [answer])
        assert scorers.vqa_accuracy(answer, references) == pytest.approx(theirs["exact_match"])


# ------------------------------------------------------------------------------------------------------------------
# Files


def test_chunks_split_as_llavas_num_chunks():
    items = list(range(10))
    assert [chunk(items, 3, k) for k in range(3)] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert chunk(items[:2], 4, 3) == []
    with pytest.raises(VLMError, match="chunk-idx"):
        chunk(items, 2, 2)


def test_a_half_written_last_line_is_cut_off_on_resume(tmp_path):
    path = tmp_path / "answers.jsonl"
    path.write_text('{"question_id": 1, "text": "yes"}\n{"question_id": 2, "te')
    assert list(read_answers(path)) == ["1"]
    assert path.read_text().endswith('"te')  # reading alone changes nothing
    read_answers(path, repair=True)
    assert path.read_text() == '{"question_id": 1, "text": "yes"}\n'


@pytest.mark.parametrize(
    ("content", "message"),
    [('{"question_id": 1}\n', "no text"), ('{"text": "q"}\n', "no question_id"), ("{oops\n", "line 1"),
     ('{"question_id": 1, "text": "a"}\n{"question_id": 1, "text": "b"}\n', "appears twice")],
)  # fmt: skip
def test_bad_question_files_are_clear_errors(tmp_path, content, message):
    path = tmp_path / "q.jsonl"
    path.write_text(content)
    with pytest.raises(VLMError, match=message):
        read_questions(path)


def test_scoring_counts_missing_and_error_answers(tmp_path):
    gold = tmp_path / "gold.jsonl"
    pairs = [("yes", "x"), ("no", "x"), ("yes", "y"), ("no", "y")]
    records = [{"question_id": i, "text": "q", "answer": a, "category": c} for i, (a, c) in enumerate(pairs)]
    gold.write_text("".join(json.dumps(r) + "\n" for r in records))
    answers = tmp_path / "answers.jsonl"
    lines = [{"question_id": 0, "text": "Yes"}, {"question_id": 1, "text": "No"},
             {"question_id": 2, "text": "", "metadata": {"error": "image file not found"}}]  # fmt: skip
    answers.write_text("".join(json.dumps(line) + "\n" for line in lines))
    report = score_files("pope", answers, [gold])
    assert (report["answered"], report["missing"], report["errors"]) == (3, 1, 1)
    assert report["all"]["accuracy"] == pytest.approx(2 / 3)
    assert report["categories"]["x"]["accuracy"] == 1.0 and report["categories"]["y"]["accuracy"] == 0.0
    with pytest.raises(VLMError, match="unknown metric"):
        score_answers("bleu", {}, [])


# ------------------------------------------------------------------------------------------------------------------
# Answering


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory):
    """A miniature world with 8 held-out images, its LLaVA question files, and one question on a missing image."""
    from projector_training.toy.benchmarks import write_benchmarks
    from projector_training.toy.world import build_world

    root = tmp_path_factory.mktemp("world")
    build_world(root, seed=0, n_train=0, n_eval=8, image_size=32)
    out = write_benchmarks(root, root / "llava-eval")
    questions = read_questions(out / "toy_vqa.jsonl") + read_questions(out / "toy_choice.jsonl")[:4]
    questions.insert(3, {"question_id": "broken", "image": "images/missing.png", "text": "What colour is it?"})
    (out / "mixed.jsonl").write_text("".join(json.dumps(q) + "\n" for q in questions))
    return root, out


def vlm_eval(*args: str, launcher: tuple[str, ...] = (), **popen) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    command = [*launcher, "-m", "vlm", "eval", *args] if launcher else [sys.executable, "-m", "vlm", "eval", *args]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def answer_args(adapter: Path, world: tuple[Path, Path], answers: Path, *extra: str) -> tuple[str, ...]:
    root, out = world
    return ("answer", "--model", str(adapter), "--question-file", str(out / "mixed.jsonl"), "--image-folder",
            str(root), "--answers-file", str(answers), "--max-new-tokens", "4", "--device", "cpu", *extra)  # fmt: skip


def test_answers_in_question_order_with_an_error_record_for_a_bad_image(tiny_model, tiny_world, tmp_path):
    root, out = tiny_world
    answers = tmp_path / "answers.jsonl"
    summary = answer_file(tiny_model, out / "mixed.jsonl", answers, root, model_id="tiny", batch_size=3,
                          progress=False, max_new_tokens=4)  # fmt: skip
    assert (summary.questions, summary.answered, summary.errors) == (13, 12, 1)
    lines = [json.loads(line) for line in answers.read_text().splitlines()]
    questions = read_questions(out / "mixed.jsonl")
    assert [a["question_id"] for a in lines] == [q["question_id"] for q in questions]
    assert set(lines[0]) == {"question_id", "prompt", "text", "answer_id", "model_id", "metadata"}
    broken = lines[3]
    assert broken["text"] == "" and "not found" in broken["metadata"]["error"]
    # The answers are chat_batch's, whatever the batching.
    good = [q for q in questions if q["question_id"] != "broken"]
    conversations = [[{"role": "user", "content": [{"type": "image", "image": root / q["image"]}, q["text"]]}]
                     for q in good]  # fmt: skip
    expected = [t.strip() for t in tiny_model.chat_batch(conversations, batch_size=1, max_new_tokens=4)]
    assert [a["text"] for a in lines if a["question_id"] != "broken"] == expected
    # A second run has nothing to do and leaves the file as it was.
    before = answers.read_bytes()
    again = answer_file(tiny_model, out / "mixed.jsonl", answers, root, model_id="tiny", progress=False,
                        max_new_tokens=4)  # fmt: skip
    assert (again.skipped, again.answered) == (13, 0) and answers.read_bytes() == before


def test_killed_and_restarted_gives_the_uninterrupted_file(tiny_adapter, tiny_world, tmp_path):
    whole, resumed = tmp_path / "whole.jsonl", tmp_path / "resumed.jsonl"
    done = vlm_eval(*answer_args(tiny_adapter, tiny_world, whole, "--batch-size", "2"))
    assert done.wait(timeout=300) == 0, done.stderr.read()
    run = vlm_eval(*answer_args(tiny_adapter, tiny_world, resumed, "--batch-size", "1"))
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and (not resumed.exists() or resumed.read_text().count("\n") < 3):
        time.sleep(0.02)
    run.send_signal(signal.SIGKILL)
    run.wait()
    partial = resumed.read_text().count("\n")
    assert 3 <= partial < 13, "the run was not interrupted mid-way"
    with resumed.open("a") as f:
        f.write('{"question_id": "eval-0000')  # what a kill in the middle of a write leaves
    again = vlm_eval(*answer_args(tiny_adapter, tiny_world, resumed, "--batch-size", "3"))
    assert again.wait(timeout=300) == 0, again.stderr.read()
    summary = json.loads(again.stdout.read())
    assert summary["skipped"] == partial and summary["answered"] + summary["errors"] == 13 - partial
    assert resumed.read_text() == whole.read_text()  # in question order, each question once, same ids


def test_two_accelerate_processes_give_the_answers_of_one(tiny_adapter, tiny_world, tmp_path):
    one, two = tmp_path / "one.jsonl", tmp_path / "two.jsonl"
    single = vlm_eval(*answer_args(tiny_adapter, tiny_world, one, "--quiet"))
    assert single.wait(timeout=300) == 0, single.stderr.read()
    # accelerate 1.x runs `--cpu --num_processes 2` as ONE process (its simple launcher; several CPU processes need
    # mpirun and `--mpirun_hostfile`), and refuses `--cpu --multi_gpu`. `--multi_gpu` starts two through torchrun,
    # which answer on the CPU (`--device cpu`, gloo); each prints its own summary line with its rank.
    launch = (sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "--main_process_port", "0")  # fmt: skip
    double = vlm_eval(*answer_args(tiny_adapter, tiny_world, two, "--quiet"), launcher=launch)
    assert double.wait(timeout=300) == 0, double.stderr.read()
    summaries = [json.loads(line) for line in double.stdout.read().splitlines() if line.startswith("{")]
    # Two processes took part, each answering its half (LLaVA's chunks of 13: 7 and 6), each with one answer.
    shares = sorted((s["process"], s["questions"], s["answered"] + s["errors"]) for s in summaries)
    assert shares == [(0, 7, 7), (1, 6, 6)]
    assert two.read_text() == one.read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.jsonl", "two.jsonl"]  # the shares' files are gone


def test_llavas_chunks_answer_their_share(tiny_model, tiny_world, tmp_path):
    root, out = tiny_world
    parts = []
    for k in range(2):
        path = tmp_path / f"2_{k}.jsonl"
        answer_file(tiny_model, out / "mixed.jsonl", path, root, num_chunks=2, chunk_idx=k, progress=False,
                    max_new_tokens=4)  # fmt: skip
        parts.append(path.read_text())
    whole = tmp_path / "whole.jsonl"
    answer_file(tiny_model, out / "mixed.jsonl", whole, root, progress=False, max_new_tokens=4)
    assert [p.count("\n") for p in parts] == [7, 6] and "".join(parts) == whole.read_text()  # LLaVA's `cat` merge


def test_cli_eval_errors_are_one_line(tiny_adapter, tiny_world, tmp_path):
    bad = vlm_eval("answer", "--model", str(tiny_adapter), "--question-file", str(tmp_path / "none.jsonl"),
                   "--answers-file", str(tmp_path / "a.jsonl"))  # fmt: skip
    assert bad.wait(timeout=120) == 2
    assert bad.stderr.read().startswith("vlm: error: question file not found")
    empty = tmp_path / "a.jsonl"
    empty.write_text("")
    score = vlm_eval("score", "vqa", "--answers-file", str(empty), "--annotation-file", str(empty))
    assert score.wait(timeout=120) == 2 and "no answers in" in score.stderr.read()


# ------------------------------------------------------------------------------------------------------------------
# The miniature world's benchmark files


def test_toy_benchmark_files(tiny_world):
    _, out = tiny_world
    pope = read_questions(out / "toy_pope.jsonl")
    assert len(pope) == 8 * 6 and {q["category"] for q in pope} == {"random", "popular", "adversarial"}
    assert sorted(q["answer"] for q in pope).count("yes") == 24
    mme = read_questions(out / "toy_mme.jsonl")
    assert len(mme) == 16 and all(len([m for m in mme if m["image"] == q["image"]]) == 2 for q in mme)
    choice = read_questions(out / "toy_choice.jsonl")
    assert all(q["answer"] in "ABCD"[: q["options"]] and q["text"].endswith("directly.") for q in choice)
    vqa = read_questions(out / "toy_vqa.jsonl")
    for q in vqa:
        assert len(q["answers"]) == 10
        assert scorers.vqa_accuracy(q["answer"], q["answers"]) == 1.0
        assert scorers.vqa_accuracy(f"The {q['answer'].upper()}.", q["answers"]) == 1.0
        assert scorers.vqa_accuracy(q["answers"][-1], q["answers"]) == pytest.approx(0.3)
    answers = {json.dumps(q["question_id"]): {"question_id": q["question_id"], "text": q["answer"]} for q in vqa}
    assert score_answers("vqa", answers, vqa)["all"]["accuracy"] == 1.0
    assert sorted(p.name for p in (out / "lmms_tasks").iterdir())[:3] == ["toy_choice.yaml", "toy_mme.yaml",
                                                                           "toy_pope_adversarial.yaml"]  # fmt: skip


# ------------------------------------------------------------------------------------------------------------------
# The lmms-eval plugin


def fake_requests(conversations, gen_kwargs):
    """lmms-eval's chat requests: (context, doc_to_messages, generation kwargs, doc id, task, split)."""
    docs = {"task": {"test": conversations}}
    requests = [SimpleNamespace(args=("", lambda doc: doc, dict(gen_kwargs), i, "task", "test"))
                for i in range(len(conversations))]  # fmt: skip
    return docs, requests


def plugin_model(tiny_model, docs):
    from vlm.evaluation.lmms_eval_model import CausalLMVLM

    model = CausalLMVLM.__new__(CausalLMVLM)  # without lmms-eval's base class set-up
    model.model, model.batch_size, model.task_dict = tiny_model, 2, docs
    return model


def test_plugin_answers_lmms_eval_conversations_through_the_batch_api(tiny_model, rgb_images):
    image = {"type": "image", "url": str(rgb_images[0])}
    conversations = [
        [{"role": "user", "content": [image, {"type": "text", "text": "What colour?"}]}],
        [{"role": "user", "content": [{"type": "text", "text": "Hello"}]}],
        [{"role": "user", "content": [image, {"type": "text", "text": "What is it?"}]},  # multi-turn
         {"role": "assistant", "content": [{"type": "text", "text": "a shape"}]},
         {"role": "user", "content": [{"type": "text", "text": "What size?"}]}],
    ]  # fmt: skip
    docs, requests = fake_requests(conversations, {"max_new_tokens": 5, "temperature": 0, "top_p": 1.0})
    got = plugin_model(tiny_model, docs).generate_until(requests)
    from vlm.evaluation.lmms_eval_model import to_messages

    expected = [tiny_model.chat(to_messages(c), max_new_tokens=5).strip() for c in conversations]
    assert got == expected
    with pytest.raises(VLMError, match="not 'video'"):
        to_messages([{"role": "user", "content": [{"type": "video", "url": "a.mp4"}]}])


def test_plugin_loglikelihood_equals_the_full_forwards_log_probabilities(tiny_model, rgb_images):
    import torch

    docs = {"task": {"test": [{"image": str(rgb_images[1])}]}}
    model = plugin_model(tiny_model, docs)
    visual = lambda doc: [doc["image"]]  # noqa: E731
    continuations = ["red circle", "blue"]
    requests = [SimpleNamespace(args=("What colour?", c, visual, 0, "task", "test")) for c in continuations]
    got = model.loglikelihood(requests)
    for continuation, (logp, greedy) in zip(continuations, got, strict=True):
        messages = [{"role": "user", "content": [{"type": "image", "image": rgb_images[1]}, "What colour?"]},
                    {"role": "assistant", "content": continuation}]  # fmt: skip
        chat = tiny_model.encode_messages(messages, add_generation_prompt=False)
        answer = [i for i, label in enumerate(chat.labels) if label != -100][:-1]  # without <|im_end|>
        ids = torch.tensor([chat.input_ids])
        with torch.no_grad():
            logits = tiny_model.module(ids, torch.ones_like(ids), tiny_model.pixel_values(chat.images)).logits[0]
        logprobs = torch.log_softmax(logits.float(), -1)
        expected = sum(logprobs[i - 1, chat.input_ids[i]].item() for i in answer)
        assert logp == pytest.approx(expected, abs=1e-4) and logp < 0
        assert greedy == all(logprobs[i - 1].argmax().item() == chat.input_ids[i] for i in answer)


def test_plugin_is_registered_by_entry_point_and_importable_without_lmms_eval():
    import tomllib

    import vlm.evaluation.lmms_eval_model as plugin
    from vlm.evaluation import lmms_plugin

    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    entry = project["project"]["entry-points"]["lmms_eval.models"]
    assert entry == {lmms_plugin.MODEL_ID: "vlm.evaluation.lmms_plugin:manifest"}
    if plugin._LMMBase is object:
        with pytest.raises(VLMError, match=r"pip install -e \"\.\[eval\]\""):
            plugin.CausalLMVLM("runs/toy")
    else:
        manifest = lmms_plugin.manifest()
        assert manifest.chat_class_path == "vlm.evaluation.lmms_eval_model.CausalLMVLM"


# ------------------------------------------------------------------------------------------------------------------
# lmms-eval itself, as a user runs it, on the trained toy adapter

TOY_FIGURES = {
    "pope": {"accuracy", "precision", "recall", "f1", "yes_ratio"},
    "mme": {"total"},
    "choice": {"accuracy"},
    "vqa": {"accuracy"},
}
"""The figures the toy tasks report, per metric kind (lmms-eval names them KIND_FIGURE)."""


def lmms_eval_command() -> list[str]:
    """`lmms-eval` as installed beside this Python (the console script), else `python -m lmms_eval`."""
    script = Path(sys.executable).with_name("lmms-eval")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "lmms_eval"]


def logged_answers(output: Path, task: str, questions: list[dict]) -> list[dict]:
    """The answers lmms-eval logged for `task` (`--log_samples`), as LLaVA answer lines: each sample's doc_id is
    its question's place among the task's documents, checked against the logged prompt and target."""
    (path,) = output.rglob(f"*_samples_{task}.jsonl")
    lines = []
    for sample in map(json.loads, path.read_text().splitlines()):
        question = questions[sample["doc_id"]]
        assert (sample["input"], sample["target"]) == (question["text"], question["answer"])
        text = sample["filtered_resps"]
        lines.append({"question_id": question["question_id"], "text": text[0] if isinstance(text, list) else text})
    return lines


def lmms_figures(task_results: dict, kind: str) -> dict[str, float]:
    """A task's figures in lmms-eval's results file ("pope_f1,none": 0.66, ...) -> {"f1": 0.66, ...}."""
    return {key.split(",")[0].removeprefix(f"{kind}_"): value for key, value in task_results.items()
            if key.endswith(",none") and "_stderr" not in key}  # fmt: skip


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_lmms_eval_runs_every_toy_task_and_its_scores_equal_vlm_eval_score(toy_adapter, tmp_path):
    pytest.importorskip("lmms_eval", reason='lmms-eval is not installed: pip install -e ".[eval]"')
    from projector_training.toy.benchmarks import TASKS, world_of_adapter, write_benchmarks

    world = world_of_adapter(toy_adapter)
    bench = write_benchmarks(world, tmp_path / "bench")
    output, limit = tmp_path / "lmms", 4
    command = [*lmms_eval_command(), "--model", "causallm_vlm", "--model_args", f"pretrained={toy_adapter},device=cpu",
               "--tasks", ",".join(TASKS), "--include_path", str(bench / "lmms_tasks"), "--limit", str(limit),
               "--batch_size", "3", "--log_samples", "--output_path", str(output)]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_DATASETS_CACHE": str(tmp_path / "hf"),
           "PYTHONPATH": str(Path(__file__).parents[1])}  # fmt: skip
    run = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-6000:]
    (results_file,) = output.rglob("*_results.json")
    results = json.loads(results_file.read_text())
    assert results["config"]["model_backend"] == "vlm.evaluation.lmms_eval_model.CausalLMVLM (chat)"  # the plugin
    assert {task: n["effective"] for task, n in results["n-samples"].items()} == dict.fromkeys(TASKS, limit)

    # The answers lmms-eval logged, per metric kind (POPE's three splits in one file, as LLaVA scores POPE).
    answers: dict[str, list[dict]] = {}
    questions_by_id: dict[str, dict] = {}
    for task, (name, kind) in TASKS.items():
        questions = read_questions(bench / name)
        if kind == "pope":
            questions = [q for q in questions if q["category"] == task.removeprefix("toy_pope_")]
        lines = logged_answers(output, task, questions)
        assert len(lines) == limit
        answers.setdefault(kind, []).extend(lines)
        questions_by_id.update({q["question_id"]: q for q in questions[:limit]})

    # They are the adapter's answers: `vlm eval answer` on the same questions writes the same texts.
    ours = tmp_path / "vlm-answers.jsonl"
    run = vlm_eval("answer", "--model", str(toy_adapter), "--question-file",
                   str(write_jsonl(tmp_path / "questions.jsonl", list(questions_by_id.values()))),
                   "--image-folder", str(world), "--answers-file", str(ours), "--device", "cpu", "--quiet")  # fmt: skip
    assert run.wait(timeout=300) == 0, run.stderr.read()
    texts = {a["question_id"]: a["text"] for a in map(json.loads, ours.read_text().splitlines())}
    assert {a["question_id"]: a["text"] for lines in answers.values() for a in lines} == texts

    # `vlm eval score` on the logged answers gives lmms-eval's figures, each one.
    files = {kind: name for name, kind in TASKS.values()}
    for kind, lines in answers.items():
        score = vlm_eval("score", kind, "--answers-file", str(write_jsonl(tmp_path / f"{kind}.jsonl", lines)),
                         "--annotation-file", str(bench / files[kind]))  # fmt: skip
        out, err = score.communicate(timeout=120)
        assert score.returncode == 0, err
        report = json.loads(out)
        assert (report["answered"], report["errors"]) == (len(lines), 0)
        for task in (t for t, (_, k) in TASKS.items() if k == kind):
            theirs = lmms_figures(results["results"][task], kind)
            assert set(theirs) == TOY_FIGURES[kind]
            if kind == "mme":
                mine = {"total": report["total"]}
            else:
                mine = report["categories"][task.removeprefix("toy_pope_")] if kind == "pope" else report["all"]
            assert theirs == {figure: mine[figure] for figure in TOY_FIGURES[kind]}, task
