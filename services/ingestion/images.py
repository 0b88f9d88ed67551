"""Image validation with Pillow (a format allow-list, a pixel limit against decompression bombs, a full decode),
and metadata stripping before anything is stored.

Validation proves that the bytes are a real, complete, reasonably sized image of an allowed format. Then
`prepare_image` removes what a photo says about where and by whom it was taken, at the container level, without
decoding and re-encoding pixels:

- JPEG: every APPn segment but APP0 (JFIF), APP2 `ICC_PROFILE` (colour) and APP14 (Adobe: the colour transform
  decoding needs), so EXIF (GPS, camera serial, date), XMP, IPTC/Photoshop, MPF and maker segments go; comments
  (COM) go; anything after the end-of-image marker (trailing thumbnails, depth maps) goes. The EXIF orientation,
  if not "upright", comes back alone in a minimal EXIF segment so that the photo still displays upright.
- PNG: `eXIf`, `tEXt`, `zTXt`, `iTXt` and `tIME` chunks; every other chunk, IDAT included, byte for byte.
- WebP: the `EXIF` and `XMP ` chunks (and their VP8X flags).
- GIF: comment extensions and application extensions other than animation looping and ICC.
- BMP: carries no such metadata.

The stripped bytes are parsed again and compared in format and size with the original (PNG: every chunk's CRC
too; WebP and GIF: decoded again); if that fails (a container this parser does not understand), the image is
re-encoded by Pillow without metadata instead (lossless for PNG, GIF, BMP and lossless WebP; quality 95 for
JPEG), so metadata never survives.
"""

from __future__ import annotations

import io
import struct
import warnings
from collections import Counter
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

ALLOWED_FORMATS = {
    "PNG": "image/png",
    "JPEG": "image/jpeg",
    "WEBP": "image/webp",
    "GIF": "image/gif",
    "BMP": "image/bmp",
}
MAX_PIXELS = 40_000_000  # 40 MP: a 6000x6000 photo passes, a decompression bomb does not
MAX_IMAGE_BYTES = 20 * 1024 * 1024


class InvalidImage(ValueError):
    """Why bytes are not an acceptable image, worded for the partner."""


@dataclass(frozen=True)
class ImageInfo:
    format: str
    content_type: str
    width: int
    height: int
    mode: str


