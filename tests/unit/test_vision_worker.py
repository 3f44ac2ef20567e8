"""Images through the worker on the Qwen3-VL miniatures (dense and MoE): the token count the API computes is the one
transformers' image processor produces; a vision run mixed with a text run in one pass gets the logprobs and
gradients each gets alone; sampling with an image scores its tokens exactly as the training pass does; the prefix
cache tells images apart; and a trained adapter with vision-tower LoRA saved in PEFT format reproduces the worker's
logprobs when `peft` loads it onto the transformers Qwen3-VL class with the processor's pixels.

Tolerances as in test_worker_mixed_batch.py: logprobs atol 1e-4, gradients 1e-4 relative to their scale.
"""

from __future__ import annotations

import functools
import io

import pytest
import torch
import transformers
from peft import PeftModel
from PIL import Image
from transformers import Qwen2VLImageProcessorPil

from contract.catalogue import TINY_QWEN3_VL, TINY_QWEN3_VL_MOE
from loom.types import QWEN3_VL_GEOMETRY, EncodedTextChunk, ForwardBackwardInput, ImageChunk, ModelInput
from loom.vision import chat_input, completion_datum
from tests.unit.worker_fixtures import MODEL_CACHE, grads, make_adapter, register
from worker.checkpoint_io import save_adapter
from worker.job_payloads import train_data
from worker.models.loader import LoadedModel, load_base_model
from worker.models.registry import model_dir
from worker.models.vision_inputs import flatten
from worker.sampler import DecodeBatch, SampleWork, run_sampling
from worker.trainer import WorkItem, run_forward_backward

LP_ATOL = 1e-4
GRAD_RTOL = 1e-4
ENTRIES = {"dense": TINY_QWEN3_VL, "moe": TINY_QWEN3_VL_MOE}


@functools.cache
def vl_model(key: str) -> LoadedModel:
    return load_base_model(ENTRIES[key], MODEL_CACHE)


def png(seed: int, size: tuple[int, int] = (28, 28)) -> bytes:
    """A seeded random-noise RGB image as PNG bytes."""
    gen = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (size[1], size[0], 3), generator=gen, dtype=torch.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels.numpy()).save(buffer, format="PNG")
    return buffer.getvalue()


def image_prompt(lm: LoadedModel, image: bytes, question: str) -> ModelInput:
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": question}]}]
    return chat_input(lm.tokenizer, messages)


def answer_datum(lm: LoadedModel, image: bytes, answer: str):
    prompt = image_prompt(lm, image, "What is shown?")
    return completion_datum(prompt, lm.tokenizer.encode(answer + "<|im_end|>", add_special_tokens=False))


@pytest.mark.parametrize("size", [(28, 28), (1, 1), (640, 480), (33, 1000), (4000, 3000), (7, 1400)])
def test_the_token_count_is_the_image_processors(size: tuple[int, int]) -> None:
    width, height = size
    processor = Qwen2VLImageProcessorPil(
        size={"shortest_edge": QWEN3_VL_GEOMETRY.min_pixels, "longest_edge": QWEN3_VL_GEOMETRY.max_pixels},
        patch_size=16,
        temporal_patch_size=2,
        merge_size=2,
    )
    expected = processor.get_number_of_image_patches(height, width) // 4
    assert QWEN3_VL_GEOMETRY.tokens(height, width) == expected
    if width * height <= 640 * 480:  # the processor's real output too
        grid = processor(images=[Image.new("RGB", size)], return_tensors="pt")["image_grid_thw"][0]
        assert int(grid.prod()) // 4 == expected


