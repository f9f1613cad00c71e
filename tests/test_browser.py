"""Bastion in a real browser: JupyterLab, the Bastion kernel and the owner's notebook, end to end.

One executor with the demo's synthetic patients table and one JupyterLab
server (the demo's own ``set_up``, ``Executor`` and ``JupyterLab``) run on
127.0.0.1 in a temporary demo directory; headless Chromium (Debian's, driven
by the Python ``playwright`` package, never a browser Playwright downloads)
plays the two people:

* the scientist opens ``examples/scientist.ipynb``, sees the Bastion kernel
  picked, runs every cell from the Run menu and reads the rendered page: the
  aggregate table, the refused ``import os``, a completion popup after a dot,
  and each chart cell's Vega-Lite chart drawn as SVG or canvas;
* the owner, in a second browser context, opens ``examples/owner.ipynb``
  (Python 3 kernel), runs it, and approves each query the scientist's cells
  wait on (row-level rows, a chart with small bins) with the Approve button of
  the owner console's widgets, where the request shows as pending; the
  scientist's page then shows the released result in the same cell.

Expected values are computed with plain polars on the demo's CSV.  Screenshots
of both pages go to ``$BASTION_BROWSER_ARTIFACTS`` (default: pytest's
temporary directory, printed at the end); the README's ones in ``docs/screenshots/``
were copied from such a run.

The notebooks are copied into the temporary root, so JupyterLab's autosave
never touches ``examples/``.  Without Chromium or the ``playwright`` package
every test here is skipped with the reason, never passed.
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import nbformat
import polars as pl
import pytest

from bastion_kernel.contract.protocol import ERROR_NAMES
from owner_console import demo
from owner_console.workspace import Workspace

pytestmark = pytest.mark.slow  # starts services or takes seconds: not in the fast tier

ROOT = Path(__file__).resolve().parent.parent
SCIENTIST_NOTEBOOK = demo.SCIENTIST_NOTEBOOK
OWNER_NOTEBOOK = demo.OWNER_NOTEBOOK

# Explicit waits, in milliseconds (Playwright's unit).
PAGE_MS = 60_000  # JupyterLab's first load of its bundles
CELL_MS = 60_000  # one cell's answer from the executor
RUN_ALL_MS = 150_000  # the whole scientist notebook, approvals included
WIDGET_MS = 60_000

# What a root process needs to run Chromium here; the background-networking
# flags keep it from dialling out, which the closed network refuses.
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage"]

# JupyterLab user settings for the run: no news prompt, no update check, and
# every cell kept in the DOM (windowing would drop cells scrolled out of view).
LAB_SETTINGS = {
    "@jupyterlab/apputils-extension:notification": {"fetchNews": "false", "checkForUpdates": False},
    "@jupyterlab/notebook-extension:tracker": {"windowingMode": "none"},
    "@jupyterlab/docmanager-extension:plugin": {"autosave": False},
}

# -- can a browser run here? -----------------------------------------------------------------

def chromium_path() -> str | None:
    """Debian's Chromium on PATH, or None when there is none."""
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    return None


def require_browser() -> str:
    """The Chromium to drive; skip (with the reason) when this machine cannot run the test."""
    if importlib.util.find_spec("playwright") is None:
        pytest.skip("the Python package playwright is not installed "
                    "(scripts/test.sh installs it with the test extra: pip install -e '.[test]')")
    chosen = os.environ.get("BASTION_CHROMIUM")
    if chosen:
        if not Path(chosen).is_file():
            pytest.skip(f"BASTION_CHROMIUM={chosen} is not a file")
        return chosen
    path = chromium_path()
    if path is None:
        pytest.skip("no Chromium on PATH: scripts/test.sh installs Debian's chromium when it runs as root "
                    "with apt-get; elsewhere install it, or point BASTION_CHROMIUM at one")
    return path


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def write_lab_settings(directory: Path) -> None:
    """``LAB_SETTINGS`` as JupyterLab user settings files under ``directory``."""
    for plugin, values in LAB_SETTINGS.items():
        package, name = plugin.split(":")
        target = directory / package / f"{name}.jupyterlab-settings"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(values), encoding="utf-8")


# -- the servers and the browser ------------------------------------------------------------

