"""The miniature world's draft LM (speculative decoding's cheaper proposer): built, cached and laid out like the LM.

The draft's quality is measured on the full world by `vlm-train --recipe toy` (its eval.json); these tests use the
micro world and tiny random models, and check what must hold whatever was learned.
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from projector_training.toy.backbones import (
    IGNORE_INDEX,
    ToyConfig,
    _agreement,
    _distillation_loss,
    _Encoder,
    _init_from_teacher,
    ensure_toy_world,
)


def _quiet(_: str) -> None:
    pass


@pytest.fixture(scope="module")
def micro_world(tmp_path_factory: pytest.TempPathFactory):
    return ensure_toy_world(tmp_path_factory.mktemp("micro_world"), config=ToyConfig.micro(), log=_quiet)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_draft_lm_is_cached_and_rebuilt_when_its_settings_or_the_lm_change(micro_world) -> None:
    root, config = micro_world.root, ToyConfig.micro()
    assert micro_world.built == ("world", "clip", "lm", "draft_lm")
    assert micro_world.draft_lm_dir == root / "draft_lm" and (root / "draft_lm" / "done.json").is_file()
    weights = _sha(micro_world.draft_lm_dir / "model.safetensors")

    again = ensure_toy_world(root, config=config, log=_quiet)
    assert again.built == () and again.draft_lm_metrics == micro_world.draft_lm_metrics

    # Interrupted (no marker): rebuilt alone, to the same weights (seeded CPU training).
    (root / "draft_lm" / "done.json").unlink()
    assert ensure_toy_world(root, config=config, log=_quiet).built == ("draft_lm",)
    assert _sha(micro_world.draft_lm_dir / "model.safetensors") == weights

    # Its own settings rebuild it alone; the LM's rebuild the LM and then the draft distilled from it.
    more_steps = dataclasses.replace(config, draft_steps=config.draft_steps + 1)
    assert ensure_toy_world(root, config=more_steps, log=_quiet).built == ("draft_lm",)
    assert _sha(micro_world.draft_lm_dir / "model.safetensors") != weights
    other_lm = dataclasses.replace(more_steps, lm_steps=config.lm_steps + 1)
    assert ensure_toy_world(root, config=other_lm, log=_quiet).built == ("lm", "draft_lm")
    assert ensure_toy_world(root, config=config, log=_quiet).built == ("lm", "draft_lm")
    assert _sha(micro_world.draft_lm_dir / "model.safetensors") == weights


def test_draft_lm_loads_with_the_targets_tokenizer_and_rows(micro_world) -> None:
    config = ToyConfig.micro()
    target_tokenizer = AutoTokenizer.from_pretrained(micro_world.lm_dir)
    draft_tokenizer = AutoTokenizer.from_pretrained(micro_world.draft_lm_dir)
    assert draft_tokenizer.get_vocab() == target_tokenizer.get_vocab()
    text = "<|im_start|>user\nWhat colour is the small red star?<|im_end|>\n<|im_start|>assistant\n"
    assert draft_tokenizer(text)["input_ids"] == target_tokenizer(text)["input_ids"]

    target = AutoModelForCausalLM.from_pretrained(micro_world.lm_dir)
    draft = AutoModelForCausalLM.from_pretrained(micro_world.draft_lm_dir)
    # The same rows, spare image row included, so ids (and the adapter's image id) mean the same in both.
    assert draft.get_input_embeddings().weight.shape[0] == target.get_input_embeddings().weight.shape[0]
    assert draft.get_output_embeddings().weight.shape[0] == target.get_output_embeddings().weight.shape[0]
    for name in ("bos_token_id", "eos_token_id", "pad_token_id", "rms_norm_eps", "tie_word_embeddings"):
        assert getattr(draft.config, name) == getattr(target.config, name), name
    assert (draft.config.hidden_size, draft.config.num_hidden_layers) == (config.draft_hidden, config.draft_layers)

    metrics = micro_world.draft_lm_metrics
    assert metrics["parameters"] == sum(p.numel() for p in draft.parameters())
    assert metrics["teacher_parameters"] == sum(p.numel() for p in target.parameters()) > metrics["parameters"]
    assert 0 < metrics["layer_cost_vs_teacher"] < 1
    assert metrics["initialised_from_layers"] is None  # narrower than the LM: trained from scratch
    assert metrics["n_tokens"] >= config.lm_eval_prompts and 0 <= metrics["token_agreement"] <= 1


def test_a_draft_deeper_than_the_lm_or_without_layers_is_refused() -> None:
    for layers in (0, ToyConfig().lm_layers + 1):
        with pytest.raises(ValueError, match="draft_layers must be 1 to lm_layers"):
            ToyConfig(draft_layers=layers)


def _tiny_llama(layers: int, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=layers, num_attention_heads=2
    )
    return LlamaForCausalLM(config).eval()


@torch.no_grad()
def test_a_half_depth_draft_starts_as_the_teacher_without_its_middle_layers() -> None:
    teacher, draft = _tiny_llama(layers=4, seed=0), _tiny_llama(layers=2, seed=1)
    assert _init_from_teacher(draft, teacher) == [0, 3]
    ids = torch.randint(64, (2, 9))  # (B, T)
    # The teacher run through layers 0 and 3 only computes what the draft computes.
    teacher.model.layers = torch.nn.ModuleList([teacher.model.layers[0], teacher.model.layers[3]])
    teacher.config.num_hidden_layers = 2
    torch.testing.assert_close(draft(ids, use_cache=False).logits, teacher(ids, use_cache=False).logits)
    assert _init_from_teacher(_tiny_llama(layers=3, seed=2), _tiny_llama(layers=4, seed=3)) == [0, 2, 3]
    assert _init_from_teacher(_tiny_llama(layers=1, seed=2), _tiny_llama(layers=4, seed=3)) == [0]


def test_distillation_loss_is_kl_plus_weighted_ce_at_the_answer_tokens_only() -> None:
    torch.manual_seed(0)
    teacher = torch.randn(2, 5, 7)  # (B, T, V)
    labels = torch.full((2, 5), IGNORE_INDEX)
    labels[0, 3], labels[1, 2], labels[1, 4] = 1, 6, 0  # predicted at positions (0, 2), (1, 1), (1, 3)
    # A draft equal to the teacher has no KL: what is left is the cross-entropy, by hand.
    log_p = teacher.log_softmax(-1)
    ce = -(log_p[0, 2, 1] + log_p[1, 1, 6] + log_p[1, 3, 0]) / 3
    torch.testing.assert_close(_distillation_loss(teacher, teacher, labels, ce_weight=0.5), 0.5 * ce)
    assert _distillation_loss(teacher, teacher, labels, ce_weight=0.0).item() == pytest.approx(0.0, abs=1e-6)
    # Outside the answer positions the draft may say anything.
    draft = teacher.clone()
    draft[0, 0], draft[1, 4] = torch.randn(7), torch.randn(7)
    torch.testing.assert_close(_distillation_loss(draft, teacher, labels, 0.5), 0.5 * ce)
    # At an answer position a different distribution costs its KL.
    draft[1, 1] = torch.zeros(7)
    kl = (log_p[1, 1].exp() * (log_p[1, 1] - torch.full((7,), -torch.log(torch.tensor(7.0))))).sum() / 3
    torch.testing.assert_close(_distillation_loss(draft, teacher, labels, 0.0), kl)


def test_agreement_of_the_lm_with_itself_is_total_and_with_another_model_is_not(micro_world) -> None:
    config = ToyConfig.micro()
    encoder = _Encoder(AutoTokenizer.from_pretrained(micro_world.lm_dir))
    target = AutoModelForCausalLM.from_pretrained(micro_world.lm_dir)
    itself = _agreement(target, target, encoder, config)
    assert itself["token_agreement"] == itself["answer_agreement"] == 1.0
    # At least the closing <|im_end|> of each of the prompts' answers is compared.
    assert itself["n_tokens"] >= config.lm_eval_prompts
    torch.manual_seed(0)
    stranger = LlamaForCausalLM(target.config).eval()
    other = _agreement(stranger, target, encoder, config)
    assert other["n_tokens"] == itself["n_tokens"] and other["token_agreement"] < 0.5


# ---------------------------------------------------------------- the toy-draft recipe

SHARED = (
    "vision_tower",
    "vision_backend",
    "vision_pretrained",
    "select_layer",
    "select_feature",
    "image_aspect",
    "vision_hidden_size",
    "image_token",
    "image_token_id",
    "system_prompt",
)
"""What the target and draft adapters must agree on to run the tower once per image and prompt alike."""


def test_the_draft_run_takes_the_target_runs_settings_but_its_own_lm_and_directory() -> None:
    from projector_training.recipes import RECIPES
    from projector_training.toy.recipe import DRAFT_STEPS, draft_run_config

    assert RECIPES["toy-draft"].output_dir == "runs/toy-draft"
    assert draft_run_config(RECIPES["toy"]) == RECIPES["toy-draft"]
    target = RECIPES["toy"].replace(output_dir="out/toy/", lm="my-lm", epochs=5, lr=3e-4, toy_world="micro")
    draft = draft_run_config(target)
    assert (draft.recipe, draft.output_dir, draft.lm) == ("toy-draft", "out/toy-draft", RECIPES["toy-draft"].lm)
    assert (draft.epochs, draft.lr, draft.toy_world, draft.seed) == (5, 3e-4, "micro", target.seed)
    # After the target's run, the draft's projector starts from the target's and trains for fewer steps
    started = draft_run_config(target, start_from=Path("out/toy"))
    assert (started.init_projector, started.max_steps, started.lr) == ("out/toy", DRAFT_STEPS, 3e-4)
    assert draft_run_config(target.replace(max_steps=7), start_from=Path("out/toy")).max_steps == 7
    assert draft_run_config(target.replace(init_projector="mine"), start_from=Path("out/toy")).init_projector == "mine"


def test_same_answers_counts_identical_answers_per_set() -> None:
    from projector_training.toy.evaluate import same_answers

    target = {"captions": ["a red star", "a blue circle"], "vqa": ["red", "star", "small", "blue"]}
    draft = {"captions": ["a red star", "a red circle"], "vqa": ["red", "star", "small", "Blue"]}
    assert same_answers(draft, target) == {"captions": 0.5, "vqa": 0.75, "all": round(4 / 6, 4)}
    assert same_answers(target, target) == {"captions": 1.0, "vqa": 1.0, "all": 1.0}
    with pytest.raises(ValueError, match="not to the same questions"):
        same_answers({"captions": ["a red star"], "vqa": draft["vqa"]}, target)


def test_toy_recipe_aligns_a_loadable_draft_that_shares_the_targets_vision_settings(tmp_path, monkeypatch) -> None:
    import json

    import vlm
    from projector_training.recipes import RECIPES
    from projector_training.toy.recipe import run_toy, run_toy_draft

    monkeypatch.setenv("VLM_TOY_CACHE", str(tmp_path / "cache"))
    cfg = RECIPES["toy"].replace(toy_world="micro", output_dir=str(tmp_path / "toy"), report_to="none")
    report = run_toy(cfg)
    target_dir, draft_dir = tmp_path / "toy", tmp_path / "toy-draft"
    world = ensure_toy_world(tmp_path / "cache" / "micro", config=ToyConfig.micro(), log=_quiet)
    assert world.built == ()

    target, draft = vlm.adapter.read_config(target_dir), vlm.adapter.read_config(draft_dir)
    assert {n: getattr(draft, n) for n in SHARED} == {n: getattr(target, n) for n in SHARED}
    assert (target.lm, draft.lm) == (str(world.lm_dir), str(world.draft_lm_dir))
    assert draft.lm_hidden_size == ToyConfig.micro().draft_hidden != target.lm_hidden_size
    model = vlm.load(draft_dir, device="cpu")
    image = next(world.images_dir.iterdir())
    assert isinstance(model.caption(image, max_new_tokens=4), str)

    own = json.loads((draft_dir / "eval.json").read_text())
    assert own["details"]["n"] == report["details"]["n"] and "answers" not in own["details"]
    summary = report["draft"]
    assert summary["dir"] == str(draft_dir) and summary["caption_exact_match"] == own["caption_exact_match"]
    assert summary["lm_agreement"] == {k: world.draft_lm_metrics[k] for k in summary["lm_agreement"]}
    assert set(summary["answers_equal_target"]) == {*report["details"]["n"], "all"}
    assert all(0 <= v <= 1 for v in summary["answers_equal_target"].values())
    # the draft proposing for the target: the target's own answers, whatever the (micro) draft proposes
    spec = summary["speculative"]
    assert set(spec["answers_identical_to_target"].values()) == {1.0}
    assert 0 <= spec["acceptance_rate"] <= 1 and spec["tokens_per_target_forward"] >= 1.0 and spec["tokens"] > 0
    assert json.loads((target_dir / "eval.json").read_text())["draft"] == summary

    # `vlm-train --recipe toy-draft` alone: the same adapter (seeded), with nothing to compare it with.
    alone = run_toy_draft(
        RECIPES["toy-draft"].replace(toy_world="micro", output_dir=str(tmp_path / "alone"), report_to="none")
    )
    assert alone["answers_equal_target"] is None and alone["speculative"] is None
    assert _sha(tmp_path / "alone" / "projector.safetensors") == _sha(draft_dir / "projector.safetensors")
