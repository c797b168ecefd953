"""Run the original model's remote code on the small original-code checkpoint; tests/test_original_code.py runs it.

    PYTHONPATH=<repository> .venv-original/bin/python tests/original_code_run.py CODE_DIR IMAGE REPORT_JSON [AUTOCAST]

Runs in the original's environment (transformers 4.33.2, `make venv-original`): builds or reuses the small
checkpoint with `xcomp_lab.model.original` (which imports no transformers), sets its hub cache and offline mode
before transformers is imported, then writes REPORT_JSON (stdout carries the remote code's own prints):

- `files`: the build's files (the checkpoint and the hub cache beside it);
- `full_meta`: every parameter of the original at full size, built from the remote code on the meta device
  (there CLIP is built from its config: no weights can be loaded onto the meta device);
- `loaded`, `loading_info`, `checkpoint`: the small model's parameters after `from_pretrained` and the tensors in
  the checkpoint's shards;
- `caption`: `model.chat` as the quick start calls it, after `torch.set_grad_enabled(False)` and `.eval()`.
  AUTOCAST (`none`, the default, `bfloat16` or `float16`) wraps it in `torch.autocast("cpu", dtype=...)`, the CPU's
  stand-in for the quick start's `torch.cuda.amp.autocast()`. Without it the call runs in FP32: this project's
  CPU (AVX2, no BF16/FP16 matrix instructions) took about 6x longer under autocast (7 s in FP32, 38 s in float16,
  45 s in bfloat16 on 2 threads), too long for the test suite;
- `int8`: the same chat after `load_in_8bit` through transformers' BitsAndBytesConfig, and the error it raises;
- `seconds`: the time of each phase.

transformers 4.33.2 counts bitsandbytes as available only when CUDA is (`is_bitsandbytes_available()` checks
`torch.cuda.is_available()`), while bitsandbytes 0.50.2 runs on the CPU: the script lifts that one check, before
transformers' modeling code is imported, so that loading reaches the layer replacement a GPU user's load makes.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import time
from pathlib import Path
from typing import Any
from unittest import mock

from xcomp_lab.model.original import AUTO_MAP, MODEL_CLASS, build_original_checkpoint, clip_config, original_config

QUERY = "<ImageHere>Describe the image in one sentence."
MAX_NEW_TOKENS = 8
AUTOCAST_CHOICES = ("none", "bfloat16", "float16")


def main(code_dir: str, image: str, report_path: str, autocast: str = "none") -> None:
    """Build or reuse the small checkpoint, run the checks, write the report."""
    if autocast not in AUTOCAST_CHOICES:
        raise ValueError(f"AUTOCAST={autocast!r}; pass one of {AUTOCAST_CHOICES}.")
    seconds: dict[str, float] = {}
    report: dict[str, Any] = {"seconds": seconds}
    clock = time.perf_counter()

    def lap(phase: str) -> None:
        nonlocal clock
        seconds[phase] = round(time.perf_counter() - clock, 2)
        clock = time.perf_counter()

    built = build_original_checkpoint(code_dir, "small")
    report["files"] = sorted(os.fspath(path.relative_to(built.root)) for path in built.root.rglob("*")
                             if path.is_file() and "modules" not in path.relative_to(built.root).parts)
    os.environ.update(built.environment())
    lap("build_or_reuse")

    import transformers.utils
    import transformers.utils.import_utils

    def bitsandbytes_installed() -> bool:
        return importlib.util.find_spec("bitsandbytes") is not None

    transformers.utils.is_bitsandbytes_available = bitsandbytes_installed
    transformers.utils.import_utils.is_bitsandbytes_available = bitsandbytes_installed

    import torch
    from safetensors import safe_open
    from transformers import AutoModel, AutoTokenizer, BitsAndBytesConfig, CLIPVisionConfig, CLIPVisionModel
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    report["versions"] = {"torch": torch.__version__, "transformers": transformers.__version__}
    torch.set_grad_enabled(False)
    lap("import")

    config_class = get_class_from_dynamic_module(AUTO_MAP["AutoConfig"], built.path)
    model_class = get_class_from_dynamic_module(MODEL_CLASS, built.path)
    vision = CLIPVisionConfig(**clip_config("full")["vision_config"])
    with mock.patch.object(CLIPVisionModel, "from_pretrained", lambda *_, **__: CLIPVisionModel(vision)), \
            torch.device("meta"):
        full = model_class(config_class(**original_config("full")))
    report["full_meta"] = {name: list(tensor.shape) for name, tensor in full.state_dict().items()}
    del full
    lap("full_meta")

    in_files: dict[str, list[int]] = {}
    weight_map = json.loads((built.path / "model.safetensors.index.json").read_text())["weight_map"]
    for shard in sorted(set(weight_map.values())):
        with safe_open(built.path / shard, framework="pt") as handle:
            in_files.update({name: list(handle.get_slice(name).get_shape()) for name in handle.keys()})
    report["checkpoint"] = {"path": os.fspath(built.path), "tensors": in_files}

    model, info = AutoModel.from_pretrained(built.path, trust_remote_code=True, torch_dtype=torch.float32,
                                            output_loading_info=True)
    tokenizer = AutoTokenizer.from_pretrained(built.path, trust_remote_code=True)
    model = model.eval()
    report["loading_info"] = {key: sorted(value) for key, value in info.items()}
    report["loaded"] = {name: list(tensor.shape) for name, tensor in model.state_dict().items()}
    report["loaded_dtypes"] = sorted({str(parameter.dtype) for parameter in model.parameters()})
    report["tokenizer"] = {"class": type(tokenizer).__name__, "pieces": tokenizer.vocab_size,
                           "im_end": tokenizer.convert_tokens_to_ids(["[UNUSED_TOKEN_145]"])[0]}
    lap("load")

    with torch.autocast("cpu", dtype=getattr(torch, autocast, None), enabled=autocast != "none"):
        response, history = model.chat(tokenizer, QUERY, image=image, history=[], do_sample=False,
                                       max_new_tokens=MAX_NEW_TOKENS)
    report["caption"] = {"response": response, "history": history, "autocast": autocast}
    del model
    lap("caption")

    quantized = AutoModel.from_pretrained(built.path, trust_remote_code=True, torch_dtype=torch.float32,
                                          quantization_config=BitsAndBytesConfig(load_in_8bit=True),
                                          device_map={"": "cpu"})
    wqkv = quantized.model.layers[0].attention.wqkv
    report["int8"] = {"wqkv_class": f"{type(wqkv).__module__}.{type(wqkv).__name__}",
                      "wqkv_children": sorted(name for name, _ in wqkv.named_children())}
    try:
        quantized.chat(tokenizer, QUERY, image=image, history=[], do_sample=False, max_new_tokens=MAX_NEW_TOKENS)
    except TypeError as error:
        report["int8"]["error"] = f"{type(error).__name__}: {error}"
    lap("int8")
    Path(report_path).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    if len(sys.argv) not in (4, 5):
        sys.exit(f"usage: {sys.argv[0]} CODE_DIR IMAGE REPORT_JSON [{'|'.join(AUTOCAST_CHOICES)}]; "
                 f"given: {sys.argv[1:]}")
    main(*sys.argv[1:])
