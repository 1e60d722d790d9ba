"""load_image, the one image decoder: a file gives the same 0-255 pixels in the built dataset (as `datasets` decodes
it for training) and at caption time, for EXIF-rotated JPEGs, 12-bit grey PNGs, 16-bit RGB and 4-band uint16 TIFFs."""

from __future__ import annotations

import io
import sys

import datasets
import numpy as np
import pytest
import tifffile
import torch
from PIL import Image, UnidentifiedImageError

from dataset_builder.build import build
from dataset_builder.images import check_image
from modeling_cnngemma import CNNGemmaImageProcessor, load_image

HEIGHT, WIDTH = 24, 40  # not square, so that a missed 90-degree turn changes the shape
ORIENTATION = 0x0112
# Files the builder stores byte for byte (RGB JPEG/PNG) or converts losslessly (to an 8-bit PNG), never downscaled
CASES = {
    "exif3.jpg": "RGB JPEG, EXIF orientation 3 (stored byte for byte)",
    "exif6.jpg": "RGB JPEG, EXIF orientation 6 (stored byte for byte)",
    "grey12.png": "12-bit grey PNG (values 0..4095)",
    "rgb16.tif": "16-bit RGB TIFF",
    "band4.tif": "4-band uint16 TIFF (R, G, B, NIR; contiguous)",
    "band4_planar.tif": "4-band uint16 TIFF (planar)",
    "band4_exif6.tif": "4-band uint16 TIFF, orientation 6",
    "palette.png": "8-bit P image with transparency",
    "rgb_trns.png": "RGB PNG with a transparent colour (tRNS; stored byte for byte)",
}


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))


