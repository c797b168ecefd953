"""Notebook 02's helpers on the original's own code, small checkpoint, CPU; run by tests/test_original_precision.py
in .venv-original (transformers 4.33.2):

    PYTHONPATH=<repository> .venv-original/bin/python tests/original_precision_run.py CODE_DIR IMAGE REPORT_JSON

Writes REPORT_JSON with what each helper returned on the original loaded in BF16 (the step without autocast):
`file_chat` (the quick start's call with an image file), `reference` (captions and prefill logits through the
original's own prompt), `speed` (`run.speed.generation_speed` on its own generate), `host` (one load in a fresh
process through `compare_loads`, which must pass `torch_dtype`).
"""

from __future__ import annotations

import json
import sys

from xcomp_lab.model.original import build_original_checkpoint
from xcomp_lab.original.environment import prepare_transformers

NEW_TOKENS = 2


def main(code_dir: str, image: str, report_path: str) -> None:
    """Build or reuse the small checkpoint, run the helpers on its BF16 load, write the report."""
    built = build_original_checkpoint(code_dir, "small")
    prepare_transformers(built.environment())

    from PIL import Image

    from xcomp_lab.course.step_table import STEPS
    from xcomp_lab.lessons.host_memory import compare_loads
    from xcomp_lab.lessons.precision import file_chat_line, fp32_reference
    from xcomp_lab.original.prompts import generate_exactly, prompt_batch
    from xcomp_lab.original.steps import get_original_step, pretrained_loader
    from xcomp_lab.run.speed import generation_speed

    picture = Image.open(image).convert("RGB")
    model, tokenizer = pretrained_loader(built.path, "cpu")(get_original_step("bf16"))
    report: dict = {"dtype": str(model.dtype)}
    report["file_chat"] = file_chat_line(STEPS["bf16"], model, tokenizer, picture, "cpu")
    reference = fp32_reference(model, tokenizer, n=1, n_logits=1, max_new_tokens=NEW_TOKENS)
    report["reference"] = {"captions": len(reference.captions), "logits_shape": list(reference.logits.shape),
                           "finite": bool(reference.logits.isfinite().all())}
    speed = generation_speed(model, tokenizer, [picture], device="cpu", new_tokens=NEW_TOKENS, repeats=1)
    report["speed"] = {"emulated": speed.emulated_products, "prompt_tokens": speed.prompt_tokens,
                       "new_tokens": speed.new_tokens, "text": str(speed)}
    embeds, im_mask = prompt_batch(model, tokenizer, [picture], "Describe the image in one sentence.")
    report["generated"] = list(generate_exactly(model, tokenizer, embeds, im_mask, NEW_TOKENS).shape)
    del model
    host = compare_loads(built.path, {"float16": {"dtype": "float16", "attn_implementation": "eager"}}, repeats=1)
    report["host"] = {"rise": host.rise("float16"), "held": host.held("float16")}
    with open(report_path, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main(*sys.argv[1:4])
