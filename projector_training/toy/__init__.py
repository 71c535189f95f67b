"""The offline miniature world: synthetic shape images, and a tiny CLIP, a tiny ChatML LM and its draft that
know them (shipped pretrained, or trained here).

`ensure_toy_world(root)` builds (or reuses) everything the `toy` recipe needs, without a network.
"""

from typing import Any

__all__ = ["ToyConfig", "ToyWorld", "ensure_toy_world"]


def __getattr__(name: str) -> Any:
    # Lazy, so that `projector_training.toy.tokenizer` imports without open_clip (GPU benchmark images).
    if name in __all__:
        from projector_training.toy import backbones

        return getattr(backbones, name)
    raise AttributeError(name)
