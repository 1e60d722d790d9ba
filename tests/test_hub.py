"""push_to_hub.py: the dry-run folder loads alone as remote code, the card carries the metrics, and the push path
(one commit, exact files, errors, no token anywhere) runs against a local stand-in for HfApi."""

import contextlib
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO_ROOT, TINY_CONFIG, make_tiny_model, random_images, synthetic_captions

import push_to_hub

FAKE_TOKEN = "hf_FAKEtoken0123456789abcdefghijklmnop"
UPSTREAM = "upstream/cnngemma--"
METRICS = dict(bleu_1=0.61, bleu_2=0.45, bleu_3=0.33, bleu_4=0.25, meteor=0.28, rouge_l=0.52, cider=1.234)
UPLOADED_FILES = {
    "README.md",
    "chat_template.jinja",
    "config.json",
    "configuration_cnngemma.py",
    "generation_config.json",
    "image_processing_cnngemma.py",
    "metrics.json",
    "model.safetensors",
    "modeling_cnngemma.py",
    "processing_cnngemma.py",
    "processor_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
}


def write_metrics(folder: Path, step: int = 3):
    final = {"split": "test", "step": step, "num_images": 4, **METRICS}
    history = [{**final, "split": "validation", "step": step - 1, "cider": 0.9}]
    (folder / "metrics.json").write_text(json.dumps({**final, "history": history}))


def add_upstream_references(folder: Path):
    """What a fine-tune of a Hub model can carry: auto_map entries that point back at the upstream repo."""
    for name in ("config.json", "processor_config.json", "tokenizer_config.json"):
        data = json.loads((folder / name).read_text())
        for holder in (data, data.get("image_processor", {})):
            if "auto_map" in holder:
                holder["auto_map"] = {key: UPSTREAM + value for key, value in holder["auto_map"].items()}
        (folder / name).write_text(json.dumps(data, indent=2))


def snapshot(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in folder.rglob("*")
        if p.is_file()
    }


def run_main(argv, api=None):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = push_to_hub.main([str(a) for a in argv], api=api)
    return code, out.getvalue(), err.getvalue()


class CommitInfo:
    def __init__(self, repo_id, number):
        self.oid = f"{number:040x}"
        self.commit_url = f"https://huggingface.co/{repo_id}/commit/{self.oid}"


