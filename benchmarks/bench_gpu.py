"""Ours against stock transformers LLaVA, same weights, same card, same run. Prints JSON.

Random weights in the exact CausalLM 14B / 7B shapes with a CLIP ViT-L/14-336 tower (no downloads):
speed does not depend on the values. Stock transformers is `LlavaForConditionalGeneration` built
around the *same* modules (no second copy of the weights), run with SDPA attention in bf16.

    python benchmarks/bench_gpu.py --models 14b,7b --profile --out benchmarks/results/h200/run.json
    python benchmarks/bench_gpu.py --tiny            # the same code on the CPU in seconds

Measured per model: stage-1 training samples/s, model FLOP utilisation and peak memory at each
power-of-two batch until out of memory, and the micro-batch `vlm-train` would choose; time to first
token (image + question, 610-token prompt); single-stream decode tokens/s and the time to the first fast
reply; batched captioning images/s; with --profile, where the time of a first token and of decode steps
goes (kernel time against wall time, heaviest kernels).
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import random
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vlm.api import VisionLanguageModel
from vlm.config import AdapterConfig
from vlm.generation import GenerationOptions
from vlm.generation.loop import Decoding, Stops
from vlm.generation.sampling import TokenSelector
from vlm.generation.speculative import DraftLength, SpeculativeDecoder, generate_tokens_speculative
from vlm.modeling.towers import HFCLIPTower

SHAPES = {
    "14b": {"hidden_size": 5120, "intermediate_size": 13696, "num_hidden_layers": 40, "num_attention_heads": 40,
            "vocab_size": 152064, "rms_norm_eps": 1e-6},
    "7b": {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
           "vocab_size": 151936, "rms_norm_eps": 1e-5},
    "tiny": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
             "vocab_size": 160, "rms_norm_eps": 1e-6},
    "tiny-draft": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                   "vocab_size": 160, "rms_norm_eps": 1e-6},
}  # fmt: skip
DRAFTS = {"14b": "7b", "tiny": "tiny-draft"}
"""The speculative section's pairs: target -> draft."""
CLIP_L336 = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
             "image_size": 336, "patch_size": 14}  # fmt: skip
CLIP_TINY = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3, "num_attention_heads": 4,
             "image_size": 32, "patch_size": 8}  # fmt: skip
TEXT_TOKENS = 34  # system prompt, question and answer around the image
LABEL_TOKENS = 12  # the answer
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


class _Vision(HFCLIPTower):
    """An HF CLIP tower around an in-memory random CLIPVisionModel."""

    def __init__(self, model: CLIPVisionModel):
        torch.nn.Module.__init__(self)
        self.select_layer, self.select_feature, self.aspect = -2, "patch", "pad"
        self.model = model
        config = model.config
        self.hidden_size, self.image_size, self.patch_size = config.hidden_size, config.image_size, config.patch_size
        self.mean = self.std = (0.5, 0.5, 0.5)
        self.freeze()


