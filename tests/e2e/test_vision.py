"""Qwen3-VL end to end on the shared server's miniature: the official `tinker` SDK trains a LoRA on image + text
data until its loss falls, samples with an image in the prompt, and the sampled tokens' logprobs match
`compute_logprobs` of the same sequence within 1e-4; a wrong `expected_tokens` is a 400 naming both numbers (the
SDK raises it); the official `openai` client sends a data-URL image to the trained checkpoint; Loom's own SDK builds
the same chat-formatted input with `loom.vision.chat_input` and trains the vision tower too (`train_vision`); and a
client sizes images with the server's own image processor, fetched from its Hub routes."""

from __future__ import annotations

import base64
import io

import openai
import pytest
import tinker
from PIL import Image
from tinker import types

import loom
from loom.vision import chat_input, completion_datum

pytestmark = pytest.mark.e2e

VL = "loom/tiny-qwen3-vl"
EXPECTED = 64
"""Tokens of a 28x28 image for Qwen3-VL (scaled up to 256x256: 8x8 merged patches)."""


def png(color: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (28, 28), color).save(buffer, format="PNG")
    return buffer.getvalue()


IMAGES = {"red": png((220, 20, 20)), "blue": png((20, 20, 220))}


def around(tokenizer) -> tuple[list[int], list[int]]:
    """The chat-format tokens before and after the image of a one-image question."""
    before = tokenizer.encode("<|im_start|>user\n<|vision_start|>", add_special_tokens=False)
    after = tokenizer.encode("<|vision_end|>Which colour?<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)
    return before, after


def prompt_of(tokenizer, image: bytes, expected: int = EXPECTED) -> types.ModelInput:
    before, after = around(tokenizer)
    return types.ModelInput(
        chunks=[
            types.EncodedTextChunk(tokens=before),
            types.ImageChunk(data=image, format="png", expected_tokens=expected),
            types.EncodedTextChunk(tokens=after),
        ]
    )


def datum(tokenizer, colour: str) -> types.Datum:
    """Teach the answer `colour` to the question about its image; image positions are never targets."""
    before, after = around(tokenizer)
    answer = tokenizer.encode(f"{colour}<|im_end|>", add_special_tokens=False)
    flat = before + [0] * EXPECTED + after + answer
    model_input = prompt_of(tokenizer, IMAGES[colour]).append(types.EncodedTextChunk(tokens=answer[:-1]))
    weights = [0.0] * (len(flat) - len(answer) - 1) + [1.0] * len(answer)
    return types.Datum(model_input=model_input, loss_fn_inputs={"target_tokens": flat[1:], "weights": weights})


def test_train_on_images_then_sample_with_one(tinker_env, tokenizer_of) -> None:
    tokenizer = tokenizer_of(VL)
    service = tinker.ServiceClient()
    training = service.create_lora_training_client(base_model=VL, rank=8, seed=0).result()
    assert training.get_info().model_data.tokenizer_id == VL
    batch = [datum(tokenizer, "red"), datum(tokenizer, "blue")]
    losses = []
    for _ in range(16):
        fb = training.forward_backward(batch, "cross_entropy")
        # 5e-3 descends smoothly here; 2e-2 overshot (the loss jumped about and the greedy answer depended on luck)
        opt = training.optim_step(types.AdamParams(learning_rate=5e-3))
        losses.append(fb.result().metrics["loss:sum"])
        opt.result()
    assert losses[-1] < 0.5 * losses[0], losses

    sampler = training.save_weights_and_get_sampling_client("vision").result()
    prompt = prompt_of(tokenizer, IMAGES["blue"])
    params = types.SamplingParams(max_tokens=4, temperature=1.0, seed=3)
    sequence = sampler.sample(prompt, 1, params).result().sequences[0]
    assert len(sequence.tokens) >= 1 and len(sequence.logprobs) == len(sequence.tokens)
    whole = prompt.append(types.EncodedTextChunk(tokens=sequence.tokens))
    scored = sampler.compute_logprobs(whole).result()
    assert len(scored) == whole.length
    assert scored[-len(sequence.tokens) :] == pytest.approx(sequence.logprobs, abs=1e-4)
    greedy = sampler.sample(prompt, 1, types.SamplingParams(max_tokens=2, temperature=0.0)).result()
    assert tokenizer.decode(greedy.sequences[0].tokens).startswith("blue")


def test_a_wrong_expected_tokens_is_refused_naming_both_numbers(tinker_env, tokenizer_of) -> None:
    sampler = tinker.ServiceClient().create_sampling_client(base_model=VL)
    with pytest.raises(tinker.BadRequestError) as raised:
        sampler.sample(
            prompt_of(tokenizer_of(VL), IMAGES["red"], expected=63), 1, types.SamplingParams(max_tokens=1)
        ).result()
    assert "63" in str(raised.value) and "64" in str(raised.value)


def test_openai_chats_about_a_data_url_image_with_a_trained_checkpoint(tinker_env, tokenizer_of) -> None:
    service = tinker.ServiceClient()
    training = service.create_lora_training_client(base_model=VL, rank=4, seed=1).result()
    training.forward_backward([datum(tokenizer_of(VL), "red")], "cross_entropy").result()
    training.optim_step(types.AdamParams(learning_rate=1e-2)).result()
    path = training.save_weights_for_sampler("openai-vision").result().path
    client = openai.OpenAI(base_url=f"{tinker_env.url}/v1", api_key=tinker_env.api_key, max_retries=0)
    url = "data:image/png;base64," + base64.b64encode(IMAGES["red"]).decode()
    content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "Which colour?"}]
    reply = client.chat.completions.create(
        model=path, messages=[{"role": "user", "content": content}], max_tokens=3, temperature=0.0, logprobs=True
    )
    # the prompt is the chat template's tokens with the image widened to its 64 tokens
    text_only = client.chat.completions.create(
        model=path, messages=[{"role": "user", "content": "Which colour?"}], max_tokens=1
    )
    assert reply.usage.prompt_tokens == text_only.usage.prompt_tokens + 2 + EXPECTED
    assert reply.choices[0].logprobs.content and reply.usage.completion_tokens >= 1
    with pytest.raises(openai.BadRequestError) as raised:
        client.chat.completions.create(
            model="HuggingFaceTB/SmolLM2-135M-Instruct", messages=[{"role": "user", "content": content}], max_tokens=1
        )
    assert "does not take images" in str(raised.value)


