"""Image decoding of odd files, cropping, resizing and tensor conversion."""
from __future__ import annotations

import io
import struct
import zlib

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from irkit.errors import ConfigError, ImageError
from irkit.io.images import (IMAGE_EXTENSIONS, InputSpec, crop_bbx, decode_image_bytes, load_image,
                             resize_max_side, resize_scale, to_tensor)


def _save(img: Image.Image, path, **kw):
    img.save(path, **kw)
    return path


def _rgb(h=20, w=30, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _check(arr, shape):
    assert isinstance(arr, np.ndarray) and arr.dtype == np.uint8
    assert arr.shape == shape and arr.flags["C_CONTIGUOUS"]


# ------------------------------------------------------------------ modes

def test_rgb_png_roundtrip(tmp_path):
    a = _rgb()
    out = load_image(_save(Image.fromarray(a), tmp_path / "a.png"))
    _check(out, a.shape)
    assert np.array_equal(out, a)


def test_cmyk_jpeg(tmp_path):
    p = _save(Image.new("CMYK", (16, 8), (0, 0, 0, 0)), tmp_path / "cmyk.jpg", quality=95)
    assert Image.open(p).mode == "CMYK"
    out = load_image(p)
    _check(out, (8, 16, 3))
    assert out.min() >= 250  # no ink = white
    dark = load_image(_save(Image.new("CMYK", (16, 8), (0, 0, 0, 255)), tmp_path / "k.jpg", quality=95))
    assert dark.max() <= 5  # full black ink = black


def test_16bit_png_scaled_not_clipped(tmp_path):
    a = np.array([[0, 65535, 257 * 100, 257 * 200]], dtype=np.uint16)
    p = _save(Image.fromarray(a), tmp_path / "g16.png")
    assert Image.open(p).mode.startswith("I")
    out = load_image(p)
    _check(out, (1, 4, 3))
    assert out[0, :, 0].tolist() == [0, 255, 100, 200]
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()


def test_palette_png_with_and_without_transparency(tmp_path):
    pal = Image.new("P", (4, 2))
    pal.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    pal.putpixel((0, 0), 1)
    out = load_image(_save(pal, tmp_path / "p.png"))
    _check(out, (2, 4, 3))
    assert out[0, 0].tolist() == [0, 0, 255] and out[1, 1].tolist() == [255, 0, 0]
    p2 = _save(pal, tmp_path / "pt.png", transparency=1)  # colour 1 (blue) is transparent
    out2 = load_image(p2)
    assert out2[0, 0].tolist() == [255, 255, 255] and out2[1, 1].tolist() == [255, 0, 0]


def test_alpha_composited_on_white(tmp_path):
    rgba = np.zeros((2, 3, 4), dtype=np.uint8)
    rgba[0, 0] = [0, 0, 0, 0]        # transparent black -> white
    rgba[0, 1] = [10, 20, 30, 255]   # opaque -> unchanged
    rgba[0, 2] = [0, 0, 0, 128]      # half black over white -> ~127
    out = load_image(_save(Image.fromarray(rgba, "RGBA"), tmp_path / "a.png"))
    _check(out, (2, 3, 3))
    assert out[0, 0].tolist() == [255, 255, 255]
    assert out[0, 1].tolist() == [10, 20, 30]
    assert all(abs(v - 127) <= 1 for v in out[0, 2].tolist())
    la = np.zeros((1, 2, 2), dtype=np.uint8)
    la[0, 1] = [50, 255]
    out = load_image(_save(Image.fromarray(la, "LA"), tmp_path / "la.png"))
    assert out[0, 0].tolist() == [255, 255, 255] and out[0, 1].tolist() == [50, 50, 50]


def test_gray_bilevel_float_int_modes(tmp_path):
    out = load_image(_save(Image.fromarray(np.full((3, 5), 77, np.uint8)), tmp_path / "l.png"))
    _check(out, (3, 5, 3))
    assert (out == 77).all()
    one = Image.new("1", (5, 3), 1)
    assert (load_image(_save(one, tmp_path / "b.png")) == 255).all()
    f = Image.fromarray(np.array([[-3.0, 12.4, 300.0]], dtype=np.float32), "F")
    assert load_image(_save(f, tmp_path / "f.tiff"))[0, :, 0].tolist() == [0, 12, 255]
    i = Image.fromarray(np.array([[0, 65535, 514]], dtype=np.int32), "I")
    assert load_image(_save(i, tmp_path / "i.tiff"))[0, :, 0].tolist() == [0, 255, 2]


def test_exif_orientation_6_transposes(tmp_path):
    a = np.zeros((20, 40, 3), dtype=np.uint8)  # stored 40 wide, 20 high
    a[:5, :5] = 255                             # white mark top-left
    exif = Image.Exif()
    exif[0x0112] = 6                            # rotate 90 degrees clockwise to display
    p = _save(Image.fromarray(a), tmp_path / "rot.jpg", exif=exif, quality=95)
    out = load_image(p)
    _check(out, (40, 20, 3))
    assert out[:5, -5:].mean() > 200            # top-left goes to top-right
    assert out[:5, :5].mean() < 50


def test_one_pixel(tmp_path):
    out = load_image(_save(Image.new("RGB", (1, 1), (1, 2, 3)), tmp_path / "one.png"))
    _check(out, (1, 1, 3))
    assert out[0, 0].tolist() == [1, 2, 3]


def test_decode_bytes_matches_file(tmp_path):
    p = _save(Image.fromarray(_rgb()), tmp_path / "x.png")
    assert np.array_equal(decode_image_bytes(p.read_bytes()), load_image(p))


# ------------------------------------------------------------------ bad files

def _png_header(width, height):
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def test_decompression_bomb_refused_from_header(tmp_path):
    p = tmp_path / "bomb.png"
    p.write_bytes(_png_header(100_000, 100_000))
    assert p.stat().st_size < 100
    with pytest.raises(ImageError, match="bomb.png.*(too large|refused)"):
        load_image(p)
    # our own configurable limit, checked before decoding (the file has no pixel data at all)
    p2 = tmp_path / "big.png"
    p2.write_bytes(_png_header(5000, 5000))
    with pytest.raises(ImageError, match=r"refused to decode a 5000x5000 image.*limit 1,000,000"):
        load_image(p2, max_pixels=1_000_000)
    with pytest.raises(ImageError, match="refused"):
        decode_image_bytes(p2.read_bytes(), max_pixels=1_000_000)
    ok = _save(Image.new("RGB", (100, 100)), tmp_path / "ok.png")
    assert load_image(ok, max_pixels=10_000).shape == (100, 100, 3)
    with pytest.raises(ImageError, match="10,001"):
        load_image(_save(Image.new("RGB", (1, 10_001)), tmp_path / "tall.png"), max_pixels=10_000)


def test_truncated_jpeg(tmp_path):
    buf = io.BytesIO()
    Image.fromarray(_rgb(64, 64)).save(buf, "JPEG")
    data = buf.getvalue()
    p = tmp_path / "trunc.jpg"
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match="trunc.jpg.*truncated"):
        load_image(p)
    with pytest.raises(ImageError, match="up.jpg"):
        decode_image_bytes(data[:300], name="up.jpg")


