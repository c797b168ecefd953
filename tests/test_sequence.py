"""The sequence-memory formulas against real tensors of the tiny replica, the kernel lister and the chart."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure

from xcomp_lab.lessons.sequence import (
    ModelShape,
    PeakTerms,
    PromptShape,
    attention_kind,
    crossover_tokens,
    default_prompt,
    eager_scores_bytes,
    image_tokens,
    kv_cache_formula,
    leaf_ops,
    logits_peak_bytes,
    measure_peak_terms,
    peak_setter,
    peak_vs_tokens_chart,
    prefill_logits_bytes,
    prompt_shapes,
    scale_shapes,
    shape_of_config,
)
from xcomp_lab.model.scales import config_for_scale
from xcomp_lab.run.call import cache_bytes


def test_image_tokens_tiny_and_full():
    tiny, full = config_for_scale("tiny"), config_for_scale("full")
    assert [image_tokens(tiny, s) for s in (112, 224, 336)] == [64, 256, 576]
    assert image_tokens(tiny) == 64  # the tower's own 112 px
    assert image_tokens(full) == 1225  # 490 px, 35 x 35 patches
    with pytest.raises(ValueError, match="multiple of the 14 px patch"):
        image_tokens(full, 500)


def test_eager_scores_bytes_is_batch_heads_t_t():
    full = config_for_scale("full")
    assert eager_scores_bytes(full, 1, 1387, "float16") == 32 * 1387 * 1387 * 2
    assert eager_scores_bytes(full, 2, 1387, torch.float32) == 2 * 32 * 1387 * 1387 * 4
    q = torch.zeros(2, full.num_attention_heads, 5, 8)
    scores = torch.matmul(q, q.transpose(2, 3))  # what eager attention materialises: (B, H, T, T)
    assert eager_scores_bytes(full, 2, 5, "float32") == scores.numel() * scores.element_size()
    with pytest.raises(ValueError, match="tokens"):
        eager_scores_bytes(full, 1, 0)


def test_kv_cache_formula_matches_the_cache_the_model_builds(tiny_model):
    model, _ = tiny_model
    cfg = model.config
    batch, tokens = 2, 7
    embeds = torch.randn(batch, tokens, cfg.hidden_size)
    with torch.inference_mode():
        out = model(inputs_embeds=embeds, use_cache=True)
    assert cache_bytes(out.cache) == kv_cache_formula(cfg, batch, tokens, model.dtype)
    assert kv_cache_formula(config_for_scale("full"), 1, 1000, "float16") == 2 * 32 * 8 * 128 * 1000 * 2


def test_prefill_logits_bytes_matches_the_logits(tiny_model):
    model, _ = tiny_model
    cfg = model.config
    with torch.inference_mode():
        logits = model(inputs_embeds=torch.randn(1, 9, cfg.hidden_size), use_cache=False).logits
    assert logits.dtype == torch.float32
    assert prefill_logits_bytes(cfg, 1, 9) == logits.numel() * logits.element_size()


def test_logits_peak_bytes_is_the_head_output_and_its_fp32_copy():
    full = config_for_scale("full")
    assert logits_peak_bytes(full, 1, 1357, "float16") == 1357 * 92544 * (2 + 4)
    assert logits_peak_bytes(full, 2, 10, "float32") == prefill_logits_bytes(full, 2, 10)  # .float() is a no-op


@pytest.fixture(scope="module")
def tiny_fp16(tiny_model):
    model, _ = tiny_model
    return copy.deepcopy(model).half()  # the session's model stays FP32 for the other tests


def test_measure_peak_terms_against_the_formulas(tiny_fp16):
    cfg = tiny_fp16.config
    terms = measure_peak_terms(tiny_fp16, 300, device="cpu")
    assert terms.tokens == 300 and terms.scores_bytes == eager_scores_bytes(cfg, 1, 300, "float16")
    assert terms.logits_bytes == logits_peak_bytes(cfg, 1, 300, "float16")  # the head's FP16 output + its FP32 copy
    # masked scores, FP32 softmax (2x), its FP16 cast (the CPU also converts the input to FP32 first: 5x)
    assert 4 <= terms.eager_multiple <= 5
    assert terms.sdpa_bytes < terms.scores_bytes  # the fused kernel never stores the scores
    assert terms.larger == "eager attention"  # the tiny vocabulary (1024) is small against 300 tokens x 4 heads
    with pytest.raises(ValueError, match="tokens"):
        measure_peak_terms(tiny_fp16, 0, device="cpu")


def test_crossover_tokens_is_where_the_two_terms_meet():
    for scale in ("tiny", "full"):
        cfg = config_for_scale(scale)
        t = crossover_tokens(cfg, 4.0)
        eager = 4.0 * cfg.num_attention_heads * t * t * 2
        assert eager == pytest.approx(logits_peak_bytes(cfg, 1, 1) * t)
    assert crossover_tokens(config_for_scale("full"), 4.0) == pytest.approx(92544 * 6 / (4 * 32 * 2))
    with pytest.raises(ValueError, match="eager_multiple"):
        crossover_tokens(config_for_scale("tiny"), 0)


def test_peak_setter_reads_the_gap():
    scores = 4 * 2**20
    attention_wins = PeakTerms(tokens=708, scores_bytes=scores, eager_bytes=5 * scores, sdpa_bytes=0, logits_bytes=scores)
    assert peak_setter(attention_wins, 4 * scores).startswith("eager attention sets the eager peak")
    logits_win = PeakTerms(tokens=1357, scores_bytes=scores, eager_bytes=4 * scores, sdpa_bytes=0, logits_bytes=7 * scores)
    assert peak_setter(logits_win, 300 * 1024).startswith("the logits set both peaks")
    assert peak_setter(logits_win, -300 * 1024).startswith("the logits set both peaks")
    assert "no more than sdpa" in peak_setter(PeakTerms(1, 1, 1, 1, 1), 0)


def test_peak_setter_without_sdpa_reads_the_prefill_activations():
    scores = 4 * 2**20
    terms = PeakTerms(tokens=1349, scores_bytes=scores, eager_bytes=5 * scores, sdpa_bytes=None, logits_bytes=scores // 8)
    assert peak_setter(terms, None).startswith("no sdpa run to compare (eager attention only): one layer's eager "
                                               "attention holds x40.00 the logits")
    assert peak_setter(terms, None, 6 * scores).endswith("x0.83 of the prefill's 24.00 MiB of activations, sets the peak")
    assert "is not most of them" in peak_setter(terms, None, 20 * scores)


def test_the_replica_sweeps_image_sizes_and_its_shape_is_its_config(tiny_model):
    model, _ = tiny_model
    tiny = config_for_scale("tiny")
    shape = shape_of_config(tiny)
    assert (shape.head_dim, shape.image_size, shape.patch_size, shape.fixed_image_size) == (tiny.head_dim, 112, 14, False)
    assert kv_cache_formula(shape, 2, 100) == kv_cache_formula(tiny, 2, 100)
    assert image_tokens(shape, 224) == image_tokens(tiny, 224) == 256
    shapes = prompt_shapes(shape, text_tokens=132)
    assert [(s.image_size, s.images, s.describe(), s.name) for s in shapes] == [
        (112, 1, " 112 px", "112px"), (224, 1, " 224 px", "224px"), (336, 1, " 336 px", "336px")]
    assert default_prompt(shape) == shapes[0] and default_prompt(shape, 224) == shapes[1]
    assert shapes[1].tokens(shape, 132) == 132 + 256 and shapes[1].image_size_parameter == 224
    assert list(scale_shapes(model)) == ["tiny", "full"] and scale_shapes(model)["full"].image_size == 490
    assert attention_kind(model) == model.config._attn_implementation


def test_a_fixed_image_side_grows_the_prompt_by_images():
    shape = ModelShape(vocab_size=92544, hidden_size=4096, num_attention_heads=32, num_key_value_heads=8,
                       num_hidden_layers=32, head_dim=128, image_size=490, patch_size=14, fixed_image_size=True,
                       max_prompt_tokens=4096)
    shapes = prompt_shapes(shape, text_tokens=162)
    assert [s.images for s in shapes] == [1, 2, 3]  # 162 + 3 x 1225 = 3837 <= 4096 < 162 + 4 x 1225
    assert [s.describe() for s in shapes[:2]] == ["1 image of 490 px", "2 images of 490 px"]
    assert shapes[2].name == "3img" and shapes[2].image_size_parameter is None and shapes[2].tokens(shape, 162) == 3837
    with pytest.raises(ValueError, match="resizes every image to its 490 px"):
        image_tokens(shape, 224)
    with pytest.raises(ValueError, match="leave no room"):
        prompt_shapes(shape, text_tokens=3000)
    assert PromptShape(490, 1, True) == default_prompt(shape)


def test_leaf_ops_shows_the_attention_kernels():
    q = torch.randn(1, 2, 16, 8)
    fused = leaf_ops(lambda: F.scaled_dot_product_attention(q, q, q, is_causal=True), contains=("attention", "bmm"))
    assert fused and all("scaled_dot_product" in name for name in fused)  # a fused kernel, no bmm

    def eager():
        scores = torch.matmul(q, q.transpose(2, 3))
        return torch.matmul(F.softmax(scores, dim=-1), q)

    ops = leaf_ops(eager, contains=("attention", "softmax", "bmm"))
    assert ops.get("aten::bmm") == 2 and "aten::_softmax" in ops
    with pytest.raises(ValueError, match="callable"):
        leaf_ops(42)


def test_peak_vs_tokens_chart():
    fig = peak_vs_tokens_chart({"eager": [(196, 12 * 2**20), (708, 34 * 2**20)], "sdpa": [(196, 11 * 2**20)]},
                               budget_bytes=25 * 2**20, weights_bytes=10 * 2**20)
    assert isinstance(fig, Figure)
    ax = fig.axes[0]
    assert "MiB" in ax.get_ylabel()  # small figures read in MiB
    labels = ax.get_legend_handles_labels()[1]
    assert labels[:2] == ["eager", "sdpa"] and any(label.startswith("budget") for label in labels)
    big = peak_vs_tokens_chart({"eager": [(1387, 17 * 2**30)]})
    assert "GiB" in big.axes[0].get_ylabel()
    with pytest.raises(ValueError, match="at least one"):
        peak_vs_tokens_chart({"eager": []})
