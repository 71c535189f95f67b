"""Conversion to and from other runtimes.

- `export_llava_hf`: a directory that `transformers.LlavaForConditionalGeneration` and `AutoProcessor`
  load (weights, config, tokenizer with `<image>`, ChatML chat template, image processor, generation
  config), so vLLM and SGLang can serve the model.
- `export_gguf_mmproj`: the vision tower and projector as a llama.cpp mmproj GGUF (LLaVA-1.5 layout).
- `import_llava`: an adapter directory from an original LLaVA `mm_projector.bin` / `.safetensors`.
- `to_llava_hf`: the in-memory `LlavaForConditionalGeneration` the llava-hf export writes out.

open_clip towers laid out like OpenAI's CLIP ViT are converted to transformers `CLIPVisionModel`
weights (`open_clip_to_hf`), so both exports work for them too.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from vlm.config import PROJECTOR_NAME, AdapterConfig
from vlm.errors import ConfigError
from vlm.files import make_shareable
from vlm.generation import GenerationOptions
from vlm.model import VisionLanguageModel, resolve_reference
from vlm.projector import load_llava_projector
from vlm.vision import HFCLIPTower, OpenCLIPTower, VisionTower, build_vision_tower

__all__ = [
    "chatml_template",
    "export_gguf_mmproj",
    "export_llava_hf",
    "import_llava",
    "open_clip_to_hf",
    "to_llava_hf",
]

LLAMA_CPP_PAD_COLOUR = (122, 116, 104)  # llama.cpp's fixed pad colour for LLaVA-1.5 mmprojs (clip.cpp)
SUPPORTED_OPEN_CLIP = (
    "open_clip ViT towers laid out like OpenAI's CLIP (VisionTransformer with a class token, ln_pre, "
    "standard residual blocks with nn.MultiheadAttention, no layer scale, QuickGELU or GELU MLPs, "
    "no attentional pooler)"
)


# --------------------------------------------------------------------------------------------------
# Vision towers as transformers CLIPVisionModel


def _open_clip_act(act: nn.Module) -> str:
    """The transformers `hidden_act` name of an open_clip block's MLP activation."""
    from open_clip.transformer import QuickGELU

    if isinstance(act, QuickGELU):
        return "quick_gelu"
    if type(act) is nn.GELU:
        return "gelu" if act.approximate == "none" else "gelu_pytorch_tanh"
    raise ConfigError(f"the open_clip tower uses a {type(act).__name__} activation; supported: {SUPPORTED_OPEN_CLIP}")


def _check_open_clip(visual: nn.Module) -> tuple[str, float]:
    """Raise ConfigError unless `visual` maps exactly onto CLIPVisionModel; return (hidden_act, layer-norm eps)."""
    from open_clip.transformer import ResidualAttentionBlock, VisionTransformer

    def unsupported(what: str) -> ConfigError:
        return ConfigError(
            f"cannot convert this open_clip tower to CLIPVisionModel: {what}; supported: {SUPPORTED_OPEN_CLIP}"
        )

    if not isinstance(visual, VisionTransformer):
        raise unsupported(f"it is a {type(visual).__name__}")
    if visual.attn_pool is not None:
        raise unsupported("it has an attentional pooler")
    if not isinstance(visual.ln_pre, nn.LayerNorm):
        raise unsupported("it has no ln_pre")
    if visual.image_size[0] != visual.image_size[1] or visual.patch_size[0] != visual.patch_size[1]:
        raise unsupported("its images or patches are not square")
    blocks = list(visual.transformer.resblocks)
    acts = set()
    for block in blocks:
        if type(block) is not ResidualAttentionBlock or hasattr(block, "ln_1_kv"):
            raise unsupported(f"it has {type(block).__name__} blocks")
        if not (isinstance(block.ls_1, nn.Identity) and isinstance(block.ls_2, nn.Identity)):
            raise unsupported("its blocks use layer scale")
        if block.attn.in_proj_weight is None or block.attn.in_proj_bias is None:
            raise unsupported("its attention has separate or bias-free q/k/v projections")
        acts.add(_open_clip_act(block.mlp.gelu))
    norms = [visual.ln_pre, visual.ln_post, *(n for b in blocks for n in (b.ln_1, b.ln_2))]
    eps = {n.eps for n in norms if isinstance(n, nn.LayerNorm)}
    if len(acts) != 1 or len(eps) != 1 or not all(isinstance(n, nn.LayerNorm) for n in norms):
        raise unsupported("its blocks mix activations or normalisations")
    return acts.pop(), eps.pop()