@pytest.mark.parametrize("content, match", [
    (b"", "empty file"),
    (b"hello, I am not an image\n", "not a recognised image"),
    (b"\xff\xd8\xff\xe0" + b"\x00" * 40, "(not a recognised|cannot)"),
])
def test_bad_files(tmp_path, content, match):
    p = tmp_path / "bad.jpg"
    p.write_bytes(content)
    with pytest.raises(ImageError, match="bad.jpg.*" + match):
        load_image(p)


def test_directory_and_missing(tmp_path):
    d = tmp_path / "dir.jpg"
    d.mkdir()
    with pytest.raises(ImageError, match="dir.jpg.*directory"):
        load_image(d)
    with pytest.raises(ImageError, match="nope.jpg.*not found"):
        load_image(tmp_path / "nope.jpg")
    with pytest.raises(ImageError, match="empty"):
        decode_image_bytes(b"")
    with pytest.raises(ImageError, match="bytes"):
        decode_image_bytes("not bytes")  # type: ignore[arg-type]


# ------------------------------------------------------------------ crop

def test_crop_truncates_like_published_code():
    a = _rgb(20, 30)
    bbx = [1.7, 2.2, 5.9, 7.99]
    out = crop_bbx(a, bbx)
    assert np.array_equal(out, a[int(2.2):int(7.99), int(1.7):int(5.9)])
    assert out.shape == (5, 4, 3) and out.flags["C_CONTIGUOUS"]


