"""Image validation with Pillow: a format allow-list, a pixel limit against decompression bombs, a full decode.

The bytes are stored as received (the model's own preprocessing resizes later); validation only proves
that they are a real, complete, reasonably sized image of an allowed format.
"""

from __future__ import annotations

import io
import warnings
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
