"""The default task: characters rendered from matplotlib's typefaces, one typeface per client."""

import numpy as np
import pytest
from matplotlib.ft2font import FT2Font

from core.config import validate
from fedtasks.base import DataError
from fedtasks.chars import CLASSES, TEST_RENDERS, TRAIN_RENDERS, TYPEFACES, client_typefaces, font_dir, render
from fedtasks.task import get_task, partition_stats
from server_app.preflight import partition_document


def test_every_typeface_has_every_character():
    # a missing glyph would render as an empty box or nothing, silently
    for face in TYPEFACES:
        font = FT2Font(str(font_dir() / f"{face}.ttf"))
        assert [c for c in CLASSES if font.get_char_index(ord(c)) == 0] == [], face


def test_a_render_is_a_glyph_with_ink():
    rng = np.random.default_rng(0)
    for face in ("DejaVuSans", "cmr10", "STIXGeneralItalic"):
        x = render(face, "W", rng)
        assert x.shape == (28, 28) and x.dtype == np.float32
        assert x.max() == pytest.approx(1.0, abs=0.15) and (x > 0.5).sum() >= 15


def test_one_typeface_per_client_and_the_same_images_every_time():
    cfg = validate({"task": "chars"})
    task = get_task(cfg)
    faces = client_typefaces(cfg["seed"], 20)
    assert len(set(faces)) == 20 and set(faces) <= set(TYPEFACES)
    part = task.partition(cfg, 3, 20)
    assert set(part["typeface"]) == {faces[3]}
    images, labels = task.to_arrays(part)
    assert np.bincount(labels).tolist() == [TRAIN_RENDERS] * len(CLASSES)
    again, _ = get_task(cfg).to_arrays(get_task(cfg).partition(cfg, 3, 20))
    np.testing.assert_array_equal(images, again)
    # a client's images are the ones the whole training split holds for its typeface
    full = task.load_split(cfg, "train").filter(lambda r: r["typeface"] == faces[3])
    np.testing.assert_array_equal(images, task.to_arrays(full)[0])


def test_test_set_covers_every_typeface_and_class():
    cfg = validate({"task": "chars"})
    test = get_task(cfg).load_split(cfg, "test")
    assert len(test) == len(TYPEFACES) * len(CLASSES) * TEST_RENDERS >= 5000
    assert set(test["typeface"]) == set(TYPEFACES)


def test_more_clients_than_typefaces_is_refused():
    cfg = validate({"task": "chars"})
    with pytest.raises(ValueError, match="at most 22 nodes"):
        get_task(cfg).partition(cfg, 0, 23)
    with pytest.raises(DataError, match="cannot split task 'chars' over 23 nodes.*at most 22"):
        partition_document(cfg, 23)  # the server, before round 1


def test_partition_stats_name_the_typeface():
    rows = partition_stats(validate({"task": "chars"}), 4)
    assert [r["examples"] for r in rows] == [len(CLASSES) * TRAIN_RENDERS] * 4
    assert all(r["typeface"] in TYPEFACES and r["classes"] == 62 for r in rows)
