"""The demo in a real browser: Debian's chromium, driven by Playwright, offline.

The flow a user follows: open the page, upload an image, ask about it, wait for the streamed answer. With the
tiny random model the answer is gibberish, so that test checks the page shows what the model says; with the
miniature world's trained adapter (the `toy_adapter` fixture: `vlm-train --recipe toy`) the question is a
held-out image's colour and the answer must be right.

Needs `chromium` (apt) and `playwright` (pip; no `playwright install`: the system chromium is used).
`DEMO_SCREENSHOT=docs/demo.png` also writes the toy test's screenshot there for the README;
`VLM_TOY_ADAPTER=DIR` tests an already trained toy adapter instead of training one.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import vlm
from demo.app import build_app, toy_world_dir

sync_api = pytest.importorskip("playwright.sync_api", reason="needs Playwright: pip install playwright")
CHROMIUM = shutil.which("chromium")
if CHROMIUM is None:
    pytest.skip("needs Debian's chromium: apt-get install -y chromium", allow_module_level=True)

CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TIMEOUT_MS = 60_000


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def browser_page(tmp_path: Path) -> Iterator[Any]:
    """A fresh headless chromium page that can reach 127.0.0.1 only."""
    with sync_api.sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"),
            executable_path=CHROMIUM,
            args=CHROMIUM_ARGS,
            viewport={"width": 1200, "height": 900},
        )
        # Offline: refuse anything not served by the app at once (web fonts, ...) instead of waiting on it.
        context.route(
            lambda url: not url.startswith("http://127.0.0.1:"),
            lambda route: route.abort(),
        )
        try:
            yield context.new_page()
        finally:
            context.close()


def serve(model: vlm.VisionLanguageModel, examples: list[Any] | None) -> Any:
    app = build_app(model, examples=examples)
    app.queue(default_concurrency_limit=1)
    app.launch(server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True, quiet=True)
    return app


def chat_in_browser(page: Any, url: str, image: Path, question: str) -> str:
    """Upload `image`, ask `question` and return the answer once it has finished streaming."""
    page.goto(url, timeout=TIMEOUT_MS)
    page.locator("input[type=file]").first.set_input_files(str(image))
    return ask_in_browser(page, question)


def ask_in_browser(page: Any, question: str) -> str:
    """Ask `question` in the open chat (about the images already in it) and return the finished answer."""
    answers = page.locator('[data-testid="bot"]')
    before = answers.count()
    box = page.get_by_test_id("textbox").first  # the placeholder text is gone once the chat has started
    box.fill(question)
    box.press("Enter")
    sync_api.expect(answers).to_have_count(before + 1, timeout=TIMEOUT_MS)
    wait_until_idle(page)
    return answers.last.inner_text().strip()


def wait_until_idle(page: Any) -> None:
    """Wait until the chat's last event chain has finished: streaming is over when the stop button has made way
    for the submit button, but Gradio then still copies the chat into its state and only after that makes the
    textbox editable again. A Retry clicked in between races with those steps: one CI run kept showing the first
    answer after Retry."""
    page.locator("button.submit-button").wait_for(timeout=TIMEOUT_MS)
    sync_api.expect(page.get_by_test_id("textbox").first).to_be_editable(timeout=TIMEOUT_MS)


def fill_and_keep(field: Any, text: str, settle_s: float = 1.0) -> None:
    """Fill `field` with `text` and wait until it has held it for `settle_s`, filling it again if it was reset.
    A field in an accordion that has just been opened for the first time can lose a value typed at once: in
    one run in five the Blocked words field read empty five seconds after its fill."""
    deadline = time.monotonic() + TIMEOUT_MS / 1000
    fills = 0
    while True:
        field.fill(text)
        fills += 1
        held_since = time.monotonic()
        while field.input_value() == text:
            if time.monotonic() - held_since >= settle_s:
                return
            time.sleep(0.1)
        assert time.monotonic() < deadline, f"the field did not keep {text!r} after {fills} fills"


def wait_for_words(messages: Any, expected: str, context: Callable[[], str] = str) -> None:
    """Wait until `messages` is one message with the words of `expected` (Playwright's own whitespace
    normalisation differs from `str.split` on the control characters a random model writes). `context()` adds
    what the page showed besides to a failure."""
    deadline = time.monotonic() + TIMEOUT_MS / 1000
    while (texts := [t.split() for t in messages.all_inner_texts()]) != [expected.split()]:
        assert time.monotonic() < deadline, f"the page shows {texts}, expected {[expected.split()]}; {context()}"
        time.sleep(0.2)


def test_browser_chat_answers_retries_and_clears(tiny_model, rgb_images, browser_page, tmp_path):
    page, question = browser_page, "What colour is the shape?"
    conversation = [{"role": "user", "content": [{"type": "image", "image": str(rgb_images[0])}, question]}]
    app = serve(tiny_model, examples=[])
    try:
        answer = chat_in_browser(page, app.local_url, rgb_images[0], question)
        expected = tiny_model.chat(conversation)  # the app's defaults: greedy, the adapter's system prompt
        assert answer.split() == expected.split()  # the page renders markdown, so compare the words
        assert page.locator('[data-testid="user"] img').count() == 1, "the uploaded image is shown"
        page.screenshot(path=str(tmp_path / "demo.png"))

        # Retry after blocking a word of the answer: the same turn is answered again under the new setting.
        word = next(w for w in expected.split() if "," not in w)
        filtered = tiny_model.chat(conversation, blocked_words=[word])
        assert filtered != expected
        page.locator("button.label-wrap", has_text="Settings").click()
        blocked = page.get_by_label("Blocked words")
        fill_and_keep(blocked, word)
        page.get_by_role("button", name="Retry").click()
        bot = page.locator('[data-testid="bot"]')
        wait_for_words(
            bot,
            filtered,
            lambda: (
                f"blocked words field {blocked.input_value()!r}, "
                f"chat textbox editable: {page.get_by_test_id('textbox').first.is_editable()}"
            ),
        )

        page.get_by_role("button", name="Clear").click()
        sync_api.expect(bot).to_have_count(0)
        sync_api.expect(page.locator('[data-testid="user"]')).to_have_count(0)
    finally:
        app.close()


def test_browser_bad_upload_names_the_file_as_uploaded_and_the_chat_goes_on(
    tiny_model, rgb_images, browser_page, tmp_path
):
    """A text file named like an image: the reply says what is wrong with the name the visitor gave it, never the
    server's upload folder, and the next upload in the same chat is answered as if the chat started there."""
    from demo.app import WARNING

    fake = tmp_path / "notimage.png"
    fake.write_text("this is not an image")
    app = serve(tiny_model, examples=[])
    try:
        reply = chat_in_browser(browser_page, app.local_url, fake, "What is this?")
        assert reply.startswith(WARNING.strip()) and "not an image" in reply, reply
        assert "notimage.png" in reply and "/" not in reply and "gradio" not in reply.lower(), reply

        browser_page.locator("input[type=file]").first.set_input_files(str(rgb_images[2]))
        answer = ask_in_browser(browser_page, "What shape is it?")
        conversation = [
            {"role": "user", "content": [{"type": "image", "image": str(rgb_images[2])}, "What shape is it?"]}
        ]
        assert answer.split() == tiny_model.chat(conversation).split()
    finally:
        app.close()


