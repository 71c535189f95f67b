"""Named mutations: bugs put in on purpose, each of which some test must catch.

Each mutation replaces one snippet of the code the architecture step must keep (the decode paths, prompt
encoding, the word filter, resume, the exports' preprocessing, the demo's queue) with a plausible bug, runs the
tests named beside it in a copy of the working tree, and records whether they failed (killed) or passed
(survived). Items 1-7 of issue 17 are among them. A survivor is a hole in the safety net.

    python tools/mutation_check.py --toy-adapter runs/toy --out docs/mutation-report.json
    python tools/mutation_check.py --only static-prefill-attends-padding

The mutations marked `toy` need a trained miniature-world adapter (`vlm-train --recipe toy`); without
`--toy-adapter` they are reported as not run. Prints the report as JSON; about 10 minutes on 2 cores.
A mutation counts as killed only when a test fails (pytest's exit code 1 with failures named); an import error or
a run past the time limit stops the check instead, since it says nothing about the tests.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutation:
    name: str
    file: str
    old: str
    new: str
    tests: tuple[str, ...]
    """pytest arguments: files, node ids or `-k` expressions."""
    why: str
    toy: bool = False


BAN_DOCSTRING = (
    '        """input_ids (B, T), scores (B, V) -> scores with the last id of every sequence now complete set to '
    '-inf."""\n'
)

