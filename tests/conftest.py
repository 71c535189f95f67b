"""Shared fixtures: tiny random backbones (HF CLIP, open_clip, Llama) and a tiny ChatML tokenizer.

Everything is built and saved under a session temp dir; nothing touches the network.
"""

from __future__ import annotations

import json
import os
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
    from transformers import LlamaConfig, LlamaForCausalLM

    path = tiny_dir / "lm"
    tokenizer = build_test_tokenizer(path)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer) + 4,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
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
    return path


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
    from vlm.model import VisionLanguageModel
    from vlm.vision import build_vision_tower

    config = vlm.AdapterConfig(lm=str(lm), vision_tower=str(tower), vision_backend=backend, **overrides)
    if backend == "open_clip":
        config.vision_tower = f"local-dir:{tower}"
    model = VisionLanguageModel(
        config, build_vision_tower(config), AutoModelForCausalLM.from_pretrained(lm), AutoTokenizer.from_pretrained(lm)
    )
    torch.manual_seed(3)
    for p in model.projector.parameters():
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