class StandInApi:
    """Records what push_to_hub.py asks of HfApi; `upload_folder` lists the folder while it still exists."""

    def __init__(self, fail_with: Exception | None = None):
        self.calls, self.uploads, self.fail_with = [], [], fail_with

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs))
        if self.fail_with is not None:
            raise self.fail_with
        return f"https://huggingface.co/{'datasets/' if kwargs.get('repo_type') == 'dataset' else ''}{repo_id}"

    def create_branch(self, repo_id, **kwargs):
        self.calls.append(("create_branch", repo_id, kwargs))

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        self.calls.append(("upload_folder", repo_id, kwargs))
        files = {str(p.relative_to(folder_path)): p.read_bytes() for p in Path(folder_path).rglob("*") if p.is_file()}
        self.uploads.append((repo_id, files))
        return CommitInfo(repo_id, len(self.uploads))

    def upload_file(self, *, repo_id, path_in_repo, **kwargs):
        self.calls.append(("upload_file", repo_id, {"path_in_repo": path_in_repo, **kwargs}))

    def whoami(self):
        return {"name": "me"}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_config, processor):
    """A train_hf.py-like output: the tiny model after a few AdamW steps, its processor, metrics and flags."""
    model = make_tiny_model(tiny_config)
    initial = model.multi_modal_projector.linear.weight.detach().clone()
    batch = processor(images=random_images(2), suffix=synthetic_captions(2, seed=1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    for _ in range(2):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    assert not torch.equal(initial, model.multi_modal_projector.linear.weight)
    folder = tmp_path_factory.mktemp("trained")
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    write_metrics(folder)
    flags = {"config": "configuration/tiny.json", "learning_rate": 1e-3, "max_steps": 2, "hub_token": FAKE_TOKEN}
    # train_hf.py records its paths as given, often absolute: none of them may reach the public card
    flags.update(output_dir=str(folder), dataset="/home/alice/data/riscm_built", text_config="~/configs/text.json")
    (folder / "train_args.json").write_text(json.dumps(flags))
    add_upstream_references(folder)
    return model, folder


@pytest.fixture(scope="module")
def dry_run(trained, tmp_path_factory):
    out = tmp_path_factory.mktemp("dry") / "upload"
    code, stdout, stderr = run_main(
        ["--model_dir", trained[1], "--repo_id", "me/cnngemma-tiny", "--dry_run", out, "--max_shard_size", "2MB"]
    )
    assert code == 0, stderr
    return out, stdout + stderr


CHILD = textwrap.dedent(
    """
    import importlib.abc, json, sys

    class BlockRepo(importlib.abc.MetaPathFinder):
        # The repo is pip-installed in editable mode: only the folder's own files may be used.
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("modeling_cnngemma", "dataset_builder", "push_to_hub"):
                raise ImportError(f"{name} must not be imported when loading from the folder")

    sys.meta_path.insert(0, BlockRepo())
    import torch
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor, pipeline

    folder, images, out = sys.argv[1], sys.argv[2:-1], sys.argv[-1]
    model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    inputs = processor(images=[Image.open(path) for path in images])
    with torch.no_grad():
        tokens = model.generate(**inputs, max_new_tokens=10, do_sample=False)
    # the transformers pipeline, from the folder alone, as plain prompt and as a chat
    pipe = pipeline("image-text-to-text", model=folder, trust_remote_code=True)
    image = Image.open(images[0])
    greedy = {"do_sample": False}  # generation options reach generate only through generate_kwargs
    plain = pipe(images=image, text="caption en", max_new_tokens=10, generate_kwargs=greedy, return_full_text=False)
    chat = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "caption en"}]}]
    answer = pipe(text=chat, max_new_tokens=10, generate_kwargs=greedy)[0]["generated_text"][-1]
    json.dump({
        "tokens": tokens.tolist(),
        "pipeline_plain": plain[0]["generated_text"],
        "pipeline_chat": answer,
        "model_module": type(model).__module__,
        "processor_module": type(processor).__module__,
        "repo_modules": sorted(m for m in sys.modules if m.split(".")[0] in ("modeling_cnngemma", "dataset_builder")),
    }, open(out, "w"))
    """
)


def test_dry_run_folder_loads_alone_in_a_fresh_process_with_identical_tokens_and_pipeline(
    trained, processor, dry_run, tmp_path
):
    model, _ = trained
    folder, _ = dry_run
    assert (folder / "model.safetensors.index.json").is_file()  # --max_shard_size 2MB splits the 3.4 MB weights
    images = random_images(2, seed=11)
    paths = [tmp_path / f"image{i}.png" for i in range(2)]
    for image, path in zip(images, paths, strict=True):
        image.save(path)
    script, result = tmp_path / "child.py", tmp_path / "result.json"
    script.write_text(CHILD)
    outside = tmp_path / "cwd"
    outside.mkdir()
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "HF_TOKEN")}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "fresh-hf-home"))
    subprocess.run(
        [sys.executable, str(script), str(folder), *map(str, paths), str(result)],
        cwd=outside,
        env=env,
        check=True,
        capture_output=True,
        timeout=120,
    )
    child = json.loads(result.read_text())
    assert REPO_ROOT not in outside.parents
    assert child["repo_modules"] == []
    assert child["model_module"].startswith("transformers_modules.")
    assert child["processor_module"].startswith("transformers_modules.")
    inputs = processor(images=images)
    with torch.no_grad():
        expected = model.generate(**inputs, max_new_tokens=10, do_sample=False)
    assert child["tokens"] == expected.tolist()
    caption = processor.post_process_image_text_to_text(expected[:1], input_ids=inputs["input_ids"][:1])[0]
    assert caption
    assert child["pipeline_plain"].strip() == caption
    assert child["pipeline_chat"] == {"role": "assistant", "content": caption}