@pytest.fixture(scope="module", params=list(ENTRIES))
def mixed(request):
    """A vision run (two image datums) and a text run of the same base model, mixed in one pass and alone."""
    lm = vl_model(request.param)
    vision_adapter = make_adapter(lm, 4, 1, b_std=3e-3, vision=True)
    text_adapter = make_adapter(lm, 8, 2, b_std=3e-3)
    slots = [register(lm, vision_adapter), register(lm, text_adapter)]
    vision_fb = [
        answer_datum(lm, png(1), "A shirt."),
        answer_datum(lm, png(2, (40, 20)), "A shoe, seen from the side."),
    ]
    text_datum = completion_datum(
        chat_input(lm.tokenizer, [{"role": "user", "content": "Name a colour."}]),
        lm.tokenizer.encode("Blue.<|im_end|>", add_special_tokens=False),
    )

    def item(slot: int, data, loss: str = "cross_entropy") -> WorkItem:
        fb = ForwardBackwardInput(data=data, loss_fn=loss)
        return WorkItem(slot, train_data(fb, None, lm.images), loss)

    items = [item(slots[1], [text_datum]), item(slots[0], vision_fb)]
    for a in (vision_adapter, text_adapter):
        a.zero_grad()
    together = run_forward_backward(lm, items)
    together_grads = [grads(vision_adapter), grads(text_adapter)]
    alone, alone_grads = [], []
    for it, adapter in zip(items, (text_adapter, vision_adapter)):
        vision_adapter.zero_grad()
        text_adapter.zero_grad()
        alone.append(run_forward_backward(lm, [it])[0])
        alone_grads.append(grads(adapter))
    yield lm, items, together, together_grads, alone, alone_grads
    for slot in slots:
        lm.router.adapters.pop(slot)


def test_a_vision_run_mixed_with_a_text_run_gets_what_it_gets_alone(mixed) -> None:
    lm, items, together, together_grads, alone, alone_grads = mixed
    assert len(items[1].data[0].images) == 1 and items[0].data[0].images == []
    for mixed_result, alone_result in zip(together, alone):
        for lp_m, lp_a in zip(mixed_result.logprobs, alone_result.logprobs):
            torch.testing.assert_close(lp_m, lp_a, atol=LP_ATOL, rtol=0)
        assert mixed_result.losses == pytest.approx(alone_result.losses, abs=20 * LP_ATOL)
    # together_grads: [vision, text]; alone_grads: [text (item 0), vision (item 1)]
    for got, want in ((together_grads[0], alone_grads[1]), (together_grads[1], alone_grads[0])):
        assert got.keys() == want.keys()
        for name in want:
            scale = float(want[name].abs().max())
            assert float((got[name] - want[name]).abs().max()) <= GRAD_RTOL * scale + 1e-9, name
    # the vision run's LoRA reaches the vision blocks and every merger; the text run has none there
    tower = {n for n, g in together_grads[0].items() if ".visual." in n and float(g.abs().max()) > 0}
    assert {n.split(".visual.")[1].split(".")[0] for n in tower} == {"blocks", "merger", "deepstack_merger_list"}
    assert not any(".visual." in n for n in together_grads[1])
    # the image matters: the same question about another image scores the answer differently
    other = answer_datum(lm, png(3), "A shirt.")
    swapped = train_data(ForwardBackwardInput(data=[other], loss_fn="cross_entropy"), None, lm.images)
    lp_other = run_forward_backward(lm, [WorkItem(items[1].slot, swapped, "cross_entropy", forward_only=True)])[0]
    assert float((lp_other.logprobs[0] - together[1].logprobs[0]).abs().max()) > 1e-4


