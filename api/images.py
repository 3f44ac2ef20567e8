"""Images in prompts and training data of vision-language models: fetched, checked and counted before anything is
queued, so a worker is only ever handed images it can decode, each with its token count filled in.

`prepare_model_input(model_input, vision, settings, param)` (and `prepare_forward_backward` for each datum) returns the model input with every image chunk as an
`ImageChunk` whose `expected_tokens` is the server's count (`ImageGeometry.tokens` of the image's size, what the
worker's image processor will produce). A client's own `expected_tokens` must equal that count: otherwise 400
`image_token_mismatch` naming both numbers. An image asset pointer is fetched first (`image_bytes`: a `data:` URL,
or http(s) from a host in `LOOM_REMOTE_IMAGE_HOSTS`); the same fetch serves OpenAI `image_url` parts (`prepare_messages`), whose format is
read from the bytes.

An image is refused with 400 `invalid_image` when its encoded bytes exceed `LOOM_MAX_IMAGE_BYTES`, its width x
height exceeds `LOOM_MAX_IMAGE_PIXELS` (checked from the header, before decoding), it is not a PNG or JPEG or not
the format its chunk declares, it is animated (APNG, several frames), it does not decode to the end, or its aspect
ratio exceeds 200:1.

Limits: every image is decoded once here (Pillow) and again by the worker; remote fetches are synchronous, bounded
by `LOOM_MAX_IMAGE_BYTES` and a 10-second timeout, and never follow redirects.
"""

from __future__ import annotations

import base64
import binascii
import io
import warnings
from typing import Any
from urllib.parse import unquote_to_bytes, urlsplit

import httpx
from PIL import Image, UnidentifiedImageError

from api.errors import APIError, ErrorCode
from contract.catalogue import VisionSpec
from contract.settings import Settings
from loom.types import ForwardBackwardInput, ImageAssetPointerChunk, ImageChunk, ModelInput

FORMATS = {"png": "PNG", "jpeg": "JPEG"}
"""A chunk's declared format -> the format Pillow must find."""
FETCH_TIMEOUT_S = 10.0


def invalid_image(message: str, param: str) -> APIError:
    return APIError(400, ErrorCode.INVALID_IMAGE, message, param)


def _data_url(url: str, param: str) -> bytes:
    header, sep, payload = url.partition(",")
    if not sep:
        raise invalid_image("a data URL needs a comma before its payload", param)
    try:
        return base64.b64decode(payload, validate=True) if header.endswith(";base64") else unquote_to_bytes(payload)
    except (binascii.Error, ValueError) as exc:
        raise invalid_image(f"the data URL's base64 payload is malformed ({exc})", param) from None


def _fetch(url: str, settings: Settings, param: str) -> bytes:
    host = urlsplit(url).hostname or ""
    if host not in settings.remote_image_hosts:
        allowed = ", ".join(settings.remote_image_hosts) or "none"
        raise invalid_image(
            f"image URLs from {host or 'this URL'!r} are not fetched (allowed hosts: {allowed}); send the image "
            "inline as a data: URL or image bytes",
            param,
        )
    limit = settings.max_image_bytes
    try:
        with httpx.stream("GET", url, timeout=FETCH_TIMEOUT_S, follow_redirects=False) as response:
            if response.status_code != 200:
                raise invalid_image(f"fetching {url} answered HTTP {response.status_code}", param)
            body = bytearray()
            for piece in response.iter_bytes():
                body += piece
                if len(body) > limit:
                    raise invalid_image(f"the image at {url} exceeds {limit} bytes", param)
    except httpx.HTTPError as exc:
        raise invalid_image(f"fetching {url} failed ({type(exc).__name__})", param) from None
    return bytes(body)


def image_bytes(location: str, settings: Settings, param: str) -> bytes:
    """The encoded image a `data:` URL holds, or that an allowed http(s) URL serves; anything else is a 400."""
    scheme = urlsplit(location).scheme.lower()
    if scheme == "data":
        return _data_url(location, param)
    if scheme in ("http", "https"):
        return _fetch(location, settings, param)
    raise invalid_image(f"image location scheme {scheme or 'none'!r} is not supported; use data: or http(s)", param)


