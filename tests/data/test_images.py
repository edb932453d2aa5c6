import glob
import io
import os
import struct
import warnings
import zlib

import numpy as np
import pydicom
import pydicom.data
import pytest
import torch
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.pixels import convert_color_space
from pydicom.sequence import Sequence

from biomedgpt.data.images import decode_image, describe_decoding, image_to_tensor, is_dicom, load_image

# ----------------------------------------------------------------------------------------------------------------------
# Helpers: DICOM files shipped in the pydicom wheel (never downloaded), rewritten copies, and a reference VOI function


def dicom_path(name: str) -> str:
    path = pydicom.data.get_testdata_file(name, download=False)
    assert path is not None, f"{name} is not among the DICOM files shipped with pydicom"
    return path


def dicom_bytes(name: str) -> bytes:
    with open(dicom_path(name), "rb") as handle:
        return handle.read()


def rewritten(name: str, change) -> bytes:
    """Bytes of a pydicom test file after ``change(dataset)`` edited it (a real Part 10 file, preamble and all)."""
    dataset = pydicom.dcmread(dicom_path(name))
    change(dataset)
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def reference_linear(x: np.ndarray, center: float, width: float) -> np.ndarray:
    """The DICOM LINEAR VOI function written as a clipped ramp (a form independent of the code's piecewise one)."""
    return np.rint(np.clip((x - (center - 0.5)) / (width - 1) + 0.5, 0.0, 1.0) * 255.0).astype(np.uint8)


def grey(image: Image.Image) -> np.ndarray:
    pixels = np.asarray(image)
    assert image.mode == "RGB" and np.array_equal(pixels[..., 0], pixels[..., 1])
    assert np.array_equal(pixels[..., 0], pixels[..., 2])
    return pixels[..., 0]


def encoded(array: np.ndarray, fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt)
    return buffer.getvalue()


def with_png_chunk(png: bytes, kind: bytes, payload: bytes) -> bytes:
    """Insert an ancillary chunk right after IHDR (8-byte signature + 25-byte IHDR chunk)."""
    chunk = struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))
    return png[:33] + chunk + png[33:]


# ----------------------------------------------------------------------------------------------------------------------
# PNG / JPEG / TIFF


def test_png_bytes_round_trip_and_tensor_range():
    array = np.zeros((20, 30, 3), dtype=np.uint8)
    array[:, 15:] = 255
    image = decode_image(encoded(array, "PNG"))
    assert image.size == (30, 20)
    tensor = image_to_tensor(image, 32)
    assert tensor.shape == (3, 32, 32)
    assert torch.isclose(tensor.min(), torch.tensor(-1.0)) and torch.isclose(tensor.max(), torch.tensor(1.0))
    assert tensor[:, :, 0].mean() < 0 < tensor[:, :, -1].mean()  # left dark, right bright


def test_unreadable_bytes_name_the_source(tmp_path):
    bad = tmp_path / "scan.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(ValueError, match="scan.png: not a readable image"):
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
    if mode == "RGB":  # the fast path: the decoder's own image (a converted copy has no format)
        assert image.format == fmt and describe_decoding(image) == f"{fmt} 8-bit RGB as stored"
    else:
        assert image.format is None and f"{fmt} {mode} converted to RGB" in describe_decoding(image)


def test_truncated_jpeg_names_the_source():
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((64, 64, 3), dtype=np.uint8)).save(buffer, format="JPEG")
    with pytest.raises(ValueError, match="row 7"):
        decode_image(buffer.getvalue()[:200], "row 7")


