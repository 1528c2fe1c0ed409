"""The course website (``scripts/build_site.py``): built offline from the stored outputs, then read
page by page in headless Chromium.

The references are the committed notebooks themselves (their outputs, headings and stored widget
state, read here with nbformat) and the HTML Sphinx wrote, never the build script's own bookkeeping:
every stored plot must be on its page and load, every pitfall link must land on an element that
exists on the target page, every widget picture must show the values the notebook stored. The
browser part blocks every request that does not go to the local server and fails on any console
error, broken image, unrendered equation or navigation out of course order.

Without Chromium (or Playwright) the browser test skips and says how to get it, unless
LORA_COURSE_REQUIRE_BROWSER=1 (CI), where it fails instead. Screenshots go to ``artifacts/site/``.
"""
from __future__ import annotations

import functools
import http.server
import importlib.util
import re
import subprocess
import sys
import threading
import time
from html.parser import HTMLParser
from pathlib import Path

import nbformat
import pytest

from browser.chromium import launched_chromium

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9]*.ipynb"))
ARTIFACTS = ROOT / "artifacts" / "site"
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
WIDGET_STATE = "application/vnd.jupyter.widget-state+json"
# A word from notebook 09 that no earlier notebook, nor the README, uses (checked below).
SEARCH_TERM, SEARCH_NOTEBOOK = "ModulesToSaveWrapper", "09_from_lora_course_to_peft"


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


build_site = _load("build_site", ROOT / "scripts" / "build_site.py")
course_links = sys.modules["course_links"]       # site/course_links.py, imported by build_site
static_widgets = sys.modules["static_widgets"]   # site/static_widgets.py


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """Build the website once, with the README's command, into a temporary folder."""
    build_dir = tmp_path_factory.mktemp("site")
    start = time.perf_counter()
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "build_site.py"), "--build-dir", str(build_dir)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / "timing.txt").write_text(f"site build: {time.perf_counter() - start:.1f} s\n")
    return build_dir / "html"


def _stored_images(notebook) -> int:
    return sum("image/png" in o.get("data", {}) for c in notebook.cells for o in c.get("outputs", []))


def _widget_views(notebook) -> list[tuple[str, str]]:
    """(model id, text fallback) of every widget-view output: the fallback is what a page without
    the widget state would show, e.g. "full FT:   0%|          | 0/120 [00:00<?, ?it/s]"."""
    return [(o["data"][WIDGET_VIEW]["model_id"], o["data"].get("text/plain", ""))
            for c in notebook.cells for o in c.get("outputs", []) if WIDGET_VIEW in o.get("data", {})]


class _Page(HTMLParser):
    """The ids, image sources and links of one built page."""

    def __init__(self, path: Path):
        super().__init__()
        self.ids, self.images, self.links = set(), [], []
        self.feed(path.read_text(encoding="utf-8"))

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if "id" in attrs:
            self.ids.add(attrs["id"])
        if tag == "img":
            self.images.append(attrs.get("src", ""))
        if tag == "a" and attrs.get("href"):
            self.links.append(attrs["href"])


def test_every_notebook_is_a_page_with_its_stored_plots(site):
    for path in NOTEBOOKS:
        page = site / "notebooks" / f"{path.stem}.html"
        assert page.exists(), f"no page for {path.name}"
        notebook = nbformat.read(path, as_version=4)
        images = [src for src in _Page(page).images if "_images/" in src]
        # Each stored plot is an extracted PNG; markdown figures (../images/*.png) are there as well.
        markdown_figures = sum(len(re.findall(r"!\[[^\]]*\]\(", c.source)) for c in notebook.cells
                               if c.cell_type == "markdown")
        assert len(images) == _stored_images(notebook) + markdown_figures, path.name
        for src in images:
            assert (page.parent / src).resolve().is_file(), f"{path.name}: missing {src}"


def test_widget_outputs_become_pictures_of_their_stored_state(site):
    for path in NOTEBOOKS:
        stored = nbformat.read(path, as_version=4)
        staged = nbformat.read(site.parent / "src" / "notebooks" / path.name, as_version=4)  # what Sphinx read
        assert "widgets" not in staged.metadata        # no widget state: no widget JavaScript on the page
        assert not _widget_views(staged)
        state = stored.metadata.get("widgets", {}).get(WIDGET_STATE, {}).get("state", {})
        pictures = [o["data"]["text/html"] for c in staged.cells for o in c.get("outputs", [])
                    if "static-widget" in o.get("data", {}).get("text/html", "")]
        assert len(pictures) == len(_widget_views(stored)), path.name
        for (model_id, fallback), picture in zip(_widget_views(stored), pictures):
            children = state[model_id]["state"].get("children", [])
            names = [state[c.removeprefix("IPY_MODEL_")]["model_name"] for c in children]
            if names == ["HTMLModel", "FloatProgressModel", "HTMLModel"]:     # a tqdm bar
                prefix, _, suffix = (state[c.removeprefix("IPY_MODEL_")]["state"]["value"] for c in children)
                assert prefix in picture and suffix in picture, picture
                assert "JupyterLab" not in picture                         # no "live" note on a progress bar
            else:
                assert "in JupyterLab" in picture, f"{path.name}: interactive widget without the live note"
            # Every stored picture inside the widget (Image models, plots captured by Output) is shown.
            for ref in _descendants(state, model_id):
                model = state[ref]
                for buffer in model.get("buffers", []):
                    assert buffer["data"] in picture, f"{path.name}: stored {model['model_name']} image missing"
                for output in model["state"].get("outputs", []):
                    if "image/png" in output.get("data", {}):
                        assert output["data"]["image/png"].strip() in picture
            assert fallback not in picture and "IntSlider(" not in picture


