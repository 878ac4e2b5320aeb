"""Evaluation data loaders and the synthetic shapes generator (molmo_core.eval.data, synthetic.shapes)."""
import hashlib
import json

import numpy as np
import pytest
from PIL import Image

from eval_helpers import H, W, box_mask, clock_set, count_set, points_eval_set, write_images, write_jsonl, write_parquet
from molmo_core.eval.data import EvalDataError, load_dataset
from molmo_core.synthetic.shapes import COLORS, random_scene


# --------------------------------------------------------------------------- shapes

def test_shapes_are_deterministic_and_masks_are_exact():
    a, b = random_scene(11), random_scene(11)
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image)) and a.label == b.label
    assert a.count == 11 % 7
    pixels = np.asarray(a.image).astype(int)
    want = np.array(COLORS[a.label.split()[0]])
    for target, (x, y) in zip(a.targets, a.points):
        assert target.mask[int(y), int(x)]  # the point lies on the object
        # every visible pixel of a target has the target's colour (+-12 jitter): the mask is exact
        assert np.abs(pixels[target.mask] - want).max() <= 12
    # targets do not overlap each other's visible pixels, and every object keeps >= 60 % visible
    assert (a.masks.sum(axis=0) <= 1).all()


def test_shapes_cover_counts_from_zero_and_vary():
    scenes = [random_scene(i) for i in range(8)]
    assert [s.count for s in scenes[:7]] == list(range(7))
    assert len({s.label for s in scenes}) > 3 and len({s.image.size for s in scenes}) > 1
    assert scenes[0].masks.shape == (0, scenes[0].image.height, scenes[0].image.width)


def test_shapes_and_clocks_specs():
    shapes = load_dataset("shapes:5", "count")
    assert [ex.count for ex in shapes.examples] == [0, 1, 2, 3, 4]
    assert shapes.examples[3].prompt("count") == f"How many {shapes.examples[3].label} are there?"
    clocks = load_dataset("clocks:3", "clock", limit=2)
    assert len(clocks) == 2 and clocks.clock_tolerance == 3
    assert clocks.examples[0].prompt("clock") == "clocks: What time is being shown?"
    with pytest.raises(EvalDataError, match="serves --task point / count"):
        load_dataset("shapes:3", "clock")
    with pytest.raises(EvalDataError, match="positive number"):
        load_dataset("clocks:zero", "clock")


# --------------------------------------------------------------------------- files

def test_points_eval_parquet_converts_percent_to_pixels_and_keeps_masks(tmp_path):
    path, _, _ = points_eval_set(tmp_path)
    data = load_dataset(str(path), "point", images_dir=tmp_path / "images")
    ex = data.examples[0]
    assert data.point_rule == "mask" and np.allclose(ex.points, [[5, 5], [30, 20]])
    assert ex.masks.shape == (2, H, W) and ex.masks[1, 20, 30]
    assert data.examples[2].points.shape == (0, 2) and data.examples[2].masks.shape == (0, H, W)
    assert any("percent (detected" in n for n in data.notes)


def test_pixel_coordinates_are_detected_or_stated(tmp_path):
    names = write_images(tmp_path, 1)
    rows = [{"image_url": names[0], "label": "a", "points": [{"x": 150.0, "y": 20.0}]}]
    path = write_parquet(tmp_path / "p.parquet", rows)
    assert load_dataset(str(path), "point").examples[0].points.tolist() == [[150.0, 20.0]]
    small = write_parquet(tmp_path / "s.parquet", [{**rows[0], "points": [{"x": 20.0, "y": 15.0}]}])
    assert load_dataset(str(small), "point").examples[0].points.tolist() == [[8.0, 4.5]]  # auto: percent
    stated = load_dataset(str(small), "point", coords="pixels")
    assert stated.examples[0].points.tolist() == [[20.0, 15.0]] and stated.point_rule == "distance"


def test_images_are_found_by_sha256_when_names_differ(tmp_path):
    write_images(tmp_path / "imgs", 1)
    sha = hashlib.sha256((tmp_path / "imgs" / "img0.png").read_bytes()).hexdigest()
    rows = [{"image_url": "https://example.org/renamed.jpg", "image_sha256": sha, "label": "a", "count": 1}]
    data = load_dataset(str(write_parquet(tmp_path / "c.parquet", rows)), "count", images_dir=tmp_path / "imgs")
    assert data.examples[0].image.name == "img0.png"