def test_browser_answers_the_colour_then_the_shape_of_a_held_out_toy_image(toy_adapter, browser_page, tmp_path):
    from projector_training.toy.world import QUESTIONS

    model = vlm.load(toy_adapter, device="cpu")
    world = toy_world_dir(model)
    assert world is not None, f"the toy adapter's LM ({model.config.lm}) should sit beside its world/"
    # The first held-out image whose colour the world asks about, with the plain colour question, then a follow-up
    # about the same image's shape (its caption record, the same image, holds the truth).
    record = next(r for r in json.loads((world / "eval_vqa.json").read_text()) if r["id"].endswith("-colour"))
    caption = next(r for r in json.loads((world / "eval_captions.json").read_text()) if r["image"] == record["image"])
    question, colour = QUESTIONS["colour"][0], record["conversations"][1]["value"]
    shape = caption["conversations"][1]["value"].split()[-1]
    app = serve(model, examples=None)  # with the world's own examples, as `vlm demo` shows them
    try:
        answer = chat_in_browser(browser_page, app.local_url, world / record["image"], question)
        print(f"browser: {question!r} about {record['image']} -> {answer!r} (truth {colour!r})")
        follow_up = ask_in_browser(browser_page, QUESTIONS["shape"][0])
        print(f"browser: then {QUESTIONS['shape'][0]!r} -> {follow_up!r} (truth {shape!r})")
        screenshot = tmp_path / "demo.png"
        browser_page.screenshot(path=str(screenshot))
        assert answer.lower().rstrip(".") == colour
        assert follow_up.lower().rstrip(".") == shape
        if target := os.environ.get("DEMO_SCREENSHOT"):
            shutil.copyfile(screenshot, target)
    finally:
        app.close()
