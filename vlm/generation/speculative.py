"""Speculative decoding: a small draft LM proposes tokens, the target LM checks them all in one forward.

Speculative sampling (Leviathan et al. 2023, Chen et al. 2023), in rounds:
- the draft proposes `gamma` ids, each drawn from q (its scores after every generation option);
- the target scores the last emitted id and the `gamma` drafts in one forward over gamma + 1 positions, giving p
  (the target's scores after the same options, each position with its own prefix);
- drafted id x at position i is accepted with probability min(1, p(x) / q(x)), in order; the first rejected one is
  replaced by a draw from norm(max(0, p - q)); when all are accepted, a bonus id is drawn from p at gamma + 1;
  greedy decoding accepts the longest prefix equal to the target's argmax, and the argmax follows it;
- both caches roll back to what was accepted.

Every emitted id is then distributed exactly as the target alone would draw it with those options, and greedy
decoding gives the target's own tokens. Rows of a batch share cache slots, so a round keeps, for all rows, as many
drafts as the row that accepted fewest (its own resample follows them); a row that accepted more emits its next
accepted draft there instead, which is a draw from p as well (what any row emits at a position is p-distributed
whichever way that round ends). Rows past a stop id do not count.

Ids are yielded one step at a time, as by `vlm.generation.loop.generate_tokens`, so stop ids, stop strings and
`max_new_tokens` end a row exactly where they would without a draft.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from vlm.errors import VLMError
from vlm.generation.engine import DecodeEngine
from vlm.generation.loop import Decoding, Stops
from vlm.generation.options import GenerationOptions
from vlm.generation.sampling import TokenSelector

__all__ = [
    "DraftLength",
    "SpeculationStats",
    "SpeculativeDecoder",
    "generate_tokens_speculative",
    "residual_distribution",
    "verify",
]


@dataclass
class SpeculationStats:
    """What a generation with a draft did, after its first id (which the prompt's forward gives, with or without a
    draft). `acceptance_rate`: drafted ids the target accepted, each row on its own (drafts past the end of an
    answer count as rejected); `tokens_per_target_forward`: steps emitted per decoding forward of the target, the
    mean acceptance length of the literature (1.0 without a draft)."""

    drafted: int = 0
    accepted: int = 0
    rounds: int = 0
    target_forwards: int = 0
    draft_forwards: int = 0
    tokens: int = 0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_target_forward(self) -> float:
        return self.tokens / self.target_forwards if self.target_forwards else 0.0

    def add(self, other: SpeculationStats) -> None:
        """Count `other`'s generation in these statistics too."""
        for name in ("drafted", "accepted", "rounds", "target_forwards", "draft_forwards", "tokens"):
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def as_dict(self) -> dict[str, float | int]:
        return {
            "acceptance_rate": round(self.acceptance_rate, 4),
            "tokens_per_target_forward": round(self.tokens_per_target_forward, 4),
            "drafted": self.drafted,
            "accepted": self.accepted,
            "rounds": self.rounds,
            "target_forwards": self.target_forwards,
            "draft_forwards": self.draft_forwards,
            "tokens": self.tokens,
        }


class DraftLength:
    """How many ids the draft proposes per round (gamma): `fixed`, or adapted from `START`: one more after a round
    where every drafted id was accepted, one fewer after a round with a rejection, within [1, `MAX`]. Long runs of
    agreement earn longer drafts; the length settles where a full acceptance is about as likely as not."""

    START, MAX = 4, 8

    def __init__(self, fixed: int | None = None):
        if fixed is not None and not 1 <= fixed <= 16:
            raise VLMError(f"draft_length must be within 1..16 (or None to adapt it), got {fixed!r}")
        self.fixed = fixed
        self.current = fixed or self.START

    def update(self, all_accepted: bool) -> None:
        if self.fixed is None:
            self.current = min(self.current + 1, self.MAX) if all_accepted else max(self.current - 1, 1)


