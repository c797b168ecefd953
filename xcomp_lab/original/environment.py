"""What must hold before transformers 4.33.2 is imported to run the original remote code, and what ran.

`prepare_transformers(variables)` sets the checkpoint's environment (its hub cache holding CLIP, offline mode),
makes sure the transformers that imports is the one the model card pins, and returns notes on what it changed:

- transformers 4.33.2 checks its dependencies' versions at import and refuses `tokenizers` 0.14 or newer. Where a
  newer one is installed (the GPU image's, for transformers 5) and 0.13.3 has no wheel (Python 3.12), that check
  is replaced by the same check of every other pin (`dependency_versions_table`) without tokenizers: transformers
  4.33.2 still imports tokenizers' classes at import, but the original's tokenizer is the slow sentencepiece one
  and never calls them.
- transformers 4.33.2 counts bitsandbytes as available only where CUDA is, while bitsandbytes 0.50 also runs on
  the CPU: without a GPU that one check is lifted, so loading reaches the layer replacement a GPU user's load
  makes.
"""

from __future__ import annotations

import importlib.util
import os
import runpy
import sys
import types
from importlib import metadata
from typing import Any

from packaging.requirements import Requirement
from packaging.version import Version

ORIGINAL_TRANSFORMERS = "4.33.2"  # what the model card pins
NEWEST_TOKENIZERS = Version("0.14")  # transformers 4.33.2 requires tokenizers < 0.14
VERSION_CHECK = "transformers.dependency_versions_check"
# transformers 4.33.2's runtime pins (dependency_versions_check.pkgs_to_check_at_runtime) but python and tokenizers
RUNTIME_PINS = ("tqdm", "regex", "requests", "packaging", "filelock", "numpy", "huggingface-hub", "safetensors",
                "accelerate", "pyyaml")


def _installed(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _version_check_without_tokenizers() -> types.ModuleType:
    """transformers 4.33.2's import-time check of its runtime pins, run here for all but tokenizers, as a module
    standing in for `transformers.dependency_versions_check` (which the package then imports as already loaded)."""
    spec = importlib.util.find_spec("transformers")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("transformers is not installed: run in .venv-original (`make venv-original`).")
    deps = runpy.run_path(os.path.join(spec.submodule_search_locations[0], "dependency_versions_table.py"))["deps"]

    def dep_version_check(pkg: str, hint: str | None = None) -> None:
        requirement = Requirement(deps[pkg])
        installed = _installed(requirement.name)
        if installed is not None and not requirement.specifier.contains(installed, prereleases=True):
            raise ImportError(f"{requirement.name} {installed} is installed, transformers {ORIGINAL_TRANSFORMERS} "
                              f"needs {requirement}. {hint or ''}")

    for pkg in RUNTIME_PINS:
        dep_version_check(pkg)
    module = types.ModuleType(VERSION_CHECK)
    module.deps = deps
    module.dep_version_check = dep_version_check
    return module


def prepare_transformers(variables: dict[str, str]) -> list[str]:
    """Set `variables`, hide a too new tokenizers, import transformers 4.33.2; returns what was changed.

    Call it before anything imports transformers; a process that already imported it is refused.
    """
    if "transformers" in sys.modules:
        raise RuntimeError("transformers is already imported in this process: call prepare_transformers() first, "
                           "before anything that imports transformers, so its environment is read at import.")
    os.environ.update(variables)
    notes = [f"{name}={value}" for name, value in variables.items()]
    tokenizers = _installed("tokenizers")
    if tokenizers is not None and Version(tokenizers) >= NEWEST_TOKENIZERS:
        sys.modules[VERSION_CHECK] = _version_check_without_tokenizers()
        notes.append(f"tokenizers {tokenizers} left out of transformers' import-time version check (it needs < 0.14; "
                     "the original's sentencepiece tokenizer does not use it); every other pin checked")
    import torch
    import transformers

    if transformers.__version__ != ORIGINAL_TRANSFORMERS:
        raise RuntimeError(
            f"transformers {transformers.__version__} is imported from {transformers.__file__}, but the original "
            f"remote code needs {ORIGINAL_TRANSFORMERS}: run in .venv-original (`make venv-original`), or put the "
            "wheels of xcomp_lab.tools.original_gpu_run first on PYTHONPATH."
        )
    if not torch.cuda.is_available() and importlib.util.find_spec("bitsandbytes") is not None:
        import transformers.utils.import_utils

        def bitsandbytes_installed() -> bool:
            return True

        transformers.utils.is_bitsandbytes_available = bitsandbytes_installed
        transformers.utils.import_utils.is_bitsandbytes_available = bitsandbytes_installed
        notes.append("bitsandbytes counted as available without CUDA (its CPU backend runs)")
    return notes


def versions() -> dict[str, Any]:
    """The versions of everything the original's code path runs on (None where a package is absent)."""
    import platform

    import torch

    names = ("transformers", "tokenizers", "huggingface_hub", "accelerate", "bitsandbytes", "einops", "sentencepiece",
             "torchvision", "safetensors")
    found = {name: _installed(name) for name in names}
    return {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda, **found}
