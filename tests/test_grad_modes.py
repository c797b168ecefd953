"""What .eval(), no_grad and inference_mode change (xcomp_lab.lessons.grad_modes), tiny model, exact CPU accounting."""

import pytest
import torch

from xcomp_lab.lessons.grad_modes import copies_kept, dropout_modules, grad_enabled_by_part, run_prefill, run_prompt
from xcomp_lab.memory import Budget
from xcomp_lab.run.call import autocast_copy_bytes
from xcomp_lab.run.captioning import prompt_batch, reference_logits

FP32 = 4


def test_dropout_is_plora_only(tiny_model):
    model, _ = tiny_model
    layers = model.config.num_hidden_layers
    assert dropout_modules(model) == {model.config.plora_dropout: 5 * layers}


def test_train_mode_changes_logits_and_eval_mode_does_not(tiny_model, scene_image):
    model, tokenizer = tiny_model
    try:
        model.train()
        a, b = (reference_logits(model, tokenizer, [scene_image]) for _ in range(2))
        assert not torch.equal(a, b)  # inference_mode does not turn dropout off
    finally:
        model.eval()
    c, d = (reference_logits(model, tokenizer, [scene_image]) for _ in range(2))
    assert torch.equal(c, d)


def test_prefill_keeps_activations_only_with_gradients(tiny_model, scene_image):
    model, tokenizer = tiny_model
    runs = {mode: run_prefill(model, tokenizer, [scene_image], device="cpu", grad=mode)
            for mode in ("enabled", "no_grad", "inference_mode")}
    logits_bytes = runs["no_grad"].tokens * model.config.vocab_size * FP32
    for mode in ("no_grad", "inference_mode"):
        assert runs[mode].ok and runs[mode].output_requires_grad is False
        assert runs[mode].held_bytes == logits_bytes  # only the logits outlive the pass
    enabled = runs["enabled"]
    assert enabled.output_requires_grad is True
    assert enabled.held_bytes > 5 * logits_bytes
    # The graph is complete only at the end of the pass: nearly all of the peak is still held then.
    rise = enabled.memory.peak_bytes - enabled.memory.start_bytes
    assert 0.99 * rise <= enabled.held_bytes <= rise
    assert runs["inference_mode"].memory.peak_bytes == runs["no_grad"].memory.peak_bytes


def test_prefill_with_gradients_runs_out_of_a_tight_budget_and_releases(tiny_model, scene_image):
    model, tokenizer = tiny_model
    fits = run_prefill(model, tokenizer, [scene_image], device="cpu", grad="no_grad")
    budget = Budget(device="cpu", limit_bytes=fits.memory.peak_bytes + 1024, card_gb=48.0, card="a test card")
    assert run_prefill(model, tokenizer, [scene_image], device="cpu", grad="no_grad", budget=budget).ok
    failed = run_prefill(model, tokenizer, [scene_image], device="cpu", grad="enabled", budget=budget, label="x")
    assert not failed.ok and "OOM in step 'x'" in failed.oom_report
    assert failed.output_requires_grad is None
    assert failed.after_release_bytes == failed.memory.start_bytes


def test_prompt_graph_is_what_gradients_add(tiny_model, scene_image):
    model, tokenizer = tiny_model
    no_grad = run_prompt(model, tokenizer, [scene_image], device="cpu", grad="no_grad")
    enabled = run_prompt(model, tokenizer, [scene_image], device="cpu", grad="enabled")
    assert no_grad.held_bytes == no_grad.tokens * model.config.hidden_size * FP32  # the embeddings alone
    assert enabled.output_requires_grad and enabled.held_bytes > no_grad.held_bytes


def test_generate_runs_the_decoder_without_gradients(tiny_model, scene_image):
    model, tokenizer = tiny_model
    assert torch.is_grad_enabled()
    with grad_enabled_by_part(model) as seen:
        embeds, im_mask = prompt_batch(model, tokenizer, [scene_image])
        model.generate(inputs_embeds=embeds, im_mask=im_mask, max_new_tokens=2, do_sample=False,
                       pad_token_id=tokenizer.pad_token_id)
    assert seen == {"vision tower": {True}, "projector": {True}, "decoder": {False}, "output head": {False}}


@pytest.mark.parametrize("grad", ["off", "eval"])
def test_unknown_grad_mode_is_refused(tiny_model, scene_image, grad):
    model, tokenizer = tiny_model
    with pytest.raises(ValueError, match="grad mode"):
        run_prefill(model, tokenizer, [scene_image], device="cpu", grad=grad)


def test_autocast_keeps_weight_copies_under_no_grad_unless_its_cache_is_off(tiny_model, scene_image):
    model, tokenizer = tiny_model
    plain = run_prefill(model, tokenizer, [scene_image], device="cpu", grad="no_grad")
    runs = {(grad, cache): run_prefill(model, tokenizer, [scene_image], device="cpu", grad=grad, use_autocast=True,
                                       cache_enabled=cache)
            for grad, cache in (("no_grad", True), ("inference_mode", True), ("no_grad", False))}
    copies = autocast_copy_bytes(model)
    cached = runs["no_grad", True]
    # The cache holds the copies as they pile up, layer by layer: most of them are alive at the peak.
    assert cached.memory.peak_bytes - runs["no_grad", False].memory.peak_bytes >= 0.7 * copies
    assert copies_kept(cached, plain, copies)
    assert not copies_kept(runs["no_grad", False], plain, copies)
    # torch 2.10 and later: inference_mode stops the cache too (PyTorch PR #165068).
    assert not copies_kept(runs["inference_mode", True], plain, copies)
    assert runs["inference_mode", True].memory.peak_bytes == runs["no_grad", False].memory.peak_bytes


def test_copies_kept_needs_a_reference_that_fits(tiny_model, scene_image):
    model, tokenizer = tiny_model
    fits = run_prefill(model, tokenizer, [scene_image], device="cpu", grad="no_grad")
    tight = Budget(device="cpu", limit_bytes=fits.memory.start_bytes + 1024, card_gb=48.0, card="a test card")
    failed = run_prefill(model, tokenizer, [scene_image], device="cpu", grad="no_grad", budget=tight, label="tight")
    assert copies_kept(failed, fits, 1) is True  # out of memory where the pass without autocast fit
    with pytest.raises(ValueError, match="'tight'.*ran out of memory"):
        copies_kept(fits, failed, 1)
