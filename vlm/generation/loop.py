"""The decode loop, as free functions over a decode engine, and every rule for when an answer stops.

`generate_tokens`: prompt embeddings -> engine prefill -> token selection -> engine steps, yielding ids per step.
`stream_text`: those ids -> text pieces per row, through a `TextAssembler` each.

A row's answer ends at the first of (all decided here):
- a stop id (`<|im_end|>`, `<|endoftext|>`): known on the device at once, so the row feeds pad from then on, and
  on the host when its id arrives, which ends the loop once every row has one (`Stops`); `stream_text` ends the
  row's text there;
- a stop string: the row's `TextAssembler` sees it in the text and `stream_text` cuts it off there;
- `max_new_tokens`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch

from vlm.generation.engine import DecodeEngine
from vlm.generation.options import GenerationOptions
from vlm.generation.text import TextAssembler

__all__ = ["Decoding", "Stops", "generate_tokens", "stream_text"]


class Stops:
    """The stop ids of one generation, on the device and on the host, and which rows have reached one."""

    def __init__(self, stop_ids: Sequence[int], rows: int, device: torch.device):
        self.on_device = torch.tensor(list(stop_ids), device=device)
        self.on_host = torch.tensor(list(stop_ids))
        self.done = torch.zeros(rows, dtype=torch.bool, device=device)  # rows past a stop id (device)
        self.finished = torch.zeros(rows, dtype=torch.bool)  # the same, known on the host

    def mark(self, next_ids: torch.Tensor) -> None:
        """Device side: rows whose new id is a stop id feed pad from the next step on."""
        self.done |= torch.isin(next_ids, self.on_device)

    def arrived(self, on_host: torch.Tensor) -> bool:
        """Host side: note the rows whose id just arrived is a stop id -> whether every row has stopped."""
        self.finished |= torch.isin(on_host, self.on_host)
        return bool(self.finished.all())


class Decoding:
    """The sequence so far (prompt and every id fed), each row's rotary position, and the engine that holds its
    cache."""

    def __init__(self, engine: DecodeEngine, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        self.engine = engine
        # What the repetition penalty reads: pad slots hold the row's first real id instead, so the pad id (which is
        # also <|endoftext|>, a stop id) is not penalised in padded rows only; repeats do not change the penalty.
        first = input_ids.gather(1, attention_mask.argmax(-1, keepdim=True))
        self.sequence = torch.where(attention_mask.bool(), input_ids, first)
        self.position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # left padding: real tokens from 0
        self.prompt_width = input_ids.shape[1]
        self.positions = self.position_ids[:, -1]

    def advance(self, next_ids: torch.Tensor) -> torch.Tensor:
        """Feed `next_ids` (B,) -> the following logits (B, V)."""
        self.sequence = torch.cat([self.sequence, next_ids[:, None]], dim=1)
        self.positions = self.positions + 1
        return self.engine.step(next_ids, self.positions)

    def extend(self, ids: torch.Tensor) -> torch.Tensor:
        """Feed K ids per row (B, K) in one forward -> the logits after each (B, K, V)."""
        self.sequence = torch.cat([self.sequence, ids], dim=1)
        positions = self.positions[:, None] + torch.arange(1, ids.shape[1] + 1, device=ids.device)  # (B, K)
        self.positions = positions[:, -1]
        return self.engine.extend(ids, positions)

    def keep(self, fed: int) -> None:
        """Forget all but the first `fed` ids fed after the prompt (the cache and the sequence alike)."""
        drop = self.sequence.shape[1] - self.prompt_width - fed
        if drop < 0:
            raise ValueError(f"cannot keep {fed} ids: only {self.sequence.shape[1] - self.prompt_width} were fed")
        if drop:
            self.sequence = self.sequence[:, :-drop]
            self.positions = self.positions - drop
            self.engine.rollback(self.engine.length - drop)


@torch.inference_mode()
def generate_tokens(
    module: Any,
    engine: DecodeEngine,
    batch: dict[str, torch.Tensor | None],
    options: GenerationOptions,
    select: Any,
    stops: Stops,
    pad_id: int,
    overlap: bool,
) -> Iterator[torch.Tensor]:
    """Yield the next token ids (B,), on the CPU, step by step for left-padded prompts (`batch` on the module's
    device); rows past a stop id yield `pad_id`. Ends when every row has produced a stop id or after
    `max_new_tokens`.

    `module` embeds the prompt (`embed(ids, pixels, graphed)`), `select(sequence, logits)` picks ids. With `overlap`
    (on a GPU), each step is queued before the token that feeds it is yielded: the device runs it while the caller
    handles the token, and a stop costs one step whose result is dropped."""
    input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
    embeds = module.embed(input_ids, batch["pixel_values"], graphed=engine.use_cuda_graph)
    decoding = Decoding(engine, input_ids, attention_mask)
    logits = engine.prefill(embeds, attention_mask, decoding.position_ids)  # (B, V)
    for step in range(options.max_new_tokens):
        next_ids = torch.where(stops.done, pad_id, select(decoding.sequence, logits))  # (B,)
        on_host = next_ids.to("cpu", non_blocking=True)
        copied = torch.cuda.Event() if next_ids.is_cuda else None
        if copied is not None:
            copied.record(torch.cuda.current_stream(next_ids.device))  # the model's card, not the current one
        more = step < options.max_new_tokens - 1  # no step whose logits nobody reads
        if more:
            stops.mark(next_ids)
            if overlap:
                logits = decoding.advance(next_ids)  # queued behind the copy
        if copied is not None:
            copied.synchronize()  # the ids, not the step queued after them
        yield on_host
        if stops.arrived(on_host) or not more:
            return
        if not overlap:
            logits = decoding.advance(next_ids)


def stream_text(
    steps: Iterator[torch.Tensor], tokenizer: Any, options: GenerationOptions, stop_ids: Sequence[int], rows: int
) -> Iterator[list[str]]:
    """Token ids per step -> per step, the new text of each of `rows` rows (empty for rows with nothing new); a row
    ends at its first stop id or stop string, and its held-back text comes out then (or after the last step)."""
    stop = set(stop_ids)
    assemblers = [TextAssembler(tokenizer, options.stop, options.blocked_words) for _ in range(rows)]
    ended = [False] * rows
    for next_ids in steps:
        pieces = []
        for row, token in enumerate(next_ids.tolist()):
            if ended[row]:
                pieces.append("")
            elif token in stop:
                ended[row] = True
                pieces.append(assemblers[row].finish())
            else:
                pieces.append(assemblers[row].add(token))
                ended[row] = assemblers[row].stopped
        yield pieces
        if all(ended):
            return
    yield [a.finish() if not e else "" for a, e in zip(assemblers, ended, strict=True)]
