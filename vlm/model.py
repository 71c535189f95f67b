"""VisionLanguageModel: a frozen vision tower, a trainable projector and a frozen causal LM.

pixels (B, 3, S, S) -> tower -> (B, N, Dv) -> projector -> (B, N, H)
input ids (B, T) with N image-token slots per image -> embeddings (B, T, H), slots filled in order
-> LM -> loss on label positions only | generation
"""

from __future__ import annotations

import inspect
import logging
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vlm.config import CONFIG_NAME, PRESETS, PROJECTOR_NAME, AdapterConfig
from vlm.errors import ConfigError, InsufficientMemoryError, PromptError, VLMError
from vlm.fast_decode import GraphedForward, StaticDecoder, supports_static_decode
from vlm.files import make_shareable
from vlm.generation import GenerationOptions, TextAssembler, TokenSelector
from vlm.images import load_image
from vlm.projector import build_projector
from vlm.prompt import IGNORE_INDEX, ChatTokens, EncodedChat, encode_chat, normalize_messages
from vlm.vision import VisionTower, build_vision_tower

__all__ = ["ModelOutput", "VisionLanguageModel", "build_model", "check_memory", "load", "resolve_reference"]

logger = logging.getLogger(__name__)

DEFAULT_CAPTION_PROMPT = "Provide a one-sentence caption for the provided image."
SAME_THREAD_WAIT_S = 10.0  # how long a thread watches the stream it may itself be holding for progress (a
# paused stream that a pool thread resumes later looks the same for that long)


@dataclass
class ModelOutput:
    """Result of `VisionLanguageModel.forward`.

    loss: scalar mean cross-entropy over label tokens (None without labels).
    logits: with labels, (L, V) for the L label tokens only (the LM head never sees other positions);
        without labels, (B, T, V).
    num_label_tokens: L.
    """

    loss: torch.Tensor | None
    logits: torch.Tensor
    num_label_tokens: int = 0


