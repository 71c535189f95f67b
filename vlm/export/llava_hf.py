"""Export to transformers' LLaVA layout (`LlavaForConditionalGeneration` + `LlavaProcessor`), which vLLM and SGLang
serve: weights, config, the tokenizer with `<image>`, the ChatML chat template, an image processor and a generation
config."""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path
from typing import Any

import torch

from vlm.adapter import atomic_write, check_output_dir, read_config
from vlm.api import VisionLanguageModel, load
from vlm.errors import ConfigError
from vlm.export.towers import check_two_layer_projector, hf_vision_model
from vlm.generation.options import GenerationOptions
from vlm.modeling.loading import resolve_reference
from vlm.modeling.towers import VisionTower

__all__ = ["LOAD_TIME_SETTINGS", "chatml_template", "export_llava_hf", "lm_checkpoint_dtype", "to_llava_hf"]


def lm_checkpoint_dtype(adapter_dir: str | Path) -> str:
    """The dtype the adapter's LM checkpoint is stored in (its config's `dtype`), `float32` when it names none:
    what an export should write, so a bf16 14B is not loaded and saved at twice its size."""
    from transformers import AutoConfig

    config = read_config(adapter_dir)
    try:
        lm_config = AutoConfig.from_pretrained(resolve_reference(config.lm, Path(adapter_dir)))
    except (OSError, ValueError) as e:
        raise ConfigError(f"could not read the config of the LM {config.lm!r}: {e}") from e
    dtype = getattr(lm_config, "dtype", None) or getattr(lm_config, "torch_dtype", None)
    name = str(dtype).removeprefix("torch.") if dtype is not None else "float32"
    return name if name in ("float32", "bfloat16", "float16") else "float32"


LOAD_TIME_SETTINGS = ("local_files_only", "is_local", "cache_dir", "force_download", "token", "revision")
"""Arguments of the `from_pretrained` call that loaded a tokenizer, which `save_pretrained` writes back as if they
were the tokenizer's own: an export made offline would tell every later load to stay offline."""


def _drop_load_time_settings(path: Path) -> None:
    config = json.loads(path.read_text())
    kept = {k: v for k, v in config.items() if k not in LOAD_TIME_SETTINGS}
    if kept != config:
        path.write_text(json.dumps(kept, indent=2, ensure_ascii=False) + "\n")


@torch.no_grad()
def to_llava_hf(model: VisionLanguageModel) -> Any:
    """A `transformers.LlavaForConditionalGeneration` computing the same function as `model`.

    It shares modules with `model` rather than copying them (the LM, and the tower when it is a
    transformers one), so it costs no extra memory; open_clip towers are converted to CLIPVisionModel.
    """
    from transformers import LlavaConfig, LlavaForConditionalGeneration
    from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

    check_two_layer_projector(model.config, "transformers' LlavaForConditionalGeneration")
    vision = hf_vision_model(model.module.vision).to(device=model.device, dtype=model.module.vision_dtype)
    config = LlavaConfig(
        vision_config=vision.config.to_dict(),
        text_config=model.module.lm.config.to_dict(),
        image_token_id=model.config.image_token_id,
        projector_hidden_act="gelu",
        vision_feature_select_strategy="default" if model.config.select_feature == "patch" else "full",
        vision_feature_layer=model.config.select_layer,
        image_seq_length=model.num_image_tokens,
        multimodal_projector_bias=True,
        tie_word_embeddings=model.module.lm.config.tie_word_embeddings,
    )
    with torch.device("meta"):  # skeleton only: every part is replaced below, nothing is allocated twice
        llava = LlavaForConditionalGeneration(config)
    projector = LlavaMultiModalProjector(config)
    projector.linear_1.load_state_dict(model.module.projector[0].state_dict())
    projector.linear_2.load_state_dict(model.module.projector[2].state_dict())
    llava.model.vision_tower = vision
    llava.model.multi_modal_projector = projector.to(device=model.device, dtype=model.module.projector[0].weight.dtype)
    llava.model.language_model = model.module.lm.get_decoder()
    llava.lm_head = model.module.lm.get_output_embeddings()
    left = [name for name, t in [*llava.named_parameters(), *llava.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"LLaVA conversion left tensors unset: {left[:5]}")
    return llava.eval()


def chatml_template(default_system: str, image_token: str = "<image>") -> str:
    """The Jinja chat template that renders exactly what `vlm.processing.chat.render_text` renders.

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
    """The transformers image processor closest to `vlm.processing.image_processor.preprocess_image` for this tower."""
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
            f"vlm preprocessing mode: `{config.image_aspect}`, {model.module.vision.image_size} px, "
            f"mean {list(model.module.vision.mean)}, std {list(model.module.vision.std)}.",
            "",
            note,
            "",
        ]
    )


def export_llava_hf(
    source: str | Path | VisionLanguageModel,
    out: str | Path,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
) -> Path:
    """Write an adapter (a directory, or a loaded model) as a transformers LLaVA directory to `out` (which must not
    exist or be empty). A directory is loaded on `device` in `dtype`, by default the LM checkpoint's own dtype.

    The directory holds safetensors weights (vision tower, projector as `multi_modal_projector.linear_1/2`,
    LM), `config.json`, the tokenizer with `<image>` at the adapter's image token id, the ChatML chat
    template, a `LlavaProcessor` that expands `<image>` to one token per image feature, an image processor
    as close to vlm's preprocessing as transformers allows, `generation_config.json` stopping at
    `<|im_end|>` and `<|endoftext|>`, and a README.md that says how preprocessing differs.
    """
    from transformers import LlavaProcessor

    out = Path(out)
    check_output_dir(out)  # before loading a model of many GB
    if isinstance(source, VisionLanguageModel):
        model = source
    else:
        model = load(source, device=device, dtype=dtype or lm_checkpoint_dtype(source))
    llava = to_llava_hf(model)
    llava.generation_config = _generation_config(model)
    tokenizer = _tokenizer_with_image_token(model)
    processor = LlavaProcessor(
        image_processor=_image_processor(model.module.vision),
        tokenizer=tokenizer,
        patch_size=model.module.vision.patch_size,
        vision_feature_select_strategy=llava.config.vision_feature_select_strategy,
        chat_template=tokenizer.chat_template,
        image_token=model.config.image_token,
        num_additional_image_tokens=1,  # the CLS token, dropped by the "default" strategy
    )
    note = _preprocessing_note(model.module.vision)
    warnings.warn(f"the exported image processor does not match vlm's preprocessing exactly: {note}", stacklevel=2)

    def write(staging: Path) -> None:
        llava.save_pretrained(staging)
        processor.save_pretrained(staging)
        _drop_load_time_settings(staging / "tokenizer_config.json")
        config_path = staging / "config.json"
        config = json.loads(config_path.read_text())
        config["image_token_id"] = config["image_token_index"] = model.config.image_token_id  # both names are read
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        (staging / "README.md").write_text(_llava_readme(model, note))

    return atomic_write(out, write)
