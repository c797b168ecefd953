"""The planner in a real browser: `make lab` on localhost, a notebook in headless Chromium, a widget changed.

The test starts JupyterLab with `make lab`'s own recipe (its setup step skipped) on a temporary folder, opens a
notebook there in Debian's chromium through Playwright (no browser download), runs it, then sets the planner to
a 24 GB card in float32, presses Predict and checks that the printed prediction becomes exactly
`plan(...).estimate.table()` for that setting and that the chart image changes. A last cell checks that the
kernel runs in this environment with HF_HUB_OFFLINE=1. Skips when no chromium binary is found.

Two forms: by default (`make test`, CI) a planner-only notebook, the planner cell of notebook 08 and its imports;
with BROWSER_TEST=full, notebook 08 itself, running the cells the planner needs (not the course charts, which
need a whole course's results). `make browser-test` runs the full form and rewrites images/planner-browser.png.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK_08 = ROOT / "notebooks" / "08-planner-and-summary.ipynb"
FULL = os.environ.get("BROWSER_TEST") == "full"
# Notebook 08's cells to run, by how their source starts: parameters, start(), the read-back (it imports
# fmt_bytes), the plan() examples (they import planner) and the planner; the last one shows the planner.
CELLS_08 = ("scale = ", "from xcomp_lab.course.notebook import start", "from xcomp_lab.estimate import estimate_step",
            "from xcomp_lab.lessons.planner import plan, planner", "display(planner(")
# The planner view: what notebook 08's planner cell needs, then that cell as it is in notebook 08.
PLANNER_IMPORTS = ("from xcomp_lab.course.params import check_params\nfrom xcomp_lab.lessons.planner import planner\n\n"
                   'params = check_params(scale="tiny", device="auto")')
KERNEL_CHECK = 'import os, sys\nprint(sys.prefix, os.environ.get("HF_HUB_OFFLINE"))'
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")
# Without the networking flags Chromium keeps calling home, and this machine's closed network refuses it.
CHROMIUM_ARGS = ["--disable-gpu", "--disable-quic", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
# JupyterLab settings for the run: no news prompt, no update check, every cell kept in the page.
LAB_SETTINGS = {
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": '{"fetchNews": "false", "checkForUpdates": false}',
    "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": '{"windowingMode": "none"}',
}
CELL_TIMEOUT_MS = 180_000  # a cold kernel importing torch on a busy 2-core machine
UPDATE_TIMEOUT_MS = 60_000  # one prediction takes about a second


def find_chromium() -> str | None:
    """Debian's chromium (or CHROMIUM=path); Playwright's own browser downloads are never used."""
    candidates = [os.environ.get("CHROMIUM", ""), *CHROMIUM_NAMES]
    return next((shutil.which(c) for c in candidates if c and shutil.which(c)), None)


CHROMIUM = find_chromium()
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary on PATH (apt-get install chromium, or set CHROMIUM)"),
]


@dataclass(frozen=True)
class Lab:
    """A running JupyterLab, the notebook it serves and which of its cells to run."""

    url: str
    token: str
    notebook: str
    run_cells: tuple[int, ...]  # in order; the last one shows the planner
    check_cell: int


def cell_index(cells: list, prefix: str) -> int:
    """The one code cell with a line that starts with `prefix` once indented blocks are read flat (notebook 08's
    replica cells sit under `if not params.original_code:`); fails loudly if notebook 08 changed shape."""
    found = [i for i, c in enumerate(cells)
             if c.cell_type == "code" and any(line.strip().startswith(prefix) for line in c.source.splitlines())]
    assert len(found) == 1, f"expected one code cell starting with {prefix!r} in {NOTEBOOK_08.name}, found {len(found)}"
    return found[0]


def write_notebook(folder: Path) -> tuple[str, tuple[int, ...]]:
    """Notebook 08 (full form) or the planner view, without saved outputs, plus the kernel check as its last cell."""
    nb_08 = nbformat.read(NOTEBOOK_08, as_version=4)
    if FULL:
        nb, name = nb_08, NOTEBOOK_08.name
        nb.metadata.pop("widgets", None)
        for cell in nb.cells:
            if cell.cell_type == "code":
                cell.outputs, cell.execution_count = [], None
        run = tuple(cell_index(nb.cells, p) for p in CELLS_08)
    else:
        nb, name = nbformat.v4.new_notebook(metadata={"kernelspec": nb_08.metadata["kernelspec"]}), "planner.ipynb"
        planner_cell = nb_08.cells[cell_index(nb_08.cells, CELLS_08[-1])].source
        nb.cells = [nbformat.v4.new_code_cell(source) for source in (PLANNER_IMPORTS, planner_cell)]
        run = (0, 1)
    nb.cells.append(nbformat.v4.new_code_cell(KERNEL_CHECK))
    nbformat.write(nb, folder / name)
    return name, run + (len(nb.cells) - 1,)


def write_settings(folder: Path) -> None:
    for name, text in LAB_SETTINGS.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def lab_command(root: Path, port: int, token: str) -> list[str]:
    """`make lab` in this environment, setup skipped: `root` on localhost with a token, no browser, nothing fetched."""
    options = ["--no-browser", "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}", "--ServerApp.port_retries=0",
               f"--IdentityProvider.token={token}", "--LabApp.news_url=None",
               "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"]
    return ["make", "-s", "-C", str(ROOT), "-o", "setup", "lab", f"VENV={sys.prefix}", f"LAB_DIR={root}",
            f"LAB_ARGS={' '.join(options)}"]


def wait_until_up(url: str, token: str, server: subprocess.Popen, log: Path, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"make lab exited with {server.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"make lab did not answer within {timeout_s:.0f} s:\n{log.read_text()[-3000:]}")


def stop(server: subprocess.Popen) -> None:
    """SIGTERM to make and the JupyterLab under it (one process group); JupyterLab shuts its kernel down."""
    os.killpg(server.pid, signal.SIGTERM)
    try:
        server.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    root, home = tmp_path_factory.mktemp("lab-root"), tmp_path_factory.mktemp("lab-home")
    notebook, cells = write_notebook(root)
    write_settings(home / "settings")
    port, token = free_port(), secrets.token_hex(16)
    # HF_HUB_OFFLINE is left to the Makefile, so the kernel check sees what `make lab` sets.
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"} | {
        "JUPYTERLAB_SETTINGS_DIR": str(home / "settings"), "JUPYTERLAB_WORKSPACES_DIR": str(home / "workspaces"),
        "JUPYTER_RUNTIME_DIR": str(home / "runtime")}
    log = home / "lab.log"
    with log.open("w") as out:
        server = subprocess.Popen(lab_command(root, port, token), env=env, stdout=out, stderr=subprocess.STDOUT,
                                  start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(url, token, server, log)
        yield Lab(url, token, notebook, cells[:-1], cells[-1])
    finally:
        stop(server)


def expected_table(**setting) -> str:
    """What the planner prints for `setting` in the kernel: its defaults at tiny scale, the device start() resolves."""
    from xcomp_lab.course.params import check_params
    from xcomp_lab.lessons.planner import plan

    device = check_params(scale="tiny", device="auto").device
    defaults = {"card_gb": 48, "dtype": "float16", "quantization": "none", "batch_size": 1, "image_size": 112,
                "new_tokens": 16, "attn_implementation": "eager"}
    return plan(**{**defaults, **setting}, scale="tiny", device=device).estimate.table()


def run_cell(page, index: int):
    """Select cell `index`, run it with Ctrl+Enter, wait for its execution count, and fail on an error output."""
    from playwright.sync_api import expect

    cell = page.locator(".jp-Notebook .jp-Cell").nth(index)
    cell.locator(".jp-InputPrompt").click()
    page.keyboard.press("Control+Enter")
    expect(cell.locator(".jp-InputPrompt")).to_have_text(re.compile(r"\[\d+\]:"), timeout=CELL_TIMEOUT_MS)
    errors = cell.locator('[data-mime-type="application/vnd.jupyter.error"]')
    assert errors.count() == 0, f"cell {index} raised:\n{errors.first.inner_text()}"
    return cell


def test_planner_updates_text_and_chart_in_jupyterlab(lab: Lab, tmp_path: Path) -> None:
    from playwright.sync_api import expect, sync_playwright

    from xcomp_lab.lessons.planner import card_label
    from xcomp_lab.memory.cards import card_for_gb

    screenshot = Path(os.environ.get("BROWSER_SCREENSHOT") or tmp_path / "planner-browser.png")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        page.goto(f"{lab.url}/lab/tree/{lab.notebook}?reset&token={lab.token}")
        before, after = expected_table(), expected_table(card_gb=24, dtype="float32")  # while JupyterLab loads
        assert before != after
        kernel_status = page.get_by_title(re.compile("^Change kernel for"))
        expect(kernel_status).to_have_text(re.compile(r"^Python 3.* \| Idle$"), timeout=CELL_TIMEOUT_MS)
        page.keyboard.press("Control+B")  # hide the file browser
        planner = [run_cell(page, index) for index in lab.run_cells][-1]

        text, chart = planner.locator(".widget-output pre"), planner.locator(".widget-output img")
        expect(text).to_have_text(before, timeout=UPDATE_TIMEOUT_MS)
        expect(chart).to_have_count(1)
        first_chart = chart.get_attribute("src")

        planner.locator(".widget-dropdown", has_text="card").locator("select").select_option(card_label(card_for_gb(24)))
        planner.locator(".widget-dropdown", has_text="dtype").locator("select").select_option("float32")
        planner.get_by_role("button", name="Predict").click()
        expect(text).to_have_text(after, timeout=UPDATE_TIMEOUT_MS)
        assert text.inner_text().strip() == after
        expect(chart).to_have_count(1)
        assert chart.get_attribute("src") != first_chart, "the planner's text updated but its chart did not"

        planner.scroll_into_view_if_needed()
        page.screenshot(path=str(screenshot))
        kernel = run_cell(page, lab.check_cell).locator(".jp-OutputArea-output pre").inner_text().split()
        assert kernel == [sys.prefix, "1"], f"kernel reports {kernel}; expected this environment ({sys.prefix}) and 1"
        browser.close()
