"""Generation options, token selection and incremental detokenization with stop strings and a word filter.

The decoding loop itself lives in `model.py`; this module holds the parts that are independent of the
model: choosing the next token from logits and turning a growing list of ids into safe text pieces.
"""

from __future__ import annotations

import math
import numbers
import re
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from vlm.errors import VLMError

__all__ = ["FILTERED", "GenerationOptions", "TextAssembler", "TokenSelector"]

FILTERED = "[filtered]"


@dataclass
class GenerationOptions:
    """How to generate. `temperature=0` is greedy decoding."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    """Extra stop strings; generation also stops on `<|im_end|>` and `<|endoftext|>`."""
    blocked_words: list[str] = field(default_factory=list)
    """Words or phrases the output may not contain: their token sequences are banned, and any that
    still appear (spelled with other tokens) are replaced by `[filtered]`."""

    def __post_init__(self) -> None:
        self._check_types()
        if self.max_new_tokens < 1:
            raise VLMError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise VLMError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise VLMError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise VLMError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if self.repetition_penalty <= 0:
            raise VLMError(f"repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty}")
        if self.temperature == 0 and (self.top_p < 1 or self.top_k > 0):
            warnings.warn(
                "top_p and top_k do nothing at temperature 0 (greedy decoding); give a temperature > 0 to sample",
                stacklevel=4,
            )
        self.stop = [s for s in self.stop if s]
        self.blocked_words = [w for w in (w.strip() for w in self.blocked_words) if w]

    def _check_types(self) -> None:
        """Whole numbers where counts are meant, floats (2 is 2.0) for the rest, strings for stop and blocked
        words (one string is a list of one): a wrong type is a VLMError naming the option, not a failure deep in
        the sampling code."""
        for name in ("max_new_tokens", "top_k", "seed"):
            value = getattr(self, name)
            if value is None and name == "seed":
                continue
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise VLMError(f"{name} must be a whole number, got {value!r}")
            setattr(self, name, int(value))
        for name in ("temperature", "top_p", "repetition_penalty"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise VLMError(f"{name} must be a number, got {value!r}")
            if not math.isfinite(value):
                raise VLMError(f"{name} must be a finite number, got {value!r}")
            setattr(self, name, float(value))
        if self.seed is not None and not -(2**63) <= self.seed < 2**64:
            raise VLMError(f"seed must fit in 64 bits (0 to 2**64 - 1), got {self.seed}")
        for name in ("stop", "blocked_words"):
            value = getattr(self, name)
            value = [] if value is None else [value] if isinstance(value, str) else value
            if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
                raise VLMError(f"{name} must be a string or a list of strings, got {value!r}")
            setattr(self, name, list(value))

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> GenerationOptions:
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise VLMError(f"unknown generation options {unknown}; known: {sorted(known)}")
        return cls(**{k: v for k, v in kwargs.items() if v is not None})


_WORD_ENDS: weakref.WeakKeyDictionary[Any, torch.Tensor] = weakref.WeakKeyDictionary()
_SPACELESS = (
    "\u1100-\u11ff\u2e80-\u2fdf\u3005-\u3007\u3040-\u30ff\u3130-\u318f\u31f0-\u31ff\u3400-\u4dbf"
    "\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff\uff66-\uff9f\U00020000-\U0003ffff"
)
"""Han characters, Japanese kana and Korean Hangul: scripts written without spaces between words (Korean glues
particles to nouns), so a blocked word in them matches wherever it appears."""
WORD_CHAR = f"(?:(?![{_SPACELESS}])\\w)"
"""A character that continues a word for whole-word matching: a letter, digit or underscore of a script that
separates words with spaces. "class" does not contain the word "ass", but "你好damn" contains "damn"."""


def _is_word_char(char: str) -> bool:
    return re.fullmatch(WORD_CHAR, char) is not None


def _word_end_ids(tokenizer: Any) -> torch.Tensor:
    """(V,) bool: which ids decode to text that ends in a `WORD_CHAR` (computed once per tokenizer)."""
    table = _WORD_ENDS.get(tokenizer)
    if table is None:
        texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))], clean_up_tokenization_spaces=False)
        table = _WORD_ENDS[tokenizer] = torch.tensor([bool(t) and _is_word_char(t[-1]) for t in texts])
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
            whole = _is_word_char(word[0])  # punctuation or a spaceless script has no left boundary
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

    def __call__(self, sequence: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """sequence (B, T) ids so far, logits (B, V) -> next ids (B,)."""
        logits = logits.float()
        if self.suppress_ids.numel():
            logits[:, self.suppress_ids] = float("-inf")
        logits = self.processors(sequence, logits)
        if self.greedy:
            return logits.argmax(dim=-1)
        probs = torch.softmax(logits, dim=-1)
        return torch.multinomial(probs, 1, generator=self.generator).squeeze(1)


def _blocked_pattern(words: list[str]) -> re.Pattern[str] | None:
    """Any of `words`, case-insensitively, as whole words: a word that starts (ends) with a `WORD_CHAR` does not
    match right after (before) another one, so blocking "ass" leaves "class" alone; Chinese, Japanese and Korean
    words, and the Chinese side of a word next to Chinese text, match wherever they appear ("你真是个笨蛋！")."""
    if not words:
        return None
    forms = []
    for word in sorted(words, key=len, reverse=True):
        before = f"(?<!{WORD_CHAR})" if _is_word_char(word[0]) else ""
        after = f"(?!{WORD_CHAR})" if _is_word_char(word[-1]) else ""
        forms.append(before + re.escape(word) + after)
    return re.compile("|".join(forms), re.IGNORECASE)


class TextAssembler:
    """Turns generated ids into text pieces that are safe to show as they arrive.

    Holds back text that might still become a stop string or a blocked word, and half-decoded UTF-8.
    Each new token costs the same however long the answer is: only the ids since the last complete
    character are decoded (with the ones before as context, as tokenizers may merge across a boundary),
    and the word filter rescans only the text a blocked word could still end in.
    """

    def __init__(self, tokenizer: Any, stop: list[str], blocked_words: list[str]):
        self.tokenizer = tokenizer
        self.stop = stop
        self.ids: list[int] = []
        self.raw = ""  # the decoded text of ids[: self.read]
        self.context = 0  # ids[context : read] are decoded again with the new ones
        self.read = 0
        self.emitted = 0  # characters of the filtered text already handed out
        self.stopped = False
        self.blocked = _blocked_pattern(blocked_words)
        self.longest_blocked = max((len(w) for w in blocked_words), default=0)
        self.settled = ""  # the filtered text of raw[: settled_raw], which no later text can change
        self.settled_raw = 0

    def _decode(self, final: bool = False) -> None:
        """Append the text of the ids since `read` to `raw`, unless it ends in a split character (then
        they wait for the next id; `final`: the split character is dropped)."""

        def decode(ids: list[int]) -> str:  # no clean-up of spaces: it would not survive cutting the ids
            return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

        before = decode(self.ids[self.context : self.read])
        text = decode(self.ids[self.context :])
        if final:
            text = text.rstrip("\ufffd")
        elif text.endswith("\ufffd") or len(text) <= len(before):
            return
        self.raw += text[len(before) :]
        self.context, self.read = self.read, len(self.ids)

    def _filter(self, start: int, end: int | None = None) -> tuple[str, int]:
        """raw[start:] with blocked words replaced, scanning only matches that start before `end` -> (text, where
        it stops in raw: `end`, or the end of a match that runs past it). Matches are looked for in `raw` itself,
        so a word's boundaries see the characters before `start`."""
        raw, pieces, at = self.raw, [], start
        for match in self.blocked.finditer(raw, start):
            if end is not None and match.start() >= end:
                break
            pieces += [raw[at : match.start()], FILTERED]
            at = match.end()
        stop = len(raw) if end is None else max(end, at)
        pieces.append(raw[at:stop])
        return "".join(pieces), stop

    def _text(self) -> str:
        """The text so far with blocked words replaced (settling the part no later text can change)."""
        if self.blocked is None:
            return self.raw
        # Whether a match starts at some position depends on at most `longest_blocked` characters from there and
        # one on each side. So everything before `cut` (and a match that starts there) is decided for good, and
        # later scans start after it.
        cut = len(self.raw) - self.longest_blocked - 1
        if cut > self.settled_raw:
            text, self.settled_raw = self._filter(self.settled_raw, cut)
            self.settled += text
        return self.settled + self._filter(self.settled_raw)[0]

    def add(self, token_id: int) -> str:
        """Feed one id; returns the text that can be shown now (maybe empty). Sets `stopped`."""
        self.ids.append(token_id)
        self._decode()
        text = self._text()
        if (at := self._stop_at(text)) is not None:
            self.stopped = True
            return self._emit(text[:at])
        ready = len(text) - self._stop_prefix(text)
        if self.blocked is not None:  # a replacement changes the length: only the settled text is final
            ready = min(ready, len(self.settled))
        return self._emit(text[: max(self.emitted, ready)])

    def finish(self) -> str:
        """The rest of the text once generation has ended."""
        if self.stopped:
            return ""
        self._decode(final=True)
        text = self._text()
        if (at := self._stop_at(text)) is not None:  # the last ids may complete a stop string too
            self.stopped = True
            return self._emit(text[:at])
        return self._emit(text)

    def _stop_at(self, text: str) -> int | None:
        """Where the earliest stop string in `text` starts (None if there is none): when one token brings two, the
        text ends before the first, whichever order they were given in."""
        found = [at for s in self.stop if (at := text.find(s, max(0, self.emitted - len(s)))) != -1]
        return min(found, default=None)

    def _stop_prefix(self, text: str) -> int:
        """The length of the longest end of `text` that a stop string starts with: only that much is held back."""
        return max(
            (k for s in self.stop for k in range(min(len(s) - 1, len(text)), 0, -1) if text.endswith(s[:k])), default=0
        )

    def _emit(self, upto: str) -> str:
        piece = upto[self.emitted :]
        self.emitted = max(self.emitted, len(upto))
        return piece