def build(
    size: str,
    device: torch.device,
    dtype: torch.dtype,
    image_token_id: int | None = None,
    vision: _Vision | None = None,
) -> tuple[VisionLanguageModel, Any]:
    """(ours, stock) sharing every weight. The image token's row defaults to the last; a `vision` tower given is
    shared (a draft's)."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    from projector_training.toy.tokenizer import build_tokenizer

    tiny = size.startswith("tiny")
    lm_config = LlamaConfig(**SHAPES[size], max_position_embeddings=8192, tie_word_embeddings=False)
    lm_config._attn_implementation = "sdpa"
    vision_config = CLIPVisionConfig(**(CLIP_TINY if tiny else CLIP_L336)) if vision is None else vision.model.config
    vision_config._attn_implementation = "sdpa"
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # allocate in the target dtype: a 14B fp32 detour would not fit an H100
    try:
        with torch.device(device):
            lm = LlamaForCausalLM(lm_config).eval()
            vision = vision or _Vision(CLIPVisionModel(vision_config))
    finally:
        torch.set_default_dtype(default_dtype)
    tokenizer = build_tokenizer(["user assistant system image text"], vocab_size=256 + 20)
    image_token_id = lm_config.vocab_size - 1 if image_token_id is None else image_token_id
    config = AdapterConfig(lm=f"random-{size}", vision_tower="random-clip", image_token_id=image_token_id)
    ours = VisionLanguageModel(config, vision, lm, tokenizer)
    ours.module.to(device)
    ours.module.projector.float()  # fp32 master weights, as in training
    # Random weights: decode a fixed number of tokens, never stopping early.
    ours.processor.stop_ids, ours.suppress_ids = [-1], [config.image_token_id]

    with torch.device("meta"):
        stock = LlavaForConditionalGeneration(
            LlavaConfig(
                vision_config=vision_config.to_dict(),
                text_config=lm_config.to_dict(),
                image_token_id=config.image_token_id,
                vision_feature_layer=-2,
                vision_feature_select_strategy="default",
                image_seq_length=ours.num_image_tokens,
            )
        )
    stock.model.vision_tower = vision.model
    stock.model.multi_modal_projector.linear_1 = ours.module.projector[0]
    stock.model.multi_modal_projector.linear_2 = ours.module.projector[2]
    stock.model.language_model = lm.model
    stock.lm_head = lm.lm_head
    stock.config._attn_implementation = "sdpa"
    return ours, stock.eval()


def inputs(ours: VisionLanguageModel, batch: int, device: torch.device, seed: int = 0) -> dict[str, torch.Tensor]:
    """`batch` prompts of one image + TEXT_TOKENS text tokens, with the answer labelled."""
    g = torch.Generator().manual_seed(seed)
    n = ours.num_image_tokens
    text = torch.randint(0, ours.config.image_token_id - 1, (batch, TEXT_TOKENS), generator=g)
    image = torch.full((batch, n), ours.config.image_token_id)
    ids = torch.cat([text[:, :8], image, text[:, 8:]], dim=1)  # system prompt, image, question + answer
    labels = torch.full_like(ids, -100)
    labels[:, -LABEL_TOKENS:] = ids[:, -LABEL_TOKENS:]
    size = ours.module.vision.image_size
    pixels = torch.randn((batch, 3, size, size), generator=g)
    return {
        "input_ids": ids.to(device),
        "labels": labels.to(device),
        "pixel_values": pixels.to(device, ours.module.vision_dtype),
        "attention_mask": torch.ones_like(ids).to(device),
    }


def code_version() -> str:
    """A digest of the library and benchmark sources, so a result names the code it measured (the device
    machine gets a copy of the working tree without its git history)."""
    root = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for path in sorted([*root.glob("vlm/*.py"), Path(__file__).resolve()]):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:12]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any], device: torch.device, repeats: int, warmup: int) -> float:
    """Median seconds of `fn` after `warmup` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def profiled(fn: Callable[[], Any], device: torch.device, top: int = 8) -> dict[str, Any]:
    """Where the time of one call goes: wall time, device kernel time (how busy the card was; the rest is
    the host launching work or waiting) and the heaviest kernels (host ops on the CPU)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    fn()  # warm
    with profile(activities=activities) as prof:
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        wall = time.perf_counter() - start
    return summarize_profile(prof.key_averages(), wall, on_device=device.type == "cuda", top=top)


def summarize_profile(rows: Sequence[Any], wall_s: float, on_device: bool, top: int = 8) -> dict[str, Any]:
    """`profiled`'s report from the profiler's rows. On a GPU it reads only the kernel rows (and copies and
    memsets): the host op that launched a kernel carries that kernel's device time too, so counting both
    rows would count the time, and the launch, twice."""
    from torch.autograd import DeviceType

    result: dict[str, Any] = {"wall_ms": round(wall_s * 1e3, 2)}
    if on_device:
        kernels = [r for r in rows if r.device_type != DeviceType.CPU and r.self_device_time_total > 0]
        busy = sum(r.self_device_time_total for r in kernels) / 1e3
        result |= {"kernel_ms": round(busy, 2), "busy": round(busy / (wall_s * 1e3), 3)}
        result["kernel_launches"] = sum(r.count for r in kernels)
        rows, key = kernels, "self_device_time_total"
    else:
        key = "self_cpu_time_total"
    heaviest = sorted(rows, key=lambda r: getattr(r, key), reverse=True)[:top]
    result["heaviest"] = [[r.key[:90], r.count, round(getattr(r, key) / 1e3, 3)] for r in heaviest]
    return result


def flops_per_sample(ours: VisionLanguageModel) -> float:
    """Model FLOPs of one training sample: LM forward + input-gradient backward, plus the tower forward.
    The same count for both sides, so utilisation ratios equal speed ratios."""
    lm_params = sum(p.numel() for n, p in ours.module.lm.named_parameters() if "embed_tokens" not in n)
    vision_params = sum(p.numel() for p in ours.module.vision.parameters())
    tokens = ours.num_image_tokens + TEXT_TOKENS
    return 2 * 2 * lm_params * tokens + 2 * vision_params * (ours.num_image_tokens + 1)


def bench_training(
    ours, stock, device, batches: list[int], repeats: int, peak: float | None, compiled: bool
) -> dict[str, Any]:
    """Samples/s, peak memory and MFU at each batch until out of memory: stock, ours, and with `compiled`
    ours with its LM decoder layers through torch.compile (`ours_compiled`, compile time excluded)."""
    params = list(ours.module.projector.parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    sides = [("stock", stock), ("ours", ours)] + ([("ours_compiled", ours)] if compiled else [])
    results: dict[str, Any] = {side: {} for side, _ in sides}
    for side, model in sides:
        ours.module.compile_lm_layers(side == "ours_compiled")  # stock shares these layers: undone for the others
        for batch in batches:
            data = inputs(ours, batch, device)

            def step(model=model, data=data) -> None:
                with autocast:
                    if model is ours:
                        loss = ours.module(data["input_ids"], None, data["pixel_values"], labels=data["labels"]).loss
                    else:
                        loss = stock(
                            input_ids=data["input_ids"], pixel_values=data["pixel_values"], labels=data["labels"]
                        ).loss
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            try:
                seconds = timed(step, device, repeats, warmup=2)
            except torch.OutOfMemoryError:
                optimizer.zero_grad(set_to_none=True)
                results[side][str(batch)] = "out of memory"
                break
            entry = {"samples_per_s": round(batch / seconds, 2)}
            if device.type == "cuda":
                entry["peak_memory_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 1)
            if peak:
                entry["mfu"] = round(flops_per_sample(ours) * batch / seconds / peak, 3)
            results[side][str(batch)] = entry
    ours.module.compile_lm_layers(False)
    results["auto_micro_batch"] = auto_micro_batch(ours, device, max(batches))
    for side, _ in sides:
        fits = {int(b): r for b, r in results[side].items() if isinstance(r, dict)}
        results[side]["best"] = {"batch": max(fits), **fits[max(fits)]} if fits else None
    for side, _ in sides[1:]:
        if results[side]["best"] and results["stock"]["best"]:
            key = "speedup_at_largest_batch" + side.removeprefix("ours")
            speedup = results[side]["best"]["samples_per_s"] / results["stock"]["best"]["samples_per_s"]
            results[key] = round(speedup, 3)
    return results


def auto_micro_batch(ours: VisionLanguageModel, device: torch.device, largest: int) -> dict[str, Any]:
    """What `vlm-train` would choose on this card for these samples: its own search (projector_training.memory),
    halving from `largest` without gradient checkpointing, then with it."""
    from projector_training.memory import candidate_micro_batches, fit_micro_batch, try_training_pass

    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def fits(batch: int) -> bool:
        data = inputs(ours, batch, device)

        def loss() -> torch.Tensor:
            with autocast:
                return ours.module(data["input_ids"], None, data["pixel_values"], labels=data["labels"]).loss

        return try_training_pass(ours.module, loss, device)

    candidates = candidate_micro_batches(largest, largest)
    log = lambda message: print(message, file=sys.stderr)  # noqa: E731 - stdout carries only the JSON
    batch, checkpointing = fit_micro_batch(candidates, fits, ours.module.enable_gradient_checkpointing, False, log)
    ours.module.enable_gradient_checkpointing(False)
    return {"micro_batch": batch, "gradient_checkpointing": checkpointing}


def step_matrices(ours: VisionLanguageModel) -> list[torch.Tensor]:
    """The weight matrices a single-stream decode step reads, as the step reads them: per layer the fused
    q/k/v, the output projection, the fused gate/up and the down projection (the modules' own where a group
    is not fused), then the LM head."""
    from vlm.generation.static import fuse_projections

    matrices = []
    for layer, (qkv, _, gate_up, _) in zip(
        ours.module.lm.get_decoder().layers, fuse_projections(ours.module.lm), strict=True
    ):
        attn, mlp = layer.self_attn, layer.mlp
        matrices += [qkv] if qkv is not None else [attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]
        matrices.append(attn.o_proj.weight)
        matrices += [gate_up] if gate_up is not None else [mlp.gate_proj.weight, mlp.up_proj.weight]
        matrices.append(mlp.down_proj.weight)
    return [m.detach() for m in matrices] + [ours.module.lm.get_output_embeddings().weight.detach()]


@torch.inference_mode()
def decode_floor(ours: VisionLanguageModel, device: torch.device, repeats: int) -> dict[str, Any]:
    """The floor under a single-stream decode step: only its matrix-vector products, each as the step runs
    it (`F.linear` of one row), back to back in one CUDA graph. Norms, rotary, attention, cache writes and
    sampling come on top, so `tokens_per_s` is what decoding could reach if they cost nothing; `gemv_tb_s`
    is the weights' bytes over that time and `copy_tb_s` a plain device copy's bandwidth, for scale. `mv_ms`
    times the same products as `torch.mv`, which may pick other kernels."""
    matrices = step_matrices(ours)
    weight_bytes = sum(m.numel() * m.element_size() for m in matrices)
    rows = [torch.randn((1, m.shape[1]), device=device, dtype=m.dtype) for m in matrices]

    def products(product: Callable[[torch.Tensor, torch.Tensor], Any]) -> float:
        def run() -> None:
            for row, matrix in zip(rows, matrices, strict=True):
                product(row, matrix)

        if device.type == "cuda":
            from vlm.modeling.cuda_graphs import capture_graph

            run = capture_graph(run)[0].replay
        return timed(run, device, repeats=max(repeats, 10), warmup=3)

    step_s = products(torch.nn.functional.linear)
    mv_s = products(lambda row, matrix: torch.mv(matrix, row[0]))  # another kernel choice for the same product
    source = torch.empty(max(min(weight_bytes, 2**30), 2**26) // 2, dtype=torch.bfloat16, device=device)  # 64 MiB-1 GiB
    target = torch.empty_like(source)
    copy_s = timed(lambda: target.copy_(source), device, repeats=max(repeats, 10), warmup=3)
    copied_bytes = 2 * source.numel() * source.element_size()  # read and written
    return {
        "weights_gb": round(weight_bytes / 1e9, 2),
        "gemv_ms": round(step_s * 1e3, 3),
        "gemv_tb_s": round(weight_bytes / step_s / 1e12, 3),
        "mv_ms": round(mv_s * 1e3, 3),
        "copy_tb_s": round(copied_bytes / copy_s / 1e12, 3),
        "tokens_per_s": round(1 / step_s, 1),
    }


@torch.inference_mode()
def bench_generation(
    ours,
    stock,
    device,
    decode_tokens: int,
    caption_images: int,
    caption_tokens: int,
    repeats: int,
    modes: list[str],
    profile: bool = False,
):
    """Per decode mode of ours (the first is reported as `ours`, others as `ours_<mode>`): the first fast
    reply, time to first token, single-stream tokens/s and batched captioning, each against stock. With `profile`,
    where the time of a first token and of 16 decode steps goes (see `profiled`)."""
    ours.module.projector.to(ours.dtype)  # inference runs the projector in the LM's dtype, for both sides
    one = inputs(ours, 1, device)
    prompt = {k: one[k] for k in ("input_ids", "attention_mask", "pixel_values")}
    stock_kwargs = {"do_sample": False, "eos_token_id": None, "pad_token_id": 0}
    results: dict[str, Any] = {"prompt_tokens": int(one["input_ids"].shape[1])}

    def ours_first_token() -> None:
        next(ours.generate_tokens(**prompt, options=GenerationOptions(max_new_tokens=1)))

    def stock_first_token() -> None:
        stock.generate(**prompt, max_new_tokens=1, **stock_kwargs)

    results["ttft_ms"] = {"stock": round(timed(stock_first_token, device, repeats, warmup=2) * 1e3, 1)}

    def ours_16_tokens() -> None:
        for _ in ours.generate_tokens(**prompt, options=GenerationOptions(max_new_tokens=17)):
            pass

    def ours_decode() -> list[float]:
        stamps = []
        for _ in ours.generate_tokens(**prompt, options=GenerationOptions(max_new_tokens=decode_tokens + 1)):
            stamps.append(time.perf_counter())  # the ids arrive on the host (the next step may be running)
        return stamps

    class Stamps:
        """A transformers streamer that only records when each new token arrives."""

        def __init__(self) -> None:
            self.stamps: list[float] = []
            self.prompt_seen = False

        def put(self, value: torch.Tensor) -> None:
            if self.prompt_seen:
                sync(device)
                self.stamps.append(time.perf_counter())
            self.prompt_seen = True

        def end(self) -> None:
            pass

    def stock_decode() -> list[float]:
        streamer = Stamps()
        stock.generate(
            **prompt,
            max_new_tokens=decode_tokens + 1,
            min_new_tokens=decode_tokens + 1,
            streamer=streamer,
            **stock_kwargs,
        )
        return streamer.stamps

    def rate(run: Callable[[], list[float]]) -> float:
        """Tokens/s between the first and the last new token, best of three runs."""
        return max(decode_tokens / (s[-1] - s[0]) for s in (run() for _ in range(3)))

    many = inputs(ours, caption_images, device, seed=1)
    batch = {k: many[k] for k in ("input_ids", "attention_mask", "pixel_values")}

    def ours_captions() -> None:
        for _ in ours.generate_tokens(**batch, options=GenerationOptions(max_new_tokens=caption_tokens)):
            pass

    def stock_captions() -> None:
        stock.generate(**batch, max_new_tokens=caption_tokens, min_new_tokens=caption_tokens, **stock_kwargs)

    stock_s = timed(stock_captions, device, repeats=2, warmup=1)
    results["decode_tokens_per_s"] = {"stock": round(rate(stock_decode), 1), "tokens": decode_tokens}
    results["first_fast_reply_s"] = {"tokens": decode_tokens + 1}
    results["batched_captioning"] = {
        "images": caption_images,
        "new_tokens": caption_tokens,
        "stock_images_per_s": round(caption_images / stock_s, 2),
    }
    results["decode_floor"] = decode_floor(ours, device, repeats)
    for i, mode in enumerate(modes):
        key = "ours" if i == 0 else f"ours_{mode}"
        ours.decode_mode = mode
        sync(device)
        start = time.perf_counter()
        stamps = ours_decode()  # the first call allocates the static cache, compiles (if asked), captures graphs
        results["first_fast_reply_s"][key] = round(time.perf_counter() - start, 2)
        # of which: the prompt (its compile, the tower's capture) and the first step (its compile and capture)
        results["first_fast_reply_s"][f"{key}_first_token"] = round(stamps[0] - start, 2)
        results["first_fast_reply_s"][f"{key}_first_step"] = round(stamps[1] - stamps[0], 2)
        results["ttft_ms"][key] = round(timed(ours_first_token, device, repeats, warmup=2) * 1e3, 1)
        results["decode_tokens_per_s"][key] = round(rate(ours_decode), 1)
        ours_s = timed(ours_captions, device, repeats=2, warmup=1)
        results["batched_captioning"][f"{key}_images_per_s"] = round(caption_images / ours_s, 2)
        results["batched_captioning"][f"{key}_speedup"] = round(stock_s / ours_s, 3)
        results.setdefault("decode_modes", {})[key] = mode
        results["decode_floor"][f"{key}_share"] = round(
            results["decode_tokens_per_s"][key] / results["decode_floor"]["tokens_per_s"], 3
        )
        if profile:
            results.setdefault("profile", {})[f"{key}_first_token"] = profiled(ours_first_token, device)
            results["profile"][f"{key}_16_tokens"] = profiled(ours_16_tokens, device)
    if profile:
        results["profile"]["stock_first_token"] = profiled(stock_first_token, device)
    return results


def speculative_section(
    size: str, target: VisionLanguageModel, device: torch.device, dtype: torch.dtype, args: argparse.Namespace
) -> dict[str, Any]:
    """Build the draft beside `target` (sharing its tower and image token row, see `shared_image_row`) and
    measure."""
    draft_size = DRAFTS[size]
    draft, _ = build(draft_size, device, dtype, image_token_id=target.config.image_token_id,
                     vision=target.module.vision)  # fmt: skip
    draft.processor.stop_ids, draft.suppress_ids = [-1], [draft.config.image_token_id]
    # Random weights may pick any row; the target's rows past the draft's (the 14B has more) have no draft embedding
    # (a real tokenizer stops below both).
    rows = (SHAPES[draft_size]["vocab_size"], SHAPES[size]["vocab_size"])
    target.suppress_ids = sorted({target.config.image_token_id, *range(*rows)})
    plant_next_token_rule(target.module.lm, target.config.image_token_id)
    return {
        "target": size,
        "draft": draft_size,
        **bench_speculative(
            target, draft, device,
            tokens=16 if args.tiny else args.decode_tokens,
            alphas=[float(a) for a in args.alphas.split(",")],
            gammas=[int(g) for g in args.gammas.split(",")],
            repeats=2 if args.tiny else args.repeats,
        ),
    }  # fmt: skip


@torch.no_grad()
def plant_next_token_rule(lm: torch.nn.Module, rows: int) -> None:
    """Make greedy decoding of a random LM stable: id t's embedding gets a large random direction u_t, and the
    output row of id f(t) = (7919 t + 1) mod `rows` is u_t, so after any id below `rows` the argmax is f(t) by a
    wide margin. Fully random logits are near-ties that a forward over several positions rounds differently in
    bf16, so a plain run's greedy tokens would not be what the checking forward picks; the shapes, and so the
    speed, are unchanged."""
    embeddings, output = lm.get_input_embeddings().weight, lm.get_output_embeddings().weight
    generator = torch.Generator(device=embeddings.device).manual_seed(0)
    ids = torch.arange(rows, device=embeddings.device)
    for chunk in ids.split(16384):  # (C, H) at a time: the whole table in fp32 would be 3 GB at 14B
        directions = torch.randn((len(chunk), embeddings.shape[1]), generator=generator, device=chunk.device)
        directions = directions / directions.norm(dim=1, keepdim=True)
        embeddings[chunk] = (directions * 1e4).to(embeddings.dtype)
        output[(chunk * 7919 + 1) % rows] = directions.to(output.dtype)


def shared_image_row(size: str) -> int:
    """An image token row that the target and its draft both have (the 7B has fewer rows than the 14B)."""
    return min(SHAPES[size]["vocab_size"], SHAPES[DRAFTS[size]]["vocab_size"]) - 1


class ControlledDraft(SpeculativeDecoder):
    """Random drafts agree with nothing, so acceptance is set instead: the draft's forward passes run as always,
    but the id it proposes is the target's own greedy id at that position (`reference`, from a plain run) with
    probability `alpha`, else another id."""

    reference: ClassVar[list[int]] = []
    alpha: ClassVar[float] = 1.0
    rng: ClassVar[random.Random] = random.Random(0)

    def propose(self, scores: torch.Tensor, index: int) -> torch.Tensor:
        position = self.emitted + index  # the index of this drafted token among the answer's
        wanted = self.reference[min(position, len(self.reference) - 1)]
        if self.rng.random() >= self.alpha:
            wanted = (wanted + 1) % 200  # another id, below every model's spare rows
        return torch.full((scores.shape[0],), wanted, dtype=torch.long, device=scores.device)


def _speculative_run(
    target: VisionLanguageModel, draft: VisionLanguageModel, prompt: dict[str, Any], options: GenerationOptions
) -> tuple[list[float], list[int], dict[str, Any]]:
    """One greedy generation with the controlled draft (the facade's path, with `ControlledDraft` as the
    decoder) -> arrival time of each token, the tokens, the decoder's statistics."""
    ids, mask, pixels = prompt["input_ids"], prompt["attention_mask"], prompt["pixel_values"]
    rows, width = ids.shape
    engine = target.engine(rows, width + options.max_new_tokens)
    draft_engine = draft.engine(rows, width + options.max_new_tokens)
    features = target.module.image_features(pixels, graphed=engine.use_cuda_graph)
    embeds = (target.module.embed(ids, None, features=features), draft.module.embed(ids, None, features=features))
    selectors = tuple(TokenSelector(options, m.tokenizer, m.suppress_ids, target.device) for m in (target, draft))
    decoder, logits = ControlledDraft.prefill(
        (engine, draft_engine), embeds, ids, mask, selectors, DraftLength(target.draft_length)
    )
    stops = Stops([-1], rows, target.device)
    stamps, tokens = [], []
    for step in generate_tokens_speculative(decoder, logits, options, stops, pad_id=0):
        stamps.append(time.perf_counter())
        tokens.append(int(step[0]))
    return stamps, tokens, decoder.stats.as_dict()


