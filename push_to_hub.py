"""Push a `train_hf.py` output folder to the Hugging Face Hub as a self-contained remote-code model with a model card.

`--dry_run DIR` writes exactly the folder that would be uploaded; `--all DIR` pushes the four variants and an index.
"""

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

VARIANTS = ("mobilenet_single", "mobilenet_multi", "efficientnet_single", "efficientnet_multi")
METRICS = (  # metrics.json key, model-index metric type, display name
    ("bleu_1", "bleu", "BLEU-1"),
    ("bleu_2", "bleu", "BLEU-2"),
    ("bleu_3", "bleu", "BLEU-3"),
    ("bleu_4", "bleu", "BLEU-4"),
    ("meteor", "meteor", "METEOR"),
    ("rouge_l", "rouge", "ROUGE-L"),
    ("cider", "cider", "CIDEr"),
)
TRANSFORMERS_REQUIREMENT = ">=5.24,<6"
GEMMA_TERMS = "https://ai.google.dev/gemma/terms"
HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
LOAD_TIME_KEYS = {"is_local", "local_files_only", "_commit_hash", "cache_dir", "token", "use_auth_token"}
SECRET_KEY = re.compile(r"token|secret|password|api_key", re.IGNORECASE)


class PushError(Exception):
    """An error the user can fix; `main` prints it as one line and exits with status 1."""


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model_dir", help="A train_hf.py output folder (save_pretrained files + metrics.json).")
    parser.add_argument("--repo_id", help="The Hub model repository to push to, e.g. user/cnngemma-mobilenet-single.")
    parser.add_argument(
        "--all",
        metavar="DIR",
        help="Push the four variant folders in DIR (mobilenet_single, mobilenet_multi, efficientnet_single, "
        "efficientnet_multi) to {namespace}/cnngemma-{encoder}-{tokens}, plus an index README repository.",
    )
    parser.add_argument("--namespace", help="User or organisation for --all (default: the token's user).")
    parser.add_argument("--index_repo_id", help="Repository of the --all index README (default {namespace}/cnngemma).")
    parser.add_argument("--dataset_dir", help="A dataset_builder output folder to push with its card.")
    parser.add_argument("--dataset_repo_id", help="The Hub dataset repository for --dataset_dir.")
    parser.add_argument("--private", action="store_true", help="Create new repositories as private.")
    parser.add_argument("--revision", help="The branch to commit to (created from main when missing).")
    parser.add_argument("--commit_message", help="The commit message (default: a summary of the variant).")
    parser.add_argument(
        "--merge_lora",
        action="store_true",
        help="The folder holds a peft LoRA adapter: merge it into its base model and upload full weights.",
    )
    parser.add_argument(
        "--base_model_dir",
        help="With --merge_lora: the base model folder, when the adapter folder holds no full weights and "
        "adapter_config.json's base_model_name_or_path is not a local folder.",
    )
    parser.add_argument(
        "--dry_run",
        metavar="DIR",
        help="Write the folder(s) that would be uploaded to DIR (must not exist or be empty), list them, send nothing.",
    )
    parser.add_argument("--token", help="A Hub token with write access (default: HF_TOKEN or the `hf auth login` one).")
    parser.add_argument("--max_shard_size", default="5GB", help="Weights are split into safetensors shards above this.")
    parser.add_argument("--license", help="License id for the card (default: gemma with Gemma weights, else apache-2.0).")
    parser.add_argument("--base_model", action="append", help="Hub id of a base model for the card; repeatable.")
    parser.add_argument("--datasets", action="append", help="Hub id of a training dataset for the card; repeatable.")
    args = parser.parse_args(argv)
    if not (args.model_dir or args.all or args.dataset_dir):
        parser.error("nothing to push: pass --model_dir with --repo_id, --all DIR, or --dataset_dir.")
    if args.model_dir and args.all:
        parser.error("--model_dir and --all exclude each other: --all pushes the four variant folders itself.")
    if args.model_dir and not args.repo_id and not args.dry_run:
        parser.error("--model_dir needs --repo_id, e.g. --repo_id user/cnngemma-mobilenet-single.")
    if args.dataset_dir and not args.dataset_repo_id:
        parser.error("--dataset_dir needs --dataset_repo_id, e.g. --dataset_repo_id user/riscm-captions.")
    return args