def verify(
    drafted: torch.Tensor,
    draft_probs: torch.Tensor | None,
    target_scores: torch.Tensor,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Check drafted ids against the target -> (accepted count (B,), the id that follows them (B,)).

    drafted (B, G); target_scores (B, G + 1, V): the target's processed scores at each drafted position and the
    one after. `draft_probs` (B, G, V): the distributions the drafts were drawn from, or None for greedy decoding
    (accept while the draft equals the target's argmax)."""
    if draft_probs is None:
        best = target_scores.argmax(dim=-1)  # (B, G + 1)
        accepted = (drafted == best[:, :-1]).long().cumprod(dim=1).sum(dim=1)  # (B,)
        return accepted, best.gather(1, accepted[:, None]).squeeze(1)
    p = torch.softmax(target_scores, dim=-1)  # (B, G + 1, V)
    p_drafted = p[:, :-1].gather(2, drafted[..., None]).squeeze(-1)  # (B, G)
    q_drafted = draft_probs.gather(2, drafted[..., None]).squeeze(-1)  # (B, G), > 0: drafts were drawn from q
    u = torch.rand(p_drafted.shape, generator=generator, device=p.device)
    accepted = (u * q_drafted < p_drafted).long().cumprod(dim=1).sum(dim=1)  # u < p / q, in order
    # At the first rejection: norm(max(0, p - q)); after a full acceptance, q is 0 at the bonus position: p itself.
    q = torch.cat([draft_probs, torch.zeros_like(draft_probs[:, :1])], dim=1)  # (B, G + 1, V)
    at = accepted[:, None, None].expand(-1, 1, p.shape[-1])
    following = residual_distribution(p.gather(1, at).squeeze(1), q.gather(1, at).squeeze(1))
    return accepted, torch.multinomial(following, 1, generator=generator).squeeze(1)


def residual_distribution(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """What a rejected draft is replaced by: norm(max(0, p - q)) per row of (B, V). Where p == q leaves nothing,
    nothing is ever rejected, so p there only guards against rounding."""
    residual = (p - q).clamp(min=0)
    total = residual.sum(dim=-1, keepdim=True)
    return torch.where(total > 0, residual / total.clamp(min=torch.finfo(total.dtype).tiny), p)


class SpeculativeDecoder:
    """Runs rounds of speculative decoding between a target and a draft `Decoding` (see the module docstring).

    `target_select` and `draft_select` apply the same generation options (each with its LM's suppressed ids);
    randomness comes from the target selector's generator. `stats` counts what happened."""

    def __init__(
        self,
        target: Decoding,
        draft: Decoding,
        target_select: TokenSelector,
        draft_select: TokenSelector,
        length: DraftLength,
    ):
        self.target, self.draft = target, draft
        self.target_select, self.draft_select = target_select, draft_select
        self.length = length
        self.generator = draft_select.generator = target_select.generator  # one stream: draws are independent
        self.stats = SpeculationStats()
        self.emitted = 0  # steps emitted so far
        self.width = 0  # the target's vocabulary rows (known from its first logits)
        self._draft_pending: list[torch.Tensor] = []  # emitted ids (B,) the draft has not been fed yet

    @classmethod
    def prefill(
        cls,
        engines: tuple[DecodeEngine, DecodeEngine],
        embeds: tuple[torch.Tensor, torch.Tensor],
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        selectors: tuple[TokenSelector, TokenSelector],
        length: DraftLength,
    ) -> tuple[SpeculativeDecoder, torch.Tensor]:
        """Run the prompt through both LMs ((target, draft) pairs of engines, embeddings and selectors) -> the
        decoder and the target's last logits (B, V)."""
        target, draft = (Decoding(engine, input_ids, attention_mask) for engine in engines)
        logits = target.engine.prefill(embeds[0], attention_mask, target.position_ids)
        draft.engine.prefill(embeds[1], attention_mask, draft.position_ids)
        decoder = cls(target, draft, *selectors, length)
        decoder.stats.draft_forwards += 1
        return decoder, logits

    def propose(self, scores: torch.Tensor, index: int) -> torch.Tensor:
        """The draft's ids (B,) at the `index`-th drafted position of this round, from its processed scores (B, V).
        (The GPU benchmark overrides this to control how often drafts agree with the target.)"""
        return self.draft_select.pick(scores)

    def _draft(self, gamma: int, width: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Feed the draft what it has not seen, then draw `gamma` ids -> (drafted (B, G), their distributions
        (B, G, width) or None when greedy)."""
        for ids in self._draft_pending:
            logits = self.draft.advance(ids)
            self.stats.draft_forwards += 1
        self._draft_pending = []
        drafted, probs = [], []
        for i in range(gamma):
            scores = self.draft_select.scores(self.draft.sequence, logits)
            ids = self.propose(scores, i)
            drafted.append(ids)
            if not self.draft_select.greedy:
                probs.append(_fit(torch.softmax(scores, dim=-1), width))
            if i < gamma - 1:
                logits = self.draft.advance(ids)
                self.stats.draft_forwards += 1
        return torch.stack(drafted, dim=1), torch.stack(probs, dim=1) if probs else None

    def _target_scores(self, logits: torch.Tensor, base: int) -> torch.Tensor:
        """The target's logits (B, K, V) at the K fed positions -> processed scores, each with its own prefix
        (the sequence up to `base` + i for position i)."""
        if not self.target_select.per_position:
            return self.target_select.scores(self.target.sequence, logits)
        sequence = self.target.sequence
        return torch.stack(
            [self.target_select.scores(sequence[:, : base + i + 1], logits[:, i]) for i in range(logits.shape[1])],
            dim=1,
        )

    def round(self, last: torch.Tensor, gamma: int, active: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One round after emitted id `last` (B,), which neither LM has been fed: draft `gamma` ids, check them,
        roll back -> (the ids this round emits, on the CPU, (B, n) with 1 <= n <= gamma + 1; the last of them on
        the device). `active` (B,): rows not yet past a stop id (the others do not limit what is kept)."""
        drafted, draft_probs = self._draft(gamma, self.width)
        base = self.target.sequence.shape[1]  # ids before `last`
        logits = self.target.extend(torch.cat([last[:, None], drafted], dim=1))  # (B, G + 1, V)
        accepted, following = verify(drafted, draft_probs, self._target_scores(logits, base), self.generator)
        counted = torch.where(active, accepted, gamma)  # rows past a stop id keep anything
        summary = torch.stack([counted.min(), active.sum(), (accepted * active).sum()])
        # the one wait for the device in a round: what was kept, and every id that may be emitted
        on_host = torch.cat([summary, accepted, following, drafted.flatten()]).cpu()
        (kept, rows, agreed), rows_of = on_host[:3].tolist(), drafted.shape[0]
        host_accepted, host_following = on_host[3 : 3 + rows_of], on_host[3 + rows_of : 3 + 2 * rows_of]
        host_drafted = on_host[3 + 2 * rows_of :].view(rows_of, gamma)
        # a row that accepted more than `kept` emits its accepted draft there (see the module docstring)
        column = min(kept, gamma - 1)
        out = torch.where(accepted == kept, following, drafted[:, column])
        host_out = torch.where(host_accepted == kept, host_following, host_drafted[:, column])
        emitted = torch.cat([host_drafted[:, :kept], host_out[:, None]], dim=1)  # (B, kept + 1)
        fed_before = base - self.target.prompt_width
        self.target.keep(fed_before + 1 + kept)  # `last` and the kept drafts
        self.draft.keep(fed_before + 1 + column)  # it was fed `last` and the first gamma - 1 drafts
        self._draft_pending = [drafted[:, gamma - 1]] if kept == gamma else []
        self._draft_pending.append(out)
        stats = self.stats
        stats.rounds += 1
        stats.target_forwards += 1
        stats.drafted += gamma * rows
        stats.accepted += agreed
        self.length.update(kept == gamma)
        return emitted, out

    def first(self, target_logits: torch.Tensor) -> torch.Tensor:
        """The first id (B,), from the target's prefill logits (B, V) alone."""
        self.width = target_logits.shape[-1]
        ids = self.target_select(self.target.sequence, target_logits)
        self._draft_pending = [ids]
        return ids

    def single(self, last: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One target step after `last` with no draft (the last id of `max_new_tokens`), as `round` returns it."""
        logits = self.target.advance(last)
        self.stats.target_forwards += 1
        self._draft_pending.append(last)
        ids = self.target_select(self.target.sequence, logits)
        return ids[:, None].cpu(), ids


def _fit(probs: torch.Tensor, width: int) -> torch.Tensor:
    """Draft distributions (B, Vd) over the target's `width` ids: rows past the draft's have probability 0; the
    draft's extra rows (past the tokenizer, so suppressed) are dropped."""
    if probs.shape[-1] >= width:
        return probs[..., :width]
    return torch.nn.functional.pad(probs, (0, width - probs.shape[-1]))


@torch.inference_mode()
def generate_tokens_speculative(
    decoder: SpeculativeDecoder,
    target_logits: torch.Tensor,
    options: GenerationOptions,
    stops: Stops,
    pad_id: int,
) -> Iterator[torch.Tensor]:
    """Yield the next ids (B,), on the CPU, step by step, like `vlm.generation.loop.generate_tokens`, from
    `target_logits` (B, V) after both LMs' prefill."""
    last = decoder.first(target_logits)
    block = last[:, None].cpu()  # (B, n) ids to emit, on the host
    while True:
        for column in range(block.shape[1]):
            ids = torch.where(stops.finished, pad_id, block[:, column])
            decoder.stats.tokens += decoder.emitted > 0  # the first id came with the prompt's forward
            decoder.emitted += 1
            yield ids
            if stops.arrived(ids) or decoder.emitted >= options.max_new_tokens:
                return
        left = options.max_new_tokens - decoder.emitted
        gamma = min(decoder.length.current, left - 1)
        active = (~stops.finished).to(last.device)
        block, last = decoder.round(last, gamma, active) if gamma > 0 else decoder.single(last)
