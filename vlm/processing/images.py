"""Safe image loading and normalisation.

`load_image` turns a path, raw bytes, a binary file object or a `PIL.Image.Image` into a fully
loaded RGB image that is safe to hand to a vision tower:

- no network access: URLs are refused (download the file first);
- a byte-size cap (checked with ``os.stat`` before anything is read) and a pixel-count cap
  (checked from the header, before any pixel data is decoded); Pillow's own decompression-bomb
  warning and error are both treated as errors;
- truncated files are errors (``ImageFile.LOAD_TRUNCATED_IMAGES`` must stay False);
- a format allow-list (PNG, JPEG, GIF, BMP, WEBP, TIFF, MPO): EPS/PS (which would run Ghostscript),
  PDF, ICO, PSD, ... are refused, naming the format that was detected;
- EXIF orientation is applied; animated images use frame 0;
- every mode ends up as 8-bit RGB by the right route: alpha is composited onto a background,
  CMYK/YCbCr/LAB/HSV are converted, 16-bit and 32-bit integer and float images are scaled by
  their numeric range (65535 -> 255, not clipped at 255).

Every failure is an `ImageError` (a `VLMError`), with a short message and the cause chained.
The returned image owns its pixels: no file handle or lazy decoder is left behind.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import stat
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageFile, ImageOps

from vlm.errors import ImageError

__all__ = ["load_image"]

ALLOWED_FORMATS: tuple[str, ...] = ("PNG", "JPEG", "GIF", "BMP", "WEBP", "TIFF", "MPO")
_ALLOWED_TEXT = ", ".join(ALLOWED_FORMATS)

_URL_RE = re.compile(r"^\s*(?:[A-Za-z][A-Za-z0-9+.\-]*://|data:)", re.IGNORECASE)

# Modes whose alpha channel is composited onto the background (after conversion to straight alpha).
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
# Modes that Pillow converts to RGB correctly by itself.
_DIRECT_MODES = frozenset({"1", "L", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"})


def load_image(
    source: str | os.PathLike[str] | bytes | bytearray | memoryview | Any,
    *,
    max_bytes: int = 50 * 1024 * 1024,
    max_pixels: int = 89_478_485,
    background: Sequence[int] = (255, 255, 255),
) -> Image.Image:
    """Load `source` safely and return it as a fully loaded RGB `PIL.Image.Image`.

    Args:
        source: a path (``str`` or ``os.PathLike``), raw encoded ``bytes``/``bytearray``/``memoryview``,
            a binary file object (anything with ``.read``; read from its current position, not
            closed), or a ``PIL.Image.Image`` (normalised the same way; the caller's image is not
            modified, except that an animated image is seeked to frame 0).
        max_bytes: largest encoded size accepted, in bytes.
        max_pixels: largest ``width * height`` accepted. Pillow's process-wide
            ``Image.MAX_IMAGE_PIXELS`` also applies (its warning is treated as an error), so the
            effective limit is the smaller of the two.
        background: RGB colour that transparent pixels are composited onto.

    Returns:
        A new RGB image with EXIF orientation applied, independent of any file.

    Raises:
        ImageError: for every problem: missing/unreadable file, URL, too large, decompression
            bomb, truncated or corrupt data, format not allowed, unsupported mode, bad arguments.
    """
    _check_limit("max_bytes", max_bytes)
    _check_limit("max_pixels", max_pixels)
    bg = _check_background(background)
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        raise ImageError(
            "PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True in this process, so truncated images would "
            "load silently; set it back to False"
        )

    if isinstance(source, Image.Image):
        return _normalise_pil(source, max_pixels=max_pixels, background=bg)

    data, name = _read_source(source, max_bytes)
    return _decode(data, name, max_pixels=max_pixels, background=bg)


# --------------------------------------------------------------------------------------------------
# argument checks


def _check_limit(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ImageError(f"{name} must be a positive integer, got {value!r}")


def _check_background(background: object) -> tuple[int, int, int]:
    try:
        values = tuple(background)  # type: ignore[call-overload]
    except TypeError:
        values = ()
    if len(values) != 3 or not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 255 for v in values):
        raise ImageError(f"background must be three integers in 0..255, got {background!r}")
    return values  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------------
# reading the encoded bytes


def _read_source(source: object, max_bytes: int) -> tuple[bytes, str]:
    """Return the encoded bytes of `source` (at most `max_bytes`) and a name for messages."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        if len(data) > max_bytes:
            raise ImageError(f"image data is too large: {len(data)} bytes > max_bytes={max_bytes}")
        if not data:
            raise ImageError("image data is empty (0 bytes)")
        return data, "image bytes"

    if isinstance(source, str) and _URL_RE.match(source):
        shown = source if len(source) <= 80 else source[:77] + "..."
        raise ImageError(f"URLs are not loaded (no network access): {shown}; download the file first and pass its path")

    if isinstance(source, (str, os.PathLike)):
        return _read_path(source, max_bytes)

    if callable(getattr(source, "read", None)):
        return _read_stream(source, max_bytes), "image stream"

    raise ImageError(
        f"unsupported image source type {type(source).__name__}; pass a path, bytes, a binary file "
        "object or a PIL.Image.Image"
    )


