"""Generation speed timed outside memory measurement (xcomp_lab.run.speed)."""

import pytest
import torch

from xcomp_lab.run.speed import Speed, generation_speed


def test_speed_arithmetic_and_text():
    speed = Speed(seconds=0.5, new_tokens=16, batch=2, repeats=3)
    assert speed.tokens_per_s == 64.0 and speed.prefill_tokens_per_s is None
    assert str(speed).startswith("generation 64.0 tokens/s (2 x 16 new tokens")
    speed = Speed(seconds=0.5, new_tokens=16, batch=2, repeats=3, prompt_tokens=100, prefill_seconds=0.25)
    assert speed.prefill_tokens_per_s == 800.0
    assert str(speed).startswith("prefill 800 prompt tokens/s (2 x 100 in 0.250 s) | generation 64.0")


def test_generation_speed_makes_exactly_the_tokens_asked(tiny_model, scene_image, monkeypatch):
    model, tokenizer = tiny_model
    made = []
    generate = model.generate

    def counting(*args, **kwargs):
        out = generate(*args, **kwargs)
        made.append(out.shape[1])
        return out

    monkeypatch.setattr(model, "generate", counting)
    speed = generation_speed(model, tokenizer, [scene_image], device="cpu", new_tokens=5, repeats=2)
    assert made == [5, 5, 5]  # warm-up, then two timed calls, end-of-turn ignored
    assert speed.batch == 1 and speed.new_tokens == 5 and speed.seconds > 0
    assert speed.prompt_tokens > 0 and speed.prefill_seconds > 0


def test_generation_speed_times_on_the_threads_asked_and_restores_them(tiny_model, scene_image):
    model, tokenizer = tiny_model
    before = torch.get_num_threads()
    speed = generation_speed(model, tokenizer, [scene_image], device="cpu", new_tokens=2, repeats=1)
    assert speed.cpu_threads == 1 and str(speed).endswith("1 CPU thread")
    assert torch.get_num_threads() == before
    speed = generation_speed(model, tokenizer, [scene_image], device="cpu", new_tokens=2, repeats=1, cpu_threads=None)
    assert speed.cpu_threads == before


@pytest.mark.parametrize("kwargs, message", [({"repeats": 0}, "repeats=0"), ({"new_tokens": -1}, "new_tokens=-1")])
def test_generation_speed_checks_arguments(tiny_model, scene_image, kwargs, message):
    model, tokenizer = tiny_model
    with pytest.raises(ValueError, match=message):
        generation_speed(model, tokenizer, [scene_image], device="cpu", **kwargs)
    with pytest.raises(ValueError, match="empty"):
        generation_speed(model, tokenizer, [], device="cpu")
