"""A browsable static edition of the course: every executed notebook as HTML, with an index page.

    python -m xcomp_lab.site                 # notebooks/ (tiny scale, as saved) -> site/
    python -m xcomp_lab.site --out site --extra results/full-h100

Charts are embedded in the pages, so the folder can be opened from disk or served as it is.
"""

from __future__ import annotations

import argparse
import html
import json
from pathlib import Path

import nbformat
from nbconvert import HTMLExporter

from .course import NOTEBOOKS, notebooks


def _title(notebook: nbformat.NotebookNode, fallback: str) -> str:
    for cell in notebook.cells:
        if cell.cell_type == "markdown" and cell.source.lstrip().startswith("#"):
            return cell.source.lstrip().splitlines()[0].lstrip("# ").strip()
    return fallback


def build_site(out: str | Path = "site", sources: list[Path] | None = None, extra: Path | None = None) -> Path:
    """Render `sources` (the course's executed notebooks by default) to `out`/*.html plus `out`/index.html."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    exporter = HTMLExporter()
    entries = []
    for path in sources or notebooks(NOTEBOOKS):
        notebook = nbformat.read(path, as_version=4)
        body, _ = exporter.from_notebook_node(notebook)
        target = out / f"{path.stem}.html"
        target.write_text(body, encoding="utf-8")
        entries.append((target.name, _title(notebook, path.stem)))
    items = "\n".join(f'<li><a href="{name}">{html.escape(title)}</a></li>' for name, title in entries)
    full = ""
    if extra is not None and (extra / "results.jsonl").is_file():
        env = json.loads((extra / "env.json").read_text()) if (extra / "env.json").is_file() else {}
        rows = [json.loads(line) for line in (extra / "results.jsonl").read_text().splitlines() if line.strip()]
        cells = "".join(
            f"<tr><td>{html.escape(r['step'])}</td><td>{r['peak_bytes'] / 1024**3:.2f}</td>"
            f"<td>{'OOM' if r['oom'] else 'fits'}</td></tr>"
            for r in rows
        )
        full = (f"<h2>Full scale on {html.escape(str(env.get('gpu', 'a GPU')))}</h2>"
                f"<table><tr><th>step</th><th>peak GiB</th><th>result</th></tr>{cells}</table>")
    page = (
        "<!doctype html><html><head><meta charset='utf-8'><title>xcomp-lab</title></head><body>"
        "<h1>xcomp-lab: fitting InternLM-XComposer2-VL-7B into GPU memory, measured</h1>"
        f"<ol>{items}</ol>{full}</body></html>"
    )
    (out / "index.html").write_text(page, encoding="utf-8")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="site")
    parser.add_argument("--extra", type=Path, default=None, help="a full-scale results folder to tabulate")
    args = parser.parse_args(argv)
    print(f"site written to {build_site(args.out, extra=args.extra)}/index.html")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
