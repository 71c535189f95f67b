"""`vlm`: caption, ask, chat, export, import-llava, eval and demo from the command line.

User mistakes print one line (`vlm: error: ...`) and exit with status 2; there are no tracebacks
unless `VLM_DEBUG=1` is set.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from vlm.adapter import check_output_dir
from vlm.errors import VLMError

__all__ = ["main"]

DEFAULT_TOY_ADAPTER = "runs/toy"


def _generation_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("generation")
    group.add_argument("--max-new-tokens", type=int, default=None)
    group.add_argument("--temperature", type=float, default=None, help="0 (default) is greedy")
    group.add_argument("--top-p", type=float, default=None)
    group.add_argument("--top-k", type=int, default=None)
    group.add_argument("--repetition-penalty", type=float, default=None)
    group.add_argument("--seed", type=int, default=None)
    group.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    group.add_argument("--blocked-word", dest="blocked_words", action="append", default=None, help="repeatable")


def _model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", "-m", default=DEFAULT_TOY_ADAPTER, help="adapter directory or preset name")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    parser.add_argument("--dtype", default=None, help="bfloat16, float16 or float32")
    _draft_args(parser)


def _draft_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("speculative decoding")
    group.add_argument(
        "--draft", default=None, help="a smaller adapter (or preset) that drafts tokens for --model to check, e.g. "
        "the 7B's for the 14B: the same answers, sooner",
    )  # fmt: skip
    group.add_argument(
        "--draft-length", type=int, default=None, help="tokens drafted per round (default: adapted to the acceptance)"
    )


def _generation_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    names = ("max_new_tokens", "temperature", "top_p", "top_k", "repetition_penalty", "seed", "stop", "blocked_words")
    return {n: getattr(args, n) for n in names if getattr(args, n) is not None}


def _load(args: argparse.Namespace, images: Sequence[str] = ()) -> Any:
    """Check the images first (a typo should not cost a model load), then load the model quietly."""
    from transformers.utils import logging as hf_logging

    import vlm

    if hasattr(args, "max_new_tokens"):  # the generation flags too: a bad one should not cost a model load either
        vlm.GenerationOptions.from_kwargs(**_generation_kwargs(args))
    for image in images:
        vlm.load_image(image)
    if args.model == DEFAULT_TOY_ADAPTER and not os.path.isdir(DEFAULT_TOY_ADAPTER):
        raise VLMError(
            f"no --model given and no {DEFAULT_TOY_ADAPTER} here: give an adapter directory or preset, or train the "
            "miniature world's adapter first with `vlm-train --recipe toy` (it writes runs/toy in this directory)"
        )
    hf_logging.disable_progress_bar()
    draft = {k: getattr(args, k) for k in ("draft", "draft_length") if hasattr(args, k)}  # not on export
    return vlm.load(args.model, device=args.device, dtype=args.dtype, **draft)


def _speculation(model: Any) -> dict[str, Any]:
    """The draft's statistics of the latest answer, as a JSON field (nothing without a draft)."""
    stats = model.last_speculation if model.draft is not None else None
    return {} if stats is None else {"speculation": stats.as_dict()}


def _report_speculation(model: Any) -> None:
    """One line on stderr after an answer with a draft: how much of the draft the model kept."""
    stats = model.last_speculation if model.draft is not None else None
    if stats is not None:
        print(
            f"(draft: {stats.acceptance_rate:.0%} of drafted tokens accepted, "
            f"{stats.tokens_per_target_forward:.2f} tokens per forward of the model)",
            file=sys.stderr,
        )


def cmd_caption(args: argparse.Namespace) -> int:
    model = _load(args, args.images)
    kwargs = _generation_kwargs(args)
    for image in args.images:
        text = model.caption(image, prompt=args.prompt, **kwargs)
        if args.json:
            print(json.dumps({"image": image, "caption": text, **_speculation(model)}))
        else:
            print(f"{image}\t{text}" if len(args.images) > 1 else text, flush=True)
            _report_speculation(model)
    return 0