@pytest.mark.parametrize("key", list(ENTRIES))
def test_sampling_with_an_image_scores_tokens_as_training_does(key: str) -> None:
    lm = vl_model(key)
    prompt = image_prompt(lm, png(5), "Describe it.")
    tokens, images = flatten(prompt, lm.images)
    work = SampleWork(
        slot=None, prompt=tokens, images=images, max_tokens=6, temperature=1.0, seed=7, prompt_logprobs=True
    )
    out = run_sampling(lm, [work])[0]
    sampled = out.sequences[0]
    full = prompt.append(EncodedTextChunk(tokens=sampled.tokens[:-1]))
    datum = completion_datum(prompt, sampled.tokens)
    assert datum.model_input.length == full.length
    data = train_data(ForwardBackwardInput(data=[datum], loss_fn="cross_entropy"), None, lm.images)
    scored = run_forward_backward(lm, [WorkItem(None, data, "cross_entropy", forward_only=True)])[0].logprobs[0]
    n = len(sampled.tokens)
    assert scored[-n:].tolist() == pytest.approx(sampled.logprobs, abs=LP_ATOL)
    # prompt logprobs agree wherever the next prompt token is text (the datum targets image positions with 0)
    text = [i for i, t in enumerate(tokens[1:]) if t != TINY_QWEN3_VL.vision.image_token_id]
    assert len(text) > 10
    assert [scored[i].item() for i in text] == pytest.approx([out.prompt_logprobs[i + 1] for i in text], abs=LP_ATOL)


def test_the_prefix_cache_tells_images_apart() -> None:
    lm = vl_model("dense")
    batch = DecodeBatch(lm)

    def admit(image: bytes, follow_up: str) -> int:
        prompt = image_prompt(lm, image, "Describe it.")
        tokens, images = flatten(prompt, lm.images)
        tokens += lm.tokenizer.encode(follow_up, add_special_tokens=False)
        work = SampleWork(slot=None, prompt=tokens, images=images, max_tokens=1, cache_key=("t", None))
        out = batch.admit([work], [0])[0]
        while len(batch):
            batch.step()
        return out.cache_hit_tokens

    assert admit(png(8), "") == 0
    first_length = len(flatten(image_prompt(lm, png(8), "Describe it."), lm.images)[0])
    assert admit(png(8), " More.") == first_length  # same image: the cached prompt is reused
    assert admit(png(9), " More.") == 0  # same tokens, another image: no reuse


def test_a_saved_vision_adapter_loads_with_peft_and_reproduces_the_logprobs(tmp_path) -> None:
    lm = vl_model("dense")
    adapter = make_adapter(lm, 4, 11, b_std=5e-2, vision=True)
    slot = register(lm, adapter)
    try:
        prompt = image_prompt(lm, png(12), "What is shown?")
        tokens, images = flatten(prompt, lm.images)
        work = SampleWork(slot=slot, prompt=tokens, images=images, max_tokens=1, prompt_logprobs=True)
        ours = run_sampling(lm, [work])[0].prompt_logprobs[1:]
        save_adapter(tmp_path, adapter, lm.targets, str(lm.path))
    finally:
        lm.router.adapters.pop(slot)
    folder = model_dir(TINY_QWEN3_VL, MODEL_CACHE)
    base = transformers.Qwen3VLForConditionalGeneration.from_pretrained(str(folder), dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, str(tmp_path)).eval()
    ids = torch.tensor([tokens])
    pixels = {"pixel_values": images[0].pixel_values, "image_grid_thw": images[0].grid_thw[None]}
    with torch.no_grad():
        logits = peft_model(
            input_ids=ids, mm_token_type_ids=(ids == TINY_QWEN3_VL.vision.image_token_id).int(), **pixels
        ).logits[0]
    theirs = torch.log_softmax(logits[:-1].float(), -1).gather(-1, ids[0, 1:, None])[:, 0].tolist()
    assert theirs == pytest.approx(ours, abs=LP_ATOL)


def test_image_chunks_of_a_model_input_become_runs_of_image_tokens() -> None:
    lm = vl_model("dense")
    chunk = ImageChunk(data=png(4), format="png", expected_tokens=64)
    tokens, images = flatten(ModelInput(chunks=[EncodedTextChunk(tokens=[1, 2]), chunk]), lm.images)
    assert tokens == [1, 2] + [TINY_QWEN3_VL.vision.image_token_id] * 64
    assert images[0].tokens == 64 and images[0].pixel_values.shape == (256, 3 * 2 * 16 * 16)
