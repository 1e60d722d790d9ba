"""push_to_hub.py under bad input: an empty --dry_run never uploads, empty or malformed flags stop when the flags are
read, NaN scores and secret-looking training arguments never reach a card, the card names the data and the image
tokens truthfully, and a dry run that fills the disk says so in one line and leaves nothing behind."""

import errno
import json
import re
import resource
import shutil
from pathlib import Path

import pytest
from conftest import TINY_CONFIG
from test_hub import FAKE_TOKEN, StandInApi, run_main, write_metrics

import push_to_hub


def make_model(folder: Path, tokenizer, **config) -> Path:
    """An untrained tiny model folder as train_hf.py leaves it (weights, processor, metrics), with config changes."""
    from modeling_cnngemma import CNNGemmaConfig, CNNGemmaForConditionalGeneration, CNNGemmaProcessor

    data = json.loads(TINY_CONFIG.read_text())
    data.update(config)
    data["text_config"]["vocab_size"] = len(tokenizer)
    model_config = CNNGemmaConfig.from_dict(data)
    CNNGemmaForConditionalGeneration(model_config).save_pretrained(folder)
    CNNGemmaProcessor.from_model_config(model_config, tokenizer).save_pretrained(folder)
    write_metrics(folder)
    return folder


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer):
    return make_model(tmp_path_factory.mktemp("push") / "model", tokenizer)


@pytest.fixture
def model_copy(model_dir, tmp_path):
    return Path(shutil.copytree(model_dir, tmp_path / "model"))


def dry_card(folder: Path, out: Path, *flags) -> str:
    code, _, stderr = run_main(["--model_dir", folder, "--repo_id", "me/m", "--dry_run", out, *flags])
    assert code == 0, stderr
    return (out / "README.md").read_text()


def last_error(capsys) -> str:
    return capsys.readouterr().err.splitlines()[-1]


# ---------------------------------------------------------------------------------------------------- flags (G04, G07)
@pytest.mark.parametrize("value", ["", "   "])
def test_an_empty_dry_run_never_uploads(model_dir, value, capsys):
    api = StandInApi()
    with pytest.raises(SystemExit) as exit_info:
        push_to_hub.main(
            ["--model_dir", str(model_dir), "--repo_id", "me/m", "--dry_run", value, "--token", FAKE_TOKEN], api
        )
    assert exit_info.value.code == 2 and api.calls == [] and api.uploads == []
    assert capsys.readouterr().err == (  # the whole of stderr: one line, no usage block
        f"push_to_hub.py: error: argument --dry_run: got {value!r}, expected a path. Pass one (an unset shell "
        "variable gives an empty value)\n"
    )
    # the same command without --dry_run is a real push: the stand-in is the client that would have been used
    code, _, stderr = run_main(["--model_dir", model_dir, "--repo_id", "me/m", "--token", FAKE_TOKEN], api)
    assert code == 0 and [call[0] for call in api.calls] == ["create_repo", "upload_folder"], stderr


@pytest.mark.parametrize("flag", ["--model_dir", "--all", "--dataset_dir", "--base_model_dir", "--dry_run"])
def test_every_path_flag_refuses_an_empty_value(flag, capsys):
    argv = {"--model_dir": [], "--all": [], "--dataset_dir": ["--dataset_repo_id", "me/d"]}.get(flag, ["--all", "r"])
    with pytest.raises(SystemExit) as exit_info:
        push_to_hub.parse_args([*argv, flag, ""])
    assert exit_info.value.code == 2
    assert last_error(capsys) == (
        f"push_to_hub.py: error: argument {flag}: got '', expected a path. Pass one (an unset shell variable gives an "
        "empty value)"
    )


SIZE_HELP = "expected a size such as 5GB, 500MB or a number of bytes (units: KB, MB, GB, TB)"