@dataclass
class Stack:
    """The running servers, the browser and what the tests need to know about them."""

    paths: demo.DemoPaths
    lab: demo.JupyterLab
    browser: object
    artifacts: Path

    def url(self, notebook: str, workspace: str) -> str:
        # One JupyterLab workspace per person: otherwise the owner's page
        # would restore the scientist's open tabs, and the other way round.
        return (f"http://127.0.0.1:{self.lab.port}/lab/workspaces/{workspace}/tree/{notebook}"
                f"?reset&token={self.lab.token}")

    def patients(self) -> pl.DataFrame:
        return pl.read_csv(self.paths.data_file)

    def screenshot(self, page, name: str, **options) -> Path:
        target = self.artifacts / f"{name}.png"
        page.screenshot(path=str(target), **options)
        return target


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Iterator[Stack]:
    chromium = require_browser()
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory(prefix="bastion-browser-") as scratch:
        scratch = Path(scratch)
        # JupyterLab's root: copies of the notebooks (autosave and the run's
        # outputs land here, not in examples/) and setup.cfg, which the owner
        # notebook looks for to find "the repository".
        root = scratch / "root"
        shutil.copytree(ROOT / "examples", root / "examples")
        shutil.copy(ROOT / "setup.cfg", root / "setup.cfg")
        write_lab_settings(scratch / "lab-settings")
        # Kept after the run (pytest keeps its last few temporary directories).
        artifacts = Path(os.environ.get("BASTION_BROWSER_ARTIFACTS")
                         or tmp_path_factory.mktemp("browser-screenshots"))
        artifacts.mkdir(parents=True, exist_ok=True)

        paths = demo.DemoPaths(root=root, demo=scratch / "demo")
        log: list[str] = []
        endpoint = demo.set_up(paths, free_port(), log=log.append)
        executor = lab = None
        playwright = browser = None
        try:
            executor = demo.Executor(paths, endpoint)
            executor.wait_ready(60)
            # JupyterLab reads its environment when it starts: its settings,
            # workspaces and runtime files go to the scratch directory.
            with pytest.MonkeyPatch.context() as patch:
                patch.setenv("JUPYTERLAB_SETTINGS_DIR", str(scratch / "lab-settings"))
                patch.setenv("JUPYTERLAB_WORKSPACES_DIR", str(scratch / "lab-workspaces"))
                patch.setenv("JUPYTER_RUNTIME_DIR", str(scratch / "runtime"))
                lab = demo.JupyterLab(paths, free_port(), open_browser=False)
            lab.wait_ready(120)
            playwright = sync_playwright().start()
            browser = playwright.chromium.launch(executable_path=chromium, headless=True, args=CHROMIUM_FLAGS)
            yield Stack(paths=paths, lab=lab, browser=browser, artifacts=artifacts)
        finally:
            if browser is not None:
                browser.close()
            if playwright is not None:
                playwright.stop()
            # JupyterLab first: it shuts its kernels down while the executor still answers.
            if lab is not None:
                demo.stop(lab.process, "JupyterLab", signal.SIGTERM)
                lab.close_log()
            if executor is not None:
                demo.stop(executor.process, "the executor", signal.SIGINT)
            print(f"\nbrowser screenshots: {artifacts}")
            for line in ("JupyterLab log:", demo.tail(paths.logs / "jupyterlab.log", 15)):
                print(line)


# -- driving JupyterLab ---------------------------------------------------------------------

# The notebook on show; hidden panels (other tabs) hold cells and prompts too.
PANEL = ".jp-NotebookPanel:not(.lm-mod-hidden)"


def open_notebook(stack: Stack, notebook: str, person: str):
    """A fresh browser context (its own cookies: one person) with ``notebook`` open and idle."""
    context = stack.browser.new_context(viewport={"width": 1400, "height": 1000})
    context.set_default_timeout(PAGE_MS)
    page = context.new_page()
    page.goto(stack.url(notebook, person))
    page.locator(f"{PANEL} .jp-Notebook .jp-Cell").first.wait_for()
    dismiss_notifications(page)
    wait_idle(page)
    return page


def dismiss_notifications(page) -> None:
    """Close any toast (the news question is switched off by settings; this covers the rest)."""
    for button in page.locator(".jp-toast-button, .Toastify__close-button").all():
        with contextlib.suppress(Exception):
            button.click(timeout=2_000)


