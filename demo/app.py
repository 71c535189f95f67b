"""The Gradio chat demo: talk about images with a vision-language model, answers streamed as they are generated.

`launch()` loads the model once and serves the app (127.0.0.1 unless told otherwise); `build_app(model)` builds
the UI around an already loaded model, which is what the tests do.

The chat is a `gr.ChatInterface` with a multimodal textbox: upload, drag-and-drop or paste images, ask, stop,
retry, clear. Every turn re-sends the whole conversation, earlier images included, to `VisionLanguageModel.chat`
as OpenAI-style messages. A bad upload (not an image, truncated, a decompression bomb, ...) is answered with a
"⚠️ ..." message in the chat and that exchange is left out of later turns, so the session carries on.

Safe defaults: only image uploads, an upload size cap, no `allowed_paths` (example images are copied into
Gradio's own cache when the UI is built), and one generation at a time.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator, Mapping, Sequence
from contextlib import closing
from pathlib import Path
from typing import Any

import gradio as gr

import vlm

__all__ = [
    "MAX_UPLOAD_SIZE",
    "WARNING",
    "build_app",
    "find_examples",
    "history_to_messages",
    "launch",
    "respond",
    "toy_world_dir",
]

WARNING = "⚠️ "
"""Prefix of the chat replies that report an error instead of answering."""
MAX_UPLOAD_SIZE = "20mb"
"""Gradio's per-file upload cap (the image loader refuses anything past 50 MB itself)."""
DEFAULT_MAX_NEW_TOKENS = 256

Example = tuple[str | Path, str]
"""An example for the chat: (image path, question)."""


# --------------------------------------------------------------------------------------------------
# Gradio messages -> OpenAI-style messages


def _file_path(item: Any) -> str | None:
    """The local path of a file in a Gradio message, in any of the shapes Gradio uses for one."""
    if isinstance(item, Mapping):
        if item.get("type") == "file" or "file" in item:
            return _file_path(item.get("file"))
        if item.get("path"):
            return str(item["path"])
    if isinstance(item, tuple) and item:  # (path,) or (path, alt text): Gradio's example messages
        return item[0] if isinstance(item[0], str) else _file_path(item[0])
    path = getattr(item, "path", None)  # gr.FileData
    return str(path) if path else None


def _content_parts(content: Any) -> list[dict[str, Any]]:
    """One Gradio message content (a string, a file, or a list of those) -> text and image parts."""
    items = content if isinstance(content, list) else [content]
    parts: list[dict[str, Any]] = []
    for item in items:
        if isinstance(item, str):
            parts.append({"type": "text", "text": item})
        elif isinstance(item, Mapping) and item.get("type") == "text":
            parts.append({"type": "text", "text": str(item.get("text", ""))})
        elif (path := _file_path(item)) is not None:
            parts.append({"type": "image", "image": path})
    return parts


