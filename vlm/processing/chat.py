"""ChatML conversations -> token ids with image slots and label masks.

Rendering (CausalLM is prompted in ChatML, and its system prompt must never be empty):

    <|im_start|>system\\n{system}<|im_end|>\\n
    <|im_start|>user\\n{image slots}\\n{text}<|im_end|>\\n     (each image first, as LLaVA-1.5: `_images_first`)
    <|im_start|>assistant\\n{answer}<|im_end|>\\n
    ...
    <|im_start|>assistant\\n                      (generation prompt)

An image part becomes `num_image_tokens` copies of the image token id followed by "\\n" (LLaVA's
`<image>\\n`). Image slots are inserted by id: text is tokenized with special tokens split, so a user
who types `<image>` or `<|im_end|>` gets ordinary text. Labels cover each assistant answer and the
`<|im_end|>` closing it, nothing else.
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from tokenizers import Tokenizer

from vlm.errors import PromptError

__all__ = [
    "IGNORE_INDEX",
    "ChatTokens",
    "EncodedChat",
    "Message",
    "encode_chat",
    "encode_text",
    "normalize_messages",
    "render_text",
]

IGNORE_INDEX = -100
ROLES = ("system", "user", "assistant")


@dataclass
class Message:
    """One turn: a role and its content parts, each a text string or an `ImagePart`."""

    role: str
    parts: list[str | ImagePart]


@dataclass
class ImagePart:
    """An image in a message; `source` is whatever `vlm.load_image` accepts (or an already loaded image)."""

    source: Any


@dataclass
class ChatTokens:
    """The ids the template needs, read from the tokenizer (never hard-coded)."""

    im_start: int
    im_end: int
    image: int
    newline: list[int]

    @classmethod
    def from_tokenizer(cls, tokenizer: Any, image_token_id: int) -> ChatTokens:
        ids = {}
        for token in ("<|im_start|>", "<|im_end|>"):
            token_id = tokenizer.convert_tokens_to_ids(token)
            if token_id is None or token_id == tokenizer.unk_token_id:
                raise PromptError(f"the tokenizer has no {token} token; a ChatML (CausalLM/Qwen) tokenizer is needed")
            ids[token] = token_id
        return cls(ids["<|im_start|>"], ids["<|im_end|>"], image_token_id, encode_text(tokenizer, "\n"))


@dataclass
class EncodedChat:
    """Token ids of a rendered conversation. `labels` is IGNORE_INDEX except on assistant answers."""

    input_ids: list[int]
    labels: list[int]
    images: list[Any] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.input_ids)


_PLAIN_TEXT: weakref.WeakKeyDictionary[Any, Tokenizer] = weakref.WeakKeyDictionary()


def _plain_text_tokenizer(tokenizer: Any) -> Tokenizer | None:
    """A private copy of `tokenizer`'s Rust tokenizer that reads special-token text as ordinary text, set once.

    transformers' `split_special_tokens=True` flips `encode_special_tokens` on the shared Rust tokenizer before
    each call, so another thread encoding with the default setting at the same moment (building the blocked-words
    ban does) could flip it back mid-call and turn typed "<|im_end|>" into the real token. This copy is never
    flipped. None for a tokenizer without a Rust backend."""
    plain = _PLAIN_TEXT.get(tokenizer)
    if plain is None:
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None:
            return None
        plain = Tokenizer.from_str(backend.to_str())
        plain.encode_special_tokens = True
        _PLAIN_TEXT[tokenizer] = plain
    return plain


def encode_text(tokenizer: Any, text: str) -> list[int]:
    """Ids of `text` as ordinary text: typed special tokens ("<image>", "<|im_end|>") never become special ids,
    whatever other threads do with the same tokenizer. Raises PromptError for text that is not UTF-8."""
    if not text:
        return []
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:  # Python keeps undecodable bytes of argv and stdin as lone surrogates
        raise PromptError(
            f"the text {text[max(0, e.start - 20) : e.end + 20]!r} holds bytes that are not UTF-8; "
            "write it in UTF-8 (a terminal or file in another encoding?)"
        ) from None
    plain = _plain_text_tokenizer(tokenizer)
    if plain is None:  # a Python tokenizer: its per-call setting is no shared state
        return tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    return plain.encode(text, add_special_tokens=False).ids


def _parts(content: Any, role: str) -> list[str | ImagePart]:
    if isinstance(content, str):
        return [content]
    if content is None:
        return []
    if not isinstance(content, Sequence):
        raise PromptError(f"{role} message content must be a string or a list of parts, got {type(content).__name__}")
    parts: list[str | ImagePart] = []
    for part in content:
        if isinstance(part, str):
            parts.append(part)
            continue
        if not isinstance(part, Mapping) or "type" not in part:
            raise PromptError(f"a content part must be a dict with a 'type' key, got {part!r:.80}")
        kind = part["type"]
        if kind == "text":
            text = part.get("text", "")
            if not isinstance(text, str):
                raise PromptError(f"a text part's 'text' must be a string, got {text!r:.80}")
            parts.append(text)
        elif kind == "image":
            if part.get("image") is None:
                raise PromptError("an image part needs an 'image' value (a path, bytes, file object or PIL image)")
            parts.append(ImagePart(part["image"]))
        elif kind == "image_url":
            raise PromptError("image URLs are not fetched; download the image and pass it as {'type': 'image', ...}")
        else:
            raise PromptError(f"unknown content part type {kind!r}; use 'text' or 'image'")
    return parts


def _images_first(parts: list[str | ImagePart]) -> list[str | ImagePart]:
    """A user turn with images as LLaVA-1.5 was trained on it: every image first, then the text with the whitespace
    around it stripped (LLaVA moves `<image>` to the front of its training text and of each question). Text
    written before an image otherwise ends up glued to the image slots, a prompt the LM never saw."""
    text = "".join(p for p in parts if isinstance(p, str)).strip()
    return [*(p for p in parts if isinstance(p, ImagePart)), *([text] if text else [])]


def normalize_messages(messages: Sequence[Mapping[str, Any]], default_system: str) -> list[Message]:
    """OpenAI-style messages -> `Message`s, starting with a non-empty system message."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise PromptError("messages must be a list of {'role': ..., 'content': ...} dicts")
    out: list[Message] = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping) or "role" not in message:
            raise PromptError(f"message {i} must be a dict with 'role' and 'content'")
        role = message["role"]
        if role not in ROLES:
            raise PromptError(f"message {i} has role {role!r}; use one of {', '.join(ROLES)}")
        parts = _parts(message.get("content"), role)
        if role == "system":
            if i != 0:
                raise PromptError("a system message may only come first")
            if any(isinstance(p, ImagePart) for p in parts):
                raise PromptError("the system message cannot contain images")
        if role == "assistant" and any(isinstance(p, ImagePart) for p in parts):
            raise PromptError("assistant messages cannot contain images")
        if role == "user" and any(isinstance(p, ImagePart) for p in parts):
            parts = _images_first(parts)
        out.append(Message(role, parts))
    system_text = "".join(out[0].parts) if out and out[0].role == "system" else ""
    if out and out[0].role == "system":
        out = out[1:]
    # The LM was trained with a system prompt on every conversation: never leave it empty.
    system_text = system_text if system_text.strip() else default_system
    return [Message("system", [system_text]), *out]