def wait_idle(page, timeout: float = PAGE_MS) -> None:
    """Until the notebook's kernel has started and says it is idle.

    The status bar's "NAME | Idle", not the toolbar's execution indicator,
    which already says idle while the kernel is still "Initializing" (and a
    Run All sent then is lost).
    """
    page.locator(".jp-StatusBar-TextItem", has_text=re.compile(r"^(?!No Kernel).+ \| Idle$")).wait_for(
        timeout=timeout)


def run_menu(page, item: str) -> None:
    """Pick ``Run > item`` from JupyterLab's menu bar, as a person would."""
    page.locator(".lm-MenuBar-item", has_text=re.compile(r"^Run$")).click()
    page.locator(".lm-Menu-item:visible", has_text=re.compile(rf"^{re.escape(item)}")).first.click()


def code_cell_index(notebook: Path, predicate) -> int:
    """The position among all cells (DOM order) of the first code cell whose source matches."""
    cells = nbformat.read(notebook, as_version=4).cells
    for index, cell in enumerate(cells):
        if cell.cell_type == "code" and predicate(cell.source):
            return index
    raise AssertionError(f"no such code cell in {notebook.name}")


def cell(page, index: int):
    return page.locator(f"{PANEL} .jp-Notebook .jp-Cell").nth(index)


# Evaluated in the page: "done" once every code cell shows an execution count
# (none queued "[*]" or never run "[ ]"), else the id of a request some output
# shows waiting that is not in ``seen``, else null (keep waiting).
NEXT_EVENT_JS = r"""([panel, seen]) => {
    const notebook = document.querySelector(panel);
    if (!notebook) return null;
    const prompts = [...notebook.querySelectorAll('.jp-CodeCell .jp-InputPrompt')];
    if (prompts.length && prompts.every(p => /^\[\d+\]:$/.test(p.textContent.trim()))) return 'done';
    for (const output of notebook.querySelectorAll('.jp-OutputArea-output')) {
        const match = /waiting for the owner \(request #(\d+)\)/.exec(output.textContent);
        if (match && !seen.includes(Number(match[1]))) return Number(match[1]);
    }
    return null;
}"""


def next_event(page, seen: list[int], timeout: float):
    """Block until the run is done (``"done"``) or a new request is waiting (its id)."""
    return page.wait_for_function(NEXT_EVENT_JS, arg=[PANEL, seen], timeout=timeout).json_value()


def outputs(page) -> str:
    """Every output of the notebook on show, as text (for failure messages)."""
    return "\n---\n".join(page.locator(f"{PANEL} .jp-OutputArea-output").all_inner_texts())


def html_table(output) -> tuple[list[str], list[list[str]]]:
    """Column names and cell texts of the first HTML table in an output area."""
    table = output.locator("table").first
    table.wait_for(timeout=CELL_MS)
    headers = [text.splitlines()[0].strip() for text in table.locator("thead th").all_inner_texts()]
    rows = [row.locator("td").all_inner_texts() for row in table.locator("tbody tr").all()]
    return headers, rows


# -- the owner's side in the browser -------------------------------------------------------

class OwnerPage:
    """``examples/owner.ipynb`` open in its own browser context; approves what the scientist waits on."""

    def __init__(self, stack: Stack):
        self.stack = stack
        self.page = open_notebook(stack, OWNER_NOTEBOOK, "owner")
        self.notebook = stack.paths.root / OWNER_NOTEBOOK
        self.approved: list[int] = []
        run_menu(self.page, "Run All Cells")
        try:
            assert next_event(self.page, [], CELL_MS) == "done"
        except Exception as exc:
            stack.screenshot(self.page, "owner-failed")
            raise AssertionError(f"the owner's notebook did not run through: {exc}\n{outputs(self.page)}") from exc
        self.console().wait_for(timeout=WIDGET_MS)

    def console(self):
        index = code_cell_index(self.notebook, lambda source: "OwnerConsole" in source)
        return cell(self.page, index).locator(".jp-OutputArea-output .jupyter-widgets").first

    def approve(self, request_id: int) -> None:
        """Approve one held request with the console's Approve button, as the owner would."""
        # The Pending tab lists one section per request, titled "#ID scientist ...":
        # open the request's section, look, then press its Approve button.
        titled = self.page.locator(".jupyter-widget-Collapse-header", has_text=re.compile(rf"#{request_id}\b"))
        section = self.console().locator(".jupyter-widget-Collapse", has=titled)
        title = section.locator(".jupyter-widget-Collapse-header")
        title.wait_for(timeout=WIDGET_MS)
        approve = section.locator("button", has_text="Approve")
        if not approve.is_visible():  # a click on the title toggles: open it only if closed
            title.click()
        approve.wait_for(timeout=WIDGET_MS)
        approve.scroll_into_view_if_needed()
        self.stack.screenshot(self.page, f"owner-console-request-{request_id}")
        approve.click()
        # The console's refresh drops the decided request from the queue.
        title.wait_for(state="detached", timeout=WIDGET_MS)
        self.approved.append(request_id)


