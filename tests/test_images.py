"""Tests for vlm.processing.images.load_image: a battery of bad and unusual images, all generated here."""

from __future__ import annotations

import io
import os
import random
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from vlm.errors import ImageError, VLMError
from vlm.processing.images import load_image

RED = (255, 0, 0)
BLUE = (0, 0, 255)
WHITE = (255, 255, 255)


# --------------------------------------------------------------------------------------------------
# helpers


def encode(im: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kwargs)
    return buf.getvalue()


def write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def png_chunk(tag: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + tag + payload + struct.pack(">I", zlib.crc32(tag + payload))


def png_with_header(width: int, height: int) -> bytes:
    """A PNG whose IHDR declares `width` x `height` (1-bit grey) but whose data is a few bytes."""
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + png_chunk(b"IEND", b"")
    )


def noise(width: int = 48, height: int = 32, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def px(im: Image.Image, xy: tuple[int, int]) -> tuple[int, ...]:
    value = im.getpixel(xy)
    assert isinstance(value, tuple)
    return value


def close_to(actual: tuple[int, ...], expected: tuple[int, ...], tol: int) -> bool:
    return all(abs(a - e) <= tol for a, e in zip(actual, expected, strict=True))


def check_rgb(im: Image.Image, size: tuple[int, int]) -> None:
    assert isinstance(im, Image.Image)
    assert im.mode == "RGB"
    assert im.size == size
    assert getattr(im, "fp", None) is None  # no lazy file handle


# --------------------------------------------------------------------------------------------------
# good but unusual images: correct RGB values


def test_one_by_one_png(tmp_path):
    path = write(tmp_path, "one.png", encode(Image.new("RGB", (1, 1), RED), "PNG"))
    im = load_image(path)
    check_rgb(im, (1, 1))
    assert px(im, (0, 0)) == RED


@pytest.mark.parametrize("size", [(1, 5000), (5000, 1)])
def test_extreme_aspect_ratio_allowed(tmp_path, size):
    path = write(tmp_path, "thin.png", encode(Image.new("RGB", size, BLUE), "PNG"))
    im = load_image(str(path))
    check_rgb(im, size)
    assert px(im, (size[0] - 1, size[1] - 1)) == BLUE


def test_result_independent_of_file(tmp_path):
    src = noise()
    path = write(tmp_path, "noise.png", encode(src, "PNG"))
    im = load_image(path)
    path.unlink()
    assert np.array_equal(np.asarray(im), np.asarray(src))
    assert im.getpixel((5, 5)) == src.getpixel((5, 5))


def test_cmyk_jpeg_pure_red(tmp_path):
    path = write(tmp_path, "cmyk.jpg", encode(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG"))
    with Image.open(path) as raw:
        assert raw.mode == "CMYK"
    r, g, b = px(load_image(path), (8, 8))
    assert r > 200 and g < 60 and b < 60


def test_cmyk_tiff_black_and_white(tmp_path):
    cmyk = Image.new("CMYK", (4, 2), (0, 0, 0, 0))
    cmyk.putpixel((0, 0), (0, 0, 0, 255))
    im = load_image(write(tmp_path, "cmyk.tif", encode(cmyk, "TIFF")))
    assert px(im, (0, 0)) == (0, 0, 0)
    assert px(im, (1, 0)) == WHITE


def test_16bit_png_is_scaled_not_clipped(tmp_path):
    arr = np.array([[0, 257, 32768, 65535]], dtype=np.uint16)
    src = Image.fromarray(arr)
    assert src.mode == "I;16"
    path = write(tmp_path, "deep.png", encode(src, "PNG"))
    im = load_image(path)
    check_rgb(im, (4, 1))
    assert [px(im, (x, 0)) for x in range(4)] == [(0, 0, 0), (1, 1, 1), (128, 128, 128), WHITE]


@pytest.mark.parametrize(("mode", "dtype"), [("I;16", "<u2"), ("I;16B", ">u2"), ("I;16L", "<u2")])
def test_16bit_modes_in_memory(mode, dtype):
    # frombytes, not convert(): Pillow's I;16 -> I;16B conversion itself clips at 255
    src = Image.frombytes(mode, (3, 1), np.array([65535, 32768, 0], dtype=dtype).tobytes())
    assert src.getpixel((0, 0)) == 65535
    im = load_image(src)
    assert [px(im, (x, 0))[0] for x in range(3)] == [255, 128, 0]


def test_mode_i_tiff_16bit_range(tmp_path):
    src = Image.fromarray(np.array([[0, 32768, 65535]], dtype=np.int32))
    assert src.mode == "I"
    im = load_image(write(tmp_path, "int.tif", encode(src, "TIFF")))
    assert [px(im, (x, 0))[0] for x in range(3)] == [0, 128, 255]


def test_mode_i_tiff_wide_range_is_min_max_normalised(tmp_path):
    src = Image.fromarray(np.array([[-1000, 499_500, 1_000_000]], dtype=np.int32))
    im = load_image(write(tmp_path, "wide.tif", encode(src, "TIFF")))
    assert [px(im, (x, 0))[0] for x in range(3)] == [0, 128, 255]


def test_mode_f_tiff_unit_range(tmp_path):
    src = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32))
    assert src.mode == "F"
    im = load_image(write(tmp_path, "unit.tif", encode(src, "TIFF")))
    assert [px(im, (x, 0)) for x in range(3)] == [(0, 0, 0), (128, 128, 128), WHITE]


def test_mode_f_tiff_other_range_and_nan(tmp_path):
    src = Image.fromarray(np.array([[-10.0, 45.0, 100.0, np.nan]], dtype=np.float32))
    im = load_image(write(tmp_path, "float.tif", encode(src, "TIFF")))
    # min/max over finite values -10..100; NaN becomes 0 before scaling -> (0 + 10) / 110 * 255
    assert [px(im, (x, 0))[0] for x in range(4)] == [0, 128, 255, 23]


def test_mode_1_bitmap(tmp_path):
    src = Image.new("1", (3, 1), 0)
    src.putpixel((1, 0), 1)
    im = load_image(write(tmp_path, "bits.bmp", encode(src, "BMP")))
    assert [px(im, (x, 0)) for x in range(3)] == [(0, 0, 0), WHITE, (0, 0, 0)]


def palette_image(transparent_index: int | None) -> Image.Image:
    im = Image.new("P", (2, 1))
    im.putpalette([255, 0, 0, 0, 0, 255] + [0, 0, 0] * 254)
    im.putpixel((0, 0), 0)
    im.putpixel((1, 0), 1)
    if transparent_index is not None:
        im.info["transparency"] = transparent_index
    return im


def test_palette_png_with_transparency(tmp_path):
    data = encode(palette_image(0), "PNG", transparency=0)
    path = write(tmp_path, "pal.png", data)
    im = load_image(path)
    assert px(im, (0, 0)) == WHITE  # transparent red -> background
    assert px(im, (1, 0)) == BLUE
    assert px(load_image(path, background=(0, 0, 0)), (0, 0)) == (0, 0, 0)


def test_palette_without_transparency(tmp_path):
    im = load_image(write(tmp_path, "pal.png", encode(palette_image(None), "PNG")))
    assert [px(im, (x, 0)) for x in range(2)] == [RED, BLUE]


def test_gif_with_transparency(tmp_path):
    data = encode(palette_image(1), "GIF", transparency=1)
    im = load_image(write(tmp_path, "t.gif", data))
    assert px(im, (0, 0)) == RED
    assert px(im, (1, 0)) == WHITE


def test_rgb_png_with_trns_colour(tmp_path):
    src = Image.new("RGB", (2, 1), RED)
    src.putpixel((1, 0), BLUE)
    im = load_image(write(tmp_path, "trns.png", encode(src, "PNG", transparency=RED)))
    assert [px(im, (x, 0)) for x in range(2)] == [WHITE, BLUE]


def test_la_png_alpha_composited(tmp_path):
    src = Image.new("LA", (3, 1))
    src.putdata([(0, 0), (0, 255), (0, 128)])
    im = load_image(write(tmp_path, "la.png", encode(src, "PNG")))
    assert [px(im, (x, 0)) for x in range(3)] == [WHITE, (0, 0, 0), (127, 127, 127)]


def test_rgba_half_transparent(tmp_path):
    src = Image.new("RGBA", (2, 2), (255, 0, 0, 128))
    im = load_image(write(tmp_path, "half.png", encode(src, "PNG")))
    assert px(im, (1, 1)) == (255, 127, 127)
    assert px(load_image(src, background=(0, 0, 0)), (0, 0)) == (128, 0, 0)


def test_exif_orientation_6_swaps_size(tmp_path):
    src = Image.new("RGB", (40, 20), RED)
    src.paste(BLUE, (20, 0, 40, 20))  # left half red, right half blue
    exif = src.getexif()
    exif[0x0112] = 6  # display needs a 90 degree clockwise rotation
    path = write(tmp_path, "rot.jpg", encode(src, "JPEG", exif=exif.tobytes(), quality=95))
    im = load_image(path)
    check_rgb(im, (20, 40))
    assert close_to(px(im, (10, 5)), RED, 40)  # the left half ends up on top
    assert close_to(px(im, (10, 35)), BLUE, 40)


def test_animated_gif_uses_frame_0(tmp_path):
    frames = [Image.new("RGB", (8, 8), c) for c in (RED, (0, 255, 0), BLUE)]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    with Image.open(io.BytesIO(data)) as raw:
        assert raw.n_frames == 3
    assert px(load_image(write(tmp_path, "anim.gif", data)), (4, 4)) == RED


def test_animated_gif_pil_input_seeked_to_frame_0():
    frames = [Image.new("RGB", (8, 8), c) for c in (RED, BLUE)]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50)
    with Image.open(io.BytesIO(data)) as raw:
        raw.seek(1)
        assert px(load_image(raw), (4, 4)) == RED


