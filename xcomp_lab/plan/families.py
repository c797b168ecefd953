"""The architectures the planner replays, by the configuration's `model_type`, and where each one's parts sit.

The replay runs any model's own transformers code, so a family only says what the replay cannot read from the
code: which auto class builds it (LLMs `AutoModelForCausalLM`, VLMs `AutoModelForImageTextToText`, as their model
cards load them), where the vision encoder and the decoder layers are (to name the phase and the part a peak is
in), and the published model it has been checked on. Adding an architecture is adding a line here and a tiny test.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from xcomp_lab.core.checks import check_choice


@dataclass(frozen=True)
class Family:
    """One architecture the planner knows."""

    model_type: str
    kind: str  # "llm" or "vlm"
    example: str  # the published model it is validated on
    layers: str  # attribute path of the decoder layers in the built model
    vision: str | None = None  # attribute path of the vision encoder

    @property
    def is_vlm(self) -> bool:
        return self.kind == "vlm"


FAMILIES: dict[str, Family] = {f.model_type: f for f in (
    Family("llama", "llm", "meta-llama/Meta-Llama-3-8B", "model.layers"),
    Family("qwen2", "llm", "Qwen/Qwen2.5-7B-Instruct", "model.layers"),
    Family("mistral", "llm", "mistralai/Mistral-7B-v0.3", "model.layers"),
    Family("gemma2", "llm", "google/gemma-2-9b", "model.layers"),
    Family("phi3", "llm", "microsoft/Phi-3-mini-4k-instruct", "model.layers"),
    Family("qwen2_vl", "vlm", "Qwen/Qwen2-VL-7B-Instruct", "model.language_model.layers", "model.visual"),
    Family("llava", "vlm", "llava-hf/llava-1.5-7b-hf", "model.language_model.layers", "model.vision_tower"),
    Family("idefics3", "vlm", "HuggingFaceM4/Idefics3-8B-Llama3", "model.text_model.layers", "model.vision_model"),
)}


def family_of(config: Any) -> Family:
    """The family of a configuration, or a ValueError naming the architectures the planner knows."""
    model_type = getattr(config, "model_type", None)
    check_choice("model_type", model_type, list(FAMILIES),
                 f"the planner replays these architectures ({', '.join(f.example for f in FAMILIES.values())}); "
                 "another one needs a line in xcomp_lab.plan.families and a tiny test")
    return FAMILIES[model_type]