def test_auto_map_is_local_and_the_card_carries_the_metrics(trained, dry_run):
    folder, output = dry_run
    files = {p.name for p in folder.iterdir()}
    shards = {"model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "model.safetensors.index.json"}
    assert files == (UPLOADED_FILES - {"model.safetensors"}) | shards
    for name in files:  # the listing printed by --dry_run names every file with its size
        assert f"{(folder / name).stat().st_size:,}  {name}" in output
    # the trained folder's upstream references ("owner/repo--module.Class") are gone from every config file
    assert UPSTREAM in (trained[1] / "processor_config.json").read_text()
    maps = {}
    for path in folder.glob("*.json"):
        text = path.read_text()
        assert "--" not in text.replace("--->", ""), path.name
        data = json.loads(text)
        for holder in (data, data.get("image_processor", {}) if isinstance(data, dict) else {}):
            for key, reference in (holder.get("auto_map") or {}).items():
                assert (folder / (reference.rsplit(".", 1)[0] + ".py")).is_file(), reference
                maps[(path.name, key)] = reference
    assert maps[("config.json", "AutoModelForImageTextToText")] == "modeling_cnngemma.CNNGemmaForConditionalGeneration"
    assert maps[("config.json", "AutoConfig")] == "configuration_cnngemma.CNNGemmaConfig"
    assert maps[("config.json", "AutoModel")] == "modeling_cnngemma.CNNGemmaModel"
    assert maps[("processor_config.json", "AutoProcessor")] == "processing_cnngemma.CNNGemmaProcessor"
    assert "is_local" not in (folder / "tokenizer_config.json").read_text()

    card = (folder / "README.md").read_text()
    _, front, body = card.split("---\n", 2)
    meta = yaml.safe_load(front)
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "image-text-to-text"
    assert {"remote-sensing", "image-captioning"} <= set(meta["tags"])
    assert meta["license"] == "apache-2.0"  # the tiny decoder holds no Gemma weights
    scores = {m["name"]: m["value"] for m in meta["model-index"][0]["results"][0]["metrics"]}
    assert scores == {
        "BLEU-1": 0.61,
        "BLEU-2": 0.45,
        "BLEU-3": 0.33,
        "BLEU-4": 0.25,
        "METEOR": 0.28,
        "ROUGE-L": 0.52,
        "CIDEr": 1.234,
    }
    assert meta["model-index"][0]["results"][0]["dataset"]["split"] == "test"
    for text in (
        "| mobilenet_multi | 4 | 0.6100 |",
        "trust_remote_code=True",
        "revision=revision",
        "`max_steps`",
        "transformers>=5.24,<6",
        "RSICD",
        "UCM-Captions",
        "NWPU-Captions",
        "@misc{cnngemma",
    ):
        assert text in body, text
    assert json.loads((folder / "metrics.json").read_text())["cider"] == 1.234
    # train_args.json held a token-like flag: it is neither shown nor written
    assert all(FAKE_TOKEN.encode() not in p.read_bytes() for p in folder.iterdir())
    assert "hub_token" not in card and FAKE_TOKEN not in output


def test_push_makes_one_commit_with_the_exact_files_and_never_shows_the_token(trained, tmp_path):
    folder = trained[1]
    before = snapshot(folder)
    api = StandInApi()
    code, stdout, stderr = run_main(
        ["--model_dir", folder, "--repo_id", "me/cnngemma-tiny", "--revision", "v1", "--token", FAKE_TOKEN], api
    )
    assert code == 0, stderr
    assert [call[:2] for call in api.calls] == [
        ("create_repo", "me/cnngemma-tiny"),
        ("create_branch", "me/cnngemma-tiny"),
        ("upload_folder", "me/cnngemma-tiny"),
    ]
    assert api.calls[0][2] == {"private": False, "exist_ok": True}
    assert api.calls[2][2]["revision"] == "v1"
    ((repo_id, files),) = api.uploads
    assert set(files) == UPLOADED_FILES
    assert all(FAKE_TOKEN.encode() not in content for content in files.values())
    oid = f"{1:040x}"
    assert f"https://huggingface.co/me/cnngemma-tiny/commit/{oid}" in stdout
    assert f"from_pretrained('me/cnngemma-tiny', revision='{oid}', trust_remote_code=True)" in stdout
    assert FAKE_TOKEN not in stdout + stderr
    assert snapshot(folder) == before


def test_offline_no_token_and_hub_errors_are_one_line_and_change_nothing(trained, tmp_path, monkeypatch):
    folder = trained[1]
    before = snapshot(folder)
    base = ["--model_dir", folder, "--repo_id", "me/cnngemma-tiny"]
    # the real HfApi path, offline (HF_HUB_OFFLINE=1 is set for every test)
    code, stdout, stderr = run_main([*base, "--token", FAKE_TOKEN])
    assert code == 1 and stdout == "" and stderr.count("\n") == 1
    assert stderr.startswith("push_to_hub.py: error: the Hub cannot be reached: offline mode is on (HF_HUB_OFFLINE=1)")
    # no token anywhere (env or login file in the temporary HF_HOME)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    code, _, stderr = run_main(base, StandInApi())
    assert code == 1 and stderr == (
        "push_to_hub.py: error: no Hub token: pass --token, set HF_TOKEN, or run `hf auth login`. Nothing was changed.\n"
    )
    # a network failure whose message even quotes the token
    api = StandInApi(fail_with=ConnectionError(f"Max retries exceeded (Authorization: Bearer {FAKE_TOKEN})\nmore"))
    code, stdout, stderr = run_main([*base, "--token", FAKE_TOKEN], api)
    assert code == 1 and stderr.count("\n") == 1 and FAKE_TOKEN not in stdout + stderr
    assert stderr.startswith(
        "push_to_hub.py: error: create_repo me/cnngemma-tiny failed: ConnectionError: Max retries"
    )
    assert "Nothing local was changed" in stderr and api.uploads == []
    # a missing folder is not taken for a Hub id
    code, _, stderr = run_main(["--model_dir", tmp_path / "nope", "--dry_run", tmp_path / "dry"])
    assert code == 1 and "no such folder" in stderr and not (tmp_path / "dry").exists()
    assert snapshot(folder) == before


def make_variant(folder: Path, vision_model_name: str, token_mode: str, tokenizer):
    from modeling_cnngemma import CNNGemmaConfig, CNNGemmaForConditionalGeneration, CNNGemmaProcessor

    data = json.loads(TINY_CONFIG.read_text())
    data.update(vision_model_name=vision_model_name, token_mode=token_mode)
    data["text_config"]["vocab_size"] = len(tokenizer)
    config = CNNGemmaConfig.from_dict(data)
    CNNGemmaForConditionalGeneration(config).save_pretrained(folder)
    CNNGemmaProcessor.from_model_config(config, tokenizer).save_pretrained(folder)
    write_metrics(folder)


def test_all_pushes_four_variants_and_an_index(tmp_path, tokenizer):
    root = tmp_path / "runs"
    for name in push_to_hub.VARIANTS:
        encoder, tokens = name.split("_")
        make_variant(
            root / name, "mobilenetv3_small_050" if encoder == "mobilenet" else "test_efficientnet", tokens, tokenizer
        )
    api = StandInApi()
    code, stdout, stderr = run_main(["--all", root, "--namespace", "me", "--token", FAKE_TOKEN], api)
    assert code == 0, stderr
    expected = [
        "me/cnngemma-mobilenet-single",
        "me/cnngemma-mobilenet-multi",
        "me/cnngemma-efficientnet-single",
        "me/cnngemma-efficientnet-multi",
    ]
    assert [repo for repo, _ in api.uploads] == [*expected, "me/cnngemma"]
    for repo, files in api.uploads[:4]:
        assert set(files) == UPLOADED_FILES
        encoder, tokens = repo.split("-")[1:]
        assert f"**Variant `{encoder}_{tokens}`:**" in files["README.md"].decode()
    index = api.uploads[4][1]
    assert set(index) == {"README.md"}
    assert all(f"[`{repo}`](https://huggingface.co/{repo})" in index["README.md"].decode() for repo in expected)
    assert FAKE_TOKEN not in stdout + stderr
    # a folder whose config is another variant is refused before anything is sent
    shutil.move(root / "mobilenet_single", root / "tmp")
    shutil.move(root / "mobilenet_multi", root / "mobilenet_single")
    shutil.move(root / "tmp", root / "mobilenet_multi")
    api = StandInApi()
    code, _, stderr = run_main(["--all", root, "--namespace", "me", "--token", FAKE_TOKEN], api)
    assert code == 1 and "is named mobilenet_single but its config.json is mobilenet_multi" in stderr
    assert api.calls == []


def test_dataset_dir_pushes_card_then_both_configs(tmp_path, monkeypatch):
    import datasets

    folder = tmp_path / "built"
    rows = {"image_id": ["a.jpg", "b.jpg"], "caption": ["two planes", "a ship"]}
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows)}).save_to_disk(str(folder))
    grouped = {"image_id": ["a.jpg"], "captions": [["two planes", "planes"]]}
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(grouped)}).save_to_disk(str(folder / "grouped"))
    (folder / "README.md").write_text("---\npretty_name: test\n---\n# card\n")
    pushed = []
    monkeypatch.setattr(
        datasets.DatasetDict, "push_to_hub", lambda self, repo_id, **kw: pushed.append((repo_id, list(self), kw))
    )
    api = StandInApi()
    code, stdout, stderr = run_main(
        ["--dataset_dir", folder, "--dataset_repo_id", "me/riscm", "--token", FAKE_TOKEN], api
    )
    assert code == 0, stderr
    assert [call[:2] for call in api.calls] == [("create_repo", "me/riscm"), ("upload_file", "me/riscm")]
    assert api.calls[0][2]["repo_type"] == "dataset" and api.calls[1][2]["path_in_repo"] == "README.md"
    assert [(repo, splits, kw.get("config_name")) for repo, splits, kw in pushed] == [
        ("me/riscm", ["train"], None),
        ("me/riscm", ["train"], "grouped"),
    ]
    assert "https://huggingface.co/datasets/me/riscm (train: 2 rows)" in stdout and FAKE_TOKEN not in stdout + stderr


