"""The replica: sizes, loading, PLoRA, attention kinds, KV cache, quantization and argument checks."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import AutoModel

from xcomp_lab.model.checkpoint import INDEX_NAME, build_checkpoint, write_model_files
from xcomp_lab.model.loading import load_model, quantization_config
from xcomp_lab.model.modeling_internlm_xcomposer2 import (
    ORIGINAL_KEY_MAPPING,
    InternLMXComposer2ForCausalLM,
    PLoRA,
)
from xcomp_lab.model.scales import config_for_scale
from xcomp_lab.model.tokenizer import CAPTION_QUERY

QUERY = "<ImageHere>" + CAPTION_QUERY


def meta_model(scale: str) -> InternLMXComposer2ForCausalLM:
    with torch.device("meta"):
        return InternLMXComposer2ForCausalLM(config_for_scale(scale))


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def prompt_inputs(model, tokenizer, image):
    embeds = model.encode_img([image])
    return model.interleav_wrap_chat(tokenizer, QUERY, embeds)


# ----- sizes -------------------------------------------------------------------------------------


def test_full_scale_matches_the_released_parameter_count_on_meta():
    model = meta_model("full")
    assert count(model) == 8_666_840_064  # the original's remote code on the meta device
    assert len(list(model.parameters())) == 942
    assert count(model.model.tok_embeddings) == 379_060_224
    assert count(model.model.layers) == 7_583_563_776
    assert count(model.vit) == 304_172_032
    assert count(model.vision_proj) == 20_979_712
    plora = sum(p.numel() for n, p in model.named_parameters() if "Plora_" in n)
    assert plora == 603_979_776
    assert model.config.image_tokens == 1225


def test_full_scale_rotary_tables_cost_one_gib_in_fp32():
    model = meta_model("full")
    table_bytes = sum(b.numel() * 4 for n, b in model.named_buffers() if n.endswith(("cos_cached", "sin_cached")))
    assert table_bytes == 32 * 2 * 32768 * 128 * 4 == 1024**3


def test_tiny_scale_keeps_every_part():
    full, tiny = meta_model("full"), meta_model("tiny")
    full_kinds = {type(m).__name__ for m in full.modules()}
    assert {type(m).__name__ for m in tiny.modules()} == full_kinds
    assert tiny.config.num_attention_heads // tiny.config.num_key_value_heads == 4  # same GQA grouping
    assert count(tiny) < 10_000_000


# ----- checkpoints and loading -------------------------------------------------------------------


def test_checkpoint_directory_is_laid_out_like_the_release(tiny_checkpoint: Path):
    config = json.loads((tiny_checkpoint / "config.json").read_text())
    assert config["auto_map"]["AutoModel"] == "modeling_internlm_xcomposer2.InternLMXComposer2ForCausalLM"
    for name in ("modeling_internlm_xcomposer2.py", "configuration_internlm_xcomposer2.py", "tokenizer.json", INDEX_NAME):
        assert (tiny_checkpoint / name).is_file(), name


def test_checkpoint_is_written_in_several_shards_and_reproducible(tmp_path: Path, tiny_checkpoint: Path):
    sharded = build_checkpoint("tiny", "float32", seed=0, out_dir=tmp_path / "s", shard_bytes=4 * 1024**2, progress=False)
    index = json.loads((sharded / INDEX_NAME).read_text())
    files = set(index["weight_map"].values())
    assert len(files) > 2
    for name in files:
        assert (sharded / name).stat().st_size < 4 * 1024**2 + 2 * 1024**2  # one tensor may overshoot a shard
    whole = load_file(tiny_checkpoint / "model-00001-of-00001.safetensors")
    parts = {}
    for name in files:
        parts.update(load_file(sharded / name))
    assert parts.keys() == whole.keys()
    assert all(torch.equal(parts[k], whole[k]) for k in whole)


def test_save_and_reload_through_automodel_gives_equal_outputs(tmp_path: Path, tiny_model, scene_image):
    model, tokenizer = tiny_model
    out = tmp_path / "resaved"
    write_model_files(out, model.config, tokenizer)
    model.save_pretrained(out)
    reloaded = AutoModel.from_pretrained(out, trust_remote_code=True, dtype=torch.float32).eval()
    embeds, im_mask = prompt_inputs(model, tokenizer, scene_image)
    with torch.no_grad():
        expected = model(inputs_embeds=embeds, im_mask=im_mask).logits
        got = reloaded(inputs_embeds=embeds, im_mask=im_mask).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_original_parameter_names_load_through_key_mapping(tmp_path: Path, tiny_checkpoint: Path, tiny_model):
    model, tokenizer = tiny_model
    renamed = {}
    for name, tensor in load_file(tiny_checkpoint / "model-00001-of-00001.safetensors").items():
        name = name.replace(".base_layer.weight", ".weight").replace("vit.vision_tower.", "vit.vision_tower.vision_model.")
        renamed[name] = tensor
    out = tmp_path / "original-names"
    write_model_files(out, model.config, tokenizer)
    save_file(renamed, out / "model.safetensors", metadata={"format": "pt"})
    loaded = AutoModel.from_pretrained(out, trust_remote_code=True, dtype=torch.float32, key_mapping=ORIGINAL_KEY_MAPPING)
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], tensor, rtol=0, atol=0)


def test_dtype_at_load_sets_weights_and_rotary_tables(tiny_checkpoint: Path):
    model, _ = load_model(tiny_checkpoint, dtype="float16")
    assert {p.dtype for p in model.parameters()} == {torch.float16}
    rotary = model.model.layers[0].attention.rotary_emb
    assert rotary.cos_cached.dtype == torch.float16
    torch.testing.assert_close(rotary.cos_cached[1, 0].float(), torch.cos(torch.tensor(1.0)), rtol=1e-3, atol=1e-3)


# ----- behaviour ---------------------------------------------------------------------------------


def test_plora_acts_only_at_image_positions():
    torch.manual_seed(0)
    layer = PLoRA(32, 48, config_for_scale("tiny", plora_rank=4, plora_alpha=4.0, plora_dropout=0.0))
    torch.nn.init.normal_(layer.Plora_B.weight)
    x = torch.randn(2, 7, 32)
    im_mask = torch.zeros(2, 7, dtype=torch.bool)
    im_mask[:, 2:5] = True
    changed = (layer(x, im_mask) - layer.base_layer(x)).abs().amax(-1) > 0
    assert torch.equal(changed, im_mask)
    assert torch.equal(layer(x, None), layer.base_layer(x))


def test_plora_leaves_the_text_before_the_image_untouched(tiny_model, scene_image):
    model, tokenizer = tiny_model
    embeds, im_mask = prompt_inputs(model, tokenizer, scene_image)
    with torch.no_grad():
        with_plora = model(inputs_embeds=embeds, im_mask=im_mask).logits
        without = model(inputs_embeds=embeds, im_mask=None).logits
    first_image = int(im_mask[0].nonzero()[0])
    torch.testing.assert_close(with_plora[:, :first_image], without[:, :first_image], rtol=0, atol=0)
    assert (with_plora[:, first_image:] - without[:, first_image:]).abs().max() > 1e-4


def test_eager_and_sdpa_agree_with_and_without_padding(tiny_checkpoint: Path, scene_image):
    eager, tokenizer = load_model(tiny_checkpoint, dtype="float32", attn_implementation="eager")
    sdpa, _ = load_model(tiny_checkpoint, dtype="float32", attn_implementation="sdpa")
    assert (eager.config._attn_implementation, sdpa.config._attn_implementation) == ("eager", "sdpa")
    embeds, im_mask = prompt_inputs(eager, tokenizer, scene_image)
    padding = torch.ones(embeds.shape[:2], dtype=torch.long)
    padding[:, :3] = 0
    with torch.no_grad():
        for mask in (None, padding):
            a = eager(inputs_embeds=embeds, im_mask=im_mask, attention_mask=mask).logits
            b = sdpa(inputs_embeds=embeds, im_mask=im_mask, attention_mask=mask).logits
            torch.testing.assert_close(a[:, 3:], b[:, 3:], rtol=1e-4, atol=1e-4)


def test_original_default_attention_is_eager(tiny_checkpoint: Path):
    model, _ = load_model(tiny_checkpoint)
    assert model.config._attn_implementation == "eager"


def test_generation_with_kv_cache_equals_generation_without(tiny_model, scene_image):
    model, tokenizer = tiny_model
    kwargs = dict(max_new_tokens=8, do_sample=False, repetition_penalty=1.0, image=scene_image)
    with torch.no_grad():
        cached, _ = model.chat(tokenizer, CAPTION_QUERY, use_cache=True, **kwargs)
        uncached, _ = model.chat(tokenizer, CAPTION_QUERY, use_cache=False, **kwargs)
    assert cached == uncached
    embeds, im_mask = prompt_inputs(model, tokenizer, scene_image)
    with torch.no_grad():
        a = model.generate(inputs_embeds=embeds, im_mask=im_mask, max_new_tokens=8, do_sample=False, use_cache=True)
        b = model.generate(inputs_embeds=embeds, im_mask=im_mask, max_new_tokens=8, do_sample=False, use_cache=False)
    assert torch.equal(a, b) and a.shape[1] == 8


def test_chat_keeps_the_original_call_shape(tiny_model, scene_image):
    model, tokenizer = tiny_model
    with torch.no_grad():
        response, history = model.chat(tokenizer, query=QUERY, image=scene_image, history=[], max_new_tokens=4, do_sample=False)
        text_only, _ = model.chat(tokenizer, "hello", history=history, max_new_tokens=4, do_sample=False)
    assert isinstance(response, str) and isinstance(text_only, str)
    assert history == [(QUERY, response)]


@pytest.mark.parametrize("quantization, layer_class", [("int8", "Linear8bitLt"), ("nf4", "Linear4bit")])
def test_bitsandbytes_quantizes_base_weights_and_keeps_plora(tiny_checkpoint: Path, quantization, layer_class, scene_image):
    model, tokenizer = load_model(
        tiny_checkpoint, dtype="float16", quantization_config=quantization_config(quantization, torch.float16)
    )
    wqkv = model.model.layers[0].attention.wqkv
    assert type(wqkv).__name__ == "PLoRA"
    assert type(wqkv.base_layer).__name__ == layer_class
    assert model.output.weight.dtype == torch.float16  # the output head stays unquantized
    embeds, im_mask = prompt_inputs(model, tokenizer, scene_image)
    with torch.no_grad():
        with_plora = model(inputs_embeds=embeds, im_mask=im_mask).logits
        without = model(inputs_embeds=embeds, im_mask=None).logits
    assert torch.isfinite(with_plora).all()
    assert (with_plora - without).abs().max() > 1e-3


# ----- argument checks ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, error, words",
    [
        (dict(scale="huge"), ValueError, "Unknown scale 'huge'"),
        (dict(dtype="float8"), ValueError, "Unsupported dtype 'float8'"),
        (dict(attn_implementation="flash_attention_9"), ValueError, "Unsupported attn_implementation"),
    ],
)
def test_bad_loading_arguments_fail_clearly(kwargs, error, words):
    with pytest.raises(error, match=words):
        load_model(None, **kwargs)


def test_missing_checkpoint_path_fails_clearly(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="No checkpoint at"):
        load_model(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        load_model(tmp_path)


def test_bad_images_fail_clearly(tiny_model, tmp_path: Path):
    model, _ = tiny_model
    size = model.config.image_size
    with pytest.raises(ValueError, match="mode 'CMYK' is not supported"):
        model.encode_img(Image.new("CMYK", (size, size)))
    with pytest.raises(ValueError, match=rf"shape \(3, {size}, {size}\)"):
        model.encode_img(torch.zeros(3, size + 14, size))
    with pytest.raises(ValueError, match="at least 14 px"):
        model.encode_img(Image.new("RGB", (8, 8)))
    with pytest.raises(FileNotFoundError, match="No image file"):
        model.encode_img(str(tmp_path / "missing.png"))
    with pytest.raises(ValueError, match="multiple of the patch size"):
        model.encode_img(Image.new("RGB", (size, size)), image_size=100)


def test_placeholder_count_must_match_images(tiny_model, scene_image):
    model, tokenizer = tiny_model
    with pytest.raises(ValueError, match="2 <ImageHere> placeholder"):
        model.chat(tokenizer, "<ImageHere><ImageHere>Describe.", image=scene_image, max_new_tokens=2)


def test_config_rejects_inconsistent_heads():
    with pytest.raises(ValueError, match="num_key_value_heads=3"):
        config_for_scale("tiny", num_key_value_heads=3)


def test_a_larger_image_gives_more_image_tokens(tiny_model, scene_image):
    model, _ = tiny_model
    tokens = model.encode_img([scene_image], image_size=2 * model.config.image_size).shape[1]
    assert tokens == 4 * model.config.image_tokens


def test_load_model_pins_the_tokenizer_to_the_same_revision(monkeypatch: pytest.MonkeyPatch):
    from xcomp_lab.model import loading

    calls: dict[str, dict] = {}

    class Recorder:
        def __init__(self, name: str) -> None:
            self.name = name

        def from_pretrained(self, path, **kwargs):
            calls[self.name] = kwargs
            return torch.nn.Linear(1, 1)

    monkeypatch.setattr(loading, "AutoModel", Recorder("model"))
    monkeypatch.setattr(loading, "AutoTokenizer", Recorder("tokenizer"))
    loading.load_model("some/hub-id", revision="0123abc")
    assert calls["model"]["revision"] == calls["tokenizer"]["revision"] == "0123abc"
    loading.load_model("some/hub-id")
    assert "revision" not in calls["tokenizer"]


def test_a_truncated_image_file_is_named(tiny_model, tmp_path: Path, scene_image):
    model, tokenizer = tiny_model
    whole = tmp_path / "scene.png"
    scene_image.save(whole)
    cut = tmp_path / "cut.png"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size * 2 // 3])
    named = rf"Cannot read the image '{re.escape(str(cut))}': image file is truncated"
    with pytest.raises(OSError, match=rf"{named}.*The file is damaged or was cut short .*save or download it again"):
        model.chat(tokenizer, QUERY, image=str(cut), max_new_tokens=2)
    with pytest.raises(OSError, match=named):
        model.encode_img(Image.open(cut))


@pytest.mark.parametrize("kwargs, words", [
    (dict(image=[]), r"image=\[\] holds no image; pass an image \(a path, a PIL image or a tensor\), a list of them, "
                     r"or None"),
    (dict(image=()), r"image=\(\) holds no image"),
    (dict(query=None), r"query=None; pass the question as a string"),
    (dict(query=["Describe."]), r"query=\['Describe.'\]; pass the question as a string"),
    (dict(max_new_tokens=None), r"max_new_tokens=None; it must be an integer of at least 1"),
    (dict(image_size=0), r"image_size=0; pass None for the model's own 112 px, or a positive multiple of the 14 px"),
    (dict(image_size=-112), r"image_size=-112; pass None for the model's own"),
    (dict(image_size=112.0), r"image_size=112.0; pass None for the model's own"),
])
def test_bad_chat_arguments_fail_clearly(tiny_model, scene_image, kwargs, words):
    model, tokenizer = tiny_model
    call = {**dict(query=QUERY, image=scene_image, max_new_tokens=2), **kwargs}
    with pytest.raises(ValueError, match=words):
        model.chat(tokenizer, **call)
