"""The original remote code at full size on a GPU: DESIGN.md section 6's rows measured through `model.chat`.

    # here, once: the model's files without weights, and the wheels the GPU image lacks (git-ignored .cache/)
    python -m xcomp_lab.tools.original_gpu_run --prepare --code-dir ../shared/reference/internlm-xcomposer2-vl-7b
    # on the GPU machine (carry .cache/original-gpu):
    python3 -m pip install -q --no-index --no-deps --target /tmp/original .cache/original-gpu/wheels/*.whl
    PYTHONPATH=/tmp/original:$PWD python3 -m xcomp_lab.tools.original_gpu_run --out $OUT/original-h200

`--prepare` writes `.cache/original-gpu/files/full/internlm-xcomposer2-vl-7b` (config.json, the five remote-code files,
tokenizer.model: `xcomp_lab.model.original.write_model_files`) and downloads the CPython 3.12 wheels of what the
original needs and the device image (Python 3.12, torch 2.11 + CUDA 13, transformers 5, tokenizers 0.2x, einops,
sentencepiece, torchvision) lacks or has too new: transformers 4.33.2, huggingface_hub 0.36.2, accelerate 0.23.0
and bitsandbytes 0.50.2 (its CPU and CUDA 13.0 libraries only). Installed with `--target` into a folder put first
on PYTHONPATH, they shadow the image's transformers; `xcomp_lab.original.environment` hides the image's
tokenizers, which transformers 4.33.2 refuses (0.13.3 has no wheel for Python 3.12).

On the GPU the model is built directly on the device with random weights (`xcomp_lab.original.steps.direct_loader`:
the same parameters and buffers `from_pretrained` leaves, in seconds instead of writing and reading 17 GB of
shards), then `xcomp_lab.original.steps.run_steps` captions the first sample scene with `model.chat` as the
quick start calls it (greedy, `--max-new-tokens` 16) under the course's 48 GB budget and, for the quick start,
also under DESIGN.md's 48 x 10^9 bytes. Writes `results.jsonl` (the course's records) and `env.json` (GPU,
versions, the prompt) into `--out`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from xcomp_lab.core.resources import package_file, repository_root
from xcomp_lab.model.original import (
    CHECKPOINT_NAME,
    SCALES,
    check_code_dir,
    write_model_files,
)

GPU_STEPS = ("fp32-quickstart", "fp32-quickstart-48e9", "fp32-no-autocast", "fp32-inference-mode",
             "fp32-grad-enabled", "fp16-half", "fp16-half-no-autocast", "fp16", "int8-plora", "nf4-plora")
WHEELS = ("transformers==4.33.2", "huggingface_hub==0.36.2", "accelerate==0.23.0", "bitsandbytes==0.50.2")
KEEP_BNB_LIBRARIES = ("libbitsandbytes_cpu.so", "libbitsandbytes_cuda130.so")
SAMPLE = ("xcomp_lab.data", "samples", "scene-0.png")


def prepared_dir() -> Path:
    """Where `--prepare` puts the files and wheels (git-ignored: .cache/ of the checkout)."""
    return repository_root() / ".cache" / "original-gpu"


def prepare(code_dir: Path, target: Path, scale: str) -> None:
    """Write the model files of `scale` (no weights) and download the wheels into `target`."""
    files = target / "files" / scale / CHECKPOINT_NAME
    if files.exists():
        shutil.rmtree(files)
    write_model_files(files, check_code_dir(code_dir), scale)
    wheels = target / "wheels"
    shutil.rmtree(wheels, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                    "--python-version", "3.12", "--implementation", "cp", "--platform", "manylinux_2_24_x86_64",
                    "--platform", "manylinux_2_17_x86_64", "--platform", "manylinux2014_x86_64",
                    "--platform", "any", "-d", os.fspath(wheels), *WHEELS], check=True)
    for wheel in wheels.glob("bitsandbytes-*.whl"):
        _trim_bitsandbytes(wheel)
    print(f"prepared {target}: {sorted(p.name for p in wheels.iterdir())}")


def _trim_bitsandbytes(wheel: Path) -> None:
    """Keep only the CPU and CUDA 13.0 libraries of the bitsandbytes wheel (one per CUDA version: 43 MB)."""
    trimmed = wheel.with_suffix(".trimmed")
    with zipfile.ZipFile(wheel) as source, zipfile.ZipFile(trimmed, "w", zipfile.ZIP_DEFLATED) as out:
        for item in source.infolist():
            name = Path(item.filename).name
            if name.startswith("libbitsandbytes_") and name not in KEEP_BNB_LIBRARIES:
                continue
            out.writestr(item, source.read(item))
    trimmed.replace(wheel)


def run(files: Path, out: Path, steps: list[str], max_new_tokens: int, device: str, scale: str) -> None:
    """Measure `steps` on `device`; records into out/results.jsonl, the machine and versions into out/env.json.

    Any device runs it (a CPU with `scale="small"` checks the path before a GPU is asked for); on a CPU the
    products of FP16 tensors are computed in FP32 as `xcomp_lab.original.matmul` says.
    """
    from xcomp_lab.original.environment import prepare_transformers

    home = Path(tempfile.mkdtemp(prefix="hf-home-"))
    notes = prepare_transformers({"HF_HOME": os.fspath(home), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    import torch

    from xcomp_lab.original.environment import versions
    from xcomp_lab.original.steps import direct_loader, run_steps

    torch.set_grad_enabled(False)  # the quick start's first line
    out.mkdir(parents=True, exist_ok=True)
    if device.startswith("cuda"):
        properties = torch.cuda.get_device_properties(device)
        machine = {"gpu": properties.name, "total_memory_bytes": properties.total_memory}
    else:
        machine = {"gpu": None}
    env = {**machine, "device": device, "scale": scale, "versions": versions(),
           "environment": notes, "steps": steps, "max_new_tokens": max_new_tokens,
           "model": "built directly on the GPU with random weights (xcomp_lab.original.steps.direct_loader)"}
    (out / "env.json").write_text(json.dumps(env, indent=1))
    run_steps(steps, direct_loader(files, device, scale), image=os.fspath(package_file(*SAMPLE)), device=device,
              scale=scale, code_dir=files, checkpoint=f"{files} (weights built on {device})",
              results_path=out / "results.jsonl", max_new_tokens=max_new_tokens,
              environment_notes=notes, progress=lambda line: print(line, flush=True))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prepare", action="store_true", help="write the model files and wheels, then stop")
    parser.add_argument("--code-dir", type=Path, help="with --prepare: the folder of the five remote-code files")
    parser.add_argument("--files", type=Path, default=None, help="the prepared model files (default: "
                                                                  ".cache/original-gpu/files/<name>)")
    parser.add_argument("--out", type=Path, default=Path("results/original-h200"))
    parser.add_argument("--steps", default=",".join(GPU_STEPS))
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--device", default="cuda:0", help="cuda:N; cpu (with --scale small) to check the path")
    parser.add_argument("--scale", default="full", choices=sorted(SCALES))
    args = parser.parse_args(argv)
    if args.prepare:
        if args.code_dir is None:
            parser.error("--prepare needs --code-dir, the folder holding the original remote-code files")
        prepare(args.code_dir, prepared_dir(), args.scale)
        return 0
    files = args.files or prepared_dir() / "files" / args.scale / CHECKPOINT_NAME
    if not (files / "config.json").is_file():
        parser.error(f"{files} holds no prepared model files: run with --prepare --code-dir ... first (here), and "
                     "carry .cache/original-gpu to the GPU machine")
    run(files, args.out, [name for name in args.steps.split(",") if name], args.max_new_tokens, args.device, args.scale)
    return 0


if __name__ == "__main__":
    sys.exit(main())
