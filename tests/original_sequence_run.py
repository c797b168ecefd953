"""Notebook 04's helpers on the original's own code, small checkpoint, CPU; run by tests/test_original_sequence.py in
.venv-original (transformers 4.33.2):

    PYTHONPATH=<repository> .venv-original/bin/python tests/original_sequence_run.py CODE_DIR IMAGE REPORT_JSON

Writes REPORT_JSON with what they returned on the FP32 model: its `ModelShape` and prompts, the attention it has,
one prefill-only `run_step` of two images in one prompt (`model.chat`) and one of two prompts at once (the
original's `generate`), and `measure_peak_terms` at a short prompt. (`attention_kernels`, one more prefill, is left
to the notebook's run: the original's small edition prints its kernels.)
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path

from xcomp_lab.model.original import build_original_checkpoint


def main(code_dir: str, image: str, report_path: str) -> None:
    """Build or reuse the small checkpoint, run the helpers, write the report."""
    built = build_original_checkpoint(code_dir, "small")
    from xcomp_lab.course.notebook import start

    params = start(scale="small", device="cpu", model_name_or_path=str(built.path), max_new_tokens=1,
                   results_path=str(Path(report_path).with_name("results.jsonl")))
    from PIL import Image

    from xcomp_lab.course.steps import STEPS, load_for_step, run_step
    from xcomp_lab.lessons.sequence import (
        attention_code,
        attention_kind,
        attention_refusal,
        measure_peak_terms,
        model_shape,
        prompt_shapes,
        scale_shapes,
    )

    step = STEPS["fp32-no-autocast"]
    model, tokenizer = load_for_step(step, params)
    picture = Image.open(image).convert("RGB")
    shape = model_shape(model)
    report: dict = {"shape": dataclasses.asdict(shape), "kind": attention_kind(model), "code": attention_code(model),
                    "refusal": attention_refusal(STEPS["fp16-sdpa"], params),
                    "scales": {name: dataclasses.asdict(s) for name, s in scale_shapes(model).items()}}
    runs = {}
    for name, batch, per_prompt in (("two-images", 1, 2), ("two-prompts", 2, 1)):
        p = dataclasses.replace(params, batch_size=batch)
        run, record = run_step(dataclasses.replace(step, name=name), model, tokenizer, [picture] * 2, p, None,
                               images_per_prompt=per_prompt)
        runs[name] = {"ok": run.ok, "captions": run.captions, "prompt_tokens": run.prompt_tokens,
                      "new_tokens": run.new_tokens, "kv_cache_bytes": run.memory.kv_cache_bytes,
                      "kv_storage_bytes": record["extra"]["kv_storage_bytes"],
                      "images_per_prompt": record["extra"]["images_per_prompt"]}
    report["runs"] = runs
    text_tokens = runs["two-prompts"]["prompt_tokens"] - 1225
    report["text_tokens"] = text_tokens
    report["prompts"] = [[s.images, s.tokens(shape, text_tokens)] for s in prompt_shapes(shape, text_tokens)]
    terms = measure_peak_terms(model, 300, device="cpu", image_tokens=100)
    report["terms"] = dataclasses.asdict(terms)
    Path(report_path).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit(f"usage: {sys.argv[0]} CODE_DIR IMAGE REPORT_JSON; given: {sys.argv[1:]}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main(*sys.argv[1:])