@torch.no_grad()
def open_clip_to_hf(visual: nn.Module) -> Any:
    """The open_clip `VisionTransformer` `visual` as a transformers `CLIPVisionModel` (fp32, CPU) whose
    hidden states equal open_clip's block outputs.

    In-projections are split into q/k/v; conv1 -> patch embedding; ln_pre -> pre_layrnorm; ln_post ->
    post_layernorm. The pooling head and `proj` are not carried over: LLaVA reads hidden states only.
    Raises ConfigError for towers with no CLIPVisionModel equivalent.
    """
    from transformers import CLIPVisionConfig, CLIPVisionModel

    hidden_act, eps = _check_open_clip(visual)
    blocks = list(visual.transformer.resblocks)
    width = visual.transformer.width
    config = CLIPVisionConfig(
        hidden_size=width,
        intermediate_size=blocks[0].mlp.c_fc.out_features,
        num_hidden_layers=len(blocks),
        num_attention_heads=blocks[0].attn.num_heads,
        image_size=int(visual.image_size[0]),
        patch_size=int(visual.patch_size[0]),
        hidden_act=hidden_act,
        layer_norm_eps=eps,
        projection_dim=visual.output_dim,
    )
    hf = CLIPVisionModel(config).eval()
    core = getattr(hf, "vision_model", hf)  # transformers 4.x wraps the transformer in `vision_model`
    core.embeddings.class_embedding.copy_(visual.class_embedding)
    core.embeddings.patch_embedding.weight.copy_(visual.conv1.weight)
    core.embeddings.position_embedding.weight.copy_(visual.positional_embedding)
    core.pre_layrnorm.load_state_dict(visual.ln_pre.state_dict())
    core.post_layernorm.load_state_dict(visual.ln_post.state_dict())
    for block, layer in zip(blocks, core.encoder.layers, strict=True):
        attention = layer.self_attn
        for proj, weight, bias in zip(
            (attention.q_proj, attention.k_proj, attention.v_proj),
            block.attn.in_proj_weight.chunk(3),  # (3D, D) -> 3 x (D, D), in q, k, v order
            block.attn.in_proj_bias.chunk(3),
            strict=True,
        ):
            proj.weight.copy_(weight)
            proj.bias.copy_(bias)
        attention.out_proj.load_state_dict(block.attn.out_proj.state_dict())
        layer.layer_norm1.load_state_dict(block.ln_1.state_dict())
        layer.layer_norm2.load_state_dict(block.ln_2.state_dict())
        layer.mlp.fc1.load_state_dict(block.mlp.c_fc.state_dict())
        layer.mlp.fc2.load_state_dict(block.mlp.c_proj.state_dict())
    return hf.float()


def _hf_vision_model(tower: VisionTower) -> Any:
    """The tower as a transformers `CLIPVisionModel`: the tower's own for HF towers, converted for open_clip."""
    if isinstance(tower, HFCLIPTower):
        return tower.model
    if isinstance(tower, OpenCLIPTower):
        return open_clip_to_hf(tower.visual)
    raise ConfigError(f"cannot export a {type(tower).__name__}; use an HF CLIP tower or an OpenAI-style open_clip ViT")


def _check_two_layer_projector(config: AdapterConfig, target: str) -> None:
    """Raise ConfigError unless the adapter has LLaVA-1.5's projector, the only one `target` can hold."""
    if config.projector_type != "mlp2x_gelu":
        raise ConfigError(
            f"{target} expects LLaVA-1.5's two-layer 'mlp2x_gelu' projector; this adapter has a "
            f"{config.projector_type!r} projector, which it cannot represent"
        )


# --------------------------------------------------------------------------------------------------
# transformers LLaVA


def lm_checkpoint_dtype(adapter_dir: str | Path) -> str:
    """The dtype the adapter's LM checkpoint is stored in (its config's `dtype`), `float32` when it names none:
    what an export should write, so a bf16 14B is not loaded and saved at twice its size."""
    from transformers import AutoConfig

    config = AdapterConfig.load(adapter_dir)
    try:
        lm_config = AutoConfig.from_pretrained(resolve_reference(config.lm, Path(adapter_dir)))
    except (OSError, ValueError) as e:
        raise ConfigError(f"could not read the config of the LM {config.lm!r}: {e}") from e
    dtype = getattr(lm_config, "dtype", None) or getattr(lm_config, "torch_dtype", None)
    name = str(dtype).removeprefix("torch.") if dtype is not None else "float32"
    return name if name in ("float32", "bfloat16", "float16") else "float32"