@pytest.mark.parametrize(
    "flags, expected",
    [
        (["--max_shard_size", "bogus"], f"argument --max_shard_size: got 'bogus', {SIZE_HELP}"),
        (["--max_shard_size", "5GiB"], f"argument --max_shard_size: got '5GiB', {SIZE_HELP}"),
        (["--max_shard_size", "nanGB"], f"argument --max_shard_size: got 'nanGB', {SIZE_HELP}"),
        (["--max_shard_size", "0"], f"argument --max_shard_size: got '0', {SIZE_HELP}, above 0"),
        (["--max_shard_size=-5GB"], f"argument --max_shard_size: got '-5GB', {SIZE_HELP}, above 0"),
        (
            ["--token", ""],
            "argument --token: got an empty value, expected a Hub token. Pass one or leave the flag out (an unset "
            "shell variable gives an empty value)",
        ),
        (
            ["--revision", " "],
            "argument --revision: got an empty value, expected a branch name. Pass one or leave the flag out (an "
            "unset shell variable gives an empty value)",
        ),
        (
            ["--base_model", ""],
            "--base_model '': not of the form 'namespace/name'. Expected a Hub id, e.g. --base_model "
            "google/gemma-3-270m.",
        ),
        (
            ["--datasets", "./data/riscm"],
            "--datasets './data/riscm': not of the form 'namespace/name'. Expected a Hub id, e.g. --datasets "
            "user/riscm-captions.",
        ),
        (
            ["--namespace", "me"],
            "--namespace is only read with --all, which was not given. Add --all or drop --namespace.",
        ),
        (
            ["--base_model_dir", "base"],
            "--base_model_dir is only read with --merge_lora, which was not given. Add --merge_lora or drop "
            "--base_model_dir.",
        ),
        (
            ["--dry_run", "MODEL/upload"],
            "--dry_run MODEL/upload is inside --model_dir MODEL; expected a folder outside it (the dry run would add "
            "files to the folder it reads). Pass another --dry_run.",
        ),
    ],
)
def test_malformed_flags_stop_when_the_flags_are_read(tmp_path, monkeypatch, capsys, flags, expected):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "MODEL").mkdir()
    argv = ["--model_dir", "MODEL", "--repo_id", "me/m", *flags]
    api = StandInApi()
    with pytest.raises(SystemExit) as exit_info:
        push_to_hub.main(argv, api)
    assert exit_info.value.code == 2 and api.calls == [] and sorted(tmp_path.iterdir()) == [tmp_path / "MODEL"]
    assert last_error(capsys) == f"push_to_hub.py: error: {expected}"


def test_all_and_repo_flags_need_an_explicit_target(capsys):
    with pytest.raises(SystemExit):
        push_to_hub.parse_args(["--all", "runs", "--token", FAKE_TOKEN])
    assert last_error(capsys) == (
        "push_to_hub.py: error: --all needs --namespace (the user or organisation to push to), e.g. --namespace "
        "user-or-org."
    )
    with pytest.raises(SystemExit):
        push_to_hub.parse_args(["--all", "runs", "--namespace", "me", "--repo_id", "me/x"])
    assert last_error(capsys) == (
        "push_to_hub.py: error: --repo_id is only read with --model_dir, which was not given. Add --model_dir or drop "
        "--repo_id."
    )


@pytest.mark.parametrize("text, expected", [("500MB", "500MB"), ("2000000", 2000000), (" 5gb", "5gb")])
def test_shard_sizes_that_transformers_accepts_are_kept(text, expected):
    args = push_to_hub.parse_args(["--model_dir", "m", "--dry_run", "d", "--max_shard_size", text])
    assert args.max_shard_size == expected


