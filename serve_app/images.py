"""Input photos: decode, check, orient. Everything is checked before anything is stored."""

from __future__ import annotations

import base64
import binascii
import io
import re
import warnings
from dataclasses import dataclass

import pillow_heif
from PIL import Image, ImageOps, UnidentifiedImageError

from serve_app.errors import InvalidImage, PayloadTooLarge, UnsupportedMediaType
from serve_app.settings import Settings

# HEIC/HEIF (iPhone photos) decode through pillow-heif's opener; AVIF through Pillow's own
# plugin (pillow-heif 1.x left AVIF to Pillow). Both honour the same limits as every photo.
pillow_heif.register_heif_opener()

# Magic bytes of the formats we accept; anything else is refused before Pillow sees it.
_FORMATS = {
    "JPEG": "image/jpeg",
    "PNG": "image/png",
    "WEBP": "image/webp",
    "HEIF": "image/heic",
    "AVIF": "image/avif",
}
# Data-URI types accepted besides _FORMATS' own.
_MEDIA_ALIASES = {"image/heif", "image/heic-sequence", "image/heif-sequence"}
# ISO-BMFF brands (the `ftyp` box) of HEIF still images and of AVIF.
_HEIF_BRANDS = {b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"mif1", b"msf1"}
_AVIF_BRANDS = {b"avif", b"avis"}
FORMAT_NAMES = "JPEG, PNG, WebP, HEIC/HEIF or AVIF"
_DATA_URI = re.compile(
    r"data:(?P<type>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w-]+=[\w.-]+)*)(?P<b64>;base64)?,", re.I
)


@dataclass(frozen=True)
class ImageLimits:
    """Size limits for one photo."""

    max_bytes: int
    max_pixels: int
    max_side: int
    min_side: int

    @classmethod
    def from_settings(cls, settings: Settings) -> ImageLimits:
        """The limits this installation is configured with."""
        return cls(
            settings.max_upload_bytes,
            settings.max_image_pixels,
            settings.max_image_side,
            settings.min_image_side,
        )


def sniff_format(data: bytes) -> str | None:
    """PIL format name from magic bytes, or None."""
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    if len(data) >= 16 and data[4:8] == b"ftyp":
        box = int.from_bytes(data[:4], "big")
        major = data[8:12]
        # The compatible brands follow the major brand and a 4-byte minor version.
        compatible = {data[i : i + 4] for i in range(16, min(box, 64, len(data)) - 3, 4)}
        if major in _AVIF_BRANDS or (major not in _HEIF_BRANDS and compatible & _AVIF_BRANDS):
            return "AVIF"
        if major in _HEIF_BRANDS or compatible & _HEIF_BRANDS:
            return "HEIF"
    return None


def load_image(data: bytes, limits: ImageLimits) -> Image.Image:
    """Decode a JPEG/PNG/WebP/HEIC/AVIF photo, apply its orientation, return RGB or RGBA.

    Raises InvalidImage / UnsupportedMediaType / PayloadTooLarge with a clear message."""
    return _to_rgb_or_rgba(_decoded(data, limits, full=True))


def check_image(data: bytes, limits: ImageLimits) -> None:
    """Refuse, with the same errors as load_image, a photo the worker could not read, without
    decoding a JPEG's pixels: its header is read (size and pixel limits) and its markers walked
    to the end of the image, so a truncated file is refused in microseconds. Decoding it, even
    at 1/8 scale, cost 4 ms of the ingress's CPU for a 635 KB photo and caught nothing more:
    libjpeg decodes bytes corrupted inside the scan data without an error (1 of 30 such files
    was refused in a trial). The worker decodes every photo in full (load_image), and a photo it
    cannot read fails its task at once (corrupt_image, not retried)."""
    _decoded(data, limits, full=False)