# ---------------------------------------------------------------------------------------------------- the folder
def check_local_dir(path, flag: str, required: tuple[str, ...] = ()) -> Path:
    """A missing local folder would be taken for a Hub id by from_pretrained: fail here and say so."""
    folder = Path(path)
    if not folder.is_dir():
        raise PushError(f"{flag} {path}: no such folder. Expected a local folder; check the path.")
    missing = [name for name in required if not (folder / name).exists()]
    if missing:
        raise PushError(f"{flag} {path}: missing {', '.join(missing)}. Expected a train_hf.py output folder.")
    return folder


def load_model(model_dir: Path, merge_lora: bool, base_model_dir: str | None):
    """The model in `model_dir`, with a LoRA adapter merged into its base when the folder holds one."""
    from modeling_cnngemma import CNNGemmaForConditionalGeneration

    has_weights = any((model_dir / name).exists() for name in ("model.safetensors", "model.safetensors.index.json"))
    adapter = (model_dir / "adapter_config.json").exists()
    if not adapter:
        if merge_lora:
            raise PushError(f"--merge_lora: {model_dir} holds no adapter_config.json; drop --merge_lora.")
        if not has_weights or not (model_dir / "config.json").is_file():
            raise PushError(
                f"--model_dir {model_dir}: no config.json + model.safetensors. Expected a train_hf.py output folder."
            )
        return CNNGemmaForConditionalGeneration.from_pretrained(model_dir, dtype="auto").eval()
    if not merge_lora:
        raise PushError(
            f"--model_dir {model_dir} holds a LoRA adapter (adapter_config.json), which AutoModelForImageTextToText "
            "cannot load alone. Pass --merge_lora to upload the merged full weights."
        )
    from peft import PeftModel

    base_path = model_dir if has_weights else base_model_dir
    if base_path is None:
        named = json.loads((model_dir / "adapter_config.json").read_text()).get("base_model_name_or_path") or ""
        if not named or not Path(named).is_dir():
            raise PushError(
                f"--merge_lora: {model_dir} has no full weights and its adapter's base_model_name_or_path "
                f"{named!r} is not a local folder. Pass --base_model_dir with the base model's save_pretrained folder."
            )
        base_path = named
    base = CNNGemmaForConditionalGeneration.from_pretrained(check_local_dir(base_path, "base model"), dtype="auto")
    return PeftModel.from_pretrained(base, model_dir).merge_and_unload().eval()


