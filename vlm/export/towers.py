"""Vision towers as transformers `CLIPVisionModel`, which both exports write: open_clip towers laid out like
OpenAI's CLIP are converted (`open_clip_to_hf`)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from vlm.config import AdapterConfig
from vlm.errors import ConfigError
from vlm.modeling.towers import HFCLIPTower, OpenCLIPTower, VisionTower

__all__ = ["SUPPORTED_OPEN_CLIP", "check_two_layer_projector", "hf_vision_model", "open_clip_to_hf"]

SUPPORTED_OPEN_CLIP = (
    "open_clip ViT towers laid out like OpenAI's CLIP (VisionTransformer with a class token, ln_pre, "
    "standard residual blocks with nn.MultiheadAttention, no layer scale, QuickGELU or GELU MLPs, "
    "no attentional pooler)"
)


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


def hf_vision_model(tower: VisionTower) -> Any:
    """The tower as a transformers `CLIPVisionModel`: the tower's own for HF towers, converted for open_clip."""
    if isinstance(tower, HFCLIPTower):
        return tower.model
    if isinstance(tower, OpenCLIPTower):
        return open_clip_to_hf(tower.visual)
    raise ConfigError(f"cannot export a {type(tower).__name__}; use an HF CLIP tower or an OpenAI-style open_clip ViT")


def check_two_layer_projector(config: AdapterConfig, target: str) -> None:
    """Raise ConfigError unless the adapter has LLaVA-1.5's projector, the only one `target` can hold."""
    if config.projector_type != "mlp2x_gelu":
        raise ConfigError(
            f"{target} expects LLaVA-1.5's two-layer 'mlp2x_gelu' projector; this adapter has a "
            f"{config.projector_type!r} projector, which it cannot represent"
        )
