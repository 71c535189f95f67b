"""Shared fixtures: tiny random backbones (HF CLIP, open_clip, Llama), a tiny ChatML tokenizer, and CausalLM's
real vocabulary (Qwen-1's 151,643 ranks, which the `dashscope` wheel ships) beside a tiny random Llama with
CausalLM's 152,064 embedding rows.

Everything is built and saved under a session temp dir; nothing touches the network. The `toy_adapter`
fixture trains the miniature world's adapter once per session with `vlm-train --recipe toy` (about 7 minutes
on 2 cores with nothing cached, 4 with the backbones cached); `VLM_TOY_ADAPTER=DIR` uses one already trained
and `-m "not toy"` deselects the tests that need it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(2)

CORPUS = [
    "You are a helpful assistant.",
    "What colour is the shape? It is red, green, blue or yellow.",
    "Describe the image. A small red circle on a white background.",
    "The quick brown fox jumps over the lazy dog 0123456789.",
    "user assistant system <image> image token text\n\n",
] * 4


def build_test_tokenizer(directory: Path):
    from projector_training.toy.tokenizer import build_tokenizer

    tokenizer = build_tokenizer(CORPUS, vocab_size=300)
    tokenizer.save_pretrained(directory)
    return tokenizer


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tiny")


@pytest.fixture(scope="session")
def tiny_lm_path(tiny_dir: Path) -> Path:
    """A 2-layer random Llama with spare embedding rows past the tokenizer (like CausalLM's)."""
    path = tiny_dir / "lm"
    tokenizer = build_test_tokenizer(path)
    save_tiny_llama(path, tokenizer, rows=len(tokenizer) + 4, kv_heads=4, seed=0)
    return path


def save_tiny_llama(path: Path, tokenizer, rows: int, kv_heads: int, seed: int) -> None:
    """A 2-layer, 64-wide random Llama with `rows` embedding rows, saved beside its tokenizer in `path`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=rows,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        max_position_embeddings=512,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        # Spare rows (the image slot among them) score 0 and never win a greedy step, which keeps
        # parity runs against transformers (which does not suppress them) comparable.
        model.lm_head.weight[len(tokenizer) :] = 0.0
    model.save_pretrained(path)


CAUSALLM_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
CAUSALLM_VOCAB_ROWS = 152064
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
"""GPT-2's pre-tokenizer split, which `GPT2Tokenizer` applies (CausalLM ships `tokenizer_class: GPT2Tokenizer`,
not Qwen's own split)."""


def qwen_ranks_file() -> Path:
    """Qwen-1's `qwen.tiktoken` (base64 token, rank per line) from the installed `dashscope` package, found
    without importing it (its import pulls in its whole client)."""
    import importlib.util

    spec = importlib.util.find_spec("dashscope")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail('the real-vocabulary tests need the dev extra: pip install -e ".[dev]" (it brings dashscope)')
    path = Path(next(iter(spec.submodule_search_locations))) / "resources" / "qwen.tiktoken"
    if not path.is_file():
        pytest.fail(
            f"{path} is missing: this dashscope no longer ships Qwen's ranks; pin the version in requirements.lock"
        )
    return path


def build_causallm_tokenizer(directory: Path):
    """Write the tokenizer directory as CausalLM 14B/7B ship it: GPT-2 style vocab.json + merges.txt holding
    Qwen-1's ranks (transformers' own tiktoken converter), the three ChatML specials at 151643-151645, and
    `tokenizer_class: GPT2Tokenizer`; returns it loaded with `AutoTokenizer`, as `vlm.load` loads the real one."""
    from transformers import AutoTokenizer
    from transformers.convert_slow_tokenizer import TikTokenConverter

    vocab, merges = TikTokenConverter().extract_vocab_merges_from_model(str(qwen_ranks_file()))
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    lines = "".join(f"{left} {right}\n" for left, right in merges)
    (directory / "merges.txt").write_text(f"#version: 0.2\n{lines}", encoding="utf-8")
    end = CAUSALLM_SPECIALS[0]
    settings = {
        "tokenizer_class": "GPT2Tokenizer",
        "add_prefix_space": False,
        "errors": "replace",
        "model_max_length": 8192,
        "bos_token": end,
        "eos_token": end,
        "pad_token": end,
        "unk_token": end,
        "clean_up_tokenization_spaces": False,
        "added_tokens_decoder": {
            str(len(vocab) + i): {
                "content": token,
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": True,
            }
            for i, token in enumerate(CAUSALLM_SPECIALS)
        },
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(settings, indent=1))
    return AutoTokenizer.from_pretrained(directory)


@pytest.fixture(scope="session")
def causallm_lm_path(tiny_dir: Path) -> Path:
    """CausalLM's tokenizer directory (real vocabulary) with a 2-layer random Llama of 152,064 rows beside it."""
    path = tiny_dir / "causallm-vocab"
    tokenizer = build_causallm_tokenizer(path)
    assert len(tokenizer) == 151646 and tokenizer.convert_tokens_to_ids("<|im_end|>") == 151645
    save_tiny_llama(path, tokenizer, rows=CAUSALLM_VOCAB_ROWS, kv_heads=2, seed=4)
    return path


@pytest.fixture(scope="session", params=["toy-bpe", "causallm-vocab"])
def text_lm_path(request) -> Path:
    """Each text test runs on the tiny BPE and on CausalLM's real vocabulary."""
    return request.getfixturevalue("tiny_lm_path" if request.param == "toy-bpe" else "causallm_lm_path")


@pytest.fixture(scope="session")
def causallm_adapter(causallm_lm_path: Path, tiny_dir: Path, tiny_clip_path: Path) -> Path:
    return make_adapter(tiny_dir / "adapter-causallm-vocab", causallm_lm_path, tiny_clip_path)


@pytest.fixture(scope="session")
def causallm_model(causallm_adapter: Path):
    import vlm

    return vlm.load(causallm_adapter, device="cpu")


@pytest.fixture(scope="session")
def text_adapter(request, text_lm_path: Path) -> Path:
    """An adapter on each vocabulary, for the text tests that generate or export."""
    return request.getfixturevalue("tiny_adapter" if text_lm_path.name == "lm" else "causallm_adapter")


@pytest.fixture(scope="session")
def text_model(request, text_lm_path: Path):
    """A loaded model on each vocabulary, for the text tests that generate."""
    return request.getfixturevalue("tiny_model" if text_lm_path.name == "lm" else "causallm_model")


@pytest.fixture(scope="session")
def tiny_clip_path(tiny_dir: Path) -> Path:
    """A 3-layer random HF CLIP vision model, 32 px, patch 8 (16 patches), with its image processor."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    path = tiny_dir / "clip"
    torch.manual_seed(1)
    config = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        image_size=32,
        patch_size=8,
        projection_dim=32,
    )
    CLIPVisionModel(config).save_pretrained(path)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_open_clip_path(tiny_dir: Path) -> Path:
    """A random open_clip ViT saved in open_clip's local-dir format."""
    import open_clip
    from safetensors.torch import save_file

    path = tiny_dir / "open_clip"
    path.mkdir()
    model_cfg = {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 32, "layers": 3, "width": 32, "head_width": 8, "patch_size": 8},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 1},
    }
    preprocess_cfg = {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}
    (path / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg}))
    torch.manual_seed(2)
    model = open_clip.CLIP(**model_cfg)
    save_file(model.state_dict(), str(path / "open_clip_model.safetensors"))
    return path


