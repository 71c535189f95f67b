"""Token selection: transformers' logits processors, the suppressed ids and the blocked-words ban."""

from __future__ import annotations

import weakref
from typing import Any

import torch
from transformers import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from vlm.generation.options import GenerationOptions
from vlm.generation.words import is_word_char

__all__ = ["BlockedWordsProcessor", "TokenSelector"]

_WORD_ENDS: weakref.WeakKeyDictionary[Any, torch.Tensor] = weakref.WeakKeyDictionary()


def _word_end_ids(tokenizer: Any) -> torch.Tensor:
    """(V,) bool: which ids decode to text that ends in a `WORD_CHAR` (computed once per tokenizer)."""
    table = _WORD_ENDS.get(tokenizer)
    if table is None:
        texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))], clean_up_tokenization_spaces=False)
        table = _WORD_ENDS[tokenizer] = torch.tensor([bool(t) and is_word_char(t[-1]) for t in texts])
    return table


class BlockedWordsProcessor:
    """Bans the token sequences that spell a blocked word (as written, lower-case, capitalised, upper-case), as
    whole words the way the text filter matches them: a spelling after a space always, a bare spelling only where
    a word can start (the id before it does not end in a `WORD_CHAR`), so blocking "ass" leaves "cl" + "ass"
    alone; a word that starts in Chinese, Japanese or Korean script is banned wherever its ids appear. The ban acts
    when a word's ids are complete, before the next id shows whether the word goes on, so a longer word that starts
    with the same ids is steered away from too (rare with a large vocabulary, where most words are one id, and the
    text filter itself lets such words through)."""

    def __init__(self, tokenizer: Any, words: list[str], device: torch.device):
        sequences = set()
        for word in words:
            whole = is_word_char(word[0])  # punctuation or a spaceless script has no left boundary
            for form in {word, word.lower(), word.capitalize(), word.upper()}:
                for text, bare in ((" " + form, False), (form, whole)):
                    ids = tuple(tokenizer.encode(text, add_special_tokens=False))
                    if ids:
                        # a tokenizer that adds a leading space (Llama's "▁ass") spells the bare form spaced
                        starts_spaced = tokenizer.decode(ids[:1])[:1].isspace() or tokenizer.convert_ids_to_tokens(
                            ids[0]
                        ).startswith("▁")
                        sequences.add((ids, bare and not starts_spaced))
        # (the ids before the last, on the device; the last id; whether it is bare), longest first
        self.sequences = [
            (torch.tensor(ids[:-1], device=device), ids[-1], bare)
            for ids, bare in sorted(sequences, key=lambda item: (-len(item[0]), item))
        ]
        self.word_end = _word_end_ids(tokenizer).to(device) if any(bare for _, bare in sequences) else None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """input_ids (B, T), scores (B, V) -> scores with the last id of every sequence now complete set to -inf."""
        if self.word_end is not None and len(self.word_end) < scores.shape[1]:  # ids past the tokenizer's
            beyond = self.word_end.new_zeros(scores.shape[1] - len(self.word_end))
            self.word_end = torch.cat([self.word_end, beyond])
        length = input_ids.shape[1]
        for prefix, last, bare in self.sequences:
            if len(prefix) + bare > length:
                continue
            banned = (input_ids[:, length - len(prefix) :] == prefix).all(dim=1)  # all() of nothing: True
            if bare:
                banned &= ~self.word_end[input_ids[:, -len(prefix) - 1]]
            scores[:, last].masked_fill_(banned, float("-inf"))
        return scores


class TokenSelector:
    """Chooses next tokens from (B, V) logits with transformers' own logits processors."""

    def __init__(self, options: GenerationOptions, tokenizer: Any, suppress_ids: list[int], device: torch.device):
        self.greedy = options.temperature == 0
        self.suppress_ids = torch.tensor(suppress_ids, dtype=torch.long, device=device)
        processors = LogitsProcessorList()
        if options.repetition_penalty != 1.0:
            processors.append(RepetitionPenaltyLogitsProcessor(options.repetition_penalty))
        if options.blocked_words:
            processors.append(BlockedWordsProcessor(tokenizer, options.blocked_words, device))
        if not self.greedy:
            processors.append(TemperatureLogitsWarper(options.temperature))
            if options.top_k > 0:
                processors.append(TopKLogitsWarper(options.top_k))
            if options.top_p < 1.0:
                processors.append(TopPLogitsWarper(options.top_p))
        self.processors = processors
        self.generator: torch.Generator | None = None
        if options.seed is not None:
            self.generator = torch.Generator(device=device).manual_seed(options.seed)

    @property
    def per_position(self) -> bool:
        """Whether the scores depend on the sequence so far (a repetition penalty, blocked words): then each
        position's scores need its own prefix; otherwise many positions can be scored in one call."""
        return any(isinstance(p, (RepetitionPenaltyLogitsProcessor, BlockedWordsProcessor)) for p in self.processors)

    def scores(self, sequence: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """sequence (B, T) ids so far, logits (B, V) -> the processed float scores (B, V) that ids are chosen from
        (suppressed ids and banned words at -inf; temperature, top-k and top-p applied when sampling). Without
        `per_position` processors, logits of any shape (..., V) may be given, and the sequence is not read."""
        logits = logits.float().clone()  # never write into the engine's output buffer
        if self.suppress_ids.numel():
            logits[..., self.suppress_ids] = float("-inf")
        if not self.processors:
            return logits
        if not self.per_position and logits.dim() > 2:
            return self.processors(sequence, logits.flatten(0, -2)).view(logits.shape)
        return self.processors(sequence, logits)

    def pick(self, scores: torch.Tensor) -> torch.Tensor:
        """Processed scores (B, V) -> ids (B,): the argmax when greedy, else a draw from softmax(scores)."""
        if self.greedy:
            return scores.argmax(dim=-1)
        return torch.multinomial(torch.softmax(scores, dim=-1), 1, generator=self.generator).squeeze(1)

    def __call__(self, sequence: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """sequence (B, T) ids so far, logits (B, V) -> next ids (B,)."""
        return self.pick(self.scores(sequence, logits))