def _descendants(state: dict, model_id: str):
    yield model_id
    for child in state[model_id]["state"].get("children", []):
        yield from _descendants(state, child.removeprefix("IPY_MODEL_"))


def test_a_widget_the_site_cannot_draw_is_refused():
    models = {"a": {"model_name": "FancyPlotModel", "state": {}}}
    with pytest.raises(static_widgets.UnknownWidget, match="FancyPlotModel"):
        static_widgets.render_view(models, "a")
    with pytest.raises(static_widgets.UnknownWidget, match="no stored state"):
        static_widgets.render_view(models, "missing")


def test_pitfall_links_land_on_existing_headings(site):
    for page in (site / "index.html", site / "docs" / "pitfalls.html"):
        links = [href for href in _Page(page).links if "notebooks/" in href and "#" in href]
        assert len(links) >= 12 + 8, f"{page.name}: only {len(links)} links to notebook sections"
        for href in links:
            target, anchor = href.split("#", 1)
            assert anchor in _Page((page.parent / target).resolve()).ids, f"{page.name}: {href} lands nowhere"


def _fake_course(root: Path, reference: str) -> Path:
    """A one-notebook course whose pitfall index holds ``reference``."""
    (root / "notebooks").mkdir(parents=True)
    (root / "images").mkdir()
    (root / "docs").mkdir()
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell("# 01 · Intro\n\n## 1. Counting\n\n"
                                                                              "### Pitfall #4: numel")])
    nbformat.write(notebook, root / "notebooks" / "01_intro.ipynb")
    table = f"| # | Pitfall | What | Where |\n|---|---|---|---|\n| 4 | counts | numel | {reference} |\n"
    (root / "docs" / "pitfalls.md").write_text("# Pitfalls\n\n" + table)
    (root / "README.md").write_text("# Course\n\n## The pitfalls\n\n" + table + "\n## More\n")
    return root


@pytest.mark.parametrize("reference, error", [
    ('`01_intro`, §1 "Pitfall #4: numel"', None),
    ('`01_intro`, §1 "Pitfall #5: numel"', "no heading"),
    ('`01_intro`, §2 "Counting"', "sections numbered 2"),
    ('`01_intro`, §1 "Counting" or "Pitfall #4: numel"', "could not turn this into links"),
    ("see notebook 01", "links to no notebook section"),
])
def test_a_stale_section_reference_stops_the_build(tmp_path, reference, error):
    root = _fake_course(tmp_path / "course", reference)
    if error is None:
        build_site.stage(tmp_path / "src", root=root)
        assert "(notebooks/01_intro.ipynb#pitfall-4-numel)" in (tmp_path / "src" / "index.md").read_text()
    else:
        with pytest.raises(SystemExit, match=error):
            build_site.stage(tmp_path / "src", root=root)


# ---------------------------------------------------------------------------------------- browser