# ---------------------------------------------------------------------------------------------------- scores (G08)
def test_nan_and_infinite_scores_are_refused_before_anything_is_written_or_sent(model_copy, tmp_path):
    metrics = json.loads((model_copy / "metrics.json").read_text())
    metrics.update(cider=float("nan"), bleu_4=float("inf"))
    (model_copy / "metrics.json").write_text(json.dumps(metrics))  # json writes NaN and Infinity
    expected = (
        f"push_to_hub.py: error: {model_copy / 'metrics.json'}: bleu_4 is inf, cider is nan; expected finite numbers "
        "(a card never publishes NaN or infinite scores). Nothing was written. Fix: re-run the evaluation (python -m "
        f"metrics.evaluation --model {model_copy}) and use the metrics.json it writes.\n"
    )
    code, stdout, stderr = run_main(["--model_dir", model_copy, "--repo_id", "me/m", "--dry_run", tmp_path / "up"])
    assert (code, stdout, stderr) == (1, "", expected) and not (tmp_path / "up").exists()
    api = StandInApi()
    code, _, stderr = run_main(["--model_dir", model_copy, "--repo_id", "me/m", "--token", FAKE_TOKEN], api)
    assert (code, stderr) == (1, expected) and api.calls == []


def test_a_nan_in_the_third_variant_stops_all_before_the_first_upload(tmp_path, tokenizer):
    root = tmp_path / "runs"
    for name in push_to_hub.VARIANTS:
        encoder, tokens = name.split("_")
        vision = "mobilenetv3_small_050" if encoder == "mobilenet" else "test_efficientnet"
        make_model(root / name, tokenizer, vision_model_name=vision, token_mode=tokens)
    bad = root / "efficientnet_single" / "metrics.json"
    bad.write_text(bad.read_text().replace('"meteor": 0.28', '"meteor": NaN'))
    api = StandInApi()
    code, _, stderr = run_main(["--all", root, "--namespace", "me", "--token", FAKE_TOKEN], api)
    assert code == 1 and api.calls == []
    assert stderr.startswith(f"push_to_hub.py: error: {bad}: meteor is nan; expected finite numbers")
    # the same folders, fixed: the index card names each encoder and its image tokens from the configs
    bad.write_text(bad.read_text().replace('"meteor": NaN', '"meteor": 0.28'))
    code, _, stderr = run_main(["--all", root, "--dry_run", tmp_path / "up"])
    assert code == 0, stderr
    index = (tmp_path / "up" / "index" / "README.md").read_text()
    for line in (
        "- [`your-namespace/cnngemma-mobilenet-single`](https://huggingface.co/your-namespace/cnngemma-mobilenet-"
        "single): encoder `mobilenetv3_small_050`, 1 image token (the globally pooled final feature map)",
        "- [`your-namespace/cnngemma-efficientnet-multi`](https://huggingface.co/your-namespace/cnngemma-efficientnet-"
        "multi): encoder `test_efficientnet`, 16 image tokens (every position of the 4x4 final feature map)",
    ):
        assert line in index
    assert "MobileNetV3-L or EfficientNet-B0" not in index


# ---------------------------------------------------------------------------------------------------- flags on the card
def test_the_card_publishes_only_training_flags_and_no_secret(model_copy, tmp_path):
    hub_like, live_key = "hf_" + "A1b2C3d4" * 4, "sk-live-" + "9f8e7d6c" * 3
    flags = {
        "dataset": hub_like,
        "report_to": live_key,
        "output_dir": "/home/alice/runs/m1",
        "language_model": "/home/alice/models/gemma-3-270m",
        "vision_pretrained": "imagenet",
        "tokenizer": "/home/alice/tok",
        "learning_rate": 0.002,
        "vision_lr": None,
        "batch_size": 32,
        "max_steps": "12",  # not the type train_hf.py writes: not shown
        "lora_r": 8,
        "lora_alpha": 16,
        "lora_target_modules": ".*q_proj",
        "mixed_precision": "bf16",
        "augment": True,
        "seed": 7,
        "synth_images": 2000,  # train_hf.py's default, meaningless when a dataset was named
        "num_beams": 3,
        "wandb_api_key": "0123456789abcdef0123456789abcdef01234567",
        "notes": live_key,
    }
    (model_copy / "train_args.json").write_text(json.dumps(flags))
    card = dry_card(model_copy, tmp_path / "up")
    table = re.findall(r"^\| `(\w+)` \| `(.*)` \|$", card, re.MULTILINE)
    assert table == [
        ("augment", "true"),
        ("batch_size", "32"),
        ("language_model", '"gemma-3-270m (local)"'),
        ("learning_rate", "0.002"),
        ("lora_alpha", "16"),
        ("lora_r", "8"),
        ("lora_target_modules", '".*q_proj"'),
        ("mixed_precision", '"bf16"'),
        ("num_beams", "3"),
        ("seed", "7"),
        ("vision_pretrained", '"imagenet"'),
    ]
    for secret in (hub_like, live_key, "alice", "0123456789abcdef"):
        assert all(secret.encode() not in path.read_bytes() for path in (tmp_path / "up").iterdir()), secret
    assert "on a local dataset (its recorded name is not shown). This card records nothing more" in card
    # without LoRA the LoRA settings say nothing: only lora_r 0 is shown
    flags.update(lora_r=0)
    (model_copy / "train_args.json").write_text(json.dumps(flags))
    card = dry_card(model_copy, tmp_path / "up2")
    assert "| `lora_r` | `0` |" in card and "lora_alpha" not in card and "q_proj" not in card