def _plain_run(model: VisionLanguageModel, prompt: dict[str, Any], options: GenerationOptions) -> tuple[list, list]:
    stamps, tokens = [], []
    for step in model.generate_tokens(**prompt, options=options):
        stamps.append(time.perf_counter())
        tokens.append(int(step[0]))
    return stamps, tokens


def verify_cost(target: VisionLanguageModel, prompt: dict[str, Any], widths: Sequence[int], repeats: int) -> dict:
    """Seconds of the target checking K positions in one forward (`extend`), relative to one decode step."""
    device, ids = target.device, prompt["input_ids"]
    engine = target.engine(1, ids.shape[1] + 64)
    decoding = Decoding(engine, ids, prompt["attention_mask"])
    engine.prefill(target.module.embed(ids, prompt["pixel_values"]), prompt["attention_mask"], decoding.position_ids)
    start = engine.length
    token = torch.zeros((1,), dtype=torch.long, device=device)

    def step() -> None:
        engine.step(token, torch.full((1,), start, device=device))
        engine.rollback(start)

    def extend(width: int) -> Callable[[], None]:
        def run() -> None:
            engine.extend(token.repeat(1, width), torch.arange(start, start + width, device=device)[None])
            engine.rollback(start)

        return run

    one = timed(step, device, repeats * 4, warmup=3)
    out: dict[str, Any] = {"step_ms": round(one * 1e3, 3)}
    for width in widths:
        out[str(width)] = round(timed(extend(width), device, repeats * 4, warmup=3) / one, 3)
    return out