def test_image_to_tensor_skips_the_resize_at_its_own_size():
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, size=(16, 16, 3), dtype=np.uint8))
    array = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
    assert torch.equal(image_to_tensor(image, 16), (array - 0.5) / 0.5)


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_16bit_grey_ramp_keeps_its_grey_levels(fmt):
    ramp = (np.arange(256, dtype=np.uint16) * 257).reshape(8, 32)  # 0 .. 65535, the full 16-bit range
    data = encoded(ramp, fmt)
    with Image.open(io.BytesIO(data)) as opened:
        assert opened.mode == "I;16"  # what CT/MR slice exports decode to
    pixels = grey(decode_image(data))
    assert np.array_equal(pixels, np.rint(ramp / 65535.0 * 255.0).astype(np.uint8))
    assert len(np.unique(pixels)) == 256 and np.all(np.diff(pixels.ravel().astype(int)) > 0)
    assert "scaled by 65535" in describe_decoding(decode_image(data))


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_12bit_ramp_in_a_16bit_container_is_scaled_by_4095(fmt):
    ramp = np.linspace(0, 4095, 512).round().astype(np.uint16).reshape(16, 32)
    image = decode_image(encoded(ramp, fmt), "ct.png")
    pixels = grey(image)
    assert np.array_equal(pixels, np.rint(ramp / 4095.0 * 255.0).astype(np.uint8))
    assert pixels.min() == 0 and pixels.max() == 255 and np.all(np.diff(pixels.ravel().astype(int)) >= 0)
    assert len(np.unique(pixels)) == 256  # not 94% white, not 16 dark levels
    assert "scaled by 4095 (12 bits" in describe_decoding(image)


def test_png_sbit_states_the_bit_depth():
    ramp = np.linspace(0, 1000, 256).round().astype(np.uint16).reshape(8, 32)  # fits 10 bits, but the file says 12
    data = with_png_chunk(encoded(ramp, "PNG"), b"sBIT", bytes([12]))
    image = decode_image(data)
    assert np.array_equal(grey(image), np.rint(ramp / 4095.0 * 255.0).astype(np.uint8))
    assert "12 bits: the file's sBIT" in describe_decoding(image)
    # An sBIT the pixels exceed would clip them: the smallest depth holding the maximum is used instead.
    wrong = decode_image(with_png_chunk(encoded(ramp, "PNG"), b"sBIT", bytes([8])))
    assert np.array_equal(grey(wrong), np.rint(ramp / 1023.0 * 255.0).astype(np.uint8))
    assert "sBIT 8 ignored" in describe_decoding(wrong)


def test_32bit_integer_grey_tiff_is_not_clipped():
    values = np.linspace(-1024, 3071, 256).round().astype(np.int32).reshape(8, 32)  # CT numbers saved as TIFF
    data = encoded(values, "TIFF")
    with Image.open(io.BytesIO(data)) as opened:
        assert opened.mode == "I"
    image = decode_image(data)
    expected = np.rint((values - values.min()) / float(values.max() - values.min()) * 255.0).astype(np.uint8)
    assert np.array_equal(grey(image), expected)
    assert "min/max -1024..3071" in describe_decoding(image)
    # Within 0..65535 the bit-depth rule applies, as for 16-bit files.
    small = (np.arange(256, dtype=np.int32) * 16).reshape(8, 32)  # 0 .. 4080: 12 bits
    assert np.array_equal(grey(decode_image(encoded(small, "TIFF"))), np.rint(small / 4095.0 * 255).astype(np.uint8))


def test_float_grey_tiff():
    unit = np.linspace(0.1, 0.6, 256, dtype=np.float32).reshape(8, 32)  # [0, 1] intensities, not stretched
    expected = np.rint(unit.astype(np.float64) * 255.0).astype(np.uint8)
    assert np.array_equal(grey(decode_image(encoded(unit, "TIFF"))), expected)
    wide = np.linspace(-5.0, 20.0, 256, dtype=np.float32).reshape(8, 32)
    image = decode_image(encoded(wide, "TIFF"))
    assert np.array_equal(grey(image), np.rint((wide + 5.0) / 25.0 * 255.0).astype(np.uint8))
    assert "min/max -5..20" in describe_decoding(image)
    broken = unit.copy()
    broken[3, 3] = np.nan
    with pytest.raises(ValueError, match="^map.tif: .*NaN"):
        decode_image(encoded(broken, "TIFF"), "map.tif")