def test_loom_sdk_builds_the_same_chat_input(tinker_env, tokenizer_of) -> None:
    tokenizer = tokenizer_of(VL)
    messages = [
        {
            "role": "user",
            "content": [{"type": "image", "image": IMAGES["red"]}, {"type": "text", "text": "Which colour?"}],
        }
    ]
    ours = chat_input(tokenizer, messages)
    theirs = prompt_of(tokenizer, IMAGES["red"])
    assert [c.model_dump(mode="json") for c in ours.chunks] == [c.model_dump(mode="json") for c in theirs.chunks]
    sampler = loom.ServiceClient(base_url=tinker_env.url, api_key=tinker_env.api_key).create_sampling_client(
        base_model=VL
    )
    out = sampler.sample(ours, 1, loom.types.SamplingParams(max_tokens=2, temperature=0.0)).result()
    assert len(out.sequences[0].tokens) == 2


def test_loom_sdk_trains_the_vision_tower_too_and_restores_it(tinker_env, tokenizer_of) -> None:
    service = loom.ServiceClient(base_url=tinker_env.url, api_key=tinker_env.api_key)
    with pytest.raises(loom.BadRequestError, match="no vision tower"):
        service.create_lora_training_client("HuggingFaceTB/SmolLM2-135M-Instruct", rank=4, train_vision=True)
    training = service.create_lora_training_client(VL, rank=4, seed=2, train_vision=True)
    tokenizer = tokenizer_of(VL)
    question = [{"type": "image", "image": IMAGES["red"]}, {"type": "text", "text": "Which colour?"}]
    prompt = chat_input(tokenizer, [{"role": "user", "content": question}])
    batch = [completion_datum(prompt, tokenizer.encode("red<|im_end|>", add_special_tokens=False))]
    training.forward_backward(batch, "cross_entropy").result()
    training.optim_step(loom.types.AdamParams(learning_rate=1e-2)).result()
    after = training.forward(batch, "cross_entropy").result().metrics["loss:sum"]
    saved = training.save_state("vision-tower").result().path
    assert service.create_rest_client().get_weights_info_by_tinker_path(saved).result().train_vision is True
    restored = service.create_training_client_from_state(saved)
    assert restored.forward(batch, "cross_entropy").result().metrics["loss:sum"] == pytest.approx(after, rel=1e-5)


def test_clients_get_the_servers_image_processor_from_the_hub_routes(tinker_env, tmp_path) -> None:
    """What the cookbook's Qwen3-VL renderer does to fill `expected_tokens`, with `HF_ENDPOINT` at the server."""
    from huggingface_hub import snapshot_download
    from transformers import AutoImageProcessor

    snapshot = snapshot_download(VL, endpoint=f"{tinker_env.url}/hf", cache_dir=tmp_path)
    processor = AutoImageProcessor.from_pretrained(snapshot)
    assert processor.get_number_of_image_patches(28, 28) // processor.merge_size**2 == EXPECTED
    assert processor.get_number_of_image_patches(480, 640) // processor.merge_size**2 == 300
