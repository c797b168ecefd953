"""The course run with a second parameter set: an 80 GB card, sdpa attention, 4 new tokens.

It runs the notebooks whose steps come close to the 48 GB budget at tiny scale (01: the quick start; 03: the
gradient modes; 04: the sequence sweeps, with sdpa): on an 80 GB card each must fit. The others' steps fit the 48 GB
card already (`test_course.py` runs all ten notebooks with the defaults and asserts it), and the tour (00) and the
planning notebooks (08, 09) record no step.
"""

from __future__ import annotations

import pytest

from xcomp_lab.course.results import latest_by_step, read_results
from xcomp_lab.tools.course import run_course

STEP_NOTEBOOKS = ["01", "03", "04"]


@pytest.fixture(scope="module")
def big_card_run(tmp_path_factory: pytest.TempPathFactory, course_cpu_path: str) -> dict[str, dict]:
    with pytest.MonkeyPatch.context() as env:
        env.setenv("XCOMP_LAB_BNB_CPU_PATH", course_cpu_path)  # the notebooks' kernels inherit it
        out = run_course(
            tmp_path_factory.mktemp("course-80gb"),
            only=STEP_NOTEBOOKS,
            scale="tiny",
            device="cpu",
            budget_gb=80,
            max_new_tokens=4,
            attn_implementation="sdpa",
            progress=False,
        )
    return latest_by_step(read_results(out / "results.jsonl"))


def test_a_80gb_card_fits_the_fp32_quick_start_and_every_step(big_card_run):
    assert big_card_run["fp32-quickstart"]["oom"] is False
    assert big_card_run["fp32-quickstart"]["params"]["attn_implementation"] == "sdpa"
    assert not [name for name, record in big_card_run.items() if record["oom"] and not name.startswith("03-prefill-grad")]


def test_the_second_run_measured_every_step_notebook(big_card_run):
    assert {record["notebook"][:2] for record in big_card_run.values()} == set(STEP_NOTEBOOKS)
