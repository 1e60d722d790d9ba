"""caption.py: folders and files, text and JSONL output, unreadable images reported without stopping the rest."""

import importlib.util
import json

import pytest
from conftest import REPO_ROOT, random_images
from PIL import Image

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
