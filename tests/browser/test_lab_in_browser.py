"""End to end: the notebooks in a real JupyterLab, in headless Chromium.

Two kinds of items share one server and one browser:

- **Run All** (``test_notebook_runs_in_jupyterlab``): the notebook runs from the menu, on a fresh
  copy, and what the page shows is checked (below). By default these are the notebooks with
  widgets, which only a browser can check. ``LORA_COURSE_BROWSER_RUN_ALL=all`` runs every notebook
  this way (every one passes; it adds about 5 minutes, which takes the whole suite past 10 minutes
  on 2 cores), or give a comma-separated list of notebook stems.
- **Stored view** (``test_stored_notebook_renders_in_jupyterlab``): a notebook left out of Run All
  is opened as committed, outputs included, as a learner who only reads it sees it: every stored
  plot must load, no stored output is a traceback, every image of the prose loads. (Its cells also
  run under ``pytest --nbval`` in a real kernel, which checks every output against the stored one.)
  The website test (``tests/test_site.py``) opens every stored page in Chromium as well.

For Run All, one JupyterLab server and one browser serve all notebooks (module-scoped fixture), on fresh copies
with every output and the saved widget state stripped, so everything checked is produced now. Each
notebook is its own test item, run one after another: open it alone, Run > Run All Cells from the
menu, check what the page shows against the stored notebook, then close the page and shut its
kernel down before the next one (memory stays at one kernel). Checked for every notebook:

- no traceback and no stderr output the stored notebook does not have, no page error;
- every plot rendered: as many loaded images in cell outputs as the stored notebook has image
  outputs, and every image inside a widget loaded;
- every widget drawn as a real widget: as many widget views drawn as the stored notebook has
  widget-view outputs (tqdm bars included, even those that close again when their loop ends), and
  no text fallback such as ``interactive(children=(IntSlider(value=4, ...``.

Notebook 06 is also used as a learner would: the rank slider is moved with the keyboard and the
trainable-parameter count and the plot must change.

Every wait has a timeout, so a hang fails with a screenshot instead of stalling CI. Screenshots and
per-notebook timings go to ``artifacts/browser/``. All items live in this one file so that
pytest-xdist's ``--dist loadfile`` keeps them on one worker with one server.

Without Chromium (or Playwright) the tests skip and say how to get it, unless
LORA_COURSE_REQUIRE_BROWSER=1 (CI), where they fail instead.
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import nbformat
import pytest

from .chromium import launched_chromium
from .jupyterlab import (close_notebooks, notebook_report, open_lab, open_notebook, run_all_cells, running_jupyterlab,
                         shut_down_kernels)

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9]*.ipynb"))
STORED_FOLDER = "stored"   # beside notebooks/ in the server root, so "../images/..." links resolve alike
ARTIFACTS = ROOT / "artifacts" / "browser"
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
WIDGET_STATE = "application/vnd.jupyter.widget-state+json"
OPEN_TIMEOUT_MS = 90_000       # page, Lab and kernel ready
RUN_TIMEOUT_MS = 300_000       # Run All of one notebook (each takes well under 60 s on a quiet CPU)


@dataclass
class Lab:
    page: object                 # one page with JupyterLab loaded, reused by every notebook
    base: str
    page_errors: list


def _fresh_copies(root: Path) -> Path:
    """The repository's layout with fresh notebook copies: notebooks/ holds the copies; images/ and
    docs/ are copied (Lab serves them to the page, and the server refuses files behind links that
    leave its root); every other top-level entry (scripts/ that a notebook reads, ...) is a link to
    the checkout, so the kernels find what they find in the repository."""
    (root / "notebooks").mkdir(parents=True)
    for entry in ROOT.iterdir():
        if entry.name in ("images", "docs"):
            shutil.copytree(entry, root / entry.name)
        elif entry.name not in ("notebooks", "artifacts") and not entry.name.startswith("."):
            (root / entry.name).symlink_to(entry, target_is_directory=entry.is_dir())
    (root / STORED_FOLDER).mkdir()
    for path in NOTEBOOKS:
        shutil.copy(path, root / STORED_FOLDER / path.name)  # as committed, outputs and widget state included
        nb = nbformat.read(path, as_version=4)
        for cell in nb.cells:
            if cell.cell_type == "code":
                cell.outputs, cell.execution_count = [], None
        nb.metadata.pop("widgets", None)  # no saved widget state: every widget seen must come from this run
        nbformat.write(nb, root / "notebooks" / path.name)
    return root


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / "timing.txt").write_text("notebook                                  open (s)  run all (s)\n")
    root = _fresh_copies(tmp_path_factory.mktemp("lab"))
    with launched_chromium() as browser, running_jupyterlab(root) as base:
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(60_000)
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        open_lab(page, base, timeout_ms=OPEN_TIMEOUT_MS)
        yield Lab(page, base, errors)


@dataclass
class Stored:
    """What the committed notebook shows, which the browser must show too."""
    image_outputs: int       # image/png outputs of cells
    widget_views: int        # widget-view outputs (tqdm bars included)
    widget_images: int       # images inside displayed widgets: Image models, plots captured by Output
    stderr_outputs: int

    @classmethod
    def of(cls, path: Path) -> "Stored":
        nb = nbformat.read(path, as_version=4)
        outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
        state = nb.metadata.get("widgets", {}).get(WIDGET_STATE, {}).get("state", {})
        views = [o["data"][WIDGET_VIEW]["model_id"] for o in outputs if WIDGET_VIEW in o.get("data", {})]
        return cls(image_outputs=sum("image/png" in o.get("data", {}) for o in outputs),
                   widget_views=len(views),
                   widget_images=sum(_images_in(state, view) for view in views),
                   stderr_outputs=sum(o.get("name") == "stderr" for o in outputs))


def _images_in(state: dict, model_id: str) -> int:
    model = state.get(model_id)
    if model is None:
        return 0
    own = model["model_name"] == "ImageModel"
    captured = sum("image/png" in o.get("data", {}) for o in model["state"].get("outputs", []))
    children = sum(_images_in(state, c.removeprefix("IPY_MODEL_")) for c in model["state"].get("children", []))
    return own + captured + children


def _trainable(text: str) -> int:
    match = re.search(r"trainable parameters: ([\d,]+)", text)
    assert match, f"no trainable-parameter count in {text!r}"
    return int(match.group(1).replace(",", ""))


def _move_the_rank_slider(page) -> None:
    """Notebook 06: the lab renders as widgets and answers a keyboard move of the rank slider."""
    lab = page.locator(".jp-OutputArea-output .widget-vbox", has=page.locator(".widget-hslider")).first
    lab.wait_for(state="visible", timeout=30_000)
    assert page.locator(".widget-toggle-buttons").count() == 1              # the heatmap menu
    rank_slider = lab.locator(".widget-hslider", has=page.locator("label", has_text="rank r"))
    readout = rank_slider.locator(".widget-readout")
    count = lab.locator(".widget-html")
    plot = lab.locator("img.widget-image")
    lab.scroll_into_view_if_needed()
    assert readout.text_content().strip() == "5"                              # set by the timing cell
    count_before, src_before = _trainable(count.text_content()), plot.get_attribute("src")
    assert count_before == 6 * 5 * (48 + 48) + 98   # 6 adapted 48×48 matrices (q, v × 3 blocks), 48×2+2 head
    lab.screenshot(path=str(ARTIFACTS / "06_lab_rank5.png"))

    handle = rank_slider.locator(".noUi-handle")
    handle.focus()
    handle.press("ArrowRight")
    page.wait_for_function(
        "([el, before]) => el.textContent.includes('trainable parameters') && !el.textContent.includes(before)",
        arg=[count.element_handle(), f"{count_before:,}"], timeout=30_000)
    page.wait_for_function("([el, before]) => el.getAttribute('src') !== before",
                           arg=[plot.element_handle(), src_before], timeout=30_000)
    assert readout.text_content().strip() == "6"
    assert _trainable(count.text_content()) == 6 * 6 * (48 + 48) + 98
    lab.screenshot(path=str(ARTIFACTS / "06_lab_rank6.png"))


# Extra checks, as a learner would use the notebook, run after the common ones.
INTERACTIONS = {"06_rank_and_alpha_lab.ipynb": _move_the_rank_slider}


def _run_all_selection() -> list[Path]:
    """The notebooks to Run All in the browser (module docstring): those with widgets by default."""
    chosen = os.environ.get("LORA_COURSE_BROWSER_RUN_ALL", "").strip()
    if chosen == "all":
        return NOTEBOOKS
    if chosen in ("", "widgets"):
        return [p for p in NOTEBOOKS if Stored.of(p).widget_views > 0 or p.name in INTERACTIONS]
    stems = {s.strip() for s in chosen.split(",")}
    unknown = stems - {p.stem for p in NOTEBOOKS}
    if unknown:
        raise ValueError(f"LORA_COURSE_BROWSER_RUN_ALL names unknown notebooks {sorted(unknown)}; "
                         f"choose from {[p.stem for p in NOTEBOOKS]}, 'widgets' or 'all'")
    return [p for p in NOTEBOOKS if p.stem in stems]


RUN_ALL = _run_all_selection()
STORED_ONLY = [p for p in NOTEBOOKS if p not in RUN_ALL]


if STORED_ONLY:  # not defined when LORA_COURSE_BROWSER_RUN_ALL=all runs every notebook
    @pytest.mark.parametrize("path", STORED_ONLY, ids=[p.stem for p in STORED_ONLY])
    def test_stored_notebook_renders_in_jupyterlab(lab, path):
        stored = Stored.of(path)
        nb = nbformat.read(path, as_version=4)
        tracebacks = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.get("output_type") == "error"]
        assert not tracebacks, f"{path.name} is committed with an error output: {tracebacks[0].get('ename')}"
        page = lab.page
        lab.page_errors.clear()
        try:
            open_notebook(page, f"{STORED_FOLDER}/{path.name}", timeout_ms=OPEN_TIMEOUT_MS)
            page.wait_for_function(
                "(n) => [...document.querySelectorAll('.jp-NotebookPanel:not(.lm-mod-hidden) .jp-OutputArea .jp-RenderedImage img')]"
                ".filter(i => i.complete && i.naturalWidth > 0).length >= n", arg=stored.image_outputs, timeout=30_000)
            shown = notebook_report(page)
            assert shown["cellImagesLoaded"] == shown["cellImages"] == stored.image_outputs, (
                f"{path.name}: {shown['cellImagesLoaded']} of {shown['cellImages']} stored plots loaded, "
                f"the notebook has {stored.image_outputs}")
            assert not [t for t in shown["stderr"] if "Traceback" in t]
            assert not shown["markdownImagesBroken"], shown["markdownImagesBroken"]
            assert not lab.page_errors, lab.page_errors
        except BaseException:
            with contextlib.suppress(Exception):
                page.screenshot(path=str(ARTIFACTS / f"{path.stem}_stored_FAILED.png"), full_page=True)
            raise
        finally:
            shut_down_kernels(lab.base)
            try:
                close_notebooks(page)
            except Exception:
                open_lab(page, lab.base, timeout_ms=OPEN_TIMEOUT_MS)


@pytest.mark.parametrize("path", RUN_ALL, ids=[p.stem for p in RUN_ALL])
def test_notebook_runs_in_jupyterlab(lab, path):
    stored = Stored.of(path)
    page = lab.page
    lab.page_errors.clear()
    try:
        start = time.perf_counter()
        open_notebook(page, f"notebooks/{path.name}", timeout_ms=OPEN_TIMEOUT_MS)
        opened = time.perf_counter()
        run_all_cells(page, timeout_ms=RUN_TIMEOUT_MS)
        ran = time.perf_counter()
        with open(ARTIFACTS / "timing.txt", "a") as timing:
            timing.write(f"{path.stem:40s} {opened - start:8.1f} {ran - opened:12.1f}\n")
        shown = notebook_report(page)

        tracebacks = [text for text in shown["stderr"] if "Traceback" in text]
        assert not tracebacks, f"{path.name} raised:\n{tracebacks[0]}"
        assert len(shown["stderr"]) <= stored.stderr_outputs, f"{path.name}: unexpected stderr: {shown['stderr']}"
        assert not lab.page_errors, lab.page_errors

        assert shown["cellImagesLoaded"] == shown["cellImages"] == stored.image_outputs, (
            f"{path.name}: {shown['cellImagesLoaded']} of {shown['cellImages']} plots loaded, "
            f"the stored notebook has {stored.image_outputs}")
        assert not shown["markdownImagesBroken"], shown["markdownImagesBroken"]

        assert not shown["fallbacks"], f"{path.name}: widgets shown as text: {shown['fallbacks']}"
        assert shown["drawnWidgetViews"] == stored.widget_views, (
            f"{path.name}: {shown['drawnWidgetViews']} widget views drawn, the stored notebook has {stored.widget_views}")
        assert shown["widgetImagesLoaded"] == shown["widgetImages"] == stored.widget_images, (
            f"{path.name}: {shown['widgetImagesLoaded']} of {shown['widgetImages']} widget images loaded, "
            f"the stored widget state has {stored.widget_images}")

        if path.name in INTERACTIONS:
            INTERACTIONS[path.name](page)
        page.screenshot(path=str(ARTIFACTS / f"{path.stem}.png"))
    except BaseException:
        with contextlib.suppress(Exception):   # keep the original error if the page is gone too
            page.screenshot(path=str(ARTIFACTS / f"{path.stem}_FAILED.png"), full_page=True)
        raise
    finally:
        shut_down_kernels(lab.base)
        try:
            close_notebooks(page)
        except Exception:                       # a stuck tab: reload Lab so the next notebook starts clean
            open_lab(page, lab.base, timeout_ms=OPEN_TIMEOUT_MS)