# -- the scientist's run, shared by the tests below -------------------------------------------

@dataclass
class ScientistRun:
    stack: Stack
    page: object
    owner: OwnerPage
    notebook: Path
    waited_on: list[int]
    kernel_name: str  # the toolbar's kernel picker, read before anything ran
    status_bar: list[str]

    def cell_of(self, snippet: str):
        return cell(self.page, code_cell_index(self.notebook, lambda source: snippet in source))


@pytest.fixture(scope="module")
def scientist(stack: Stack) -> Iterator[ScientistRun]:
    page = open_notebook(stack, SCIENTIST_NOTEBOOK, "scientist")
    kernel_name = page.locator(f"{PANEL} .jp-Toolbar-kernelName").inner_text().strip()
    status_bar = page.locator(".jp-StatusBar-TextItem").all_inner_texts()
    stack.screenshot(page, "scientist-opened")
    owner = OwnerPage(stack)
    notebook = stack.paths.root / SCIENTIST_NOTEBOOK
    run = ScientistRun(stack=stack, page=page, owner=owner, notebook=notebook, waited_on=[],
                       kernel_name=kernel_name, status_bar=status_bar)

    page.bring_to_front()
    run_menu(page, "Run All Cells")
    # The row-level cells hold the run until the owner decides: approve each
    # request the scientist's page shows waiting, until every cell has run.
    deadline = time.monotonic() + RUN_ALL_MS / 1000
    try:
        while (event := next_event(page, run.waited_on, max(1, deadline - time.monotonic()) * 1000)) != "done":
            run.waited_on.append(event)
            waiting = page.locator(f"{PANEL} .jp-OutputArea-output", has_text=f"(request #{event})")
            waiting.first.scroll_into_view_if_needed()
            stack.screenshot(page, f"scientist-waiting-{event}")
            owner.approve(event)
    except Exception:
        stack.screenshot(page, "scientist-failed", full_page=True)
        stack.screenshot(owner.page, "owner-failed", full_page=True)
        raise
    wait_idle(page)
    yield run
    page.context.close()
    owner.page.context.close()


# -- the tests --------------------------------------------------------------------------------

def test_the_scientist_notebook_opens_on_the_bastion_kernel(scientist):
    assert scientist.kernel_name == "Bastion"
    assert "Bastion | Idle" in scientist.status_bar


def test_an_aggregate_renders_as_a_table_computed_like_polars(scientist):
    output = scientist.cell_of('group_by("diagnosis")').locator(".jp-OutputArea-output")
    headers, rows = html_table(output)
    assert headers[:2] == ["diagnosis", "len"] and "mean_cost" in headers
    want = (scientist.stack.patients().group_by("diagnosis")
            .agg(pl.len(), pl.col("cost").mean().alias("mean_cost")))
    got = {row[0]: (int(row[1]), float(row[headers.index("mean_cost")])) for row in rows}
    assert set(got) == set(want["diagnosis"].to_list())
    for diagnosis, count, mean_cost in want.iter_rows():
        assert got[diagnosis][0] == count
        assert got[diagnosis][1] == pytest.approx(mean_cost)
    counts = [int(row[1]) for row in rows]
    assert counts == sorted(counts, reverse=True)  # the cell sorts by len, descending
    output.first.scroll_into_view_if_needed()
    scientist.stack.screenshot(scientist.page, "scientist-aggregate")


