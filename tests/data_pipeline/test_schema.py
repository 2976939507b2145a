"""The record format: round trip, the documented byte layout, determinism, and errors that name the field."""
import json
import struct
import types
import zlib

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from data_pipeline import schema


def fake_pair(seed=7, size=(24, 32), num_differences=2, kinds=None):
    """A Pair look-alike with random pixels; no renderer needed."""
    rng = np.random.default_rng(seed)
    h, w = size
    image_a = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    image_b = image_a.copy()
    boxes = []
    for _ in range(num_differences):
        x0, y0 = rng.integers(0, w - 4), rng.integers(0, h - 4)
        x1, y1 = rng.integers(x0 + 1, w + 1), rng.integers(y0 + 1, h + 1)
        image_b[y0:y1, x0:x1] ^= 0x55
        boxes.append([x0, y0, x1, y1])
    kinds = kinds or [("color", "move", "add", "remove")[i % 4] for i in range(num_differences)]
    return types.SimpleNamespace(
        seed=seed, image_a=image_a, image_b=image_b,
        boxes=np.asarray(boxes, np.float32).reshape(-1, 4) + np.float32([0.25, 0.5, 0, 0]),  # non-integers
        kinds=kinds, differences=[{"kind": k, "object": i} for i, k in enumerate(kinds)],
        spec_a={"objects": [{"pos": np.array([0.1, -0.2, 0.3]), "rgba": (1, 0, 0, 1)}], "n": np.int64(3)},
        spec_b={"objects": [{"pos": np.array([0.1, -0.2, 0.35]), "rgba": (1, 0, 0, 1)}], "n": np.int64(3)},
        attempts=3, rejections={"invisible_object": 2})


def _reseal(body: bytes, version=schema.VERSION, magic=schema.MAGIC, header_len=None) -> bytes:
    """Builds a record around `body` with a correct CRC, to reach the checks behind the CRC."""
    return struct.pack("<4sHII", magic, version, header_len, zlib.crc32(body)) + body


def _parts(record: bytes):
    magic, version, header_len, crc = struct.unpack_from("<4sHII", record)
    body = record[14:]
    return header_len, json.loads(body[:header_len]), body[header_len:]


def test_round_trip_restores_every_field():
    pair = fake_pair()
    out = schema.decode(schema.encode(pair))
    np.testing.assert_array_equal(out["image_a"], pair.image_a)
    np.testing.assert_array_equal(out["image_b"], pair.image_b)
    assert out["image_a"].dtype == np.uint8 and out["image_b"].shape == (24, 32, 3)
    assert out["boxes"].dtype == np.float32
    np.testing.assert_array_equal(out["boxes"], pair.boxes)  # bit-exact, not approximately
    assert out["kinds"] == pair.kinds and out["num_differences"] == 2
    assert out["seed"] == 7 and out["attempts"] == 3 and out["rejections"] == {"invisible_object": 2}
    assert out["differences"] == pair.differences
    assert out["spec_b"]["objects"][0]["pos"] == [0.1, -0.2, 0.35] and out["spec_a"]["n"] == 3
    assert out["version"] == schema.VERSION


def test_bytes_follow_the_documented_layout():
    """Parses the record by hand from the module docstring's table, not through `decode`."""
    pair = fake_pair()
    record = schema.encode(pair)
    magic, version, header_len, crc = struct.unpack_from("<4sHII", record)
    assert (magic, version) == (b"DiGP", 1)
    assert crc == zlib.crc32(record[14:])
    header_len, header, pngs = _parts(record)
    assert header["png_a_len"] + header["png_b_len"] == len(pngs)
    assert pngs[:8] == b"\x89PNG\r\n\x1a\n" and pngs[header["png_a_len"]:][:8] == b"\x89PNG\r\n\x1a\n"
    assert header["num_differences"] == 2 and header["kinds"] == ["color", "move"]
    assert schema.read_header(record) == header


def test_encoding_is_deterministic_and_zero_differences_is_valid():
    assert schema.encode(fake_pair(seed=3)) == schema.encode(fake_pair(seed=3))
    assert schema.encode(fake_pair(seed=3)) != schema.encode(fake_pair(seed=4))
    out = schema.decode(schema.encode(fake_pair(num_differences=0)))
    assert out["num_differences"] == 0 and out["boxes"].shape == (0, 4) and out["kinds"] == []


@settings(max_examples=25, deadline=None)
@given(h=st.integers(1, 40), w=st.integers(5, 40), m=st.integers(0, 6), seed=st.integers(0, 2**40))
def test_round_trip_property(h, w, m, seed):
    pair = fake_pair(seed=seed, size=(max(h, 5), w), num_differences=m)
    out = schema.decode(schema.encode(pair))
    np.testing.assert_array_equal(out["image_b"], pair.image_b)
    np.testing.assert_array_equal(out["boxes"], pair.boxes)
    assert out["seed"] == seed and out["num_differences"] == m


