"""The original model at any of its scales on PyTorch's meta device, built from a checkpoint's own remote code.

Shapes without storage: counting the full 7B-VL model's parameters and buffers costs nothing. The classes are
imported from the checkpoint folder as transformers imports them for `trust_remote_code=True`; CLIP, which the
original's constructor loads with `from_pretrained`, is built from its configuration instead (no weights are read
on the meta device). Runs in the original's environment (transformers 4.33.2).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any
from unittest import mock

import torch

from xcomp_lab.model.original import AUTO_MAP, MODEL_CLASS, clip_config, original_config


def original_on_meta(checkpoint: str | os.PathLike, scale: str = "full") -> Any:
    """The original InternLMXComposer2ForCausalLM at `scale` on the meta device, from `checkpoint`'s code files."""
    from transformers import CLIPVisionConfig, CLIPVisionModel
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    folder = Path(checkpoint)
    config_class = get_class_from_dynamic_module(AUTO_MAP["AutoConfig"], folder)
    model_class = get_class_from_dynamic_module(MODEL_CLASS, folder)
    vision = CLIPVisionConfig(**clip_config(scale)["vision_config"])
    with mock.patch.object(CLIPVisionModel, "from_pretrained", lambda *_, **__: CLIPVisionModel(vision)), \
            torch.device("meta"):
        return model_class(config_class(**original_config(scale)))