def image_size(data: bytes, declared: str, settings: Settings, param: str) -> tuple[int, int]:
    """(width, height) of an encoded still PNG or JPEG image that passes every check (module docstring)."""
    if len(data) > settings.max_image_bytes:
        raise invalid_image(f"the image is {len(data)} bytes, more than the {settings.max_image_bytes} allowed", param)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=list(FORMATS.values()))
            width, height = image.size
            if width * height > settings.max_image_pixels:
                raise invalid_image(
                    f"the image is {width}x{height} pixels, more than the {settings.max_image_pixels} allowed", param
                )
            if image.format != FORMATS.get(declared):
                raise invalid_image(f"the image is {image.format}, but its chunk says {declared!r}", param)
            if getattr(image, "is_animated", False) or getattr(image, "n_frames", 1) > 1:
                raise invalid_image("animated images are not supported; send one frame", param)
            image.load()
    except APIError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise invalid_image(f"the image cannot be decoded as png or jpeg ({exc})", param) from None
    except Warning as exc:
        raise invalid_image(f"the image cannot be decoded safely ({exc})", param) from None
    return width, height


def image_tokens(data: bytes, declared: str, vision: VisionSpec, settings: Settings, param: str) -> int:
    """The number of tokens the image takes in a model of `vision`'s geometry, after every check."""
    width, height = image_size(data, declared, settings, param)
    try:
        return vision.geometry.tokens(height, width)
    except ValueError as exc:
        raise invalid_image(str(exc), param) from None


def prepare_model_input(
    model_input: ModelInput, vision: VisionSpec | None, settings: Settings, param: str
) -> ModelInput:
    """`model_input` with its images fetched, checked and counted (module docstring). For a text-only model it is
    returned as is: the request checks refuse its image chunks."""
    if vision is None or not any(isinstance(c, (ImageChunk, ImageAssetPointerChunk)) for c in model_input.chunks):
        return model_input
    chunks = []
    for i, chunk in enumerate(model_input.chunks):
        where = f"{param}.chunks.{i}"
        if isinstance(chunk, ImageAssetPointerChunk):
            data = image_bytes(chunk.location, settings, f"{where}.location")
            chunk = ImageChunk(data=data, format=chunk.format, expected_tokens=chunk.expected_tokens)
        if isinstance(chunk, ImageChunk):
            tokens = image_tokens(chunk.data, chunk.format, vision, settings, where)
            if chunk.expected_tokens is not None and chunk.expected_tokens != tokens:
                raise APIError(
                    400,
                    ErrorCode.IMAGE_TOKEN_MISMATCH,
                    f"expected_tokens is {chunk.expected_tokens}, but the image takes {tokens} tokens",
                    f"{where}.expected_tokens",
                )
            chunk = chunk.model_copy(update={"expected_tokens": tokens})
        chunks.append(chunk)
    return ModelInput(chunks=chunks)


def sniffed_format(data: bytes, param: str) -> str:
    """An encoded image's format from its first bytes (`png` or `jpeg`); anything else is a 400."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if data.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    raise invalid_image("the image is neither png nor jpeg", param)


def prepare_messages(
    messages: list[dict[str, Any]], vision: VisionSpec | None, model: str, settings: Settings
) -> list[dict[str, Any]]:
    """OpenAI chat messages with every `image_url` part replaced by an image part the worker renders
    (`{"type": "image", "image": <ImageChunk>}`), fetched, checked and counted; a 400 when `model` takes no images."""
    out = []
    for m, message in enumerate(messages):
        content = message.get("content")
        if not isinstance(content, list) or not any(part.get("type") == "image_url" for part in content):
            out.append(message)
            continue
        parts = []
        for p, part in enumerate(content):
            if part.get("type") != "image_url":
                parts.append(part)
                continue
            where = f"messages.{m}.content.{p}.image_url"
            if vision is None:
                raise invalid_image(f"model {model!r} does not take images; use a vision-language model", where)
            url = (part.get("image_url") or {}).get("url")
            if not isinstance(url, str):
                raise invalid_image("an image_url part needs image_url.url", where)
            data = image_bytes(url, settings, f"{where}.url")
            fmt = sniffed_format(data, where)
            chunk = ImageChunk(data=data, format=fmt, expected_tokens=image_tokens(data, fmt, vision, settings, where))
            parts.append({"type": "image", "image": chunk.model_dump(mode="json")})
        out.append({**message, "content": parts})
    return out


def prepare_forward_backward(
    fb: ForwardBackwardInput, vision: VisionSpec | None, settings: Settings
) -> ForwardBackwardInput:
    """`fb` with every datum's images prepared (`prepare_model_input`); the same object when nothing changed."""
    prepared = [
        prepare_model_input(datum.model_input, vision, settings, f"data.{i}.model_input")
        for i, datum in enumerate(fb.data)
    ]
    if all(new is datum.model_input for new, datum in zip(prepared, fb.data)):
        return fb
    data = [datum.model_copy(update={"model_input": new}) for new, datum in zip(prepared, fb.data)]
    return fb.model_copy(update={"data": data})
