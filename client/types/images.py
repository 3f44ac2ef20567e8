"""How many tokens an image takes in a Qwen3-VL-style model: the arithmetic shared by the server (which checks a
request's `expected_tokens` against it) and SDK users (who need an image chunk's length to lay out targets).

An image is resized so both sides are multiples of `patch_size * merge_size` and its area lies in
[`min_pixels`, `max_pixels`] with the aspect ratio kept as closely as possible (transformers' `smart_resize` for the
Qwen2-VL/Qwen3-VL image processors); it then takes one token per `merge_size x merge_size` block of
`patch_size`-pixel patches.

Limits: pure Python over the image's size only (reading that size from the bytes needs Pillow, which the SDK does
not depend on); images wider or taller than 200x their other side are refused, as the processor refuses them.
"""

from __future__ import annotations

import math

from ._base import WireModel

MAX_ASPECT_RATIO = 200
"""The processor refuses images whose long side exceeds 200x their short side."""


class ImageGeometry(WireModel):
    """A vision model's image tiling: patch and merge sizes and the pixel range images are resized into."""

    model_config = WireModel.model_config | {"frozen": True}

    patch_size: int = 16
    merge_size: int = 2
    temporal_patch_size: int = 2
    min_pixels: int = 65_536
    """Images are scaled up to at least this many pixels (Qwen3-VL's `size.shortest_edge`)."""
    max_pixels: int = 16_777_216
    """... and down to at most this many (Qwen3-VL's `size.longest_edge`)."""

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    def resized(self, height: int, width: int) -> tuple[int, int]:
        """The (height, width) the processor resizes an image to; `ValueError` for an extreme aspect ratio."""
        if height < 1 or width < 1:
            raise ValueError(f"image of {width}x{height} pixels has no area")
        if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
            raise ValueError(f"image of {width}x{height} pixels is more than {MAX_ASPECT_RATIO}x wider than tall")
        factor = self.factor
        h = round(height / factor) * factor
        w = round(width / factor) * factor
        if h * w > self.max_pixels:
            beta = math.sqrt(height * width / self.max_pixels)
            h = max(factor, math.floor(height / beta / factor) * factor)
            w = max(factor, math.floor(width / beta / factor) * factor)
        elif h * w < self.min_pixels:
            beta = math.sqrt(self.min_pixels / (height * width))
            h = math.ceil(height * beta / factor) * factor
            w = math.ceil(width * beta / factor) * factor
        return h, w

    def tokens(self, height: int, width: int) -> int:
        """The number of image tokens (`<|image_pad|>` positions) an image of this size takes."""
        h, w = self.resized(height, width)
        return (h // self.factor) * (w // self.factor)


QWEN3_VL_GEOMETRY = ImageGeometry()
"""Qwen3-VL's published image processor settings (patch 16, merge 2, 64Ki to 16Mi pixels)."""
