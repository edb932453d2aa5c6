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
