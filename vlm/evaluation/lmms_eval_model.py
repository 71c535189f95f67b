"""An lmms-eval model that runs an adapter: `lmms-eval --model causallm_vlm --model_args pretrained=runs/toy ...`.

lmms-eval finds it through the `lmms_eval.models` entry point (pyproject.toml -> `vlm.evaluation.lmms_plugin`), so
its own source stays as it is. It is a chat model (`is_simple = False`): each request's `doc_to_messages` gives
the conversation (images and any earlier turns), which is answered through `chat_batch`, in batches of requests
that share their generation settings, longest prompt first. `loglikelihood` scores a continuation as the
assistant's answer to the context (for multiple-choice tasks).

Importable without lmms-eval (the class then refuses to be made), so `vlm` does not depend on it: install it with
`pip install -e ".[eval]"`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from PIL import ImageFile

from vlm.errors import VLMError

try:
    from lmms_eval.api.model import lmms as _LMMBase
except ImportError:  # lmms-eval is an optional extra
    _LMMBase = object

__all__ = ["CausalLMVLM", "strict_images", "to_messages"]

LMMS_EVAL_MISSING = 'the lmms-eval plugin needs lmms-eval: pip install -e ".[eval]"'


def strict_images() -> None:
    """Pillow's default again: lmms-eval's task module sets `ImageFile.LOAD_TRUNCATED_IMAGES = True` for the whole
    process when it is imported, and `vlm.load_image` refuses to run that way (a truncated file would load as a
    half-grey image); with the default, a truncated image is an error, as everywhere else in vlm."""
    ImageFile.LOAD_TRUNCATED_IMAGES = False


def to_messages(messages: Sequence[Any]) -> list[dict[str, Any]]:
    """lmms-eval's chat messages (dicts or its pydantic ChatMessage objects) -> vlm's OpenAI-style messages."""
    out = []
    for message in messages:
        message = message.model_dump() if hasattr(message, "model_dump") else dict(message)
        content = message["content"]
        if isinstance(content, str):
            content = [{"type": "text", "text": content}]
        parts = []
        for part in content:
            kind = part.get("type")
            if kind == "text":
                parts.append({"type": "text", "text": part["text"]})
            elif kind == "image":
                parts.append({"type": "image", "image": part.get("url", part.get("image"))})
            else:
                raise VLMError(f"causallm_vlm reads text and images, not {kind!r} parts")
        out.append({"role": message["role"], "content": parts})
    return out


_GENERATION_KEYS = {"max_new_tokens", "temperature", "top_p", "top_k", "repetition_penalty", "seed", "until"}


def generation_options(gen_kwargs: dict[str, Any]) -> dict[str, Any]:
    """A task's generation_kwargs -> chat_batch's options: greedy at temperature 0 (top_p and top_k are then left
    out, as `do_sample: false` means), `until` strings as stop strings; beams and the like are ignored."""
    options = {k: v for k, v in gen_kwargs.items() if k in _GENERATION_KEYS and v is not None}
    options["max_new_tokens"] = int(options.get("max_new_tokens", 128))
    options["temperature"] = float(options.get("temperature", 0.0))
    if options["temperature"] == 0 or gen_kwargs.get("do_sample") is False:
        options["temperature"] = 0.0
        options.pop("top_p", None), options.pop("top_k", None)
    until = options.pop("until", None)
    if until:
        options["stop"] = [until] if isinstance(until, str) else list(until)
    return options


class CausalLMVLM(_LMMBase):  # type: ignore[misc, valid-type]
    """An adapter directory (`pretrained=`) as an lmms-eval chat model."""

    is_simple = False

    def __init__(
        self, pretrained: str = "runs/toy", device: str | None = None, dtype: str | None = None,
        batch_size: int | str = 8, **_: Any,
    ) -> None:  # fmt: skip
        if _LMMBase is object:
            raise VLMError(LMMS_EVAL_MISSING)
        super().__init__()
        import vlm

        self.model = vlm.load(pretrained, device=device, dtype=dtype)
        self.batch_size = int(batch_size)

    def _conversation(self, request: Any) -> list[dict[str, Any]]:
        _, doc_to_messages, _, doc_id, task, split = request.args
        doc = self.task_dict[task][split][doc_id]
        return to_messages(doc_to_messages(doc))

    def generate_until(self, requests: Sequence[Any]) -> list[str]:
        """Answer each request's conversation; requests with the same generation settings share batches."""
        strict_images()
        answers: list[str] = [""] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, request in enumerate(requests):
            groups.setdefault(repr(sorted(request.args[2].items())), []).append(i)
        for indices in groups.values():
            conversations = {i: self._conversation(requests[i]) for i in indices}
            lengths = {i: len(self.model.encode_messages(c)) for i, c in conversations.items()}
            ordered = sorted(indices, key=lambda i: -lengths[i])
            options = generation_options(requests[indices[0]].args[2])
            texts = self.model.chat_batch([conversations[i] for i in ordered], self.batch_size, **options)
            for i, text in zip(ordered, texts, strict=True):
                answers[i] = text.strip()
        return answers

    def generate_until_multi_round(self, requests: Sequence[Any]) -> list[str]:
        raise NotImplementedError("causallm_vlm answers multi-turn conversations through generate_until")

    @torch.inference_mode()
    def loglikelihood(self, requests: Sequence[Any]) -> list[tuple[float, bool]]:
        """(log p(continuation | context and images), whether greedy decoding would write it) per request, with
        the continuation as the assistant's answer to the context as a user turn."""
        strict_images()
        results = []
        for request in requests:
            context, target, doc_to_visual, doc_id, task, split = request.args
            doc = self.task_dict[task][split][doc_id]
            continuation = target if isinstance(target, str) else target(doc)
            images = [{"type": "image", "image": image} for image in (doc_to_visual(doc) or [])]
            results.append(self._score(images, context, continuation))
        return results

    def _score(self, images: list[dict[str, Any]], context: str, continuation: str) -> tuple[float, bool]:
        messages = [{"role": "user", "content": [*images, {"type": "text", "text": context}]},
                    {"role": "assistant", "content": continuation}]  # fmt: skip
        chat = self.model.encode_messages(messages, add_generation_prompt=False)
        device = self.model.device
        ids = torch.tensor([chat.input_ids], device=device)
        labels = torch.tensor([chat.labels], device=device)
        pixels = self.model.pixel_values(chat.images)
        pixels = None if pixels is None else pixels.to(device=device, dtype=self.model.dtype)
        out = self.model.module(ids, torch.ones_like(ids), pixels, labels)
        targets = labels[0, 1:][labels[0, 1:] != -100][:-1]  # the answer's tokens, not the <|im_end|> after it
        logprobs = torch.log_softmax(out.logits[:-1].float(), dim=-1)
        picked = logprobs.gather(-1, targets.unsqueeze(-1)).sum().item()
        return picked, bool((logprobs.argmax(-1) == targets).all())
