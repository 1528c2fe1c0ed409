"""End to end: notebook 06 in a real JupyterLab, in headless Chromium.

Starts ``jupyter lab`` on a fresh copy of the notebook (outputs stripped, so everything checked is
produced now), runs all cells from the menu, checks that no cell shows an error and that the lab
renders as real widgets, moves the rank slider with the keyboard and checks that the displayed
trainable-parameter count and the plot change. Screenshots go to ``artifacts/browser/``.

Without Chromium (or Playwright) the test skips and says how to get it, unless
LORA_COURSE_REQUIRE_BROWSER=1 (CI), where it fails instead.
"""
from __future__ import annotations

import os
import re
import time
from pathlib import Path

import nbformat
import pytest

from .jupyterlab import (CHROMIUM_ARGS, HOW_TO_GET_CHROMIUM, find_chromium, open_notebook, run_all_cells,
                         running_jupyterlab)

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOK = "06_rank_and_alpha_lab.ipynb"
ARTIFACTS = ROOT / "artifacts" / "browser"


def _unavailable(reason: str):
    if os.environ.get("LORA_COURSE_REQUIRE_BROWSER") == "1":
        pytest.fail(f"LORA_COURSE_REQUIRE_BROWSER=1 but {reason}")
    pytest.skip(reason + " (set LORA_COURSE_REQUIRE_BROWSER=1 to make this a failure instead of a skip)")


@pytest.fixture
def browser():
    chromium = find_chromium()
    if chromium is None:
        _unavailable(HOW_TO_GET_CHROMIUM)
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("the browser test needs the `playwright` Python package: pip install -r requirements.txt")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


def _fresh_copy(tmp_path: Path) -> Path:
    nb = nbformat.read(ROOT / "notebooks" / NOTEBOOK, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    nb.metadata.pop("widgets", None)  # no saved widget state: every widget seen must come from this run
    nbformat.write(nb, tmp_path / NOTEBOOK)
    return tmp_path


def _trainable(text: str) -> int:
    match = re.search(r"trainable parameters: ([\d,]+)", text)
    assert match, f"no trainable-parameter count in {text!r}"
    return int(match.group(1).replace(",", ""))


def test_lab_runs_and_responds_in_jupyterlab(browser, tmp_path):
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with running_jupyterlab(_fresh_copy(tmp_path)) as base:
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(60_000)
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        open_notebook(page, base, NOTEBOOK)
        run_all_cells(page, timeout_ms=240_000)

        # No cell shows an error (tracebacks render as stderr in JupyterLab), and the page had none.
        stderr = page.locator('.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]')
        assert stderr.count() == 0, stderr.first.inner_text()
        assert not errors, errors

        # The lab rendered as widgets, not as their text repr.
        lab = page.locator(".jp-OutputArea-output .widget-vbox", has=page.locator(".widget-hslider")).first
        lab.wait_for(state="visible")
        assert page.locator(".jp-OutputArea-output", has_text="VBox(children=").count() == 0
        assert page.locator(".widget-toggle-buttons").count() == 1              # the heatmap menu
        rank_slider = lab.locator(".widget-hslider", has=page.locator("label", has_text="rank r"))
        readout = rank_slider.locator(".widget-readout")
        count = lab.locator(".widget-html")
        plot = lab.locator("img.widget-image")
        lab.scroll_into_view_if_needed()
        assert readout.text_content().strip() == "5"                              # set by the timing cell
        count_before, src_before = _trainable(count.text_content()), plot.get_attribute("src")
        assert count_before == 8 * 5 * (64 + 64) + 130
        page.screenshot(path=str(ARTIFACTS / "06_after_run_all.png"))
        lab.screenshot(path=str(ARTIFACTS / "06_lab_rank5.png"))

        # Move the rank slider one step with the keyboard, as a person would.
        handle = rank_slider.locator(".noUi-handle")
        handle.focus()
        handle.press("ArrowRight")
        page.wait_for_function(
            "([el, before]) => el.textContent.includes('trainable parameters') && !el.textContent.includes(before)",
            arg=[count.element_handle(), f"{count_before:,}"], timeout=30_000)
        page.wait_for_function("([el, before]) => el.getAttribute('src') !== before",
                               arg=[plot.element_handle(), src_before], timeout=30_000)
        assert readout.text_content().strip() == "6"
        assert _trainable(count.text_content()) == 8 * 6 * (64 + 64) + 130
        lab.screenshot(path=str(ARTIFACTS / "06_lab_rank6.png"))
        page.close()
    seconds = time.perf_counter() - start
    (ARTIFACTS / "timing.txt").write_text(f"browser test: {seconds:.1f} s\n")
    assert seconds < 240, seconds