def cmd_ask(args: argparse.Namespace) -> int:
    model = _load(args, [args.image])
    answer = model.ask(args.image, args.question, **_generation_kwargs(args))
    if args.json:
        print(json.dumps({"image": args.image, "question": args.question, "answer": answer, **_speculation(model)}))
    else:
        print(answer, flush=True)
        _report_speculation(model)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    """Interactive chat. `/image PATH` attaches an image to the next message, `/reset` starts over."""
    model = _load(args, [args.image] if args.image else [])
    kwargs = _generation_kwargs(args)
    messages: list[dict[str, Any]] = [{"role": "system", "content": args.system}] if args.system else []
    pending = [args.image] if args.image else []
    interactive = sys.stdin.isatty()
    if interactive:
        print("Type a message. /image PATH attaches an image, /reset clears, Ctrl-D exits.", file=sys.stderr)
    while True:
        if interactive:
            print("you> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line:
            return 0
        line = line.strip()
        if not line:
            continue
        if line == "/image" or line.startswith("/image "):
            pending += _attached(line.removeprefix("/image").strip())
        elif line == "/reset":
            messages, pending = messages[:1] if args.system else [], []
        elif _turn(model, messages, pending, line, kwargs, args.json, interactive):
            pending = []


def _attached(typed: str) -> list[str]:
    """The image a `/image` line names, checked now (not after the user has typed the question), or none."""
    from vlm.processing.images import load_image

    path = _typed_path(typed)
    if not path:
        print("usage: /image PATH", file=sys.stderr)
        return []
    try:
        load_image(path)
    except VLMError as e:
        print(f"error: {e}", file=sys.stderr)
        return []
    print(f"(attached {path})", file=sys.stderr)
    return [path]


def _turn(
    model: Any,
    messages: list[dict[str, Any]],
    pending: list[str],
    line: str,
    kwargs: dict[str, Any],
    as_json: bool,
    interactive: bool,
) -> bool:
    """One user turn with the pending images, answered as a stream -> whether it stays in the conversation (a bad
    turn is dropped with its images still attached; Ctrl-C keeps the part of the answer shown)."""
    content: list[Any] = [{"type": "image", "image": p} for p in pending] + [{"type": "text", "text": line}]
    messages.append({"role": "user", "content": content})
    pieces: list[str] = []
    stream = None
    try:
        stream = model.chat(messages, stream=True, **kwargs)  # may refuse the turn at once (bad text)
        for piece in stream:
            pieces.append(piece)
            if not as_json:
                print(piece, end="", flush=True)
    except VLMError as e:
        messages.pop()  # keep the conversation usable after a bad turn, and the images attached
        print(f"error: {e}" + (f" ({len(pending)} image(s) still attached)" if pending else ""), file=sys.stderr)
        return False
    except KeyboardInterrupt:  # Ctrl-C stops this answer, not the chat
        if stream is not None:
            stream.close()
        print("\n(stopped)" if interactive else "", file=sys.stderr)
        if not pieces:
            messages.pop()
            return False
    reply = "".join(pieces)
    print(json.dumps({"role": "assistant", "content": reply, **_speculation(model)}) if as_json else "", flush=True)
    if not as_json:
        _report_speculation(model)
    messages.append({"role": "assistant", "content": reply})
    return True


def _typed_path(text: str) -> str:
    """A path as typed or dropped into a terminal: as it is if that exists, else unquoted or unescaped (spaces),
    `~` for home."""
    if os.path.exists(text):
        return text
    try:
        words = shlex.split(text)
    except ValueError:  # an unbalanced quote: take the text as it is
        words = [text]
    return os.path.expanduser(" ".join(words)) if words else ""


GGUF_FTYPES = {None: "f16", "float16": "f16", "f16": "f16", "float32": "f32", "f32": "f32"}


def cmd_export(args: argparse.Namespace) -> int:
    from vlm import export

    if args.to == "llava-hf":
        check_output_dir(Path(args.out))  # before loading a model of many GB
        if args.dtype is None:  # the checkpoint's own precision: a bf16 LM is not written out as float32
            args.dtype = export.lm_checkpoint_dtype(args.model)
        out = export.export_llava_hf(_load(args), args.out)
    else:
        if args.dtype not in GGUF_FTYPES:
            raise VLMError(f"--dtype {args.dtype} is not a GGUF mmproj type: use float16 (the default) or float32")
        out = export.export_gguf_mmproj(args.model, args.out, ftype=GGUF_FTYPES[args.dtype])
    print(out)
    return 0


def cmd_import_llava(args: argparse.Namespace) -> int:
    from vlm import export

    out = export.import_llava(
        args.projector,
        vision_tower=args.vision,
        lm=args.lm,
        out=args.out,
        vision_backend=args.vision_backend,
        vision_pretrained=args.vision_pretrained,
    )
    print(out)
    return 0


def _processes(device: str | None) -> tuple[int, int, Callable[[], None] | None, str | None]:
    """(rank, world size, barrier, device) of this process: one process unless `accelerate launch` started several
    (on the CPU when asked for or when there is no GPU, where the processes talk through gloo)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1, None, None
    import torch
    from accelerate import PartialState

    state = PartialState(cpu=device == "cpu" or not torch.cuda.is_available())
    return state.process_index, state.num_processes, state.wait_for_everyone, str(state.device)


def cmd_eval_answer(args: argparse.Namespace) -> int:
    from vlm.evaluation.answer import answer_file
    from vlm.evaluation.files import read_questions

    read_questions(args.question_file)  # a bad file should not cost a model load
    rank, world, barrier, device = _processes(args.device)
    args.device = args.device or device
    model = _load(args)
    summary = answer_file(
        model, args.question_file, args.answers_file, args.image_folder,
        model_id=args.model_id or Path(args.model).name, batch_size=args.batch_size, num_chunks=args.num_chunks,
        chunk_idx=args.chunk_idx, rank=rank, world=world, barrier=barrier, progress=not args.quiet,
        **_generation_kwargs(args),
    )  # fmt: skip
    print(json.dumps({"answers_file": args.answers_file, "process": rank, **vars(summary)}), flush=True)
    return 0


def cmd_eval_score(args: argparse.Namespace) -> int:
    from vlm.evaluation.scoring import score_files

    report = json.dumps(score_files(args.metric, args.answers_file, args.annotation_file), indent=1)
    if args.out:
        Path(args.out).write_text(report + "\n")
    print(report)
    return 0


def _eval_parser(sub: Any) -> None:
    from vlm.evaluation.scoring import METRICS

    evaluate = sub.add_parser("eval", help="answer LLaVA question files and score the answers").add_subparsers(
        dest="eval_command", required=True
    )
    p = evaluate.add_parser("answer", help="answer a LLaVA question file into a LLaVA answer file (resumable)")
    p.add_argument("--question-file", required=True, help="JSONL: question_id, image, text[, category]")
    p.add_argument("--image-folder", default=".", help="the question file's image paths are relative to this")
    p.add_argument("--answers-file", required=True, help="JSONL written (and resumed) here")
    p.add_argument("--model-id", default=None, help="the answers' model_id (default: the adapter directory's name)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--num-chunks", type=int, default=1, help="as LLaVA: split the questions into this many chunks")
    p.add_argument("--chunk-idx", type=int, default=0, help="as LLaVA: answer this chunk (from 0)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _model_args(p)
    _generation_args(p)
    p.set_defaults(func=cmd_eval_answer)

    p = evaluate.add_parser("score", help="score an answer file with a benchmark's rule (JSON report)")
    p.add_argument("metric", choices=list(METRICS))
    p.add_argument("--answers-file", required=True)
    p.add_argument("--annotation-file", action="append", required=True, help="gold labels by question_id (repeatable)")
    p.add_argument("--out", default=None, help="also write the report here")
    p.set_defaults(func=cmd_eval_score)


def cmd_demo(args: argparse.Namespace) -> int:
    # The one import of `demo` from `vlm` (allowed in the import contracts, pyproject.toml): the library never
    # needs gradio, only this command does, so it is imported here and nowhere else.
    from demo.app import launch

    launch(
        model=args.model, host=args.host, port=args.port, device=args.device, dtype=args.dtype, draft=args.draft,
        draft_length=args.draft_length,
    )  # fmt: skip
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlm", description="Caption, question and chat with images.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("caption", help="caption one or more images")
    p.add_argument("images", nargs="+")
    p.add_argument("--prompt", default=None, help="instruction (default: the adapter's caption prompt)")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    _model_args(p)
    _generation_args(p)
    p.set_defaults(func=cmd_caption)

    p = sub.add_parser("ask", help="ask a question about an image")
    p.add_argument("image")
    p.add_argument("question")
    p.add_argument("--json", action="store_true")
    _model_args(p)
    _generation_args(p)
    p.set_defaults(func=cmd_ask)

    p = sub.add_parser("chat", help="interactive multi-turn chat (streams; /image PATH attaches an image)")
    p.add_argument("--image", default=None, help="image attached to the first message")
    p.add_argument("--system", default=None, help="system prompt (default: the adapter's)")
    p.add_argument("--json", action="store_true", help="print each reply as a JSON line instead of streaming")
    _model_args(p)
    _generation_args(p)
    p.set_defaults(func=cmd_chat)

    _interop_commands(sub)
    _eval_parser(sub)
    _demo_command(sub)
    return parser


def _interop_commands(sub: Any) -> None:
    """`export` and `import-llava`."""
    p = sub.add_parser("export", help="export an adapter to another runtime")
    p.add_argument("model", help="adapter directory")
    p.add_argument("--to", choices=["llava-hf", "gguf-mmproj"], required=True)
    p.add_argument("out", help="output directory (llava-hf) or .gguf file (gguf-mmproj)")
    p.add_argument("--device", default="cpu", help="llava-hf: where the adapter is loaded to be written")
    p.add_argument(
        "--dtype",
        default=None,
        help="weights' dtype: llava-hf (default: the LM checkpoint's), gguf-mmproj float16 (default) or float32",
    )
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("import-llava", help="make an adapter from an original LLaVA mm_projector file")
    p.add_argument("projector", help="mm_projector.bin or .safetensors")
    p.add_argument("--vision", required=True, help="vision tower (hub id, path, or open_clip name)")
    p.add_argument("--vision-backend", choices=["hf", "open_clip"], default="hf")
    p.add_argument(
        "--vision-pretrained", default=None, help="open_clip: pretrained tag (openai) or checkpoint for a model name"
    )
    p.add_argument("--lm", required=True, help="causal LM (hub id or path)")
    p.add_argument("out", help="output adapter directory")
    p.set_defaults(func=cmd_import_llava)


def _demo_command(sub: Any) -> None:
    p = sub.add_parser("demo", help="launch the Gradio chat demo")
    p.add_argument("--model", "-m", default=None, help="adapter directory (default: the miniature world's)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None)
    _draft_args(p)
    p.set_defaults(func=cmd_demo)


def _format_warning(message: Warning | str, category: type[Warning], *_: Any, **__: Any) -> str:
    return f"vlm: warning: {message}\n"  # for a user, not a source line of ours


def main(argv: Sequence[str] | None = None) -> int:
    warnings.formatwarning = _format_warning
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except VLMError as e:
        if os.environ.get("VLM_DEBUG"):
            raise
        print(f"vlm: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