# ---------------------------------------------------------------------------------------------------- data (G13)
@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """dataset_builder outputs whose stats.json count SYNTH, RISCM's three and RSICD-only caption sources."""
    from dataset_builder.build import build

    root = tmp_path_factory.mktemp("built")
    tables = {
        "data": ["SYNTH", "SYNTH", "SYNTH"],
        "mine": ["RSICD", "UCM", "NWPU"],
        "rsicd_only": ["RSICD", "RSICD", "RSICD"],
        "riscm_copy": ["field", "field", "field"],
    }
    for name, sources in tables.items():
        rows = [
            f"{i}.jpg,caption number {i} .,{split},{source}"
            for i, (split, source) in enumerate(zip(("train", "val", "test"), sources, strict=True))
        ]
        table = root / f"{name}.csv"
        table.write_text("image,caption,split,source\n" + "\n".join(rows) + "\n")
        build(table, root / name)
    return root


RISCM = ("RSICD", "UCM-Captions", "NWPU-Captions")
RISCM_SENTENCE = (
    "remote-sensing images with up to five English captions each,\nfrom RSICD, UCM-Captions and NWPU-Captions, de-"
    "duplicated"
)


@pytest.mark.parametrize(
    "dataset, datasets_flag, says, index_name, sources",
    [
        (None, [], "on the synthetic demo set\n(`dataset_builder.synth`", "synthetic demo set", ()),
        (
            "{built}/data",
            [],
            "on local dataset `data`, built by `dataset_builder` from the synthetic demo set\n(`dataset_builder.synth`",
            "local dataset data",
            (),
        ),
        (
            "{built}/mine",
            [],
            "on RISCM caption data\n(local dataset `mine`): " + RISCM_SENTENCE,
            "local dataset mine",
            RISCM,
        ),
        (
            "{built}/rsicd_only",
            [],
            "on RISCM caption data\n(local dataset `rsicd_only`): remote-sensing images with up to five English "
            "captions each,\nfrom RSICD, de-duplicated",
            "local dataset rsicd_only",
            ("RSICD",),
        ),
        (  # its stats.json says "field": the name does not make it RISCM
            "{built}/riscm_copy",
            [],
            "on local dataset `riscm_copy`\n(caption sources in its `stats.json`: field). This card records nothing",
            "local dataset riscm_copy",
            (),
        ),
        (  # not on this machine: the name is all there is
            "/elsewhere/RISCM_2024",
            [],
            "on RISCM caption data\n(local dataset `RISCM_2024`): " + RISCM_SENTENCE,
            "local dataset RISCM_2024",
            RISCM,
        ),
        (
            "/elsewhere/aerial",
            [],
            "on local dataset `aerial`. This card records nothing more",
            "local dataset aerial",
            (),
        ),
        (
            "me/riscm-captions",
            [],
            "on RISCM caption data\n(`me/riscm-captions`): " + RISCM_SENTENCE,
            "me/riscm-captions",
            RISCM,
        ),
        ("me/aerial-caps", [], "on `me/aerial-caps`. This card records nothing more", "me/aerial-caps", ()),
        (
            "/elsewhere/aerial",
            ["org/riscm"],
            "on RISCM caption data\n(`org/riscm`): " + RISCM_SENTENCE,
            "org/riscm",
            RISCM,
        ),
    ],
)
def test_the_card_names_riscm_only_for_riscm(
    model_copy, tmp_path, built, dataset, datasets_flag, says, index_name, sources
):
    recorded = {"synth_images": 48} if dataset is None else {"dataset": dataset.format(built=built)}
    (model_copy / "train_args.json").write_text(json.dumps({**recorded, "max_steps": 2}))
    flags = [item for value in datasets_flag for item in ("--datasets", value)]
    card = dry_card(model_copy, tmp_path / "up", *flags)
    assert says in card
    assert f"name: {index_name} (test)" in card
    # the sources are named in the text, the limitations and the citations only when the data is theirs
    assert [name for name in RISCM if name in card] == list(sources)
    assert ("RISCM caption data" in card) is bool(sources)
    assert ("@article{lu2017rsicd" in card) is bool(sources)