def _read_path(source: str | os.PathLike[Any], max_bytes: int) -> tuple[bytes, str]:
    path = _path_text(source)
    _check_file(path, max_bytes)
    try:
        with open(path, "rb") as fh:
            data = fh.read(max_bytes + 1)  # the file may have grown since stat
    except PermissionError as exc:
        raise ImageError(f"permission denied reading image file: {path}") from exc
    except (OSError, MemoryError) as exc:
        raise ImageError(f"cannot read image file {path}: {exc}") from exc
    if len(data) > max_bytes:
        raise ImageError(f"image file is too large: {path} is over max_bytes={max_bytes}")
    if not data:
        raise ImageError(f"image file is empty (0 bytes): {path}")
    return data, path


def _path_text(source: str | os.PathLike[Any]) -> str:
    try:
        path = os.fspath(source)
    except TypeError as exc:
        raise ImageError(f"invalid image path: {source!r}") from exc
    if isinstance(path, bytes):
        path = os.fsdecode(path)
    if not path:
        raise ImageError("image path is empty")
    return path


def _check_file(path: str, max_bytes: int) -> None:
    """A regular file, not empty and not over `max_bytes`, before it is read."""
    try:
        st = os.stat(path)
    except FileNotFoundError as exc:
        raise ImageError(f"image file not found: {path}") from exc
    except PermissionError as exc:
        raise ImageError(f"permission denied reading image file: {path}") from exc
    except (OSError, ValueError) as exc:  # ValueError: embedded NUL byte
        raise ImageError(f"cannot access image file {path}: {exc}") from exc
    if stat.S_ISDIR(st.st_mode):
        raise ImageError(f"image path is a directory, not a file: {path}")
    if not stat.S_ISREG(st.st_mode):
        raise ImageError(f"image path is not a regular file: {path}")
    if st.st_size > max_bytes:
        raise ImageError(f"image file is too large: {path} is {st.st_size} bytes > max_bytes={max_bytes}")
    if st.st_size == 0:
        raise ImageError(f"image file is empty (0 bytes): {path}")


def _read_stream(stream: Any, max_bytes: int) -> bytes:
    """The stream's bytes from where it stands; a seekable stream is put back there afterwards, so the same
    file object can be given again (a chat's history is sent again with every turn)."""
    chunks: list[bytes] = []
    total = 0
    try:
        start = stream.tell() if callable(getattr(stream, "seekable", None)) and stream.seekable() else None
    except (OSError, ValueError):
        start = None
    try:
        while total <= max_bytes:
            chunk = stream.read(max_bytes + 1 - total)
            if isinstance(chunk, str):
                raise ImageError("image file object is in text mode; open it in binary mode ('rb')")
            if not chunk:
                break
            chunk = bytes(chunk)
            chunks.append(chunk)
            total += len(chunk)
    except ImageError:
        raise
    except Exception as exc:  # OSError, ValueError (closed file), TypeError, MemoryError, ...
        raise ImageError(f"cannot read image file object: {type(exc).__name__}: {exc}") from exc
    finally:
        if start is not None:
            with contextlib.suppress(OSError, ValueError):
                stream.seek(start)
    if total > max_bytes:
        raise ImageError(f"image data is too large: over max_bytes={max_bytes}")
    if total == 0:
        raise ImageError("image data is empty (0 bytes read from the file object)")
    return b"".join(chunks)