@pytest.mark.parametrize("fmt", ["PNG", "WEBP"])
def test_animated_png_and_webp_use_frame_0(fmt):
    frames = [Image.new("RGB", (8, 8), c) for c in (RED, BLUE)]
    kwargs = {"lossless": True} if fmt == "WEBP" else {}
    data = encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=50, **kwargs)
    with Image.open(io.BytesIO(data)) as raw:
        assert raw.n_frames == 2
    assert px(load_image(data), (4, 4)) == RED


def test_webp_lossless_and_alpha(tmp_path):
    src = noise()
    im = load_image(write(tmp_path, "x.webp", encode(src, "WEBP", lossless=True)))
    assert np.array_equal(np.asarray(im), np.asarray(src))
    rgba = Image.new("RGBA", (4, 4), (0, 0, 255, 0))
    assert px(load_image(encode(rgba, "WEBP", lossless=True)), (0, 0)) == WHITE


def test_bmp(tmp_path):
    src = noise()
    im = load_image(write(tmp_path, "x.bmp", encode(src, "BMP")))
    assert np.array_equal(np.asarray(im), np.asarray(src))


def test_mpo_uses_first_picture():
    frames = [Image.new("RGB", (8, 8), c) for c in (RED, BLUE)]
    data = encode(frames[0], "MPO", save_all=True, append_images=frames[1:])
    with Image.open(io.BytesIO(data)) as raw:
        assert raw.format == "MPO"
    assert close_to(px(load_image(data), (4, 4)), RED, 8)


