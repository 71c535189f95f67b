"""Every decode engine behind the one protocol: the same logits as transformers' own forward over the whole
sequence, and a rollback that forgets exactly the positions after it (what speculative decoding relies on)."""

from __future__ import annotations

import pytest
import torch

from vlm.generation.engine import EngineCache
from vlm.generation.plain import PlainEngine
from vlm.generation.static import StaticEngine

from .test_fast_decode import _lm


def _engine(kind: str, lm, batch: int):
    return PlainEngine(lm, batch) if kind == "plain" else StaticEngine(lm, batch, 256, use_cuda_graph=False)


def _full_logits(lm, embeds, mask, ids):
    """transformers' forward over prompt + `ids` at once -> (B, len(ids) + 1, V): the logits after each."""
    tokens = lm.get_input_embeddings()(ids)
    full_mask = torch.cat([mask, torch.ones_like(ids)], dim=1)
    positions = (full_mask.cumsum(-1) - 1).clamp(min=0)
    out = lm(inputs_embeds=torch.cat([embeds, tokens], 1), attention_mask=full_mask, position_ids=positions).logits
    return out[:, embeds.shape[1] - 1 :]


@pytest.mark.parametrize("kind", ["plain", "static"])
def test_engine_steps_and_rollback_match_transformers(kind):
    torch.manual_seed(1)
    lm = _lm()
    batch, length = 2, 6
    embeds = torch.randn(batch, length, 64)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[1, :2] = 0  # left padding
    start = (mask.cumsum(-1) - 1).clamp(min=0)
    kept, rejected = torch.randint(0, 96, (batch, 3)), torch.randint(0, 96, (batch, 2))
    with torch.inference_mode():
        engine = _engine(kind, lm, batch)
        first = engine.prefill(embeds, mask, start)
        assert engine.length == length
        for i in range(3):
            engine.step(kept[:, i], start[:, -1] + 1 + i)
        for i in range(2):  # drafted tokens that are then rejected
            engine.step(rejected[:, i], start[:, -1] + 4 + i)
        assert engine.length == length + 5
        engine.rollback(length + 3)
        assert engine.length == length + 3
        follow = torch.randint(0, 96, (batch,))
        after = engine.step(follow, start[:, -1] + 4)
        expected = _full_logits(lm, embeds, mask, torch.cat([kept, follow[:, None]], 1))
        torch.testing.assert_close(first, expected[:, 0], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(after, expected[:, -1], atol=1e-4, rtol=1e-4)
        with pytest.raises(ValueError, match="cannot roll back"):
            engine.rollback(length + 10)


def test_engine_choice_follows_the_decode_mode_and_reuses_the_static_cache():
    lm = _lm()
    engines = EngineCache(lm)
    cpu = torch.device("cpu")
    assert isinstance(engines.engine("auto", cpu, 2, 40), PlainEngine)  # no static decoding off the GPU by default
    assert isinstance(engines.engine("dynamic", cpu, 2, 40), PlainEngine)
    static = engines.engine("static", cpu, 2, 40)
    assert isinstance(static, StaticEngine) and static.max_len == 256 and not static.use_cuda_graph
    assert engines.engine("static", cpu, 2, 200) is static  # long enough: reused
    assert engines.engine("static", cpu, 2, 300).max_len == 512  # longer: a new one, rounded up
    longer = engines.static
    three = engines.engine("static", cpu, 3, 40)  # another batch size: a new one
    assert three.batch_size == 3 and three is not longer
    with pytest.raises(Exception, match="unknown decode mode 'fast'"):
        engines.engine("fast", cpu, 2, 40)


@pytest.mark.parametrize("kind", ["plain", "static"])
def test_extend_checks_several_ids_in_one_forward_and_rolls_back(kind):
    """What speculative decoding's check needs: K ids in one forward give the logits after each, as transformers'
    forward over the whole sequence does; a rollback then forgets the rejected ones and the next ids follow the
    kept ones."""
    torch.manual_seed(2)
    lm = _lm()
    batch, length = 2, 5
    embeds = torch.randn(batch, length, 64)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[0, :1] = 0  # left padding
    start = (mask.cumsum(-1) - 1).clamp(min=0)
    drafted = torch.randint(0, 96, (batch, 4))
    with torch.inference_mode():
        engine = _engine(kind, lm, batch)
        engine.prefill(embeds, mask, start)
        checked = engine.extend(drafted, start[:, -1:] + torch.arange(1, 5))  # (B, 4, V)
        assert checked.shape[:2] == (batch, 4) and engine.length == length + 4
        expected = _full_logits(lm, embeds, mask, drafted)
        torch.testing.assert_close(checked, expected[:, 1:], atol=1e-4, rtol=1e-4)
        engine.rollback(length + 2)  # the first two kept
        follow = torch.randint(0, 96, (batch, 3))
        again = engine.extend(follow, start[:, -1:] + torch.arange(3, 6))
        expected = _full_logits(lm, embeds, mask, torch.cat([drafted[:, :2], follow], 1))
        torch.testing.assert_close(again, expected[:, 3:], atol=1e-4, rtol=1e-4)
