"""The Gradio demo, served for real on 127.0.0.1 and driven with `gradio_client` (tiny random model, CPU).

The tiny model's answers are gibberish but deterministic under greedy decoding, so every answer the app
streams must equal `model.chat` on the conversation the app should have sent.
"""

from __future__ import annotations

import itertools
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

import vlm
from demo.app import MAX_UPLOAD_SIZE, WARNING, build_app, history_to_messages, launch, respond
from tests.test_images import encode, noise, png_with_header
from vlm.config import DEFAULT_SYSTEM_PROMPT

gradio_client = pytest.importorskip("gradio_client")

MAX_NEW_TOKENS = 12


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny_adapter: Path) -> Iterator[Any]:
    """The app as `vlm demo` serves it (its own model load), stopped at the end of the module."""
    app = launch(model=str(tiny_adapter), port=free_port(), device="cpu", prevent_thread_lock=True, quiet=True)
    yield app
    app.close()


def client(server: Any) -> Any:
    """A fresh browser-like session: its own chat history."""
    return gradio_client.Client(server.local_url, verbose=False, download_files=False)


def ask(session: Any, image: Path | None, question: str, system_prompt: str = DEFAULT_SYSTEM_PROMPT) -> Any:
    """Submit one chat turn (greedy) and return the job once it has finished."""
    files = [gradio_client.handle_file(str(image))] if image else []
    job = session.submit(
        {"text": question, "files": files}, system_prompt, 0.0, 1.0, MAX_NEW_TOKENS, "", api_name="/chat"
    )
    job.result(timeout=60)
    return job


def user(image: Path | None, question: str) -> dict[str, Any]:
    parts = [{"type": "image", "image": str(image)}] if image else []
    return {"role": "user", "content": [*parts, {"type": "text", "text": question}]}


def greedy(model: vlm.VisionLanguageModel, messages: list[dict[str, Any]]) -> str:
    return model.chat(messages, temperature=0, max_new_tokens=MAX_NEW_TOKENS)


def test_launch_uses_safe_defaults(server, rgb_images):
    assert server.server_name == "127.0.0.1"
    assert MAX_UPLOAD_SIZE == "20mb" and server.max_file_size == 20 * 1024 * 1024
    assert server.allowed_paths == []
    assert server._queue.default_concurrency_limit == 1
    textbox = next(c for c in server.config["components"] if c["type"] == "multimodaltextbox")
    assert textbox["props"]["file_types"] == ["image"]
    # An upload is served back from Gradio's cache; nothing else is (a temp file, a file in the cwd).
    with rgb_images[0].open("rb") as f:
        (uploaded,) = httpx.post(f"{server.local_url}gradio_api/upload", files={"files": f}).json()
    assert httpx.get(f"{server.local_url}gradio_api/file={uploaded}").content == rgb_images[0].read_bytes()
    for path in (rgb_images[0], Path("pyproject.toml").resolve()):
        assert httpx.get(f"{server.local_url}gradio_api/file={path}").status_code == 403, f"{path} is served"


def test_streamed_answer_and_second_turn_about_the_same_image(server, tiny_model, rgb_images):
    session = client(server)
    first = ask(session, rgb_images[0], "What colour is the shape?")
    streamed = [out for out in first.outputs() if out]
    answer = first.result()
    conversation = [user(rgb_images[0], "What colour is the shape?")]
    assert answer == greedy(tiny_model, conversation)
    assert len(streamed) > 1, "the answer should arrive in pieces"
    assert all(b.startswith(a) for a, b in itertools.pairwise(streamed)), "each update extends the last"

    second = ask(session, None, "Describe the image.").result()
    conversation += [{"role": "assistant", "content": answer}, user(None, "Describe the image.")]
    assert second == greedy(tiny_model, conversation)
    # The comparison can tell whether the image was kept: without it (or with another) the answer differs.
    assert second != greedy(tiny_model, [{"role": "user", "content": "What colour is the shape?"}, *conversation[1:]])
    assert second != greedy(tiny_model, [user(rgb_images[1], "What colour is the shape?"), *conversation[1:]])