def test_bytes_bytearray_memoryview_input():
    data = encode(noise(), "PNG")
    expected = np.asarray(noise())
    for source in (data, bytearray(data), memoryview(data)):
        assert np.array_equal(np.asarray(load_image(source)), expected)


def test_file_like_input_not_closed():
    buf = io.BytesIO(encode(Image.new("RGB", (3, 2), BLUE), "PNG"))
    im = load_image(buf)
    check_rgb(im, (3, 2))
    assert px(im, (2, 1)) == BLUE
    assert not buf.closed


def test_binary_file_object_input(tmp_path):
    path = write(tmp_path, "x.png", encode(Image.new("RGB", (2, 2), RED), "PNG"))
    with open(path, "rb") as fh:
        assert px(load_image(fh), (0, 0)) == RED
        assert px(load_image(fh), (0, 0)) == RED  # read again (a chat's history comes back every turn)


def test_a_seekable_stream_is_read_from_where_it_stands_and_put_back():
    data = encode(Image.new("RGB", (2, 2), RED), "PNG")
    buf = io.BytesIO(b"header" + data)
    buf.seek(6)
    assert px(load_image(buf), (0, 0)) == RED
    assert buf.tell() == 6 and px(load_image(buf), (0, 0)) == RED


def test_pil_rgba_input_is_not_modified():
    src = Image.new("RGBA", (2, 2), (0, 0, 0, 0))
    im = load_image(src)
    assert px(im, (0, 0)) == WHITE
    assert src.mode == "RGBA" and px(src, (0, 0)) == (0, 0, 0, 0)
    rgb = Image.new("RGB", (2, 2), RED)
    assert load_image(rgb) is not rgb


