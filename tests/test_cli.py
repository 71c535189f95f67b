"""The `vlm` command line, run as a user would: a subprocess on a saved tiny adapter."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import vlm


def run(*args: str, stdin: str | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    data = None if stdin is None else stdin.encode("utf-8", "surrogateescape")  # lone surrogates: raw bytes
    command = [sys.executable, "-m", "vlm", *args]
    out = subprocess.run(command, capture_output=True, input=data, env=env, timeout=300, cwd=cwd)
    out.stdout, out.stderr = out.stdout.decode(), out.stderr.decode()
    return out


def test_caption_and_ask(tiny_adapter, rgb_images):
    model = vlm.load(tiny_adapter, device="cpu")
    expected_caption = model.caption(rgb_images[0], max_new_tokens=6)
    expected_answer = model.ask(rgb_images[1], "What colour?", max_new_tokens=6)

    out = run("caption", str(rgb_images[0]), "--model", str(tiny_adapter), "--max-new-tokens", "6")
    assert out.returncode == 0, out.stderr
    assert out.stdout == expected_caption + "\n"

    out = run("ask", str(rgb_images[1]), "What colour?", "-m", str(tiny_adapter), "--max-new-tokens", "6", "--json")
    assert out.returncode == 0, out.stderr
    expected = {"image": str(rgb_images[1]), "question": "What colour?", "answer": expected_answer}
    assert json.loads(out.stdout) == expected


def test_chat_streams_with_an_attached_image_and_exits_on_eof(tiny_adapter, rgb_images):
    script = f"hello\n/image {rgb_images[2]}\nwhat is this?\n/image /no/such.png\n/images are a message too\n"
    out = run("chat", "-m", str(tiny_adapter), "--max-new-tokens", "4", "--json", stdin=script)
    assert out.returncode == 0, out.stderr
    replies = [json.loads(line) for line in out.stdout.splitlines()]
    assert len(replies) == 3 and all(r["role"] == "assistant" for r in replies)
    assert f"attached {rgb_images[2]}" in out.stderr
    assert "image file not found" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("caption", "/no/such.png"), "not found"),
        (("caption", "IMG", "--model", "/no/adapter"), "neither an adapter directory"),
        (("ask", "IMG", "q", "--temperature", "-1"), "temperature"),
        (("ask", "IMG", "q", "--max-new-tokens", "0", "--model", "/no/adapter"), "max_new_tokens"),  # before loading
        (("caption", "IMG", "--device", "cuda:7"), "CUDA device"),  # no GPU here, or not eight
        (("caption", "IMG", "--device", "tpu9"), "unknown device"),
        (("caption", "IMG", "--dtype", "int8"), "unsupported dtype"),
        (("ask", "IMG", "caf\udce9?"), "not UTF-8"),  # what Python makes of a Latin-1 argument
        (("caption", "IMG", "--temperature", "nan"), "finite"),
        (("export", "ADAPTER", "--to", "gguf-mmproj", "OUT.gguf", "--dtype", "int8"), "not a GGUF mmproj type"),
        (("export", "ADAPTER", "--to", "llava-hf", "NONEMPTY"), "already exists"),
        (("demo", "--port", "99999"), "not a TCP port"),
    ],
)
def test_user_mistakes_print_one_line_and_exit_2(tiny_adapter, rgb_images, tmp_path, args, message):
    (tmp_path / "NONEMPTY").mkdir()
    (tmp_path / "NONEMPTY" / "config.json").write_text("{}")
    paths = {"IMG": rgb_images[0], "ADAPTER": tiny_adapter, "OUT.gguf": tmp_path / "OUT.gguf"}
    args = tuple(str(paths.get(a, tmp_path / a if a == "NONEMPTY" else a)) for a in args)
    if "--model" not in args and args[0] != "export":
        args = (*args, "--model", str(tiny_adapter))
    out = run(*args)
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    assert out.stderr.startswith("vlm: error:") and message in out.stderr


def test_export_and_import_llava_from_the_command_line(tiny_adapter, tmp_path):
    import torch

    out = run("export", str(tiny_adapter), "--to", "llava-hf", str(tmp_path / "hf"))
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "hf" / "config.json").is_file() and any((tmp_path / "hf").glob("*.safetensors"))
    out = run("export", str(tiny_adapter), "--to", "gguf-mmproj", str(tmp_path / "mmproj.gguf"))
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "mmproj.gguf").stat().st_size > 0

    model = vlm.load(tiny_adapter, device="cpu")
    state = {f"model.mm_projector.{k}": v for k, v in model.module.projector.state_dict().items()}
    torch.save(state, tmp_path / "mm_projector.bin")
    out = run(
        "import-llava", str(tmp_path / "mm_projector.bin"), "--vision", model.config.vision_tower,
        "--lm", model.config.lm, str(tmp_path / "imported"),
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    imported = vlm.load(tmp_path / "imported", device="cpu")
    assert all(
        torch.equal(a, b)
        for a, b in zip(imported.module.projector.parameters(), model.module.projector.parameters(), strict=True)
    )

    out = run("import-llava", str(tmp_path / "mm_projector.bin"), "--vision", model.config.vision_tower,
              "--lm", str(tmp_path / "nowhere"), str(tmp_path / "bad"))  # fmt: skip
    assert out.returncode == 2 and out.stderr.startswith("vlm: error:") and "Traceback" not in out.stderr
    assert "nowhere' is not there: no such directory" in out.stderr  # not the hub's "Repo id must be ..."


def test_chat_paths_as_a_terminal_types_them_and_images_kept_after_a_failed_turn(tiny_adapter, rgb_images, tmp_path):
    spaced = tmp_path / "my shape.png"
    spaced.write_bytes(rgb_images[0].read_bytes())
    model = vlm.load(tiny_adapter, device="cpu")
    expected = model.chat(
        [{"role": "user", "content": [{"type": "image", "image": spaced}, {"type": "text", "text": "what is this?"}]}],
        max_new_tokens=4,
    )
    long_question = "why " * 1000  # over max_length: refused, and the image must stay attached
    script = f"/image '{spaced}'\n{long_question}\ncaf\udce9?\nwhat is this?\n"  # and a line that is not UTF-8
    out = run("chat", "-m", str(tiny_adapter), "--max-new-tokens", "4", "--json", stdin=script)
    assert out.returncode == 0, out.stderr
    assert "over the limit" in out.stderr and "(1 image(s) still attached)" in out.stderr and "not UTF-8" in out.stderr
    assert [json.loads(line)["content"] for line in out.stdout.splitlines()] == [expected]


def test_ctrl_c_stops_the_answer_not_the_chat(tiny_adapter, rgb_images, monkeypatch, capsys):
    """The stream is interrupted mid-answer: the chat closes it (releasing the model), keeps the partial reply and
    reads the next question."""
    import io

    from vlm import cli
    from vlm.api import VisionLanguageModel

    chat = VisionLanguageModel.chat
    calls, closed, shown = [], [], []

    class Interrupted:
        """The first answer's stream: one piece, then Ctrl-C."""

        def __init__(self, inner):
            self.inner, self.pieces = inner, 0

        def __iter__(self):
            return self

        def __next__(self):
            self.pieces += 1
            if self.pieces > 1:
                raise KeyboardInterrupt
            shown.append(next(self.inner))
            return shown[-1]

        def close(self):
            closed.append(True)
            self.inner.close()

    def interrupted(self, messages, stream=False, **kwargs):
        calls.append([dict(m) for m in messages])
        inner = chat(self, messages, stream=True, **kwargs)
        return Interrupted(inner) if len(calls) == 1 else inner

    monkeypatch.setattr(VisionLanguageModel, "chat", interrupted)
    monkeypatch.setattr("sys.stdin", io.StringIO("first?\nsecond?\n"))
    assert cli.main(["chat", "-m", str(tiny_adapter), "--max-new-tokens", "6", "--json"]) == 0
    assert closed == [True] and len(shown) == 1 and shown[0]
    assert [[m["role"] for m in c] for c in calls] == [["user"], ["user", "assistant", "user"]]
    partial = calls[1][1]["content"]  # the partial answer stays in the conversation, as it was shown
    assert (partial if isinstance(partial, str) else "".join(p["text"] for p in partial)) == shown[0]
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(lines) == 2 and lines[0] == {"role": "assistant", "content": shown[0]}


