import torch

from biomedgpt.model.positions import (
    decoder_image_position_ids,
    image_position_ids,
    image_relative_buckets,
    text_relative_buckets,
)


def test_text_buckets_hand_computed():
    buckets = text_relative_buckets(256, 1024)
    assert buckets.shape == (1024, 1024) and buckets.dtype == torch.long

    def bucket(rel):
        i, j = (rel, 0) if rel >= 0 else (0, -rel)
        return int(buckets[i, j])

    # |rel| <= 128 keeps its own bucket, offset by 255.
    assert [bucket(r) for r in (0, 5, -5, 127, 128, -128)] == [255, 260, 250, 382, 383, 127]
    # Beyond 128: ceil(ln(|rel|/128) / ln(1023/128) * 127) + 128, signed; e.g. 129 -> 129, 200 -> 156.
    assert bucket(129) == 129 + 255
    assert bucket(200) == 156 + 255
    assert bucket(-200) == -156 + 255
    assert bucket(1023) == 510 and bucket(-1023) == 0
    assert int(buckets.min()) == 0 and int(buckets.max()) == 510


def test_image_buckets_hand_computed():
    index = image_relative_buckets(42)
    assert index.shape == (1765, 1765)
    same = 41 * 83 + 41
    assert int(index[1, 1]) == same == 3444
    assert int(index[1, 2]) == 41 * 83 + 40  # key one column to the right
    assert int(index[43, 1]) == 42 * 83 + 41  # query one row below
    assert int(index[0, 5]) == 6889 and int(index[5, 0]) == 6890 and int(index[0, 0]) == 6891
    assert int(index[1:, 1:].max()) == 82 * 83 + 82 == 6888


def test_image_position_ids_row_major_on_42_grid():
    ids = image_position_ids(2, 3, 42)
    assert ids.tolist() == [1, 2, 3, 43, 44, 45]


def test_decoder_code_positions():
    ids = decoder_image_position_ids(16, 42, 1024)
    assert ids.shape == (1026,)
    assert ids[:3].tolist() == [0, 1, 2]
    assert int(ids[16]) == 16 and int(ids[17]) == 43 and int(ids[256]) == 15 * 42 + 15 + 1
    assert set(ids[257:].tolist()) == {1024}


def test_buckets_built_on_cpu_inside_meta_context():
    text_relative_buckets.cache_clear()
    with torch.device("meta"):
        buckets = text_relative_buckets(256, 1024)
    assert buckets.device.type == "cpu"
