"""The user API: `vlm.load` returns a `VisionLanguageModel`, which captions, answers and chats (streaming, batched).

It puts the parts together (Processor -> VisionLanguageModule -> decode engine -> decode loop -> text) and holds
the generation lock: one generation at a time per model, as the KV cache and the accelerator are shared.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vlm.adapter import CONFIG_NAME, check_finished, is_adapter_dir, read_config, read_projector, write_adapter
from vlm.config import PRESETS, AdapterConfig
from vlm.errors import ConfigError, VLMError
from vlm.generation.engine import DecodeEngine, EngineCache
from vlm.generation.loop import Stops, generate_tokens, stream_text
from vlm.generation.options import GenerationOptions
from vlm.generation.sampling import TokenSelector
from vlm.generation.speculative import (
    DraftLength,
    SpeculationStats,
    SpeculativeDecoder,
    generate_tokens_speculative,
)
from vlm.modeling.loading import (
    check_memory,
    lm_config_of,
    load_backbones,
    torch_device,
    torch_dtype,
    vision_identity,
)
from vlm.modeling.model import VisionLanguageModule, resolve_config
from vlm.modeling.towers import VisionTower
from vlm.processing.chat import EncodedChat
from vlm.processing.processor import Processor

__all__ = ["DEFAULT_CAPTION_PROMPT", "VisionLanguageModel", "build_model", "load"]

logger = logging.getLogger(__name__)

DEFAULT_CAPTION_PROMPT = "Provide a one-sentence caption for the provided image."
SAME_THREAD_WAIT_S = 10.0  # how long a thread watches the stream it may itself be holding for progress (a
# paused stream that a pool thread resumes later looks the same for that long)


class VisionLanguageModel:
    """A loaded adapter: `chat`, `ask`, `caption` and their batch forms. Build it with `vlm.load`.

    `module` is the `nn.Module` (tower, projector, LM) and `processor` turns conversations into its inputs.
    `decode_mode` picks the decode engine (`vlm.generation.engine.DECODE_MODES`); `overlap_steps` queues each
    decode step before handing out the token that feeds it (None: on a GPU, where the caller's work on a token
    is otherwise idle device time)."""

    def __init__(self, config: AdapterConfig, vision: VisionTower, lm: nn.Module, tokenizer: Any):
        config = resolve_config(config, vision, lm, tokenizer)
        self.module = VisionLanguageModule(config, vision, lm)
        self.processor = Processor(
            tokenizer, vision.image_processor, config.image_token_id, vision.num_patches, config.system_prompt,
            config.max_length,
        )  # fmt: skip
        rows = lm.get_input_embeddings().num_embeddings
        # Ids the LM must never emit: the image slot and rows with no token behind them.
        self.suppress_ids = sorted({config.image_token_id, *range(len(tokenizer), rows)})
        self.decode_mode = "auto"
        self.overlap_steps: bool | None = None
        self.engines = EngineCache(lm)
        self.draft: VisionLanguageModel | None = None
        """A smaller model sharing the tokenizer that proposes tokens for speculative decoding (`attach_draft`)."""
        self.draft_length: int | None = None
        """Tokens the draft proposes per round; None adapts it to the acceptance (`DraftLength`)."""
        self.last_speculation: SpeculationStats | None = None
        """What the latest generation with the draft did: acceptance rate, tokens per target forward."""
        self._lock = threading.Lock()  # one generation at a time per model: the KV cache and GPU are shared
        self._lock_owner: int | None = None  # the thread that last advanced the generation holding it
        self._lock_steps = 0  # steps that generation has taken: progress made by whichever thread drives it

    # ----------------------------------------------------------------------------------------------
    # What it is

    @property
    def config(self) -> AdapterConfig:
        return self.module.config

    @property
    def tokenizer(self) -> Any:
        return self.processor.tokenizer

    @property
    def lm_path(self) -> str:
        """Where the LM was loaded from (a hub id or a resolved local path)."""
        return self.module.lm.config.name_or_path

    @property
    def device(self) -> torch.device:
        return self.module.device

    @property
    def dtype(self) -> torch.dtype:
        return self.module.dtype

    @property
    def num_image_tokens(self) -> int:
        return self.module.num_image_tokens

    @property
    def stop_ids(self) -> list[int]:
        return self.processor.stop_ids

    @property
    def pad_id(self) -> int:
        return self.processor.pad_id

    @property
    def caption_prompt(self) -> str:
        return self.config.extra.get("caption_prompt", DEFAULT_CAPTION_PROMPT)

    def save_adapter(self, directory: str | Path) -> Path:
        """Write the adapter (config and projector) to `directory`."""
        return write_adapter(directory, self.config, self.module.projector_state())

    def attach_draft(self, draft: VisionLanguageModel | None) -> None:
        """Decode speculatively from now on, with `draft` proposing tokens that this model checks (None: decode
        alone again). Answers are what this model gives alone: the same tokens when greedy, the same distribution
        when sampling. The draft must share the tokenizer, the image token and the tokens per image; when it also
        shares the vision tower (`vlm.load` arranges that for equal vision settings), each image is encoded once."""
        if draft is not None:
            if draft is self:
                raise ConfigError("a model cannot be its own draft")
            if draft.device != self.device:
                raise ConfigError(f"the draft is on {draft.device} but the model on {self.device}: load both on one")
            if draft.tokenizer.get_vocab() != self.tokenizer.get_vocab():
                raise ConfigError(
                    f"the draft {draft.lm_path!r} has another vocabulary than {self.lm_path!r}: speculative decoding "
                    "needs one tokenizer (CausalLM 7B and 14B share Qwen's)"
                )
            if (draft.config.image_token_id, draft.num_image_tokens) != (self.config.image_token_id,
                                                                          self.num_image_tokens):  # fmt: skip
                raise ConfigError(
                    f"the draft puts {draft.num_image_tokens} tokens per image in row {draft.config.image_token_id} "
                    f"but the model {self.num_image_tokens} in row {self.config.image_token_id}: a draft needs the "
                    "same image tokens (train it with the same vision tower)"
                )
        self.draft = draft

    def _draft_pixels(self) -> bool:
        """Whether the draft needs pixel values of its own (another tower with other preprocessing)."""
        draft = self.draft
        return (
            draft is not None
            and draft.module.vision is not self.module.vision
            and (draft.processor.image_processor != self.processor.image_processor)
        )

    # ----------------------------------------------------------------------------------------------
    # Inputs and tokens

    def encode_messages(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True) -> EncodedChat:
        """OpenAI-style messages -> ids, labels and the images in slot order (not yet loaded)."""
        return self.processor.encode(messages, add_generation_prompt)

    def pixel_values(self, images: Sequence[Any]) -> torch.Tensor | None:
        """Load and preprocess images (paths, bytes, file objects, PIL images) -> (I, 3, S, S)."""
        return self.processor.pixel_values(images)

    def generation_batch(self, chats: Sequence[EncodedChat], max_new_tokens: int) -> dict[str, torch.Tensor | None]:
        """Left-padded prompts on the model's device (pixels are moved when encoded); over-long ones refused."""
        batch = self.processor.left_padded(chats, max_new_tokens)
        return {**batch, "input_ids": batch["input_ids"].to(self.device),
                "attention_mask": batch["attention_mask"].to(self.device)}  # fmt: skip

    def engine(self, batch_size: int, length: int) -> DecodeEngine:
        """The decode engine for `decode_mode`, this batch size and `length` positions."""
        return self.engines.engine(self.decode_mode, self.device, batch_size, length)

    def generate_tokens(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        pixel_values: torch.Tensor | None,
        options: GenerationOptions,
        draft_pixel_values: torch.Tensor | None = None,
    ) -> Iterator[torch.Tensor]:
        """Yield the next token ids (B,), on the CPU, step by step (see `vlm.generation.loop.generate_tokens`; with
        a draft, `vlm.generation.speculative`). Does not take the generation lock: callers that share the model
        between threads hold it themselves. `draft_pixel_values`: the draft's own, when its tower preprocesses
        images differently."""
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": pixel_values}
        if self._draft_pixels():
            if draft_pixel_values is None:
                raise VLMError("the draft preprocesses images its own way: pass its draft_pixel_values too")
            batch["draft_pixel_values"] = draft_pixel_values
        yield from self._tokens(batch, options)

    @torch.inference_mode()
    def _tokens(self, batch: dict[str, Any], options: GenerationOptions) -> Iterator[torch.Tensor]:
        """The decode loop on this model's engine; everything, the engine's cache included, is made on the first
        step and in inference mode."""
        rows, width = batch["input_ids"].shape
        stops = Stops(self.stop_ids, rows, self.device)
        select = TokenSelector(options, self.tokenizer, self.suppress_ids, self.device)
        engine = self.engine(rows, width + options.max_new_tokens)
        if self.draft is not None:
            yield from self._speculative_tokens(batch, options, engine, select, stops)
            return
        overlap = self.device.type == "cuda" if self.overlap_steps is None else self.overlap_steps
        yield from generate_tokens(self.module, engine, batch, options, select, stops, self.pad_id, overlap)

    def _speculative_tokens(
        self,
        batch: dict[str, Any],
        options: GenerationOptions,
        engine: DecodeEngine,
        select: TokenSelector,
        stops: Stops,
    ) -> Iterator[torch.Tensor]:
        """The decode loop with the draft (`vlm.generation.speculative`): a shared tower runs once per image."""
        draft = self.draft
        ids, mask, pixels = batch["input_ids"], batch["attention_mask"], batch["pixel_values"]
        rows, width = ids.shape
        draft_engine = draft.engines.engine(self.decode_mode, self.device, rows, width + options.max_new_tokens)
        features = None
        if pixels is not None and draft.module.vision is self.module.vision:
            features = self.module.image_features(pixels, graphed=engine.use_cuda_graph)
        embeds = self.module.embed(ids, pixels, engine.use_cuda_graph, features)
        draft_pixels = batch.get("draft_pixel_values", pixels) if features is None else None
        draft_embeds = draft.module.embed(ids, draft_pixels, draft_engine.use_cuda_graph, features)
        draft_select = TokenSelector(options, self.tokenizer, draft.suppress_ids, self.device)
        decoder, logits = SpeculativeDecoder.prefill(
            (engine, draft_engine), (embeds, draft_embeds), ids, mask, (select, draft_select),
            DraftLength(self.draft_length),
        )  # fmt: skip
        self.last_speculation = decoder.stats
        yield from generate_tokens_speculative(decoder, logits, options, stops, self.pad_id)

    def _stream(self, chats: Sequence[EncodedChat], options: GenerationOptions) -> Iterator[list[str]]:
        """Yield, per step, the new text of each row (empty for rows with nothing new)."""
        batch = self.generation_batch(chats, options.max_new_tokens)
        if self._draft_pixels():
            batch["draft_pixel_values"] = self.draft.processor.pixel_values([im for c in chats for im in c.images])
        yield from stream_text(self._tokens(batch, options), self.tokenizer, options, self.stop_ids, len(chats))

    # ----------------------------------------------------------------------------------------------
    # Answers

    def chat(
        self, messages: Sequence[Mapping[str, Any]], stream: bool = False, **generation: Any
    ) -> str | Iterator[str]:
        """Answer the conversation. With `stream=True`, an iterator of text pieces as they are generated.

        `generation`: max_new_tokens, temperature (0 = greedy), top_p, top_k, repetition_penalty, seed,
        stop (strings), blocked_words."""
        options = GenerationOptions.from_kwargs(**generation)
        chat = self.encode_messages(messages)
        if stream:
            return self._stream_one(chat, options)
        return "".join(self._stream_one(chat, options))

    def ask(self, image: Any, question: str, **generation: Any) -> str:
        """Answer one question about one image."""
        content = [{"type": "image", "image": image}, {"type": "text", "text": question}]
        return self.chat([{"role": "user", "content": content}], **generation)

    def caption(self, image: Any, prompt: str | None = None, **generation: Any) -> str:
        """A caption for one image."""
        return self.ask(image, prompt or self.caption_prompt, **generation)

    def caption_batch(
        self, images: Sequence[Any], batch_size: int = 8, prompt: str | None = None, **generation: Any
    ) -> list[str]:
        """Captions for many images, generated `batch_size` at a time with left padding."""
        return self.ask_batch(images, [prompt or self.caption_prompt] * len(images), batch_size, **generation)

    def ask_batch(
        self, images: Sequence[Any], questions: Sequence[str], batch_size: int = 8, **generation: Any
    ) -> list[str]:
        """One answer per (image, question) pair, generated `batch_size` at a time with left padding."""
        for name, given in (("images", images), ("questions", questions)):
            if isinstance(given, (str, bytes, Path)) or not isinstance(given, Sequence):
                raise VLMError(f"{name} must be a list (one per answer), got {type(given).__name__}; for one image "
                               "use caption() or ask()")  # fmt: skip
        if len(images) != len(questions):
            raise VLMError(f"got {len(images)} images but {len(questions)} questions")
        conversations = [
            [{"role": "user", "content": [{"type": "image", "image": image}, question]}]
            for image, question in zip(images, questions, strict=True)
        ]
        return self.chat_batch(conversations, batch_size, **generation)

    def chat_batch(
        self, conversations: Sequence[Sequence[Mapping[str, Any]]], batch_size: int = 8, **generation: Any
    ) -> list[str]:
        """One answer per conversation (each a `chat` message list), generated `batch_size` at a time with left
        padding; the conversations may differ in length, turns and images."""
        if batch_size < 1:
            raise VLMError("batch_size must be at least 1")
        if isinstance(conversations, (str, bytes)) or not isinstance(conversations, Sequence):
            raise VLMError(f"conversations must be a list of message lists, got {type(conversations).__name__}")
        options = GenerationOptions.from_kwargs(**generation)
        results: list[str] = []
        for start in range(0, len(conversations), batch_size):
            chats = [self.encode_messages(messages) for messages in conversations[start : start + batch_size]]
            texts = [""] * len(chats)
            with self._generating():
                for pieces in self._stream(chats, options):
                    texts = [t + p for t, p in zip(texts, pieces, strict=True)]
            results.extend(texts)
        return results

    # ----------------------------------------------------------------------------------------------
    # One generation at a time

    @contextmanager
    def _generating(self) -> Iterator[None]:
        """Hold the model for one generation; other generations wait their turn. A thread whose own unfinished
        stream holds the model would wait for itself forever, so it gets an error instead, unless that stream
        moves on while it waits (a thread pool, as Gradio or Starlette run streams, advances one stream from
        several threads)."""
        if self._lock_owner == threading.get_ident():
            steps = self._lock_steps
            if not self._lock.acquire(timeout=SAME_THREAD_WAIT_S):
                if self._lock_steps == steps:
                    raise VLMError(
                        "this model is still generating an earlier answer in this thread: a stream that was not "
                        "read to the end holds it. Read that stream to the end or call its close() first"
                    )
                self._lock.acquire()  # another thread drives that stream: wait for it like any other
        else:
            self._lock.acquire()
        try:
            self._lock_owner = threading.get_ident()
            yield
        finally:
            self._lock_owner = None
            self._lock.release()

    def _stream_one(self, chat: EncodedChat, options: GenerationOptions) -> Iterator[str]:
        with self._generating():
            for pieces in self._stream([chat], options):
                self._lock_steps += 1
                if pieces[0]:
                    yield pieces[0]
                    self._lock_owner = threading.get_ident()  # whichever thread resumed this stream


