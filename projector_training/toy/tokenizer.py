"""A tiny byte-level BPE tokenizer laid out like CausalLM's (Qwen vocabulary), for toy and test LMs.

Like the real one: GPT-2 style byte-level BPE (every byte string round-trips), no prefix space, and the
special tokens `<|endoftext|>`, `<|im_start|>`, `<|im_end|>` right after the learned vocabulary (Qwen's
151643, 151644, 151645). `<|endoftext|>` is bos, eos and pad; nothing is added around encoded text
and there is no chat template (the project renders ChatML itself). There is no `<image>` token: the
adapter uses the first spare embedding row, id `len(tokenizer)`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

__all__ = ["SPECIAL_TOKENS", "build_tokenizer"]

SPECIAL_TOKENS: tuple[str, ...] = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
_SPECIAL_RE = re.compile("|".join(re.escape(t) for t in SPECIAL_TOKENS))


def _plain_text(corpus: Iterable[str]) -> Iterator[str]:
    # Special tokens are matched whole before BPE runs, so merges learned across them would be wasted.
    for text in corpus:
        yield from (piece for piece in _SPECIAL_RE.split(text) if piece)


def build_tokenizer(corpus: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE of at most `vocab_size` learned tokens (the 256 bytes included) on
    `corpus`, then append the three special tokens. `len(result)` is the learned size + 3."""
    if vocab_size < 256:
        raise ValueError(f"vocab_size must cover the 256 byte tokens, got {vocab_size}")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
        show_progress=False,
    )
    tokenizer.train_from_iterator(_plain_text(corpus), trainer)
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    end = SPECIAL_TOKENS[0]
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=end, eos_token=end, pad_token=end, model_max_length=512
    )