def history_to_messages(history: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Gradio chat history (messages format, raw or normalised) -> OpenAI-style messages for `model.chat`.

    Consecutive messages of one role are merged (Gradio shows each attached file as its own message), images
    are `{"type": "image", "image": path}` parts, and an exchange that ended in a "⚠️" error reply is dropped
    so one bad upload does not break every later turn.
    """
    messages: list[dict[str, Any]] = []
    for entry in history:
        role = entry.get("role")
        if role not in ("user", "assistant"):
            continue
        parts = _content_parts(entry.get("content"))
        if role == "assistant":
            parts = [p for p in parts if p["type"] == "text"]
            if "".join(p["text"] for p in parts).startswith(WARNING):
                while messages and messages[-1]["role"] == "user":
                    messages.pop()
                continue
        if not parts:
            continue
        if messages and messages[-1]["role"] == role:
            if any(p["type"] == "text" for p in messages[-1]["content"]) and any(p["type"] == "text" for p in parts):
                parts = [{"type": "text", "text": "\n"}, *parts]  # two questions in a row stay apart
            messages[-1]["content"].extend(parts)
        else:
            messages.append({"role": role, "content": parts})
    return messages


def _without_server_paths(text: str, messages: Sequence[Mapping[str, Any]]) -> str:
    """`text` with every uploaded file's path on the server cut to the file's own name: a visitor sees the name
    they uploaded (Gradio keeps it as the last part of the path), never where the server keeps it."""
    paths = {
        str(part["image"])
        for message in messages
        if isinstance(message.get("content"), list)
        for part in message["content"]
        if part.get("type") == "image" and isinstance(part.get("image"), (str, Path))
    }
    for path in sorted(paths | {str(Path(p).resolve()) for p in paths}, key=len, reverse=True):
        text = text.replace(path, Path(path).name)
    return text


def _user_message(message: str | Mapping[str, Any]) -> dict[str, Any]:
    """The multimodal textbox value ({"text", "files"}) -> one user message, images first as Gradio shows them."""
    if isinstance(message, str):
        message = {"text": message, "files": []}
    images = [{"type": "image", "image": _file_path(f) or str(f)} for f in message.get("files") or []]
    text = (message.get("text") or "").strip()
    return {"role": "user", "content": images + ([{"type": "text", "text": text}] if text else [])}


def _blocked_words(text: str) -> list[str]:
    """'foo, bar baz,' -> ['foo', 'bar baz']."""
    return [word.strip() for word in text.split(",") if word.strip()]


# --------------------------------------------------------------------------------------------------
# The chat function


def respond(
    model: vlm.VisionLanguageModel,
    message: str | Mapping[str, Any],
    history: Sequence[Mapping[str, Any]],
    system_prompt: str = "",
    temperature: float = 0.0,
    top_p: float = 1.0,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    blocked_words: str = "",
) -> Iterator[str]:
    """Yield the growing answer to `message` after `history`; errors a user can cause become a "⚠️" reply.

    An empty system prompt is left out, so the model's default one applies."""
    user = _user_message(message)
    if not user["content"]:
        yield f"{WARNING}Type a question or attach an image."
        return
    system_prompt, blocked_words = system_prompt or "", blocked_words or ""  # the API may send null
    system = [{"role": "system", "content": system_prompt}] if system_prompt.strip() else []
    messages = [*system, *history_to_messages(history), user]
    answer = ""
    try:
        stream = model.chat(
            messages,
            stream=True,
            temperature=float(temperature),
            top_p=float(top_p),
            max_new_tokens=int(max_new_tokens),
            blocked_words=_blocked_words(blocked_words),
        )
        with closing(stream):  # Stop closes this generator; closing the model's stream releases its lock
            for piece in stream:
                answer += piece
                yield answer
    except vlm.VLMError as e:
        yield f"{WARNING}{_without_server_paths(str(e), messages)}"
        return
    if not answer:  # a warning, so the empty exchange is not sent back to the model as a real one
        yield f"{WARNING}No answer: the model stopped at once."


# --------------------------------------------------------------------------------------------------
# Examples


def toy_world_dir(model: vlm.VisionLanguageModel) -> Path | None:
    """The miniature world's directory when `model` is its adapter, else None.

    The toy world keeps `world/` (images and LLaVA eval records) beside the `lm/` its adapter points to."""
    lm_dir = Path(model.lm_path)
    world = lm_dir.parent / "world"
    return world if lm_dir.is_dir() and (world / "eval_vqa.json").is_file() else None


def find_examples(model: vlm.VisionLanguageModel) -> list[Example]:
    """Held-out images and questions of the miniature world when `model` is its adapter, else none."""
    world = toy_world_dir(model)
    if world is None:
        return []
    examples: list[Example] = []
    # One question per attribute (the VQA records cycle size, colour, shape) and one caption request.
    for name, pick in (("eval_vqa.json", slice(0, 3)), ("eval_captions.json", slice(-1, None))):
        path = world / name
        if not path.is_file():
            continue
        for record in json.loads(path.read_text())[pick]:
            question = record["conversations"][0]["value"].replace("<image>", "").strip()
            examples.append((world / record["image"], question))
    return examples


# --------------------------------------------------------------------------------------------------
# The app


def _short(reference: str) -> str:
    """A hub id as is; a local path by its last two parts (no home directories on screen)."""
    return "/".join(Path(reference.removeprefix("local-dir:")).parts[-2:])


def _description(model: vlm.VisionLanguageModel) -> str:
    config = model.config
    draft = "none" if model.draft is None else f"`{_short(model.draft.config.lm)}` (speculative decoding)"
    return (
        f"**LM** `{_short(config.lm)}` · **Draft** {draft} · **vision tower** `{_short(config.vision_tower)}` · "
        f"{model.num_image_tokens} image tokens per image.  \nUpload, drag and drop or paste images, then ask about "
        "them; images stay in the conversation. Settings are under the chat."
    )


def build_app(model: vlm.VisionLanguageModel, examples: Sequence[Example] | None = None) -> gr.Blocks:
    """The chat UI around a loaded model. `examples` default to the miniature world's (see `find_examples`)."""
    examples = find_examples(model) if examples is None else list(examples)
    default_system = model.config.system_prompt

    def chat(
        message: dict[str, Any],
        history: list[dict[str, Any]],
        system_prompt: str,
        temperature: float,
        top_p: float,
        max_new_tokens: int,
        blocked_words: str,
    ) -> Iterator[str]:
        yield from respond(model, message, history, system_prompt, temperature, top_p, max_new_tokens, blocked_words)

    settings = [
        gr.Textbox(
            value=default_system,
            label="System prompt",
            info=f"Leave empty to use the model's default: “{default_system}”",
            lines=2,
        ),
        gr.Slider(0.0, 2.0, value=0.0, step=0.05, label="Temperature", info="0 is greedy (deterministic)"),
        gr.Slider(0.05, 1.0, value=1.0, step=0.05, label="Top-p"),
        gr.Slider(1, min(2048, model.config.max_length), value=DEFAULT_MAX_NEW_TOKENS, step=1, label="Max new tokens"),
        gr.Textbox(
            value="",
            label="Blocked words",
            info="Comma-separated words or phrases the answer may not contain",
            placeholder="e.g. foo, bar baz",
        ),
    ]
    interface = gr.ChatInterface(
        chat,
        multimodal=True,
        textbox=gr.MultimodalTextbox(
            file_types=["image"],
            file_count="multiple",
            placeholder="Ask about an image: upload, drop or paste one",
            sources=["upload"],
            autofocus=True,
            stop_btn=True,
        ),
        chatbot=gr.Chatbot(label="Chat", buttons=["copy"], height=520),
        additional_inputs=settings,
        additional_inputs_accordion=gr.Accordion("Settings", open=False),
        examples=[[{"text": question, "files": [str(image)]}] for image, question in examples] or None,
        title="CausalLM vision chat",
        description=_description(model),
        api_name="chat",
        analytics_enabled=False,
    )
    # Gradio queues each event by its own function: the browser's submit, retry and example events and the /chat
    # API would each let one generation in at a time, together several, blocking queue workers on the model's lock.
    # One queue for every event that generates.
    for event in interface.fns.values():
        if getattr(event.fn, "__wrapped__", event.fn) is chat:
            event.concurrency_id, event.concurrency_limit = "model", 1
    return interface


def _check_address(host: str, port: int | None) -> None:
    """Fail now, in one line, if the server could not listen on host:port (a port in use, a host that is not
    this machine's)."""
    if port is None:
        return
    if not 0 < port < 65536:
        raise vlm.VLMError(f"port {port} is not a TCP port (1-65535)")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM)[0]
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server will: TIME_WAIT is no bar
            probe.bind(address)
    except OSError as e:
        raise vlm.VLMError(
            f"cannot serve on {host}:{port} ({e.strerror or e}): another program (another demo?) may be using the "
            "port, or the host is not an address of this machine; choose another --port or --host"
        ) from None