def encode_chat(
    tokenizer: Any,
    messages: Sequence[Message],
    tokens: ChatTokens,
    num_image_tokens: int,
    *,
    add_generation_prompt: bool,
) -> EncodedChat:
    """Render normalized messages to ids. Adjacent text of the same label status is tokenized as one
    string, so the ids equal tokenizing the rendered prompt with `<image>` as a special token, with one
    exception: an assistant answer is tokenized apart from the "assistant\n" before it (the labels start
    where the answer does), so an answer that begins with whitespace BPE would merge with that newline
    ("\n\nHello": 198 + 198 198 ... here, 271 ... in the rendered string with Qwen's vocabulary) gets other
    ids than the rendered string. Generation prompts end at "assistant\n" and are unaffected; so is every
    answer that starts with a visible character."""
    ids: list[int] = []
    labels: list[int] = []
    images: list[Any] = []
    pending: list[str] = []
    pending_label = False

    def flush() -> None:
        piece = encode_text(tokenizer, "".join(pending))
        ids.extend(piece)
        labels.extend(piece if pending_label else [IGNORE_INDEX] * len(piece))
        pending.clear()

    def text(value: str, label: bool) -> None:
        nonlocal pending_label
        if pending and pending_label != label:
            flush()
        pending_label = label
        pending.append(value)

    def special(token_id: int, label: bool) -> None:
        flush()
        ids.append(token_id)
        labels.append(token_id if label else IGNORE_INDEX)

    for message in messages:
        answer = message.role == "assistant"
        special(tokens.im_start, False)
        text(f"{message.role}\n", False)
        for part in message.parts:
            if isinstance(part, ImagePart):
                flush()
                ids.extend([tokens.image] * num_image_tokens)
                labels.extend([IGNORE_INDEX] * num_image_tokens)
                images.append(part.source)
                text("\n", False)
            else:
                text(part, answer)
        special(tokens.im_end, answer)
        text("\n", False)
    if add_generation_prompt:
        special(tokens.im_start, False)
        text("assistant\n", False)
    flush()
    return EncodedChat(ids, labels, images)


def render_text(messages: Sequence[Message], image_token: str = "<image>", add_generation_prompt: bool = True) -> str:
    """The prompt as a string, each image shown as one `image_token` (for display and template checks)."""
    out = []
    for message in messages:
        body = "".join(f"{image_token}\n" if isinstance(p, ImagePart) else p for p in message.parts)
        out.append(f"<|im_start|>{message.role}\n{body}<|im_end|>\n")
    if add_generation_prompt:
        out.append("<|im_start|>assistant\n")
    return "".join(out)
