"""A vision-language model's side of images: pixels for the vision tower, image-token runs for the language model,
and the multimodal rotary positions (M-RoPE) that tell the two apart.

`ImageEncoder(spec)` turns an `ImageChunk` (already checked and counted by the API, `api/images.py`) into a
`VisionImage` with transformers' Qwen2-VL/Qwen3-VL image processor (Pillow backend), configured from the catalogue
entry's `VisionSpec`; encoded images are kept in a small LRU keyed by content hash, since training revisits the
same images every epoch. `flatten(model_input, encoder)` gives a model input's token ids (each image as its run of
`<|image_pad|>`) and its images in order. `vision_kwargs` gives the extra forward arguments of a batch of rows, and
`rope_positions` the (4, rows, length) position ids of left-padded rows: text positions first (what the causal
mask uses), then Qwen3-VL's (temporal, height, width) positions from the model's own `get_rope_index`.

`prompt_identity(tokens, images)` is what the prefix cache keys prompts by: the token ids with each image's run
replaced by a negative id derived from the image's content hash, so two prompts match only with the same images.

Limits: still images only (no video); the image's token count is trusted from the API and re-checked here only
against the processor's grid (a mismatch is a user error of that request, never a crash).
"""

from __future__ import annotations

import hashlib
import io
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from PIL import Image
from transformers import Qwen2VLImageProcessorPil

from contract.catalogue import VisionSpec
from loom.types import EncodedTextChunk, ImageChunk, ModelInput

ENCODED_CACHE_IMAGES = 256
"""Encoded images an `ImageEncoder` keeps (a 64-token image is about 1.5 MB of float32 pixels)."""


class ImageInputError(ValueError):
    """An image the processor cannot turn into the token count the request was admitted with."""


@dataclass(frozen=True)
class VisionImage:
    pixel_values: torch.Tensor
    """(patches, channels x temporal patch x patch x patch), as the vision tower takes them."""
    grid_thw: torch.Tensor
    """(3,): the image's (temporal, height, width) patch grid."""
    digest: bytes
    """SHA-256 of the encoded image bytes."""
    tokens: int
    """The image's run of image tokens in the language model (patches / merge_size^2)."""


class ImageEncoder:
    def __init__(self, spec: VisionSpec) -> None:
        g = spec.geometry
        self.spec = spec
        self.processor = Qwen2VLImageProcessorPil(
            size={"shortest_edge": g.min_pixels, "longest_edge": g.max_pixels},
            patch_size=g.patch_size,
            temporal_patch_size=g.temporal_patch_size,
            merge_size=g.merge_size,
            image_mean=[0.5, 0.5, 0.5],
            image_std=[0.5, 0.5, 0.5],
        )
        self._merge = g.merge_size**2
        self._cache: OrderedDict[bytes, VisionImage] = OrderedDict()

    def encode(self, chunk: ImageChunk) -> VisionImage:
        digest = hashlib.sha256(chunk.data).digest()
        if digest in self._cache:
            self._cache.move_to_end(digest)
            return self._cache[digest]
        try:
            with Image.open(io.BytesIO(chunk.data)) as opened:
                image = opened.convert("RGB")
        except (OSError, ValueError) as exc:
            raise ImageInputError(f"the image cannot be decoded ({exc})") from None
        out = self.processor(images=[image], return_tensors="pt")
        grid = out["image_grid_thw"][0]
        encoded = VisionImage(out["pixel_values"], grid, digest, int(grid.prod()) // self._merge)
        if encoded.tokens != chunk.expected_tokens:
            raise ImageInputError(
                f"the image processor made {encoded.tokens} tokens of an image admitted as {chunk.expected_tokens}"
            )
        self._cache[digest] = encoded
        if len(self._cache) > ENCODED_CACHE_IMAGES:
            self._cache.popitem(last=False)
        return encoded


def encoder_for(vision: VisionSpec | None) -> ImageEncoder | None:
    """The image encoder of a model with `vision` (a catalogue entry's), None for a text model."""
    return None if vision is None else ImageEncoder(vision)


def flatten(model_input: ModelInput, encoder: ImageEncoder | None) -> tuple[list[int], list[VisionImage]]:
    """The token ids of `model_input` (each image as its run of image tokens) and its encoded images, in order.
    A text model (`encoder` None) only ever gets text chunks (the API refuses others)."""
    tokens: list[int] = []
    images: list[VisionImage] = []
    for chunk in model_input.chunks:
        if isinstance(chunk, EncodedTextChunk):
            tokens.extend(chunk.tokens)
        else:
            image = encoder.encode(chunk)
            images.append(image)
            tokens.extend([encoder.spec.image_token_id] * chunk.expected_tokens)
    return tokens, images


def prompt_identity(tokens: Sequence[int], images: Sequence[VisionImage], image_token_id: int | None) -> list[int]:
    """`tokens` with the k-th run of image tokens replaced by a negative id from image k's content hash."""
    if not images:
        return list(tokens)
    out: list[int] = []
    k = -1
    for i, t in enumerate(tokens):
        if t == image_token_id:
            if i == 0 or tokens[i - 1] != image_token_id:
                k += 1
            out.append(-1 - int.from_bytes(images[k].digest[:7], "big"))
        else:
            out.append(t)
    return out


def patch_count(images: Sequence[VisionImage]) -> int:
    """The vision-tower patches of `images` (what a row's share of a vision-LoRA route spans)."""
    return sum(image.pixel_values.shape[0] for image in images)


def vision_kwargs(input_ids: torch.Tensor, images: Sequence[VisionImage], spec: VisionSpec) -> dict[str, torch.Tensor]:
    """The forward arguments a batch whose rows hold `images` (in row order) needs besides its token ids, on the
    ids' device."""
    kwargs: dict[str, torch.Tensor] = {"mm_token_type_ids": (input_ids == spec.image_token_id).int()}
    if images:
        kwargs["pixel_values"] = torch.cat([image.pixel_values for image in images]).to(input_ids.device)
        kwargs["image_grid_thw"] = torch.stack([image.grid_thw for image in images]).to(input_ids.device)
    return kwargs


def rope_positions(
    model: torch.nn.Module, input_ids: torch.Tensor, mask: torch.Tensor, images: Sequence[VisionImage], spec: VisionSpec
) -> torch.Tensor:
    """(4, rows, length) position ids of left-padded rows: text positions, then the M-RoPE (t, h, w) positions."""
    kwargs = vision_kwargs(input_ids, images, spec)
    mrope, _ = model.model.get_rope_index(
        input_ids,
        mm_token_type_ids=kwargs["mm_token_type_ids"],
        image_grid_thw=kwargs.get("image_grid_thw"),
        attention_mask=mask,
    )
    text = (mask.cumsum(-1) - 1).clamp(min=0)
    return torch.cat([text[None], mrope])