@torch.inference_mode()
def bench_speculative(
    target: VisionLanguageModel,
    draft: VisionLanguageModel,
    device: torch.device,
    tokens: int,
    alphas: Sequence[float],
    gammas: Sequence[int],
    repeats: int,
) -> dict[str, Any]:
    """Greedy single-stream decoding of the target with the draft at controlled acceptance `alpha` and draft
    length `gamma`, against the target alone, in the same run (see `ControlledDraft`)."""
    for model in (target, draft):
        model.module.projector.to(model.dtype)
        model.decode_mode = "cuda_graph" if device.type == "cuda" else "static"
    prompt = {k: v for k, v in inputs(target, 1, device).items() if k != "labels"}
    options = GenerationOptions(max_new_tokens=tokens + 1)

    def rate(stamps: list[float]) -> float:
        return tokens / (stamps[-1] - stamps[0])

    _plain_run(target, prompt, options)  # allocate the cache, capture the graphs
    plain = [_plain_run(target, prompt, options) for _ in range(3)]
    reference = plain[0][1]
    _plain_run(draft, prompt, options)
    draft_rate = max(rate(_plain_run(draft, prompt, options)[0]) for _ in range(3))
    plain_rate = max(rate(stamps) for stamps, _ in plain)
    results: dict[str, Any] = {
        "tokens": tokens,
        "plain_tokens_per_s": round(plain_rate, 1),
        "draft_plain_tokens_per_s": round(draft_rate, 1),
        "draft_step_cost": round(plain_rate / draft_rate, 3),  # a draft step's time over a target step's
        "verify_cost": verify_cost(target, prompt, [g + 1 for g in gammas], repeats),
        "runs": [],
    }
    ControlledDraft.reference = reference
    for gamma in gammas:
        target.draft_length = gamma
        for alpha in alphas:
            ControlledDraft.alpha, ControlledDraft.rng = alpha, random.Random(f"{gamma}/{alpha}")
            _speculative_run(target, draft, prompt, options)  # this gamma's verify graph
            runs = [_speculative_run(target, draft, prompt, options) for _ in range(max(2, repeats // 2))]
            stamps, output, stats = max(runs, key=lambda run: rate(run[0]))
            results["runs"].append({
                "gamma": gamma, "alpha": alpha, "tokens_per_s": round(rate(stamps), 1),
                "speedup": round(rate(stamps) / plain_rate, 3), "same_tokens_as_plain": output == reference,
                "acceptance_rate": stats["acceptance_rate"],
                "tokens_per_target_forward": stats["tokens_per_target_forward"],
            })  # fmt: skip
            print(json.dumps(results["runs"][-1]), file=sys.stderr, flush=True)
    results["best"] = {
        str(alpha): max((r for r in results["runs"] if r["alpha"] == alpha), key=lambda r: r["speedup"])
        for alpha in alphas
    }
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="14b,7b")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes on the CPU (a smoke test of this script)")
    parser.add_argument("--train-batches", default="8,16,32,64")
    parser.add_argument("--decode-tokens", type=int, default=128)
    parser.add_argument("--caption-images", type=int, default=32)
    parser.add_argument("--caption-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip-training", action="store_true")
    parser.add_argument("--skip-generation", action="store_true")
    parser.add_argument("--compile-training", action="store_true", help="also on the CPU (default: GPU only)")
    parser.add_argument("--no-compile-training", action="store_true", help="skip the compiled training side")
    parser.add_argument(
        "--decode-modes",
        default=None,
        help="ours' decode modes to measure, comma-separated (default: cuda_graph,compiled on GPU, static on CPU)",
    )
    parser.add_argument("--profile", action="store_true", help="add where the time goes (torch.profiler) per mode")
    parser.add_argument(
        "--speculative", action="store_true", help="the speculative section: 14b drafted by 7b (tiny: by tiny-draft)"
    )
    parser.add_argument("--alphas", default="1.0,0.9,0.8,0.6", help="speculative: controlled acceptance rates")
    parser.add_argument("--gammas", default="2,3,4,6", help="speculative: draft lengths")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)
    report: dict[str, Any] = {
        "device": name,
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "dtype": str(dtype).removeprefix("torch."),
        "code": code_version(),
        "models": {},
    }
    sizes = ["tiny"] if args.tiny else args.models.split(",")
    modes = (args.decode_modes or ("cuda_graph,compiled" if device.type == "cuda" else "static")).split(",")
    batches = [int(b) for b in args.train_batches.split(",")] if not args.tiny else [2, 4]
    for size in sizes:
        torch.manual_seed(0)
        started = time.perf_counter()
        row = shared_image_row(size) if args.speculative and size in DRAFTS else None
        ours, stock = build(size, device, dtype, image_token_id=row)
        entry: dict[str, Any] = {}
        if not args.skip_training:
            repeats = 2 if args.tiny else args.repeats
            compiled = not args.no_compile_training and (device.type == "cuda" or args.compile_training)
            entry["training"] = bench_training(ours, stock, device, batches, repeats, peak, compiled)
            print(json.dumps({size: entry}), file=sys.stderr, flush=True)
        entry.update(
            {}
            if args.skip_generation
            else bench_generation(
                ours, stock, device,
                decode_tokens=8 if args.tiny else args.decode_tokens,
                caption_images=4 if args.tiny else args.caption_images,
                caption_tokens=4 if args.tiny else args.caption_tokens,
                repeats=2 if args.tiny else args.repeats,
                modes=modes,
                profile=args.profile,
            )
        )  # fmt: skip
        if args.speculative and size in DRAFTS:
            entry["speculative"] = speculative_section(size, ours, device, dtype, args)
        entry["wall_s"] = round(time.perf_counter() - started, 1)
        report["models"][size] = entry
        print(json.dumps({size: entry}), file=sys.stderr, flush=True)
        if args.out:  # after each model, so a run cut short keeps what it measured
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(report, indent=2) + "\n")
        del ours, stock
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