def test_typed_paths_are_taken_as_they_are_when_they_exist(tmp_path):
    from vlm.cli import _typed_path

    odd = tmp_path / "two  spaces \\ and a backslash.png"
    odd.write_bytes(b"")
    assert _typed_path(str(odd)) == str(odd)
    assert _typed_path(f"'{odd}'") == str(odd)
    assert _typed_path("~/x.png") == str(Path.home() / "x.png")


def test_no_model_outside_the_repository_says_how_to_get_one(rgb_images, tmp_path):
    out = run("caption", str(rgb_images[0]), cwd=tmp_path)
    assert out.returncode == 2 and "vlm-train --recipe toy" in out.stderr and "Traceback" not in out.stderr


def test_draft_flag_gives_the_same_answer_and_reports_the_speculation(tiny_adapter, rgb_images):
    expected = vlm.load(tiny_adapter, device="cpu").ask(rgb_images[0], "What colour?", max_new_tokens=8)
    common = ("-m", str(tiny_adapter), "--draft", str(tiny_adapter), "--max-new-tokens", "8")
    out = run("ask", str(rgb_images[0]), "What colour?", *common, "--json")
    assert out.returncode == 0, out.stderr
    answer = json.loads(out.stdout)
    assert answer["answer"] == expected
    assert answer["speculation"]["acceptance_rate"] == 1.0  # the adapter drafting for itself agrees everywhere
    assert answer["speculation"]["tokens_per_target_forward"] > 1.5
    out = run("caption", str(rgb_images[0]), *common, "--draft-length", "3")
    assert out.returncode == 0, out.stderr
    assert "100% of drafted tokens accepted" in out.stderr
    out = run("ask", str(rgb_images[0]), "What colour?", *common, "--draft-length", "0")
    assert out.returncode == 2 and "draft_length must be within 1..16" in out.stderr