class VisionLanguageModel(nn.Module):
    """The composed model. Build it with `vlm.load` (or directly from parts in tests and training)."""

    def __init__(self, config: AdapterConfig, vision: VisionTower, lm: nn.Module, tokenizer: Any):
        super().__init__()
        self.config = config
        self.vision = vision
        self.lm = lm
        self.tokenizer = tokenizer
        if config.vision_hidden_size and config.vision_hidden_size != vision.hidden_size:
            raise ConfigError(
                f"the adapter expects {config.vision_hidden_size}-d vision features but the tower "
                f"{config.vision_tower!r} gives {vision.hidden_size}-d"
            )
        lm_hidden = lm.get_input_embeddings().embedding_dim
        if config.lm_hidden_size and config.lm_hidden_size != lm_hidden:
            raise ConfigError(
                f"the adapter expects a {config.lm_hidden_size}-d LM but {config.lm!r} has {lm_hidden}-d embeddings"
            )
        config.vision_hidden_size, config.lm_hidden_size = vision.hidden_size, lm_hidden
        positions = getattr(lm.config, "max_position_embeddings", None)
        if isinstance(positions, int) and 0 < positions < config.max_length:
            # past the positions it was trained for the LM degrades quietly (the miniature world's LM answers
            # nothing): the prompt check refuses such conversations instead
            logger.info("max_length %d is past the LM's %d positions: using those", config.max_length, positions)
            config.max_length = positions
        if config.image_token_id < 0:
            config.image_token_id = len(tokenizer)
        rows = lm.get_input_embeddings().num_embeddings
        if config.image_token_id >= rows:
            raise ConfigError(
                f"image token id {config.image_token_id} is past the LM's {rows} embedding rows; "
                "set image_token_id to a spare row or resize the LM's embeddings"
            )
        self.projector = build_projector(config.projector_type, vision.hidden_size, lm_hidden)
        self.lm.requires_grad_(False)
        self.lm.eval()
        self.tokens = ChatTokens.from_tokenizer(tokenizer, config.image_token_id)
        self.stop_ids = sorted(
            {
                self.tokens.im_end,
                *(
                    i
                    for i in (tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|endoftext|>"))
                    if i is not None
                ),
            }
        )
        # Ids the LM must never emit: the image slot and rows with no token behind them.
        self.suppress_ids = sorted({config.image_token_id, *range(len(tokenizer), rows)})
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.stop_ids[0]
        # transformers renamed `past_key_values` to `cache`; use whichever this version's LM takes.
        self._cache_kwarg = "cache" if "cache" in inspect.signature(lm.forward).parameters else "past_key_values"
        self._lock = threading.Lock()  # one generation at a time per model: the KV cache and GPU are shared
        self._lock_owner: int | None = None  # the thread that last advanced the generation holding it
        self._lock_steps = 0  # steps that generation has taken: progress made by whichever thread drives it
        self.decode_mode = "auto"
        """`auto` (static cache + CUDA graph on GPU for Llama LMs, else plain), `cuda_graph`, `static`
        (static cache without graph capture), `compiled` (as `cuda_graph` on GPU, with each decoder layer's
        elementwise work fused by torch.compile: faster decoding and batched captioning, but a first reply
        that waits for compilation) or `dynamic` (transformers' DynamicCache)."""
        self.overlap_steps: bool | None = None
        """Queue each decode step before handing out the token that feeds it, so the caller's work on a token
        (detokenising, streaming) overlaps the device computing the next; a stop token then costs one step
        whose result is dropped. `None` (default): on a GPU, where that work is otherwise idle time."""
        self._decoder: StaticDecoder | None = None
        self._decoder_mode = ""  # the decode mode `_decoder` was built for
        self._graphed_vision: GraphedForward | None = None

    def compile_lm_layers(self, enable: bool = True) -> None:
        """Run each LM decoder layer through `torch.compile` (training, and prefill on the `dynamic`
        path; the static-cache paths compile their own layer pieces with `decode_mode="compiled"`), or undo it.

        The layers share their code and shapes, so one compilation serves them all; new sequence
        lengths recompile once and then run with dynamic shapes."""
        for layer in self.lm.get_decoder().layers:
            if enable:
                layer.compile()
            else:
                layer._compiled_call_impl = None  # what nn.Module.compile sets

    def enable_gradient_checkpointing(self, enable: bool = True) -> None:
        """Recompute the frozen LM's layer activations in backward instead of keeping them (less memory,
        about a third more compute), or stop. Takes effect in training mode; see `train`."""
        new_names = hasattr(self.lm, "activation_checkpointing_enable")  # transformers renamed these
        if enable and new_names:
            self.lm.activation_checkpointing_enable({"use_reentrant": False})
        elif enable:
            self.lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        elif new_names:
            self.lm.activation_checkpointing_disable()
        else:
            self.lm.gradient_checkpointing_disable()
        self.train(self.training)

    def train(self, mode: bool = True) -> VisionLanguageModel:
        # Only the projector trains; the frozen LM and tower keep dropout and the like switched off.
        super().train(mode)
        self.lm.eval()
        # transformers checkpoints a layer only while that layer is in training mode: with checkpointing on,
        # flag the decoder layers themselves (not their attention or MLP, which keep dropout off).
        for layer in self.lm.get_decoder().layers:
            layer.training = mode and bool(getattr(layer, "gradient_checkpointing", False))
        return self

    # ----------------------------------------------------------------------------------------------
    # Properties and persistence

    @property
    def device(self) -> torch.device:
        return self.lm.get_input_embeddings().weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm.get_input_embeddings().weight.dtype

    @property
    def num_image_tokens(self) -> int:
        return self.vision.num_patches

    def save_adapter(self, directory: str | Path) -> Path:
        """Write `adapter_config.json` and `projector.safetensors` (fp32 weights) to `directory`."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in self.projector.state_dict().items()}
        save_file(state, str(directory / PROJECTOR_NAME), metadata={"format": "pt"})
        self.config.save(directory)
        make_shareable(directory / PROJECTOR_NAME)  # safetensors writes it owner-only
        return directory

    def load_projector_state(self, state: Mapping[str, torch.Tensor]) -> None:
        """Load projector weights, with an error naming any missing, extra or mis-shaped tensor."""
        own = self.projector.state_dict()
        missing, extra = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        if missing or extra:
            raise ConfigError(
                f"projector weights do not match a {self.config.projector_type} projector: "
                f"missing {missing}, unexpected {extra}"
            )
        for key, value in state.items():
            if tuple(value.shape) != tuple(own[key].shape):
                raise ConfigError(
                    f"projector weight {key} has shape {tuple(value.shape)}, expected {tuple(own[key].shape)} "
                    f"(vision {self.vision.hidden_size}-d -> LM {self.config.lm_hidden_size}-d)"
                )
        self.projector.load_state_dict(state)

    # ----------------------------------------------------------------------------------------------
    # The model

    def encode_images(self, pixel_values: torch.Tensor, graphed: bool = False) -> torch.Tensor:
        """(B, 3, S, S) -> (B, N, H) image embeddings in LM space. `graphed` (inference on a GPU): the tower
        runs as a CUDA-graph replay (see fast_decode.GraphedForward)."""
        pixel_values = pixel_values.to(self.device, self.vision_dtype)
        if graphed:
            if self._graphed_vision is None:
                self._graphed_vision = GraphedForward(self.vision)
            features = self._graphed_vision(pixel_values)
        else:
            with torch.no_grad():
                features = self.vision(pixel_values)  # (B, N, Dv)
        projector_dtype = next(self.projector.parameters()).dtype
        return self.projector(features.to(projector_dtype))

    @property
    def vision_dtype(self) -> torch.dtype:
        return next(self.vision.parameters()).dtype

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None, graphed: bool = False) -> torch.Tensor:
        """(B, T) ids + (I, 3, S, S) pixels -> (B, T, H) embeddings with every image slot filled in order."""
        embeds = self.lm.get_input_embeddings()(input_ids)  # (B, T, H)
        slots = input_ids == self.config.image_token_id  # (B, T)
        num_slots = int(slots.sum())
        num_images = 0 if pixel_values is None else pixel_values.shape[0]
        if num_slots != num_images * self.num_image_tokens:
            raise PromptError(
                f"the input has {num_slots} image-token slots but {num_images} image(s) x "
                f"{self.num_image_tokens} tokens were given; each image needs exactly one placeholder"
            )
        if num_images == 0:
            return embeds
        features = self.encode_images(pixel_values, graphed).to(embeds.dtype)  # (I, N, H)
        return embeds.masked_scatter(slots.unsqueeze(-1), features)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        num_items: int | None = None,
    ) -> ModelOutput:
        """With `labels` (B, T), the LM head runs only where a next-token label exists.

        The loss is the mean over this batch's label tokens, or their sum divided by `num_items` when
        given (the label-token count of a whole accumulated or distributed global batch)."""
        embeds = self.embed(input_ids, pixel_values)
        if labels is None:
            logits = self.lm(inputs_embeds=embeds, attention_mask=attention_mask, use_cache=False).logits
            return ModelOutput(loss=None, logits=logits)
        decoder = self.lm.get_decoder()
        hidden = decoder(inputs_embeds=embeds, attention_mask=attention_mask, use_cache=False).last_hidden_state
        targets = labels[:, 1:]  # (B, T-1): position t predicts token t+1
        keep = targets != IGNORE_INDEX
        logits = self.lm.get_output_embeddings()(hidden[:, :-1][keep])  # (L, V)
        if num_items is None:
            loss = F.cross_entropy(logits.float(), targets[keep]) if logits.shape[0] else logits.sum() * 0.0
        else:
            loss = F.cross_entropy(logits.float(), targets[keep], reduction="sum") / num_items
        return ModelOutput(loss=loss, logits=logits, num_label_tokens=int(keep.sum()))

    # ----------------------------------------------------------------------------------------------
    # Inputs

    def encode_messages(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True) -> EncodedChat:
        """OpenAI-style messages -> ids, labels and the images in slot order (not yet loaded)."""
        normalized = normalize_messages(messages, self.config.system_prompt)
        return encode_chat(
            self.tokenizer, normalized, self.tokens, self.num_image_tokens, add_generation_prompt=add_generation_prompt
        )

    def pixel_values(self, images: Sequence[Any]) -> torch.Tensor | None:
        """Load and preprocess images (paths, bytes, file objects, PIL images) -> (I, 3, S, S)."""
        if not images:
            return None
        loaded = [load_image(im) for im in images]
        return self.vision.preprocess(loaded)

    def _batch(self, chats: Sequence[EncodedChat], max_new_tokens: int) -> dict[str, torch.Tensor | None]:
        """Left-pad prompts for generation; refuse over-long ones before any compute."""
        for chat in chats:
            if len(chat) + max_new_tokens > self.config.max_length:
                raise PromptError(
                    f"the prompt is {len(chat)} tokens ({len(chat.images)} image(s) x {self.num_image_tokens}) "
                    f"and max_new_tokens is {max_new_tokens}, over the limit of {self.config.max_length}; "
                    "shorten the conversation, attach fewer images or lower max_new_tokens"
                )
        width = max(len(c) for c in chats)
        ids = torch.full((len(chats), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(chats), width), dtype=torch.long)
        for row, chat in enumerate(chats):
            ids[row, width - len(chat) :] = torch.tensor(chat.input_ids)
            mask[row, width - len(chat) :] = 1
        pixels = self.pixel_values([im for c in chats for im in c.images])
        return {"input_ids": ids.to(self.device), "attention_mask": mask.to(self.device), "pixel_values": pixels}

    # ----------------------------------------------------------------------------------------------
    # Generation

    @torch.inference_mode()
    def generate_tokens(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        pixel_values: torch.Tensor | None,
        options: GenerationOptions,
    ) -> Iterator[torch.Tensor]:
        """Yield the next token ids (B,), on the CPU, step by step for left-padded prompts; finished rows yield
        pad. Stops when every row has produced a stop id or after `max_new_tokens`.

        With `overlap_steps` (on a GPU), each decode step is queued before the token that feeds it is
        yielded: the device runs it while the caller handles the token."""
        from transformers import DynamicCache

        select = TokenSelector(options, self.tokenizer, self.suppress_ids, self.device)
        stop_ids, stop_on_host = torch.tensor(self.stop_ids, device=self.device), torch.tensor(self.stop_ids)
        static = self._static_decoder(input_ids.shape[0], input_ids.shape[1] + options.max_new_tokens)
        embeds = self.embed(input_ids, pixel_values, graphed=static is not None and static.use_cuda_graph)
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # left padding: real tokens from 0
        if static is not None:
            logits = static.prefill(embeds, attention_mask, position_ids)  # (B, V)
        else:
            cache = DynamicCache(config=self.lm.config)
            logits = self.lm(
                inputs_embeds=embeds,
                attention_mask=attention_mask,
                position_ids=position_ids,
                use_cache=True,
                logits_to_keep=1,
                **{self._cache_kwarg: cache},
            ).logits[:, -1]  # (B, V)
        # What the repetition penalty reads: pad slots hold the row's first real id instead, so the pad id (which is
        # also <|endoftext|>, a stop id) is not penalised in padded rows only; repeats do not change the penalty.
        first = input_ids.gather(1, attention_mask.argmax(-1, keepdim=True))
        sequence = torch.where(attention_mask.bool(), input_ids, first)

        def advance(next_ids: torch.Tensor, step: int) -> torch.Tensor:
            """Feed `next_ids` (B,) -> the following logits (B, V)."""
            nonlocal sequence, position_ids, attention_mask
            sequence = torch.cat([sequence, next_ids[:, None]], dim=1)
            position_ids = position_ids[:, -1:] + 1
            if static is not None:
                return static.step(next_ids, position_ids, slot=input_ids.shape[1] + step)
            attention_mask = torch.cat([attention_mask, torch.ones_like(attention_mask[:, :1])], dim=1)
            return self.lm(
                input_ids=next_ids[:, None],
                attention_mask=attention_mask,
                position_ids=position_ids,
                use_cache=True,
                **{self._cache_kwarg: cache},
            ).logits[:, -1]

        overlap = self.device.type == "cuda" if self.overlap_steps is None else self.overlap_steps
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=self.device)  # rows past a stop id
        finished = torch.zeros(input_ids.shape[0], dtype=torch.bool)  # the same, known on the host
        for step in range(options.max_new_tokens):
            next_ids = torch.where(done, self.pad_id, select(sequence, logits))  # (B,)
            on_host = next_ids.to("cpu", non_blocking=True)
            copied = torch.cuda.Event() if next_ids.is_cuda else None
            if copied is not None:
                copied.record(torch.cuda.current_stream(next_ids.device))  # the model's card, not the current one
            more = step < options.max_new_tokens - 1  # no step whose logits nobody reads
            if more:
                done |= torch.isin(next_ids, stop_ids)
                if overlap:
                    logits = advance(next_ids, step)  # queued behind the copy
            if copied is not None:
                copied.synchronize()  # the ids, not the step queued after them
            yield on_host
            finished |= torch.isin(on_host, stop_on_host)
            if not more or bool(finished.all()):
                return
            if not overlap:
                logits = advance(next_ids, step)

    def _static_decoder(self, batch_size: int, length: int) -> StaticDecoder | None:
        """The static-cache decoder for this batch size (reused while it is long enough), or None for
        the plain path. Cache lengths are rounded up so one captured graph serves many prompts."""
        mode = self.decode_mode
        if mode == "auto":
            mode = "cuda_graph" if self.device.type == "cuda" and supports_static_decode(self.lm) else "dynamic"
        if mode == "dynamic":
            return None
        current = self._decoder
        reusable = current is not None and self._decoder_mode == mode and current.batch_size == batch_size
        if not reusable or current.max_len < length or not current.is_current():
            self._decoder = None  # free the old cache before allocating the new one
            bucket = -(-length // 256) * 256
            graph = mode == "cuda_graph" or (mode == "compiled" and self.device.type == "cuda")
            self._decoder = StaticDecoder(self.lm, batch_size, bucket, graph, compile_layers=mode == "compiled")
            self._decoder_mode = mode
        return self._decoder

    def _stream(self, chats: Sequence[EncodedChat], options: GenerationOptions) -> Iterator[list[str]]:
        """Yield, per step, the new text of each row (empty for rows with nothing new)."""
        batch = self._batch(chats, options.max_new_tokens)
        assemblers = [TextAssembler(self.tokenizer, options.stop, options.blocked_words) for _ in chats]
        finished = [False] * len(chats)
        for next_ids in self.generate_tokens(**batch, options=options):
            pieces = []
            for row, token in enumerate(next_ids.tolist()):
                if finished[row]:
                    pieces.append("")
                elif token in self.stop_ids:
                    finished[row] = True
                    pieces.append(assemblers[row].finish())
                else:
                    piece = assemblers[row].add(token)
                    finished[row] = assemblers[row].stopped
                    pieces.append(piece)
            yield pieces
            if all(finished):
                return
        yield [a.finish() if not f else "" for a, f in zip(assemblers, finished, strict=True)]

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

    def ask(self, image: Any, question: str, **generation: Any) -> str:
        """Answer one question about one image."""
        content = [{"type": "image", "image": image}, {"type": "text", "text": question}]
        return self.chat([{"role": "user", "content": content}], **generation)

    def caption(self, image: Any, prompt: str | None = None, **generation: Any) -> str:
        """A caption for one image."""
        return self.ask(image, prompt or self.caption_prompt, **generation)

    @property
    def caption_prompt(self) -> str:
        return self.config.extra.get("caption_prompt", DEFAULT_CAPTION_PROMPT)

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


# --------------------------------------------------------------------------------------------------
# Loading


def resolve_reference(reference: str, base: Path | None) -> str:
    """A backbone reference from an adapter config: a relative local path is relative to the adapter directory
    `base`; anything else (a hub id, an absolute path) is returned as it is."""
    if base is not None and not Path(reference).is_absolute() and (base / reference).exists():
        return str(base / reference)
    return reference


def _lm_bytes(lm_config: Any, dtype: torch.dtype) -> int:
    """Approximate weight bytes of a Llama-architecture LM from its config."""
    hidden, layers = lm_config.hidden_size, lm_config.num_hidden_layers
    heads = lm_config.num_attention_heads
    kv_heads = getattr(lm_config, "num_key_value_heads", None) or heads
    head_dim = getattr(lm_config, "head_dim", None) or hidden // heads
    attention = hidden * head_dim * (2 * heads + 2 * kv_heads)
    mlp = 3 * hidden * lm_config.intermediate_size
    embeddings = lm_config.vocab_size * hidden * (1 if getattr(lm_config, "tie_word_embeddings", False) else 2)
    return (layers * (attention + mlp) + embeddings) * torch.finfo(dtype).bits // 8


def check_memory(
    lm_name: str, lm_config: Any, dtype: torch.dtype, free_bytes: int, reserve_bytes: int = 2 << 30
) -> None:
    """Raise InsufficientMemoryError if the LM's weights plus a working reserve exceed `free_bytes`."""
    need = _lm_bytes(lm_config, dtype) + reserve_bytes
    if need > free_bytes:
        advice = (
            "use the 7B preset ('causallm-7b') instead: the CausalLM model card recommends the 7B over a quantized 14B"
            if lm_config.hidden_size >= 5120
            else "free accelerator memory or use a larger card"
        )
        raise InsufficientMemoryError(
            f"{lm_name} needs about {need / 2**30:.1f} GiB in {str(dtype).removeprefix('torch.')} "
            f"(weights + working memory) but only {free_bytes / 2**30:.1f} GiB is free; {advice}"
        )


def _torch_dtype(dtype: torch.dtype | str | None, device: torch.device) -> torch.dtype:
    name = dtype
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ConfigError(f"unknown or unsupported dtype {name!r}: use 'bfloat16', 'float16' or 'float32'")
    return dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)


