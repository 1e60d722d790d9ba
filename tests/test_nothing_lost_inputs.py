"""Bad input to train_hf.py, caption.py, metrics.evaluation and app.py: each case of the bad-input probe that ended in a
traceback, a hang or a silent wrong result now gets one line naming the input and the fix, before any work, and
leaves no folder behind. In-process (`main(argv)`): a start-up costs 6-8 s."""

import importlib.util
import json
import os
import shutil

import pytest
from conftest import REPO_ROOT, random_images
from transformers import PreTrainedTokenizerFast

from cnngemma.errors import INTERRUPTED

spec = importlib.util.spec_from_file_location("train_hf", REPO_ROOT / "train_hf.py")
train_hf = importlib.util.module_from_spec(spec)
spec.loader.exec_module(train_hf)
spec = importlib.util.spec_from_file_location("caption_cli", REPO_ROOT / "caption.py")
caption_cli = importlib.util.module_from_spec(spec)
spec.loader.exec_module(caption_cli)
TINY = json.loads((REPO_ROOT / "configuration" / "tiny.json").read_text())
CONFIGS = "Start from one of configuration/*.json."


def config_file(folder, name, change=None, raw=None):
    path = folder / f"{name}.json"
    if raw is not None:
        path.write_text(raw)
        return path
    data = json.loads(json.dumps(TINY))
    change(data)
    path.write_text(json.dumps(data))
    return path


def not_usable(flag, path, detail):
    return f"error: {flag} {path}: not a usable CNNGemma configuration ({detail}). {CONFIGS}"