class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def served(site):
    """The website on a local HTTP server (an ordinary web host, as a learner's would be)."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(site)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


# Pages photographed for people to look at (a screenshot of every page costs CI time).
SCREENSHOTS = {"index", "notebooks/02_low_rank_updates", "notebooks/04_lora_vs_full_finetuning", "docs/pitfalls"}
IMAGES_JS = "() => [...document.images].map(i => ({src: i.getAttribute('src').slice(0, 80), ok: i.complete && i.naturalWidth > 0}))"
MATH_DONE_JS = """() => { const math = document.querySelectorAll('.math');
  return [...math].every(m => m.querySelector('mjx-container')); }"""


def _check_page(page, name: str, problems: list[str], outside: list[str]) -> None:
    """Nothing fetched from another site, no console error, no broken image, every equation typeset
    by MathJax (and a screenshot of a few pages)."""
    assert not outside, f"{name} tried to load from other sites: {sorted(set(outside))}"
    assert not problems, f"{name}: {problems}"
    images = page.evaluate(IMAGES_JS)
    broken = [i["src"] for i in images if not i["ok"]]
    assert not broken, f"{name}: images that did not load: {broken}"
    if page.locator(".math").count():
        page.wait_for_function(MATH_DONE_JS, timeout=20_000)
        assert page.locator("mjx-merror").count() == 0, f"{name}: MathJax could not typeset an equation"
    if name in SCREENSHOTS:
        page.screenshot(path=str(ARTIFACTS / f"{name.replace('/', '_')}.png"))
    assert not problems, f"{name}: {problems}"


def _path(url: str, base: str) -> str:
    return url.removeprefix(base).split("#")[0].split("?")[0]


def test_every_page_reads_offline_in_chromium(site, served):
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    expected = ["/index.html"] + [f"/notebooks/{p.stem}.html" for p in NOTEBOOKS] + ["/docs/pitfalls.html"]
    start = time.perf_counter()
    with launched_chromium() as browser:
        context = browser.new_context(viewport={"width": 1280, "height": 900}, service_workers="block")
        problems, outside = [], []

        def only_local(route):
            if route.request.url.startswith(served) or route.request.url.startswith("data:"):
                route.continue_()
            else:
                outside.append(route.request.url)
                route.abort()

        context.route("**/*", only_local)
        page = context.new_page()
        page.set_default_timeout(30_000)
        page.on("console", lambda msg: msg.type == "error" and problems.append(f"console: {msg.text}"))
        page.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
        page.on("requestfailed", lambda req: problems.append(f"request failed: {req.url} {req.failure}"))

        # Walk the whole course with the "next" links, as a reader would, checking each page; each
        # page's "previous" link must point back to the page the walk came from.
        page.goto(f"{served}/index.html", wait_until="load")
        visited, previous = [_path(page.url, served)], [None]
        _check_page(page, "index", problems, outside)
        while page.locator("a.right-next").count():
            page.locator("a.right-next").first.click()
            page.wait_for_load_state("load")
            visited.append(_path(page.url, served))
            back = page.evaluate("() => document.querySelector('a.left-prev')?.href")
            previous.append(_path(back, served) if back else None)
            _check_page(page, visited[-1].strip("/").removesuffix(".html"), problems, outside)
            assert len(visited) <= len(expected), f"the next links go on past the course: {visited}"
        assert visited == expected, "the next links do not follow the course order"
        assert previous[1:] == visited[:-1], f"the previous links do not follow the course order: {previous}"

        # The static widget pictures of notebook 06 look like the lab (for people to check).
        page.goto(f"{served}/notebooks/06_rank_and_alpha_lab.html", wait_until="load")
        page.locator(".static-widget").first.screenshot(path=str(ARTIFACTS / "06_widget_picture.png"))

        # Search, through the search box, for a word only a late notebook uses.
        page.goto(f"{served}/index.html", wait_until="load")
        page.locator("button.search-button-field").first.click()
        box = page.locator("#pst-search-dialog input[type=search]")
        box.fill(SEARCH_TERM)
        box.press("Enter")
        page.wait_for_url(re.compile(r"/search\.html\?q="))
        page.wait_for_selector(".search-summary", timeout=20_000)
        found = [_path(a.get_attribute("href"), "") for a in page.locator("#search-results ul.search li a").all()]
        page.screenshot(path=str(ARTIFACTS / "search.png"))
        assert any(SEARCH_NOTEBOOK in href for href in found), f"search for {SEARCH_TERM!r} found {found}"
        earlier = [p.stem for p in NOTEBOOKS if p.stem < SEARCH_NOTEBOOK]
        assert not [h for h in found if any(stem in h for stem in earlier)], found
        assert not problems, problems
        assert not outside, f"pages tried to load from other sites: {sorted(set(outside))}"
        context.close()
    seconds = time.perf_counter() - start
    with open(ARTIFACTS / "timing.txt", "a") as timing:
        timing.write(f"browser walk of {len(expected)} pages + search: {seconds:.1f} s\n")


def test_the_search_term_belongs_to_a_late_notebook():
    """Guard for the search check above: the term must not occur before notebook 09."""
    texts = {"README.md": (ROOT / "README.md").read_text(), "docs/pitfalls.md": (ROOT / "docs/pitfalls.md").read_text()}
    for path in NOTEBOOKS:
        texts[path.name] = path.read_text(encoding="utf-8")
    assert SEARCH_TERM in texts[f"{SEARCH_NOTEBOOK}.ipynb"]
    early = [name for name, text in texts.items()
             if SEARCH_TERM in text and not (name[:2].isdigit() and name >= SEARCH_NOTEBOOK)]
    assert not early, f"{SEARCH_TERM!r} also occurs in {early}: pick another word from {SEARCH_NOTEBOOK}"
