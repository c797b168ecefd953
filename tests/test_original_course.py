"""The course's infrastructure for a checkpoint of the original model's own code: the detection rule, the choice of
environment (kernel) and, in `.venv-original`, the notebook start, the parameters, the loading and one step.

The last test runs one script in the original's environment (transformers 4.33.2) on the small build: it skips,
saying how to get them, where ../shared's reference code or `.venv-original` is absent (`original_code` fixture).
"""

from __future__ import annotations

import json
import os
import subprocess
import textwrap
from pathlib import Path
from typing import Any

import pytest

from xcomp_lab.course.params import check_params
from xcomp_lab.memory.cards import card_of_size
from xcomp_lab.model.original import DONE_MARKER, original_parameter_count
from xcomp_lab.original.detect import (
    ORIGINAL_HUB_ID,
    checkpoint_environment,
    is_build,
    original_scale,
    uses_original_code,
)
from xcomp_lab.original.kernel import (
    COURSE_KERNEL,
    ORIGINAL_KERNEL,
    OriginalEnvironmentMissing,
    kernel_for,
)
from xcomp_lab.original.steps import original_budget
from xcomp_lab.tools.course import (
    ORIGINAL_NOTEBOOKS,
    course_scale,
    default_output,
    for_original_code,
)
from xcomp_lab.tools.course import main as course_main

REPO = Path(__file__).resolve().parents[1]
AUTO_MAP = {"AutoModel": "modeling_internlm_xcomposer2.InternLMXComposer2ForCausalLM"}


def checkpoint(folder: Path, **config: Any) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def build(root: Path, scale: str) -> Path:
    """A folder laid out as a `build_original_checkpoint` build (its record beside the checkpoint), no weights."""
    path = checkpoint(root / "internlm-xcomposer2-vl-7b", auto_map=AUTO_MAP, transformers_version="4.33.2")
    (root / DONE_MARKER).write_text(json.dumps({"scale": scale, "dtype": "float16", "seed": 0}))
    return path


def test_the_rule_tells_the_originals_code_from_the_replicas(tmp_path: Path) -> None:
    original = checkpoint(tmp_path / "download", auto_map=AUTO_MAP, transformers_version="4.33.2")
    replica = checkpoint(tmp_path / "replica", auto_map=AUTO_MAP, transformers_version="5.24.0")
    no_code = checkpoint(tmp_path / "plain", transformers_version="4.33.2")
    assert uses_original_code(original) and uses_original_code(str(original))
    assert not uses_original_code(replica)
    assert not uses_original_code(no_code)  # no remote code: transformers' own classes
    assert not uses_original_code(None)
    assert uses_original_code(ORIGINAL_HUB_ID) and not uses_original_code("someone/other-model")
    assert (original_scale(original), is_build(original), checkpoint_environment(original)) == ("full", False, {})


def test_a_build_names_its_scale_and_hub_cache(tmp_path: Path) -> None:
    path = build(tmp_path / "small-build", "small")
    assert uses_original_code(path) and is_build(path) and original_scale(path) == "small"
    variables = checkpoint_environment(path)
    assert variables["HF_HOME"] == os.fspath(tmp_path / "small-build" / "hf-home")
    assert variables["HF_HUB_OFFLINE"] == "1"
    assert course_scale(None, path) == "small" and course_scale(None, None) == "tiny"
    assert course_scale("full", path) == "full"
    assert default_output("small", "cpu", path) == Path("course-output/original-small-cpu")
    assert default_output("tiny", "cpu", None) == Path("course-output/tiny-cpu")


def test_parameters_for_the_originals_code(tmp_path: Path) -> None:
    path = build(tmp_path / "small-build", "small")
    results = tmp_path / "results.jsonl"
    params = check_params(scale="small", device="cpu", model_name_or_path=path, results_path=results)
    assert params.original_code and params.random_weights
    with pytest.raises(ValueError, match="eager attention only"):
        check_params(scale="small", device="cpu", model_name_or_path=path, attn_implementation="sdpa",
                     results_path=results)
    with pytest.raises(ValueError, match="choose one of \\['full', 'small'\\]"):
        check_params(scale="tiny", device="cpu", model_name_or_path=path, results_path=results)
    with pytest.raises(ValueError, match="pass scale='small'"):
        check_params(scale="full", device="cpu", model_name_or_path=path, results_path=results)
    with pytest.raises(ValueError, match="490 px"):
        check_params(scale="small", device="cpu", model_name_or_path=path, image_size=224, results_path=results)
    assert not check_params(scale="tiny", device="cpu", results_path=results).original_code


def test_the_environment_choice(tmp_path: Path) -> None:
    assert kernel_for(None).name == COURSE_KERNEL
    path = build(tmp_path / "small-build", "small")
    with pytest.raises(OriginalEnvironmentMissing, match="make venv-original") as missing:
        kernel_for(path, venv=tmp_path / "no-such-venv")
    assert "transformers 4.33.2" in str(missing.value)
    unfinished = tmp_path / "unfinished"
    (unfinished / "bin").mkdir(parents=True)
    (unfinished / "bin" / "python").write_text("")
    with pytest.raises(OriginalEnvironmentMissing, match="unfinished"):
        kernel_for(path, venv=unfinished)