def test_crop_clipped_to_image():
    a = _rgb(20, 30)
    assert np.array_equal(crop_bbx(a, [-5.5, -3, 100, 100]), a)
    assert np.array_equal(crop_bbx(a, (25.0, 10.0, 40.0, 25.0)), a[10:20, 25:30])


@pytest.mark.parametrize("bbx", [[5, 5, 5, 9], [5, 9, 8, 9.9], [50, 50, 60, 60], [-9, -9, -1, -1],
                                 [0, 0, float("nan"), 3], [0, 0, 3], "abcd", None])
def test_crop_errors(bbx):
    with pytest.raises(ImageError):
        crop_bbx(_rgb(20, 30), bbx)


# ------------------------------------------------------------------ resize

def test_resize_scale_sizes_and_interpolation():
    a = _rgb(60, 100)
    assert resize_scale(a, 1.0) is a
    down = resize_scale(a, 0.7071)
    assert down.shape == (42, 71, 3)
    assert np.array_equal(down, cv2.resize(a, None, fx=0.7071, fy=0.7071, interpolation=cv2.INTER_AREA))
    up = resize_scale(a, 1.4142)
    assert up.shape == (85, 141, 3)
    assert np.array_equal(up, cv2.resize(a, None, fx=1.4142, fy=1.4142, interpolation=cv2.INTER_LINEAR))
    cubic = resize_scale(a, 2.0, interp_up="cubic")
    assert np.array_equal(cubic, cv2.resize(a, None, fx=2.0, fy=2.0, interpolation=cv2.INTER_CUBIC))
    for name in ("nearest", "lanczos", "area", "linear"):
        assert resize_scale(a, 0.5, interp_down=name).shape == (30, 50, 3)


def test_resize_max_side():
    a = _rgb(60, 100)
    assert resize_max_side(a, 50).shape == (30, 50, 3)
    assert resize_max_side(a, 200).shape == (120, 200, 3)
    assert resize_max_side(a, 100) is a
    assert resize_max_side(_rgb(100, 7), 10).shape == (10, 1, 3)
    assert resize_max_side(_rgb(7, 7), 3).shape == (3, 3, 3)


@pytest.mark.parametrize("call, err", [
    (lambda a: resize_scale(a, 0), ConfigError),
    (lambda a: resize_scale(a, -1.0), ConfigError),
    (lambda a: resize_scale(a, float("nan")), ConfigError),
    (lambda a: resize_scale(a, 0.5, interp_down="bogus"), ConfigError),
    (lambda a: resize_scale(a, 0.001), ImageError),
    (lambda a: resize_max_side(a, 0), ConfigError),
    (lambda a: resize_max_side(a, 2.5), ConfigError),
    (lambda a: resize_scale(a[..., 0], 0.5), ImageError),
    (lambda a: resize_scale(a.astype(np.float32), 0.5), ImageError),
])
def test_resize_errors(call, err):
    with pytest.raises(err):
        call(_rgb(60, 100))


# ------------------------------------------------------------------ to_tensor