def check_output_dir(out: Path) -> None:
    """Refuse to write over anything: an existing adapter, model or file at `out` is somebody's work."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"{out} already exists and is not an empty directory; choose a new output path")


LOAD_TIME_SETTINGS = ("local_files_only", "is_local", "cache_dir", "force_download", "token", "revision")
"""Arguments of the `from_pretrained` call that loaded a tokenizer, which `save_pretrained` writes back as if they
were the tokenizer's own: an export made offline would tell every later load to stay offline."""


def _drop_load_time_settings(path: Path) -> None:
    config = json.loads(path.read_text())
    kept = {k: v for k, v in config.items() if k not in LOAD_TIME_SETTINGS}
    if kept != config:
        path.write_text(json.dumps(kept, indent=2, ensure_ascii=False) + "\n")


def _publish(staging: Path, out: Path) -> None:
    """Move a completely written `staging` directory to `out` (absent, or empty as `check_output_dir` checked)."""
    make_shareable(staging)
    if out.exists():
        out.rmdir()
    staging.rename(out)


@torch.no_grad()
def to_llava_hf(model: VisionLanguageModel) -> Any:
    """A `transformers.LlavaForConditionalGeneration` computing the same function as `model`.

    It shares modules with `model` rather than copying them (the LM, and the tower when it is a
    transformers one), so it costs no extra memory; open_clip towers are converted to CLIPVisionModel.
    """
    from transformers import LlavaConfig, LlavaForConditionalGeneration
    from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

    _check_two_layer_projector(model.config, "transformers' LlavaForConditionalGeneration")
    vision = _hf_vision_model(model.vision).to(device=model.device, dtype=model.vision_dtype)
    config = LlavaConfig(
        vision_config=vision.config.to_dict(),
        text_config=model.lm.config.to_dict(),
        image_token_id=model.config.image_token_id,
        projector_hidden_act="gelu",
        vision_feature_select_strategy="default" if model.config.select_feature == "patch" else "full",
        vision_feature_layer=model.config.select_layer,
        image_seq_length=model.num_image_tokens,
        multimodal_projector_bias=True,
        tie_word_embeddings=model.lm.config.tie_word_embeddings,
    )
    with torch.device("meta"):  # skeleton only: every part is replaced below, nothing is allocated twice
        llava = LlavaForConditionalGeneration(config)
    projector = LlavaMultiModalProjector(config)
    projector.linear_1.load_state_dict(model.projector[0].state_dict())
    projector.linear_2.load_state_dict(model.projector[2].state_dict())
    llava.model.vision_tower = vision
    llava.model.multi_modal_projector = projector.to(device=model.device, dtype=model.projector[0].weight.dtype)
    llava.model.language_model = model.lm.get_decoder()
    llava.lm_head = model.lm.get_output_embeddings()
    left = [name for name, t in [*llava.named_parameters(), *llava.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"LLaVA conversion left tensors unset: {left[:5]}")
    return llava.eval()


def chatml_template(default_system: str, image_token: str = "<image>") -> str:
    """The Jinja chat template that renders exactly what `vlm.prompt.render_text` renders.

    A first system message with non-blank text is used, otherwise `default_system`; in a turn with images,
    each becomes `image_token` + newline, all ahead of the turn's text, which is stripped; other text is
    copied as it is; `add_generation_prompt` opens the assistant turn.
    """
    system_literal = json.dumps(default_system, ensure_ascii=False)
    image_literal = json.dumps(image_token + "\n", ensure_ascii=False)
    # Every tag trims the whitespace around it, so the layout below never reaches the output.
    return f"""\
{{%- macro render(content) -%}}
    {{%- if content is string -%}}
        {{{{- content -}}}}
    {{%- elif content is not none -%}}
        {{%- for part in content -%}}
            {{%- if part is string -%}}
                {{{{- part -}}}}
            {{%- elif part['type'] == 'image' -%}}
                {{{{- {image_literal} -}}}}
            {{%- elif part['type'] == 'text' -%}}
                {{{{- part['text'] -}}}}
            {{%- endif -%}}
        {{%- endfor -%}}
    {{%- endif -%}}
{{%- endmacro -%}}
{{%- set system = render(messages[0]['content']) if messages and messages[0]['role'] == 'system' else '' -%}}
{{%- if system | trim == '' -%}}
    {{%- set system = {system_literal} -%}}
{{%- endif -%}}
{{{{- '<|im_start|>system\\n' + system + '<|im_end|>\\n' -}}}}
{{%- for message in messages -%}}
    {{%- if message['role'] == 'system' -%}}
        {{%- if not loop.first -%}}
            {{{{- raise_exception('a system message may only come first') -}}}}
        {{%- endif -%}}
    {{%- else -%}}
        {{{{- '<|im_start|>' + message['role'] + '\\n' -}}}}
        {{%- if message['content'] is string -%}}
            {{{{- message['content'] -}}}}
        {{%- elif message['content'] is not none -%}}
            {{#- a loop over message['content'] itself, which servers read as "takes a list of parts" -#}}
            {{%- set parts = namespace(images='', text='') -%}}
            {{%- for part in message['content'] -%}}
                {{%- if part is not string and part['type'] == 'image' -%}}
                    {{%- set parts.images = parts.images + {image_literal} -%}}
                {{%- else -%}}
                    {{%- set parts.text = parts.text + render([part]) -%}}
                {{%- endif -%}}
            {{%- endfor -%}}
            {{#- the images first and the text stripped, as LLaVA-1.5 was trained -#}}
            {{{{- parts.images + (parts.text | trim if parts.images else parts.text) -}}}}
        {{%- endif -%}}
        {{{{- '<|im_end|>\\n' -}}}}
    {{%- endif -%}}
{{%- endfor -%}}
{{%- if add_generation_prompt -%}}
    {{{{- '<|im_start|>assistant\\n' -}}}}
{{%- endif -%}}
"""


def _tokenizer_with_image_token(model: VisionLanguageModel) -> Any:
    """A copy of the model's tokenizer with the image token added as a special token at `image_token_id`."""
    from tokenizers import AddedToken

    tokenizer = copy.deepcopy(model.tokenizer)
    token, token_id = model.config.image_token, model.config.image_token_id
    if token not in tokenizer.get_vocab():
        if token_id != len(tokenizer):
            raise ConfigError(
                f"the exported tokenizer needs {token} at id {token_id}, but a new token gets id {len(tokenizer)}; "
                f"set image_token_id to {len(tokenizer)} (the first id past the tokenizer)"
            )
        tokenizer.add_tokens([AddedToken(token, special=True, normalized=False)], special_tokens=True)
    if tokenizer.convert_tokens_to_ids(token) != token_id:
        raise ConfigError(
            f"the tokenizer already has {token} at id {tokenizer.convert_tokens_to_ids(token)}, "
            f"not at the adapter's image_token_id {token_id}"
        )
    tokenizer.chat_template = chatml_template(model.config.system_prompt, token)
    return tokenizer


def _image_processor(tower: VisionTower) -> Any:
    """The transformers image processor closest to `vlm.vision.preprocess_image` for this tower."""
    from transformers import LlavaImageProcessor

    square = {"height": tower.image_size, "width": tower.image_size}
    common = {
        "image_mean": list(tower.mean),
        "image_std": list(tower.std),
        "resample": 3,  # PIL bicubic
        "crop_size": square,  # vLLM sizes the placeholder from crop_size
        "do_convert_rgb": True,
    }
    if tower.aspect == "crop":
        return LlavaImageProcessor(size={"shortest_edge": tower.image_size}, do_center_crop=True, **common)
    return LlavaImageProcessor(size=square, do_center_crop=False, do_pad=tower.aspect == "pad", **common)


def _preprocessing_note(tower: VisionTower) -> str:
    """How the exported processor's preprocessing differs from vlm's."""
    size = tower.image_size
    return (
        f"Images of exactly {size}x{size} pixels are preprocessed identically (the pad colour and crop "
        "arithmetic match too). transformers resizes other images with its torchvision backend (antialiased "
        "bicubic) where vlm uses PIL's bicubic; the two differ by at most a grey level or two at some pixels."
    )


def _generation_config(model: VisionLanguageModel) -> Any:
    from transformers import GenerationConfig

    return GenerationConfig(
        bos_token_id=model.tokenizer.bos_token_id,
        eos_token_id=list(model.stop_ids),
        pad_token_id=model.pad_id,
        # The image slot and embedding rows with no token behind them are never generated (as in vlm).
        suppress_tokens=list(model.suppress_ids),
        do_sample=False,
        max_new_tokens=GenerationOptions.max_new_tokens,  # vlm's default, not transformers' 20
    )


def _llava_readme(model: VisionLanguageModel, note: str) -> str:
    config = model.config
    tokens = model.tokenizer.convert_ids_to_tokens(list(model.stop_ids))
    return "\n".join(
        [
            "# LLaVA export of a vlm adapter",
            "",
            f"Language model: `{config.lm}`. Vision tower: `{config.vision_tower}` ({config.vision_backend}).",
            f"Projector: {config.projector_type}, {config.vision_hidden_size}-d -> {config.lm_hidden_size}-d.",
            "",
            "Load it with transformers (no remote code):",
            "",
            "```python",
            "from transformers import AutoProcessor, LlavaForConditionalGeneration",
            "model = LlavaForConditionalGeneration.from_pretrained(path)",
            "processor = AutoProcessor.from_pretrained(path)",
            'messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe it."}]}]',
            "prompt = processor.apply_chat_template(messages, add_generation_prompt=True)",
            'inputs = processor(images=image, text=prompt, return_tensors="pt")',
            "ids = model.generate(**inputs, max_new_tokens=128)",
            "```",
            "",
            "or serve it with `vllm serve PATH` / SGLang.",
            "",
            "## Prompt format",
            "",
            "ChatML. The system prompt is never empty: when it is missing or blank the template uses",
            f"{json.dumps(config.system_prompt)}. Each image is written as `{config.image_token}` followed by a",
            f"newline, and the processor expands it to {model.num_image_tokens} copies of token id",
            f"{config.image_token_id}. Generation stops at {', '.join(f'`{t}`' for t in tokens)}.",
            "Unlike vlm, text a user types that looks like a special token (`<image>`, `<|im_end|>`) is parsed",
            "as that token by the transformers tokenizer.",
            "",
            "## Image preprocessing",
            "",
            f"vlm preprocessing mode: `{config.image_aspect}`, {model.vision.image_size} px, "
            f"mean {list(model.vision.mean)}, std {list(model.vision.std)}.",
            "",
            note,
            "",
        ]
    )


def export_llava_hf(model: VisionLanguageModel, out: str | Path) -> Path:
    """Write `model` as a transformers LLaVA directory to `out` (which must not exist or be empty).

    The directory holds safetensors weights (vision tower, projector as `multi_modal_projector.linear_1/2`,
    LM), `config.json`, the tokenizer with `<image>` at the adapter's image token id, the ChatML chat
    template, a `LlavaProcessor` that expands `<image>` to one token per image feature, an image processor
    as close to vlm's preprocessing as transformers allows, `generation_config.json` stopping at
    `<|im_end|>` and `<|endoftext|>`, and a README.md that says how preprocessing differs.
    """
    from transformers import LlavaProcessor

    out = Path(out)
    check_output_dir(out)
    llava = to_llava_hf(model)
    llava.generation_config = _generation_config(model)
    tokenizer = _tokenizer_with_image_token(model)
    processor = LlavaProcessor(
        image_processor=_image_processor(model.vision),
        tokenizer=tokenizer,
        patch_size=model.vision.patch_size,
        vision_feature_select_strategy=llava.config.vision_feature_select_strategy,
        chat_template=tokenizer.chat_template,
        image_token=model.config.image_token,
        num_additional_image_tokens=1,  # the CLS token, dropped by the "default" strategy
    )
    note = _preprocessing_note(model.vision)
    warnings.warn(f"the exported image processor does not match vlm's preprocessing exactly: {note}", stacklevel=2)
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    llava.save_pretrained(staging)
    processor.save_pretrained(staging)
    _drop_load_time_settings(staging / "tokenizer_config.json")
    config_path = staging / "config.json"
    config = json.loads(config_path.read_text())
    config["image_token_id"] = config["image_token_index"] = model.config.image_token_id  # both names are read
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    (staging / "README.md").write_text(_llava_readme(model, note))
    _publish(staging, out)
    return out


# --------------------------------------------------------------------------------------------------
# llama.cpp mmproj GGUF

FEATURE_LAYER_KEY = "clip.vision.feature_layer"
"""llama.cpp's key for the hidden-state indices fed to the projector (not among gguf-py's constants)."""

_GGUF_TENSOR_NAMES: tuple[tuple[str, str], ...] = (
    (r"embeddings\.class_embedding", "v.class_embd"),
    (r"embeddings\.patch_embedding\.weight", "v.patch_embd.weight"),
    (r"embeddings\.position_embedding\.weight", "v.position_embd.weight"),
    (r"pre_layrnorm\.(weight|bias)", r"v.pre_ln.\1"),
    (r"encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)", r"v.blk.\1.attn_\2.\3"),
    (r"encoder\.layers\.(\d+)\.self_attn\.out_proj\.(weight|bias)", r"v.blk.\1.attn_out.\2"),
    (r"encoder\.layers\.(\d+)\.layer_norm1\.(weight|bias)", r"v.blk.\1.ln1.\2"),
    (r"encoder\.layers\.(\d+)\.layer_norm2\.(weight|bias)", r"v.blk.\1.ln2.\2"),
    # The LLaVA-1.5 mmproj layout llama.cpp's loader is written against stores fc1 as ffn_down and fc2
    # as ffn_up; clip.cpp recognises it from the shapes and swaps them back. (The opposite, modern
    # naming is mis-swapped by that check when the MLP is as wide as the model.)
    (r"encoder\.layers\.(\d+)\.mlp\.fc1\.(weight|bias)", r"v.blk.\1.ffn_down.\2"),
    (r"encoder\.layers\.(\d+)\.mlp\.fc2\.(weight|bias)", r"v.blk.\1.ffn_up.\2"),
)
_GGUF_SKIPPED = re.compile(r"post_layernorm\..*|embeddings\.position_ids")
"""Not in a LLaVA mmproj: llama.cpp would apply post_layernorm to the features; position ids are implicit."""


def _gguf_vision_tensors(state: Mapping[str, torch.Tensor], num_blocks: int) -> Iterator[tuple[str, torch.Tensor]]:
    """(GGUF name, tensor) for the embeddings, ln_pre and the first `num_blocks` blocks of a CLIPVisionModel."""
    for key, tensor in state.items():
        key = key.removeprefix("vision_model.")
        if _GGUF_SKIPPED.fullmatch(key):
            continue
        for pattern, name in _GGUF_TENSOR_NAMES:
            match = re.fullmatch(pattern, key)
            if match:
                if key.startswith("encoder.layers.") and int(match.group(1)) >= num_blocks:
                    break  # blocks past the feature layer never run
                yield match.expand(name), tensor
                break
        else:
            raise ConfigError(f"unexpected CLIP vision weight {key!r}: cannot map it to llama.cpp's names")


def _use_gelu(hidden_act: str) -> bool:
    """llama.cpp's `clip.use_gelu`: true runs GELU (tanh approximation), false runs QuickGELU."""
    if hidden_act == "quick_gelu":
        return False
    if hidden_act in ("gelu", "gelu_new", "gelu_pytorch_tanh"):
        return True
    raise ConfigError(f"llama.cpp's CLIP runs GELU or QuickGELU MLPs; this tower uses {hidden_act!r}")


def export_gguf_mmproj(adapter_dir: str | Path, out_path: str | Path, *, ftype: Literal["f16", "f32"] = "f16") -> Path:
    """Write the adapter's vision tower and projector as a llama.cpp mmproj GGUF (LLaVA-1.5 `mlp` projector).

    Only the blocks up to the selected feature layer are stored, and `clip.vision.feature_layer` names
    that layer explicitly, so llama.cpp computes exactly the hidden state the projector was trained on.
    `ftype="f16"` stores matrices in float16 (llama.cpp's usual mmproj), `"f32"` keeps everything float32.
    The LM is not loaded. Raises ConfigError for adapters llama.cpp cannot run (CLS features, projectors
    other than mlp2x_gelu, towers with no CLIP equivalent).
    """
    from safetensors.torch import load_file

    adapter_dir, out_path = Path(adapter_dir), Path(out_path)
    if ftype not in ("f16", "f32"):
        raise ConfigError(f"ftype must be 'f16' or 'f32', got {ftype!r}")
    if out_path.exists():  # a GGUF of the LM, an earlier mmproj: never written over
        raise ConfigError(f"{out_path} already exists; choose a new file name or remove it first")
    config = AdapterConfig.load(adapter_dir)
    _check_two_layer_projector(config, "llama.cpp's LLaVA mmproj")
    if config.select_feature != "patch":
        raise ConfigError("llama.cpp's LLaVA projector reads patch tokens only; cls_patch adapters cannot be exported")
    projector_file = adapter_dir / PROJECTOR_NAME
    if not projector_file.is_file():
        raise ConfigError(f"{adapter_dir} has no {PROJECTOR_NAME}; was the training run finished?")
    projector = load_file(str(projector_file))
    tower = build_vision_tower(config, resolve_reference(config.vision_tower, adapter_dir))
    vision = _hf_vision_model(tower)
    feature_layer = config.select_layer % (vision.config.num_hidden_layers + 1)  # hidden-state index, 0 = embeddings
    for warning in _llama_cpp_preprocessing(tower):
        warnings.warn(warning, stacklevel=2)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    staging = out_path.with_name(out_path.name + ".partial")
    try:
        _write_mmproj(staging, config, tower, vision, projector, feature_layer, ftype)
    except BaseException:
        staging.unlink(missing_ok=True)
        raise
    make_shareable(staging)
    staging.replace(out_path)
    return out_path


def _llama_cpp_preprocessing(tower: VisionTower) -> list[str]:
    """How llama.cpp's preprocessing of LLaVA-1.5 mmprojs will differ from vlm's for this tower: it pads to a
    square with a fixed colour (OpenAI CLIP's mean), whatever the GGUF's image mean says (checked with the
    llama.cpp in llama-cpp-python 0.3.36)."""
    notes = []
    if tower.aspect != "pad":
        notes.append(
            f"this adapter's images are {tower.aspect!r}-ed to a square, but llama.cpp pads them: non-square images "
            "will be seen differently than in training"
        )
    pad = tuple(int(m * 255) for m in tower.mean)
    if tower.aspect == "pad" and pad != LLAMA_CPP_PAD_COLOUR:
        notes.append(
            f"vlm pads non-square images with the tower's mean colour {pad}, but llama.cpp pads with "
            f"{LLAMA_CPP_PAD_COLOUR}: square images are unaffected, others get a different border"
        )
    return notes


def _write_mmproj(
    path: Path,
    config: AdapterConfig,
    tower: VisionTower,
    vision: Any,
    projector: Mapping[str, torch.Tensor],
    feature_layer: int,
    ftype: str,
) -> None:
    import gguf

    writer = gguf.GGUFWriter(str(path), arch="clip")
    vc = vision.config
    lm_hidden = projector["2.weight"].shape[0]

    def array(name: str, tensor: torch.Tensor) -> Any:
        half = ftype == "f16" and tensor.ndim >= 2 and name.endswith(".weight")
        return tensor.detach().to("cpu", torch.float16 if half else torch.float32).contiguous().numpy()

    writer.add_type(gguf.GGUFType.MMPROJ)
    writer.add_name(Path(config.vision_tower.removeprefix("local-dir:")).name or "vlm-adapter")
    writer.add_description(f"image encoder for LLaVA: {config.vision_tower} + vlm {config.projector_type} projector")
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if ftype == "f16" else gguf.LlamaFileType.ALL_F32)
    writer.add_bool("clip.has_text_encoder", False)
    writer.add_clip_has_vision_encoder(True)
    writer.add_bool(gguf.Keys.Clip.HAS_LLAVA_PROJECTOR, True)
    writer.add_clip_projector_type("mlp")
    writer.add_vision_image_size(vc.image_size)
    writer.add_vision_patch_size(vc.patch_size)
    writer.add_vision_embedding_length(vc.hidden_size)
    writer.add_vision_feed_forward_length(vc.intermediate_size)
    writer.add_vision_projection_dim(lm_hidden)
    writer.add_vision_head_count(vc.num_attention_heads)
    writer.add_vision_attention_layernorm_eps(vc.layer_norm_eps)
    writer.add_vision_block_count(feature_layer)
    writer.add_array(FEATURE_LAYER_KEY, [feature_layer])
    writer.add_vision_image_mean(list(tower.mean))
    writer.add_vision_image_std(list(tower.std))
    writer.add_vision_use_gelu(_use_gelu(vc.hidden_act))
    for name, tensor in _gguf_vision_tensors(vision.state_dict(), feature_layer):
        writer.add_tensor(name, array(name, tensor))
    for key in ("0.weight", "0.bias", "2.weight", "2.bias"):
        writer.add_tensor(f"mm.{key}", array(f"mm.{key}", projector[key]))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


