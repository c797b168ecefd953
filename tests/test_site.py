"""The static edition: every page present, every relative link resolving, charts embedded."""

from __future__ import annotations

from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

import nbformat
import pytest

from xcomp_lab.tools.course import notebooks
from xcomp_lab.tools.guide import guide_paths

FULL = guide_paths().edition  # the notebooks executed at full scale on a GPU, with their records
from xcomp_lab.tools.site import build_site, render_guide

pytestmark = pytest.mark.slow  # renders eleven notebooks


class _Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.targets: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.targets += [value for name, value in attrs if name in ("href", "src") and value]


def _links(page: Path) -> list[str]:
    parser = _Links()
    parser.feed(page.read_text(encoding="utf-8"))
    return parser.targets


def _is_relative(target: str) -> bool:
    parts = urlsplit(target)
    return not (parts.scheme or parts.netloc or target.startswith("#"))


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_site(tmp_path_factory.mktemp("site"), extra=FULL)


def test_every_relative_link_resolves_inside_the_site(site: Path):
    pages = sorted(site.rglob("*.html"))
    checked = 0
    for page in pages:
        for target in filter(_is_relative, _links(page)):
            resolved = (page.parent / unquote(urlsplit(target).path)).resolve()
            assert resolved.is_file(), f"{page.relative_to(site)} links to {target}, which is not in the site"
            assert site.resolve() in resolved.parents, f"{page.relative_to(site)} links outside the site: {target}"
            checked += 1
    assert checked >= 2 * len(pages), "every page should at least link back to the index"


def test_index_lists_both_editions_and_the_guide(site: Path):
    links = _links(site / "index.html")
    assert [f"{nb.stem}.html" for nb in notebooks()] == [t for t in links if "/" not in t and t.startswith("0")]
    full = sorted(p.stem for p in (FULL / "notebooks").glob("[0-9][0-9]-*.ipynb"))
    assert [f"full/{stem}.html" for stem in full] == [t for t in links if t.startswith("full/")]  # each copy, if any
    assert "instructor-guide.html" in links
    assert "At full scale on a GPU" in (site / "index.html").read_text()


def test_charts_are_embedded(site: Path):
    sources = [(nb, site / f"{nb.stem}.html") for nb in notebooks()]
    sources += [(nb, site / "full" / f"{nb.stem}.html") for nb in sorted((FULL / "notebooks").glob("[0-9][0-9]-*.ipynb"))]
    charted = 0
    for source, page in sources:
        images = sum("image/png" in output.get("data", {}) for cell in nbformat.read(source, as_version=4).cells
                     if cell.cell_type == "code" for output in cell.outputs)
        assert page.read_text(encoding="utf-8").count("data:image/png;base64,") >= images, page.name
        charted += images > 0
    assert charted >= 5, "the course's charts should be in the pages"


def test_guide_page_renders_tables_and_links_notebook_pages(site: Path):
    page = (site / "instructor-guide.html").read_text(encoding="utf-8")
    assert "<table>" in page and "<h2>Common questions" in page
    assert 'href="00-setup-and-tour.html"' in page and "../notebooks/" not in page


def test_guide_link_to_an_unknown_notebook_is_refused(tmp_path: Path):
    guide = tmp_path / "guide.md"
    guide.write_text("[x](../notebooks/99-missing.ipynb)\n")
    with pytest.raises(ValueError, match="99-missing"):
        render_guide(guide, tmp_path / "guide.html", {"00-setup-and-tour"})


def test_extra_without_results_is_refused(tmp_path: Path):
    source = notebooks()[:1]
    with pytest.raises(FileNotFoundError, match="gpu_run"):
        build_site(tmp_path / "site", sources=source, extra=tmp_path, guide=None)
