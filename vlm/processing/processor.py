"""`Processor`: the tokenizer, the image processor and the image token, turning conversations into model inputs.

messages -> `encode` -> EncodedChat (ids with N image slots per image, labels on the answers, image sources)
images   -> `pixel_values` -> (I, 3, S, S)
chats    -> `left_padded` (generation); training rows -> `right_padded` -> batch tensors on the CPU

The model, the training data and the exporters all use it; none of them needs the LM to tokenize.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from vlm.errors import PromptError
from vlm.processing.chat import IGNORE_INDEX, ChatTokens, EncodedChat, encode_chat, normalize_messages
from vlm.processing.image_processor import ImageProcessor
from vlm.processing.images import load_image

__all__ = ["Processor", "right_padded"]


class Processor:
    """Everything between a user's conversation and the model's input tensors.

    tokenizer: the LM's (ChatML specials required). image_processor: the tower's preprocessing.
    image_token_id: the embedding row of an image slot; num_image_tokens: slots per image.
    system_prompt: used when a conversation has none. max_length: the longest prompt + answer accepted.
    """

    def __init__(
        self,
        tokenizer: Any,
        image_processor: ImageProcessor,
        image_token_id: int,
        num_image_tokens: int,
        system_prompt: str,
        max_length: int,
    ):
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.image_token_id = image_token_id
        self.num_image_tokens = num_image_tokens
        self.system_prompt = system_prompt
        self.max_length = max_length
        self.tokens = ChatTokens.from_tokenizer(tokenizer, image_token_id)
        ends = (tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|endoftext|>"))
        self.stop_ids: list[int] = sorted({self.tokens.im_end, *(i for i in ends if i is not None)})
        """Ids that end an answer: `<|im_end|>`, and `<|endoftext|>` / the tokenizer's eos."""
        self.pad_id: int = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.stop_ids[0]

    def encode(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True) -> EncodedChat:
        """OpenAI-style messages -> ids, labels and the images in slot order (not yet loaded)."""
        normalized = normalize_messages(messages, self.system_prompt)
        return encode_chat(
            self.tokenizer, normalized, self.tokens, self.num_image_tokens, add_generation_prompt=add_generation_prompt
        )

    def pixel_values(self, images: Sequence[Any]) -> torch.Tensor | None:
        """Load and preprocess images (paths, bytes, file objects, PIL images) -> (I, 3, S, S), None for none."""
        if not images:
            return None
        return self.image_processor([load_image(im) for im in images])

    def left_padded(self, chats: Sequence[EncodedChat], max_new_tokens: int) -> dict[str, torch.Tensor | None]:
        """Prompts left-padded for generation -> input_ids, attention_mask (B, T) and pixel_values; over-long
        prompts are refused before any compute."""
        for chat in chats:
            if len(chat) + max_new_tokens > self.max_length:
                raise PromptError(
                    f"the prompt is {len(chat)} tokens ({len(chat.images)} image(s) x {self.num_image_tokens}) "
                    f"and max_new_tokens is {max_new_tokens}, over the limit of {self.max_length}; "
                    "shorten the conversation, attach fewer images or lower max_new_tokens"
                )
        width = max(len(c) for c in chats)
        ids = torch.full((len(chats), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(chats), width), dtype=torch.long)
        for row, chat in enumerate(chats):
            ids[row, width - len(chat) :] = torch.tensor(chat.input_ids)
            mask[row, width - len(chat) :] = 1
        pixels = self.pixel_values([im for c in chats for im in c.images])
        return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels}


def right_padded(ids: Sequence[list[int]], labels: Sequence[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Rows of ids and labels right-padded (with `pad_id` and IGNORE_INDEX) -> input_ids, attention_mask, labels."""
    width = max((len(row) for row in ids), default=1)
    out_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
    out_labels = torch.full((len(ids), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for row, (row_ids, row_labels) in enumerate(zip(ids, labels, strict=True)):
        out_ids[row, : len(row_ids)] = torch.tensor(row_ids)
        out_labels[row, : len(row_labels)] = torch.tensor(row_labels)
        mask[row, : len(row_ids)] = 1
    return {"input_ids": out_ids, "attention_mask": mask, "labels": out_labels}