def inspect_image(data: bytes) -> ImageInfo:
    if not data:
        raise InvalidImage("empty image")
    if len(data) > MAX_IMAGE_BYTES:
        raise InvalidImage(f"image is {len(data)} bytes; the limit is {MAX_IMAGE_BYTES}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as probe:
                image_format = probe.format or ""
                width, height = probe.size
                if image_format not in ALLOWED_FORMATS:
                    allowed = ", ".join(sorted(ALLOWED_FORMATS))
                    raise InvalidImage(f"image format {image_format or 'unknown'} is not allowed ({allowed})")
                if width * height > MAX_PIXELS:
                    raise InvalidImage(f"image is {width}x{height} pixels; the limit is {MAX_PIXELS} pixels")
                mode = probe.mode
            with Image.open(io.BytesIO(data)) as image:
                image.load()  # a full decode: truncated or corrupt data fails here
    except InvalidImage:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise InvalidImage(f"image rejected as a decompression bomb: {exc}") from exc
    except UnidentifiedImageError as exc:
        raise InvalidImage("not a recognisable image") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise InvalidImage(f"corrupt or truncated image: {exc}") from exc
    return ImageInfo(image_format, ALLOWED_FORMATS[image_format], width, height, mode)


ORIENTATION_TAG = 0x0112
_JPEG_STANDALONE = {0x01, *range(0xD0, 0xD8)}
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_METADATA = {b"eXIf": "exif", b"tEXt": "text", b"zTXt": "text", b"iTXt": "text", b"tIME": "time"}
_GIF_KEPT_APPLICATIONS = (b"NETSCAPE2.0", b"ANIMEXTS1.0", b"ICCRGBG1012")


class _Unparsed(ValueError):
    """The container is not laid out as this parser expects: fall back to re-encoding."""


def prepare_image(data: bytes) -> tuple[ImageInfo, bytes, dict[str, int]]:
    """Validate an image and strip its metadata: (what it is, the bytes to store, what was removed by kind)."""
    info = inspect_image(data)
    removed: Counter[str] = Counter()
    try:
        stripped = _STRIPPERS[info.format](data, removed) if info.format in _STRIPPERS else data
        _check_same_image(stripped, info)
    except (_Unparsed, OSError, SyntaxError, ValueError, IndexError, struct.error):
        removed = Counter({"reencoded": 1})
        stripped = _reencode(data, info)
    return info, stripped, dict(removed)


def _check_same_image(data: bytes, info: ImageInfo) -> None:
    """The stripped bytes parse as the same image. JPEG and PNG keep their compressed data byte for byte, so their
    headers (and, for PNG, every chunk's CRC) are what can have gone wrong: no second full decode. WebP and GIF
    are decoded again."""
    with Image.open(io.BytesIO(data)) as image:
        if image.size != (info.width, info.height) or image.format != info.format:
            raise _Unparsed("the stripped image differs from the original")
        if info.format == "PNG":
            image.verify()
        elif info.format != "JPEG":
            image.load()


def _reencode(data: bytes, info: ImageInfo) -> bytes:
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        out = io.BytesIO()
        options: dict[str, object] = {"quality": 95} if info.format == "JPEG" else {}
        if info.format == "WEBP":
            options = {"lossless": True}
        if info.format == "GIF" and getattr(image, "n_frames", 1) > 1:
            options = {"save_all": True}
        image.info.clear()
        image.save(out, format=info.format, **options)
    return out.getvalue()


def _orientation(data: bytes) -> int:
    with Image.open(io.BytesIO(data)) as image:
        value = image.getexif().get(ORIENTATION_TAG, 1)
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def _strip_jpeg(data: bytes, removed: Counter[str]) -> bytes:
    if data[:2] != b"\xff\xd8":
        raise _Unparsed("no JPEG start-of-image")
    kept: list[bytes] = []
    pos = 2
    while True:
        if data[pos] != 0xFF:
            raise _Unparsed(f"no marker at {pos}")
        while data[pos + 1] == 0xFF:  # fill bytes
            pos += 1
        marker = data[pos + 1]
        if marker == 0xD9:  # end of image: whatever follows (trailing thumbnails, MPF images) is dropped
            if pos + 2 < len(data):
                removed["trailing"] += 1
            kept.append(b"\xff\xd9")
            break
        if marker in _JPEG_STANDALONE:
            kept.append(data[pos : pos + 2])
            pos += 2
            continue
        (length,) = struct.unpack(">H", data[pos + 2 : pos + 4])
        segment = data[pos : pos + 2 + length]
        if len(segment) != 2 + length or length < 2:
            raise _Unparsed("truncated segment")
        kind = _jpeg_metadata_kind(marker, segment)
        if kind:
            removed[kind] += 1
        else:
            kept.append(segment)
        pos += 2 + length
        if marker == 0xDA:  # start of scan: entropy-coded data up to the next marker (not a stuffed 0xFF00, no RSTn)
            end = data.find(b"\xff", pos)
            while end != -1 and (data[end + 1] == 0x00 or 0xD0 <= data[end + 1] <= 0xD7):
                end = data.find(b"\xff", end + 2)
            if end == -1:
                raise _Unparsed("scan without an end")
            kept.append(data[pos:end])
            pos = end
    orientation = _orientation(data)
    if orientation != 1:
        exif = Image.Exif()
        exif[ORIENTATION_TAG] = orientation
        payload = exif.tobytes()
        at = 1 if len(kept) > 1 and kept[0][:2] == b"\xff\xe0" else 0  # after JFIF's APP0, which must be first
        kept.insert(at, b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload)
    return b"\xff\xd8" + b"".join(kept)


def _jpeg_metadata_kind(marker: int, segment: bytes) -> str | None:
    """What a segment is if it is metadata to drop; None to keep it."""
    body = segment[4:]
    if marker == 0xFE:
        return "comment"
    if marker == 0xE1:
        return "exif" if body.startswith(b"Exif\x00") else "xmp"
    if marker == 0xE2 and not body.startswith(b"ICC_PROFILE\x00"):
        return "app2"
    if marker == 0xED:
        return "iptc"
    if 0xE3 <= marker <= 0xEF and marker != 0xEE:
        return f"app{marker - 0xE0}"
    return None


def _strip_png(data: bytes, removed: Counter[str]) -> bytes:
    if not data.startswith(_PNG_SIGNATURE):
        raise _Unparsed("no PNG signature")
    kept = [_PNG_SIGNATURE]
    pos = len(_PNG_SIGNATURE)
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        chunk = data[pos : pos + 12 + length]
        if len(chunk) != 12 + length:
            raise _Unparsed("truncated chunk")
        if kind in _PNG_METADATA:
            removed[_PNG_METADATA[kind]] += 1
        else:
            kept.append(chunk)
        pos += 12 + length
        if kind == b"IEND":
            break
    return b"".join(kept)


def _strip_webp(data: bytes, removed: Counter[str]) -> bytes:
    if data[:4] != b"RIFF" or data[8:12] != b"WEBP":
        raise _Unparsed("no RIFF WEBP header")
    chunks: list[bytearray] = []
    pos = 12
    while pos + 8 <= len(data):
        kind, size = data[pos : pos + 4], struct.unpack("<I", data[pos + 4 : pos + 8])[0]
        chunk = bytearray(data[pos : pos + 8 + size + (size & 1)])
        if kind in (b"EXIF", b"XMP "):
            removed["exif" if kind == b"EXIF" else "xmp"] += 1
        else:
            chunks.append(chunk)
        pos += 8 + size + (size & 1)
    for chunk in chunks:
        if chunk[:4] == b"VP8X":
            chunk[8] &= ~0x0C & 0xFF  # the EXIF (0x08) and XMP (0x04) flags
    body = b"WEBP" + b"".join(chunks)
    return b"RIFF" + struct.pack("<I", len(body)) + body


def _strip_gif(data: bytes, removed: Counter[str]) -> bytes:
    if data[:3] != b"GIF":
        raise _Unparsed("no GIF header")
    pos = 13
    if data[10] & 0x80:
        pos += 3 * (2 ** ((data[10] & 0x07) + 1))
    kept = [data[:pos]]
    while True:
        introducer = data[pos]
        if introducer == 0x3B:  # trailer
            kept.append(b"\x3b")
            break
        if introducer == 0x21:
            label = data[pos + 1]
            end = _gif_sub_blocks(data, pos + 2)
            block = data[pos:end]
            if label == 0xFE:
                removed["comment"] += 1
            elif label == 0xFF and block[3:14] not in _GIF_KEPT_APPLICATIONS:
                removed["application"] += 1
            else:
                kept.append(block)
            pos = end
        elif introducer == 0x2C:
            flags = data[pos + 9]
            start = pos
            pos += 10
            if flags & 0x80:
                pos += 3 * (2 ** ((flags & 0x07) + 1))
            end = _gif_sub_blocks(data, pos + 1)  # after the LZW minimum code size
            kept.append(data[start:end])
            pos = end
        else:
            raise _Unparsed(f"unexpected GIF block 0x{introducer:02x}")
    return b"".join(kept)


def _gif_sub_blocks(data: bytes, pos: int) -> int:
    """The offset just past a chain of GIF data sub-blocks starting at `pos`."""
    while data[pos] != 0:
        pos += data[pos] + 1
    return pos + 1


_STRIPPERS = {"JPEG": _strip_jpeg, "PNG": _strip_png, "WEBP": _strip_webp, "GIF": _strip_gif}
