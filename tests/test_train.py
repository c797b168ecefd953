"""Training the tiny captioner: chat prompt layout, falling loss, determinism, the saved checkpoint and its cache."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from xcomp_lab.data.scenes import make_dataset
from xcomp_lab.model.checkpoint import DONE_MARKER
from xcomp_lab.model.loading import load_model
from xcomp_lab.model.modeling_internlm_xcomposer2 import IM_END, InternLMXComposer2ForCausalLM
from xcomp_lab.model.scales import config_for_scale
from xcomp_lab.model.tokenizer import CAPTION_QUERY
from xcomp_lab.tools import train
from xcomp_lab.tools.train import CaptionPrompt, answer_batch, caption_loss, train_captioner

QUERY = "<ImageHere>" + CAPTION_QUERY


@pytest.fixture(scope="module")
def short_run(tmp_path_factory: pytest.TempPathFactory) -> train.TrainResult:
    out_dir = tmp_path_factory.mktemp("trained") / "checkpoint"
    return train_captioner(steps=12, batch_size=4, warmup_steps=2, learning_rate=2e-3, progress=False, out_dir=out_dir)


def chat_layout_loss(model, tokenizer, data) -> float:
    """The loss over answer tokens, each example embedded alone exactly as chat() embeds its prompt."""
    total, count = 0.0, 0
    for image, text in data:
        embeds, im_mask = model.interleav_wrap_chat(tokenizer, QUERY, model.encode_img([image]))
        answer, _ = answer_batch(tokenizer, [text])
        inputs = torch.cat([embeds, model.get_input_embeddings()(answer)], dim=1)
        im_mask = torch.cat([im_mask, torch.zeros_like(answer, dtype=torch.bool)], dim=1)
        labels = torch.cat([torch.full(embeds.shape[:2], -100), answer], dim=1)
        logits = model(inputs_embeds=inputs, im_mask=im_mask, use_cache=False).logits
        total += F.cross_entropy(logits[0, :-1], labels[0, 1:], ignore_index=-100, reduction="sum").item()
        count += answer.shape[1]
    return total / count


@torch.no_grad()
def prefill_logits(model, tokenizer, image) -> torch.Tensor:
    embeds, im_mask = model.interleav_wrap_chat(tokenizer, QUERY, model.encode_img([image]))
    return model(inputs_embeds=embeds, im_mask=im_mask).logits


def test_answers_end_the_turn_and_are_right_padded():
    tokenizer = train.course_tokenizer()
    ids, mask = answer_batch(tokenizer, ["a small red circle", "a large blue square left of a small green triangle"])
    end_of_turn = tokenizer.convert_tokens_to_ids(IM_END)
    lengths = mask.sum(dim=1).tolist()
    assert lengths[0] < lengths[1] == ids.shape[1]
    assert [ids[row, length - 1].item() for row, length in enumerate(lengths)] == [end_of_turn, end_of_turn]
    assert (ids[0, lengths[0] :] == tokenizer.pad_token_id).all()
    assert tokenizer.decode(ids[0, : lengths[0] - 1]) == "a small red circle"


def test_batched_loss_equals_the_chat_prompt_loss():
    torch.manual_seed(0)
    model = InternLMXComposer2ForCausalLM(config_for_scale("tiny")).eval()
    tokenizer = train.course_tokenizer()
    data = make_dataset(3, seed=1000, image_size=model.config.image_size)
    pixels = torch.stack([model.vis_processor(image) for image, _ in data])
    ids, mask = answer_batch(tokenizer, [text for _, text in data])
    assert len(set(mask.sum(dim=1).tolist())) > 1, "the check needs padded answers"
    with torch.no_grad():
        batched = caption_loss(model, CaptionPrompt.build(tokenizer), pixels, ids, mask).item()
        expected = chat_layout_loss(model, tokenizer, data)
    assert batched == pytest.approx(expected, rel=1e-5)


def test_short_run_lowers_the_loss_clearly(short_run: train.TrainResult):
    losses = short_run.losses
    assert len(losses) == 12
    assert sum(losses[-3:]) / 3 < 0.6 * losses[0], losses


def test_training_is_deterministic_for_a_seed(short_run: train.TrainResult):
    again = train_captioner(steps=3, batch_size=4, warmup_steps=2, learning_rate=2e-3, progress=False)
    assert again.losses == short_run.losses[:3]
    other_seed = train_captioner(steps=1, batch_size=4, seed=1, progress=False)
    assert other_seed.losses[0] != short_run.losses[0]


def test_checkpoint_is_fp16_and_round_trips_through_load_model(short_run: train.TrainResult):
    directory = short_run.checkpoint
    assert (directory / DONE_MARKER).is_file()
    assert json.loads((directory / DONE_MARKER).read_text())["steps"] == 12
    weights = load_file(directory / train.WEIGHTS_NAME)
    assert {tensor.dtype for tensor in weights.values()} == {torch.float16}
    assert set(weights) == set(short_run.model.state_dict())

    loaded, tokenizer = load_model(directory, dtype="float32")
    assert next(loaded.parameters()).dtype == torch.float32
    assert tokenizer.get_vocab() == short_run.tokenizer.get_vocab()
    rounded = InternLMXComposer2ForCausalLM(config_for_scale("tiny")).eval()
    rounded.load_state_dict({name: tensor.half().float() for name, tensor in short_run.model.state_dict().items()})
    image, _ = make_dataset(1, seed=1000, image_size=112)[0]
    torch.testing.assert_close(prefill_logits(loaded, tokenizer, image), prefill_logits(rounded, tokenizer, image))
    as_released, _ = load_model(directory)
    assert next(as_released.parameters()).dtype == torch.float16


@pytest.mark.parametrize(
    "kwargs, error, words",
    [
        (dict(steps=0), ValueError, "steps=0"),
        (dict(batch_size=2.5), ValueError, "batch_size=2.5"),
        (dict(seed=-1), ValueError, "seed=-1"),
        (dict(learning_rate=0.0), ValueError, "learning_rate=0.0"),
        (dict(lr=1e-3), TypeError, r"Unknown training settings \['lr'\]"),
    ],
)
def test_bad_training_arguments_fail_clearly(kwargs, error, words):
    with pytest.raises(error, match=words):
        train_captioner(progress=False, **kwargs)