@pytest.mark.parametrize(
    ("mode", "value", "expected"),
    [
        ("YCbCr", (76, 85, 255), RED),
        ("HSV", (0, 255, 255), RED),
        ("LAB", (255, 128, 128), WHITE),
        ("RGBX", (0, 0, 255, 0), BLUE),
        ("L", 255, WHITE),
        ("RGBa", (0, 0, 0, 0), WHITE),
        ("La", (0, 255), (0, 0, 0)),
        ("PA", (0, 0), WHITE),
    ],
)
def test_other_modes(mode, value, expected):
    im = load_image(Image.new(mode, (2, 2), value))
    check_rgb(im, (2, 2))
    assert close_to(px(im, (0, 0)), expected, 3)


# --------------------------------------------------------------------------------------------------
# bad images: ImageError with a useful message


def test_decompression_bomb_declared_in_header(tmp_path):
    path = write(tmp_path, "bomb.png", png_with_header(100_000, 100_000))
    assert path.stat().st_size < 200
    filters_before = list(warnings.filters)
    limit_before = Image.MAX_IMAGE_PIXELS
    with pytest.raises(ImageError, match="decompression bomb"):
        load_image(path)
    assert warnings.filters == filters_before
    assert limit_before == Image.MAX_IMAGE_PIXELS


def test_pillow_bomb_warning_is_an_error_too():
    # 10000 x 10000 is over Pillow's warning limit but under its error limit.
    with pytest.raises(ImageError, match="decompression bomb"):
        load_image(png_with_header(10_000, 10_000), max_pixels=10**9)


def test_max_pixels_lowered():
    data = encode(Image.new("1", (200, 100)), "PNG")
    assert load_image(data, max_pixels=20_000).size == (200, 100)
    with pytest.raises(ImageError, match="max_pixels=19999"):
        load_image(data, max_pixels=19_999)
    with pytest.raises(ImageError, match="max_pixels"):
        load_image(Image.new("RGB", (200, 100)), max_pixels=100)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "GIF", "TIFF", "BMP"])
