"""Image files to RGB arrays: the decode stage.

An image is segmented as a viewer displays it: EXIF orientation is applied, and every mode
(greyscale, palette, RGBA, CMYK, 16-bit) becomes 8-bit RGB. Multi-frame files give their first
frame. A file whose header claims more pixels than `max_pixels` is refused before its pixels
are decoded.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps

# Pillow's own decompression-bomb threshold (2 x Image.MAX_IMAGE_PIXELS): Pillow refuses
# anything bigger while opening, before we could check it
DEFAULT_MAX_PIXELS = 2 * 89_478_485


class ImageDecodeError(ValueError):
    """A file that cannot become an RGB image; `reason` is a short category for error counts."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def decode_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """(H, W, 3) uint8 RGB from the bytes of an image file, as displayed."""
    if not data:
        raise ImageDecodeError("empty", "the file is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                width, height = image.size
                if width * height > max_pixels:
                    raise ImageDecodeError(
                        "too_large", f"{width}x{height} = {width * height} pixels exceeds max_pixels={max_pixels}"
                    )
                image.seek(0)
                image = ImageOps.exif_transpose(image)
                return _to_rgb(image)
    except ImageDecodeError:
        raise
    except Image.DecompressionBombError as err:
        raise ImageDecodeError("too_large", str(err)) from err
    except Image.UnidentifiedImageError as err:
        raise ImageDecodeError("not_an_image", "not a recognised image format") from err
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        raise ImageDecodeError("corrupt", f"cannot decode: {err}") from err


def _to_rgb(image: Image.Image) -> np.ndarray:
    if image.mode in {"I;16", "I;16B", "I;16L", "I;16N", "I"}:
        # 16-bit (or 32-bit integer) greyscale: scale the full range to 8 bits, not clip it
        values = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or values.max(initial=0) <= 65535 else values.max()
        grey = np.clip(values / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=2)
    if image.mode == "F":
        values = np.nan_to_num(np.asarray(image, dtype=np.float64))
        low, high = float(values.min(initial=0)), float(values.max(initial=0))
        grey = ((values - low) / (high - low) * 255.0 + 0.5).astype(np.uint8) if high > low else np.zeros(values.shape, np.uint8)
        return np.repeat(grey[..., None], 3, axis=2)
    return np.asarray(image.convert("RGB"))