def _decoded(data: bytes, limits: ImageLimits, *, full: bool) -> Image.Image:
    if not data:
        raise InvalidImage("the image is empty (0 bytes)", code="empty_image")
    if len(data) > limits.max_bytes:
        raise PayloadTooLarge(
            f"the image is {len(data)} bytes; the limit is {limits.max_bytes}",
            code="image_too_large",
        )
    fmt = sniff_format(data)
    if fmt is None:
        raise UnsupportedMediaType(
            f"the file is not a {FORMAT_NAMES} image", code="unsupported_image_type"
        )
    try:
        with warnings.catch_warnings():
            # A decompression-bomb warning is an error here: we never decode such an image.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image: Image.Image = Image.open(io.BytesIO(data), formats=[fmt])
            width, height = image.size
            if width * height > limits.max_pixels or max(width, height) > limits.max_side:
                raise PayloadTooLarge(
                    f"the image is {width}x{height} pixels; the limit is "
                    f"{limits.max_side} px a side and {limits.max_pixels} pixels in all",
                    code="image_too_many_pixels",
                )
            if min(width, height) < limits.min_side:
                raise InvalidImage(
                    f"the image is {width}x{height} pixels; each side must be at least "
                    f"{limits.min_side} px",
                    code="image_too_small",
                )
            # A HEIF file may hold several images (bursts, depth); its primary one is the photo.
            if fmt != "HEIF" and getattr(image, "n_frames", 1) > 1:
                raise InvalidImage(
                    "animated images are not supported; send a single photo",
                    code="animated_image",
                )
            if not full and fmt == "JPEG":
                if not jpeg_reaches_its_end(data):
                    raise InvalidImage(
                        "the JPEG image could not be decoded (truncated or corrupt)",
                        code="corrupt_image",
                    )
                return image
            image.load()
            if full:
                image = ImageOps.exif_transpose(image)
    except (PayloadTooLarge, InvalidImage):
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise PayloadTooLarge(
            "the image decompresses to too many pixels", code="image_too_many_pixels"
        ) from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as exc:
        raise InvalidImage(
            f"the {fmt} image could not be decoded (truncated or corrupt)", code="corrupt_image"
        ) from exc
    return image


def jpeg_reaches_its_end(data: bytes) -> bool:
    """Whether a JPEG's marker segments lead to a scan and its data to an end-of-image marker.
    Inside entropy-coded data every 0xFF byte is followed by 0x00 or a restart marker, so the
    first FF D9 after the first scan header is the image's end; bytes after it (a phone's
    motion-photo video, a vendor trailer) are allowed, as decoders allow them."""
    at = 2  # after SOI (sniff_format checked it)
    while at + 4 <= len(data):
        if data[at] != 0xFF:
            return False
        marker = data[at + 1]
        if marker == 0xFF:  # fill byte
            at += 1
            continue
        if marker == 0xD9:  # EOI before any scan
            return False
        length = int.from_bytes(data[at + 2 : at + 4], "big")
        if length < 2:
            return False
        if marker == 0xDA:  # SOS: the entropy-coded data follows its header
            return data.find(b"\xff\xd9", at + 2 + length) != -1
        at += 2 + length
    return False


def _to_rgb_or_rgba(image: Image.Image) -> Image.Image:
    has_alpha = image.mode in ("RGBA", "LA", "PA") or (
        image.mode == "P" and "transparency" in image.info
    )
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16-bit / float greyscale: scale to 8 bits instead of clipping to white.
        image = image.point(lambda v: v / 256).convert("L")  # type: ignore[no-untyped-call]
    return image.convert("RGBA" if has_alpha else "RGB")


# Stored inputs were checked against the installation's limits when they were accepted; the
# worker decodes them again with these, so a later change of limits cannot strand a task.
STORED_INPUT_LIMITS = ImageLimits(
    max_bytes=1 << 40, max_pixels=1 << 40, max_side=1 << 20, min_side=1
)

_SUFFIXES = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp", "HEIF": ".heic", "AVIF": ".avif"}


def stored_suffix(data: bytes) -> str:
    """The file suffix an accepted photo is stored with (it is stored as it came: re-encoding
    every upload to PNG cost ~70 ms of ingress CPU per 1024² photo and made it larger)."""
    return _SUFFIXES.get(sniff_format(data) or "", ".bin")


def load_stored_input(data: bytes) -> Image.Image:
    """A stored input photo, decoded and oriented exactly as when it was accepted."""
    return load_image(data, STORED_INPUT_LIMITS)


def decode_base64_image(value: str, max_bytes: int) -> bytes:
    """Bytes of a base64 string or a `data:image/...;base64,` URI."""
    if not isinstance(value, str) or not value:
        raise InvalidImage(
            "image must be a non-empty base64 string or data URI", code="invalid_base64"
        )
    # base64 inflates by 4/3; refuse before decoding anything that cannot fit.
    if len(value) > max_bytes * 4 // 3 + 1024:
        raise PayloadTooLarge(
            f"the image is larger than the limit of {max_bytes} bytes", code="image_too_large"
        )
    payload = value
    if value[:5].lower() == "data:":
        match = _DATA_URI.match(value)
        if match is None or not match["b64"]:
            raise InvalidImage(
                "data URI must look like data:image/png;base64,<data>", code="invalid_data_uri"
            )
        media_type = (match["type"] or "").lower()
        if media_type not in {*_FORMATS.values(), *_MEDIA_ALIASES}:
            raise UnsupportedMediaType(
                f"data URI type {media_type or '(none)'} is not image/jpeg, image/png, "
                "image/webp, image/heic, image/heif or image/avif",
                code="unsupported_image_type",
            )
        payload = value[match.end() :]
    payload = re.sub(r"\s+", "", payload)
    try:
        return base64.b64decode(payload + "=" * (-len(payload) % 4), altchars=None, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidImage("image is not valid base64", code="invalid_base64") from exc