def test_merge_lora_uploads_merged_weights(trained, processor, tmp_path):
    from peft import LoraConfig, get_peft_model

    from modeling_cnngemma import CNNGemmaForConditionalGeneration

    base_dir = tmp_path / "base"
    trained[0].save_pretrained(base_dir)
    base = CNNGemmaForConditionalGeneration.from_pretrained(base_dir)
    lora = get_peft_model(base, LoraConfig(r=4, target_modules=r".*language_model.*\.(q_proj|v_proj)"))
    with torch.no_grad():
        for name, param in lora.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.5)  # LoRA starts as a no-op; make the merge change the logits
    adapter = tmp_path / "adapter"
    lora.save_pretrained(adapter)
    base.config.save_pretrained(adapter)
    processor.save_pretrained(adapter)
    write_metrics(adapter)
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == str(base_dir)

    code, _, stderr = run_main(["--model_dir", adapter, "--repo_id", "me/x", "--dry_run", tmp_path / "no"])
    assert code == 1 and "Pass --merge_lora" in stderr
    code, _, stderr = run_main(["--model_dir", adapter, "--merge_lora", "--dry_run", tmp_path / "merged"])
    assert code == 0, stderr
    assert not (tmp_path / "merged" / "adapter_config.json").exists()
    merged = CNNGemmaForConditionalGeneration.from_pretrained(tmp_path / "merged").eval()
    inputs = processor(images=random_images(2, seed=13))
    with torch.no_grad():
        expected, original = lora.eval()(**inputs).logits, trained[0](**inputs).logits
        torch.testing.assert_close(merged(**inputs).logits, expected, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(expected, original, atol=1e-3)


def test_both_dataset_entry_points_make_the_same_hub_calls(tmp_path, monkeypatch):
    """`python -m dataset_builder push` and `push_to_hub.py --dataset_dir` go through the one `push_dataset`."""
    import datasets
    import huggingface_hub

    from dataset_builder.__main__ import main as dataset_builder_main
    from dataset_builder.build import build

    table = tmp_path / "captions.csv"
    table.write_text("image,caption,split\na.jpg,two planes .,train\na.jpg,planes .,train\nb.jpg,a ship .,test\n")
    build(table, tmp_path / "built")
    api = StandInApi()
    # Online, with the real HfApi replaced: both entry points build their client through dataset_builder.push.hub_api.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "HfApi", lambda token=None: api)
    monkeypatch.setattr(
        datasets.DatasetDict,
        "push_to_hub",
        lambda self, repo_id, **kw: api.calls.append(("push_to_hub", repo_id, {"splits": list(self), **kw})),
    )
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert dataset_builder_main(["push", "--dataset", str(tmp_path / "built"), "--repo-id", "me/riscm"]) == 0
    via_dataset_builder, api.calls = api.calls, []
    code, stdout, stderr = run_main(
        ["--dataset_dir", tmp_path / "built", "--dataset_repo_id", "me/riscm", "--token", FAKE_TOKEN]
    )
    assert code == 0, stderr

    def without_token(calls):
        return [(name, repo, {k: v for k, v in kw.items() if k != "token"}) for name, repo, kw in calls]

    assert without_token(api.calls) == without_token(via_dataset_builder)
    assert [(name, kw.get("path_in_repo"), kw.get("config_name")) for name, _, kw in api.calls] == [
        ("create_repo", None, None),
        ("upload_file", "README.md", None),
        ("push_to_hub", None, None),
        ("push_to_hub", None, "grouped"),
    ]
    assert api.calls[3][2]["set_default"] is False and api.calls[2][2]["splits"] == ["train", "test"]
    assert (
        out.getvalue()
        == stdout
        == "dataset me/riscm: https://huggingface.co/datasets/me/riscm (train: 2 rows, test: 1 rows)\n"
    )


def test_an_auto_map_entry_outside_the_folder_is_refused(tmp_path):
    (tmp_path / "modeling_cnngemma.py").write_text("")
    config = {"auto_map": {"AutoModel": "modeling_cnngemma.CNNGemmaModel"}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    push_to_hub.check_auto_maps(tmp_path)
    nested = {"image_processor": {"auto_map": {"AutoImageProcessor": UPSTREAM + "image_processing_cnngemma.X"}}}
    (tmp_path / "processor_config.json").write_text(json.dumps(nested))
    with pytest.raises(push_to_hub.PushError, match=r"processor_config.json: auto_map entry 'upstream/cnngemma--"):
        push_to_hub.check_auto_maps(tmp_path)


def test_the_card_shows_no_local_paths(trained, dry_run):
    folder, _ = dry_run
    card = (folder / "README.md").read_text()
    for local in (str(trained[1]), "/tmp/", "/home/", "~/", os.path.expanduser("~") + "/"):
        assert local not in card, local
    # only the flags that describe the training are published: paths to data, outputs and configs are not
    assert "| `max_steps` | `2` |" in card and "| `learning_rate` | `0.001` |" in card
    for flag in ("output_dir", "dataset", "text_config", "config"):
        assert f"| `{flag}` |" not in card, flag
    assert trained[1].name not in card and "text.json" not in card
    # the dataset is named by its folder's last part
    assert "on RISCM caption data\n(local dataset `riscm_built`)" in card
    # the other uploaded text files hold no local path either
    for path in folder.iterdir():
        if path.suffix in (".json", ".jinja", ".py"):
            assert str(trained[1]) not in path.read_text() and "/tmp/" not in path.read_text(), path.name


@pytest.mark.parametrize(
    "flags, expected",
    [
        (["--repo_id", "me/x/y"], "--repo_id 'me/x/y': not of the form 'namespace/name'."),
        (["--repo_id", "cnngemma"], "--repo_id 'cnngemma': not of the form 'namespace/name'."),
        (["--repo_id", "me/x--y"], "--repo_id 'me/x--y': not a valid Hub id (Cannot have -- or .. in repo_id"),
        (["--dataset_dir", "d", "--dataset_repo_id", "me/ riscm"], "--dataset_repo_id 'me/ riscm': not a valid Hub"),
        (["--all", "runs", "--index_repo_id", "https://hf.co/me/x"], "--index_repo_id 'https://hf.co/me/x': not of"),
        (["--all", "runs", "--namespace", "me/org"], "--namespace 'me/org': a namespace is a user or organisation"),
    ],
)
@pytest.mark.parametrize("dry_run_flag", [True, False])
def test_repo_ids_are_checked_when_the_flags_are_read(tmp_path, capsys, flags, expected, dry_run_flag):
    argv = [*flags, *(["--model_dir", tmp_path / "model"] if "--repo_id" in flags else [])]
    argv += ["--dry_run", tmp_path / "dry"] if dry_run_flag else ["--token", FAKE_TOKEN]
    api = StandInApi()
    with pytest.raises(SystemExit) as exit_info:
        push_to_hub.main([str(a) for a in argv], api=api)
    assert exit_info.value.code == 2 and api.calls == [] and not (tmp_path / "dry").exists()
    assert capsys.readouterr().err.splitlines()[-1].startswith(f"push_to_hub.py: error: {expected}")


def test_repo_id_messages(capsys):
    with pytest.raises(SystemExit):
        push_to_hub.parse_args(["--model_dir", "m", "--repo_id", "me/x/y"])
    assert capsys.readouterr().err.splitlines()[-1] == (
        "push_to_hub.py: error: --repo_id 'me/x/y': not of the form 'namespace/name'. Expected e.g. --repo_id "
        "user/cnngemma-mobilenet-single."
    )
    with pytest.raises(SystemExit):
        push_to_hub.parse_args(["--all", "runs", "--namespace", "me/org"])
    assert capsys.readouterr().err.splitlines()[-1] == (
        "push_to_hub.py: error: --namespace 'me/org': a namespace is a user or organisation name, without '/'. "
        "Expected e.g. --namespace user-or-org."
    )


def test_a_failed_dry_run_removes_the_folders_it_created(trained, tmp_path):
    folder = trained[1]
    # an expected error (no metrics.json): the new folder, and the parents this run made, are removed
    no_metrics = tmp_path / "no-metrics"
    shutil.copytree(folder, no_metrics)
    (no_metrics / "metrics.json").unlink()
    code, _, stderr = run_main(["--model_dir", no_metrics, "--dry_run", tmp_path / "new" / "dry"])
    assert code == 1 and stderr == (
        f"push_to_hub.py: error: --model_dir {no_metrics}: no metrics.json. Expected the test evaluation train_hf.py "
        "writes.\n"
    )
    assert not (tmp_path / "new").exists()


def test_an_unexpected_error_in_a_dry_run_is_one_line_and_removes_the_folder(trained, tmp_path, monkeypatch):
    folder = trained[1]

    # fails after the weights were written
    def broken(out):
        assert (out / "config.json").is_file()  # the folder is half-written when this fails
        raise RuntimeError("disk trouble")

    monkeypatch.setattr(push_to_hub, "check_auto_maps", broken)
    code, stdout, stderr = run_main(["--model_dir", folder, "--dry_run", tmp_path / "dry"])
    assert code == 1 and stdout == ""
    assert stderr == (
        "push_to_hub.py: error: internal error: RuntimeError: disk trouble. This is a bug in push_to_hub.py, not a "
        "diagnosis of your input. Nothing was sent. Please report it with the command you ran.\n"
    )
    assert not (tmp_path / "dry").exists()
    # a folder that was there (empty) stays, emptied again; a non-empty one is never touched
    (tmp_path / "kept").mkdir()
    code, _, _ = run_main(["--model_dir", folder, "--dry_run", tmp_path / "kept"])
    assert code == 1 and list((tmp_path / "kept").iterdir()) == []
    (tmp_path / "kept" / "mine.txt").write_text("keep me")
    code, _, stderr = run_main(["--model_dir", folder, "--dry_run", tmp_path / "kept"])
    assert code == 1 and "exists and is not empty" in stderr
    assert (tmp_path / "kept" / "mine.txt").read_text() == "keep me"


def test_the_token_scan_reads_in_chunks_and_finds_a_token_across_a_boundary(tmp_path, monkeypatch):
    monkeypatch.setattr(push_to_hub, "SCAN_CHUNK_SIZE", 64, raising=False)
    token = FAKE_TOKEN.encode()
    # upload() scans without reading whole files (shards can be 5 GB), and refuses before any request
    upload_dir = tmp_path / "upload"
    upload_dir.mkdir()
    (upload_dir / "model.safetensors").write_bytes(b"\0" * 100 + token + b"\0" * 100)  # spans chunks 1 and 2
    with monkeypatch.context() as patch:
        patch.setattr(Path, "read_bytes", lambda self: pytest.fail(f"read_bytes({self.name}) reads a whole file"))
        api = StandInApi()
        args = push_to_hub.parse_args(["--model_dir", "m", "--repo_id", "me/x"])
        with pytest.raises(push_to_hub.PushError) as error:
            push_to_hub.upload(api, FAKE_TOKEN, upload_dir, "me/x", args, "message")
    assert str(error.value) == (
        "model.safetensors contains the Hub token; refusing to upload. Nothing was sent. Fix: remove the token from "
        "that file in the model folder (e.g. a saved `token=` argument) and rerun."
    )
    assert api.calls == [] and FAKE_TOKEN not in str(error.value)
    path = tmp_path / "shard.bin"
    for offset in range(0, 140):  # every split of the token over two (or three) chunks
        path.write_bytes(b"x" * offset + token + b"y" * 50)
        assert push_to_hub.contains(path, token), offset
        path.write_bytes(b"x" * offset + token[:-1] + b"y" * 50)
        assert not push_to_hub.contains(path, token), offset


def test_the_card_of_a_synthetic_demo_run_names_the_synthetic_set_not_riscm(trained, tmp_path):
    """train_hf.py's demo records `dataset: null, synth_images: N`: its scores must not be published as RISCM's."""
    folder = tmp_path / "demo"
    shutil.copytree(trained[1], folder)
    (folder / "train_args.json").write_text(json.dumps({"dataset": None, "synth_images": 48, "max_steps": 2}))
    code, _, stderr = run_main(["--model_dir", folder, "--repo_id", "me/demo", "--dry_run", tmp_path / "upload"])
    assert code == 0, stderr
    card = (tmp_path / "upload" / "README.md").read_text()
    assert "name: synthetic demo set (test)" in card and "type: synthetic demo set" in card
    assert "on the synthetic demo set\n(`dataset_builder.synth`" in card
    assert "RISCM (test)" not in card and "RISCM-style caption data" not in card


def test_the_card_of_a_run_without_a_recorded_dataset_claims_no_riscm(trained, tmp_path):
    folder = tmp_path / "unrecorded"
    shutil.copytree(trained[1], folder)
    (folder / "train_args.json").write_text(json.dumps({"max_steps": 2}))
    code, _, stderr = run_main(["--model_dir", folder, "--repo_id", "me/unrecorded", "--dry_run", tmp_path / "up"])
    assert code == 0, stderr
    card = (tmp_path / "up" / "README.md").read_text()
    assert "name: unrecorded dataset (test)" in card and "on a dataset that this model folder does not\nrecord" in card
    assert "RISCM (test)" not in card and "RISCM-style caption data" not in card


def test_merge_lora_refuses_an_adapter_folder_trained_on_a_4bit_base(tmp_path):
    """Its metrics.json scores the 4-bit model; merged into the full-precision base it scores otherwise
    (results/real: CIDEr 1.175 against 0.970), so the card would publish the wrong numbers."""
    adapter = tmp_path / "qlora"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    (adapter / "cnngemma_adapter.json").write_text(json.dumps({"base": {}, "load_in_4bit": True}))
    for name in ("processor_config.json", "tokenizer_config.json"):
        (adapter / name).write_text("{}")
    write_metrics(adapter)
    code, _, stderr = run_main(["--model_dir", adapter, "--merge_lora", "--dry_run", tmp_path / "up"])
    assert code == 1
    assert stderr.strip().splitlines()[-1] == (
        f"push_to_hub.py: error: --merge_lora: {adapter} trained on a 4-bit base, so its scores are the 4-bit model's "
        "and the merged weights would score otherwise. Merge it (python -m cnngemma.adapters merge DIR OUT), score "
        "OUT (python -m metrics.evaluation --model OUT --output_dir EVAL), copy EVAL/metrics.json into OUT and push "
        "OUT; nothing was sent."
    )
    assert not (tmp_path / "up").exists()
