"""Turn the README's and the pitfall index's references to notebooks into links, and refuse stale ones.

The README and ``docs/pitfalls.md`` name notebooks and their sections in plain text, for example

    `05_where_to_put_lora`, "Step 1: list the layers you can target" and "Fixed rank or fixed budget?"
    `03_the_lora_layer`, §5 "alpha versus rank"
    `08_merge_store_swap`, §3 "Pitfall #6: check the adapter you saved"     (a subsection of §3)
    `08_merge_store_swap`, §4                                               (the whole section)

On the website each becomes a link to the notebook's page and to the exact heading. A title must
name a heading of that notebook: with §K, the section "K. <title>" itself (or "K. <title>: ...") or
a subsection of section K; without §K, any heading with that text. A reference that names no
heading, or two, raises ``StaleReference``: the build fails rather than publish an index that
points nowhere. Anchors are MyST's own heading slugs (``myst_parser.slugs.github_slugify``, the
function ``myst_heading_anchors`` uses), so Sphinx resolves every link it is given.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from markdown_it import MarkdownIt
from myst_parser.slugs import github_slugify


class StaleReference(ValueError):
    """A reference to a notebook section that does not exist (or is ambiguous)."""


@dataclass(frozen=True)
class Heading:
    level: int      # 1 for "#", 2 for "##", ...
    text: str       # the heading as rendered: markup removed ("implement LoRALayer yourself")
    slug: str       # its anchor on the page


def headings_of(markdown_cells: list[str]) -> list[Heading]:
    """The headings of a notebook's markdown cells, in order, with MyST's anchors."""
    parser, found, slugs = MarkdownIt("commonmark"), [], set()
    for source in markdown_cells:
        tokens = parser.parse(source)
        for opening, inline in zip(tokens, tokens[1:]):
            if opening.type != "heading_open":
                continue
            text = "".join(child.content for child in inline.children or [] if child.type in ("text", "code_inline"))
            slug = base = github_slugify(text)
            i = 1
            while slug in slugs:            # MyST numbers repeated headings: "summary", "summary-1"
                slug, i = f"{base}-{i}", i + 1
            slugs.add(slug)
            found.append(Heading(int(opening.tag[1]), text, slug))
    return found


def _names(heading: str, title: str) -> bool:
    return heading == title or heading.startswith(title + ":")


def find_section(stem: str, headings: list[Heading], section: int | None, title: str | None) -> Heading:
    """The heading that `stem`, §section "title" refers to (raises StaleReference)."""
    where = f"`{stem}`" + (f", §{section}" if section is not None else "") + (f' "{title}"' if title else "")
    if section is None:
        matches = [h for h in headings if _names(h.text, title)]
    else:
        tops = [i for i, h in enumerate(headings) if h.level == 2 and h.text.startswith(f"{section}. ")]
        if len(tops) != 1:
            raise StaleReference(f"{where}: {stem} has {len(tops)} sections numbered {section}. "
                                 f"Its sections: {[h.text for h in headings if h.level == 2]}")
        top = tops[0]
        if title is None or _names(headings[top].text, f"{section}. {title}"):
            return headings[top]
        end = next((i for i in range(top + 1, len(headings)) if headings[i].level <= 2), len(headings))
        matches = [h for h in headings[top + 1:end] if _names(h.text, title)]
    if len(matches) != 1:
        raise StaleReference(f"{where}: {'no' if not matches else len(matches)} heading(s) of {stem} match. "
                             f"Its headings: {[h.text for h in headings]}")
    return matches[0]


# `NN_name` followed by an optional ", §K" and optional quoted titles joined by "and".
REFERENCE = re.compile(r'`(?P<stem>\d\d_\w+)`(?P<section>,?\s*§(?P<number>\d+))?'
                       r'(?P<titles>(?:,?\s*"[^"\n]+")(?:\s+and\s+"[^"\n]+")*)?')
TITLE = re.compile(r'"([^"\n]+)"')


def link_references(text: str, notebooks: dict[str, list[Heading]], page_prefix: str,
                    sections: bool) -> str:
    """Rewrite `NN_name` (and, when ``sections``, its §K "title" tail) into Markdown links.

    ``page_prefix`` is the path from the page being written to the notebooks folder ("notebooks/"
    from the front page, "../notebooks/" from docs/). Names that are not notebooks stay as they are.
    """
    def rewrite(match: re.Match) -> str:
        stem = match["stem"]
        if stem not in notebooks:
            return match[0]
        page = f"{page_prefix}{stem}.ipynb"
        out = f"[`{stem}`]({page})"
        if not sections:
            return out + match[0][len(f"`{stem}`"):]
        number = int(match["number"]) if match["number"] else None
        titles = TITLE.findall(match["titles"] or "")
        if number is not None and not titles:
            out += f", [§{number}]({page}#{find_section(stem, notebooks[stem], number, None).slug})"
        for i, title in enumerate(titles):
            label = (f'§{number} "{title}"' if number is not None and i == 0 else f'"{title}"')
            anchor = find_section(stem, notebooks[stem], number, title).slug
            out += (", " if i == 0 else " and ") + f"[{label}]({page}#{anchor})"
        return out

    return _outside_code_fences(text, lambda chunk: REFERENCE.sub(rewrite, chunk))


def _outside_code_fences(text: str, change) -> str:
    parts = re.split(r"(^```.*?^```[^\n]*$)", text, flags=re.M | re.S)
    return "".join(part if part.startswith("```") else change(part) for part in parts)


def check_answers_linked(text: str, origin: str) -> None:
    """Every pitfall row's last column ("where the course shows it") and the "Related" paragraph
    must be fully linked: a § or a quoted title left over is a reference this file did not parse."""
    for paragraph in re.split(r"\n\s*\n", text):
        if paragraph.startswith("Related"):
            _check_answer(paragraph, None, origin)
        for line in paragraph.splitlines():
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if line.startswith("|") and cells[0].isdigit():    # a pitfall row, not the header
                _check_answer(cells[-1], cells[0], origin)


def _check_answer(answer: str, number: str | None, origin: str) -> None:
    bare = re.sub(r"\[[^\]]*\]\([^)]*\)", "", answer)
    if "§" in bare or re.search(r'"[^"]+"', bare):
        raise StaleReference(f"{origin}: could not turn this into links (write it as "
                             f'`NN_notebook`, §K "Heading"): {answer}')
    if number is not None and "](" not in answer:
        raise StaleReference(f"{origin}: pitfall {number} links to no notebook section: {answer}")


def pitfall_section(readme: str) -> tuple[int, int]:
    """Start and end offsets of the README's pitfall section (its "## The pitfalls ..." heading)."""
    start = re.search(r"^## .*pitfall.*$", readme, flags=re.M | re.I)
    if start is None:
        raise StaleReference("README.md has no '## ... pitfalls ...' section for the site's pitfall index")
    end = re.search(r"^## ", readme[start.end():], flags=re.M)
    return start.start(), start.end() + end.start() if end else len(readme)