def test_python_is_refused_with_a_named_error_in_the_page(scientist):
    refused = scientist.cell_of("import os")
    error = refused.locator('.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]')
    error.wait_for(timeout=CELL_MS)
    text = error.inner_text()
    named = [name for name in ERROR_NAMES if f"{name}:" in text]
    assert named, text
    assert "import" in text.lower()
    # ... and the kernel kept serving: the cell after it ran and rendered a table.
    after = scientist.cell_of('group_by("sex").agg(pl.len()).sort("sex")')
    headers, rows = html_table(after.locator(".jp-OutputArea-output"))
    want = scientist.stack.patients().group_by("sex").agg(pl.len()).sort("sex")
    assert [[row[0], int(row[1])] for row in rows] == [list(r) for r in want.iter_rows()]
    error.scroll_into_view_if_needed()
    scientist.stack.screenshot(scientist.page, "scientist-refusal")


def test_a_row_level_query_waits_is_approved_by_the_owner_and_shows_in_the_same_cell(scientist):
    rows_cell = scientist.cell_of('select(col("age"), col("zip"))')
    assert scientist.waited_on, "no cell showed 'waiting for the owner' during the run"
    assert scientist.owner.approved == scientist.waited_on
    output = rows_cell.locator(".jp-OutputArea-output")
    headers, rows = html_table(output)
    want = scientist.stack.patients().select("age", "zip").head(5)
    assert headers == ["age", "zip"]
    assert rows == [[str(value) for value in row] for row in want.iter_rows()]
    footer = output.locator(".bastion-table p").inner_text()
    match = re.search(r"approved by the owner: request #(\d+)", footer)
    assert match and int(match.group(1)) in scientist.owner.approved, footer
    # Nothing a cell waited on is left waiting; what is (describe()'s order statistics, sent without
    # waiting) is in the owner's console.
    store = Workspace(scientist.stack.paths.workspace).approvals()
    pending = {r.id for r in store.list("pending")}
    assert not pending & set(scientist.owner.approved), pending
    for request_id in pending:
        scientist.owner.page.locator(".jupyter-widget-Collapse-header",
                                     has_text=re.compile(rf"#{request_id}\b")).first.wait_for(timeout=WIDGET_MS)
    if not pending:
        scientist.owner.console().get_by_text("no requests waiting").wait_for(timeout=WIDGET_MS)
    # The hidden column comes back as * even once approved.
    names = scientist.cell_of('select(col("name"))').locator(".jp-OutputArea-output")
    headers, rows = html_table(names)
    assert headers == ["name"] and rows and {row[0] for row in rows} == {"*"}
    output.first.scroll_into_view_if_needed()
    scientist.stack.screenshot(scientist.page, "scientist-approved")
    scientist.stack.screenshot(scientist.owner.page, "owner-notebook")


def test_every_chart_cell_draws_a_vega_lite_chart(scientist):
    cells = nbformat.read(scientist.notebook, as_version=4).cells
    charts = [index for index, c in enumerate(cells) if c.cell_type == "code" and ".plot." in c.source]
    if not charts:
        pytest.skip("examples/scientist.ipynb has no chart cell (df.plot...) yet")
    for index in charts:
        chart = cell(scientist.page, index).locator(".jp-OutputArea-output .vega-embed")
        drawn = chart.locator("svg, canvas").first
        drawn.wait_for(timeout=CELL_MS)
        box = drawn.bounding_box()
        assert box and box["width"] > 50 and box["height"] > 50, (cells[index].source, box)
    for index in charts:
        cell(scientist.page, index).scroll_into_view_if_needed()
        scientist.stack.screenshot(scientist.page, f"scientist-chart-{index}")


def test_a_dot_after_a_frame_pops_up_its_methods(scientist):
    page = scientist.page
    last = page.locator(f"{PANEL} .jp-Notebook .jp-Cell").last
    last.locator(".jp-InputArea-editor").click()
    page.keyboard.press("Escape")
    page.keyboard.press("b")  # a new cell below, in command mode
    page.keyboard.press("Enter")  # edit it
    page.keyboard.type("patients.")
    page.keyboard.press("Tab")
    completer = page.locator(".jp-Completer")
    completer.wait_for(timeout=CELL_MS)
    items = completer.locator(".jp-Completer-item")
    items.first.wait_for()
    names = [text.strip() for text in completer.locator(".jp-Completer-match").all_inner_texts()]
    assert {"group_by", "filter", "select", "fetch"} <= set(names), names
    scientist.stack.screenshot(page, "scientist-completion")
    page.keyboard.press("Escape")
