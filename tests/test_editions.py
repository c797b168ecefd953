"""No executed notebook in the repository is older than its source: tiny copies and full-scale GPU copies alike."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest

from xcomp_lab.course.editions import (
    METADATA_KEY,
    editions,
    refresh_prose,
    rerun_command,
    source_digest,
    stale_copies,
    stamp,
)

REPO = Path(__file__).resolve().parent.parent
SOURCES = REPO / "notebooks" / "src"
FULL_EDITIONS = editions(REPO / "results")


def test_the_tiny_copies_were_built_from_the_current_sources():
    stale = stale_copies(REPO / "notebooks", SOURCES)
    assert not stale, ("rebuild with `python scripts/build_notebooks.py " + " ".join(s.notebook.name[:2] for s in stale)
                       + "`:\n" + "\n".join(map(str, stale)))


@pytest.mark.parametrize("edition", FULL_EDITIONS, ids=lambda p: p.parent.name)
def test_the_full_scale_copies_were_executed_from_the_current_sources(edition: Path):
    stale = stale_copies(edition, SOURCES)
    assert not stale, (f"re-execute with `{rerun_command(edition.relative_to(REPO))}` (where only prose changed, "
                       f"`python -m xcomp_lab.tools.refresh_prose {edition.relative_to(REPO)}` carries it over):\n"
                       + "\n".join(map(str, stale)))


def test_a_changed_source_makes_its_copy_stale(tmp_path: Path):
    sources, executed = tmp_path / "src", tmp_path / "executed"
    sources.mkdir(), executed.mkdir()
    source = sources / "00-demo.py"
    source.write_text("# %%\nprint(1)\n")
    notebook = nbformat.v4.new_notebook()
    nbformat.write(stamp(notebook, source, {"scale": "tiny", "results_path": "x"}), executed / "00-demo.ipynb")
    assert stale_copies(executed, sources) == []
    recorded = nbformat.read(executed / "00-demo.ipynb", as_version=4).metadata[METADATA_KEY]
    assert recorded["source_sha256"] == source_digest(source) and recorded["parameters"] == {"scale": "tiny"}
    source.write_text("# %%\nprint(2)\n")
    (stale,) = stale_copies(executed, sources)
    assert "00-demo.py changed after it was executed" in str(stale)
    nbformat.write(nbformat.v4.new_notebook(), executed / "01-unstamped.ipynb")
    (sources / "01-unstamped.py").write_text("")
    assert "records no source digest" in str(stale_copies(executed, sources)[1])


def test_editions_list_the_replicas_and_the_originals(tmp_path: Path):
    for name in ("full-h200", "original-small-cpu", "original-h200", "plan-matrix-h200"):
        (tmp_path / name / "notebooks").mkdir(parents=True)
    for name in ("full-h200", "original-small-cpu", "plan-matrix-h200"):
        nbformat.write(nbformat.v4.new_notebook(), tmp_path / name / "notebooks" / "00-demo.ipynb")
    found = editions(tmp_path)
    assert [p.parent.name for p in found] == ["full-h200", "original-small-cpu"]  # no notebooks, or not an edition
    source = tmp_path / "00-demo.py"
    source.write_text("# %%\n")
    notebook = stamp(nbformat.v4.new_notebook(), source, {"scale": "small", "device": "cpu",
                                                          "model_name_or_path": "/ckpt", "results_path": "x"})
    nbformat.write(notebook, found[1] / "00-demo.ipynb")
    assert rerun_command(found[1]) == (f"python -m xcomp_lab.tools.course --scale small --device cpu "
                                       f"--model-name-or-path /ckpt --edition {found[1].parent}")


def test_a_prose_change_is_carried_into_a_copy_and_a_code_change_is_refused(tmp_path: Path):
    """`refresh_prose`: a markdown-only change replaces the copy's markdown and moves its stamp (the executed digest
    kept), leaving code and outputs; a code change, or a copy without a stamp, is refused with the rerun command."""
    import jupytext

    sources, executed = tmp_path / "src", tmp_path / "full-demo" / "notebooks"
    sources.mkdir(), executed.mkdir(parents=True)
    source = sources / "00-demo.py"
    source.write_text("# %% [markdown]\n# Old prose.\n\n# %%\nprint(1)\n")
    notebook = jupytext.read(source, fmt="py:percent")
    notebook.cells[1].outputs = [nbformat.v4.new_output("stream", name="stdout", text="1\n")]
    copy = executed / "00-demo.ipynb"
    nbformat.write(stamp(notebook, source, {"scale": "full", "device": "cuda"}), copy)
    first = source_digest(source)
    assert refresh_prose(copy, source) is False
    source.write_text("# %% [markdown]\n# New prose.\n\n# %%\nprint(1)\n")
    assert refresh_prose(copy, source) is True and stale_copies(executed, sources) == []
    refreshed = nbformat.read(copy, as_version=4)
    assert refreshed.cells[0].source == "New prose." and refreshed.cells[1].outputs[0]["text"] == "1\n"
    assert refreshed.metadata[METADATA_KEY]["executed_source_sha256"] == first
    source.write_text("# %% [markdown]\n# New prose.\n\n# %%\nprint(2)\n")
    with pytest.raises(ValueError, match="code cells \\[1\\].*--scale full --device cuda"):
        refresh_prose(copy, source)
    source.write_text("# %%\nprint(1)\n")
    with pytest.raises(ValueError, match="do not pair"):
        refresh_prose(copy, source)
    nbformat.write(nbformat.v4.new_notebook(), copy)
    with pytest.raises(ValueError, match="records no source digest"):
        refresh_prose(copy, source)
