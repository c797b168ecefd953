"""The Jupyter kernel the course's notebooks run in: the course's own, or the original's environment's.

A checkpoint whose remote code is the original's (`xcomp_lab.original.detect.uses_original_code`) cannot load in
the course's environment (transformers 5): its notebooks run in a kernel of `.venv-original` (`make
venv-original`: transformers 4.33.2, ipykernel, this checkout installed editable). `kernel_for()` picks the
kernel; `original_kernel()` checks that environment and writes its kernel spec into it, so that papermill,
running in the course's environment, starts that Python when it finds the spec on `JUPYTER_PATH`. Where the
environment is missing or incomplete, `OriginalEnvironmentMissing` says exactly how to get it.
"""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from xcomp_lab.core.resources import repository_root
from xcomp_lab.original.detect import uses_original_code

COURSE_KERNEL = "python3"
ORIGINAL_KERNEL = "xcomp-lab-original"
ORIGINAL_VENV_VARIABLE = "ORIGINAL_VENV"  # the Makefile's variable of the same name
STAMP_GLOB = ".xcomp-lab-*"  # written by `make venv-original` once every package is installed
# What a kernel of that environment must import, and the module that proves the checkout is installed there.
KERNEL_IMPORTS = ("ipykernel", "matplotlib", "transformers", "einops", "torchvision", "sentencepiece", "xcomp_lab")


class OriginalEnvironmentMissing(RuntimeError):
    """The original's environment (or its kernel's packages) is not there; the message says how to create it."""


@dataclass(frozen=True)
class Kernel:
    """A kernel for papermill: its name and the variables (JUPYTER_PATH) under which it is found."""

    name: str
    environment: dict[str, str] = field(default_factory=dict)
    python: Path | None = None  # None: the course's own environment


def original_venv() -> Path:
    """`.venv-original` of the checkout, or the folder `$ORIGINAL_VENV` names (as `make venv-original` does)."""
    named = os.environ.get(ORIGINAL_VENV_VARIABLE)
    return Path(named) if named else repository_root() / ".venv-original"


def _how_to(venv: Path, what: str) -> str:
    return (f"{what}. The checkpoint's remote code is the original InternLM-XComposer2-VL-7B's, written for "
            f"transformers 4.33.2, so its notebooks run in a second environment: create it once with "
            f"`make venv-original` (in {repository_root()}; ORIGINAL_VENV={venv} if elsewhere), then run the course "
            f"again.")


def original_kernel(venv: str | os.PathLike | None = None) -> Kernel:
    """Check the original's environment and register its kernel spec in it; the kernel to run notebooks in."""
    folder = Path(venv) if venv is not None else original_venv()
    python = folder / "bin" / "python"
    if not python.is_file():
        raise OriginalEnvironmentMissing(_how_to(folder, f"There is no environment at {folder}"))
    if not any(folder.glob(STAMP_GLOB)):
        raise OriginalEnvironmentMissing(_how_to(folder, f"The environment at {folder} is unfinished (no "
                                                 f"{STAMP_GLOB} stamp)"))
    probe = ("import importlib.util, json, xcomp_lab; print(json.dumps({'missing': [m for m in "
             f"{list(KERNEL_IMPORTS)!r} if importlib.util.find_spec(m) is None], 'package': xcomp_lab.__file__}}))")
    found = subprocess.run([os.fspath(python), "-c", probe], capture_output=True, text=True, cwd="/", check=False)
    if found.returncode != 0:
        last = (found.stderr.strip().splitlines() or ["no output"])[-1]
        raise OriginalEnvironmentMissing(_how_to(folder, f"{python} cannot import xcomp_lab ({last})"))
    report = json.loads(found.stdout.strip().splitlines()[-1])
    if report["missing"]:
        raise OriginalEnvironmentMissing(_how_to(folder, f"{folder} lacks {', '.join(report['missing'])}"))
    package = Path(report["package"]).resolve().parent
    if package != (repository_root() / "xcomp_lab").resolve():
        raise OriginalEnvironmentMissing(_how_to(folder, f"{folder} imports xcomp_lab from {package}, not from this "
                                                 f"checkout"))
    share = folder / "share" / "jupyter"
    spec = share / "kernels" / ORIGINAL_KERNEL / "kernel.json"
    spec.parent.mkdir(parents=True, exist_ok=True)
    wanted = {"argv": [os.fspath(python), "-m", "ipykernel_launcher", "-f", "{connection_file}"],
              "display_name": "xcomp-lab: original code (transformers 4.33.2)", "language": "python"}
    if not spec.is_file() or json.loads(spec.read_text(encoding="utf-8")) != wanted:
        spec.write_text(json.dumps(wanted, indent=1), encoding="utf-8")
    jupyter_path = os.pathsep.join(p for p in (os.fspath(share), os.environ.get("JUPYTER_PATH", "")) if p)
    return Kernel(ORIGINAL_KERNEL, {"JUPYTER_PATH": jupyter_path}, python)


def kernel_for(model_name_or_path: str | os.PathLike | None, venv: str | os.PathLike | None = None) -> Kernel:
    """The kernel for notebooks loading `model_name_or_path`: the original's environment's where its code needs it."""
    return original_kernel(venv) if uses_original_code(model_name_or_path) else Kernel(COURSE_KERNEL)