def test_16bit_rgb_png_is_reduced_by_its_high_byte():
    # Pillow has no 16-bit RGB mode and cuts such PNGs to their high byte; the decoder says so.
    rows = np.random.default_rng(2).integers(0, 65536, size=(4, 5, 3)).astype(">u2")
    raw = b"".join(b"\0" + row.tobytes() for row in rows)

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 5, 4, 16, 2, 0, 0, 0))
    png += chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
    image = decode_image(png)
    assert np.array_equal(np.asarray(image), (rows.astype(np.uint16) >> 8).astype(np.uint8))
    assert "16-bit RGB: high byte" in describe_decoding(image)


# ----------------------------------------------------------------------------------------------------------------------
# DICOM: grey


def test_ct_without_a_window_gets_the_ct_default_window():
    path = dicom_path("CT_small.dcm")
    dataset = pydicom.dcmread(path)
    assert "WindowCenter" not in dataset and dataset.Modality == "CT"
    image = load_image(path)
    hounsfield = dataset.pixel_array * float(dataset.RescaleSlope) + float(dataset.RescaleIntercept)
    assert image.size == (128, 128)
    assert np.array_equal(grey(image), reference_linear(hounsfield, 40, 400))
    assert "CT default C=40 W=400" in describe_decoding(image)
    assert is_dicom(dicom_bytes("CT_small.dcm"))


@pytest.mark.parametrize("name", ["MR_small.dcm", "MR_small_RLE.dcm", "MR_small_bigendian.dcm", "693_J2KI.dcm"])
def test_dicom_window_from_the_file(name):
    dataset = pydicom.dcmread(dicom_path(name))
    values = dataset.pixel_array * float(dataset.get("RescaleSlope", 1)) + float(dataset.get("RescaleIntercept", 0))
    center, width = float(dataset.WindowCenter), float(dataset.WindowWidth)
    image = load_image(dicom_path(name))
    assert np.array_equal(grey(image), reference_linear(values, center, width))
    assert f"window C={center:g} W={width:g} from the file" in describe_decoding(image)


def test_multi_valued_window_takes_the_first():
    dataset = pydicom.dcmread(dicom_path("examples_overlay.dcm"))
    assert list(dataset.WindowCenter) == [450, 200] and list(dataset.WindowWidth) == [790, 443]
    pixels = grey(load_image(dicom_path("examples_overlay.dcm")))
    assert np.array_equal(pixels, reference_linear(dataset.pixel_array, 450, 790))
    assert not np.array_equal(pixels, reference_linear(dataset.pixel_array, 200, 443))


def test_rescale_is_applied_before_the_window():
    def change(ds):
        ds.RescaleSlope, ds.RescaleIntercept = 2, -500

    image = decode_image(rewritten("MR_small.dcm", change))
    raw = pydicom.dcmread(dicom_path("MR_small.dcm")).pixel_array
    assert np.array_equal(grey(image), reference_linear(raw * 2.0 - 500.0, 600, 1600))
    assert "rescale 2*x-500" in describe_decoding(image)


def test_monochrome1_is_inverted():
    def change(ds):
        ds.PhotometricInterpretation = "MONOCHROME1"

    image = decode_image(rewritten("MR_small.dcm", change))
    raw = pydicom.dcmread(dicom_path("MR_small.dcm")).pixel_array
    assert np.array_equal(grey(image), 255 - reference_linear(raw, 600, 1600))
    assert "inverted (MONOCHROME1)" in describe_decoding(image)


def test_voi_lut_functions_linear_exact_and_sigmoid():
    raw = pydicom.dcmread(dicom_path("MR_small.dcm")).pixel_array.astype(np.float64)

    def function(name):
        def change(ds):
            ds.VOILUTFunction = name

        return grey(decode_image(rewritten("MR_small.dcm", change)))

    exact = np.clip((raw - 600) / 1600 + 0.5, 0, 1) * 255
    assert np.array_equal(function("LINEAR_EXACT"), np.rint(exact).astype(np.uint8))
    sigmoid = 255 / (1 + np.exp(-4 * (raw - 600) / 1600))
    assert np.array_equal(function("SIGMOID"), np.rint(sigmoid).astype(np.uint8))