def load_processor(model_dir: Path):
    """The processor, built with this repo's classes: `from_pretrained` would import the folder's remote code."""
    from transformers import AutoTokenizer
    from transformers.models.auto.tokenization_auto import tokenizer_class_from_name

    from modeling_cnngemma import CNNGemmaImageProcessor, CNNGemmaProcessor

    saved = json.loads((model_dir / "processor_config.json").read_text(encoding="utf-8"))
    image_processor = CNNGemmaImageProcessor.from_dict(saved["image_processor"])
    tokenizer_config = json.loads((model_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    # AutoTokenizer would read config.json's auto_map and ask to run remote code; the class is named here anyway.
    tokenizer_class = tokenizer_class_from_name(tokenizer_config.get("tokenizer_class") or "") or AutoTokenizer
    template = model_dir / "chat_template.jinja"
    return CNNGemmaProcessor(
        image_processor,
        tokenizer_class.from_pretrained(model_dir),
        num_image_tokens=saved["num_image_tokens"],
        prompt_prefix=saved["prompt_prefix"],
        chat_template=template.read_text(encoding="utf-8") if template.is_file() else None,
    )


def tidy_configs(folder: Path) -> None:
    """Points every auto_map entry ("owner/repo--module.Class" included) at a module file in `folder`, and drops
    the load-time keys (`is_local`, `local_files_only`, ...) that a re-saved tokenizer writes into its config."""

    def local(reference, where):
        if reference is None:
            return None
        if isinstance(reference, list):  # AutoTokenizer: [slow, fast]
            return [local(item, where) for item in reference]
        reference = reference.split("--", 1)[-1]
        if not (folder / f"{reference.rsplit('.', 1)[0]}.py").is_file():
            raise PushError(f"{where}: auto_map entry {reference!r} names a module file that is not in the folder.")
        return reference

    def walk(node, where):
        if isinstance(node, dict):
            for key in LOAD_TIME_KEYS & node.keys():
                del node[key]
            for key, value in node.items():
                if key == "auto_map" and isinstance(value, dict):
                    node[key] = {cls: local(ref, where) for cls, ref in value.items()}
                else:
                    walk(value, where)
        elif isinstance(node, list):
            for item in node:
                walk(item, where)

    for path in sorted(folder.glob("*.json")):
        data = json.loads(path.read_text(encoding="utf-8"))
        before = json.dumps(data, sort_keys=True)
        walk(data, path.name)
        if json.dumps(data, sort_keys=True) != before:
            path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def read_metrics(model_dir: Path) -> dict:
    path = model_dir / "metrics.json"
    if not path.is_file():
        raise PushError(f"--model_dir {model_dir}: no metrics.json. Expected the test evaluation train_hf.py writes.")
    metrics = json.loads(path.read_text(encoding="utf-8"))
    missing = [key for key, _, _ in METRICS if not isinstance(metrics.get(key), (int, float))]
    if missing:
        raise PushError(f"{path}: no numeric {', '.join(missing)}. Expected train_hf.py's metrics.json format.")
    return metrics


def read_train_args(model_dir: Path) -> dict:
    """The flags train_hf.py ran with (train_args.json), if written; secrets are dropped, never shown."""
    path = model_dir / "train_args.json"
    if not path.is_file():
        return {}
    data = json.loads(path.read_text(encoding="utf-8"))
    return {key: value for key, value in data.items() if not SECRET_KEY.search(key)}


def prepare_folder(model_dir, out: Path, args, repo_id: str) -> dict:
    """Writes the upload folder for one model into `out` (an empty folder); returns the card's facts."""
    from transformers import __version__ as transformers_version

    model_dir = check_local_dir(model_dir, "--model_dir", ("processor_config.json", "tokenizer_config.json"))
    metrics = read_metrics(model_dir)
    train_args = read_train_args(model_dir)
    model = load_model(model_dir, args.merge_lora, args.base_model_dir)
    processor = load_processor(model_dir)
    # Re-saving through this repo's classes writes its remote-code files and local auto_map entries.
    model.save_pretrained(out, max_shard_size=args.max_shard_size)
    processor.save_pretrained(out)
    tidy_configs(out)
    shutil.copyfile(model_dir / "metrics.json", out / "metrics.json")
    facts = {
        "repo_id": repo_id,
        "config": model.config,
        "metrics": metrics,
        "train_args": train_args,
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "transformers_version": transformers_version,
        "merged_lora": args.merge_lora,
    }
    (out / "README.md").write_text(model_card(facts, args), encoding="utf-8")
    return facts


# ---------------------------------------------------------------------------------------------------- the card
def holds_gemma(config, train_args: dict) -> bool:
    """Gemma weights are inside when training started from a language model or the decoder has Gemma's vocabulary."""
    from modeling_cnngemma.configuration_cnngemma import PALIGEMMA_VOCAB_SIZE

    return bool(train_args.get("language_model")) or config.text_config.vocab_size == PALIGEMMA_VOCAB_SIZE


def variant_name(config) -> str:
    encoder = "efficientnet" if "efficientnet" in config.vision_model_name else "mobilenet"
    return f"{encoder}_{config.token_mode}"


def hub_ids(values) -> list[str]:
    """The Hub ids among `values`; local paths (which would mean nothing on the Hub) are left out."""
    return [v for v in values if isinstance(v, str) and HUB_ID.match(v) and not os.path.exists(v)]


def card_metadata(facts: dict, args) -> tuple[dict, bool]:
    """The card's YAML metadata and whether Gemma weights are inside."""
    from huggingface_hub import EvalResult, ModelCardData

    config, train_args, metrics = facts["config"], facts["train_args"], facts["metrics"]
    language_model = train_args.get("language_model")
    has_gemma = holds_gemma(config, train_args)
    base_models = list(args.base_model or hub_ids([language_model]))
    vision_pretrained = train_args.get("vision_pretrained")
    if not args.base_model and vision_pretrained and not os.path.exists(str(vision_pretrained)):
        import timm

        cfg = timm.get_pretrained_cfg(config.vision_model_name)
        base_models += [cfg.hf_hub_id] if cfg is not None and cfg.hf_hub_id else []
    datasets = list(args.datasets or hub_ids([train_args.get("dataset"), args.dataset_repo_id]))
    dataset_name = datasets[0] if datasets else "RISCM"
    split = str(metrics.get("split", "test"))
    results = [
        EvalResult(
            task_type="image-to-text",
            task_name="Image captioning",
            dataset_type=dataset_name,
            dataset_name=f"{dataset_name} ({split})",
            dataset_split=split,
            metric_type=metric_type,
            metric_name=name,
            metric_value=round(float(metrics[key]), 4),
        )
        for key, metric_type, name in METRICS
    ]
    data = ModelCardData(
        library_name="transformers",
        pipeline_tag="image-text-to-text",
        license=args.license or ("gemma" if has_gemma else "apache-2.0"),
        base_model=base_models or None,
        datasets=datasets or None,
        tags=["remote-sensing", "image-captioning", "cnngemma", "custom_code"],
        language=["en"],
        model_name=facts["repo_id"].split("/")[-1],
        eval_results=results,
    )
    return data.to_dict(), has_gemma


def results_table(rows: list[tuple[str, dict]]) -> str:
    speed_keys = sorted(
        {k for _, m in rows for k, v in m.items() if k.endswith("_per_second") and isinstance(v, (int, float))}
    )
    header = ["model", "images", *[name for _, _, name in METRICS], *speed_keys]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label, metrics in rows:
        cells = [label, f"{metrics.get('num_images', '?')}"]
        cells += [f"{float(metrics[key]):.4f}" for key, _, _ in METRICS]
        cells += [f"{metrics[key]:.1f}" if key in metrics else "-" for key in speed_keys]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def model_card(facts: dict, args) -> str:
    import yaml

    metadata, has_gemma = card_metadata(facts, args)
    config, metrics, train_args, repo_id = facts["config"], facts["metrics"], facts["train_args"], facts["repo_id"]
    text = config.text_config
    tokens = "1 image token (the globally pooled final feature map)" if config.token_mode == "single" else (
        f"{config.num_image_tokens} image tokens (every position of the {config.vision_grid[0]}x"
        f"{config.vision_grid[1]} final feature map)"
    )
    if has_gemma:
        license_text = (
            f"The decoder holds Gemma weights, so the [Gemma Terms of Use]({GEMMA_TERMS}) apply to this model and to "
            "anything derived from it."
        )
    else:
        license_text = (
            f"`{metadata['license']}`. The decoder was initialised from scratch, not from Gemma weights; if you swap "
            f"in Gemma weights, the [Gemma Terms of Use]({GEMMA_TERMS}) apply."
        )
    if train_args:
        settings = "\n".join(f"| `{key}` | `{json.dumps(value)}` |" for key, value in sorted(train_args.items()))
        settings = f"From `train_args.json` (the `train_hf.py` flags):\n\n| flag | value |\n|---|---|\n{settings}"
    else:
        settings = "No `train_args.json` was found next to the weights, so the training flags are not recorded here."
    speed = [k for k in metrics if k.endswith("_per_second")]
    speed_text = (
        "Speed columns come from `metrics.json` (measured during the evaluation that produced the scores)."
        if speed
        else "`metrics.json` records no speed for this run; see the project README's benchmark tables."
    )
    history = metrics.get("history") or []
    history_text = (
        f"Validation ran {len(history)} time(s) during training (`metrics.json` -> `history`); the last at "
        f"step {history[-1].get('step', '?')}: CIDEr {float(history[-1].get('cider', float('nan'))):.4f}."
        if history
        else "No validation history was recorded."
    )
    revision_hint = "<commit sha>"
    body = f"""
# {repo_id.split("/")[-1]}

CNNGemma captions satellite and aerial images. It keeps PaliGemma's layout and swaps the SigLIP vision tower for a
small timm CNN: the CNN's final feature map is projected into a Gemma-family decoder as image tokens, followed by
the prompt `{config.prompt_prefix}`.

**Variant `{variant_name(config)}`:** encoder `{config.vision_model_name}` at {config.image_size} px, {tokens},
{config.projector_type} projector ({config.vision_feature_dim} -> {text.hidden_size}), decoder `{text.model_type}`
with {text.num_hidden_layers} layers of width {text.hidden_size} and a {text.vocab_size:,}-token vocabulary.
{facts["num_parameters"]:,} parameters{" (a LoRA adapter merged into the base weights)" if facts["merged_lora"] else ""}.

## Training data and settings

Trained with `train_hf.py` to step {metrics.get("step", "?")} on RISCM-style caption data
({", ".join(f"`{d}`" for d in metadata.get("datasets") or []) or "see `train_args.json`"}): remote-sensing images
with up to five English captions each, from RSICD, UCM-Captions and NWPU-Captions, de-duplicated by
`dataset_builder`.

{settings}

## Results

Multi-reference coco-caption scores (each predicted caption against all of its image's references; BLEU,
METEOR, ROUGE-L, CIDEr-D) on the `{metrics.get("split", "test")}` split:

{results_table([(variant_name(config), metrics)])}

{speed_text} {history_text}

## Usage

The code lives in this repository (remote code), so pass `trust_remote_code=True`, and pin `revision` to a commit
you have read: later commits can change the code that runs.

```python
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

repo, revision = "{repo_id}", "{revision_hint}"
model = AutoModelForImageTextToText.from_pretrained(repo, revision=revision, trust_remote_code=True).eval()
processor = AutoProcessor.from_pretrained(repo, revision=revision, trust_remote_code=True)

inputs = processor(images=Image.open("scene.jpg"), text="{config.prompt_prefix}")
with torch.no_grad():
    output = model.generate(**inputs, max_new_tokens=32, do_sample=False)
print(processor.post_process_image_text_to_text(output, input_ids=inputs["input_ids"]))
```

It also works with `pipeline("image-text-to-text", model=repo, revision=revision, trust_remote_code=True)`,
called as `pipe(images=image, text="{config.prompt_prefix}", return_full_text=False)` or with a chat whose user
turn holds one image and the prompt.

Requirements: `transformers{TRANSFORMERS_REQUIREMENT}` (saved with {facts["transformers_version"]}), `timm>=1.0.20`,
`torch`, `pillow`.

## License

{license_text}

## Limitations

- English captions in the style of RSICD, UCM-Captions and NWPU-Captions; one image (RGB, resized to
  {config.image_size} px without cropping) per caption. Other sensors, bands or resolutions were not evaluated.
- Counts, colours and positions of small objects are the most frequent errors; captions can state objects that
  are not there. Do not use it for decisions about people, property or safety without human review.
- {"One pooled token cannot say where things are; positions are guesses." if config.token_mode == "single" else
   "Multi-token inputs are slower to decode than the single-token variant."}

## Citation

```bibtex
@misc{{cnngemma,
  title  = {{CNNGemma: PaliGemma with a CNN vision encoder for satellite and aerial image captioning}},
  note   = {{Project report}}
}}
@article{{lu2017rsicd,
  title   = {{Exploring Models and Data for Remote Sensing Image Caption Generation}},
  author  = {{Lu, Xiaoqiang and Wang, Binqiang and Zheng, Xiangtao and Li, Xuelong}},
  journal = {{IEEE Transactions on Geoscience and Remote Sensing}},
  volume  = {{56}}, number = {{4}}, pages = {{2183--2195}}, year = {{2018}}
}}
@inproceedings{{qu2016ucm,
  title     = {{Deep Semantic Understanding of High Resolution Remote Sensing Image}},
  author    = {{Qu, Bo and Li, Xuelong and Tao, Dacheng and Lu, Xiaoqiang}},
  booktitle = {{International Conference on Computer, Information and Telecommunication Systems (CITS)}},
  year      = {{2016}}
}}
@article{{cheng2022nwpu,
  title   = {{NWPU-Captions Dataset and MLCA-Net for Remote Sensing Image Captioning}},
  author  = {{Cheng, Qimin and Huang, Haiyan and Xu, Yuan and Zhou, Yuzhuo and Li, Huanying and Wang, Zhongyuan}},
  journal = {{IEEE Transactions on Geoscience and Remote Sensing}},
  volume  = {{60}}, year = {{2022}}
}}
```
"""
    return "---\n" + yaml.safe_dump(metadata, sort_keys=False, allow_unicode=True) + "---\n" + body


def index_card(namespace: str, pushed: list[tuple[str, dict]], has_gemma: bool) -> str:
    import yaml

    metadata = {
        "library_name": "transformers",
        "pipeline_tag": "image-text-to-text",
        "license": "gemma" if has_gemma else "apache-2.0",
        "tags": ["remote-sensing", "image-captioning", "cnngemma"],
    }
    links = "\n".join(f"- [`{repo}`](https://huggingface.co/{repo})" for repo, _ in pushed)
    return (
        "---\n" + yaml.safe_dump(metadata, sort_keys=False) + "---\n\n# CNNGemma variants\n\n"
        "PaliGemma's layout with a timm CNN as the vision tower, for satellite and aerial image captioning. "
        "Four variants: MobileNetV3-L or EfficientNet-B0, with 1 pooled image token or every position of the "
        f"feature map. Each repository holds its remote code, weights, processor and card.\n\n{links}\n\n"
        f"## Results\n\n{results_table(pushed)}\n\nLoad one with `AutoModelForImageTextToText.from_pretrained(repo, "
        "revision=..., trust_remote_code=True)` and `AutoProcessor` (see each card).\n"
    )


# ---------------------------------------------------------------------------------------------------- the push
def list_folder(folder: Path, prefix: str = "") -> None:
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        print(f"{path.stat().st_size:>14,}  {prefix}{path.relative_to(folder)}")


def new_empty_dir(path) -> Path:
    folder = Path(path)
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise PushError(f"--dry_run {path}: exists and is not empty. Pass a new or empty folder; nothing was written.")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def hub_call(what: str, secret: str | None, function, /, *args, **kwargs):
    """Runs one Hub request; any failure (network, offline mode, auth) becomes one line without the token."""
    try:
        return function(*args, **kwargs)
    except Exception as error:  # noqa: BLE001 - every Hub failure gets the same one-line report
        message = (str(error).strip().splitlines() or [""])[0]
        if secret:
            message = message.replace(secret, "***")
        raise PushError(
            f"{what} failed: {type(error).__name__}: {message}. Nothing local was changed. Fix: check network "
            "access to huggingface.co (HF_HUB_OFFLINE must be unset) and that the token has write access."
        ) from None


def upload(api, token, folder: Path, repo_id: str, args, message: str):
    # Last guard: nothing that is uploaded may contain the token (e.g. a config that recorded a `token=` kwarg).
    for path in folder.rglob("*"):
        if path.is_file() and token.encode() in path.read_bytes():
            raise PushError(f"{path.name} contains the Hub token; refusing to upload. Nothing was sent.")
    hub_call(f"create_repo {repo_id}", token, api.create_repo, repo_id, private=args.private, exist_ok=True)
    if args.revision:
        hub_call(f"create_branch {args.revision}", token, api.create_branch, repo_id, branch=args.revision,
                 exist_ok=True)
    info = hub_call(
        f"upload to {repo_id}", token, api.upload_folder, repo_id=repo_id, folder_path=str(folder),
        revision=args.revision, commit_message=args.commit_message or message,
    )
    print(f"{repo_id}: {info.commit_url}")
    print(
        f"  AutoModelForImageTextToText.from_pretrained({repo_id!r}, revision={info.oid!r}, trust_remote_code=True)"
    )
    return info


def push_dataset(api, token, args) -> None:
    """A dataset_builder output: the card first (push_to_hub merges its metadata into it), then the splits."""
    import datasets

    folder = check_local_dir(args.dataset_dir, "--dataset_dir", ("dataset_dict.json", "README.md"))
    pairs = datasets.load_from_disk(str(folder))
    grouped = datasets.load_from_disk(str(folder / "grouped")) if (folder / "grouped").is_dir() else None
    summary = ", ".join(f"{name}: {len(split):,} rows" for name, split in pairs.items())
    if args.dry_run:
        print(f"dataset {folder} -> {args.dataset_repo_id} ({summary}; grouped config: {grouped is not None})")
        return
    repo = args.dataset_repo_id
    hub_call(f"create_repo {repo}", token, api.create_repo, repo, repo_type="dataset", private=args.private,
             exist_ok=True)
    hub_call(f"upload card to {repo}", token, api.upload_file, path_or_fileobj=str(folder / "README.md"),
             path_in_repo="README.md", repo_id=repo, repo_type="dataset", commit_message="dataset card")
    hub_call(f"push {repo}", token, pairs.push_to_hub, repo, token=token, private=args.private)
    if grouped is not None:
        hub_call(f"push {repo} (grouped)", token, grouped.push_to_hub, repo, config_name="grouped",
                 set_default=False, token=token, private=args.private)
    print(f"dataset {repo}: https://huggingface.co/datasets/{repo} ({summary})")


def find_variants(root) -> dict[str, Path]:
    root = check_local_dir(root, "--all")
    found, missing = {}, []
    for variant in VARIANTS:
        names = (variant, variant.replace("_", "-"), "cnngemma-" + variant.replace("_", "-"))
        folder = next((root / name for name in names if (root / name).is_dir()), None)
        if folder is None:
            missing.append(variant)
        else:
            found[variant] = folder
    if missing:
        present = sorted(p.name for p in root.iterdir() if p.is_dir())
        raise PushError(f"--all {root}: no folder for {', '.join(missing)} (found: {present}). Expected one "
                        f"train_hf.py output per variant named {', '.join(VARIANTS)}.")
    for variant, folder in found.items():
        config = json.loads((folder / "config.json").read_text()) if (folder / "config.json").is_file() else {}
        actual = variant_name(argparse.Namespace(vision_model_name=config.get("vision_model_name", ""),
                                                 token_mode=config.get("token_mode")))
        if actual != variant:
            raise PushError(f"--all: {folder} is named {variant} but its config.json is {actual} "
                            f"({config.get('vision_model_name')}, token_mode={config.get('token_mode')}). Fix the "
                            "folder names.")
    return found


def resolve_token(args):
    from huggingface_hub import get_token

    token = args.token or get_token()
    if not token:
        raise PushError("no Hub token: pass --token, set HF_TOKEN, or run `hf auth login`. Nothing was changed.")
    return token


def offline() -> bool:
    import huggingface_hub.constants

    return huggingface_hub.constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in (
        "1", "ON", "YES", "TRUE")


def run(args, api=None) -> None:
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    token = None
    if not args.dry_run:
        if api is None and offline():
            raise PushError("the Hub cannot be reached: offline mode is on (HF_HUB_OFFLINE=1). Nothing was changed. "
                            "Fix: unset HF_HUB_OFFLINE on a machine with network access, or use --dry_run DIR.")
        token = resolve_token(args)
        if api is None:
            from huggingface_hub import HfApi

            api = HfApi(token=token)
    dry_root = new_empty_dir(args.dry_run) if args.dry_run else None

    if args.dataset_dir:
        push_dataset(api, token, args)
    if args.model_dir:
        repo_id = args.repo_id or "your-namespace/" + Path(args.model_dir).resolve().name
        push_models(api, token, args, [(args.model_dir, repo_id, dry_root)])
    if args.all:
        variants = find_variants(args.all)
        namespace = args.namespace
        if namespace is None:
            namespace = "your-namespace" if args.dry_run else hub_call("whoami", token, api.whoami)["name"]
        jobs = [
            (folder, f"{namespace}/cnngemma-{variant.replace('_', '-')}",
             dry_root / f"cnngemma-{variant.replace('_', '-')}" if dry_root else None)
            for variant, folder in variants.items()
        ]
        pushed = push_models(api, token, args, jobs)
        index_repo = args.index_repo_id or f"{namespace}/cnngemma"
        with tempfile.TemporaryDirectory(prefix="cnngemma-index-") as scratch:
            folder = dry_root / "index" if dry_root else Path(scratch)
            folder.mkdir(exist_ok=True)
            has_gemma = any(holds_gemma(facts["config"], facts["train_args"]) for _, facts in pushed)
            (folder / "README.md").write_text(
                index_card(namespace, [(repo, facts["metrics"]) for repo, facts in pushed], has_gemma),
                encoding="utf-8",
            )
            if dry_root:
                list_folder(folder, "index/")
            else:
                upload(api, token, folder, index_repo, args, "CNNGemma variants index")


def push_models(api, token, args, jobs) -> list[tuple[str, dict]]:
    pushed = []
    for model_dir, repo_id, dry_folder in jobs:
        with tempfile.TemporaryDirectory(prefix="cnngemma-push-") as scratch:
            folder = dry_folder or Path(scratch)
            folder.mkdir(parents=True, exist_ok=True)
            facts = prepare_folder(model_dir, folder, args, repo_id)
            print(f"{repo_id} <- {model_dir}")
            list_folder(folder, f"{folder.name}/" if dry_folder and dry_folder != Path(args.dry_run) else "")
            if not dry_folder:
                config = facts["config"]
                message = f"CNNGemma {variant_name(config)}: {config.vision_model_name}, {config.num_image_tokens} tokens"
                upload(api, token, folder, repo_id, args, message)
        pushed.append((repo_id, facts))
    return pushed


def main(argv=None, api=None) -> int:
    args = parse_args(argv)
    dry_run_was_there = bool(args.dry_run) and Path(args.dry_run).exists()
    try:
        run(args, api=api)
    except PushError as error:
        if args.dry_run and not dry_run_was_there:  # leave no half-written dry-run folder behind
            shutil.rmtree(args.dry_run, ignore_errors=True)
        print(f"push_to_hub.py: error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
