"""Speculative decoding: a draft model proposes, the target checks, and the answer is the target's own.

Greedy decoding with a draft gives the target's tokens (200+ prompts with images, batch 1 and batches, every option);
sampling gives the target's distribution (an exact enumeration against 20,000 samples, and a wrong residual caught);
stops, max_new_tokens, bans, several images and turns behave as without a draft; a shared tower runs once.
"""

from __future__ import annotations

import itertools
import logging
import math
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoModelForCausalLM, AutoTokenizer

import vlm
from vlm.errors import ConfigError, InsufficientMemoryError, VLMError
from vlm.generation import speculative
from vlm.generation.loop import Stops
from vlm.generation.options import GenerationOptions
from vlm.generation.sampling import TokenSelector
from vlm.generation.speculative import DraftLength, SpeculativeDecoder, generate_tokens_speculative, verify
from vlm.modeling.loading import check_memory

from .conftest import make_adapter, save_tiny_llama


@pytest.fixture(autouse=True)
def one_thread():
    """These models and tables are tiny: one thread runs them fastest, and a second one waiting on a busy machine
    made each small kernel up to 70 times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --------------------------------------------------------------------------------------------------
# The acceptance rule on hand-made distributions


def test_greedy_verify_keeps_the_prefix_equal_to_the_argmax_and_follows_with_it():
    scores = torch.full((3, 4, 5), -1.0)  # (B, G + 1, V): argmax 2, 3, 1, 4 at the four positions
    for position, best in enumerate([2, 3, 1, 4]):
        scores[:, position, best] = 1.0
    drafted = torch.tensor([[2, 3, 1], [2, 0, 1], [0, 3, 1]])
    accepted, following = verify(drafted, None, scores)
    assert accepted.tolist() == [3, 1, 0]  # all (bonus next), the first only, none
    assert following.tolist() == [4, 3, 2]


def test_sampled_verify_accepts_with_p_over_q_and_resamples_from_the_residual():
    p = torch.tensor([0.5, 0.3, 0.2])
    q = torch.tensor([0.2, 0.6, 0.2])
    n = 20_000
    drafted = torch.ones((n, 1), dtype=torch.long)  # id 1: q = 0.6 > p = 0.3, so accepted half the time
    target = torch.log(torch.stack([p, p]))[None].expand(n, -1, -1)  # (n, 2, 3)
    accepted, following = verify(drafted, q[None, None].expand(n, 1, -1), target, torch.Generator().manual_seed(0))
    rate = accepted.float().mean().item()
    assert abs(rate - 0.5) < 4 * math.sqrt(0.25 / n)
    # a rejection is replaced from norm(max(0, p - q)) = [1, 0, 0]: always id 0
    assert set(following[accepted == 0].tolist()) == {0}
    # after an acceptance the bonus comes from p itself
    bonus = torch.bincount(following[accepted == 1], minlength=3).float()
    assert torch.allclose(bonus / bonus.sum(), p, atol=0.03)


def test_draft_length_adapts_by_one_within_bounds_and_a_fixed_one_stays():
    length = DraftLength()
    assert length.current == DraftLength.START
    for _ in range(10):
        length.update(all_accepted=True)
    assert length.current == DraftLength.MAX
    for _ in range(10):
        length.update(all_accepted=False)
    assert length.current == 1
    fixed = DraftLength(3)
    fixed.update(all_accepted=True)
    assert fixed.current == 3
    with pytest.raises(VLMError, match="draft_length"):
        DraftLength(0)


# --------------------------------------------------------------------------------------------------
# The output distribution: table LMs (logits from the last id and the position) make 20,000 samples cheap

VOCAB, PROMPT = 4, [0, 1]


class TableEngine:
    """A decode engine whose logits after id t at position n are table[t] + bias[n] (see `DecodeEngine`)."""

    use_cuda_graph = False

    def __init__(self, table: torch.Tensor, bias: torch.Tensor, batch_size: int):
        self.table, self.bias, self.batch_size, self.length = table, bias, batch_size, 0

    def prefill(self, embeds, attention_mask, position_ids):
        self.length = attention_mask.shape[1]
        return self.table[embeds[:, -1, 0].long()] + self.bias[position_ids[:, -1]]

    def step(self, ids, positions):
        self.length += 1
        return self.table[ids] + self.bias[positions]

    def extend(self, ids, positions):
        self.length += ids.shape[1]
        return self.table[ids] + self.bias[positions]

    def rollback(self, length):
        assert 0 <= length <= self.length
        self.length = length


def _tables(seed: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn((VOCAB, VOCAB), generator=g) * scale, torch.randn((64, VOCAB), generator=g) * scale


def _exact_target(options: GenerationOptions, table, bias) -> dict[tuple[int, ...], float]:
    """P(first three ids) of the target alone, by enumeration with the same token selector."""
    select = TokenSelector(options, None, [], torch.device("cpu"))
    out = {}
    for ids in itertools.product(range(VOCAB), repeat=3):
        probability, sequence = 1.0, list(PROMPT)
        for token in ids:
            logits = table[sequence[-1]] + bias[len(sequence) - 1]
            scores = select.scores(torch.tensor([sequence]), logits[None])
            probability *= torch.softmax(scores, -1)[0, token].item()
            sequence.append(token)
        out[ids] = probability
    return out


def _speculative_samples(options, target, draft, samples: int, rows: int) -> dict[tuple[int, ...], int]:
    """Counts of the first three ids over `samples` generations with the draft, `rows` at a time."""
    cpu = torch.device("cpu")
    selectors = (TokenSelector(options, None, [], cpu), TokenSelector(options, None, [], cpu))  # made once: one stream
    counts: dict[tuple[int, ...], int] = {}
    ids = torch.tensor([PROMPT] * rows)
    mask = torch.ones_like(ids)
    for _ in range(samples // rows):
        engines = (TableEngine(*target, rows), TableEngine(*draft, rows))
        embeds = ids[..., None].float()
        decoder, logits = SpeculativeDecoder.prefill(engines, (embeds, embeds), ids, mask, selectors, DraftLength(2))
        steps = list(generate_tokens_speculative(decoder, logits, options, Stops([-1], rows, cpu), pad_id=0))
        for row in torch.stack(steps, dim=1).tolist():
            counts[tuple(row)] = counts.get(tuple(row), 0) + 1
    return counts


def _total_variation(counts: dict[tuple[int, ...], int], exact: dict[tuple[int, ...], float]) -> float:
    n = sum(counts.values())
    return 0.5 * sum(abs(counts.get(k, 0) / n - p) for k, p in exact.items())


SAMPLES = 20_000


def _bound(outcomes: int, samples: int, delta: float = 1e-6) -> float:
    """A total-variation bound for an empirical distribution of `samples` draws over `outcomes` values, exceeded
    with probability below `delta`: E[TV] <= 1/2 sqrt(k / n) (Cauchy-Schwarz over sqrt(p(1-p)/n)), and TV moves by
    at most 1/n per draw, so McDiarmid adds sqrt(ln(1/delta) / 2n). 64 outcomes, 20,000 draws: 0.047."""
    return 0.5 * math.sqrt(outcomes / samples) + math.sqrt(math.log(1 / delta) / (2 * samples))


@pytest.mark.parametrize(
    "options",
    [
        GenerationOptions(max_new_tokens=3, temperature=0.7, top_p=0.9, seed=1),
        GenerationOptions(max_new_tokens=3, temperature=1.0, repetition_penalty=1.8, top_k=3, seed=2),
    ],
    ids=["temperature-top-p", "repetition-penalty-top-k"],
)
def test_sampling_with_a_draft_has_the_targets_distribution(options):
    target, draft = _tables(0, 1.5), _tables(1, 1.5)  # the draft disagrees often: many rejections
    exact = _exact_target(options, *target)
    counts = _speculative_samples(options, target, draft, SAMPLES, rows=2)
    assert _total_variation(counts, exact) < _bound(VOCAB**3, SAMPLES)


def test_a_residual_taken_as_p_is_caught(monkeypatch):
    """The same check fails when a rejected draft is replaced from p instead of norm(max(0, p - q))."""
    options = GenerationOptions(max_new_tokens=3, temperature=1.0, seed=3)
    target, draft = _tables(0, 1.5), _tables(1, 1.5)
    exact = _exact_target(options, *target)
    monkeypatch.setattr(speculative, "residual_distribution", lambda p, q: p)
    counts = _speculative_samples(options, target, draft, SAMPLES, rows=50)
    assert _total_variation(counts, exact) > 2 * _bound(VOCAB**3, SAMPLES)


def test_after_each_round_both_caches_hold_exactly_the_emitted_ids():
    """The target has been fed every emitted id but the last, the draft a prefix of them, and what the draft still
    has to be fed completes it: a rejected draft left in either cache would make the next round read a wrong prefix
    (the answers stay right, the draft only proposes worse)."""
    options = GenerationOptions(max_new_tokens=40, temperature=1.0, seed=4)
    cpu = torch.device("cpu")
    ids = torch.tensor([PROMPT])
    engines = (TableEngine(*_tables(0, 1.5), 1), TableEngine(*_tables(1, 1.5), 1))
    selectors = (TokenSelector(options, None, [], cpu), TokenSelector(options, None, [], cpu))
    embeds = ids[..., None].float()
    decoder, logits = SpeculativeDecoder.prefill(engines, (embeds, embeds), ids, torch.ones_like(ids), selectors,
                                                 DraftLength(3))  # fmt: skip
    last, emitted = decoder.first(logits), []
    emitted.append(int(last))
    for _ in range(12):
        block, last = decoder.round(last, 3, torch.ones(1, dtype=torch.bool))
        emitted += block[0].tolist()
        target, draft = decoder.target.sequence[0].tolist(), decoder.draft.sequence[0].tolist()
        assert target == PROMPT + emitted[:-1]
        pending = [int(p) for p in decoder._draft_pending]
        assert draft + pending == PROMPT + emitted
        assert (decoder.target.engine.length, decoder.draft.engine.length) == (len(target), len(draft))
    assert decoder.stats.accepted < decoder.stats.drafted  # rejections happened


# --------------------------------------------------------------------------------------------------
# Tiny models with images: greedy answers identical to the target's


@pytest.fixture(scope="module")
def drafts(tiny_dir: Path, tiny_lm_path: Path, tiny_clip_path: Path) -> dict[str, Path]:
    """Draft adapters on the target's tokenizer and tower: `copy` (the target's LM: every draft accepted),
    `near` (its weights with a little noise: some accepted), `random` (another LM: nearly none)."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_lm_path)
    out = {"copy": make_adapter(tiny_dir / "draft-copy", tiny_lm_path, tiny_clip_path)}
    near = tiny_dir / "lm-near"
    if not near.exists():
        lm = AutoModelForCausalLM.from_pretrained(tiny_lm_path)
        generator = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in lm.parameters():
                p.add_(torch.randn(p.shape, generator=generator) * 0.004)
        lm.save_pretrained(near)
        tokenizer.save_pretrained(near)
    out["near"] = make_adapter(tiny_dir / "draft-near", near, tiny_clip_path)
    other = tiny_dir / "lm-random"
    if not other.exists():
        tokenizer.save_pretrained(other)
        save_tiny_llama(other, tokenizer, rows=len(tokenizer) + 4, kv_heads=2, seed=7)
    out["random"] = make_adapter(tiny_dir / "draft-random", other, tiny_clip_path)
    return out