# ---------------------------------------------------------------------------------------------------- tokens, encoder
def test_the_card_describes_grid_tokens_and_names_the_encoder(tmp_path, tokenizer, model_dir):
    grid = make_model(tmp_path / "grid", tokenizer, token_mode="grid", token_grid=3)
    card = dry_card(grid, tmp_path / "up-grid")
    assert (
        "**Variant `mobilenet_grid3`:** encoder `mobilenetv3_small_050` at 128 px, 9 image tokens (the 4x4 final "
        "feature map pooled to a 3x3 grid)," in card
    )
    assert "every position" not in card
    card = dry_card(model_dir, tmp_path / "up-multi")
    assert "16 image tokens (every position of the 4x4 final feature map)" in card
    resnet = make_model(tmp_path / "resnet", tokenizer, vision_model_name="test_resnet", token_mode="single")
    card = dry_card(resnet, tmp_path / "up-resnet")
    assert "**Variant `test_resnet_single`:** encoder `test_resnet` at 128 px, 1 image token" in card
    assert "mobilenet" not in card
    # --all refuses a ResNet in a MobileNet folder instead of publishing it as one
    root = tmp_path / "runs"
    for name in push_to_hub.VARIANTS:
        (root / name).mkdir(parents=True)
        shutil.copyfile(resnet / "config.json", root / name / "config.json")
    code, _, stderr = run_main(["--all", root, "--dry_run", tmp_path / "up-all"])
    assert (code, stderr) == (
        1,
        f"push_to_hub.py: error: --all: {root / 'mobilenet_single'} is named mobilenet_single but its config.json is "
        "test_resnet_single (test_resnet, token_mode=single). Fix the folder names.\n",
    )


# ---------------------------------------------------------------------------------------------------- paths, disk (G06, J04)
def test_a_dry_run_below_a_file_is_named_as_such(model_dir, tmp_path):
    (tmp_path / "FILE").write_text("mine")
    code, stdout, stderr = run_main(["--model_dir", model_dir, "--dry_run", tmp_path / "FILE" / "sub"])
    assert (code, stdout) == (1, "") and stderr == (
        f"push_to_hub.py: error: --dry_run {tmp_path / 'FILE' / 'sub'}: {tmp_path / 'FILE'} is a file, so no folder "
        "can be made inside it. Pass a path whose parents are folders (or new); nothing was written.\n"
    )
    code, _, stderr = run_main(["--model_dir", model_dir, "--dry_run", tmp_path / "FILE"])
    assert code == 1 and stderr == (
        f"push_to_hub.py: error: --dry_run {tmp_path / 'FILE'}: a file, not a folder. Pass a new or empty folder; "
        "nothing was written.\n"
    )
    assert (tmp_path / "FILE").read_text() == "mine"