# --------------------------------------------------------------------------------------------------
# Import from original LLaVA


def _projector_type(state: Mapping[str, torch.Tensor], source: Path) -> str:
    """`linear` or `mlpNx_gelu` from the layer indices of LLaVA projector weights (0, 2, 4, ...)."""
    indices = sorted({int(key.split(".")[0]) for key in state})
    depth = len(indices)
    complete = all(f"{i}.{kind}" in state for i in indices for kind in ("weight", "bias"))
    if indices != list(range(0, 2 * depth, 2)) or not complete:
        raise ConfigError(
            f"{source}: projector layers {indices} are not LLaVA's linear layers 0, 2, 4, ... (with GELU between)"
        )
    return "linear" if depth == 1 else f"mlp{depth}x_gelu"


def _vision_width(vision_tower: str, vision_backend: str, vision_pretrained: str | None) -> int:
    """Feature width of the named tower, read from its config (HF) or the built tower (open_clip)."""
    if vision_backend == "hf":
        from transformers import CLIPVisionConfig

        try:
            return CLIPVisionConfig.from_pretrained(vision_tower).hidden_size
        except OSError as e:
            raise ConfigError(f"could not read the CLIP vision config of {vision_tower!r}: {e}") from e
    return OpenCLIPTower(vision_tower, vision_pretrained).hidden_size