# --------------------------------------------------------------------------------------------------
# Loading


def build_model(
    config: AdapterConfig,
    base: Path | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
    vision: VisionTower | None = None,
) -> VisionLanguageModel:
    """Load the backbones named by `config` (paths relative to `base`) around a freshly initialised
    projector. Defaults: CUDA with bf16 when available, else CPU with fp32. A `vision` tower already loaded
    (another model's) is shared instead of loading one."""
    device = torch_device(device)
    dtype = torch_dtype(dtype, device)
    vision, lm, tokenizer = load_backbones(config, base, device, dtype, vision)
    model = VisionLanguageModel(config, vision, lm, tokenizer)
    model.module.to(device=device, dtype=dtype)
    return model


def _source(source: str | Path) -> tuple[AdapterConfig, Path | None]:
    """An adapter directory or a preset name -> (config, the directory; None for a preset)."""
    if str(source) in PRESETS:
        return PRESETS[str(source)], None
    if not (Path(source).is_dir() and is_adapter_dir(source)):
        raise ConfigError(
            f"{source!s} is neither an adapter directory (with {CONFIG_NAME}) nor a preset ({', '.join(PRESETS)})"
        )
    base = Path(source)
    config = read_config(base)
    check_finished(base)  # before any backbone is loaded
    return config, base


