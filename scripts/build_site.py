"""Build the course website from the committed notebook outputs, offline, executing nothing.

    python scripts/build_site.py                  # writes site/_build/html/index.html
    python scripts/build_site.py --build-dir DIR  # writes DIR/html (and stages sources in DIR/src)

Steps:
1. Stage the sources in ``<build-dir>/src``: the README becomes the front page, every notebook
   ``notebooks/[0-9]*.ipynb`` (in name order, so in course order) becomes a page, and
   ``docs/pitfalls.md`` the pitfall index. References such as `05_where_to_put_lora`,
   "Step 1: list the layers you can target" become links to the page and the exact heading; one
   that names no heading stops the build (``site/course_links.py``).
2. Widget outputs are replaced by static pictures drawn from the stored widget state, with a note
   on interactive ones that the live version runs in JupyterLab (``site/static_widgets.py``).
   The staged notebooks carry no widget state, so no widget JavaScript is loaded.
3. Sphinx + myst-nb render the stored outputs (``site/conf.py``: ``nb_execution_mode = "off"``)
   with warnings as errors, so a broken link or a missing image also fails the build.
"""
from __future__ import annotations

import argparse
import copy
import shutil
import sys
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[1]
SITE = ROOT / "site"
sys.path.insert(0, str(SITE))

import course_links  # noqa: E402  (site/course_links.py)
import static_widgets  # noqa: E402  (site/static_widgets.py)

LIVE_NOTE = ('<p class="static-widget-note">A stored picture of an interactive widget, as the notebook '
             'left it: its controls need a running Python kernel. Open <code>notebooks/{name}</code> in '
             'JupyterLab to use it live.</p>')


def course_notebooks(root: Path = ROOT) -> list[Path]:
    return sorted((root / "notebooks").glob("[0-9]*.ipynb"))


def static_notebook(notebook, name: str):
    """A copy of ``notebook`` whose widget outputs are static HTML pictures and that has no widget state."""
    staged = copy.deepcopy(notebook)
    models = static_widgets.widget_state(notebook)
    for index, cell in enumerate(staged.cells):
        for output in cell.get("outputs", []):
            view = output.get("data", {}).get(static_widgets.WIDGET_VIEW)
            if view is None:
                continue
            try:
                picture = static_widgets.render_view(models, view["model_id"])
            except static_widgets.UnknownWidget as exc:
                raise SystemExit(f"{name}, cell {index}: {exc}") from exc
            if static_widgets.is_interactive(models, view["model_id"]):
                picture += LIVE_NOTE.format(name=name)
            output["data"] = {"text/html": picture}
    staged.metadata.pop("widgets", None)
    return staged


def notebook_headings(notebook) -> list[course_links.Heading]:
    return course_links.headings_of([c.source for c in notebook.cells if c.cell_type == "markdown"])


def front_page(readme: str, headings: dict, stems: list[str]) -> str:
    """The README with notebook names linked, its pitfall table linked to sections, and the toctree."""
    start, end = course_links.pitfall_section(readme)
    pitfalls = course_links.link_references(readme[start:end], headings, "notebooks/", sections=True)
    course_links.check_answers_linked(pitfalls, "README.md")
    page = (course_links.link_references(readme[:start], headings, "notebooks/", sections=False) + pitfalls
            + course_links.link_references(readme[end:], headings, "notebooks/", sections=False))
    page = page.replace("`docs/pitfalls.md`", "[`docs/pitfalls.md`](docs/pitfalls.md)")
    notebooks = "\n".join(f"notebooks/{stem}" for stem in stems)
    return (page.rstrip() + "\n\n```{toctree}\n:caption: Notebooks\n:maxdepth: 1\n\n" + notebooks + "\n```\n\n"
            "```{toctree}\n:caption: Reference\n:maxdepth: 1\n\ndocs/pitfalls\n```\n")


def stage(source: Path, root: Path = ROOT) -> None:
    """Write everything Sphinx reads into ``source`` (emptied first), from the course in ``root``."""
    if source.exists():
        shutil.rmtree(source)
    (source / "notebooks").mkdir(parents=True)
    (source / "docs").mkdir()
    paths = course_notebooks(root)
    if not paths:
        raise SystemExit(f"no notebooks matching notebooks/[0-9]*.ipynb under {root}")
    headings = {}
    for path in paths:
        notebook = nbformat.read(path, as_version=4)
        headings[path.stem] = notebook_headings(notebook)
        nbformat.write(static_notebook(notebook, path.name), source / "notebooks" / path.name)
    shutil.copytree(root / "images", source / "images")
    try:
        pitfalls = course_links.link_references((root / "docs/pitfalls.md").read_text(encoding="utf-8"),
                                                headings, "../notebooks/", sections=True)
        course_links.check_answers_linked(pitfalls, "docs/pitfalls.md")
        readme = front_page((root / "README.md").read_text(encoding="utf-8"), headings, [p.stem for p in paths])
    except course_links.StaleReference as exc:
        raise SystemExit(f"stale reference to a notebook section: {exc}") from exc
    (source / "docs/pitfalls.md").write_text(pitfalls, encoding="utf-8")
    (source / "index.md").write_text(readme, encoding="utf-8")


def build(build_dir: Path) -> Path:
    """Stage the sources and run Sphinx; return the folder holding index.html."""
    from sphinx.cmd.build import build_main

    source, html = build_dir / "src", build_dir / "html"
    stage(source)
    # -W: warnings are errors (a link to a missing heading or file, an image that is not there);
    # -E -a: no cached state from an earlier build.
    status = build_main(["-b", "html", "-W", "--keep-going", "-E", "-a", "-q", "-c", str(SITE),
                         str(source), str(html)])
    if status != 0:
        raise SystemExit(f"sphinx-build failed (exit code {status}); see the messages above")
    return html


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--build-dir", type=Path, default=SITE / "_build",
                        help="folder for the staged sources (src/) and the website (html/); default site/_build")
    args = parser.parse_args(argv)
    html = build(args.build_dir.resolve())
    print(f"website written to {html / 'index.html'}")


if __name__ == "__main__":
    main(sys.argv[1:])