def _torch_device(device: str | torch.device | None) -> torch.device:
    """The device to load onto (CUDA when there is one), checked before any weights are read."""
    try:
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except (RuntimeError, TypeError) as e:
        raise ConfigError(f"unknown device {device!r}: use 'cpu', 'cuda' or 'cuda:N'") from e
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigError("no CUDA device is available here; use device 'cpu'")
        if device.index is not None and device.index >= count:
            raise ConfigError(f"there is no {device}: this machine has {count} CUDA device(s)")
    return device


def build_model(
    config: AdapterConfig,
    base: Path | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
) -> VisionLanguageModel:
    """Load the backbones named by `config` (paths relative to `base`) around a freshly initialised
    projector. Defaults: CUDA with bf16 when available, else CPU with fp32."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    device = _torch_device(device)
    dtype = _torch_dtype(dtype, device)
    lm_ref = resolve_reference(config.lm, base)
    try:
        lm_config = AutoConfig.from_pretrained(lm_ref)
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            check_memory(config.lm, lm_config, dtype, free)
        tokenizer = AutoTokenizer.from_pretrained(lm_ref)
        lm = AutoModelForCausalLM.from_pretrained(lm_ref, config=lm_config, dtype=dtype)
    except OSError as e:
        raise ConfigError(
            f"could not load the LM {config.lm!r}: {e}. If it is a hub id, check the name and that the hub is "
            "reachable (HF_HUB_OFFLINE unset), or give a local path"
        ) from e
    vision = build_vision_tower(config, resolve_reference(config.vision_tower, base))
    return VisionLanguageModel(config, vision, lm, tokenizer).to(device=device, dtype=dtype)


def load(
    source: str | Path, device: str | torch.device | None = None, dtype: torch.dtype | str | None = None
) -> VisionLanguageModel:
    """Build a model from an adapter directory or a preset name (`causallm-14b`, `causallm-7b`).

    Defaults: CUDA with bf16 when available, else CPU with fp32. A preset's projector is untrained.
    """
    path = Path(source)
    if str(source) in PRESETS:
        config, base = AdapterConfig.from_dict(PRESETS[str(source)].to_dict()), None
    elif path.is_dir() and (path / CONFIG_NAME).is_file():
        config, base = AdapterConfig.load(path), path
    else:
        raise ConfigError(
            f"{source!s} is neither an adapter directory (with {CONFIG_NAME}) nor a preset ({', '.join(PRESETS)})"
        )
    if base is not None and not (base / PROJECTOR_NAME).is_file():
        raise ConfigError(f"{base} has no {PROJECTOR_NAME}; was the training run finished?")
    model = build_model(config, base, device, dtype)
    if base is None:
        logger.warning("preset %s: the projector is untrained; train one with vlm-train or load an adapter", source)
        return model
    from safetensors.torch import load_file

    state = load_file(str(base / PROJECTOR_NAME), device=str(model.device))
    model.load_projector_state({k: v.to(model.dtype) for k, v in state.items()})
    return model
