from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vestis.images import ImageError, Preprocess, crop_box, load_image, load_reduced


def jpeg_bytes(image: Image.Image, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=95, **kwargs)
    return buffer.getvalue()


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def test_path_and_bytes_decode_to_the_same_pixels(data_dir):
    path = data_dir / "luma" / "images" / "mh06-blue_main.jpg"
    from_path = load_image(path)
    from_bytes = load_image(path.read_bytes())
    assert from_path.mode == "RGB"
    assert np.array_equal(np.asarray(from_path), np.asarray(from_bytes))


def test_exif_orientation_is_applied():
    image = Image.new("RGB", (40, 20), (200, 10, 10))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    loaded = load_image(jpeg_bytes(image, exif=exif.tobytes()))
    assert loaded.size == (20, 40)


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "LA", "CMYK", "I;16", "1"])
def test_every_colour_mode_becomes_rgb(mode):
    image = Image.new("RGB", (16, 12), (30, 120, 220)).convert(mode)
    if mode == "I;16":
        image = Image.fromarray(np.full((12, 16), 40000, dtype=np.uint16))
    data = png_bytes(image) if mode != "CMYK" else jpeg_bytes(image)
    loaded = load_image(data)
    assert loaded.mode == "RGB"
    assert loaded.size == (16, 12)
    if mode == "I;16":
        assert np.asarray(loaded)[0, 0, 0] == round(40000 / 65535 * 255)


def test_transparent_pixels_become_white():
    image = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    assert np.asarray(load_image(png_bytes(image)))[0, 0].tolist() == [255, 255, 255]


def test_zero_byte_file_is_refused_by_name(tmp_path):
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    with pytest.raises(ImageError, match="empty") as info:
        load_image(path)
    assert info.value.source == str(path)


def test_text_file_named_jpg_is_refused(tmp_path):
    path = tmp_path / "notes.jpg"
    path.write_text("this is not a photo\n")
    with pytest.raises(ImageError, match="not an image") as info:
        load_image(path)
    assert "notes.jpg" in str(info.value)


def test_truncated_jpeg_is_refused(tmp_path, data_dir):
    data = (data_dir / "luma" / "images" / "mh06-blue_main.jpg").read_bytes()
    path = tmp_path / "cut.jpg"
    path.write_bytes(data[: len(data) // 3])
    with pytest.raises(ImageError, match="truncated") as info:
        load_image(path)
    assert "cut.jpg" in str(info.value)


def png_claiming_size(width: int, height: int) -> bytes:
    """A tiny valid PNG whose header claims a huge size."""
    data = bytearray(png_bytes(Image.new("L", (1, 1))))
    ihdr = 8 + 8  # signature, then chunk length + type
    data[ihdr : ihdr + 8] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[ihdr - 4 : ihdr + 13]))
    data[ihdr + 13 : ihdr + 17] = struct.pack(">I", crc)
    return bytes(data)


def test_decompression_bomb_is_refused_before_decoding():
    with pytest.raises(ImageError, match="decompression bomb"):
        load_image(png_claiming_size(20000, 20000))


def test_missing_file_and_directory_are_clear_errors(tmp_path):
    with pytest.raises(ImageError, match="not found"):
        load_image(tmp_path / "nope.jpg")
    with pytest.raises(ImageError, match="directory"):
        load_image(tmp_path)


def test_letterbox_keeps_the_whole_garment_and_pads_to_square():
    tall = Image.new("RGB", (100, 200), (255, 0, 0))
    square = Preprocess(size=64, pad="constant", pad_value=(0, 0, 255)).letterbox(tall)
    pixels = np.asarray(square)
    assert square.size == (64, 64)
    # The red garment spans the full height (nothing cropped away) ...
    assert pixels[0, 32].tolist() == [255, 0, 0] and pixels[63, 32].tolist() == [255, 0, 0]
    # ... and the sides are padding.
    assert pixels[32, 0].tolist() == [0, 0, 255] and pixels[32, 63].tolist() == [0, 0, 255]


