"""A browsable static edition of the course: executed notebooks and the instructor guide as HTML, with an index.

    make site                                          # the same as the next line
    python -m xcomp_lab.tools.site --out site --extra results/full-h200

The index has two sections: the notebooks at tiny scale as saved in `notebooks/` (pages at the top of the
site) and, with `--extra`, the notebooks executed at full scale on a GPU (pages under `full/`) with that run's
table. The instructor guide (`docs/instructor-guide.md`) becomes `instructor-guide.html`. Charts are embedded in
the pages, so the folder can be opened from disk or served as it is.
"""

from __future__ import annotations

import argparse
import html
import json
import re
from pathlib import Path
from typing import Literal

import mistune  # comes with nbconvert
import nbformat
from nbconvert import HTMLExporter

from xcomp_lab.course.results import read_results
from xcomp_lab.tools.course import notebooks
from xcomp_lab.tools.guide import guide_paths
from xcomp_lab.core.units import GIB

STYLE = ("<style>body{font-family:sans-serif;max-width:60em;margin:2em auto;padding:0 1em;line-height:1.45}"
         "table{border-collapse:collapse}td,th{border:1px solid #bbb;padding:.2em .5em}"
         "pre{background:#f4f4f4;padding:.5em;overflow-x:auto}</style>")


def _title(notebook: nbformat.NotebookNode, fallback: str) -> str:
    for cell in notebook.cells:
        if cell.cell_type == "markdown" and cell.source.lstrip().startswith("#"):
            return cell.source.lstrip().splitlines()[0].lstrip("# ").strip()
    return fallback


def _with_nav(page: str, index_href: str) -> str:
    """`page` with a link back to the index right after its opening body tag."""
    nav = f'<nav><a href="{index_href}">&larr; xcomp-lab: all notebooks</a></nav>'
    page, found = re.subn(r"(<body[^>]*>)", lambda m: m.group(1) + nav, page, count=1)
    if not found:
        raise ValueError("The exported page has no <body> tag to put the navigation in.")
    return page


def render_notebook(path: Path, out: Path, folder: str = "") -> tuple[str, str]:
    """Write the notebook at `path` as `out`/`folder`/<stem>.html; return its href from the index and its title."""
    notebook = nbformat.read(path, as_version=4)
    body, _ = HTMLExporter().from_notebook_node(notebook)
    href = f"{folder}/{path.stem}.html" if folder else f"{path.stem}.html"
    target = out / href
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(_with_nav(body, "../" * href.count("/") + "index.html"), encoding="utf-8")
    return href, _title(notebook, path.stem)


def render_guide(guide: Path, target: Path, pages: set[str]) -> Path:
    """The markdown guide as one HTML page; its links to notebooks (`../notebooks/NN-*.ipynb`) point at their pages."""
    if not guide.is_file():
        raise FileNotFoundError(f"No instructor guide at {guide}; `python -m xcomp_lab.tools.guide` writes it.")
    body = mistune.create_markdown(escape=False, plugins=["table"])(guide.read_text(encoding="utf-8"))

    def to_page(match: re.Match) -> str:
        stem = match.group(1)
        if stem not in pages:
            raise ValueError(f"The guide links to notebook {stem!r}, which the site has no page for ({sorted(pages)}).")
        return f'href="{stem}.html"'

    body = re.sub(r'href="\.\./notebooks/([^"/]+)\.ipynb"', to_page, body)
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>Instructor guide · xcomp-lab</title>{STYLE}"
            f"</head><body>{body}</body></html>")
    target.write_text(_with_nav(page, "index.html"), encoding="utf-8")
    return target


def full_scale_table(extra: Path) -> str:
    """The full-scale run's steps as an HTML table (peak GiB and whether it fit), headed by its GPU."""
    env = json.loads((extra / "env.json").read_text()) if (extra / "env.json").is_file() else {}
    rows = read_results(extra / "results.jsonl")
    cells = "".join(
        f"<tr><td>{html.escape(r['step'])}</td><td>{r['peak_bytes'] / GIB:.2f}</td>"
        f"<td>{'OOM' if r['oom'] else 'fits'}</td></tr>"
        for r in rows
    )
    return (f"<p>Every course step, measured on {html.escape(str(env.get('gpu', 'a GPU')))} "
            f"(<code>python -m xcomp_lab.tools.gpu_run</code>):</p>"
            f"<table><tr><th>step</th><th>peak GiB</th><th>result</th></tr>{cells}</table>")


def _links(entries: list[tuple[str, str]]) -> str:
    return "<ol>" + "\n".join(f'<li><a href="{href}">{html.escape(title)}</a></li>' for href, title in entries) + "</ol>"


def build_site(out: str | Path = "site", sources: list[Path] | None = None, extra: Path | None = None,
               guide: Path | Literal["committed"] | None = "committed") -> Path:
    """Render the tiny-scale notebooks, the full-scale ones in `extra`/notebooks and the guide, with an index.

    `guide` is a markdown guide, "committed" for the checkout's docs/instructor-guide.md, or None to leave it out.
    """
    if guide == "committed":
        guide = guide_paths().guide
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tiny = [render_notebook(path, out) for path in sources or notebooks()]
    sections = [f"<h2>The course at tiny scale (CPU, as saved in the repository)</h2>{_links(tiny)}"]
    if guide is not None:
        render_guide(guide, out / "instructor-guide.html", {Path(href).stem for href, _ in tiny})
        sections.insert(0, '<p>For instructors: <a href="instructor-guide.html">the instructor guide</a> (goals, '
                           "timings, setup, the GPU edition, common questions).</p>")
    if extra is not None:
        if not (extra / "results.jsonl").is_file():
            raise FileNotFoundError(f"{extra} has no results.jsonl; pass a full-scale edition (xcomp_lab.tools.course --edition) or a folder written by xcomp_lab.tools.gpu_run.")
        full = [render_notebook(path, out, "full")
                for path in sorted((extra / "notebooks").glob("[0-9][0-9]-*.ipynb"))]
        listed = _links(full) if full else "<p>No notebook has been executed at full scale yet.</p>"
        sections.append(f"<h2>At full scale on a GPU</h2>{listed}{full_scale_table(extra)}")
    page = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>xcomp-lab</title>{STYLE}</head><body>"
        "<h1>xcomp-lab: fitting InternLM-XComposer2-VL-7B into GPU memory, measured</h1>"
        f"{''.join(sections)}</body></html>"
    )
    (out / "index.html").write_text(page, encoding="utf-8")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="site")
    parser.add_argument("--extra", type=Path, default=None, help="a full-scale edition (xcomp_lab.tools.course --edition) or results folder (xcomp_lab.tools.gpu_run)")
    parser.add_argument("--no-guide", action="store_true", help="leave the instructor guide out")
    args = parser.parse_args(argv)
    out = build_site(args.out, extra=args.extra, guide=None if args.no_guide else "committed")
    print(f"site written to {out}/index.html")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