def _load_one(
    source: str | Path,
    config: AdapterConfig,
    base: Path | None,
    device: torch.device,
    dtype: torch.dtype,
    vision: VisionTower | None = None,
) -> VisionLanguageModel:
    model = build_model(config, base, device, dtype, vision)
    if base is None:
        logger.warning("preset %s: the projector is untrained; train one with vlm-train or load an adapter", source)
        return model
    state = read_projector(base, model.device)
    model.module.load_projector_state({k: v.to(model.dtype) for k, v in state.items()})
    return model


def load(
    source: str | Path,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
    draft: str | Path | None = None,
    draft_length: int | None = None,
) -> VisionLanguageModel:
    """Build a model from an adapter directory or a preset name (`causallm-14b`, `causallm-7b`).

    Defaults: CUDA with bf16 when available, else CPU with fp32. A preset's projector is untrained.
    `draft`: a second adapter (or preset) whose smaller LM proposes tokens for this one to check (speculative
    decoding: the 7B adapter for the 14B); when both name the same vision tower and settings, the tower is loaded
    once and runs once per image. `draft_length`: tokens proposed per round (None adapts it).
    """
    device = torch_device(device)
    dtype = torch_dtype(dtype, device)
    config, base = _source(source)
    if draft is None:
        return _load_one(source, config, base, device, dtype)
    draft_config, draft_base = _source(draft)
    if device.type == "cuda":  # both LMs, before either is read
        free, _ = torch.cuda.mem_get_info(device)
        pair = (draft_config.lm, lm_config_of(draft_config, draft_base))
        check_memory(config.lm, lm_config_of(config, base), dtype, free, draft=pair)
    model = _load_one(source, config, base, device, dtype)
    shared = vision_identity(config, base) == vision_identity(draft_config, draft_base)
    if not shared:
        logger.warning("the draft's vision settings differ from the model's: each encodes the images itself")
    helper = _load_one(draft, draft_config, draft_base, device, dtype, model.module.vision if shared else None)
    model.attach_draft(helper)
    model.draft_length = DraftLength(draft_length).fixed  # checked here, not at the first answer
    return model
