"""The course's diagrams, drawn with matplotlib so that they can be regenerated and reviewed as code.

    python -m lora_course.diagrams            # writes images/*.png at the repository root
    python -m lora_course.diagrams OUT_DIR    # writes them somewhere else

- ``lora_diagram.png``: the classic LoRA figure (paper, Figure 1): the input x goes through the
  frozen pretrained W and, beside it, through the trainable A (down to r dimensions) and B (back
  up); the two paths are added.
- ``matrix_shapes.png``: ΔW (in × out) next to its factors A (in × r) and B (r × out), drawn to
  scale, with their parameter counts.
"""
from __future__ import annotations

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never opens a window (importing this module in a notebook is fine)
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import Circle, FancyArrowPatch, Polygon, Rectangle  # noqa: E402

IMAGES_DIR = Path(__file__).resolve().parents[1] / "images"
FROZEN, TRAINABLE, INK = "#9ecae1", "#fdae6b", "#222222"
PNG_METADATA = {"Software": None}  # no version string in the file: regenerating gives the same bytes


def _arrow(ax, start, end):
    ax.add_patch(FancyArrowPatch(start, end, arrowstyle="-|>", mutation_scale=14, lw=1.5, color=INK))


def draw_lora_diagram() -> plt.Figure:
    """The classic LoRA picture: h = x·W + s·x·A·B, with W frozen and A, B trainable."""
    fig, ax = plt.subplots(figsize=(6.4, 5.0))
    ax.set_xlim(0, 10)
    ax.set_ylim(0, 10)
    ax.axis("off")

    # Input x at the bottom, output h at the top.
    ax.text(5, 0.45, "input x  (in)", ha="center", va="center", fontsize=12)
    ax.text(5, 9.6, "output h = x·W + s·x·A·B  (out)", ha="center", va="center", fontsize=12)

    # Left path: the frozen pretrained weight.
    ax.add_patch(Rectangle((0.8, 3.0), 3.6, 3.6, facecolor=FROZEN, edgecolor=INK, lw=1.5))
    ax.text(2.6, 5.1, "pretrained\nweights W", ha="center", va="center", fontsize=13)
    ax.text(2.6, 3.7, "in × out, frozen", ha="center", va="center", fontsize=10)

    # Right path: A narrows from `in` to r, B widens from r to `out`.
    ax.add_patch(Polygon([(5.6, 2.2), (9.2, 2.2), (7.9, 4.3), (6.9, 4.3)], closed=True,
                         facecolor=TRAINABLE, edgecolor=INK, lw=1.5))
    ax.text(7.4, 3.05, "A  (in × r)", ha="center", va="center", fontsize=11)
    ax.text(9.35, 2.5, "random", ha="left", va="center", fontsize=9)
    ax.add_patch(Polygon([(6.9, 5.3), (7.9, 5.3), (9.2, 7.4), (5.6, 7.4)], closed=True,
                         facecolor=TRAINABLE, edgecolor=INK, lw=1.5))
    ax.text(7.4, 6.55, "B  (r × out)", ha="center", va="center", fontsize=11)
    ax.text(9.35, 7.1, "zero at start", ha="left", va="center", fontsize=9)
    ax.text(8.05, 4.8, "r", ha="left", va="center", fontsize=11, style="italic")
    ax.text(6.9, 8.35, "× s = α / r", ha="left", va="center", fontsize=10)

    # Wires: x to both paths, both paths to the sum, the sum to h.
    _arrow(ax, (5, 0.8), (2.6, 3.0))
    _arrow(ax, (5, 0.8), (7.4, 2.2))
    _arrow(ax, (7.4, 4.3), (7.4, 5.3))
    ax.add_patch(Circle((5, 8.6), 0.32, facecolor="white", edgecolor=INK, lw=1.5))
    ax.text(5, 8.6, "+", ha="center", va="center", fontsize=16)
    _arrow(ax, (2.6, 6.6), (4.72, 8.45))
    _arrow(ax, (7.4, 7.4), (5.28, 8.45))
    _arrow(ax, (5, 8.92), (5, 9.3))

    ax.add_patch(Rectangle((0.2, 0.9), 0.35, 0.35, facecolor=FROZEN, edgecolor=INK))
    ax.text(0.7, 1.07, "frozen", va="center", fontsize=9)
    ax.add_patch(Rectangle((0.2, 1.5), 0.35, 0.35, facecolor=TRAINABLE, edgecolor=INK))
    ax.text(0.7, 1.67, "trainable", va="center", fontsize=9)
    fig.tight_layout()
    return fig


def draw_matrix_shapes(in_dim: int = 64, out_dim: int = 48, rank: int = 4) -> plt.Figure:
    """ΔW (in × out) beside A (in × r) · B (r × out), to scale, with parameter counts."""
    if not 1 <= rank <= min(in_dim, out_dim):
        raise ValueError(f"rank must be between 1 and min(in_dim, out_dim) = {min(in_dim, out_dim)}, got {rank}")
    fig, ax = plt.subplots(figsize=(7.5, 3.6))
    ax.set_aspect("equal")
    ax.axis("off")
    unit = 0.05  # drawing units per matrix row/column
    h, w, r = in_dim * unit, out_dim * unit, rank * unit
    ax.add_patch(Rectangle((0, 0), w, h, facecolor=TRAINABLE, edgecolor=INK, lw=1.5, alpha=0.5))
    ax.text(w / 2, h / 2, f"ΔW\n{in_dim} × {out_dim}\n= {in_dim * out_dim:,} numbers",
            ha="center", va="center", fontsize=11)
    x0 = w + 1.0
    ax.text(x0 - 0.5, h / 2, "≈", ha="center", va="center", fontsize=20)
    ax.add_patch(Rectangle((x0, 0), r, h, facecolor=TRAINABLE, edgecolor=INK, lw=1.5))
    ax.text(x0 + r / 2, -0.3, f"A\n{in_dim} × {rank}", ha="center", va="top", fontsize=10)
    ax.text(x0 + r + 0.35, h / 2, "·", ha="center", va="center", fontsize=20)
    x1 = x0 + r + 0.7
    ax.add_patch(Rectangle((x1, h - r), w, r, facecolor=TRAINABLE, edgecolor=INK, lw=1.5))
    ax.text(x1 + w / 2, h - r - 0.3, f"B  ({rank} × {out_dim})", ha="center", va="top", fontsize=10)
    ax.text(x1 + w / 2, h / 3, f"A and B together:\n{rank} · ({in_dim} + {out_dim}) = {rank * (in_dim + out_dim):,} numbers",
            ha="center", va="center", fontsize=11)
    ax.set_xlim(-0.2, x1 + w + 0.2)
    ax.set_ylim(-1.2, h + 0.2)
    fig.tight_layout()
    return fig


DIAGRAMS = {"lora_diagram.png": draw_lora_diagram, "matrix_shapes.png": draw_matrix_shapes}


def save_all(directory=IMAGES_DIR) -> list[Path]:
    """Draw every diagram into ``directory`` (created if needed); returns the paths written."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for filename, draw in DIAGRAMS.items():
        fig = draw()
        path = directory / filename
        fig.savefig(path, dpi=100, metadata=PNG_METADATA)
        plt.close(fig)
        paths.append(path)
    return paths


def main(argv: list[str]) -> None:
    for path in save_all(argv[0] if argv else IMAGES_DIR):
        print(f"wrote {path}")


if __name__ == "__main__":
    main(sys.argv[1:])
