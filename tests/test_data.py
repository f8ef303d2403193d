"""Dataset loaders on files the tests write, and their one-line errors."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
from PIL import Image

from training.data import DatasetError, load_dataset, to_unit_range


def _one_line_error(spec, image_size=8, channels=1, match=None) -> str:
    with pytest.raises(DatasetError) as info:
        load_dataset(str(spec), image_size, channels)
    message = str(info.value)
    assert "\n" not in message
    if match is not None:
        assert match in message
    return message


# === digits ===

def test_digits_are_the_1797_real_images_in_minus_one_one():
    data = load_dataset("digits", 8, 1)
    assert (len(data), data.image_shape, data.num_levels, data.name) == (1797, (1, 8, 8), 17,
                                                                           "digits")
    images = data.images
    assert images.dtype == np.float32 and images.shape == (1797, 1, 8, 8)
    assert images.min() == -1.0 and images.max() == 1.0
    # Pixels are 17 levels 0..16: every value sits on that grid.
    np.testing.assert_allclose((images + 1) * 8, np.round((images + 1) * 8), atol=1e-5)


def test_digits_refuse_another_size():
    _one_line_error("digits", image_size=32, channels=3, match="digits")


def test_unit_range_maps_ends_exactly():
    levels = np.array([0, 128, 255], dtype=np.uint8)
    np.testing.assert_array_equal(to_unit_range(levels, 256)[[0, 2]], [-1.0, 1.0])


# === .npz ===

def _pattern(n=5, size=8, channels=3):
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (n, channels, size, size), dtype=np.uint8)  # NCHW


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_npz_layouts_give_the_same_images(tmp_path, layout):
    nchw = _pattern()
    array = nchw if layout == "NCHW" else nchw.transpose(0, 2, 3, 1)
    np.savez(tmp_path / "x.npz", images=array)
    data = load_dataset(str(tmp_path / "x.npz"), 8, 3)
    np.testing.assert_array_equal(data.levels, nchw)
    assert data.num_levels == 256 and data.name == "x"
    np.testing.assert_allclose(data.images, nchw / 127.5 - 1.0, atol=1e-6)


def test_npz_grey_without_channel_axis(tmp_path):
    grey = _pattern(channels=1)[:, 0]
    np.savez(tmp_path / "g.npz", images=grey)
    np.testing.assert_array_equal(load_dataset(str(tmp_path / "g.npz"), 8, 1).levels[:, 0], grey)


def test_npz_wrong_dtype(tmp_path):
    np.savez(tmp_path / "f.npz", images=_pattern().astype(np.float32))
    _one_line_error(tmp_path / "f.npz", 8, 3, match="uint8")


def test_npz_wrong_shape_names_the_expected_shape(tmp_path):
    np.savez(tmp_path / "s.npz", images=_pattern(size=16))
    message = _one_line_error(tmp_path / "s.npz", 8, 3, match=str(tmp_path / "s.npz"))
    assert "[N, 8, 8, 3]" in message


def test_npz_without_images_key(tmp_path):
    np.savez(tmp_path / "k.npz", pictures=_pattern())
    _one_line_error(tmp_path / "k.npz", 8, 3, match="'images'")


def test_npz_that_is_not_an_npz(tmp_path):
    (tmp_path / "bad.npz").write_bytes(b"not a zip archive at all")
    _one_line_error(tmp_path / "bad.npz", 8, 3, match="bad.npz")


def test_npz_that_is_a_renamed_npy(tmp_path):
    np.save(tmp_path / "a.npy", np.zeros((4, 8, 8), np.uint8))
    os.replace(tmp_path / "a.npy", tmp_path / "a.npz")
    _one_line_error(tmp_path / "a.npz", match="a.npz: not an .npz (zip) archive")


def test_npz_header_claiming_a_huge_shape_is_refused_before_loading(tmp_path):
    import zipfile

    np.savez(tmp_path / "h.npz", images=np.zeros((4, 8, 8), np.uint8))
    with zipfile.ZipFile(tmp_path / "h.npz") as z:
        member = z.read("images.npy")
    # The header's padding absorbs the longer shape: the .npy stays well-formed.
    edited = member.replace(b"(4, 8, 8), }" + b" " * 11, b"(100000000000, 8, 8), }")
    assert edited != member and len(edited) == len(member)
    with zipfile.ZipFile(tmp_path / "h.npz", "w") as z:
        z.writestr("images.npy", edited)
    message = _one_line_error(tmp_path / "h.npz", match="h.npz")
    assert "[100000000000, 8, 8]" in message and "corrupt" in message


def test_npz_of_the_wrong_dtype_is_refused_from_its_header(tmp_path):
    np.savez(tmp_path / "f.npz", images=np.zeros((4, 8, 8), np.float32))
    _one_line_error(tmp_path / "f.npz", match="dtype float32")


def test_file_datasets_record_their_absolute_path(tmp_path, monkeypatch):
    np.savez(tmp_path / "ok.npz", images=np.zeros((4, 8, 8), np.uint8))
    monkeypatch.chdir(tmp_path)
    assert load_dataset("ok.npz", 8, 1).spec == str(tmp_path.resolve() / "ok.npz")
    assert load_dataset("digits", 8, 1).spec == "digits"


def test_npz_empty(tmp_path):
    np.savez(tmp_path / "e.npz", images=np.zeros((0, 8, 8, 3), dtype=np.uint8))
    _one_line_error(tmp_path / "e.npz", 8, 3, match="no images")


# === missing and unsupported paths ===

def test_missing_path(tmp_path):
    _one_line_error(tmp_path / "nowhere", match=str(tmp_path / "nowhere"))


def test_unsupported_file(tmp_path):
    (tmp_path / "images.csv").write_text("1,2,3\n")
    _one_line_error(tmp_path / "images.csv", match=".csv")


def test_empty_folder(tmp_path):
    _one_line_error(tmp_path, match="no PNG/JPEG")


# === image folders ===

def test_image_folder_resizes_and_centre_crops(tmp_path):
    # 80x20 (w x h): black left and right quarters, white centre half. Scaling the short
    # side to 8 makes it 32x8; the central 8x8 crop lies well inside the white half.
    pixels = np.zeros((20, 80, 3), dtype=np.uint8)
    pixels[:, 20:60] = 255
    Image.fromarray(pixels).save(tmp_path / "a.png")
    (tmp_path / "sub").mkdir()
    Image.fromarray(np.full((8, 8, 3), 7, dtype=np.uint8)).save(tmp_path / "sub" / "b.jpg",
                                                                 quality=100)
    data = load_dataset(str(tmp_path), 8, 3)
    assert data.levels.shape == (2, 3, 8, 8) and data.levels.dtype == np.uint8
    assert data.levels[0].min() >= 250  # all white: the black borders were cropped away
    assert abs(int(np.median(data.levels[1])) - 7) <= 2


def test_image_folder_grey_conversion(tmp_path):
    Image.fromarray(np.full((8, 8, 3), 200, dtype=np.uint8)).save(tmp_path / "c.png")
    data = load_dataset(str(tmp_path), 8, 1)
    assert data.levels.shape == (1, 1, 8, 8) and int(data.levels.max()) == 200


def test_unreadable_image_is_named(tmp_path):
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(tmp_path / "good.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG but not really")
    _one_line_error(tmp_path, 8, 3, match="broken.png")


# === CIFAR-10 python batches ===

def _write_cifar(folder, per_batch=3):
    folder.mkdir()
    rows = []
    for i in range(1, 6):
        data = np.zeros((per_batch, 3072), dtype=np.uint8)
        data[:, :1024] = 10 * i  # R plane
        data[:, 1024:2048] = 100  # G plane
        data[:, 2048:] = 200  # B plane
        rows.append(data)
        with open(folder / f"data_batch_{i}", "wb") as f:
            pickle.dump({b"data": data, b"labels": [0] * per_batch}, f)
    return rows


def test_cifar10_batches(tmp_path):
    _write_cifar(tmp_path / "cifar-10-batches-py")
    data = load_dataset(str(tmp_path / "cifar-10-batches-py"), 32, 3)
    assert data.levels.shape == (15, 3, 32, 32) and data.name == "cifar10"
    # Rows are R, G, B planes: channel 0 carries the per-batch red value.
    assert list(data.levels[::3, 0, 0, 0]) == [10, 20, 30, 40, 50]
    assert (data.levels[:, 1] == 100).all() and (data.levels[:, 2] == 200).all()


def test_cifar10_missing_batch(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    _write_cifar(folder)
    (folder / "data_batch_4").unlink()
    _one_line_error(folder, 32, 3, match="data_batch_4")


class _Evil:
    def __reduce__(self):
        return (os.makedirs, ("PWNED_BY_PICKLE",))


def test_cifar10_pickle_with_code_is_refused(tmp_path, monkeypatch):
    folder = tmp_path / "cifar-10-batches-py"
    _write_cifar(folder)
    with open(folder / "data_batch_2", "wb") as f:
        pickle.dump({b"data": _Evil()}, f)
    monkeypatch.chdir(tmp_path)
    _one_line_error(folder, 32, 3, match="data_batch_2")
    assert not (tmp_path / "PWNED_BY_PICKLE").exists()


def test_cifar10_wrong_content(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    _write_cifar(folder)
    with open(folder / "data_batch_1", "wb") as f:
        pickle.dump({b"data": np.zeros((2, 100), dtype=np.uint8)}, f)
    _one_line_error(folder, 32, 3, match="3072")