@pytest.mark.parametrize("where", [0.0, 0.2, 0.5, 0.99])
def test_any_flipped_byte_is_detected(where):
    record = bytearray(schema.encode(fake_pair()))
    pos = 14 + int(where * (len(record) - 15))
    record[pos] ^= 0x01
    with pytest.raises(schema.SchemaError, match="crc32"):
        schema.decode(bytes(record))


@pytest.mark.parametrize("keep", [0, 5, 13, 200])
def test_truncation_is_detected(keep):
    record = schema.encode(fake_pair())
    with pytest.raises(schema.SchemaError, match="truncated|crc32"):
        schema.decode(record[:keep])


def test_errors_name_magic_version_and_fields():
    record = schema.encode(fake_pair())
    header_len, header, pngs = _parts(record)
    with pytest.raises(schema.SchemaError, match="magic"):
        schema.decode(b"NOPE" + record[4:])
    with pytest.raises(schema.SchemaError, match="version 2"):
        schema.decode(_reseal(record[14:], version=2, header_len=header_len))

    def with_header(**changes):
        h = {k: v for k, v in {**header, **changes}.items() if v is not None}
        hb = json.dumps(h).encode()
        return _reseal(hb + pngs, header_len=len(hb))

    with pytest.raises(schema.SchemaError, match="'kinds' is missing"):
        schema.decode(with_header(kinds=None))
    with pytest.raises(schema.SchemaError, match="'seed' must be int"):
        schema.decode(with_header(seed="7"))
    with pytest.raises(schema.SchemaError, match="num_differences is 3"):
        schema.decode(with_header(num_differences=3))
    with pytest.raises(schema.SchemaError, match="'boxes' has a box outside"):
        schema.decode(with_header(boxes=[[0, 0, 33, 5], [1, 1, 2, 2]]))
    with pytest.raises(schema.SchemaError, match="image_a has shape"):
        schema.decode(with_header(height=23))
    with pytest.raises(schema.SchemaError, match="png_a_len"):
        schema.decode(with_header(png_a_len=header["png_a_len"] - 1))
    swapped = with_header(png_a_len=header["png_a_len"] - 1, png_b_len=header["png_b_len"] + 1)
    with pytest.raises(schema.SchemaError, match="image_a is not a readable PNG|image_b is not"):
        schema.decode(swapped)


def test_encode_rejects_bad_pairs():
    pair = fake_pair()
    pair.image_b = pair.image_b[:-1]
    with pytest.raises(schema.SchemaError, match="differ in shape"):
        schema.encode(pair)
    pair = fake_pair()
    pair.kinds = pair.kinds[:1]
    with pytest.raises(schema.SchemaError, match="2 boxes but 1 kinds"):
        schema.encode(pair)
    pair = fake_pair()
    pair.image_a = pair.image_a.astype(np.float32)
    with pytest.raises(schema.SchemaError, match="image_a must be uint8"):
        schema.encode(pair)


def test_png_is_standard_and_lossless():
    """The hand-written PNG against Pillow's reader (an independent decoder), odd sizes included."""
    import io

    from PIL import Image

    rng = np.random.default_rng(0)
    for h, w in ((1, 1), (3, 7), (31, 17)):
        image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        data = schema._png(image, "image_a")
        with Image.open(io.BytesIO(data)) as im:
            assert (im.format, im.mode, im.size) == ("PNG", "RGB", (w, h))
            np.testing.assert_array_equal(np.asarray(im), image)
    with pytest.raises(schema.SchemaError, match="image_b must be uint8"):
        schema._png(np.zeros((0, 4, 3), np.uint8), "image_b")


def test_fast_png_path_equals_pillow_and_other_pngs_still_decode():
    import io

    from PIL import Image

    rng = np.random.default_rng(7)
    image = rng.integers(0, 256, (13, 17, 3), dtype=np.uint8)
    ours = schema._png(image, "image_a")
    fast = schema._unpng_unfiltered(memoryview(ours), 13, 17)
    with Image.open(io.BytesIO(ours)) as im:
        np.testing.assert_array_equal(fast, np.asarray(im))
    # A PNG written by Pillow (adaptive filters) takes the Pillow path and decodes the same pixels.
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    assert schema._unpng_unfiltered(memoryview(buf.getvalue()), 13, 17) is None
    np.testing.assert_array_equal(schema._unpng(memoryview(buf.getvalue()), "image_a", 13, 17), image)