VIT = "vit_tiny_patch16_224"
VIT_PROBLEM = (
    f"ValueError: vision_model_name='{VIT}' cannot encode 128 px images (Input height (128) doesn't match model "
    "(224).). Use a convolutional timm model such as 'mobilenetv3_large_100' or 'efficientnet_b0'."
)
CASES = {  # probe id: (flags, the line), paths given as {folder}/name.json
    "C16": (
        ["--config", ("c16", None, '{"image_size": 128,')],
        "--config {c16}: not a usable CNNGemma configuration (JSONDecodeError: Expecting property name enclosed in "
        "double quotes: line 1 column 20 (char 19)). " + CONFIGS,
    ),
    "C17": (
        ["--config", ("c17", lambda d: d.update(token_mode="bogus"), None)],
        "--config {c17}: not a usable CNNGemma configuration (ValueError: token_mode='bogus' is not supported; "
        "expected one of ('single', 'multi', 'grid').). " + CONFIGS,
    ),
    "C18": (
        ["--config", ("c18", lambda d: d.update(vision_model_name=VIT), None)],
        "--config {c18}: not a usable CNNGemma configuration (" + VIT_PROBLEM + "). " + CONFIGS,
    ),
    "C19": (
        ["--config", ("c19", lambda d: d.update(vision_model_name="mobilenetv9_imaginary"), None)],
        "--config {c19}: not a usable CNNGemma configuration (ValueError: vision_model_name='mobilenetv9_imaginary' "
        "is not a timm architecture. Did you mean 'mobilenetv3_rw', 'mobilenetv4_conv_large', 'mobilenetv5_base'? "
        "See timm.list_models() for the names timm knows.). " + CONFIGS,
    ),
    "C20": (
        ["--config", ("c20", lambda d: d.update(token_mode="grid", token_grid=-3), None)],
        "--config {c20}: not a usable CNNGemma configuration (ValueError: token_grid=-3 must be a positive int with "
        "token_mode='grid': the side k of the k x k grid of pooled image tokens.). " + CONFIGS,
    ),
    "C21": (
        ["--config", ("c21", lambda d: d["text_config"].update(hidden_size=-8), None)],
        "--config {c21}: not a usable CNNGemma configuration (ValueError: text_config.hidden_size=-8 must be a "
        "positive int (a size of the decoder).). " + CONFIGS,
    ),
    "C22": (
        ["--config", ("c22", lambda d: d.update(image_size=16), None)],
        "--config {c22}: not a usable CNNGemma configuration (ValueError: image_size=16 is too small for "
        "'mobilenetv3_small_050', whose final feature map is 32x smaller than its input; expected image_size >= 32.). "
        + CONFIGS,
    ),
    "C23": (
        ["--config", ("c23", lambda d: d["text_config"].update(vocab_size=3), None)],
        "--config {c23}: not a usable CNNGemma configuration (ValueError: image_token_id=4 is outside the text "
        "model's vocabulary (vocab_size=3); expected 0 <= image_token_id < 3. Add `<image>` to the tokenizer and set "
        "both from it.). " + CONFIGS,
    ),
    "N28": (
        ["--config", ("n28", lambda d: d.update(text_config=[]), None)],
        "--config {n28}: not a usable CNNGemma configuration (TypeError: text_config is a list ([]); expected an "
        'object of decoder settings such as {{"model_type": "gemma", "hidden_size": 2048, ...}}, or none for the '
        "default.). " + CONFIGS,
    ),
    "C12x": (
        ["--text_config", ("c12x", lambda d: d.update(vision_model_name=VIT), None)],
        "--text_config {c12x}: not a usable CNNGemma configuration (" + VIT_PROBLEM + "). " + CONFIGS,
    ),
    "C01": (
        ["--lora_r", "4", "--lora_target_modules", "nonexistent_module"],
        "--lora_target_modules 'nonexistent_module' matches no module of the model (it must match whole names, e.g. "
        "'model.language_model.layers.0.self_attn.q_proj'). Pass a regex such as the default "
        "'.*language_model.*\\\\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)'.",
    ),
    "C02": (
        ["--lora_r", "4", "--lora_target_modules", "("],
        "--lora_target_modules '(' is not a valid regular expression (missing ), unterminated subpattern at position "
        "0). Pass a Python regex of module names, e.g. the default "
        "'.*language_model.*\\\\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)'.",
    ),
    "C03": (
        ["--lora_r", "100000"],
        "--lora_r 100000 is larger than the narrowest adapted layer (32 features): a rank above a layer's width adds "
        "no capacity, only cost. Pass --lora_r 32 or less.",
    ),
    "C40": (
        ["--report_to", "tensorbord"],
        "--report_to 'tensorbord': unknown tracker(s) tensorbord. Expected a comma-separated list of aim, clearml, "
        "comet_ml, dvclive, mlflow, swanlab, tensorboard, trackio, wandb, or all, or none.",
    ),
    "C13": (
        ["--max_new_tokens", "100000"],
        "--max_new_tokens 100000 does not fit: the decoder has 512 positions and the prompt takes 20 (16 image "
        "tokens, <bos> and the prompt). Pass --max_new_tokens 492 or less, or a shorter prompt.",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_train_hf_bad_model_flags_are_one_line_and_leave_no_folder(case, tmp_path, tiny_dataset, capsys):
    flags, expected = CASES[case]
    argv, paths = [], {}
    for item in flags:
        if isinstance(item, tuple):
            name, change, raw = item
            paths[name] = config_file(tmp_path, name, change, raw)
            argv.append(str(paths[name]))
        else:
            argv.append(item)
    out = tmp_path / "out"
    common = ["--dataset", str(tiny_dataset), "--output_dir", str(out), "--batch_size", "4", "--max_steps", "1"]
    report = [] if case == "C40" else ["--report_to", "none"]
    assert train_hf.main([*common, *report, *argv]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == "error: " + expected.format(**paths)
    assert not out.exists()  # a run refused before writing anything leaves no trace


@pytest.mark.parametrize("seed", ["-1", "99999999999"])
def test_seeds_outside_numpys_range_are_refused_when_read(seed, tmp_path, capsys):
    """The probe's C08 and C09: a numpy traceback from set_seed."""
    with pytest.raises(SystemExit) as exit_info:
        train_hf.main(["--output_dir", str(tmp_path / "out"), "--seed", seed])
    assert exit_info.value.code == 2
    assert (
        capsys.readouterr()
        .err.strip()
        .splitlines()[-1]
        .endswith(f"error: argument --seed: got {int(seed)}, expected a whole number in 0..4294967295 (NumPy's range)")
    )


def test_files_that_are_not_weights_or_tokenizers_are_named(tmp_path, tiny_dataset, capsys):
    """The probe's C42 (a pickle IndexError from timm) and C43 (a sentencepiece hint from transformers)."""
    table = tmp_path / "captions.csv"
    table.write_text("image,caption\n")
    (tmp_path / "empty").mkdir()
    common = ["--dataset", str(tiny_dataset), "--output_dir", str(tmp_path / "out"), "--report_to", "none"]
    assert train_hf.main([*common, "--vision_pretrained", str(table)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: --vision_pretrained {table}: not a weights file (neither safetensors nor a torch.save archive; it "
        "starts with b'image,caption\\n'). Pass the CNN's weights, e.g. scripts/convert_efficientnet_lite0.py's "
        "output, or 'imagenet'."
    )
    assert train_hf.main([*common, "--tokenizer", str(tmp_path / "empty"), "--batch_size", "4"]) == 2
    assert (
        capsys.readouterr()
        .err.strip()
        .splitlines()[-1]
        .startswith(f"error: --tokenizer {tmp_path / 'empty'}: not a tokenizer folder (")
    )
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("damage", ["no-state", "truncated-arrow"])
def test_a_damaged_dataset_folder_is_one_line(damage, tmp_path, tiny_dataset, capsys):
    """The probe's I02 (missing train/state.json) and I03 (a truncated arrow file): tracebacks from datasets."""
    from metrics import evaluation

    copy = shutil.copytree(tiny_dataset, tmp_path / "data")
    if damage == "no-state":
        (copy / "train" / "state.json").unlink()
    else:
        arrow = next((copy / "train").glob("*.arrow"))
        arrow.write_bytes(arrow.read_bytes()[:200])
    common = ["--dataset", str(copy), "--output_dir", str(tmp_path / "out"), "--report_to", "none"]
    assert train_hf.main(common) == 1
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith(f"error: --dataset {copy}: cannot read it (")
    assert line.endswith(
        "Expected a complete dataset_builder output; rebuild it with `python -m dataset_builder build ...`."
    )
    assert evaluation.main(["--model", str(tmp_path), "--dataset", str(copy)]) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == line


def test_caption_refuses_image_tokens_in_the_prompt_and_lengths_past_the_decoder(saved_model_dir, tmp_path, capsys):
    """The probe's E05 (a ValueError traceback), E06 and E07 (decoding past the 512 positions)."""
    image = tmp_path / "one.png"
    random_images(1, seed=5)[0].save(image)
    with pytest.raises(SystemExit) as exit_info:
        caption_cli.main(["--model", str(saved_model_dir), "--prompt", "<image> caption en", str(image)])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "caption.py: error: --prompt '<image> caption en' contains <image>; the processor inserts the image tokens "
        "itself. Pass only the text, e.g. --prompt 'caption en'."
    )
    assert caption_cli.main(["--model", str(saved_model_dir), "--max-new-tokens", "1500", str(image)]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "error: --max-new-tokens 1500 does not fit: the decoder has 512 positions and the prompt takes 20 (16 image "
        "tokens, <bos> and the prompt). Pass --max-new-tokens 492 or less, or a shorter prompt."
    )
    long_prompt = "caption " * 600
    assert caption_cli.main(["--model", str(saved_model_dir), "--prompt", long_prompt, str(image)]) == 2
    tokenizer = PreTrainedTokenizerFast.from_pretrained(saved_model_dir)
    used = 16 + 1 + len(tokenizer(long_prompt + "\n", add_special_tokens=False)["input_ids"])
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: --prompt of 4800 characters does not fit: with the 16 image tokens and <bos> it takes {used} of the "
        "decoder's 512 positions, leaving none for the caption. Pass a shorter --prompt."
    )


def test_caption_text_output_cannot_be_forged_by_a_file_name(saved_model_dir, tmp_path, capsys):
    """The probe's E08: a file named 'evil<TAB>forged caption<LF>FAKE_LINE.jpg' made a second record."""
    path = tmp_path / "evil\tforged caption\nFAKE_LINE.png"
    random_images(1, seed=6)[0].save(path)
    assert caption_cli.main(["--model", str(saved_model_dir), "--max-new-tokens", "4", str(path)]) == 0
    [line] = capsys.readouterr().out.splitlines()  # one record, whatever line breaks the caption holds
    name, caption = line.split("\t")
    assert name == str(tmp_path).replace("\\", "\\\\") + "/evil\\tforged caption\\nFAKE_LINE.png"
    assert "\t" not in caption and "\n" not in caption


def test_caption_says_which_symlinked_folders_it_did_not_search(saved_model_dir, tmp_path, capsys):
    """The probe's E02: 48 images behind a symlinked folder were silently not searched."""
    (tmp_path / "elsewhere").mkdir()
    random_images(1, seed=7)[0].save(tmp_path / "elsewhere" / "b.png")
    folder = tmp_path / "scenes"
    folder.mkdir()
    random_images(1, seed=8)[0].save(folder / "a.png")
    os.symlink(tmp_path / "elsewhere", folder / "linked")
    os.symlink(folder, folder / "loop")
    assert caption_cli.main(["--model", str(saved_model_dir), "--max-new-tokens", "4", str(folder)]) == 0
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"1 captioned; 2 symlinked folder(s) not searched ({folder / 'linked'}, {folder / 'loop'}): pass them as "
        "inputs to caption them."
    )


def test_caption_names_a_fifo_for_what_it_is(saved_model_dir, tmp_path, capsys):
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    assert caption_cli.main(["--model", str(saved_model_dir), str(fifo)]) == 1
    assert capsys.readouterr().err.splitlines()[0] == (
        f"error: {fifo}: not a regular file or folder (a FIFO or device?); pass an image file"
    )


def test_evaluation_writes_only_into_its_own_output(saved_model_dir, tiny_dataset, tmp_path, capsys):
    """metrics.evaluation's --output_dir follows the folder rules: a folder of someone else's is refused before the
    minutes of captioning; its own earlier output is replaced, a user's file in it kept."""
    from metrics import evaluation

    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "metrics.json").write_text("{}")
    (theirs / "thesis.tex").write_text("mine")
    argv = ["--model", str(saved_model_dir), "--dataset", str(tiny_dataset), "--max_new_tokens", "4"]
    assert evaluation.main([*argv, "--output_dir", str(theirs)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: --output_dir {theirs} holds files that metrics.evaluation did not write: metrics.json, thesis.tex. "
        "Expected a new or empty folder, or an earlier output of metrics.evaluation; no flag replaces other files. "
        "Pass another --output_dir."
    )
    assert (theirs / "metrics.json").read_text() == "{}"
    earlier = tmp_path / "earlier"  # an output of an earlier version (no record), with the user's notes in it
    earlier.mkdir()
    for name in ("metrics.json", "predictions.jsonl", "samples.html"):
        (earlier / name).write_text("old")
    (earlier / "notes.txt").write_text("keep me")
    assert evaluation.main([*argv, "--output_dir", str(earlier), "--max_eval_images", "1"]) == 0
    assert (earlier / "notes.txt").read_text() == "keep me"
    assert len((earlier / "predictions.jsonl").read_text().splitlines()) == 1
    assert json.loads((earlier / "cnngemma_output.json").read_text())["tool"] == "metrics.evaluation"
    ours = earlier
    assert evaluation.main([*argv, "--max_new_tokens", "100000", "--output_dir", str(ours)]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("error: --max_new_tokens 100000 does not fit:")


def test_app_refuses_a_port_out_of_range(capsys):
    """The probe's F15: an OverflowError traceback from the socket."""
    spec = importlib.util.spec_from_file_location("cnngemma_app", REPO_ROOT / "app.py")
    app = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(app)
    with pytest.raises(SystemExit) as exit_info:
        app.main(["--port", "70000"])
    assert exit_info.value.code == 2
    assert (
        capsys.readouterr()
        .err.strip()
        .splitlines()[-1]
        .endswith("argument --port: got '70000', expected a TCP port number in 1..65535, e.g. 7860")
    )


def test_caption_nodata_masks_undeclared_fill(saved_model_dir, tmp_path, capsys):
    """--nodata reaches load_image as in dataset_builder build: an image that is all fill is listed, not captioned as a
    black square; the same file without --nodata is captioned."""
    import numpy as np
    import tifffile

    path = tmp_path / "collar.tif"
    tifffile.imwrite(path, np.zeros((32, 32, 3), dtype=np.uint16))
    argv = ["--model", str(saved_model_dir), "--max-new-tokens", "4", str(path)]
    assert caption_cli.main([*argv, "--nodata", "0"]) == 1
    assert [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")] == [
        f"error: {path}: cannot read image (NoValidPixelsError: no valid pixels: every value is NaN, infinite or the "
        "no-data value 0, so there is no picture to show)"
    ]
    assert caption_cli.main(argv) == 0


def test_benchmarks_replace_only_their_own_results(tmp_path, capsys):
    """A benchmarks.json or PNG that the benchmarks did not write is refused before any measuring, byte for byte."""
    from PIL import Image

    from benchmarks.__main__ import main

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "benchmarks.json").write_text('{"my": "numbers"}')
    assert main(["encoders", "--quick", "--output-dir", str(mine)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: --output-dir {mine}: benchmarks.json there was not written by the benchmarks; it would be replaced. "
        "Pass another --output-dir (or --tag for other file names)."
    )
    assert (mine / "benchmarks.json").read_text() == '{"my": "numbers"}'
    (mine / "benchmarks.json").unlink()
    Image.new("RGB", (4, 4)).save(mine / "encoders.png")
    before = (mine / "encoders.png").read_bytes()
    assert main(["encoders", "--quick", "--output-dir", str(mine)]) == 2
    assert "encoders.png there was not written by the benchmarks" in capsys.readouterr().err
    assert (mine / "encoders.png").read_bytes() == before


@pytest.mark.parametrize(
    "argv",
    [
        ["build", "--captions", "t.csv", "--images", "imgs", "--output", " "],
        ["build", "--captions", "", "--images", "imgs", "--output", "out"],
        ["synth", "--output", ""],
        ["score", "--dataset", "", "--clip-model", "clip"],
    ],
)
def test_dataset_builder_refuses_empty_paths(argv, tmp_path, monkeypatch, capsys):
    """An unset shell variable made `--output "$OUT"` the current folder, or a folder named ' '."""
    from dataset_builder.__main__ import main

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    flag = next(a for a, value in zip(argv, argv[1:], strict=False) if value.strip() == "")
    assert capsys.readouterr().err == (
        f"error: argument {flag}: got {next(v for v in argv if not v.strip())!r}, expected a path. Pass one (an unset "
        f"shell variable gives an empty value) (see: python -m dataset_builder {argv[0]} --help)\n"
    )
    assert list(tmp_path.iterdir()) == []


def test_ctrl_c_during_a_build_is_one_line_and_keeps_the_earlier_output(tmp_path, monkeypatch, capsys):
    """The probe re-run's N68: a KeyboardInterrupt traceback from `dataset_builder build`."""
    from dataset_builder import build as build_module
    from dataset_builder.__main__ import main

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(build_module, "build", interrupted)
    table = tmp_path / "captions.csv"
    table.write_text("image,caption,split\na.jpg,A field .,train\n")
    assert main(["build", "--captions", str(table), "--captions-only", "--output", str(tmp_path / "out")]) == 130
    assert capsys.readouterr().err.strip() == INTERRUPTED
