"""The saved folder loads as remote code in a fresh process, offline, with this repo not importable."""

import json
import os
import subprocess
import sys
import textwrap

import torch
from conftest import REPO_ROOT, random_images

CHILD = textwrap.dedent(
    """
    import importlib.abc, sys

    class BlockRepo(importlib.abc.MetaPathFinder):
        # The repo is pip-installed in editable mode; make sure only the folder's own files can be used.
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("modeling_cnngemma", "dataset_builder"):
                raise ImportError(f"{name} must not be imported by a remote-code load")

    sys.meta_path.insert(0, BlockRepo())
    import torch
    from PIL import Image
    from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText, AutoProcessor

    folder, images, out = sys.argv[1], sys.argv[2:-1], sys.argv[-1]
    config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    base = AutoModel.from_pretrained(folder, trust_remote_code=True)
    model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    inputs = processor(images=[Image.open(p) for p in images], text=["caption en", "caption"])
    with torch.no_grad():
        logits = model(**inputs).logits
    tokens = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    torch.save(
        {
            "logits": logits,
            "tokens": tokens,
            "input_ids": inputs["input_ids"],
            "classes": [type(o).__name__ for o in (config, base, model, processor, processor.image_processor)],
            "leaked": sorted(m for m in sys.modules if m.split(".")[0] in ("modeling_cnngemma", "dataset_builder")),
            "cwd": __import__("os").getcwd(),
        },
        out,
    )
    """
)


def test_remote_code_load_in_fresh_offline_process(tmp_path, saved_model_dir, tiny_model, processor):
    images = []
    for i, image in enumerate(random_images(2, seed=11)):
        images.append(tmp_path / f"image{i}.png")
        image.save(images[-1])
    script, out, workdir = tmp_path / "child.py", tmp_path / "out.pt", tmp_path / "elsewhere"
    script.write_text(CHILD)
    workdir.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "fresh-hf-home"))
    result = subprocess.run(
        [sys.executable, str(script), str(saved_model_dir), *map(str, images), str(out)],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    child = torch.load(out, weights_only=True)
    assert child["classes"] == [
        "CNNGemmaConfig",
        "CNNGemmaModel",
        "CNNGemmaForConditionalGeneration",
        "CNNGemmaProcessor",
        "CNNGemmaImageProcessor",
    ]
    assert child["leaked"] == [] and str(REPO_ROOT) not in child["cwd"]

    from PIL import Image

    inputs = processor(images=[Image.open(p) for p in images], text=["caption en", "caption"])
    assert torch.equal(child["input_ids"], inputs["input_ids"])
    with torch.no_grad():
        torch.testing.assert_close(child["logits"], tiny_model(**inputs).logits, atol=0, rtol=0)
    assert torch.equal(child["tokens"], tiny_model.generate(**inputs, max_new_tokens=8, do_sample=False))


def test_auto_map_points_only_into_the_folder(saved_model_dir):
    config = json.loads((saved_model_dir / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": "configuration_cnngemma.CNNGemmaConfig",
        "AutoModel": "modeling_cnngemma.CNNGemmaModel",
        "AutoModelForImageTextToText": "modeling_cnngemma.CNNGemmaForConditionalGeneration",
    }
    processor_config = json.loads((saved_model_dir / "processor_config.json").read_text())
    assert processor_config["auto_map"] == {"AutoProcessor": "processing_cnngemma.CNNGemmaProcessor"}
    entries = [*config["auto_map"].values(), *processor_config["auto_map"].values()]
    entries.append(processor_config["image_processor"]["auto_map"]["AutoImageProcessor"])
    for entry in entries:
        assert "--" not in entry
        assert (saved_model_dir / (entry.split(".")[0] + ".py")).is_file(), entry