def test_bad_upload_is_reported_and_the_session_goes_on(server, tiny_model, tmp_path, rgb_images):
    fake = tmp_path / "notes.png"
    fake.write_text("this is not an image")
    session = client(server)
    reply = ask(session, fake, "What is this?").result()
    assert reply.startswith(WARNING)
    assert "image" in reply.lower() and "Traceback" not in reply
    # The reply names the file as uploaded, never where the server keeps it (Gradio's upload folder).
    assert "notes.png" in reply and "/" not in reply, reply

    # The failed exchange is left out; the next turn is answered as if the conversation started there.
    answer = ask(session, rgb_images[2], "What shape is it?").result()
    assert answer == greedy(tiny_model, [user(rgb_images[2], "What shape is it?")])


def test_empty_system_prompt_falls_back_to_the_default(server, tiny_model, rgb_images):
    answer = ask(client(server), rgb_images[0], "Describe the image.", system_prompt="  ").result()
    default = [{"role": "system", "content": DEFAULT_SYSTEM_PROMPT}, user(rgb_images[0], "Describe the image.")]
    assert answer == greedy(tiny_model, default)
    system_box = next(c for c in server.config["components"] if c["props"].get("label") == "System prompt")
    assert system_box["props"]["value"] == DEFAULT_SYSTEM_PROMPT
    assert "empty" in system_box["props"]["info"].lower() and DEFAULT_SYSTEM_PROMPT in system_box["props"]["info"]


def truncated_png() -> bytes:
    return encode(noise(64, 64), "PNG")[:-200]


def bomb_png() -> bytes:
    return png_with_header(100_000, 100_000)


@pytest.mark.parametrize(("make", "reason"), [(truncated_png, "truncated"), (bomb_png, "decompression bomb")])
def test_broken_images_give_a_readable_reply(tiny_model, tmp_path, make, reason):
    path = tmp_path / "upload.png"
    path.write_bytes(make())
    *_, reply = respond(tiny_model, {"text": "What is it?", "files": [str(path)]}, [])
    assert reply.startswith(WARNING) and reason in reply.lower()


def test_stopping_a_stream_releases_the_model(tiny_model, rgb_images):
    stream = respond(tiny_model, {"text": "Describe it.", "files": [str(rgb_images[0])]}, [], max_new_tokens=50)
    next(stream)
    assert tiny_model._lock.locked()
    stream.close()  # what Gradio does on Stop
    assert not tiny_model._lock.locked()


def test_blocked_words_and_settings_reach_the_model(tiny_model, rgb_images):
    message = {"text": "Describe it.", "files": [str(rgb_images[0])]}
    plain = list(respond(tiny_model, message, [], max_new_tokens=MAX_NEW_TOKENS))[-1]
    word = plain.split()[0]
    filtered = list(respond(tiny_model, message, [], max_new_tokens=MAX_NEW_TOKENS, blocked_words=f" {word} , "))[-1]
    expected = greedy(tiny_model, [user(rgb_images[0], "Describe it.")])
    assert plain == expected
    assert filtered == tiny_model.chat(
        [user(rgb_images[0], "Describe it.")], temperature=0, max_new_tokens=MAX_NEW_TOKENS, blocked_words=[word]
    )
    assert word not in filtered


def test_temperature_and_top_p_reach_the_model(tiny_model, rgb_images, monkeypatch):
    """Every other demo test runs greedy: here the sampling settings must arrive as given."""
    seen = []
    chat = type(tiny_model).chat

    def recording_chat(self, messages, **options):
        seen.append(options)
        return chat(self, messages, **options)

    monkeypatch.setattr(type(tiny_model), "chat", recording_chat)  # the class: undone without a trace
    message = {"text": "Describe it.", "files": [str(rgb_images[0])]}
    answer = list(respond(tiny_model, message, [], "", 0.7, 0.9, MAX_NEW_TOKENS, ""))[-1]
    assert answer and seen and (seen[-1]["temperature"], seen[-1]["top_p"]) == (0.7, 0.9)
    assert seen[-1]["max_new_tokens"] == MAX_NEW_TOKENS


def test_every_generating_event_shares_one_queue_and_the_port_is_checked_first(tiny_model, tmp_path):
    """Gradio queues events per function: the browser's submit and the /chat API would each let one generation in
    at a time. And a busy port is a one-line error before any model is loaded."""
    app = build_app(tiny_model, examples=[])

    def unwrapped(event):
        return getattr(event.fn, "__wrapped__", event.fn)

    chat_fn = next(unwrapped(e) for e in app.fns.values() if e.api_name == "chat")
    generating = {e.api_name: e for e in app.fns.values() if unwrapped(e) is chat_fn}
    # the /chat API, then Gradio's submit, retry and example events, which call the same function
    assert set(generating) == {"chat", "_submit_fn", "_submit_fn_1", "_submit_fn_2"}
    assert {(e.concurrency_id, e.concurrency_limit) for e in generating.values()} == {("model", 1)}
    others = [e for e in app.fns.values() if e.api_name not in generating]
    assert others and all(e.concurrency_id != "model" for e in others)  # nothing else waits behind generations
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(vlm.VLMError, match=f"cannot serve on 127.0.0.1:{port}"):
            launch(model=str(tmp_path / "not loaded"), port=port)


