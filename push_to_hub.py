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

from dataset_builder.push import PushError, hub_api, hub_call, push_dataset, repo_id_problem

VARIANTS = ("mobilenet_single", "mobilenet_multi", "efficientnet_single", "efficientnet_multi")
TEMPLATES = Path(__file__).resolve().parent / "templates"
SECRET_KEY = re.compile(r"token|secret|password|api_key", re.IGNORECASE)
SCAN_CHUNK_SIZE = 1 << 24  # the token scan reads 16 MiB at a time: shards can be 5 GB


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="push_to_hub.py", description=__doc__.splitlines()[0])
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
    parser.add_argument(
        "--token", help="A Hub token with write access (default: HF_TOKEN or the `hf auth login` one)."
    )
    parser.add_argument(
        "--max_shard_size", default="5GB", help="Weights are split into safetensors shards above this."
    )
    parser.add_argument(
        "--license", help="License id for the card (default: gemma with Gemma weights, else apache-2.0)."
    )
    parser.add_argument("--base_model", action="append", help="Hub id of a base model for the card; repeatable.")
    parser.add_argument("--datasets", action="append", help="Hub id of a training dataset for the card; repeatable.")
    args = parser.parse_args(argv)
    for flag in ("repo_id", "dataset_repo_id", "index_repo_id", "namespace"):
        if (value := getattr(args, flag)) is not None and (problem := repo_id_problem(value, flag != "namespace")):
            example = "user-or-org" if flag == "namespace" else "user/cnngemma-mobilenet-single"
            parser.error(f"--{flag} {value!r}: {problem} Expected e.g. --{flag} {example}.")
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
    tokenizer = tokenizer_class.from_pretrained(model_dir)
    # from_pretrained records how it loaded (is_local, local_files_only); save_pretrained would write that out.
    for key in ("is_local", "local_files_only"):
        tokenizer.init_kwargs.pop(key, None)
    template = model_dir / "chat_template.jinja"
    return CNNGemmaProcessor(
        image_processor,
        tokenizer,
        num_image_tokens=saved["num_image_tokens"],
        prompt_prefix=saved["prompt_prefix"],
        chat_template=template.read_text(encoding="utf-8") if template.is_file() else None,
    )