def fill_disk_after_writing(monkeypatch):
    """save_pretrained writes its files, then the disk is full."""
    from modeling_cnngemma import CNNGemmaForConditionalGeneration

    original = CNNGemmaForConditionalGeneration.save_pretrained

    def save_then_fail(self, folder, **kwargs):
        original(self, folder, **kwargs)
        assert (Path(folder) / "model.safetensors").is_file()  # something was written before the failure
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(CNNGemmaForConditionalGeneration, "save_pretrained", save_then_fail)


def test_a_full_disk_during_a_dry_run_is_one_line_and_leaves_nothing(model_dir, tmp_path, monkeypatch):
    fill_disk_after_writing(monkeypatch)
    out = tmp_path / "new" / "up"
    code, stdout, stderr = run_main(["--model_dir", model_dir, "--dry_run", out])
    assert (code, stdout) == (1, "") and stderr == (
        f"push_to_hub.py: error: writing the dry-run folder {out} failed: No space left on device (errno 28). Nothing "
        "was sent; the folder was removed. Fix: free space on that disk or pass a --dry_run folder on another disk, "
        "and run again.\n"
    )
    assert list(tmp_path.iterdir()) == []  # "new" was made by this run: it goes too
    (tmp_path / "empty").mkdir()
    code, _, stderr = run_main(["--model_dir", model_dir, "--dry_run", tmp_path / "empty"])
    assert code == 1 and "; the folder was emptied again. Fix: free space" in stderr
    assert list((tmp_path / "empty").iterdir()) == []


def test_a_full_disk_before_an_upload_sends_nothing(model_dir, monkeypatch):
    fill_disk_after_writing(monkeypatch)
    api = StandInApi()
    code, _, stderr = run_main(["--model_dir", model_dir, "--repo_id", "me/m", "--token", FAKE_TOKEN], api)
    found = re.fullmatch(
        r"push_to_hub.py: error: writing the temporary upload folder (\S+) failed: No space left on device \(errno "
        r"28\)\. Nothing was sent for this model \(repositories listed above, if any, were pushed\); the folder was "
        r"removed\. Fix: free space on that disk, or set TMPDIR to a folder on a disk with room, and run again\.\n",
        stderr,
    )
    assert code == 1 and found and api.calls == [] and not Path(found.group(1)).exists()


def test_a_file_size_limit_hit_by_safetensors_is_one_line(model_dir, tmp_path):
    """The real failure of `ulimit -f`: safetensors writes from Rust and raises SafetensorError, not OSError."""
    out = tmp_path / "up"
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, hard))  # the tiny model's weights are 3.3 MB
    try:
        code, _, stderr = run_main(["--model_dir", model_dir, "--dry_run", out])
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert code == 1 and stderr == (
        f"push_to_hub.py: error: writing the dry-run folder {out} failed: File too large (errno 27). Nothing was sent; "
        "the folder was removed. Fix: raise the file-size limit (ulimit -f) or pass a smaller --max_shard_size, and "
        "run again.\n"
    )
    assert not out.exists()