def test_the_original_environment_is_a_kernel(original_code: tuple[Path, Path]) -> None:
    _, python = original_code
    kernel = kernel_for(ORIGINAL_HUB_ID, venv=python.parent.parent)
    assert kernel.name == ORIGINAL_KERNEL and kernel.python == python
    spec = Path(kernel.environment["JUPYTER_PATH"].split(os.pathsep)[0]) / "kernels" / ORIGINAL_KERNEL / "kernel.json"
    assert json.loads(spec.read_text())["argv"][0] == os.fspath(python)


SCRIPT = """
import json, sys
from xcomp_lab.model.original import build_original_checkpoint
from xcomp_lab.course.notebook import start, chat_inputs, image_grid, sample_images
path = build_original_checkpoint(sys.argv[1], "small").path
before = "transformers" in sys.modules
params = start(scale="small", device="cpu", model_name_or_path=str(path), max_new_tokens=2, results_path=sys.argv[2])
import transformers
from xcomp_lab.course.steps import STEPS, course_budget, load_for_step, run_step
from xcomp_lab.model.loading import load_model
report = {"imported_before_start": before, "transformers": transformers.__version__}
try:
    load_model(path, dtype="float32", attn_implementation="sdpa")
except ValueError as error:
    report["sdpa"] = str(error)
try:
    load_for_step(STEPS["fp16-sdpa"], params)
except ValueError as error:
    report["sdpa_step"] = str(error)
model, tokenizer = load_for_step(STEPS["fp32-no-autocast"], params)
report["dtype"] = str(model.dtype)
report["resident"] = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
report["class"] = type(model).__module__.split(".")[-1]
report["grid"] = image_grid(model, params)
report["chat_keys"] = sorted(chat_inputs(model, sample_images(1)[0][0], params))
budget = course_budget(params, model.config)
run, record = run_step(STEPS["fp32-no-autocast"], model, tokenizer, [sample_images(1)[0][0]], params, budget)
report.update(budget=budget.limit_bytes, ok=run.ok, prompt_tokens=run.prompt_tokens, new_tokens=run.new_tokens,
              weights=record["weights_bytes"], extra=record["extra"])
print(json.dumps(report))
"""


@pytest.fixture(scope="module")
def in_original(original_code: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    code_dir, python = original_code
    out = tmp_path_factory.mktemp("original-course")
    done = subprocess.run([os.fspath(python), "-c", textwrap.dedent(SCRIPT), os.fspath(code_dir),
                           os.fspath(out / "results.jsonl")], capture_output=True, text=True, timeout=600,
                          cwd=out, check=False, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_start_prepares_transformers_4_33_2_before_importing_it(in_original: dict[str, Any]) -> None:
    assert in_original["imported_before_start"] is False
    assert in_original["transformers"] == "4.33.2"


def test_loading_refuses_sdpa_and_loads_fp32(in_original: dict[str, Any]) -> None:
    assert "eager attention only" in in_original["sdpa"] and "eager attention only" in in_original["sdpa_step"]
    assert in_original["dtype"] == "torch.float32"
    assert in_original["class"] == "modeling_internlm_xcomposer2"  # the checkpoint's own code, not the replica
    assert in_original["grid"] == [490, 14] and in_original["chat_keys"] == [
        "do_sample", "image", "max_new_tokens", "repetition_penalty"]


def test_a_step_runs_model_chat_under_the_originals_budget(in_original: dict[str, Any]) -> None:
    lacking = (original_parameter_count("full") - original_parameter_count("small")) * 4
    assert in_original["budget"] == card_of_size(48).usable_bytes - lacking
    assert in_original["ok"] and in_original["new_tokens"] == 2 and in_original["prompt_tokens"] > 1225
    assert in_original["weights"] == in_original["resident"] > original_parameter_count("small") * 4  # and buffers
    assert in_original["extra"]["code"].startswith("original remote code")


def test_a_run_of_the_originals_code_takes_the_notebooks_that_support_it(tmp_path: Path) -> None:
    course = [tmp_path / f"{n:02d}-notebook.ipynb" for n in range(9)]
    ready, skipped = for_original_code(course)
    assert {"00", "01"} <= set(ORIGINAL_NOTEBOOKS)
    assert [nb.name[:2] for nb in ready] == sorted(set(ORIGINAL_NOTEBOOKS) & {f"{n:02d}" for n in range(9)})
    assert [nb.name[:2] for nb in skipped] == sorted({f"{n:02d}" for n in range(9)} - set(ORIGINAL_NOTEBOOKS))


def test_the_course_command_says_how_to_get_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    path = build(tmp_path / "small-build", "small")
    monkeypatch.setenv("ORIGINAL_VENV", os.fspath(tmp_path / "absent"))
    assert course_main(["--model-name-or-path", os.fspath(path), "--device", "cpu",
                        "--output", os.fspath(tmp_path / "out")]) == 2
    assert "create it once with `make venv-original`" in capsys.readouterr().err


def test_the_originals_budget_on_a_cpu_keeps_the_activations_room() -> None:
    lacking = (original_parameter_count("full") - original_parameter_count("small")) * 4
    budget = original_budget(48, "cpu", "small")
    assert budget.limit_bytes == card_of_size(48).usable_bytes - lacking and not budget.is_allocator_limit
    assert original_budget(48, "cpu", "full").limit_bytes == card_of_size(48).usable_bytes
    with pytest.raises(ValueError, match="less than the"):
        original_budget(24, "cpu", "small")
