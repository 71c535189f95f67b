"""Incremental detokenising: generated ids -> text pieces that are safe to show, with stop strings and a word filter."""

from __future__ import annotations

from typing import Any

from vlm.generation.words import blocked_pattern

__all__ = ["FILTERED", "TextAssembler"]

FILTERED = "[filtered]"


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
        self.blocked = blocked_pattern(blocked_words)
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