MUTATIONS = (
    # ---- decode paths
    Mutation(
        "static-prefill-attends-padding",
        "vlm/generation/static.py",
        "self.mask[:, :length].masked_fill_(valid, 0.0)",
        "self.mask[:, :length].fill_(0.0)",
        ("tests/test_model.py", "-k", "static_cache or overlapped or compiled or stream_equals"),
        "issue 17 item 2: the static cache's decode steps attend the pad slots of left-padded rows",
    ),
    Mutation(
        "static-step-cannot-see-its-own-token",
        "vlm/generation/static.py",
        "self.mask.index_fill_(1, self.slot, 0.0)",
        "pass",
        ("tests/test_model.py", "-k", "static_cache or overlapped or compiled"),
        "a decode step's own key and value are masked out",
    ),
    Mutation(
        "speculative-accepts-matches-after-a-mismatch",
        "vlm/generation/speculative.py",
        "accepted = (drafted == best[:, :-1]).long().cumprod(dim=1).sum(dim=1)",
        "accepted = (drafted == best[:, :-1]).long().sum(dim=1)",
        ("tests/test_speculative.py", "-k", "greedy"),
        "greedy speculative decoding keeps drafts that agree after one that did not",
    ),
    Mutation(
        "speculative-residual-is-p",
        "vlm/generation/speculative.py",
        "residual = (p - q).clamp(min=0)",
        "residual = p.clone()",
        ("tests/test_speculative.py", "-k", "distribution or resamples"),
        "a rejected draft is replaced from p instead of norm(max(0, p - q)): sampling leans towards the draft",
    ),
    Mutation(
        "speculative-draft-cache-keeps-a-rejected-draft",
        "vlm/generation/speculative.py",
        "self.draft.keep(fed_before + 1 + column)",
        "self.draft.keep(min(fed_before + 2 + column, self.draft.sequence.shape[1] - self.draft.prompt_width))",
        ("tests/test_speculative.py", "-k", "caches_hold"),
        "the draft's cache keeps a rejected draft: it proposes from a wrong prefix (the answers stay right)",
    ),
    Mutation(
        "suppress-only-the-image-row",
        "vlm/api.py",
        "self.suppress_ids = sorted({config.image_token_id, *range(len(tokenizer), rows)})",
        "self.suppress_ids = sorted({config.image_token_id})",
        ("tests/test_model.py", "-k", "spare_rows"),
        "issue 17 item 4: spare embedding rows past the tokenizer can be generated",
    ),
    Mutation(
        "stop-ids-ignored-on-the-device",
        "vlm/generation/loop.py",
        "        self.done |= torch.isin(next_ids, self.on_device)\n",
        "        pass\n",
        ("tests/test_model.py", "-k", "overlapped or stream_equals or static_cache"),
        "rows that wrote a stop id go on generating instead of padding",
    ),
    Mutation(
        "top-p-dropped",
        "vlm/generation/sampling.py",
        "                processors.append(TopPLogitsWarper(options.top_p))",
        "                pass",
        ("tests/test_generation.py", "-k", "shape_the_next"),
        "top-p sampling samples from the whole distribution",
    ),
    # ---- prompt encoding
    Mutation(
        "typed-special-tokens-parsed",
        "vlm/processing/chat.py",
        "    return plain.encode(text, add_special_tokens=False).ids",
        "    return tokenizer(text, add_special_tokens=False)['input_ids']",
        ("tests/test_prompt.py",),
        "issue 16 item 2: text a user types as <|im_end|> becomes the real special token (prompt injection)",
    ),
    Mutation(
        "assistant-im-end-unlabelled",
        "vlm/processing/chat.py",
        "        special(tokens.im_end, answer)",
        "        special(tokens.im_end, False)",
        ("tests/test_prompt.py",),
        "training never teaches the model to end its answer",
    ),
    Mutation(
        "one-image-slot-short",
        "vlm/processing/chat.py",
        "                ids.extend([tokens.image] * num_image_tokens)\n"
        "                labels.extend([IGNORE_INDEX] * num_image_tokens)",
        "                ids.extend([tokens.image] * (num_image_tokens - 1))\n"
        "                labels.extend([IGNORE_INDEX] * (num_image_tokens - 1))",
        ("tests/test_prompt.py", "tests/test_model.py", "-k", "slot or several_images or image_slot"),
        "an image gets one slot fewer than the tower has patches",
    ),
    Mutation(
        "blank-system-prompt-kept",
        "vlm/processing/chat.py",
        "system_text = system_text if system_text.strip() else default_system",
        "system_text = system_text if system_text else default_system",
        ("tests/test_prompt.py",),
        "a system prompt of spaces reaches CausalLM, which must never get an empty one",
    ),
    # ---- the word filter
    Mutation(
        "chinese-is-a-word-character",
        "vlm/generation/words.py",
        'WORD_CHAR = f"(?:(?![{_SPACELESS}])\\\\w)"',
        'WORD_CHAR = "\\\\w"',
        ("tests/test_generation.py",),
        "issue 16 item 1: a Chinese blocked word inside Chinese text is never blocked",
    ),
    Mutation(
        "sampling-ban-does-nothing",
        "vlm/generation/sampling.py",
        BAN_DOCSTRING,
        BAN_DOCSTRING + "        return scores\n",
        ("tests/test_model.py", "-k", "blocked"),
        "issue 17 item 5: blocked words are only hidden by the text filter, the model never writes around them",
    ),
    Mutation(
        "sampling-ban-does-nothing-toy",
        "vlm/generation/sampling.py",
        BAN_DOCSTRING,
        BAN_DOCSTRING + "        return scores\n",
        ("tests/test_toy_recipe.py", "-k", "writes_around"),
        "the same, seen on the trained toy adapter: its colours are filtered instead of replaced",
        toy=True,
    ),
    Mutation(
        "text-filter-case-sensitive",
        "vlm/generation/words.py",
        '    return re.compile("|".join(forms), re.IGNORECASE)',
        '    return re.compile("|".join(forms))',
        ("tests/test_generation.py",),
        '"BADWORD" is shown when "badword" is blocked',
    ),
    # ---- resume and the training loop
    Mutation(
        "resumed-lr-not-applied",
        "projector_training/checkpoint.py",
        '        group["lr"] = cfg.lr * factor(scheduler.last_epoch)  # as LambdaLR computes it',
        "        pass",
        ("tests/test_training.py", "-k", "learning_rate"),
        "issue 17 item 3: a resumed run steps at the checkpoint's lr, not the new one",
    ),
    Mutation(
        "resumed-betas-eps-decay-not-applied",
        "projector_training/checkpoint.py",
        "        group.update(initial_lr=cfg.lr, weight_decay=cfg.weight_decay, betas=betas, eps=cfg.adam_eps)",
        "        group.update(initial_lr=cfg.lr)",
        ("tests/test_training.py", "-k", "learning_rate"),
        "issue 17 item 3: a resumed run keeps the checkpoint's betas, eps and weight decay",
    ),
    Mutation(
        "abort-on-the-first-nonfinite-step",
        "projector_training/loop.py",
        "if state.nonfinite_steps > cfg.max_nonfinite_steps:",
        "if state.nonfinite_steps >= cfg.max_nonfinite_steps:",
        ("tests/test_training.py", "-k", "nonfinite"),
        "issue 17 item 6: training stops at the first non-finite step instead of skipping it",
    ),
    Mutation(
        "resume-ignores-a-new-seed",
        "projector_training/checkpoint.py",
        'for key in ("global_batch_size", "seed", "group_by_length"):',
        'for key in ("global_batch_size", "group_by_length"):',
        ("tests/test_training.py", "-k", "resuming_under_other_data"),
        "a checkpoint is resumed under another sample order",
    ),
    # ---- image features and the CLI
    Mutation(
        "cls-row-is-a-patch",
        "vlm/modeling/towers.py",
        "            return torch.cat([cls, patches], dim=1)  # (B, 1 + N, D)",
        "            return torch.cat([patches[:, :1], patches], dim=1)  # (B, 1 + N, D)",
        ("tests/test_model.py", "-k", "cls_patch"),
        "issue 17 item 8: `cls_patch` keeps a row of the right shape that is not the CLS state",
    ),
    Mutation(
        "chat-keeps-an-empty-partial-reply",
        "vlm/cli.py",
        '    reply = "".join(pieces)',
        '    reply = "".join(pieces) if pieces and len(pieces) > 1 else ""',
        ("tests/test_cli.py", "-k", "ctrl_c"),
        "issue 17 item 8: after Ctrl-C the chat keeps another reply than the one it showed",
    ),
    # ---- exports
    Mutation(
        "crop-offsets-rounded",
        "vlm/processing/image_processor.py",
        "left, top = (new_w - size) // 2, (new_h - size) // 2",
        "left, top = round((new_w - size) / 2.0), round((new_h - size) / 2.0)",
        ("tests/test_export.py", "tests/test_model.py", "-k", "aspect_mode or crop_mode"),
        "issue 17 item 1: vlm and the llava-hf export crop one pixel apart",
    ),
    # ---- the demo
    Mutation(
        "demo-one-event-in-the-model-queue",
        "demo/app.py",
        '            event.concurrency_id, event.concurrency_limit = "model", 1',
        '            event.concurrency_id, event.concurrency_limit = "model", 1\n            break',
        ("tests/test_demo.py", "-k", "queue"),
        "issue 17 item 7: retry and example events generate beside the submit event",
    ),
    Mutation(
        "demo-ignores-temperature-and-top-p",
        "demo/app.py",
        "            temperature=float(temperature),\n            top_p=float(top_p),",
        "            temperature=0.0,\n            top_p=1.0,",
        ("tests/test_demo.py",),
        "issue 17 item 7: the demo's sampling settings never reach the model",
    ),
)