def auto_map_references(node):
    """Every class reference under an `auto_map` key, however deep (processor_config.json nests one)."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "auto_map" and isinstance(value, dict):
                for reference in value.values():  # AutoTokenizer maps to [slow, fast]
                    yield from reference if isinstance(reference, list) else [reference]
            else:
                yield from auto_map_references(value)
    elif isinstance(node, list):
        for item in node:
            yield from auto_map_references(item)


def check_auto_maps(folder: Path) -> None:
    """The re-save wrote every auto_map; refuse to upload one that still points outside the folder."""
    for path in sorted(folder.glob("*.json")):
        for reference in auto_map_references(json.loads(path.read_text(encoding="utf-8"))):
            if reference and ("--" in reference or not (folder / f"{reference.rsplit('.', 1)[0]}.py").is_file()):
                raise PushError(
                    f"{path.name}: auto_map entry {reference!r} does not name a module file in the upload folder "
                    "(expected e.g. 'modeling_cnngemma.CNNGemmaForConditionalGeneration'). Nothing was sent. Fix: "
                    "re-save the model and processor with this repository's modeling_cnngemma classes."
                )


def read_metrics(model_dir: Path) -> dict:
    from metrics.caption_metrics import METRIC_KEYS

    path = model_dir / "metrics.json"
    if not path.is_file():
        raise PushError(f"--model_dir {model_dir}: no metrics.json. Expected the test evaluation train_hf.py writes.")
    metrics = json.loads(path.read_text(encoding="utf-8"))
    missing = [key for key in METRIC_KEYS if not isinstance(metrics.get(key), (int, float))]
    if missing:
        raise PushError(f"{path}: no numeric {', '.join(missing)}. Expected train_hf.py's metrics.json format.")
    return metrics


def read_train_args(model_dir: Path) -> dict:
    """The flags train_hf.py ran with (train_args.json), if written; secrets are dropped, never shown."""
    path = model_dir / "train_args.json"
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as error:
        raise PushError(
            f"{path}: not valid JSON ({error}). Fix or delete it (the card then lists no flags)."
        ) from None
    if not isinstance(data, dict):
        raise PushError(f"{path}: expected a JSON object of flags, got {type(data).__name__}. Fix or delete it.")
    return {key: value for key, value in data.items() if not SECRET_KEY.search(key)}


def public_value(value):
    """A train_args value fit for a public card: local paths (whose folders mean nothing on the Hub and can hold a
    user name) become their last part; Hub ids and other values stay."""
    if isinstance(value, list):
        return [public_value(item) for item in value]
    if isinstance(value, dict):
        return {key: public_value(item) for key, item in value.items()}
    if not isinstance(value, str) or not value:
        return value
    expanded = os.path.expanduser(value)
    if os.path.isabs(expanded) or value.startswith(("./", "../")) or (os.sep in value and os.path.exists(value)):
        name = Path(expanded).name
        return f"{name} (local)" if name and name not in (".", "..") else "a local folder"
    return value


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
    check_auto_maps(out)
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
    model_card(facts, args).save(out / "README.md")
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
    return [v for v in values if isinstance(v, str) and not repo_id_problem(v) and not os.path.exists(v)]


def local_dataset_name(train_args: dict) -> str:
    """What the scores were measured on when no Hub dataset is named: never "RISCM" unless the run says so."""
    if train_args.get("dataset"):
        return f"local dataset {Path(str(train_args['dataset'])).name}"
    if train_args.get("synth_images"):
        return "synthetic demo set"
    return "unrecorded dataset"


def card_data(facts: dict, args):
    """The card's metadata (`ModelCardData`, with the scores as model-index results) and whether Gemma is inside."""
    from huggingface_hub import EvalResult, ModelCardData

    from metrics.caption_metrics import METRIC_KEYS, METRIC_NAMES

    config, train_args, metrics = facts["config"], facts["train_args"], facts["metrics"]
    has_gemma = holds_gemma(config, train_args)
    base_models = list(args.base_model or hub_ids([train_args.get("language_model")]))
    vision_pretrained = train_args.get("vision_pretrained")
    if not args.base_model and vision_pretrained and not os.path.exists(str(vision_pretrained)):
        import timm

        cfg = timm.get_pretrained_cfg(config.vision_model_name)
        base_models += [cfg.hf_hub_id] if cfg is not None and cfg.hf_hub_id else []
    datasets = list(args.datasets or hub_ids([train_args.get("dataset"), args.dataset_repo_id]))
    dataset_name = datasets[0] if datasets else local_dataset_name(train_args)
    split = str(metrics.get("split", "test"))
    results = [
        EvalResult(
            task_type="image-to-text",
            task_name="Image captioning",
            dataset_type=dataset_name,
            dataset_name=f"{dataset_name} ({split})",
            dataset_split=split,
            metric_type=key.split("_")[0],  # bleu_1 -> bleu, rouge_l -> rouge: the Hub's metric ids
            metric_name=METRIC_NAMES[key],
            metric_value=round(float(metrics[key]), 4),
        )
        for key in METRIC_KEYS
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
    return data, has_gemma


def results_table(rows: list[tuple[str, dict]]) -> str:
    from metrics.caption_metrics import METRIC_KEYS, METRIC_NAMES

    speed_keys = sorted(
        {k for _, m in rows for k, v in m.items() if k.endswith("_per_second") and isinstance(v, (int, float))}
    )
    header = ["model", "images", *[METRIC_NAMES[key] for key in METRIC_KEYS], *speed_keys]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label, metrics in rows:
        cells = [label, f"{metrics.get('num_images', '?')}"]
        cells += [f"{float(metrics[key]):.4f}" for key in METRIC_KEYS]
        cells += [f"{metrics[key]:.1f}" if key in metrics else "-" for key in speed_keys]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def model_card(facts: dict, args):
    """The model card: values computed here, prose in templates/model_card.md."""
    from huggingface_hub import ModelCard

    data, has_gemma = card_data(facts, args)
    config, metrics, train_args = facts["config"], facts["metrics"], facts["train_args"]
    if config.token_mode == "single":
        tokens = "1 image token (the globally pooled final feature map)"
    else:
        rows, columns = config.vision_grid
        tokens = f"{config.num_image_tokens} image tokens (every position of the {rows}x{columns} final feature map)"
    history = metrics.get("history") or []
    last_validation = None
    if history:
        last = history[-1]
        last_validation = {
            "runs": len(history),
            "step": last.get("step", "?"),
            "cider": float(last.get("cider", "nan")),
        }
    return ModelCard.from_template(
        data,
        template_path=str(TEMPLATES / "model_card.md"),
        model_name=data.model_name,
        repo_id=facts["repo_id"],
        variant=variant_name(config),
        config=config,
        text=config.text_config,
        tokens=tokens,
        vocab_size=f"{config.text_config.vocab_size:,}",
        num_parameters=f"{facts['num_parameters']:,}",
        merged_lora=facts["merged_lora"],
        trained_on=", ".join(f"`{name}`" for name in data.datasets or []) or local_dataset_name(facts["train_args"]),
        # the card's text says the same as the model-index: named data, the synthetic demo set, or unrecorded
        data_kind="named" if data.datasets else local_dataset_name(facts["train_args"]),
        settings="\n".join(
            f"| `{key}` | `{json.dumps(public_value(value))}` |" for key, value in sorted(train_args.items())
        ),
        metrics=metrics,
        results_table=results_table([(variant_name(config), metrics)]),
        has_speed=any(key.endswith("_per_second") for key in metrics),
        last_validation=last_validation,
        transformers_version=facts["transformers_version"],
        has_gemma=has_gemma,
    )


def index_card(pushed: list[tuple[str, dict]], has_gemma: bool):
    from huggingface_hub import ModelCard, ModelCardData

    data = ModelCardData(
        library_name="transformers",
        pipeline_tag="image-text-to-text",
        license="gemma" if has_gemma else "apache-2.0",
        tags=["remote-sensing", "image-captioning", "cnngemma"],
    )
    return ModelCard.from_template(
        data,
        template_path=str(TEMPLATES / "index_card.md"),
        links="\n".join(f"- [`{repo}`](https://huggingface.co/{repo})" for repo, _ in pushed),
        results_table=results_table(pushed),
    )


# ---------------------------------------------------------------------------------------------------- the push
def list_folder(folder: Path, prefix: str = "") -> None:
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        print(f"{path.stat().st_size:>14,}  {prefix}{path.relative_to(folder)}")


def new_empty_dir(path) -> tuple[Path, Path | None]:
    """The empty --dry_run folder, and the outermost folder this call created (None when it was there, empty)."""
    folder = Path(path)
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise PushError(f"--dry_run {path}: exists and is not empty. Pass a new or empty folder; nothing was written.")
    created = next((p for p in reversed([folder, *folder.parents]) if not p.exists()), None)
    folder.mkdir(parents=True, exist_ok=True)
    return folder, created


def take_back(folder: Path, created: Path | None) -> None:
    """Undoes a failed dry run: removes what this run created; a folder that was there (empty) is emptied again."""
    if created is not None:
        shutil.rmtree(created, ignore_errors=True)
        return
    for child in folder.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child, ignore_errors=True)
        else:
            child.unlink()


