"""The original remote code's memory on the small original-code checkpoint; tests/test_original_memory.py runs it.

    PYTHONPATH=<repository> .venv-original/bin/python tests/original_memory_run.py CODE_DIR IMAGE REPORT_JSON

Runs in the original's environment (transformers 4.33.2, `make venv-original`). Loads the small checkpoint (built
or reused by `xcomp_lab.model.original`) as a user does, then makes two calls of `model.chat` with the course's
measurement (`xcomp_lab.memory.measure`, no budget, every allocation sampled and kept, phases marked as
`xcomp_lab.original.steps` marks them): the FP32 load without
autocast ("fp32-no-autocast"), then the same model after `.half()` under autocast ("fp16-half"). Each makes two
new tokens: the prefill and the first decode step, where the original's fitting peaks fall at full size.
FP16 products run in FP32 (`xcomp_lab.original.matmul`, the same tensors, FP32 speed). REPORT_JSON holds, per
step: the peak, the peak of each phase ("vision", "prefill", "decode-1"), the phase of the peak, the prompt's
length, the decoder calls, the weights; and `text_ids`, the token ids of the prompt's text parts as the original
tokenizer made them (what `model.tok_embeddings` received before the decoder's first call), so that the replica
can be run on the very same prompt.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

STEPS = ("fp32-no-autocast", "fp16-half")
MAX_NEW_TOKENS = 2


def phase_peaks(timeline: Any) -> dict[str, int]:
    """The highest allocation sampled in each phase of a measured call's timeline."""
    peaks: dict[str, int] = {}
    phase = "start"
    for _, allocated, label in timeline:
        if label and label not in ("start", "end"):
            phase = label
        peaks[phase] = max(peaks.get(phase, 0), allocated)
    return peaks


def main(code_dir: str, image: str, report_path: str) -> None:
    from xcomp_lab.model.original import build_original_checkpoint
    from xcomp_lab.original.environment import prepare_transformers

    built = build_original_checkpoint(code_dir, "small")
    prepare_transformers(built.environment())
    import torch

    from xcomp_lab.memory.measure import measure
    from xcomp_lab.original.matmul import FloatMatmul
    from xcomp_lab.original.steps import ORIGINAL_STEPS, QUERY, pretrained_loader
    from xcomp_lab.run.modes import autocast, grad_mode

    torch.set_grad_enabled(False)  # the quick start's first line
    model, tokenizer = pretrained_loader(built.path, "cpu")(ORIGINAL_STEPS[STEPS[0]])
    seen: dict[str, Any] = {}

    def on_vision(*_: Any) -> None:
        seen["meter"].mark("vision")

    def on_decoder(_module: Any, _args: tuple, kwargs: dict) -> None:
        seen["calls"] += 1
        if seen["calls"] == 1:
            seen["prompt_tokens"] = int(kwargs["inputs_embeds"].shape[1])
        seen["meter"].mark("prefill" if seen["calls"] == 1 else f"decode-{seen['calls'] - 1}")

    def on_embedding(_module: Any, args: tuple) -> None:
        if seen["calls"] == 0:
            seen["text_ids"].append(args[0][0].tolist())

    handles = [model.vit.register_forward_pre_hook(on_vision),
               model.model.register_forward_pre_hook(on_decoder, with_kwargs=True),
               model.model.tok_embeddings.register_forward_pre_hook(on_embedding)]
    report: dict[str, Any] = {}
    for name in STEPS:
        step = ORIGINAL_STEPS[name].step
        if step.cast is not None:
            model = model.to(getattr(torch, step.cast))
        seen.update(calls=0, text_ids=[])
        with FloatMatmul(), measure("cpu", model=model, label=name, sample_every=1, max_samples=10**8) as meter:
            seen["meter"] = meter
            with grad_mode(step.grad), autocast("cpu", step.use_autocast):
                model.chat(tokenizer, QUERY, image=image, history=[], do_sample=False, max_new_tokens=MAX_NEW_TOKENS)
        seen.pop("meter")
        memory = meter.result
        peaks = phase_peaks(memory.timeline)
        report[name] = {"peak_bytes": memory.peak_bytes, "weights_bytes": memory.weights_bytes, "phase_peaks": peaks,
                        "peak_phase": max(peaks, key=peaks.get), "prompt_tokens": seen["prompt_tokens"],
                        "decoder_calls": seen["calls"], "text_ids": seen["text_ids"]}
    for handle in handles:
        handle.remove()
    report["versions"] = {"torch": torch.__version__, "transformers": sys.modules["transformers"].__version__}
    Path(report_path).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit(f"usage: {sys.argv[0]} CODE_DIR IMAGE REPORT_JSON; given: {sys.argv[1:]}")
    main(*sys.argv[1:])
