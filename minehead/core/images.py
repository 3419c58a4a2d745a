"""Decoding images from bytes, safely and once.

Every service decodes client images here, so the limits and error messages are the same
everywhere. Output is always an HxWx3 uint8 RGB numpy array with EXIF orientation applied.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import warnings

import numpy as np
from PIL import Image, ImageOps

from minehead.core.errors import InvalidArgument, ResourceExhausted

# Decompression bombs: a 10 KB PNG can claim 50k x 50k pixels. 100 MP covers any camera.
MAX_PIXELS = 100_000_000
SUPPORTED_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "TIFF", "GIF")


@dataclasses.dataclass(frozen=True)
class DecodedImage:
    """A decoded image. `pixels`: HxWx3 uint8, RGB. `sha256`: hex digest of the encoded bytes.
    `data`: those bytes (b"" for an image made from pixels), so a service can hand the image on
    to another (the miner asks the embedder for its feature map) without encoding it again."""

    pixels: np.ndarray
    sha256: str
    label: str = ""
    data: bytes = dataclasses.field(default=b"", repr=False, compare=False)

    @property
    def width(self) -> int:
        return int(self.pixels.shape[1])

    @property
    def height(self) -> int:
        return int(self.pixels.shape[0])


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def decode_image(data: bytes, label: str = "", *, max_pixels: int = MAX_PIXELS) -> DecodedImage:
    """Decode encoded image bytes. Raises InvalidArgument / ResourceExhausted naming the problem."""
    name = f"image {label!r}" if label else "image"
    if not data:
        raise InvalidArgument(f"{name} is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
            fmt = im.format
            if fmt not in SUPPORTED_FORMATS:
                raise InvalidArgument(f"{name} has unsupported format {fmt}; supported: {', '.join(SUPPORTED_FORMATS)}")
            w, h = im.size
            if w <= 0 or h <= 0:
                raise InvalidArgument(f"{name} has zero size ({w}x{h})")
            if w * h > max_pixels:
                raise ResourceExhausted(f"{name} is {w}x{h} = {w * h} pixels, over the limit of {max_pixels}")
            im = ImageOps.exif_transpose(im)
            rgb = im.convert("RGB")
            pixels = np.asarray(rgb, dtype=np.uint8)
    except (InvalidArgument, ResourceExhausted):
        raise
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
        raise ResourceExhausted(f"{name} is too large to decode, over the limit of {max_pixels} pixels ({e})") from None
    except Image.UnidentifiedImageError:
        raise InvalidArgument(f"{name} is not a recognised image file ({len(data)} bytes)") from None
    except (OSError, SyntaxError, ValueError) as e:
        # PIL raises OSError("image file is truncated") and friends for damaged files.
        raise InvalidArgument(f"{name} is corrupt or truncated: {e}") from None
    return DecodedImage(pixels=np.ascontiguousarray(pixels), sha256=sha256_hex(data), label=label, data=bytes(data))


def encode_png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def encode_jpeg(pixels: np.ndarray, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()