# --------------------------------------------------------------------------------------------------
# decoding


def _decode(data: bytes, name: str, *, max_pixels: int, background: tuple[int, int, int]) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            try:
                im = Image.open(io.BytesIO(data), formats=_open_formats())
            except Image.UnidentifiedImageError as exc:
                raise _unidentified(data, name) from exc
            with im:
                return _normalise(im, name, max_pixels=max_pixels, background=background)
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(f"image is too large (possible decompression bomb): {name}: {exc}") from exc
    except MemoryError as exc:
        raise ImageError(f"not enough memory to decode image: {name}") from exc
    except (OSError, EOFError, SyntaxError, ValueError) as exc:
        raise ImageError(f"image is truncated or corrupt: {name}: {exc}") from exc
    except Exception as exc:  # a plugin tripping over hostile data (struct.error, IndexError, ...)
        raise ImageError(f"image is corrupt: {name}: {type(exc).__name__}: {exc}") from exc


def _open_formats() -> tuple[str, ...]:
    """The allowed formats that Pillow can open here. MPO has no opener of its own: Pillow's JPEG
    opener returns an MPO image when the JPEG carries a multi-picture index."""
    Image.init()
    return tuple(fmt for fmt in ALLOWED_FORMATS if fmt in Image.OPEN)


def _normalise_pil(im: Image.Image, *, max_pixels: int, background: tuple[int, int, int]) -> Image.Image:
    fmt = getattr(im, "format", None)
    if fmt is not None and fmt not in ALLOWED_FORMATS:
        raise ImageError(f"image format {fmt} is not allowed (allowed: {_ALLOWED_TEXT}); convert it first")
    name = "PIL image"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return _normalise(im, name, max_pixels=max_pixels, background=background)
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(f"image is too large (possible decompression bomb): {exc}") from exc
    except MemoryError as exc:
        raise ImageError("not enough memory to convert image") from exc
    except Exception as exc:  # OSError, ValueError (closed file), SyntaxError, EOFError, ...
        raise ImageError(f"image could not be loaded or converted: {type(exc).__name__}: {exc}") from exc


def _normalise(im: Image.Image, name: str, *, max_pixels: int, background: tuple[int, int, int]) -> Image.Image:
    """Frame 0, size checks, load, EXIF orientation, RGB. Always returns a new image."""
    if im.tell() != 0:
        im.seek(0)
    _check_size(im.size, name, max_pixels)
    im.load()
    if ImageFile.LOAD_TRUNCATED_IMAGES:  # someone flipped it while we were decoding
        raise ImageError("PIL.ImageFile.LOAD_TRUNCATED_IMAGES became True while loading; refusing")
    oriented = _exif_transpose(im)
    _check_size(oriented.size, name, max_pixels)
    rgb = _to_rgb(oriented, background)
    if rgb is im:
        rgb = im.copy()
    rgb.load()
    return rgb


def _check_size(size: tuple[int, int], name: str, max_pixels: int) -> None:
    width, height = size
    if width <= 0 or height <= 0:
        raise ImageError(f"image has zero size ({width}x{height}): {name}")
    if width * height > max_pixels:
        raise ImageError(
            f"image is too large (possible decompression bomb): {width}x{height} = {width * height} "
            f"pixels > max_pixels={max_pixels}: {name}"
        )