def make_adapter(directory: Path, lm: Path, tower: Path, backend: str = "hf", **overrides) -> Path:
    """Save an adapter dir with a seeded random projector for the given tiny backbones."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import vlm
    from vlm.api import VisionLanguageModel
    from vlm.modeling.towers import build_vision_tower

    config = vlm.AdapterConfig(lm=str(lm), vision_tower=str(tower), vision_backend=backend, **overrides)
    if backend == "open_clip":
        config.vision_tower = f"local-dir:{tower}"
    model = VisionLanguageModel(
        config, build_vision_tower(config), AutoModelForCausalLM.from_pretrained(lm), AutoTokenizer.from_pretrained(lm)
    )
    torch.manual_seed(3)
    for p in model.module.projector.parameters():
        torch.nn.init.normal_(p, std=0.2)
    model.save_adapter(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_adapter(tiny_dir: Path, tiny_lm_path: Path, tiny_clip_path: Path) -> Path:
    return make_adapter(tiny_dir / "adapter", tiny_lm_path, tiny_clip_path)


@pytest.fixture(scope="session")
def tiny_model(tiny_adapter: Path):
    import vlm

    return vlm.load(tiny_adapter, device="cpu")


@pytest.fixture
def rgb_images(tmp_path: Path) -> list[Path]:
    """Three small PNGs of different sizes and colours."""
    rng = np.random.default_rng(0)
    paths = []
    for i, size in enumerate([(32, 32), (48, 24), (20, 40)]):
        pixels = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
        path = tmp_path / f"img{i}.png"
        Image.fromarray(pixels).save(path)
        paths.append(path)
    return paths


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests that use the trained miniature-world adapter are marked `toy` (`-m "not toy"` skips training)."""
    for item in items:
        if "toy_adapter" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.toy)


@pytest.fixture(scope="session")
def toy_adapter(tmp_path_factory) -> Path:
    """The miniature world's trained adapter, trained now as a user would (`vlm-train --recipe toy`).

    The backbones come from the usual toy cache (`VLM_TOY_CACHE`, else ~/.cache/causallm-vlm/toy) and are
    built there if missing. `VLM_TOY_ADAPTER=DIR` skips training and tests that adapter instead.
    """
    if given := os.environ.get("VLM_TOY_ADAPTER"):
        path = Path(given)
        if not (path / "projector.safetensors").is_file():
            pytest.fail(f"VLM_TOY_ADAPTER={given} is not a trained adapter directory (no projector.safetensors)")
        return path
    run_dir = tmp_path_factory.mktemp("toy-run") / "toy"
    script = Path(sys.executable).with_name("vlm-train")
    command = [str(script)] if script.is_file() else [sys.executable, "-m", "projector_training"]
    log = run_dir.parent / "train.log"
    with log.open("w") as out:
        done = subprocess.run([*command, "--recipe", "toy", "--output-dir", str(run_dir)], stdout=out, stderr=out)
    if done.returncode != 0:
        pytest.fail(f"vlm-train --recipe toy failed ({done.returncode}):\n{log.read_text()[-4000:]}")
    return run_dir


@pytest.fixture(scope="session")
def toy_world(toy_adapter: Path):
    """The files of the miniature world the toy adapter was trained on (beside its CLIP in the cache)."""
    import vlm
    from projector_training.toy.world import WorldFiles

    tower = vlm.adapter.read_config(toy_adapter).vision_tower.removeprefix("local-dir:")
    return WorldFiles.at(Path(tower).parent / "world")
