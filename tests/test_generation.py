"""Streaming detokenisation: the pieces `TextAssembler` hands out, one id at a time, against decoding the
whole answer at once."""

from __future__ import annotations

import random
import re

import pytest

from vlm.generation import FILTERED, TextAssembler

TEXT = (
    "The red circle is on a white background. Les élèves ont vu 漢字 and ✓ marks; "
    "the BadWord sits here, and BADWORD there, a badwor-d is not one. The quick brown fox."
)


@pytest.fixture(scope="module")
def tokenizer(text_lm_path):
    """The tiny BPE, then CausalLM's real vocabulary."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(text_lm_path)


def stream(tokenizer, ids, stop=(), blocked=()):
    """Feed `ids` one at a time -> (pieces, the text handed out after each id, stopped early)."""
    assembler = TextAssembler(tokenizer, list(stop), list(blocked))
    pieces, shown = [], []
    for token in ids:
        pieces.append(assembler.add(token))
        shown.append("".join(pieces))
        if assembler.stopped:
            return pieces, shown, True
    pieces.append(assembler.finish())
    shown.append("".join(pieces))
    return pieces, shown, False


def filtered(text, blocked):
    """Whole-word replacement, for blocked words that start and end with a letter."""
    words = sorted(blocked, key=len, reverse=True)
    pattern = re.compile("|".join(rf"\b{re.escape(w)}\b" for w in words), re.IGNORECASE)
    return pattern.sub(FILTERED, text)


def test_pieces_add_up_to_the_whole_decode(tokenizer):
    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    assert any(len(tokenizer.decode([i])) == 1 and tokenizer.decode([i]) == "\ufffd" for i in ids)  # split chars
    pieces, shown, _ = stream(tokenizer, ids)
    assert shown[-1] == TEXT
    assert all("\ufffd" not in piece for piece in pieces)  # a character split across ids is never shown halved


def test_random_ids_with_special_tokens_match_the_whole_decode(tokenizer):
    rng = random.Random(0)
    special = tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>", "<|endoftext|>"])
    for _ in range(20):
        ids = [rng.choice(special) if rng.random() < 0.1 else rng.randrange(len(tokenizer) - 3) for _ in range(60)]
        _, shown, _ = stream(tokenizer, ids)
        assert shown[-1] == tokenizer.decode(ids, skip_special_tokens=True).rstrip("\ufffd")


def test_blocked_words_are_never_shown_even_in_part(tokenizer):
    blocked = ["badword", "red circle"]
    ids = tokenizer.encode(TEXT * 3, add_special_tokens=False)
    _, shown, _ = stream(tokenizer, ids, blocked=blocked)
    expected = filtered(TEXT * 3, blocked)
    assert shown[-1] == expected
    assert "badword" not in expected.lower() and expected.count(FILTERED) == 9
    assert all(expected.startswith(text) for text in shown)  # nothing shown is ever taken back


def test_blocked_words_are_whole_words(tokenizer):
    text = "The class assistant passed. Ass, ASS! a bad-ass idea"
    _, shown, _ = stream(tokenizer, tokenizer.encode(text, add_special_tokens=False), blocked=["ass"])
    assert shown[-1] == f"The class assistant passed. {FILTERED}, {FILTERED}! a bad-{FILTERED} idea"


@pytest.mark.parametrize("seed", range(6))
def test_overlapping_blocked_words_stream_as_the_whole_text_filters(tokenizer, seed):
    """A blocked word inside another, a word that runs on into a longer one, matches split across ids: what is
    shown never changes afterwards and ends as the whole text filtered at once."""
    rng = random.Random(seed)
    words = ["hell", "shellfish", "shell", "fish", "red", "red circle", "circle", "circles", "a", "sel", "fishy"]
    blocked = rng.sample(["hell", "shellfish", "fish", "red circle", "circle", "sel", "a"], 3)
    text = " ".join(rng.choice(words) for _ in range(80)) + rng.choice(["", ".", " shell"])
    _, shown, _ = stream(tokenizer, tokenizer.encode(text, add_special_tokens=False), blocked=blocked)
    assert shown[-1] == filtered(text, blocked)
    assert all(shown[-1].startswith(part) for part in shown)


def test_stop_string_ends_the_answer_before_it(tokenizer):
    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    _, shown, stopped = stream(tokenizer, ids, stop=["white back"], blocked=["badword"])
    assert stopped and shown[-1] == "The red circle is on a "
    assert all(shown[-1].startswith(text) for text in shown)


def test_each_id_costs_the_same_however_long_the_answer(tokenizer):
    """Only the ids since the last complete character are decoded again (and the word filter rescans only
    the last few characters), so a long answer does not slow down its own last tokens."""
    ids = tokenizer.encode(TEXT * 30, add_special_tokens=False)  # ~4,500 characters
    decoded_lengths = []
    decode = tokenizer.decode

    def counting_decode(token_ids, **kwargs):
        decoded_lengths.append(len(token_ids))
        return decode(token_ids, **kwargs)

    tokenizer.decode = counting_decode
    try:
        assembler = TextAssembler(tokenizer, ["never"], ["badword"])
        for token in ids:
            assembler.add(token)
            assert len(assembler.raw) - assembler.settled_raw < 40  # the filter's unsettled tail stays short
        assembler.finish()
    finally:
        del tokenizer.decode
    assert len(ids) > 1000 and max(decoded_lengths) <= 8  # the previous piece as context, a split character


def test_a_tokenizer_that_cleans_up_spaces_streams_the_text_uncleaned(tokenizer):
    """An old tokenizer config may ask decode to remove spaces before punctuation; done per piece it would
    lose characters at the cuts, so streaming shows the text as generated."""
    text = "A red , blue . and green ! shape ? It 's here ."
    ids = tokenizer.encode(text, add_special_tokens=False)
    force = "clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output"  # transformers 5, for BPE
    tokenizer.clean_up_tokenization_spaces = True
    setattr(tokenizer, force, True)
    try:
        assert tokenizer.decode(ids) != text  # the clean-up is on
        assert stream(tokenizer, ids)[1][-1] == text
    finally:
        tokenizer.clean_up_tokenization_spaces = False
        setattr(tokenizer, force, False)


def test_blocked_word_ids_are_banned_where_a_word_starts_not_inside_one(tokenizer):
    """The token-level ban matches whole words as the text filter does: after a space or a newline, not after a
    letter (blocking "red" must not stop the model from spelling a word that ends in those letters)."""
    import torch

    from vlm.generation import BlockedWordsProcessor

    processor = BlockedWordsProcessor(tokenizer, ["Red"], torch.device("cpu"))
    letter = tokenizer.encode("the", add_special_tokens=False)[-1]
    newline = tokenizer.encode("\n", add_special_tokens=False)[-1]
    assert re.search(r"\w$", tokenizer.decode([letter])) and tokenizer.decode([newline]) == "\n"
    spellings = ("red", "Red", "RED", " red", " Red", " RED")
    last_ids = {tokenizer.encode(s, add_special_tokens=False)[-1] for s in spellings}

    def banned(context, spelling):
        """Whether the id that would complete `spelling` right after `context` is banned."""
        ids = tokenizer.encode(spelling, add_special_tokens=False)
        scores = processor(torch.tensor([context + ids[:-1]]), torch.zeros(1, len(tokenizer) + 4))
        assert set(torch.isinf(scores[0]).nonzero().view(-1).tolist()) <= last_ids  # nothing else is touched
        return bool(torch.isinf(scores[0, ids[-1]]))

    for spelling in spellings[:3]:
        assert banned([newline], spelling) and not banned([letter], spelling)
        assert banned([letter], " " + spelling)
    assert not banned([newline], " green")


class BytesTokenizer:
    """Ids are byte strings (as a byte-level BPE's are): a token may end in half a UTF-8 character."""

    def __init__(self, pieces):
        self.pieces = pieces

    def decode(self, ids, **_):
        return b"".join(self.pieces[i] for i in ids).decode("utf-8", errors="replace")


def test_the_earliest_stop_string_wins_whatever_their_order(tokenizer):
    ids = tokenizer.encode("a small red star", add_special_tokens=False)
    for stop in (["sm", "all"], ["all", "sm"], ["red", "a sm"]):
        _, shown, stopped = stream(tokenizer, ids, stop=stop)
        assert stopped and shown[-1] == "a small red star"[: min("a small red star".find(s) for s in stop)]


def test_a_stop_string_completed_by_the_last_ids_is_still_cut():
    """The id that completes "END" also starts a character the answer never finishes: only `finish` decodes it."""
    tokenizer = BytesTokenizer([b"abc ", b"EN", b"D\xc3", b"more"])
    _, shown, _ = stream(tokenizer, [0, 1, 2], stop=["END"])
    assert shown[-1] == "abc "
    _, shown, _ = stream(tokenizer, [0, 1, 2, 3], stop=["Z"])
    assert shown[-1] == "abc END\ufffdmore"


def test_only_text_that_could_start_a_stop_string_is_held_back(tokenizer):
    ids = tokenizer.encode("the red circle", add_special_tokens=False)
    pieces, shown, _ = stream(tokenizer, ids, stop=["STOP"])
    assert pieces[0] == tokenizer.decode(ids[:1])  # nothing here can begin "STOP": shown at once
    _, shown, stopped = stream(BytesTokenizer([b"x S", b"T", b"OP"]), [0, 1, 2], stop=["STOP"])
    assert shown == ["x ", "x ", "x "] and stopped


def test_a_tokenizer_that_adds_a_leading_space_has_its_words_banned_after_other_words():
    """Llama-style tokenizers spell "ass" as "▁ass", the spaced token: it must be banned after a word too."""
    import torch
    from tokenizers import Tokenizer, decoders, models, normalizers
    from transformers import PreTrainedTokenizerFast

    from vlm.generation import BlockedWordsProcessor

    vocab = ["<unk>", "\n", "▁", "▁cool", "▁ass", "ass", "cl", "▁The", "a", "s", "c", "l", "o"]
    backend = Tokenizer(models.Unigram([(t, -1.0) for t in vocab], unk_id=0))
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.Strip(" ", 1, 0)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")
    assert tokenizer.convert_ids_to_tokens(tokenizer.encode("ass", add_special_tokens=False)) == ["▁ass"]
    processor = BlockedWordsProcessor(tokenizer, ["ass"], torch.device("cpu"))
    spaced = tokenizer.convert_tokens_to_ids("▁ass")
    for context in ("The cool", "The", "\n"):
        scores = processor(torch.tensor([tokenizer.encode(context, add_special_tokens=False)]), torch.zeros(1, 16))
        assert torch.isinf(scores[0, spaced]), context


CHINESE = "你真是个笨蛋！他说：笨蛋，别走。你好damn，damned 不算；ＤＡＭＮ 全角不算。ばか、バカ野郎。너는 바보야."


def test_chinese_japanese_and_korean_blocked_words_match_inside_text(tokenizer):
    """Chinese, Japanese and Korean write words without spaces (Korean glues particles on): a blocked word in
    those scripts matches wherever it appears, and a Latin word next to them is still a whole word; full-width
    punctuation ends a word like ASCII punctuation."""
    blocked = ["笨蛋", "damn", "バカ", "바보"]
    _, shown, _ = stream(tokenizer, tokenizer.encode(CHINESE, add_special_tokens=False), blocked=blocked)
    assert shown[-1] == (
        f"你真是个{FILTERED}！他说：{FILTERED}，别走。你好{FILTERED}，damned 不算；ＤＡＭＮ 全角不算。"
        f"ばか、{FILTERED}野郎。너는 {FILTERED}야."
    )
    assert all(shown[-1].startswith(text) for text in shown)  # nothing shown is ever taken back
    # English keeps whole-word matching against Latin letters and digits.
    _, shown, _ = stream(tokenizer, tokenizer.encode("class ass2 ass 课ass", add_special_tokens=False), blocked=["ass"])
    assert shown[-1] == f"class ass2 {FILTERED} 课{FILTERED}"


@pytest.fixture(scope="module")
def whole_character_tokenizer():
    """A tiny BPE that holds whole Chinese characters as ids, each apart from the next."""
    from projector_training.toy.tokenizer import build_tokenizer

    tokenizer = build_tokenizer(["，".join("你真是个笨蛋好"), "the damn thing, the dog"] * 20, vocab_size=400)
    assert [tokenizer.decode([i]) for i in tokenizer.encode("你真是个", add_special_tokens=False)] == list("你真是个")
    return tokenizer


@pytest.mark.parametrize("which", ["whole characters", "module tokenizer"])
def test_chinese_blocked_word_ids_are_banned_inside_chinese_text(which, whole_character_tokenizer, tokenizer):
    """The sampling ban agrees with the text filter: a Chinese word is banned right after Chinese characters and
    after full-width punctuation, and a Latin word right after a Chinese character (no Latin letter before it), but
    not inside a Latin word. Run on a tokenizer of whole Chinese characters, on the tiny BPE (bytes) and on
    CausalLM's real vocabulary (whole characters, words, and characters split into bytes, as 笨 is)."""
    import torch

    from vlm.generation import BlockedWordsProcessor

    tokenizer = whole_character_tokenizer if which == "whole characters" else tokenizer
    processor = BlockedWordsProcessor(tokenizer, ["笨蛋", "damn"], torch.device("cpu"))

    def banned(context: str, word: str) -> bool:
        """Whether any id of `word` is banned as it is generated after `context`, as the model would write it."""
        start = tokenizer.encode(context, add_special_tokens=False)
        ids = tokenizer.encode(context + word, add_special_tokens=False)
        word_ids = ids[len(start) :] if ids[: len(start)] == start else tokenizer.encode(word, add_special_tokens=False)
        hits = []
        for k, token in enumerate(word_ids):
            scores = processor(torch.tensor([start + word_ids[:k]]), torch.zeros(1, len(tokenizer) + 4))
            hits.append(bool(torch.isinf(scores[0, token])))
        return any(hits)

    assert banned("你真是个", "笨蛋") and banned("\n", "笨蛋") and banned("他说：", "笨蛋")
    assert banned("你好", "damn") and banned("\n", "damn")
    assert not banned("the", "damn") and not banned("你真是个", "笨") and not banned("你好", "dam")


def test_sampling_options_shape_the_next_token_distribution():
    """top-p, top-k, temperature and the repetition penalty each change what can be drawn, on a known distribution
    (probabilities 0.6, 0.3, 0.1): not just that some option was accepted."""
    import torch

    from vlm.generation import GenerationOptions, TokenSelector

    logits = torch.tensor([[0.6, 0.3, 0.1]]).log()  # (1, V)
    history = torch.tensor([[0]])  # (1, T): id 0 was generated before

    def draws(**options):
        select = TokenSelector(GenerationOptions(seed=0, **options), None, [], torch.device("cpu"))
        return {int(select(history, logits.clone())) for _ in range(300)}

    assert draws(temperature=1.0) == {0, 1, 2}
    assert draws(temperature=1.0, top_p=0.5) == {0}  # 0.6 covers the top 0.5 alone
    assert draws(temperature=1.0, top_k=2) == {0, 1}
    assert draws(temperature=0.05) == {0}  # nearly greedy
    assert draws(temperature=0.0) == {0} and draws(temperature=0.0, repetition_penalty=10.0) == {1}
