"""Generation: options, token selection and the word ban, detokenising, decode engines and the decode loop."""

from vlm.generation.engine import DECODE_MODES, DecodeEngine, EngineCache
from vlm.generation.loop import Stops, generate_tokens, stream_text
from vlm.generation.options import GenerationOptions
from vlm.generation.plain import PlainEngine
from vlm.generation.sampling import BlockedWordsProcessor, TokenSelector
from vlm.generation.static import StaticEngine
from vlm.generation.text import FILTERED, TextAssembler

__all__ = [
    "DECODE_MODES",
    "FILTERED",
    "BlockedWordsProcessor",
    "DecodeEngine",
    "EngineCache",
    "GenerationOptions",
    "PlainEngine",
    "StaticEngine",
    "Stops",
    "TextAssembler",
    "TokenSelector",
    "generate_tokens",
    "stream_text",
]
