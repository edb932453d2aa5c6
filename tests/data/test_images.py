import io

import numpy as np
import pydicom.data
import pytest
import torch
from PIL import Image

from biomedgpt.data.images import decode_image, image_to_tensor, is_dicom, load_image


def test_dicom_ct_slice_loads_as_windowed_rgb():
    path = pydicom.data.get_testdata_file("CT_small.dcm")
    image = load_image(path)
    assert image.mode == "RGB" and image.size == (128, 128)
    pixels = np.asarray(image)
    assert pixels.min() == 0 and pixels.max() == 255  # windowed to the slice's own range
    with open(path, "rb") as handle:
        assert is_dicom(handle.read())


def test_png_bytes_round_trip_and_tensor_range():
    array = np.zeros((20, 30, 3), dtype=np.uint8)
    array[:, 15:] = 255
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    image = decode_image(buffer.getvalue())
    assert image.size == (30, 20)
    tensor = image_to_tensor(image, 32)
    assert tensor.shape == (3, 32, 32)
    assert torch.isclose(tensor.min(), torch.tensor(-1.0)) and torch.isclose(tensor.max(), torch.tensor(1.0))
    assert tensor[:, :, 0].mean() < 0 < tensor[:, :, -1].mean()  # left dark, right bright


def test_unreadable_bytes_name_the_source(tmp_path):
    bad = tmp_path / "scan.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(ValueError, match="scan.png"):
        load_image(bad)
    with pytest.raises(FileNotFoundError, match="missing.png"):
        load_image(tmp_path / "missing.png")


@pytest.mark.parametrize("fmt, mode", [("JPEG", "RGB"), ("PNG", "RGB"), ("PNG", "L"), ("PNG", "RGBA"), ("GIF", "P")])
def test_decode_image_gives_the_pixels_of_an_rgb_conversion(fmt, mode):
    array = np.random.default_rng(0).integers(0, 256, size=(24, 40, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(array).convert(mode).save(buffer, format=fmt)
    data = buffer.getvalue()
    image = decode_image(data)
    # Same result as the straightforward decode; RGB JPEG/PNG come back as the decoded image itself (no copy), fully
    # loaded and detached from the buffer, so they stay usable after decode_image returned.
    with Image.open(io.BytesIO(data)) as reference:
        expected = np.asarray(reference.convert("RGB"))
    assert image.mode == "RGB" and image.size == (40, 24)
    assert np.array_equal(np.asarray(image), expected)
    assert np.array_equal(np.asarray(image.resize((20, 12))), np.asarray(Image.fromarray(expected).resize((20, 12))))


def test_truncated_jpeg_names_the_source():
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((64, 64, 3), dtype=np.uint8)).save(buffer, format="JPEG")
    with pytest.raises(ValueError, match="row 7"):
        decode_image(buffer.getvalue()[:200], "row 7")


def test_image_to_tensor_skips_the_resize_at_its_own_size():
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, size=(16, 16, 3), dtype=np.uint8))
    array = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
    assert torch.equal(image_to_tensor(image, 16), (array - 0.5) / 0.5)