def scene(bits: int = 8) -> np.ndarray:
    """An asymmetric (HEIGHT, WIDTH, 3) picture of `bits`-bit values: gradients, a block, a noisy bottom band."""
    y, x = np.mgrid[0:HEIGHT, 0:WIDTH]
    top = 2**bits - 1
    rgb = np.stack([x * top // (WIDTH - 1), y * top // (HEIGHT - 1), np.full_like(x, top // 3)], axis=-1)
    rgb[2:8, 3:12] = (top, top // 9, top // 9)
    rgb[-4:] = np.random.default_rng(bits).integers(0, top + 1, (4, WIDTH, 3))
    return rgb.astype(np.uint8 if bits == 8 else np.uint16)


def four_bands() -> np.ndarray:
    return np.concatenate([scene(16), scene(12)[:, :, :1]], axis=2)  # R, G, B, near infrared


def exif_jpeg(path, orientation: int) -> None:
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    Image.fromarray(scene()).save(path, quality=95, exif=exif)


def write_cases(folder):
    folder.mkdir(parents=True, exist_ok=True)
    exif_jpeg(folder / "exif3.jpg", 3)
    exif_jpeg(folder / "exif6.jpg", 6)
    Image.fromarray(scene(12)[:, :, 0]).save(folder / "grey12.png")  # uint16 (H, W) -> mode I;16
    tifffile.imwrite(folder / "rgb16.tif", scene(16), photometric="rgb")
    tifffile.imwrite(folder / "band4.tif", four_bands())  # Pillow would open it as 8-bit RGBA: the high bytes
    planar = np.moveaxis(four_bands(), -1, 0)
    tifffile.imwrite(folder / "band4_planar.tif", planar, photometric="minisblack", planarconfig="separate")
    tifffile.imwrite(folder / "band4_exif6.tif", four_bands(), extratags=[(ORIENTATION, "H", 1, 6, False)])
    palette = Image.fromarray(scene()).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    palette.save(folder / "palette.png", transparency=3)
    Image.fromarray(scene()).save(folder / "rgb_trns.png", transparency=tuple(int(v) for v in scene()[0, 0]))
    return folder


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """{case: (path, the image that `datasets` decodes from the built dataset for training)}."""
    folder = tmp_path_factory.mktemp("decoding")
    write_cases(folder / "images")
    (folder / "captions.csv").write_text("image,caption,split\n" + "".join(f"{n},a scene .,train\n" for n in CASES))
    build(folder / "captions.csv", folder / "out", images=folder / "images", num_workers=1)
    grouped = datasets.load_from_disk(str(folder / "out" / "grouped"))["train"]
    training = {row["image_id"]: row["image"] for row in grouped}
    assert sorted(training) == sorted(CASES)  # every case was kept
    return {name: (folder / "images" / name, training[name]) for name in CASES}


@pytest.mark.parametrize("case", CASES)
def test_training_and_captioning_decode_a_file_to_the_same_pixels(built, case):
    path, training = built[case]
    captioning = np.asarray(load_image(path), dtype=int)  # what caption.py and the app decode
    assert captioning.shape == np.asarray(training).shape
    assert captioning.shape == ((WIDTH, HEIGHT, 3) if "exif6" in case else (HEIGHT, WIDTH, 3))
    assert np.abs(captioning - np.asarray(training, dtype=int)).max() <= 1
    # and the processor's inputs: the same pixel_values from the dataset's image and from the file
    image_processor = CNNGemmaImageProcessor(size=32)
    from_training = image_processor(training)["pixel_values"]
    torch.testing.assert_close(image_processor(load_image(path))["pixel_values"], from_training)


@pytest.mark.parametrize("case", ["exif3.jpg", "exif6.jpg", "grey12.png", "palette.png", "rgb_trns.png"])
def test_a_pil_image_the_caller_opened_gets_the_same_pixel_values(built, case):
    path, training = built[case]
    image_processor = CNNGemmaImageProcessor(size=32)
    with Image.open(path) as image:  # in its own mode, EXIF tag included: the processor converts it
        from_pil = image_processor(image)["pixel_values"]
    torch.testing.assert_close(from_pil, image_processor(training)["pixel_values"])


def test_exif_orientation_turns_the_picture_upright(tmp_path):
    exif_jpeg(tmp_path / "exif1.jpg", 1)  # same pixels, same JPEG encoding, only the tag differs
    exif_jpeg(tmp_path / "exif6.jpg", 6)
    exif_jpeg(tmp_path / "exif3.jpg", 3)
    stored = np.asarray(load_image(tmp_path / "exif1.jpg"))
    np.testing.assert_array_equal(np.asarray(load_image(tmp_path / "exif6.jpg")), np.rot90(stored, k=-1))
    np.testing.assert_array_equal(np.asarray(load_image(tmp_path / "exif3.jpg")), np.rot90(stored, k=2))


def test_tiff_orientation_matches_what_pillow_does_for_the_tiffs_it_reads(tmp_path):
    grey = scene(16)[:, :, 0]
    tifffile.imwrite(tmp_path / "grey.tif", grey)
    tifffile.imwrite(tmp_path / "grey6.tif", grey, extratags=[(ORIENTATION, "H", 1, 6, False)])  # Pillow reads it
    tifffile.imwrite(tmp_path / "band4.tif", four_bands())
    tifffile.imwrite(tmp_path / "band4_6.tif", four_bands(), extratags=[(ORIENTATION, "H", 1, 6, False)])  # tifffile
    upright = {name: np.asarray(load_image(tmp_path / name)) for name in ("grey.tif", "grey6.tif", "band4.tif")}
    np.testing.assert_array_equal(upright["grey6.tif"], np.rot90(upright["grey.tif"], k=-1))
    np.testing.assert_array_equal(np.asarray(load_image(tmp_path / "band4_6.tif")), np.rot90(upright["band4.tif"], -1))


def stretched(band: np.ndarray) -> np.ndarray:
    """The 2-98 percentile stretch, written out."""
    low, high = np.percentile(band.astype(np.float32), [2, 98])
    return (np.clip((band - low) / (high - low), 0, 1) * 255 + 0.5).astype(np.uint8)


def test_high_bit_depth_bands_are_stretched_2_to_98_percent_and_bands_1_to_3_are_rgb(built):
    grey = np.asarray(load_image(built["grey12.png"][0]))
    assert np.array_equal(grey[:, :, 0], stretched(scene(12)[:, :, 0])) and (grey == grey[:, :, :1]).all()
    assert 100 < grey.mean() < 160  # not 0..4095 / 65535 * 255, a mean under 10
    four = np.asarray(load_image(built["band4.tif"][0]))
    for channel in range(3):
        assert np.array_equal(four[:, :, channel], stretched(four_bands()[:, :, channel]))
    false_colour = np.asarray(load_image(built["band4.tif"][0], bands=(3, 0, 1)))  # NIR, R, G
    assert np.array_equal(false_colour[:, :, 0], stretched(four_bands()[:, :, 3]))
    assert np.array_equal(false_colour[:, :, 1:], four[:, :, :2])
    with pytest.raises(ValueError) as error:
        load_image(built["band4.tif"][0], bands=(0, 1, 4))
    assert str(error.value) == "bands=(0, 1, 4): expected three band indices in 0..3, shown as R, G and B."


def test_paths_bytes_and_file_objects_decode_alike(built):
    for path, _ in built.values():
        expected = np.asarray(load_image(path))
        assert np.array_equal(np.asarray(load_image(path.read_bytes())), expected)
        with open(path, "rb") as file:
            assert np.array_equal(np.asarray(load_image(file)), expected)
        assert np.array_equal(np.asarray(load_image(str(path))), expected)


def test_without_tifffile_only_the_tiffs_that_need_it_fail(built, monkeypatch, tmp_path):
    tifffile.imwrite(tmp_path / "grey16.tif", scene(16)[:, :, 0])  # Pillow reads 16-bit grey itself
    monkeypatch.setitem(sys.modules, "tifffile", None)  # `import tifffile` now raises ImportError
    message = (
        "This TIFF has more bands or bits per band than Pillow reads; reading it needs tifffile: pip install tifffile"
    )
    for case in ("rgb16.tif", "band4.tif", "band4_planar.tif"):
        with pytest.raises(ImportError) as error:
            load_image(built[case][0])
        assert str(error.value) == message
        assert check_image(built[case][0]).problem == f"unreadable: ImportError: {message}"
    for case in ("exif6.jpg", "grey12.png", "palette.png", "rgb_trns.png"):
        assert np.array_equal(np.asarray(load_image(built[case][0])), np.asarray(built[case][1]))
    assert load_image(tmp_path / "grey16.tif").size == (WIDTH, HEIGHT)


def test_a_pil_image_pillow_misread_is_refused_with_the_way_out(built):
    with Image.open(built["rgb16.tif"][0]) as image:  # Pillow: mode RGB, the high bytes of each band
        with pytest.raises(ValueError) as error:
            CNNGemmaImageProcessor(size=32)(image)
    assert str(error.value) == (
        "This TIFF (3 bands, bits per band (16, 16, 16)) is one that Pillow reads wrongly (only the high bytes, or "
        "only the first band). Open it with processor.image_processor.load_image(path) instead of PIL.Image.open: it "
        "reads such TIFFs with tifffile."
    )


def test_unreadable_files_are_named(tmp_path):
    (tmp_path / "notes.jpg").write_bytes(b"these are notes, not an image")
    with pytest.raises(UnidentifiedImageError) as error:
        load_image(tmp_path / "notes.jpg")
    assert str(error.value) == f"cannot identify image file '{tmp_path / 'notes.jpg'}'"
    with pytest.raises(FileNotFoundError):
        load_image(tmp_path / "missing.png")


def test_the_builder_turns_a_rotated_jpeg_upright_before_it_downscales_it(built):
    path, _ = built["exif6.jpg"]
    check = check_image(path, max_side=20)
    assert check.downscaled_from == (HEIGHT, WIDTH) and check.size == (12, 20)  # width x height, upright
    stored = Image.open(io.BytesIO(check.data))
    assert stored.size == (12, 20) and stored.getexif().get(ORIENTATION) is None  # no tag left to apply twice
    # the captioning decoder's picture, downscaled and re-encoded as the builder does it (JPEG quality 95)
    expected = io.BytesIO()
    load_image(path).resize((12, 20), Image.Resampling.LANCZOS).save(expected, "JPEG", quality=95)
    assert np.array_equal(np.asarray(stored), np.asarray(Image.open(expected)))


@pytest.mark.parametrize(
    "image,size",
    [
        (Image.new("RGB", (0, 0)), "0x0 pixels (width x height)"),
        (Image.new("L", (0, 7)), "0x7 pixels (width x height)"),
        (np.zeros((5, 0, 3), dtype=np.uint8), "shape (5, 0, 3)"),
    ],
)
def test_empty_images_are_refused_by_size(image, size):
    with pytest.raises(ValueError) as error:
        CNNGemmaImageProcessor(size=32)([Image.new("RGB", (4, 4)), image])
    assert str(error.value) == f"images[1] is empty: {size}. Every image needs at least 1x1 pixel."


def test_an_empty_tiff_is_refused(tmp_path):
    with pytest.warns(UserWarning, match="zero-size"):
        tifffile.imwrite(tmp_path / "empty.tif", np.zeros((0, 5), dtype=np.uint16))
    with pytest.raises(ValueError, match=r"Expected image data of shape \(H, W\) or \(H, W, bands\) with pixels"):
        load_image(tmp_path / "empty.tif")
    assert check_image(tmp_path / "empty.tif").problem.startswith("unreadable: ValueError: Expected image data")