def test_truncated_files(tmp_path, fmt):
    data = encode(noise(64, 64), fmt)
    path = write(tmp_path, f"cut.{fmt.lower()}", data[: len(data) // 2])
    with pytest.raises(ImageError, match="truncated or corrupt"):
        load_image(path)


def test_load_truncated_images_flag_is_refused(monkeypatch):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(ImageError, match="LOAD_TRUNCATED_IMAGES"):
        load_image(encode(Image.new("RGB", (2, 2)), "PNG"))


def test_zero_byte_file(tmp_path):
    with pytest.raises(ImageError, match="empty"):
        load_image(write(tmp_path, "empty.png", b""))
    with pytest.raises(ImageError, match="empty"):
        load_image(b"")
    with pytest.raises(ImageError, match="empty"):
        load_image(io.BytesIO())


def test_text_file_renamed_png(tmp_path):
    path = write(tmp_path, "notes.png", b"hello, this is not an image\n" * 10)
    with pytest.raises(ImageError, match="not an image"):
        load_image(path)


def test_eps_refused(tmp_path):
    eps = (
        b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nnewpath 0 0 moveto 10 10 lineto stroke\nshowpage\n%%EOF\n"
    )
    with pytest.raises(ImageError, match="EPS") as info:
        load_image(write(tmp_path, "evil.png", eps))
    assert "PNG" in str(info.value)  # lists the allowed formats


def test_pdf_refused(tmp_path):
    pdf = encode(Image.new("RGB", (8, 8), RED), "PDF")
    assert pdf.startswith(b"%PDF")
    with pytest.raises(ImageError, match="PDF"):
        load_image(write(tmp_path, "doc.pdf", pdf))


def test_ico_renamed_png_refused(tmp_path):
    ico = encode(Image.new("RGB", (16, 16), RED), "ICO")
    with pytest.raises(ImageError, match="ICO"):
        load_image(write(tmp_path, "icon.png", ico))


def test_pil_image_of_disallowed_format_refused(tmp_path):
    path = write(tmp_path, "x.ppm", encode(Image.new("RGB", (2, 2)), "PPM"))
    with Image.open(path) as raw, pytest.raises(ImageError, match="PPM"):
        load_image(raw)


def test_corrupt_png_header():
    data = bytearray(encode(Image.new("RGB", (4, 4)), "PNG"))
    data[20] ^= 0xFF  # inside IHDR: CRC no longer matches
    with pytest.raises(ImageError, match="corrupt"):
        load_image(bytes(data))


def test_max_bytes_cap(tmp_path):
    data = encode(noise(), "PNG")
    path = write(tmp_path, "big.png", data)
    cap = len(data) - 1
    for source in (path, data, io.BytesIO(data)):
        with pytest.raises(ImageError, match="too large"):
            load_image(source, max_bytes=cap)
    assert load_image(path, max_bytes=len(data)).size == (48, 32)


def test_missing_path(tmp_path):
    missing = tmp_path / "nope.png"
    with pytest.raises(ImageError, match="not found") as info:
        load_image(missing)
    assert str(missing) in str(info.value)
    assert isinstance(info.value.__cause__, FileNotFoundError)


def test_directory_path(tmp_path):
    with pytest.raises(ImageError, match="directory"):
        load_image(tmp_path)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_fifo_path_refused_without_blocking(tmp_path):
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    with pytest.raises(ImageError, match="not a regular file"):
        load_image(fifo)


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root can read anything")
def test_permission_denied(tmp_path):
    path = write(tmp_path, "secret.png", encode(Image.new("RGB", (2, 2)), "PNG"))
    path.chmod(0)
    try:
        with pytest.raises(ImageError, match="permission denied"):
            load_image(path)
    finally:
        path.chmod(0o600)


def test_permission_denied_simulated(tmp_path, monkeypatch):
    import vlm.processing.images as images_module

    def deny(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    path = write(tmp_path, "secret.png", encode(Image.new("RGB", (2, 2)), "PNG"))
    monkeypatch.setattr(images_module, "open", deny, raising=False)
    with pytest.raises(ImageError, match="permission denied") as info:
        load_image(path)
    assert isinstance(info.value.__cause__, PermissionError)


@pytest.mark.parametrize(
    "url",
    [
        "http://example.com/cat.png",
        "https://example.com/cat.png",
        "ftp://example.com/cat.png",
        "HTTPS://EXAMPLE.COM/CAT.PNG",
        "data:image/png;base64,iVBORw0KGgo=",
        "file:///etc/passwd",
    ],
)
def test_url_refused(url):
    with pytest.raises(ImageError, match="download the file first"):
        load_image(url)


def test_zero_sized_pil_image():
    with pytest.raises(ImageError, match="zero size"):
        load_image(Image.new("RGB", (0, 5)))


def test_text_mode_file_object(tmp_path):
    path = write(tmp_path, "x.png", b"abc")
    with open(path) as fh, pytest.raises(ImageError, match="binary mode"):
        load_image(fh)


def test_closed_file_object(tmp_path):
    buf = io.BytesIO(b"abc")
    buf.close()
    with pytest.raises(ImageError):
        load_image(buf)


@pytest.mark.parametrize("source", [None, 42, 3.5, ["a.png"], np.zeros((2, 2, 3), dtype=np.uint8)])
def test_unsupported_source_types(source):
    with pytest.raises(ImageError, match="unsupported image source"):
        load_image(source)


@pytest.mark.parametrize(
    "kwargs",
    [{"max_bytes": 0}, {"max_pixels": -1}, {"background": (1, 2)}, {"background": (0, 0, 256)}],
)
def test_bad_arguments(kwargs):
    with pytest.raises(ImageError):
        load_image(encode(Image.new("RGB", (2, 2)), "PNG"), **kwargs)


def test_image_error_is_vlm_error():
    assert issubclass(ImageError, VLMError)


# --------------------------------------------------------------------------------------------------
# never another exception type


def _hostile_payloads() -> list[tuple[str, bytes]]:
    rng = random.Random(1234)
    payloads: list[tuple[str, bytes]] = [
        ("empty", b""),
        ("one byte", b"\x89"),
        ("png magic only", b"\x89PNG\r\n\x1a\n"),
        ("jpeg soi only", b"\xff\xd8"),
        ("jpeg soi eoi", b"\xff\xd8\xff\xd9"),
        ("gif header only", b"GIF89a"),
        ("tiff header only", b"II*\x00\x08\x00\x00\x00"),
        ("tiff bad offset", b"II*\x00\xff\xff\xff\x7f"),
        ("bmp header only", b"BM" + b"\x00" * 12),
        ("riff webp only", b"RIFF\x10\x00\x00\x00WEBPVP8 "),
        ("zero size png", png_with_header(0, 0)),
        ("huge png", png_with_header(2**31 - 1, 2**31 - 1)),
        ("nul bytes", b"\x00" * 100),
        ("random", bytes(rng.randrange(256) for _ in range(300))),
        ("eps", b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n"),
        ("svg", b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>'),
    ]
    small = noise(16, 16, seed=7)
    variants = {
        "PNG": encode(small, "PNG"),
        "JPEG": encode(small, "JPEG"),
        "GIF": encode(small, "GIF"),
        "TIFF": encode(small, "TIFF"),
        "BMP": encode(small, "BMP"),
        "WEBP": encode(small, "WEBP"),
        "APNG": encode(small, "PNG", save_all=True, append_images=[noise(16, 16, seed=8)]),
    }
    for fmt, data in variants.items():
        for cut in (1, 20, len(data) // 3):
            payloads.append((f"{fmt} cut at {cut}", data[:cut]))
        for i in range(4):
            corrupted = bytearray(data)
            for _ in range(6):
                corrupted[rng.randrange(8, len(corrupted))] = rng.randrange(256)
            payloads.append((f"{fmt} flipped #{i}", bytes(corrupted)))
    return payloads


HOSTILE = _hostile_payloads()


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")
@pytest.mark.parametrize(("label", "data"), HOSTILE, ids=[label for label, _ in HOSTILE])
def test_never_another_exception(tmp_path, label, data):
    path = write(tmp_path, "hostile.png", data)
    for source in (data, path, io.BytesIO(data)):
        try:
            im = load_image(source)
        except Exception as exc:
            assert isinstance(exc, ImageError), f"{label}: {type(exc).__name__}: {exc}"
        else:  # a few random flips may leave a decodable image; then it must be a proper result
            assert im.mode == "RGB" and im.width > 0 and im.height > 0