# ---------------------------------------------------------------------------------------------------- damaged folders
def corrupt(folder: Path, case: str) -> str:
    """Damages `folder` as in `case`; returns the expected error line's text after 'error: '."""
    if case == "metrics not json":
        (folder / "metrics.json").write_text('{"cider": 1.2,')
        return (
            f"{folder / 'metrics.json'}: cannot be read as JSON (JSONDecodeError: Expecting property name enclosed in "
            "double quotes: line 1 column 15 (char 14)). Expected train_hf.py's metrics.json. Fix: re-run the "
            f"evaluation (python -m metrics.evaluation --model {folder}) and use the metrics.json it writes; nothing "
            "was sent."
        )
    if case == "metrics a list":
        (folder / "metrics.json").write_text("[1, 2]")
        return (
            f"{folder / 'metrics.json'}: expected a JSON object of scores, got list. Fix: re-run the evaluation "
            f"(python -m metrics.evaluation --model {folder}) and use the metrics.json it writes."
        )
    if case == "truncated weights":
        weights = folder / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:1000])
        return (
            f"--model_dir {folder}: cannot load the model (SafetensorError: Error while deserializing header: "
            "invalid header length). Expected the complete save_pretrained files of a "
            "train_hf.py run; nothing was sent. Fix: copy or save the folder again."
        )
    if case == "a tensor missing":
        from safetensors.torch import load_file, save_file

        tensors = load_file(folder / "model.safetensors")
        del tensors["model.multi_modal_projector.linear.bias"]
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
        return (
            f"--model_dir {folder}: the weights lack 1 tensor(s) the model needs (model.multi_modal_projector.linear."
            "bias); they would be uploaded as random values. Nothing was sent. Fix: copy or save the folder again."
        )
    if case == "processor config cut":
        (folder / "processor_config.json").write_text('{"image_processor": {}}')
        return (
            f"--model_dir {folder}: cannot load the processor and tokenizer (KeyError: 'num_image_tokens'). Expected "
            "the processor files train_hf.py saves; nothing was sent. Fix: copy or save the folder again."
        )
    raise AssertionError(case)


@pytest.mark.parametrize(
    "case", ["metrics not json", "metrics a list", "truncated weights", "a tensor missing", "processor config cut"]
)
def test_a_damaged_model_folder_is_named_in_one_line(model_copy, tmp_path, case):
    expected = corrupt(model_copy, case)
    api = StandInApi()
    code, stdout, stderr = run_main(["--model_dir", model_copy, "--dry_run", tmp_path / "up"], api)
    assert (code, stdout, stderr) == (1, "", f"push_to_hub.py: error: {expected}\n")
    assert not (tmp_path / "up").exists() and api.calls == []


def test_a_truncated_dataset_is_named_in_one_line(built, tmp_path):
    folder = Path(shutil.copytree(built / "mine", tmp_path / "mine"))
    arrow = next((folder / "train").glob("*.arrow"))
    arrow.write_bytes(arrow.read_bytes()[:100])
    code, stdout, stderr = run_main(
        ["--dataset_dir", folder, "--dataset_repo_id", "me/d", "--dry_run", tmp_path / "up"]
    )
    assert (code, stdout) == (1, "")
    assert stderr.startswith(f"push_to_hub.py: error: --dataset_dir {folder}: cannot read the dataset (ArrowInvalid: ")
    assert stderr.endswith(
        "). Expected a complete `python -m dataset_builder build` output; nothing was sent. Fix: build it again.\n"
    )
    assert stderr.count("\n") == 1 and not (tmp_path / "up").exists()


def test_the_pushed_dataset_is_named_only_when_it_is_the_one_trained_on(model_copy, tmp_path, built):
    (model_copy / "train_args.json").write_text(json.dumps({"dataset": str(built / "mine")}))
    base = ["--model_dir", model_copy, "--repo_id", "me/m", "--dataset_repo_id", "me/riscm"]
    code, stdout, stderr = run_main([*base, "--dataset_dir", built / "mine", "--dry_run", tmp_path / "same"])
    assert code == 0, stderr
    assert f"dataset {built / 'mine'} -> me/riscm (train: 1 rows, validation: 1 rows, test: 1 rows" in stdout
    card = (tmp_path / "same" / "README.md").read_text()
    assert "datasets:\n- me/riscm\n" in card and "on RISCM caption data\n(`me/riscm`)" in card
    code, _, stderr = run_main([*base, "--dataset_dir", built / "data", "--dry_run", tmp_path / "other"])
    assert code == 0, stderr
    card = (tmp_path / "other" / "README.md").read_text()
    assert "datasets:" not in card and "me/riscm" not in card and "(local dataset `mine`)" in card