def _copy_tree(destination: Path) -> None:
    """The working tree's tracked files (as edited, not as committed)."""
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    for name in filter(None, listed.decode().split("\0")):
        source = ROOT / name
        if source.is_file():
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, destination / name)


TIMEOUT_S = 600


def _pytest(tree: Path, tests: tuple[str, ...], env: dict[str, str]) -> tuple[bool, list[str], float]:
    """Run the tests in `tree` -> (all passed, the failed tests, seconds). Raises SystemExit when the run says
    nothing about the tests: errors while collecting or in fixtures, or a run past TIMEOUT_S."""
    start = time.perf_counter()
    try:
        done = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfE", *tests],
            cwd=tree,
            env={**env, "PYTHONPATH": str(tree)},  # subprocesses of the tests import the copy too
            capture_output=True,
            text=True,
            timeout=TIMEOUT_S,
        )
    except subprocess.TimeoutExpired:
        raise SystemExit(f"{tests} ran past {TIMEOUT_S} s") from None
    lines = done.stdout.splitlines()
    # "FAILED tests/x.py::test[param id, spaces allowed] - message"
    failed = [line.split(" ", 1)[1].split(" - ", 1)[0] for line in lines if line.startswith("FAILED ")]
    errors = [line for line in lines if line.startswith("ERROR ")]
    if done.returncode not in (0, 1) or errors or (done.returncode == 1 and not failed):
        tail = "\n".join([*errors, *lines[-15:], done.stderr[-2000:]])
        raise SystemExit(f"{tests}: pytest exited with {done.returncode} without a plain test failure:\n{tail}")
    return done.returncode == 0, failed, round(time.perf_counter() - start, 1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--toy-adapter", help="a trained toy adapter (vlm-train --recipe toy) for the toy mutations")
    parser.add_argument("--only", nargs="+", help="run only these mutations (by name)")
    parser.add_argument("--out", help="also write the report here")
    args = parser.parse_args(argv)
    chosen = [m for m in MUTATIONS if not args.only or m.name in args.only]
    unknown = set(args.only or ()) - {m.name for m in MUTATIONS}
    if unknown:
        parser.error(f"unknown mutations {sorted(unknown)}; known: {[m.name for m in MUTATIONS]}")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if args.toy_adapter:
        env["VLM_TOY_ADAPTER"] = str(Path(args.toy_adapter).resolve())
    results = []
    clean: dict[tuple[str, ...], tuple[bool, list[str], float]] = {}
    with tempfile.TemporaryDirectory(prefix="mutation-") as tmp:
        tree = Path(tmp)
        _copy_tree(tree)
        for mutation in chosen:
            entry = {"name": mutation.name, "file": mutation.file, "why": mutation.why, "tests": list(mutation.tests)}
            if mutation.toy and not args.toy_adapter:
                results.append({**entry, "result": "not run (needs --toy-adapter)"})
                continue
            path = tree / mutation.file
            original = path.read_text(encoding="utf-8")
            if original.count(mutation.old) != 1:
                raise SystemExit(f"{mutation.name}: the snippet to mutate is not in {mutation.file} exactly once")
            if mutation.tests not in clean:  # the tests must pass unmutated first
                clean[mutation.tests] = _pytest(tree, mutation.tests, env)
            if not clean[mutation.tests][0]:
                raise SystemExit(f"{mutation.name}: {clean[mutation.tests][1]} fail without the mutation; fix them")
            path.write_text(original.replace(mutation.old, mutation.new), encoding="utf-8")
            try:
                passed, failed, seconds = _pytest(tree, mutation.tests, env)
            finally:
                path.write_text(original, encoding="utf-8")
            results.append({**entry, "result": "survived" if passed else "killed", "failed": failed, "s": seconds})
            print(f"{mutation.name}: {results[-1]['result']} {failed}", file=sys.stderr)
    commit = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True, text=True)
    run = [r for r in results if r["result"] in ("killed", "survived")]
    report = {
        "commit": commit.stdout.strip(),
        "mutants": len(results),
        "run": len(run),
        "killed": sum(r["result"] == "killed" for r in run),
        "survived": [r["name"] for r in run if r["result"] == "survived"],
        "results": results,
    }
    text = json.dumps(report, indent=1, ensure_ascii=False)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0 if not report["survived"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