def test_a_port_a_stopped_demo_left_in_time_wait_is_free():
    from demo.app import _check_address

    with socket.socket() as server:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port)):
            conn, _ = server.accept()
            conn.close()  # the server closes first, as an HTTP server does: its side goes to TIME_WAIT
    _check_address("127.0.0.1", port)  # the next demo (uvicorn binds with SO_REUSEADDR) may listen there
    _check_address("[::1]" if socket.has_ipv6 else "127.0.0.1", free_port())


def test_null_settings_and_an_empty_answer_do_not_reach_the_model(tiny_model, rgb_images, monkeypatch):
    message = {"text": "Describe it.", "files": [str(rgb_images[0])]}
    plain = list(respond(tiny_model, message, [], max_new_tokens=MAX_NEW_TOKENS))[-1]
    assert list(respond(tiny_model, message, [], None, 0.0, 1.0, MAX_NEW_TOKENS, None))[-1] == plain  # API nulls
    monkeypatch.setattr(tiny_model.processor, "stop_ids", [*tiny_model.stop_ids, *range(len(tiny_model.tokenizer) + 4)])
    empty = list(respond(tiny_model, message, [], max_new_tokens=MAX_NEW_TOKENS))[-1]
    assert empty.startswith(WARNING)  # so the exchange is dropped from what later turns send
    history = [{"role": "user", "content": "Describe it."}, {"role": "assistant", "content": empty}]
    assert history_to_messages(history) == []


def test_history_to_messages_reads_every_gradio_shape():
    history = [
        {"role": "user", "content": ("/c/a.png",)},  # an example's file, its own message
        {"role": "user", "content": [{"type": "file", "file": {"path": "/c/b.png"}}, {"type": "text", "text": "Q1"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A1"}]},
        {"role": "user", "content": [{"path": "/c/bad.png"}, "Q2"]},
        {"role": "assistant", "content": f"{WARNING}that is not an image"},
        {"role": "user", "content": "Q3"},
        {"role": "assistant", "content": "A3"},
        {"role": "user", "content": "Q4, stopped before any answer"},
        {"role": "user", "content": "Q5"},
    ]
    assert history_to_messages(history)[-1] == {
        "role": "user",
        "content": [
            {"type": "text", "text": "Q4, stopped before any answer"},
            {"type": "text", "text": "\n"},
            {"type": "text", "text": "Q5"},
        ],
    }
    assert history_to_messages(history[:-2]) == [
        {
            "role": "user",
            "content": [
                {"type": "image", "image": "/c/a.png"},
                {"type": "image", "image": "/c/b.png"},
                {"type": "text", "text": "Q1"},
            ],
        },
        {"role": "assistant", "content": [{"type": "text", "text": "A1"}]},
        {"role": "user", "content": [{"type": "text", "text": "Q3"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A3"}]},
    ]


def test_example_images_are_served_from_gradio_cache_only(tiny_model, rgb_images):
    import gradio as gr

    app = build_app(tiny_model, examples=[(rgb_images[0], "What colour is the shape?")])
    assert isinstance(app, gr.Blocks)
    chatbot = next(c for c in app.config["components"] if c["type"] == "chatbot")
    (example,) = chatbot["props"]["examples"]
    served = Path(example["files"][0]["path"])
    assert example["text"] == "What colour is the shape?"
    assert served != rgb_images[0] and served.read_bytes() == rgb_images[0].read_bytes()
    assert served.is_relative_to(gr.utils.get_upload_folder())


def test_the_header_names_the_draft(tiny_adapter):
    """A model decoding with a draft says so at the top of the page."""
    from demo.app import _description

    alone = vlm.load(tiny_adapter, device="cpu")
    assert "**Draft** none" in _description(alone)
    drafted = vlm.load(tiny_adapter, device="cpu", draft=tiny_adapter)
    assert "**Draft** `" in _description(drafted) and "speculative decoding" in _description(drafted)