def test_preprocess_normalises_like_the_weights_expect():
    preprocess = Preprocess(size=32)
    array = preprocess.to_array(Image.new("RGB", (32, 32), (255, 127, 0)))
    assert array.shape == (3, 32, 32) and array.dtype == np.float32
    assert np.allclose(array[:, 0, 0], [(255 - 127) / 128, 0.0, -127 / 128])


def test_crop_box_is_clipped_to_the_image():
    image = Image.new("RGB", (50, 40))
    assert crop_box(image, (-10, 5, 30, 100)).size == (30, 35)
    assert crop_box(image, None) is image


# -- the server's reduced decode ------------------------------------------------------------
@pytest.mark.parametrize("mode", ["RGB", "P", "L", "RGBA", "I;16", "1"])
def test_load_reduced_keeps_the_full_size_and_shrinks_the_pixels(mode):
    image = Image.new("RGB", (3000, 1000), (30, 120, 220))
    image.paste((250, 250, 0), (1500, 0, 3000, 1000))
    if mode == "I;16":
        image = Image.fromarray(np.full((1000, 3000), 40000, np.uint16))
    reduced = load_reduced(png_bytes(image.convert(mode) if mode != "I;16" else image),
                           max_side=500)
    assert reduced.image.mode == "RGB" and max(reduced.image.size) <= 500
    assert (reduced.width, reduced.height) == (3000, 1000)
    assert reduced.image.size == (500, 167)
    assert reduced.full_box((250, 0, 500, 167)) == (1500, 0, 3000, 1000)
    if mode in ("RGB", "P", "RGBA"):  # colours survive (palette indices are not averaged)
        for (x, y), colour in (((100, 80), (30, 120, 220)), ((400, 80), (250, 250, 0))):
            found = reduced.image.getpixel((x, y))  # P: the web palette's nearest colour
            assert max(abs(a - b) for a, b in zip(found, colour, strict=True)) <= 12, found


def test_load_reduced_gives_the_upright_full_size_of_a_rotated_jpeg():
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    reduced = load_reduced(jpeg_bytes(Image.new("RGB", (4000, 2000)), exif=exif.tobytes()),
                           max_side=400)
    assert (reduced.width, reduced.height) == (2000, 4000)
    assert reduced.image.size == (200, 400)


def test_load_reduced_refuses_more_pixels_than_its_cap_from_the_header():
    with pytest.raises(ImageError, match="decompression bomb.*limit 1000000"):
        load_reduced(png_claiming_size(1001, 1000), max_pixels=10**6)
    # 11000 x 11000 is under the command line's cap but far over the server's.
    with pytest.raises(ImageError, match="11000x11000 pixels, limit 33554432"):
        load_reduced(png_claiming_size(11000, 11000))


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc (Linux)")
def test_a_big_jpeg_is_decoded_at_a_fraction_of_its_pixels(tmp_path):
    """Draft mode: a 32-megapixel JPEG costs the server a few MB, not ~100 MB (measured as
    the peak RSS of a fresh process)."""
    import subprocess
    import sys

    path = tmp_path / "big.jpg"
    Image.new("RGB", (8000, 4000), (90, 60, 30)).save(path, quality=80)
    # VmHWM (this process's peak RSS, reset by exec), not ru_maxrss (kept across exec).
    probe = (
        "import re, sys; from pathlib import Path\n"
        "from vestis.images import load_image, load_reduced\n"
        "peak = lambda: int(re.search(r'VmHWM:\\s*(\\d+)', "
        "Path('/proc/self/status').read_text()).group(1))\n"
        "data = Path(sys.argv[1]).read_bytes(); before = peak()\n"
        "image = (load_reduced if sys.argv[2] == 'reduced' else load_image)(data)\n"
        "print((peak() - before) // 1024)\n"
    )
    grew = {how: int(subprocess.run([sys.executable, "-c", probe, str(path), how], check=True,
                                    capture_output=True, text=True).stdout)
            for how in ("reduced", "full")}
    assert grew["full"] >= 90, grew  # 8000 x 4000 x 3 bytes
    assert grew["reduced"] <= 20, grew