def launch(
    model: str | Path | None = None,
    host: str = "127.0.0.1",
    port: int = 7860,
    device: str | None = None,
    dtype: str | None = None,
    draft: str | Path | None = None,
    draft_length: int | None = None,
    **kwargs: Any,
) -> gr.Blocks:
    """Load the model once and serve the demo; returns when the server stops (at once with `prevent_thread_lock`).

    `model`: an adapter directory or preset; None trains the miniature world's adapter if it is missing (with
    progress in the terminal) and uses it. `draft` (and `draft_length`): a smaller adapter for speculative
    decoding, as in `vlm.load`. `kwargs` go to `gr.Blocks.launch` and override its safe defaults.
    """
    from transformers.utils import logging as hf_logging

    _check_address(host, port)  # before loading a model of many GB (or training the toy one)
    if model is None:
        from projector_training.toy.recipe import ensure_toy_adapter

        model = ensure_toy_adapter()
    print(f"demo: loading {model} ...", flush=True)
    hf_logging.disable_progress_bar()
    loaded = vlm.load(model, device=device, dtype=dtype, draft=draft, draft_length=draft_length)
    app = build_app(loaded)
    app.queue(default_concurrency_limit=1)  # one generation at a time: the model has one KV cache and GPU
    app.launch(server_name=host, server_port=port, **{"max_file_size": MAX_UPLOAD_SIZE, **kwargs})
    return app
