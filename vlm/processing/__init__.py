"""From what a user gives (messages, images) to model inputs: images, the ChatML encoder, the Processor."""

from vlm.processing.chat import IGNORE_INDEX, ChatTokens, EncodedChat, encode_chat, encode_text, normalize_messages
from vlm.processing.image_processor import ImageProcessor
from vlm.processing.images import load_image
from vlm.processing.processor import Processor, right_padded

__all__ = [
    "IGNORE_INDEX",
    "ChatTokens",
    "EncodedChat",
    "ImageProcessor",
    "Processor",
    "encode_chat",
    "encode_text",
    "load_image",
    "normalize_messages",
    "right_padded",
]