def test_to_tensor_rgb_values():
    a = _rgb(4, 5)
    spec = InputSpec()
    t = to_tensor(a, spec)
    assert t.dtype == torch.float32 and t.shape == (3, 4, 5) and t.is_contiguous()
    mean = np.array(spec.mean, np.float32)
    std = np.array(spec.std, np.float32)
    expect = ((a.astype(np.float32) / 255.0 - mean) / std).transpose(2, 0, 1)
    assert np.array_equal(t.numpy(), expect)  # bit-exact float32 recipe
    assert t[0, 1, 2].item() == pytest.approx((a[1, 2, 0] / 255 - 0.485) / 0.229, rel=1e-6)


def test_to_tensor_bgr_order():
    a = np.zeros((2, 2, 3), dtype=np.uint8)
    a[..., 0], a[..., 1], a[..., 2] = 10, 20, 30   # R, G, B
    spec = InputSpec(channel_order="BGR", mean=(0.406, 0.456, 0.485), std=(0.225, 0.224, 0.229))
    t = to_tensor(a, spec)
    assert t[0, 0, 0].item() == pytest.approx((30 / 255 - 0.406) / 0.225, rel=1e-6)  # blue first
    assert t[2, 0, 0].item() == pytest.approx((10 / 255 - 0.485) / 0.229, rel=1e-6)
    plain = InputSpec(channel_order="bgr", mean=(0, 0, 0), std=(1, 1, 1))
    assert plain.channel_order == "BGR"
    np.testing.assert_array_equal(to_tensor(a, plain)[:, 0, 0].numpy(), np.float32([30, 20, 10]) / np.float32(255))


def test_multiscale_recipe():
    """Max side first, then the scale, on uint8, then to_tensor (irkit.extract.scaled_inputs, the one copy)."""
    from types import SimpleNamespace

    from irkit.extract import scaled_inputs

    a = _rgb(60, 100)
    spec = InputSpec(max_side=50)
    t = scaled_inputs(SimpleNamespace(input_spec=spec), a, [0.5, 1.0])
    assert [x.shape for x in t] == [(3, 15, 25), (3, 30, 50)]
    assert torch.equal(t[0], to_tensor(resize_scale(resize_max_side(a, 50), 0.5), spec))


@pytest.mark.parametrize("ext", IMAGE_EXTENSIONS)
def test_every_image_extension_decodes(tmp_path, ext):
    """Each extension in the one list is a format load_image decodes (so listing it is not a lie)."""
    a = _rgb(12, 16)
    path = tmp_path / f"x{ext}"
    img = Image.fromarray(a)
    (img.convert("L") if ext == ".pgm" else img.quantize(64) if ext == ".gif" else img).save(path)
    out = load_image(path)
    assert out.shape == (12, 16, 3) and out.dtype == np.uint8
    if ext in (".png", ".bmp", ".tif", ".tiff", ".ppm"):  # lossless RGB formats
        np.testing.assert_array_equal(out, a)


def test_one_extension_list():
    """Collections, training folders, photo pools and cleaning all read the same extensions."""
    import inspect

    from irkit.data import collection, labelled, synthetic_pairs

    assert IMAGE_EXTENSIONS == tuple(e.lower() for e in IMAGE_EXTENSIONS) and ".gif" in IMAGE_EXTENSIONS
    for fn in (collection.load_collection, collection.scan_folder, labelled.folder_per_class,
               synthetic_pairs.photo_pool):
        assert inspect.signature(fn).parameters["extensions"].default is IMAGE_EXTENSIONS, fn


@pytest.mark.parametrize("kw", [{"channel_order": "RGBA"}, {"std": (0.2, 0.0, 0.2)}, {"mean": (1, 2)},
                                {"max_side": 0}, {"interp_down": "bicubic"}, {"mean": (0, float("inf"), 0)}])
def test_input_spec_validation(kw):
    with pytest.raises(ConfigError):
        InputSpec(**kw)