def contains(path: Path, needle: bytes, chunk_size: int | None = None) -> bool:
    """Whether the file holds `needle`, read in chunks (a shard can be 5 GB); each chunk starts with the previous
    one's last len(needle) - 1 bytes, so a needle that spans two chunks is found."""
    chunk_size = max(chunk_size or SCAN_CHUNK_SIZE, len(needle))
    tail = b""
    with open(path, "rb") as file:
        while chunk := file.read(chunk_size):
            window = tail + chunk
            if needle in window:
                return True
            tail = window[len(window) - len(needle) + 1 :] if len(needle) > 1 else b""
    return False


def upload(api, token, folder: Path, repo_id: str, args, message: str):
    # Last guard: nothing that is uploaded may contain the token (e.g. a config that recorded a `token=` kwarg).
    for path in sorted(folder.rglob("*")):
        if path.is_file() and contains(path, token.encode()):
            raise PushError(
                f"{path.relative_to(folder)} contains the Hub token; refusing to upload. Nothing was sent. Fix: "
                "remove the token from that file in the model folder (e.g. a saved `token=` argument) and rerun."
            )
    hub_call(f"create_repo {repo_id}", token, api.create_repo, repo_id, private=args.private, exist_ok=True)
    if args.revision:
        hub_call(
            f"create_branch {args.revision}", token, api.create_branch, repo_id, branch=args.revision, exist_ok=True
        )
    info = hub_call(
        f"upload to {repo_id}",
        token,
        api.upload_folder,
        repo_id=repo_id,
        folder_path=str(folder),
        revision=args.revision,
        commit_message=args.commit_message or message,
    )
    print(f"{repo_id}: {info.commit_url}")
    print(f"  AutoModelForImageTextToText.from_pretrained({repo_id!r}, revision={info.oid!r}, trust_remote_code=True)")
    return info


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
        raise PushError(
            f"--all {root}: no folder for {', '.join(missing)} (found: {present}). Expected one "
            f"train_hf.py output per variant named {', '.join(VARIANTS)}."
        )
    for variant, folder in found.items():
        config = json.loads((folder / "config.json").read_text()) if (folder / "config.json").is_file() else {}
        actual = variant_name(
            argparse.Namespace(
                vision_model_name=config.get("vision_model_name", ""), token_mode=config.get("token_mode")
            )
        )
        if actual != variant:
            raise PushError(
                f"--all: {folder} is named {variant} but its config.json is {actual} "
                f"({config.get('vision_model_name')}, token_mode={config.get('token_mode')}). Fix the "
                "folder names."
            )
    return found


