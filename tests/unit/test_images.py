"""Input photo checks: what is accepted, and the clear error for what is not."""

from __future__ import annotations

import base64
import io
from collections.abc import Callable

import pytest
from PIL import Image

from serve_app.errors import InvalidImage, PayloadTooLarge, UnsupportedMediaType
from serve_app.images import ImageLimits, check_image, decode_base64_image, load_image

LIMITS = ImageLimits(max_bytes=2_000_000, max_pixels=4_000_000, max_side=4000, min_side=16)

# The ingress checks an upload with check_image (a JPEG's header and markers) and the worker
# reads it with load_image: both must refuse the same photos with the same error.
Reader = Callable[[bytes, ImageLimits], object]
READERS = pytest.mark.parametrize("read", [load_image, check_image], ids=["load", "check"])


def encode(image: Image.Image, fmt: str, **kwargs: object) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt, **kwargs)
    return out.getvalue()


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_accepts_jpeg_png_webp(fmt: str) -> None:
    image = load_image(encode(Image.new("RGB", (64, 48), (200, 10, 10)), fmt), LIMITS)
    assert image.size == (64, 48) and image.mode == "RGB"


def test_keeps_alpha() -> None:
    image = load_image(encode(Image.new("RGBA", (32, 32), (0, 0, 0, 0)), "PNG"), LIMITS)
    assert image.mode == "RGBA"


def test_applies_exif_orientation() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    data = encode(Image.new("RGB", (80, 40), "white"), "JPEG", exif=exif)
    assert load_image(data, LIMITS).size == (40, 80)


def test_palette_and_16bit_become_rgb() -> None:
    pal = Image.new("P", (32, 32))
    assert load_image(encode(pal, "PNG"), LIMITS).mode == "RGB"
    deep = Image.new("I;16", (32, 32), 40000)
    loaded = load_image(encode(deep, "PNG"), LIMITS)
    assert loaded.mode == "RGB" and loaded.getpixel((0, 0))[0] > 100


@pytest.mark.parametrize(
    ("data", "error", "code"),
    [
        (b"", InvalidImage, "empty_image"),
        (b"GIF89a" + b"\0" * 100, UnsupportedMediaType, "unsupported_image_type"),
        (
            b"<svg xmlns='http://www.w3.org/2000/svg'/>",
            UnsupportedMediaType,
            "unsupported_image_type",
        ),
        (b"%PDF-1.4 hello", UnsupportedMediaType, "unsupported_image_type"),
        (b"\x89PNG\r\n\x1a\n" + b"\0" * 20, InvalidImage, "corrupt_image"),
    ],
)
@READERS
def test_refuses_non_images(data: bytes, error: type, code: str, read: Reader) -> None:
    with pytest.raises(error) as info:
        read(data, LIMITS)
    assert info.value.code == code


