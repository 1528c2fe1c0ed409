"""The diagrams regenerate from code, and the committed images are what the code draws."""
import hashlib

import matplotlib.image as mpimg
import pytest

from lora_course import diagrams


def test_save_all_writes_pngs(tmp_path):
    paths = diagrams.save_all(tmp_path)
    assert sorted(p.name for p in paths) == sorted(diagrams.DIAGRAMS)
    for path in paths:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        image = mpimg.imread(path)
        assert image.shape[0] > 200 and image.shape[1] > 400
        assert image[..., :3].std() > 0.05  # not a blank canvas


def test_committed_images_are_up_to_date(tmp_path):
    """images/ must be what `python -m lora_course.diagrams` draws now (regenerate after edits).
    Compared as decoded pixels, with a small tolerance for font rendering differences."""
    for path in diagrams.save_all(tmp_path):
        committed = diagrams.IMAGES_DIR / path.name
        assert committed.exists(), f"{committed} is missing: run python -m lora_course.diagrams"
        new, old = mpimg.imread(path), mpimg.imread(committed)
        assert new.shape == old.shape, f"{path.name} changed size: regenerate images/"
        if hashlib.sha256(path.read_bytes()).digest() != hashlib.sha256(committed.read_bytes()).digest():
            assert abs(new - old).mean() < 0.01, f"{path.name} differs from the drawing code: regenerate images/"


def test_matrix_shapes_rejects_bad_rank():
    with pytest.raises(ValueError, match="rank must be between 1 and"):
        diagrams.draw_matrix_shapes(8, 6, rank=7)