@pytest.fixture(scope="module")
def pictures(tmp_path_factory) -> list[Path]:
    rng = np.random.default_rng(5)
    folder = tmp_path_factory.mktemp("pictures")
    paths = []
    for i in range(10):
        size = (int(rng.integers(16, 64)), int(rng.integers(16, 64)))
        path = folder / f"p{i}.png"
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


QUESTIONS = [
    "What is in the image?",
    "Describe the image.",
    "What colour is the shape?",
    "Is there a red circle?",
    "图片里有什么?",
    "这个形状是什么颜色?",
    "A small",
    "The quick brown fox",
]
GREEDY_OPTIONS = [
    {"max_new_tokens": 16},
    {"max_new_tokens": 16, "repetition_penalty": 1.3},
    {"max_new_tokens": 16, "blocked_words": ["the", "red"]},
    {"max_new_tokens": 16, "stop": ["."]},
    {"max_new_tokens": 7, "repetition_penalty": 0.8, "blocked_words": ["图片"]},
]


@pytest.mark.parametrize("draft_name", ["copy", "near", "random"])
def test_greedy_answers_with_a_draft_are_the_targets(tiny_model, tiny_adapter, drafts, draft_name, pictures):
    """72 prompts with images per draft (216 in all): batch 1 and batches of 4, every option set, adaptive and
    fixed draft lengths."""
    model = vlm.load(tiny_adapter, device="cpu", draft=drafts[draft_name])
    pairs = [(pictures[i % len(pictures)], QUESTIONS[i % len(QUESTIONS)]) for i in range(72)]
    accepted = drafted = 0
    for start in range(0, len(pairs), 8):
        chunk = pairs[start : start + 8]
        options = GREEDY_OPTIONS[(start // 8) % len(GREEDY_OPTIONS)]
        model.draft_length = None if start % 16 else 3
        images, questions = [p for p, _ in chunk], [q for _, q in chunk]
        expected = tiny_model.ask_batch(images, questions, batch_size=4, **options)
        assert [model.ask(i, q, **options) for i, q in chunk[:4]] == expected[:4]  # batch 1
        assert model.ask_batch(images[4:], questions[4:], batch_size=4, **options) == expected[4:]  # a batch of 4
        drafted += model.last_speculation.drafted
        accepted += model.last_speculation.accepted
    rate = accepted / drafted
    assert {"copy": rate == 1.0, "near": 0.1 < rate < 0.9, "random": rate < 0.2}[draft_name], rate


def test_a_stop_id_or_string_inside_an_accepted_run_ends_the_answer_there(tiny_model, tiny_adapter, drafts, pictures):
    model = vlm.load(tiny_adapter, device="cpu", draft=drafts["copy"])
    model.draft_length = 6
    question = "Describe the image."
    full = tiny_model.ask(pictures[0], question, max_new_tokens=16)
    content = [{"type": "image", "image": pictures[0]}, question]
    chat = tiny_model.encode_messages([{"role": "user", "content": content}])
    batch = tiny_model.generation_batch([chat], 16)
    ids = [int(t) for t in tiny_model.generate_tokens(**batch, options=GenerationOptions(max_new_tokens=16))]
    at = next(i for i in range(4, 12) if ids[i] not in ids[:i])  # a stop id first met inside the second round
    stop_id = ids[at]
    for m in (model, tiny_model):
        m.processor.stop_ids = [*m.processor.stop_ids, stop_id]
    try:
        expected = tiny_model.ask(pictures[0], question, max_new_tokens=16)
        assert model.ask(pictures[0], question, max_new_tokens=16) == expected
        assert len(expected) < len(full)
        assert model.last_speculation.tokens == at  # the stop id (emitted, not shown) ended it; the first uncounted
    finally:
        for m in (model, tiny_model):
            m.processor.stop_ids = [i for i in m.processor.stop_ids if i != stop_id]
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    expected = tiny_model.ask(pictures[0], question, max_new_tokens=16, stop=[stop])
    assert model.ask(pictures[0], question, max_new_tokens=16, stop=[stop]) == expected
    assert stop not in expected and len(expected) < len(full)


@pytest.mark.parametrize("max_new_tokens", [1, 2, 3, 5, 6, 7, 11])
def test_max_new_tokens_cuts_the_answer_where_the_target_alone_does(tiny_model, tiny_adapter, drafts, pictures,
                                                                    max_new_tokens):  # fmt: skip
    model = vlm.load(tiny_adapter, device="cpu", draft=drafts["copy"])
    model.draft_length = 4
    expected = tiny_model.ask(pictures[1], "Describe the image.", max_new_tokens=max_new_tokens)
    assert model.ask(pictures[1], "Describe the image.", max_new_tokens=max_new_tokens) == expected
    assert model.last_speculation.tokens <= max_new_tokens - 1  # the first id is the prompt's


def test_a_rejected_first_draft_is_replaced_by_the_targets_token(tiny_model, tiny_adapter, drafts, pictures):
    model = vlm.load(tiny_adapter, device="cpu", draft=drafts["random"])
    model.draft_length = 1  # each round drafts one id: a rejection is a rejected first draft
    expected = tiny_model.ask(pictures[2], "What is in the image?", max_new_tokens=12)
    assert model.ask(pictures[2], "What is in the image?", max_new_tokens=12) == expected
    stats = model.last_speculation
    assert stats.accepted < stats.drafted and stats.rounds == stats.drafted


def test_a_blocked_word_a_draft_would_complete_is_banned_as_without_a_draft(tiny_model, tiny_adapter, drafts,
                                                                           pictures):  # fmt: skip
    model = vlm.load(tiny_adapter, device="cpu", draft=drafts["copy"])
    question = "The quick brown fox"
    plain = tiny_model.ask(pictures[3], question, max_new_tokens=16)
    words = [w.strip(".,!?") for w in plain.split() if len(w.strip(".,!?")) > 2]
    assert words, plain
    banned = tiny_model.ask(pictures[3], question, max_new_tokens=16, blocked_words=[words[0]])
    assert banned != plain
    assert model.ask(pictures[3], question, max_new_tokens=16, blocked_words=[words[0]]) == banned
    assert model.last_speculation.accepted == model.last_speculation.drafted  # the draft bans it the same way


def test_two_images_in_a_turn_and_a_second_turn(tiny_model, tiny_adapter, drafts, pictures):
    model = vlm.load(tiny_adapter, device="cpu", draft=drafts["near"])
    first = [{"type": "image", "image": pictures[4]}, {"type": "image", "image": pictures[5]}, "Compare them."]
    messages = [{"role": "user", "content": first}]
    reply = tiny_model.chat(messages, max_new_tokens=10)
    assert model.chat(messages, max_new_tokens=10) == reply
    messages += [{"role": "assistant", "content": reply}, {"role": "user", "content": "第二个呢?"}]
    assert model.chat(messages, max_new_tokens=10) == tiny_model.chat(messages, max_new_tokens=10)
    streamed = list(model.chat(messages, stream=True, max_new_tokens=10))
    assert "".join(streamed) == tiny_model.chat(messages, max_new_tokens=10)


# --------------------------------------------------------------------------------------------------
# One tower for both, checks and errors


def test_a_shared_tower_is_loaded_once_and_runs_once_per_image(tiny_adapter, drafts, pictures):
    model = vlm.load(tiny_adapter, device="cpu", draft=drafts["near"])
    assert model.draft.module.vision is model.module.vision
    calls = []
    handle = model.module.vision.register_forward_hook(lambda *_: calls.append(1))
    try:
        model.ask(pictures[0], "What is in the image?", max_new_tokens=4)
    finally:
        handle.remove()
    assert len(calls) == 1


def test_other_vision_settings_encode_twice_with_a_warning_and_answer_the_same(
    tiny_model, tiny_adapter, tiny_dir, tiny_lm_path, tiny_clip_path, pictures, caplog
):
    other = make_adapter(tiny_dir / "draft-layer", tiny_lm_path, tiny_clip_path, select_layer=-1)
    with caplog.at_level(logging.WARNING, logger="vlm.api"):
        model = vlm.load(tiny_adapter, device="cpu", draft=other)
    assert "vision settings differ" in caplog.text
    assert model.draft.module.vision is not model.module.vision
    expected = tiny_model.ask(pictures[6], "Describe the image.", max_new_tokens=10)
    assert model.ask(pictures[6], "Describe the image.", max_new_tokens=10) == expected


def test_a_draft_with_another_vocabulary_or_bad_length_is_refused(tiny_adapter, causallm_adapter):
    with pytest.raises(ConfigError, match="vocabulary"):
        vlm.load(tiny_adapter, device="cpu", draft=causallm_adapter)
    with pytest.raises(VLMError, match="draft_length"):
        vlm.load(tiny_adapter, device="cpu", draft=tiny_adapter, draft_length=0)
    model = vlm.load(tiny_adapter, device="cpu")
    with pytest.raises(ConfigError, match="own draft"):
        model.attach_draft(model)


def test_the_memory_check_counts_both_lms_and_says_what_to_do():
    def shape(hidden, layers, intermediate, vocab):
        return types.SimpleNamespace(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=hidden // 128,
                                     intermediate_size=intermediate, vocab_size=vocab)  # fmt: skip

    fourteen, seven = shape(5120, 40, 13696, 152064), shape(4096, 32, 11008, 151936)
    check_memory("CausalLM/14B", fourteen, torch.bfloat16, free_bytes=40 << 30)  # the 14B alone fits in 40 GiB
    with pytest.raises(InsufficientMemoryError) as error:
        check_memory("CausalLM/14B", fourteen, torch.bfloat16, free_bytes=40 << 30, draft=("CausalLM/7B", seven))
    message = str(error.value)
    assert "CausalLM/14B + the draft CausalLM/7B" in message and "without the draft" in message
    need = float(message.split("about ")[1].split(" GiB")[0])
    assert 41 < need < 45  # 14B + 7B weights in bf16 (about 43 GB) and the working reserve


def test_speculation_statistics_describe_the_latest_answer(tiny_adapter, drafts, pictures):
    model = vlm.load(tiny_adapter, device="cpu", draft=drafts["copy"])
    model.draft_length = 3
    model.ask(pictures[0], "Describe the image.", max_new_tokens=9)
    stats = model.last_speculation.as_dict()
    # the first id from the prompt's forward (not counted), then two rounds of 3 drafts + 1: 8 ids in 2 forwards
    assert stats["tokens"] == 8 and stats["target_forwards"] == 2 and stats["tokens_per_target_forward"] == 4.0
    assert stats["acceptance_rate"] == 1.0 and stats["rounds"] == 2
