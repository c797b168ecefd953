"""Batched captioning and its scores, on the random tiny model: the same answers as chat(), in any batch size."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from xcomp_lab.data.quality import QualityReport, quality_report
from xcomp_lab.data.scenes import held_out_dataset, make_dataset
from xcomp_lab.model.loading import load_model, quantization_config
from xcomp_lab.model.tokenizer import CAPTION_QUERY
from xcomp_lab.run.captioning import caption_images, evaluate_captioner, prompt_batch, reference_logits

QUERY = "<ImageHere>" + CAPTION_QUERY


@pytest.fixture(scope="module")
def images():
    return [image for image, _ in make_dataset(4, seed=1001, image_size=112)]


def test_prompt_batch_stacks_the_chat_prompt_of_each_image(tiny_model, images):
    model, tokenizer = tiny_model
    with torch.no_grad():
        embeds, im_mask = prompt_batch(model, tokenizer, images[:3])
        single, single_mask = model.interleav_wrap_chat(tokenizer, QUERY, model.encode_img([images[1]]))
    assert embeds.shape == (3, single.shape[1], model.config.hidden_size)
    assert im_mask.sum(dim=1).tolist() == [model.config.image_tokens] * 3
    torch.testing.assert_close(embeds[1:2], single)
    assert torch.equal(im_mask[1:2], single_mask)


def test_batched_captions_equal_one_by_one_and_repeat(tiny_model, images):
    model, tokenizer = tiny_model
    batched = caption_images(model, tokenizer, images, batch_size=3, max_new_tokens=6)
    one_by_one = [caption_images(model, tokenizer, [image], batch_size=1, max_new_tokens=6)[0] for image in images]
    assert len(batched) == len(images) and all(isinstance(text, str) for text in batched)
    assert batched == one_by_one
    assert caption_images(model, tokenizer, images, batch_size=3, max_new_tokens=6) == batched


def test_captions_equal_greedy_chat(tiny_model, images):
    model, tokenizer = tiny_model
    with torch.no_grad():
        expected, _ = model.chat(
            tokenizer, QUERY, image=images[0], max_new_tokens=6, do_sample=False, repetition_penalty=1.0
        )
    assert caption_images(model, tokenizer, images[:1], max_new_tokens=6) == [expected]


def test_reference_logits_are_the_prefill_logits_in_fp32(tiny_model, images):
    model, tokenizer = tiny_model
    logits = reference_logits(model, tokenizer, images[:3], batch_size=2)
    embeds, im_mask = prompt_batch(model, tokenizer, images[2:3])
    with torch.no_grad():
        expected = model(inputs_embeds=embeds, im_mask=im_mask, use_cache=False).logits
    assert logits.dtype == torch.float32 and logits.device.type == "cpu"
    assert logits.shape == (3, embeds.shape[1], model.config.vocab_size)
    torch.testing.assert_close(logits[2:3], expected, rtol=1e-5, atol=1e-5)


def test_evaluate_scores_greedy_captions_of_the_held_out_scenes(tiny_model):
    model, tokenizer = tiny_model
    report = evaluate_captioner(model, tokenizer, n=4)
    data = held_out_dataset(4, image_size=model.config.image_size)
    captions = caption_images(model, tokenizer, [image for image, _ in data])
    expected = quality_report(captions, [text for _, text in data])
    assert isinstance(report, QualityReport)
    assert report == expected and report.n == 4
    assert 0.0 <= report.exact_match <= report.token_accuracy <= 1.0


@pytest.mark.parametrize(
    "dtype, quantization",
    [("float16", "none"), ("bfloat16", "none"), ("float32", "int8"), ("float32", "nf4")],
)
def test_captioning_runs_in_every_precision(tiny_checkpoint: Path, images, dtype, quantization):
    config = quantization_config(quantization, torch.float32)
    model, tokenizer = load_model(tiny_checkpoint, dtype=dtype, quantization_config=config)
    captions = caption_images(model, tokenizer, images[:2], max_new_tokens=3)
    logits = reference_logits(model, tokenizer, images[:2])
    assert len(captions) == 2 and all(isinstance(text, str) for text in captions)
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()


@pytest.mark.parametrize(
    "kwargs, error, words",
    [
        (dict(images=[]), ValueError, "images is empty"),
        (dict(images="scene.png"), TypeError, "wrap one image in a list"),
        (dict(batch_size=0), ValueError, "batch_size=0"),
        (dict(max_new_tokens=0), ValueError, "max_new_tokens=0"),
    ],
)
def test_bad_arguments_fail_clearly(tiny_model, images, kwargs, error, words):
    model, tokenizer = tiny_model
    arguments = {"images": images[:1], **kwargs}
    with pytest.raises(error, match=words):
        caption_images(model, tokenizer, arguments.pop("images"), **arguments)