def _exif_transpose(im: Image.Image) -> Image.Image:
    """Apply EXIF orientation. Broken EXIF metadata is ignored: the pixels themselves are fine."""
    try:
        return ImageOps.exif_transpose(im)
    except (MemoryError, Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise
    except Exception:
        return im


def _to_rgb(im: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    mode = im.mode
    if mode == "RGB" and "transparency" not in im.info:
        return im
    if mode == "P":
        has_alpha = "transparency" in im.info or (im.palette is not None and im.palette.mode == "RGBA")
        return _composite(im.convert("RGBA"), background) if has_alpha else im.convert("RGB")
    if mode in ("L", "RGB") and "transparency" in im.info:  # PNG tRNS: one colour is transparent
        return _composite(im.convert("RGBA"), background)
    if mode in _ALPHA_MODES:
        if mode == "La":
            im = im.convert("LA")  # un-premultiply; Pillow has no La -> RGBA conversion
        return _composite(im.convert("RGBA"), background)
    if mode in _DIRECT_MODES:
        return im.convert("RGB")
    if mode in ("I", "F") or mode.startswith("I;16"):
        return Image.fromarray(_scale_to_uint8(np.asarray(im), mode)).convert("RGB")
    try:
        return im.convert("RGB")
    except ValueError as exc:
        raise ImageError(f"unsupported image mode {mode!r}") from exc


def _composite(rgba: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    base = Image.new("RGBA", rgba.size, (*background, 255))
    return Image.alpha_composite(base, rgba).convert("RGB")


def _scale_to_uint8(arr: np.ndarray, mode: str) -> np.ndarray:
    """Map a single-channel integer or float array to uint8 using the numeric range of its mode.

    - 16-bit unsigned (``I;16*``): divide by 257, so 65535 -> 255 and 32768 -> 128.
    - 32-bit integer (``I``): as 16-bit when all values lie in 0..65535, else min/max normalised.
    - float (``F``): times 255 when all finite values lie in [0, 1], else min/max normalised;
      NaN and infinities become 0.
    A constant image that needs min/max normalisation becomes black.
    """
    if arr.ndim != 2:
        raise ImageError(f"unsupported {mode} image layout with shape {arr.shape}")
    if arr.size == 0:
        return np.zeros(arr.shape, dtype=np.uint8)
    if arr.dtype.kind == "f":
        values = arr.astype(np.float64)
        finite = np.isfinite(values)
        if not finite.all():
            values = np.where(finite, values, 0.0)
        lo, hi = float(values.min()), float(values.max())
        scaled = values * 255.0 if lo >= 0.0 and hi <= 1.0 else _minmax(values, lo, hi)
    elif arr.dtype.kind == "u" and arr.dtype.itemsize <= 2:
        scaled = arr.astype(np.float32) / 257.0
    else:
        values = arr.astype(np.float64)
        lo, hi = float(values.min()), float(values.max())
        scaled = values / 257.0 if lo >= 0 and hi <= 65535 else _minmax(values, lo, hi)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def _minmax(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    if hi <= lo:
        return np.zeros_like(values)
    return (values - lo) * (255.0 / (hi - lo))


# --------------------------------------------------------------------------------------------------
# naming what we refused


def _unidentified(data: bytes, name: str) -> ImageError:
    fmt = _sniff_format(data)
    if fmt is None:
        if _looks_like_text(data):
            return ImageError(f"not an image (could not identify format; the data looks like text): {name}")
        return ImageError(f"not an image (could not identify format): {name}")
    if fmt in ALLOWED_FORMATS:
        return ImageError(f"image is truncated or corrupt: {name}: its {fmt} header could not be parsed")
    return ImageError(
        f"image format {fmt} is not allowed ({name}); allowed: {_ALLOWED_TEXT}; convert it to PNG or JPEG first"
    )


def _sniff_format(data: bytes) -> str | None:
    """Name the format of `data` from its magic bytes only (nothing is parsed or decoded)."""
    head = data[:16]
    if head.startswith(b"%PDF"):
        return "PDF"
    if head[4:8] == b"ftyp" and head[8:12] in (b"heic", b"heix", b"hevc", b"heim", b"heis", b"mif1", b"msf1"):
        return "HEIF"
    lowered = data[:1024].lstrip().lower()
    if lowered.startswith((b"<svg", b"<?xml")) and b"<svg" in lowered:
        return "SVG"
    try:
        Image.init()
        candidates = [(fmt, Image.OPEN[fmt][1]) for fmt in Image.ID if fmt in Image.OPEN]
    except Exception:
        return None
    for fmt, accept in candidates:
        if accept is None:
            continue  # plugins without a cheap magic check (e.g. TGA) would match anything
        try:
            if accept(head):
                return fmt
        except Exception:
            continue
    return None


def _looks_like_text(data: bytes) -> bool:
    sample = data[:1024]
    if b"\x00" in sample:
        return False
    text = sample.decode("utf-8", errors="replace")
    if text.count("\ufffd") > 3:  # a few allowed: the sample may end inside a multi-byte character
        return False
    return all(ch.isprintable() or ch in "\r\n\t\f\ufffd" for ch in text)
