"""caption.py: folders and files, text and JSONL output, unreadable images reported without stopping the rest,
model folders checked before loading, and every failure one line without a traceback."""

import importlib.util
import json
import re
import shutil

import numpy as np
import pytest
from conftest import REPO_ROOT, random_images
from PIL import Image

from modeling_cnngemma import load_image

spec = importlib.util.spec_from_file_location("caption_cli", REPO_ROOT / "caption.py")
caption_cli = importlib.util.module_from_spec(spec)
spec.loader.exec_module(caption_cli)


def test_folder_with_a_broken_image(tmp_path, saved_model_dir, tiny_model, processor, capsys):
    folder = tmp_path / "scenes"
    (folder / "sub").mkdir(parents=True)
    paths = [folder / "a.png", folder / "b.jpg", folder / "sub" / "c.png"]
    for image, path in zip(random_images(3, seed=21), paths):
        image.save(path)
    (folder / "broken.jpg").write_bytes(b"not a jpeg at all")
    argv = ["--model", str(saved_model_dir), "--format", "jsonl", "--batch-size", "2", "--max-new-tokens", "6"]
    exit_code = caption_cli.main([*argv, str(folder), str(tmp_path / "missing.png")])
    out, err = capsys.readouterr()
    assert exit_code == 1
    rows = [json.loads(line) for line in out.splitlines()]
    assert [row["image"] for row in rows] == [str(p) for p in paths]
    assert f"error: {folder / 'broken.jpg'}: cannot read image (UnidentifiedImageError" in err
    assert f"error: {tmp_path / 'missing.png'}: no such file or folder" in err
    assert "2 input(s) failed; 3 captioned." in err
    assert "captioning" in err  # a folder gets a progress bar

    # the captions are the model's greedy output for those images
    inputs = processor(images=[Image.open(p).convert("RGB") for p in paths[:2]])
    generated = tiny_model.generate(**inputs, max_new_tokens=6, do_sample=False)
    expected = processor.post_process_image_text_to_text(generated, input_ids=inputs["input_ids"])
    assert [row["caption"] for row in rows[:2]] == expected


def test_text_output_and_clean_exit(tmp_path, saved_model_dir, capsys):
    path = tmp_path / "one.png"
    random_images(1, seed=22)[0].save(path)
    exit_code = caption_cli.main(
        ["--model", str(saved_model_dir), "--max-new-tokens", "4", "--num-beams", "2", str(path)]
    )
    out, err = capsys.readouterr()
    assert exit_code == 0, err
    name, caption = out.rstrip("\n").split("\t")
    assert name == str(path) and "captioning" not in err  # single files: no progress bar