def test_count_and_clock_files(tmp_path):
    path, _, _ = count_set(tmp_path / "c")
    assert [e.count for e in load_dataset(str(path), "count", images_dir=tmp_path / "c" / "images").examples] == \
        [2, 3, 0, 5]
    path, _, _ = clock_set(tmp_path / "k")
    data = load_dataset(str(path), "clock", images_dir=tmp_path / "k" / "images")
    assert [e.clock for e in data.examples][:4] == [(12, 0), (3, 0), (12, 0), (-1, -1)] and data.clock_tolerance == 1
    names = write_images(tmp_path / "j", 1)
    jsonl = write_jsonl(tmp_path / "j" / "clocks.jsonl", [{"image_url": names[0], "hour": 3, "minute": 5,
                                                            "second": 9}])
    ex = load_dataset(str(jsonl), "clock").examples[0]
    assert (ex.clock, ex.second) == ((3, 5), 9)


def test_point_bench_folder_binarises_masks_above_127(tmp_path):
    write_images(tmp_path / "images", 1)
    mask = np.zeros((H, W), np.uint8)
    mask[0, 0], mask[0, 1] = 128, 127
    (tmp_path / "masks").mkdir()
    Image.fromarray(mask).save(tmp_path / "masks" / "m0.png")
    (tmp_path / "data.json").write_text(json.dumps([{"image_filename": "img0.png", "category": "spatial",
                                                      "user_input": "Point to the corner.",
                                                      "mask_filename": "m0.png", "count": 1}]))
    data = load_dataset(str(tmp_path), "point")
    ex = data.examples[0]
    assert data.point_rule == "point_bench" and ex.category == "spatial" and ex.prompt("point") == "Point to the corner."
    assert ex.masks[0, 0, 0] and not ex.masks[0, 0, 1] and ex.masks.sum() == 1
    Image.fromarray(np.zeros((5, 5), np.uint8)).save(tmp_path / "masks" / "m0.png")
    with pytest.raises(EvalDataError, match=r"mask m0.png is 5x5, the image img0.png is 40x30"):
        load_dataset(str(tmp_path), "point")


# --------------------------------------------------------------------------- bad input

def test_parquet_without_the_needed_columns_names_them(tmp_path):
    path = write_parquet(tmp_path / "bad.parquet", [{"image_url": "a.png", "caption": "x"}])
    with pytest.raises(EvalDataError, match=r"no column \['label', 'count'\] for --task count.*found columns"):
        load_dataset(str(path), "count")


def test_missing_images_are_named_with_the_fix(tmp_path):
    write_images(tmp_path, 1)
    rows = [{"image_url": "img0.png", "label": "a", "count": 1}, {"image_url": "gone.png", "label": "a", "count": 2}]
    with pytest.raises(EvalDataError, match=r"1 of 2 images .* row 1 \(\['gone.png'.*--images-dir"):
        load_dataset(str(write_parquet(tmp_path / "c.parquet", rows)), "count")


def test_masks_of_the_wrong_shape_name_the_row(tmp_path):
    names = write_images(tmp_path, 2)
    good = {"image_url": names[0], "label": "a", "points": [{"x": 10.0, "y": 10.0}], "masks": [box_mask(0, 0, 5, 5)]}
    bad = {**good, "image_url": names[1], "masks": [np.zeros((W, H), bool).tolist()]}  # transposed
    with pytest.raises(EvalDataError, match=r"row 1: masks have shape \(1, 40, 30\), expected \(1, 30, 40\)"):
        load_dataset(str(write_parquet(tmp_path / "m.parquet", [good, bad])), "point")
    two = {**good, "masks": [box_mask(0, 0, 5, 5)] * 2}
    with pytest.raises(EvalDataError, match=r"row 0: masks have shape \(2, 30, 40\), expected \(1, 30, 40\)"):
        load_dataset(str(write_parquet(tmp_path / "n.parquet", [two])), "point")


def test_empty_data_sets_and_bad_values_are_refused(tmp_path):
    path = tmp_path / "empty.parquet"
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"image_url": pa.array([], pa.string()), "hour": pa.array([], pa.int64()),
                             "minute": pa.array([], pa.int64())}), path)
    with pytest.raises(EvalDataError, match="has no rows"):
        load_dataset(str(path), "clock")
    names = write_images(tmp_path, 1)
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"image_url": names[0], "hour": 13.5, "minute": 0}])
    with pytest.raises(EvalDataError, match=r"row 0: hour=13.5; expected an integer 0-24, or -1"):
        load_dataset(str(bad), "clock")
    with pytest.raises(EvalDataError, match="neither shapes:N"):
        load_dataset(str(tmp_path / "nothing.csv"), "clock")
    with pytest.raises(EvalDataError, match="Unknown task 'caption'"):
        load_dataset("shapes:2", "caption")