@READERS
def test_refuses_truncated_jpeg(read: Reader) -> None:
    data = encode(Image.effect_noise((256, 256), 50).convert("RGB"), "JPEG")
    with pytest.raises(InvalidImage) as info:
        read(data[: len(data) // 2], LIMITS)
    assert info.value.code == "corrupt_image"


@READERS
def test_refuses_too_many_pixels_without_decoding(read: Reader) -> None:
    # A 5000x5000 PNG of one colour is tiny on disk but 25 Mpx: a decompression bomb here.
    data = encode(Image.new("L", (5000, 5000)), "PNG")
    assert len(data) < LIMITS.max_bytes
    with pytest.raises(PayloadTooLarge) as info:
        read(data, LIMITS)
    assert info.value.code == "image_too_many_pixels"


@READERS
def test_refuses_tiny_and_too_many_bytes(read: Reader) -> None:
    with pytest.raises(InvalidImage) as info:
        read(encode(Image.new("RGB", (4, 4)), "PNG"), LIMITS)
    assert info.value.code == "image_too_small"
    small = ImageLimits(max_bytes=1000, max_pixels=10**6, max_side=1000, min_side=1)
    with pytest.raises(PayloadTooLarge):
        read(encode(Image.effect_noise((200, 200), 60).convert("RGB"), "PNG"), small)


@READERS
def test_refuses_animated_webp(read: Reader) -> None:
    frames = [Image.new("RGB", (32, 32), c) for c in ("red", "blue")]
    out = io.BytesIO()
    frames[0].save(out, format="WEBP", save_all=True, append_images=frames[1:])
    with pytest.raises(InvalidImage) as info:
        read(out.getvalue(), LIMITS)
    assert info.value.code == "animated_image"


def test_base64_and_data_uri() -> None:
    png = encode(Image.new("RGB", (20, 20)), "PNG")
    b64 = base64.b64encode(png).decode()
    assert decode_base64_image(b64, 10**6) == png
    assert decode_base64_image(f"data:image/png;base64,{b64}", 10**6) == png
    assert decode_base64_image(b64[:40] + "\n" + b64[40:], 10**6) == png


@pytest.mark.parametrize(
    ("value", "code"),
    [
        ("not base64 at all!!", "invalid_base64"),
        ("data:text/plain;base64,aGVsbG8=", "unsupported_image_type"),
        ("data:image/png,rawdata", "invalid_data_uri"),
        ("", "invalid_base64"),
    ],
)
def test_base64_errors(value: str, code: str) -> None:
    with pytest.raises((InvalidImage, UnsupportedMediaType)) as info:
        decode_base64_image(value, 10**6)
    assert info.value.code == code


def test_base64_too_large_is_refused_before_decoding() -> None:
    with pytest.raises(PayloadTooLarge):
        decode_base64_image("A" * 5000, 1000)


# --- HEIC/HEIF (iPhone) and AVIF ---------------------------------------------------------
def _heif(image: Image.Image, fmt: str, orientation: int | None = None) -> bytes:
    """Real HEIC (pillow-heif's libheif encoder) or AVIF (Pillow's libavif) bytes."""
    exif = Image.Exif()
    if orientation is not None:
        exif[0x0112] = orientation
    return encode(image, fmt, exif=exif.tobytes(), quality=90)


@pytest.mark.parametrize(("fmt", "media_type"), [("HEIF", "heic"), ("AVIF", "avif")])
def test_accepts_heic_and_avif(fmt: str, media_type: str) -> None:
    data = _heif(Image.new("RGB", (96, 64), (200, 30, 30)), fmt)
    assert data[4:8] == b"ftyp"
    image = load_image(data, LIMITS)
    assert image.size == (96, 64) and image.mode == "RGB"
    red, green, _ = image.getpixel((48, 32))
    assert red > 150 and green < 90  # decoded, not a blank stand-in
    uri = f"data:image/{media_type};base64," + base64.b64encode(data).decode()
    assert decode_base64_image(uri, LIMITS.max_bytes) == data


@pytest.mark.parametrize("fmt", ["HEIF", "AVIF"])
def test_heic_and_avif_orientation_is_applied(fmt: str) -> None:
    # A phone held upright stores a landscape sensor image plus "rotate 90°".
    data = _heif(Image.new("RGB", (80, 40), "white"), fmt, orientation=6)
    assert load_image(data, LIMITS).size == (40, 80)


@pytest.mark.parametrize("fmt", ["HEIF", "AVIF"])
def test_heic_and_avif_obey_the_pixel_limits(fmt: str) -> None:
    data = _heif(Image.new("RGB", (600, 100), "white"), fmt)
    small = ImageLimits(max_bytes=2_000_000, max_pixels=4_000_000, max_side=500, min_side=16)
    with pytest.raises(PayloadTooLarge) as err:
        load_image(data, small)
    assert err.value.code == "image_too_many_pixels"


def test_truncated_heic_is_a_clear_error() -> None:
    data = _heif(Image.new("RGB", (64, 64), "white"), "HEIF")
    with pytest.raises(InvalidImage) as err:
        load_image(data[: len(data) // 2], LIMITS)
    assert err.value.code == "corrupt_image"


def test_check_image_accepts_what_load_image_reads() -> None:
    photo = Image.effect_noise((640, 480), 40).convert("RGB")
    for fmt in ("JPEG", "PNG", "WEBP"):
        data = encode(photo, fmt)
        check_image(data, LIMITS)
        assert load_image(data, LIMITS).size == (640, 480)


# Issue 11: the ingress no longer decodes a JPEG's pixels; it walks its markers to the end.


def bogus_huffman_table(data: bytes) -> bytes:
    """The JPEG with its first Huffman table's code counts made impossible: every marker is in
    place and the file whole, but no decoder can read its scan."""
    out = bytearray(data)
    at = out.find(b"\xff\xc4")
    out[at + 5 : at + 21] = b"\xff" * 16
    return bytes(out)


def test_check_refuses_a_truncated_progressive_jpeg() -> None:
    data = encode(Image.effect_noise((320, 240), 50).convert("RGB"), "JPEG", progressive=True)
    check_image(data, LIMITS)
    for cut in (len(data) // 4, len(data) // 2, len(data) - 2):
        with pytest.raises(InvalidImage) as info:
            check_image(data[:cut], LIMITS)
        assert info.value.code == "corrupt_image"


def test_check_accepts_bytes_after_the_image() -> None:
    """A phone's motion photo is a JPEG with a video after its end marker; decoders show it."""
    data = encode(Image.effect_noise((320, 240), 50).convert("RGB"), "JPEG") + b"\0ftypmp42" * 50
    check_image(data, LIMITS)
    assert load_image(data, LIMITS).size == (320, 240)


def test_check_is_not_fooled_by_markers_inside_a_segment() -> None:
    """An end marker inside a comment (or an EXIF thumbnail) is not the image's end."""
    photo = Image.effect_noise((320, 240), 50).convert("RGB")
    data = encode(photo, "JPEG", comment=b"\xff\xda\x00\x08 \xff\xd9 thumbnail")
    check_image(data, LIMITS)
    scan = data.rfind(b"\xff\xda")
    with pytest.raises(InvalidImage):
        check_image(data[: scan + 40], LIMITS)


def test_a_jpeg_the_check_passes_but_no_decoder_reads_is_refused_by_the_worker() -> None:
    """What the ingress's marker walk cannot see, the worker's full decode refuses with the same
    error (and the worker does not retry it: InvalidImage is permanent)."""
    data = bogus_huffman_table(encode(Image.effect_noise((320, 240), 50).convert("RGB"), "JPEG"))
    check_image(data, LIMITS)
    with pytest.raises(InvalidImage) as info:
        load_image(data, LIMITS)
    assert info.value.code == "corrupt_image"