def test_bad_flags_and_missing_model(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        caption_cli.main(["--model", str(tmp_path), "--batch-size", "0", "x.png"])
    assert exit_info.value.code == 2 and "--batch-size must be >= 1, got 0." in capsys.readouterr().err
    assert caption_cli.main(["--model", str(tmp_path / "nope"), "x.png"]) == 1
    assert f"error: --model='{tmp_path / 'nope'}': no such file or folder. Check the path." in capsys.readouterr().err
    assert caption_cli.main(["--model", "someone/cnngemma", "x.png"]) == 1
    assert (
        "error: --model='someone/cnngemma' looks like a Hub id, but HF_HUB_OFFLINE=1 forbids"
        in capsys.readouterr().err
    )


def copy_without(saved_model_dir, tmp_path, name):
    folder = tmp_path / f"without-{name}"
    shutil.copytree(saved_model_dir, folder)
    (folder / name).unlink()
    return folder


@pytest.mark.parametrize(
    "remove, expected",
    [
        ("tokenizer.json", "missing tokenizer.json."),
        ("processor_config.json", "missing processor_config.json."),
        ("modeling_cnngemma.py", "missing modeling_cnngemma.py."),
        ("image_processing_cnngemma.py", "missing image_processing_cnngemma.py."),
        ("model.safetensors", "missing the weights (model.safetensors)."),
    ],
)
def test_a_model_folder_missing_a_file_names_it(saved_model_dir, tmp_path, capsys, remove, expected):
    folder = copy_without(saved_model_dir, tmp_path, remove)
    assert caption_cli.main(["--model", str(folder), "x.png"]) == 1
    err = capsys.readouterr().err
    assert err == (
        f"error: --model {folder}: {expected} Expected a folder written by train_hf.py or save_pretrained; re-save "
        "it, or copy the missing files from the training output.\n"
    )


def test_a_config_file_or_a_parent_folder_as_model_says_which_folder_to_pass(saved_model_dir, tmp_path, capsys):
    assert caption_cli.main(["--model", str(saved_model_dir / "config.json"), "x.png"]) == 1
    assert capsys.readouterr().err == (
        f"error: --model {saved_model_dir / 'config.json'} is a file; pass the folder that holds config.json "
        f"(e.g. --model {saved_model_dir}).\n"
    )
    parent = tmp_path / "runs"  # a folder whose only model is one level down
    shutil.copytree(saved_model_dir, parent / "model")
    assert caption_cli.main(["--model", str(parent), "x.png"]) == 1
    assert capsys.readouterr().err == (
        f"error: --model {parent}: no config.json. Expected a folder written by train_hf.py or "
        f"save_pretrained. It has one in {parent / 'model'}: pass that folder.\n"
    )


def test_load_failures_are_one_line_without_a_traceback(saved_model_dir, tmp_path, capsys):
    image = tmp_path / "one.png"
    random_images(1, seed=23)[0].save(image)
    folder = tmp_path / "corrupt"
    shutil.copytree(saved_model_dir, folder)
    (folder / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{broken}")
    assert caption_cli.main(["--model", str(folder), str(image)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: --model {folder}: cannot load it (") and err.count("\n") == 1
    assert err.endswith("Expected a folder written by train_hf.py or save_pretrained; re-save it.\n")
    assert "Traceback" not in err
    assert caption_cli.main(["--model", str(saved_model_dir), "--device", "nonsense", str(image)]) == 1
    err = capsys.readouterr().err.splitlines()[-1]
    assert err.startswith("error: --device nonsense: cannot use it (RuntimeError: ")
    assert err.endswith("Pass cpu, or cuda:N for a GPU that torch sees.")


def test_folders_without_images_fail_and_non_images_are_skipped_and_counted(saved_model_dir, tmp_path, capsys):
    empty, texts = tmp_path / "empty", tmp_path / "texts"
    empty.mkdir()
    texts.mkdir()
    (texts / "readme.txt").write_text("no image")
    (texts / "notes.md").write_text("no image")
    suffixes = ".bmp, .gif, .jpeg, .jpg, .png, .tif, .tiff, .webp"
    assert caption_cli.main(["--model", str(saved_model_dir), str(empty)]) == 1
    assert capsys.readouterr() == (
        "",
        f"error: {empty}: no images in this folder (it is empty). Expected files ending in {suffixes}; pass a "
        "folder that holds images.\n1 input(s) failed; 0 captioned.\n",
    )
    assert caption_cli.main(["--model", str(saved_model_dir), str(texts)]) == 1
    assert capsys.readouterr() == (
        "",
        f"error: {texts}: no images in this folder (only 2 other file(s)). Expected files ending in {suffixes}; "
        "pass a folder that holds images.\n1 input(s) failed; 0 captioned; 2 non-image file(s) skipped (.md, .txt).\n",
    )
    # images next to other files: the others are skipped, counted, and not an error
    random_images(1, seed=24)[0].save(texts / "scene.png")
    assert caption_cli.main(["--model", str(saved_model_dir), "--max-new-tokens", "3", str(texts)]) == 0
    out, err = capsys.readouterr()
    assert [line.split("\t")[0] for line in out.splitlines()] == [str(texts / "scene.png")]
    assert err.endswith("\n1 captioned; 2 non-image file(s) skipped (.md, .txt).\n")


def test_error_lines_are_not_printed_into_the_progress_bar(saved_model_dir, tmp_path, capsys):
    folder = tmp_path / "scenes"
    folder.mkdir()
    random_images(1, seed=25)[0].save(folder / "a.png")
    (folder / "b.jpg").write_bytes(b"\xff\xd8\xff\xe0 a truncated jpeg")
    assert caption_cli.main(["--model", str(saved_model_dir), "--max-new-tokens", "3", str(folder)]) == 1
    err = capsys.readouterr().err
    assert "captioning" in err
    # the bar redraws itself after "\r"; an error line must start a line of its own, not continue the bar's
    segments = re.split(r"[\r\n]", err)
    assert [s for s in segments if "cannot read image" in s] == [
        f"error: {folder / 'b.jpg'}: cannot read image (OSError: Truncated File Read)"
    ]


def test_images_are_decoded_as_in_training(saved_model_dir, tiny_model, processor, tmp_path, capsys):
    """A 4-band 16-bit TIFF and an EXIF-rotated JPEG give the captions of `load_image`'s pixels."""
    import tifffile

    rng = np.random.default_rng(26)
    tiff = tmp_path / "bands.tif"
    tifffile.imwrite(tiff, (rng.random((72, 80, 4)) ** 3 * 4000).astype(np.uint16))
    rotated = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    Image.fromarray(rng.integers(0, 256, (64, 112, 3), dtype=np.uint8)).save(rotated, exif=exif, quality=95)
    argv = ["--model", str(saved_model_dir), "--format", "jsonl", "--max-new-tokens", "8", str(tiff), str(rotated)]
    assert caption_cli.main(argv) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    inputs = processor(images=[load_image(tiff), load_image(rotated)])
    generated = tiny_model.generate(**inputs, max_new_tokens=8, do_sample=False)
    expected = processor.post_process_image_text_to_text(generated, input_ids=inputs["input_ids"])
    assert [row["caption"] for row in rows] == expected


def test_compile_gives_the_eager_captions_with_one_graph_for_every_batch(tmp_path, saved_model_dir, capsys):
    """--compile is transformers' static cache + compiled decode steps; the last batch (1 of 2 images) is padded, so
    the 3 batches share one graph, in fp32 and with --quantize int8 (whose int8 products are an operator dynamo can
    call). The backend here is dynamo's `eager` (the whole graph is still traced: a break fails); test_generation.py
    runs inductor, and scripts/measure_decoding.py inductor with int8 on the real model."""
    import torch
    from torch._dynamo.utils import counters

    from cnngemma import inference

    folder = tmp_path / "scenes"
    folder.mkdir()
    for index, image in enumerate(random_images(5, seed=31)):
        image.save(folder / f"{index}.png")
    argv = ["--model", str(saved_model_dir), "--format", "jsonl", "--batch-size", "2", "--max-new-tokens", "6"]
    real = inference.compiled_generation
    for extra in ([], ["--quantize", "int8"]):
        assert caption_cli.main([*argv, *extra, str(folder)]) == 0
        eager = capsys.readouterr().out
        inference.compiled_generation = lambda device: real("eager", device)
        torch._dynamo.reset()
        counters.clear()
        try:
            assert caption_cli.main([*argv, *extra, "--compile", str(folder)]) == 0
        finally:
            inference.compiled_generation = real
        assert capsys.readouterr().out == eager and len(eager.splitlines()) == 5
        assert counters["stats"]["unique_graphs"] == 1


def test_compile_refuses_old_modeling_code_and_beam_search(tmp_path, saved_model_dir, capsys):
    folder = tmp_path / "old-model"
    shutil.copytree(saved_model_dir, folder)
    code = (folder / "modeling_cnngemma.py").read_text()
    (folder / "modeling_cnngemma.py").write_text(
        code.replace("_can_compile_fullgraph = True", "_can_compile_fullgraph = False")
    )
    image = tmp_path / "one.png"
    random_images(1, seed=23)[0].save(image)
    assert caption_cli.main(["--model", str(folder), "--compile", str(image)]) == 1
    assert capsys.readouterr().err.splitlines()[-1] == (  # after transformers' weight-loading bar
        f"error: --compile: the modeling code in {folder} predates compiled decoding. Re-save the model with the "
        "current code (save_pretrained), or drop --compile."
    )
    with pytest.raises(SystemExit) as exit_info:
        caption_cli.main(["--model", str(saved_model_dir), "--compile", "--num-beams", "3", str(image)])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.endswith(
        "error: --compile goes with greedy decoding only, got --num-beams 3. Drop one of them.\n"
    )
