"""The course's steps as data: each is one way of loading and calling the model, from the FP32 quick start to NF4.

Imports nothing but the standard library, so every environment can read the same table: the course's
(`xcomp_lab.course.steps` loads and runs a step with the replica) and the original remote code's
(`xcomp_lab.original.steps`, transformers 4.33.2).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Step:
    """How one step loads and calls the model."""

    name: str
    title: str
    dtype: str = "float32"  # dtype at load (`from_pretrained(dtype=...)`)
    cast: str | None = None  # dtype set after loading, as `.half()` does
    quantization: str = "none"  # "none" | "int8" | "nf4"
    grad: str = "no_grad"  # the quick start's torch.set_grad_enabled(False)
    use_autocast: bool = True  # the quick start's torch.cuda.amp.autocast()
    attn_implementation: str | None = None  # None: the step follows the notebook parameter

    def describe(self) -> str:
        load = f"dtype={self.dtype} at load" + (f", then .to({self.cast})" if self.cast else "")
        quant = f", {self.quantization} (bitsandbytes)" if self.quantization != "none" else ""
        grad = {"no_grad": "no_grad", "inference_mode": "inference_mode", "enabled": "gradients enabled"}[self.grad]
        amp = " + autocast" if self.use_autocast else ""
        return f"{self.title}: {load}{quant}; {grad}{amp}"


STEPS: dict[str, Step] = {
    s.name: s
    for s in (
        Step("fp32-quickstart", "FP32, the official quick start"),
        Step("fp32-no-autocast", "FP32 without autocast", use_autocast=False),
        Step("fp32-inference-mode", "FP32, autocast inside inference_mode", grad="inference_mode"),
        Step("fp32-grad-enabled", "FP32, no_grad forgotten", grad="enabled", use_autocast=False),
        Step("fp16-half", "FP32 load, then .half()", cast="float16"),
        Step("fp16", "FP16 at load", dtype="float16"),
        Step("bf16", "BF16 at load", dtype="bfloat16", use_autocast=False, grad="inference_mode"),
        Step("fp16-sdpa", "FP16, sdpa attention", dtype="float16", attn_implementation="sdpa"),
        Step("int8", "INT8 (LLM.int8())", dtype="float16", quantization="int8", use_autocast=False),
        Step("nf4", "NF4, double quantization", dtype="float16", quantization="nf4", use_autocast=False),
    )
}


def get_step(name: str) -> Step:
    if name not in STEPS:
        raise ValueError(f"Unknown step {name!r}; the course's steps are {list(STEPS)}.")
    return STEPS[name]