def _reference(name: str) -> str:
    """An existing local path becomes absolute (the adapter may be moved), after open_clip's `local-dir:`
    prefix too; hub ids, `hf-hub:` names and pretrained tags are kept as they are."""
    prefix = "local-dir:" if name.startswith("local-dir:") else ""
    path = Path(name.removeprefix(prefix))
    return prefix + str(path.resolve()) if path.exists() else name


def import_llava(
    projector_path: str | Path,
    *,
    vision_tower: str,
    lm: str,
    out: str | Path,
    vision_backend: Literal["hf", "open_clip"] = "hf",
    vision_pretrained: str | None = None,
) -> Path:
    """Make an adapter directory from an original LLaVA `mm_projector.bin` / `.safetensors`.

    The projector type (`linear` or `mlpNx_gelu`) is inferred from the weight keys and its shapes are
    checked against the named backbones' configs; LLaVA-1.5's settings are used for the rest (layer -2,
    patch features, pad-to-square). `vision_pretrained` is open_clip's pretrained tag or checkpoint for a
    plain model name such as `ViT-L-14-336`. Returns `out`, which `vlm.load` accepts.
    """
    from safetensors.torch import save_file
    from transformers import AutoConfig

    projector_path, out = Path(projector_path), Path(out)
    check_output_dir(out)
    if vision_backend == "hf" and vision_tower.startswith(("local-dir:", "hf-hub:")):
        raise ConfigError(f"{vision_tower!r} is an open_clip name: add --vision-backend open_clip")
    local = [("LM", lm)] + ([("vision tower", vision_tower)] if vision_backend == "hf" else [])
    for what, name in local:  # a path, not a hub id: the hub's "Repo id must be in the form..." would mislead
        if name.startswith(("/", "./", "../", "~")) and not Path(name).expanduser().exists():
            raise ConfigError(f"the {what} {name!r} is not there: no such directory")
    state = load_llava_projector(projector_path)
    projector_type = _projector_type(state, projector_path)
    lm_dim, vision_dim = state["0.weight"].shape
    for key, tensor in state.items():
        expected = (lm_dim,) if key.endswith("bias") else (lm_dim, vision_dim if key == "0.weight" else lm_dim)
        if tuple(tensor.shape) != expected:
            raise ConfigError(f"{projector_path}: weight {key} has shape {tuple(tensor.shape)}, expected {expected}")
    width = _vision_width(vision_tower, vision_backend, vision_pretrained)
    if width != vision_dim:
        raise ConfigError(
            f"the projector expects {vision_dim}-d vision features but {vision_tower!r} gives {width}-d; "
            "use the vision tower the projector was trained with"
        )
    try:
        lm_config = AutoConfig.from_pretrained(lm)
    except (OSError, ValueError) as e:
        raise ConfigError(f"could not read the config of the LM {lm!r}: {e}") from e
    lm_hidden = getattr(lm_config, "hidden_size", None)
    if lm_hidden is None or lm_config.get_text_config() is not lm_config:
        raise ConfigError(
            f"{lm!r} is a {type(lm_config).__name__}, not a plain causal LM; give the language model itself "
            "(a LlamaForCausalLM checkpoint such as CausalLM/14B)"
        )
    if lm_hidden != lm_dim:
        raise ConfigError(
            f"the projector outputs {lm_dim}-d embeddings but {lm!r} has {lm_hidden}-d hidden states; "
            "use the LM the projector was trained for"
        )
    config = AdapterConfig(
        lm=_reference(lm),
        # an open_clip name is a path only after `local-dir:`
        vision_tower=_reference(vision_tower) if vision_backend == "hf" or ":" in vision_tower else vision_tower,
        vision_backend=vision_backend,
        vision_pretrained=None if vision_pretrained is None else _reference(vision_pretrained),
        projector_type=projector_type,
        vision_hidden_size=vision_dim,
        lm_hidden_size=lm_dim,
        extra={"imported_from": str(projector_path.resolve())},
    )
    staging = out.with_name(out.name + ".partial")  # written whole, then renamed: never half an adapter at `out`
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    weights = {key: tensor.to(torch.float32).contiguous() for key, tensor in state.items()}
    save_file(weights, str(staging / PROJECTOR_NAME), metadata={"format": "pt"})
    config.save(staging)
    _publish(staging, out)
    return out
