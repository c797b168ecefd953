"""Notebooks 05, 06 and 07's lesson helpers on the original's own code, small checkpoint, CPU; run by
tests/test_original_lessons.py in .venv-original (transformers 4.33.2):

    PYTHONPATH=<repository> .venv-original/bin/python tests/original_lessons_run.py CODE_DIR IMAGE REPORT_JSON

Writes REPORT_JSON with what each helper returned: `forensics` (an FP32 chat without autocast read at decode step
1, and the timeline's phases), `plora` (PLoRA on and off on the original's own prompt), `device_map` (the full
original planned on two cards where accelerate cuts a vision layer). (`load_in_8bit`'s failure on the original is tests/test_original_code.py's; the helpers that print it,
`projection_classes` and `failure_line`, are tested in tests/test_quantization.py.)
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from xcomp_lab.model.original import build_original_checkpoint
from xcomp_lab.original.environment import prepare_transformers

MAX_NEW_TOKENS = 3


def main(code_dir: str, image: str, report_path: str) -> None:
    """Build or reuse the small checkpoint, run the helpers, write the report."""
    built = build_original_checkpoint(code_dir, "small")
    prepare_transformers(built.environment())

    from xcomp_lab.lessons.device_map import (
        cut_modules,
        original_meta_model,
        plan_original,
    )
    from xcomp_lab.lessons.forensics import original_chat_timeline
    from xcomp_lab.lessons.quantization import original_plora_check
    from xcomp_lab.original.steps import QUERY, get_original_step, pretrained_loader

    report: dict = {}
    model, tokenizer = pretrained_loader(built.path, "cpu")(get_original_step("fp32-no-autocast"))
    chat = original_chat_timeline(model, tokenizer, image, device="cpu", query=QUERY, max_new_tokens=MAX_NEW_TOKENS)
    first = chat.first_decode
    timeline = chat.timeline()
    report["forensics"] = {
        "caption": chat.caption, "prompt_tokens": chat.prompt_tokens, "new_tokens": chat.new_tokens,
        "image_tokens": int(chat.im_mask.sum()), "first": {k: getattr(first, k) for k in (
            "layers", "at_start_bytes", "cache_view_bytes", "cache_storage_bytes", "prefill_logits_bytes",
            "new_kv_bytes")},
        "lines": first.lines(timeline), "phases": [p.label for p in timeline.phases()],
        "highest": max(timeline.phases(), key=lambda p: p.highest_bytes).label,
        "kv_cache_bytes": chat.memory.kv_cache_bytes, "config": {
            k: getattr(model.config, k) for k in ("hidden_size", "num_attention_heads", "num_key_value_heads",
                                                   "vocab_size", "num_hidden_layers")},
    }
    check = original_plora_check(model, tokenizer, image, device="cpu", use_autocast=False)
    report["plora"] = {"acts": check.plora_acts, "verdict": check.verdict(), "quantization": check.quantization,
                       "first_image_position": check.as_loaded.first_image_position,
                       "first_difference": check.as_loaded.first_difference,
                       "image_tokens": check.as_loaded.image_tokens, "positions": check.as_loaded.positions}
    del model

    original = original_meta_model(built.path, "full", "float32")
    plan = plan_original(original, {0: "34.6GB", 1: "10GB"}, dtype="float32")
    report["device_map"] = {"no_split": list(original._no_split_modules), "describe": plan.describe(),
                            "cut_clip": cut_modules(original, plan.device_map, ["CLIPEncoderLayer"]),
                            "cut_declared": cut_modules(original, plan.device_map, original._no_split_modules)}

    Path(report_path).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit(f"usage: {sys.argv[0]} CODE_DIR IMAGE REPORT_JSON; given: {sys.argv[1:]}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main(*sys.argv[1:])
