"""A regular (non-editable) install works outside the checkout: its resources come with it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

PROBE = r"""
import json, pathlib, xcomp_lab
from xcomp_lab.core.resources import package_file, repository_root
from xcomp_lab.course.notebook import sample_images
from xcomp_lab.model.checkpoint import trained_tiny_checkpoint
from xcomp_lab.model.loading import load_model
from xcomp_lab.run.captioning import caption_images

image, truth = sample_images(1)[0]
model, tokenizer = load_model(trained_tiny_checkpoint(), dtype="float32")
try:
    repository_root()
    root = "found"
except FileNotFoundError as error:
    root = str(error)
print(json.dumps({"package": xcomp_lab.__file__, "caption": caption_images(model, tokenizer, [image])[0],
                  "truth": truth, "templates": sorted(p.name for p in package_file("xcomp_lab.tools", "templates").iterdir()),
                  "root": root}))
"""


@pytest.mark.slow
def test_a_wheel_installed_elsewhere_finds_its_samples_weights_and_templates(tmp_path: Path):
    wheels, site, elsewhere = tmp_path / "wheels", tmp_path / "site", tmp_path / "elsewhere"
    elsewhere.mkdir()
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(REPO)], check=True,
                   capture_output=True)
    (wheel,) = wheels.glob("xcomp_lab-*.whl")
    subprocess.run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)], check=True, capture_output=True)
    env = {**os.environ, "PYTHONPATH": str(site), "XCOMP_LAB_CACHE": str(tmp_path / "cache")}
    env.pop("XCOMP_LAB_ROOT", None)
    done = subprocess.run([sys.executable, "-c", PROBE], cwd=elsewhere, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    import json

    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert Path(found["package"]).is_relative_to(site)  # the installed copy, not the checkout
    assert found["caption"] == found["truth"]  # the shipped sample scene, captioned by the shipped weights
    assert found["templates"]  # the instructor guide's template ships as package data
    assert "No xcomp-lab checkout at or above" in found["root"]  # and the checkout is not pretended