def resolve_token(args):
    from huggingface_hub import get_token

    token = args.token or get_token()
    if not token:
        raise PushError("no Hub token: pass --token, set HF_TOKEN, or run `hf auth login`. Nothing was changed.")
    return token


def run(args, api=None, dry_root: Path | None = None) -> None:
    """Pushes (or, with `dry_root`, writes there) what the flags name."""
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    token = None
    if args.dry_run:
        api = None  # nothing is sent, whatever the caller passed
    else:
        if api is None:
            api = hub_api(args.token, fix=", or use --dry_run DIR")
        token = resolve_token(args)

    if args.dataset_dir:
        print(push_dataset(api, args.dataset_dir, args.dataset_repo_id, private=args.private, token=token))
    if args.model_dir:
        repo_id = args.repo_id or "your-namespace/" + Path(args.model_dir).resolve().name
        push_models(api, token, args, [(args.model_dir, repo_id, dry_root)])
    if args.all:
        variants = find_variants(args.all)
        namespace = args.namespace
        if namespace is None:
            namespace = "your-namespace" if args.dry_run else hub_call("whoami", token, api.whoami)["name"]
        jobs = [
            (
                folder,
                f"{namespace}/cnngemma-{variant.replace('_', '-')}",
                dry_root / f"cnngemma-{variant.replace('_', '-')}" if dry_root else None,
            )
            for variant, folder in variants.items()
        ]
        pushed = push_models(api, token, args, jobs)
        index_repo = args.index_repo_id or f"{namespace}/cnngemma"
        with tempfile.TemporaryDirectory(prefix="cnngemma-index-") as scratch:
            folder = dry_root / "index" if dry_root else Path(scratch)
            folder.mkdir(exist_ok=True)
            has_gemma = any(holds_gemma(facts["config"], facts["train_args"]) for _, facts in pushed)
            index_card([(repo, facts["metrics"]) for repo, facts in pushed], has_gemma).save(folder / "README.md")
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
                message = (
                    f"CNNGemma {variant_name(config)}: {config.vision_model_name}, {config.num_image_tokens} tokens"
                )
                upload(api, token, folder, repo_id, args, message)
        pushed.append((repo_id, facts))
    return pushed


def describe(error: Exception, args) -> str:
    """One line for any failure; an unexpected one names its type, and no line ever shows the token."""
    if isinstance(error, PushError):
        return str(error)
    from huggingface_hub import get_token

    message = (str(error).strip().splitlines() or [""])[0]
    for secret in {args.token, get_token()} - {None, ""}:
        message = message.replace(secret, "***")
    done = "Nothing was sent" if args.dry_run else "Stopped here; any repository listed above was pushed"
    return (
        f"unexpected {type(error).__name__}: {message}. {done}. Fix: check that each folder passed (--model_dir, "
        "--all, --dataset_dir) is a complete train_hf.py or dataset_builder output."
    )


def main(argv=None, api=None) -> int:
    args = parse_args(argv)
    dry_root = created = None
    try:
        if args.dry_run:
            dry_root, created = new_empty_dir(args.dry_run)
        run(args, api=api, dry_root=dry_root)
    except BaseException as error:
        if dry_root is not None:  # any failure, expected or not, leaves no half-written dry-run folder behind
            take_back(dry_root, created)
        if not isinstance(error, Exception):
            raise  # Ctrl-C and sys.exit keep their meaning
        print(f"push_to_hub.py: error: {describe(error, args)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