def test_mr_without_a_window_is_stretched_to_its_min_max():
    def change(ds):
        del ds.WindowCenter, ds.WindowWidth

    image = decode_image(rewritten("MR_small.dcm", change))
    raw = pydicom.dcmread(dicom_path("MR_small.dcm")).pixel_array.astype(np.float64)
    expected = np.rint((raw - raw.min()) / (raw.max() - raw.min()) * 255).astype(np.uint8)
    assert np.array_equal(grey(image), expected)
    assert "min/max 127..2145" in describe_decoding(image)


def test_enhanced_multiframe_functional_groups_give_rescale_and_window():
    def change(ds):
        del ds.WindowCenter, ds.WindowWidth
        transform = Dataset()
        transform.RescaleSlope, transform.RescaleIntercept, transform.RescaleType = 3, 100, "US"
        shared_window, frame_window = Dataset(), Dataset()
        shared_window.WindowCenter, shared_window.WindowWidth = 9999, 10
        frame_window.WindowCenter, frame_window.WindowWidth = 3000, 4000
        shared, per_frame = Dataset(), Dataset()
        shared.PixelValueTransformationSequence = Sequence([transform])
        shared.FrameVOILUTSequence = Sequence([shared_window])
        per_frame.FrameVOILUTSequence = Sequence([frame_window])  # the frame's own window wins over the shared one
        ds.SharedFunctionalGroupsSequence = Sequence([shared])
        ds.PerFrameFunctionalGroupsSequence = Sequence([per_frame])

    image = decode_image(rewritten("MR_small.dcm", change))
    raw = pydicom.dcmread(dicom_path("MR_small.dcm")).pixel_array
    assert np.array_equal(grey(image), reference_linear(raw * 3.0 + 100.0, 3000, 4000))


def test_voi_lut_sequence_applies_when_there_is_no_window():
    def change(ds):
        del ds.WindowCenter, ds.WindowWidth
        item = Dataset()
        item.add_new("LUTDescriptor", "US", [4096, 0, 12])
        item.add_new("LUTData", "US", [4095 - i for i in range(4096)])  # an inverted ramp
        ds.VOILUTSequence = Sequence([item])

    image = decode_image(rewritten("MR_small.dcm", change))
    raw = pydicom.dcmread(dicom_path("MR_small.dcm")).pixel_array.astype(np.float64)
    assert np.array_equal(grey(image), np.rint((4095 - raw) / 4095 * 255).astype(np.uint8))
    assert "VOI LUT from the file" in describe_decoding(image)


def test_multiframe_grey_takes_the_first_frame():
    dataset = pydicom.dcmread(dicom_path("rtdose.dcm"))
    frames = dataset.pixel_array.astype(np.float64)
    assert frames.shape[0] == 15
    first = frames[0]
    image = load_image(dicom_path("rtdose.dcm"))
    expected = np.rint((first - first.min()) / (first.max() - first.min()) * 255).astype(np.uint8)
    assert np.array_equal(grey(image), expected)
    assert "frame 1 of 15" in describe_decoding(image)


# ----------------------------------------------------------------------------------------------------------------------
# DICOM: colour


@pytest.mark.parametrize("name", ["examples_rgb_color.dcm", "SC_rgb_small_odd.dcm", "SC_rgb_small_odd_big_endian.dcm"])
def test_rgb_dicom_keeps_its_colours(name):
    image = load_image(dicom_path(name))
    assert np.array_equal(np.asarray(image), pydicom.dcmread(dicom_path(name)).pixel_array)
    assert describe_decoding(image) == "DICOM RGB, 8 bits as stored"


def test_ybr_dicom_is_converted_to_rgb():
    dataset = pydicom.dcmread(dicom_path("SC_ybr_full_422_uncompressed.dcm"))
    raw = pydicom.pixels.pixel_array(dataset, raw=True)  # the stored Y, Cb, Cr values
    expected = convert_color_space(raw, "YBR_FULL_422", "RGB")
    image = load_image(dicom_path("SC_ybr_full_422_uncompressed.dcm"))
    assert np.array_equal(np.asarray(image), expected) and not np.array_equal(expected, raw)
    assert "RGB (from YBR_FULL_422)" in describe_decoding(image)


