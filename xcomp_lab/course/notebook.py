"""What every notebook does in its first cells and around each measurement, kept out of the notebooks.

`start()` checks the papermill parameters, seeds, quiets progress bars and prints the environment (for a
checkpoint of the original model's own code it first prepares transformers 4.33.2, `original.environment`, and
prints the digest of the code that runs and the versions: run it before anything imports transformers);
`sample_images()` gives the course's captioning images with their true captions; `record()` appends a run
to the results file and prints the one line a learner reads.
"""

from __future__ import annotations

import gc
import json
import logging
import platform
import warnings
from typing import Any

import torch
from PIL import Image

from xcomp_lab.core.resources import package_file
from xcomp_lab.core.units import fmt_bytes
from xcomp_lab.course.params import CourseParams, check_params
from xcomp_lab.course.results import append_result

SAMPLES = ("xcomp_lab.data", "samples")  # package data: the sample scenes and their true captions


def start(**parameters: Any) -> CourseParams:
    """Validate the notebook parameters, seed everything and print versions and the device."""
    params = check_params(**parameters)
    warnings.filterwarnings("ignore", message=".*repetition_penalty.*")
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    if params.original_code:  # transformers 4.33.2 and its hub client on today's torch, and chat()'s own top_p
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", message=".*`do_sample` is set to `False`.*")
        # CLIP built on the meta device inside the original's constructor under a device_map load: torch says each
        # copy into it is a no-op; the checkpoint's own vit.* tensors are loaded into the model right after.
        warnings.filterwarnings("ignore", message=".*copying from a non-meta parameter in the checkpoint.*")
    notes = prepare_original(params) if params.original_code else []
    import transformers

    # bitsandbytes logs (not warns) on every LLM.int8() product whose inputs are not FP16, e.g. the original's
    # FP32 activations under transformers' skip-modules recipe: hundreds of identical lines per caption
    logging.getLogger("bitsandbytes.autograd._functions").setLevel(logging.ERROR)
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    params.results_path.parent.mkdir(parents=True, exist_ok=True)
    # Everything imported so far lives for the whole notebook: keep it out of the collections that every
    # measurement runs to release memory (they would otherwise rescan it each time).
    gc.collect()
    gc.freeze()
    device = torch.cuda.get_device_name(0) if params.device == "cuda" else f"CPU ({platform.processor() or platform.machine()})"
    print(f"torch {torch.__version__} | transformers {transformers.__version__} | python {platform.python_version()}")
    print(f"device: {device}")
    if params.original_code:
        print(original_code_line(params, notes))
    return params


def prepare_original(params: CourseParams) -> list[str]:
    """Prepare this process for the original's code (its checkpoint's variables, transformers 4.33.2); the notes."""
    import sys

    from xcomp_lab.original.detect import checkpoint_environment
    from xcomp_lab.original.environment import (
        ORIGINAL_TRANSFORMERS,
        prepare_transformers,
    )

    if "transformers" in sys.modules:
        import transformers

        if transformers.__version__ != ORIGINAL_TRANSFORMERS:
            raise RuntimeError(
                f"{params.model_name_or_path} runs the original model's own code, which needs transformers "
                f"{ORIGINAL_TRANSFORMERS}, but this kernel has transformers {transformers.__version__}: run the "
                f"notebook in the original's environment (`make venv-original`, kernel 'xcomp-lab-original'; "
                f"`python -m xcomp_lab.tools.course --model-name-or-path ...` chooses it)."
            )
        return ["transformers already imported (4.33.2): variables not set again"]
    return prepare_transformers(checkpoint_environment(params.model_name_or_path))


def original_code_line(params: CourseParams, notes: list[str] | None = None) -> str:
    """Which code and versions run: the original's remote code files' digest, transformers, torch (and notes)."""
    from xcomp_lab.original.environment import versions
    from xcomp_lab.original.steps import code_digest

    found = versions()
    line = (f"model code: the original's own remote code in {params.model_name_or_path} (sha256 "
            f"{code_digest(params.model_name_or_path)}) | transformers {found['transformers']} | torch {found['torch']}"
            f" | einops {found['einops']} | torchvision {found['torchvision']}")
    return line + "".join(f"\n  environment: {note}" for note in notes or [])


def sample_images(n: int = 1) -> list[tuple[Image.Image, str]]:
    """The first `n` course images (xcomp_lab/data/samples/scene-*.png) with their true captions."""
    folder = package_file(*SAMPLES)
    examples = json.loads((folder / "scenes.json").read_text())["examples"]
    if not 1 <= n <= len(examples):
        raise ValueError(f"n={n}; the course ships {len(examples)} sample images, ask for 1 to {len(examples)}.")
    return [(Image.open((folder / e["file"]).open("rb")).convert("RGB"), e["caption"]) for e in examples[:n]]


def batch_of_images(params: CourseParams) -> list[Image.Image]:
    """`params.batch_size` images to caption together (the sample images, repeated if needed)."""
    images = [image for image, _ in sample_images(6)]
    return [images[i % len(images)] for i in range(params.batch_size)]


def chat_inputs(model: Any, image: Image.Image, params: CourseParams) -> dict[str, Any]:
    """The keyword arguments of `model.chat(tokenizer, query, **...)` for one image, greedy, for either code.

    The replica takes the PIL image and `image_size`. The original's `chat()` takes a file path or a preprocessed
    tensor: here `original.prompts.image_tensor`, what its `encode_img` makes from a file (FP32, 490 px), and
    no `image_size` (its generate would refuse the unknown argument).
    """
    common = {"max_new_tokens": params.max_new_tokens, "do_sample": False, "repetition_penalty": 1.0}
    if params.original_code:
        from xcomp_lab.original.prompts import image_tensor

        return {"image": image_tensor(model, image), **common}
    return {"image": image, "image_size": params.image_size, **common}


def image_grid(model: Any, params: CourseParams) -> tuple[int, int]:
    """(pixels per side the vision tower sees, patch size) for this model and `params.image_size`."""
    if params.original_code:
        embeddings = model.vit.vision_tower.vision_model.embeddings
        return int(model.config.img_size), int(embeddings.patch_size)
    return params.image_size or model.config.image_size, model.config.vision_config.patch_size


def record(params: CourseParams, record_: dict[str, Any]) -> dict[str, Any]:
    """Append a results record to the notebook's results file and print its one-line summary."""
    append_result(params.results_path, record_)
    print(summary_line(record_))
    return record_


def summary_line(r: dict[str, Any]) -> str:
    """`step: peak X of budget Y | weights W | KV K | activations A | OOM/fits` in binary units."""
    budget = f" of {fmt_bytes(r['budget_bytes'])} budget" if r.get("budget_bytes") else ""
    status = "OOM" if r["oom"] else "fits"
    return (
        f"{r['step']}: {status} | peak {fmt_bytes(r['peak_bytes'])}{budget} | weights {fmt_bytes(r['weights_bytes'])}"
        f" | KV cache {fmt_bytes(r['kv_cache_bytes'])} | activations {fmt_bytes(r['activations_bytes'])}"
    )
