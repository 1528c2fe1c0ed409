"""Sphinx configuration of the course website (built by ``python scripts/build_site.py``).

The sources Sphinx reads are prepared by ``scripts/build_site.py`` in a staging folder (the
README as the front page, the notebooks with their stored outputs, the pitfall index); this file
only says how to render them. Everything a page needs is served from the build itself, so the site
reads offline: no notebook is executed (``nb_execution_mode = "off"``), ipywidgets' JavaScript is
not loaded from a CDN (``nb_ipywidgets_js = {}``; widgets are drawn as stored pictures by
``site/static_widgets.py``), and MathJax is copied from the pinned ``django-static-mathjax``
package instead of Sphinx's default CDN address.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import mathjax  # django-static-mathjax: MathJax 3.2.2, no dependencies

project = "lora-course: how LoRA really works"
author = "the lora-course authors"
copyright = "the lora-course authors"

extensions = ["myst_nb"]
exclude_patterns = ["_build"]
root_doc = "index"

# -- Notebooks: render the committed outputs, never execute -------------------------------------
nb_execution_mode = "off"
nb_ipywidgets_js: dict = {}       # no require.js / html-manager from a CDN
nb_merge_streams = True           # a cell's many print()s read as one block, as in JupyterLab
nb_output_stderr = "show"

# -- Markdown ------------------------------------------------------------------------------------
myst_enable_extensions = ["dollarmath", "amsmath"]
myst_heading_anchors = 3          # "#2-merge-and-unmerge" anchors, used by the pitfall links

# -- Math: MathJax 3 from the build, not from a CDN ----------------------------------------------
MATHJAX_SOURCE = Path(mathjax.__file__).parent / "static" / "mathjax" / "es5"
# What tex-chtml.js loads at run time: TeX extensions (autoload), the CHTML fonts, the menu and the
# accessibility helpers. The speech-rule engine (sre/, 4 MB) is only fetched if a reader turns
# speech on in MathJax's menu, so it is left out.
MATHJAX_PARTS = ["tex-chtml.js", "input/tex/extensions", "output/chtml", "ui", "a11y"]
mathjax_path = "mathjax/tex-chtml.js"    # relative to _static/
mathjax3_config = {"startup": {"typeset": True}}

# -- HTML ----------------------------------------------------------------------------------------
html_theme = "sphinx_book_theme"
html_title = "lora-course"
html_static_path = ["_static"]
html_css_files = ["course.css"]
html_copy_source = False          # the staged notebooks are not the course's files: do not offer them
html_show_sourcelink = False
html_last_updated_fmt = None
# The theme reads its colour mode from the page context; unset, it logs "invalid theme mode" as a
# console error. Light by default (the plots have white backgrounds); readers can switch.
html_context = {"default_mode": "light"}
html_theme_options = {
    "use_download_button": False,  # would offer the staged copy, not the notebook in the repository
    "use_fullscreen_button": False,
    "use_repository_button": False,
    "show_toc_level": 2,
    "home_page_in_toc": True,
    "navigation_with_keys": False,
}


def copy_mathjax(app, exception) -> None:
    """Copy the MathJax files the pages load into ``_static/mathjax`` of the build."""
    if exception is not None or app.builder.format != "html":
        return
    target = Path(app.outdir) / "_static" / "mathjax"
    for part in MATHJAX_PARTS:
        source = MATHJAX_SOURCE / part
        if source.is_dir():
            shutil.copytree(source, target / part, dirs_exist_ok=True)
        else:
            target.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / part)


def setup(app):
    app.connect("build-finished", copy_mathjax)