@pytest.mark.parametrize("name, frames", [("SC_rgb_rle_2frame.dcm", 2), ("SC_rgb_rle_16bit_2frame.dcm", 2)])
def test_multiframe_rgb_takes_the_first_frame(name, frames):
    stack = pydicom.dcmread(dicom_path(name)).pixel_array
    assert stack.shape[0] == frames and not np.array_equal(stack[0], stack[1])
    full = 2 ** int(pydicom.dcmread(dicom_path(name)).BitsStored) - 1
    image = load_image(dicom_path(name))
    assert np.array_equal(np.asarray(image), np.rint(stack[0] / full * 255.0).astype(np.uint8))
    assert f"frame 1 of {frames}" in describe_decoding(image)


def test_palette_colour_dicom_goes_through_its_lookup_tables():
    dataset = pydicom.dcmread(dicom_path("examples_palette.dcm"))
    indices = dataset.pixel_array
    channels = []
    for colour in ("Red", "Green", "Blue"):
        entries, first, bits = dataset[f"{colour}PaletteColorLookupTableDescriptor"].value
        assert (entries, first, bits) == (256, 0, 16)
        table = np.frombuffer(dataset[f"{colour}PaletteColorLookupTableData"].value, dtype="<u2")
        channels.append(table[indices] >> 8)  # 16-bit entries -> their high byte
    image = load_image(dicom_path("examples_palette.dcm"))
    pixels = np.asarray(image)
    assert np.array_equal(pixels, np.stack(channels, axis=-1).astype(np.uint8))
    assert not np.array_equal(pixels[..., 0], pixels[..., 1])  # colour, not the grey indices
    assert "PALETTE COLOR, 16-bit palette" in describe_decoding(image)


# ----------------------------------------------------------------------------------------------------------------------
# DICOM: rejected with a reason


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom warns about badVR.dcm's value
@pytest.mark.parametrize(
    "name, reason",
    [
        ("MR_small_jpeg_ls_lossless.dcm", "cannot decode DICOM pixel data \\(JPEG-LS Lossless.*pylibjpeg"),
        ("JPGExtended.dcm", "cannot decode DICOM pixel data \\(JPEG Extended"),
        ("MR_truncated.dcm", "cannot decode DICOM pixel data.*less than expected"),
        ("rtplan.dcm", "Modality RTPLAN\\) has no pixel data"),
        ("waveform_ecg.dcm", "has no pixel data"),
        ("meta_missing_tsyntax.dcm", "no TransferSyntaxUID"),
        ("badVR.dcm", "NumberOfFrames '1A'"),
    ],
)
def test_undecodable_dicoms_are_rejected_with_a_reason(name, reason):
    with pytest.raises(ValueError, match=f"^row 3: .*{reason}"):
        decode_image(dicom_bytes(name), "row 3")


@pytest.mark.parametrize(
    "change, reason",
    [
        (lambda ds: setattr(ds, "WindowWidth", 0), "window C=600 W=0: window width 0 is below 1"),
        (lambda ds: delattr(ds, "WindowWidth"), "has WindowCenter but no WindowWidth"),
        (lambda ds: setattr(ds, "VOILUTFunction", "CUBIC"), "VOILUTFunction 'CUBIC' is not one of"),
        (lambda ds: setattr(ds, "PhotometricInterpretation", "ARGB"), "PhotometricInterpretation 'ARGB'"),
    ],
)
def test_bad_dicom_attributes_are_rejected_with_a_reason(change, reason):
    with pytest.raises(ValueError, match=f"^scan.dcm: .*{reason}"):
        decode_image(rewritten("MR_small.dcm", change), "scan.dcm")


SHIPPED_DICOMS = sorted(
    os.path.basename(path)
    for path in glob.glob(os.path.join(os.path.dirname(pydicom.data.__file__), "test_files", "*.dcm"))
)


@pytest.mark.parametrize("name", SHIPPED_DICOMS)
def test_every_shipped_dicom_decodes_or_is_rejected_with_a_value_error(name):
    data = dicom_bytes(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about the odd files it is given on purpose
        try:
            image = decode_image(data, name)
        except ValueError as error:
            assert str(error).startswith(f"{name}: ")
            return
    assert image.mode == "RGB" and image.width > 0 and image.height > 0
    assert describe_decoding(image).startswith("DICOM ")
