"""Push a `train_hf.py` output folder to the Hugging Face Hub as a self-contained remote-code model with a model card.

`--dry_run DIR` writes exactly the folder that would be uploaded; `--all DIR` pushes the four variants and an index.
"""

import argparse
import contextlib
import errno
import json
import math
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cnngemma import adapters, saving
from cnngemma.backbones import notice_files
from cnngemma.errors import RunError, first_line, path_type
from dataset_builder.push import PushError, hub_api, hub_call, push_dataset, repo_id_problem

VARIANTS = ("mobilenet_single", "mobilenet_multi", "efficientnet_single", "efficientnet_multi")
TEMPLATES = Path(__file__).resolve().parent / "templates"
SECRET_KEY = re.compile(r"token|secret|password|api_key", re.IGNORECASE)
NOTICE_NAMES = ("NOTICE.md", "GEMMA_TERMS.html")
SCAN_CHUNK_SIZE = 1 << 24  # the token scan reads 16 MiB at a time: shards can be 5 GB


def shard_size(text: str) -> int | str:
    """An argparse `type` for --max_shard_size: what save_pretrained accepts (bytes, or digits and KB/MB/GB/TB)."""
    from huggingface_hub.serialization._base import parse_size_to_int

    expected = "expected a size such as 5GB, 500MB or a number of bytes (units: KB, MB, GB, TB)"
    try:
        size = int(text) if text.strip().isdigit() else parse_size_to_int(text)
    except (ValueError, OverflowError):
        raise argparse.ArgumentTypeError(f"got {text!r}, {expected}") from None
    if size < 1:
        raise argparse.ArgumentTypeError(f"got {text!r}, {expected}, above 0")
    return size if text.strip().isdigit() else text.strip()


def text_type(expected: str):
    """An argparse `type` that refuses an empty or blank value (an unset shell variable) instead of ignoring it."""

    def check(text: str) -> str:
        if not text.strip():
            raise argparse.ArgumentTypeError(
                f"got an empty value, expected {expected}. Pass one or leave the flag out (an unset shell variable "
                "gives an empty value)"
            )
        return text

    return check


class Parser(argparse.ArgumentParser):
    """argparse whose errors are one line (`push_to_hub.py: error: ...`, exit status 2), without the usage block."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def parse_args(argv=None):
    parser = Parser(prog="push_to_hub.py", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model_dir", type=path_type, help="A train_hf.py output folder (save_pretrained files + metrics.json)."
    )
    parser.add_argument("--repo_id", help="The Hub model repository to push to, e.g. user/cnngemma-mobilenet-single.")
    parser.add_argument(
        "--all",
        metavar="DIR",
        type=path_type,
        help="Push the four variant folders in DIR (mobilenet_single, mobilenet_multi, efficientnet_single, "
        "efficientnet_multi) to {namespace}/cnngemma-{encoder}-{tokens}, plus an index README repository.",
    )
    parser.add_argument("--namespace", help="User or organisation for --all; required unless --dry_run.")
    parser.add_argument("--index_repo_id", help="Repository of the --all index README (default {namespace}/cnngemma).")
    parser.add_argument("--dataset_dir", type=path_type, help="A dataset_builder output folder to push with its card.")
    parser.add_argument("--dataset_repo_id", help="The Hub dataset repository for --dataset_dir.")
    parser.add_argument("--private", action="store_true", help="Create new repositories as private.")
    parser.add_argument(
        "--revision", type=text_type("a branch name"), help="The branch to commit to (created from main when missing)."
    )
    parser.add_argument(
        "--commit_message",
        type=text_type("a commit message"),
        help="The commit message (default: a summary of the variant).",
    )
    parser.add_argument(
        "--merge_lora",
        action="store_true",
        help="The folder holds a peft LoRA adapter: merge it into its base model and upload full weights.",
    )
    parser.add_argument(
        "--base_model_dir",
        type=path_type,
        help="With --merge_lora: the base model folder, when the adapter folder holds no full weights and "
        "adapter_config.json's base_model_name_or_path is not a local folder.",
    )
    parser.add_argument(
        "--dry_run",
        metavar="DIR",
        type=path_type,
        help="Write the folder(s) that would be uploaded to DIR (must not exist or be empty), list them, send nothing.",
    )
    parser.add_argument(
        "--token",
        type=text_type("a Hub token"),
        help="A Hub token with write access (default: HF_TOKEN or the `hf auth login` one).",
    )
    parser.add_argument(
        "--max_shard_size",
        type=shard_size,
        default="5GB",
        help="Weights are split into safetensors shards above this: bytes, or e.g. 5GB, 500MB.",
    )
    parser.add_argument(
        "--license",
        type=text_type("a license id"),
        help="License id for the card (default: gemma with Gemma weights, else apache-2.0).",
    )
    parser.add_argument("--base_model", action="append", help="Hub id of a base model for the card; repeatable.")
    parser.add_argument("--datasets", action="append", help="Hub id of a training dataset for the card; repeatable.")
    args = parser.parse_args(argv)
    for flag in ("repo_id", "dataset_repo_id", "index_repo_id", "namespace"):
        if (value := getattr(args, flag)) is not None and (problem := repo_id_problem(value, flag != "namespace")):
            example = "user-or-org" if flag == "namespace" else "user/cnngemma-mobilenet-single"
            parser.error(f"--{flag} {value!r}: {problem} Expected e.g. --{flag} {example}.")
    for flag, example in (("base_model", "google/gemma-3-270m"), ("datasets", "user/riscm-captions")):
        for value in getattr(args, flag) or []:
            if problem := repo_id_problem(value):
                parser.error(f"--{flag} {value!r}: {problem} Expected a Hub id, e.g. --{flag} {example}.")
    # `is not None` throughout: an empty value is refused above, and must never count as "not given".
    model, everything, dataset = (args.model_dir is not None, args.all is not None, args.dataset_dir is not None)
    dry = args.dry_run is not None
    if not (model or everything or dataset):
        parser.error("nothing to push: pass --model_dir with --repo_id, --all DIR, or --dataset_dir.")
    if model and everything:
        parser.error("--model_dir and --all exclude each other: --all pushes the four variant folders itself.")
    if model and args.repo_id is None and not dry:
        parser.error("--model_dir needs --repo_id, e.g. --repo_id user/cnngemma-mobilenet-single.")
    if everything and args.namespace is None and not dry:
        parser.error("--all needs --namespace (the user or organisation to push to), e.g. --namespace user-or-org.")
    if dataset and args.dataset_repo_id is None:
        parser.error("--dataset_dir needs --dataset_repo_id, e.g. --dataset_repo_id user/riscm-captions.")
    for flag, needs, given in (
        ("repo_id", "--model_dir", model),
        ("namespace", "--all", everything),
        ("index_repo_id", "--all", everything),
        ("dataset_repo_id", "--dataset_dir", dataset),
        ("base_model_dir", "--merge_lora", args.merge_lora),
    ):
        if getattr(args, flag) is not None and not given:
            parser.error(f"--{flag} is only read with {needs}, which was not given. Add {needs} or drop --{flag}.")
    if dry:
        target = Path(args.dry_run).resolve()
        for flag in ("model_dir", "all", "dataset_dir", "base_model_dir"):
            if (source := getattr(args, flag)) is not None and Path(source).resolve() in (target, *target.parents):
                parser.error(
                    f"--dry_run {args.dry_run} is inside --{flag} {source}; expected a folder outside it (the dry run "
                    "would add files to the folder it reads). Pass another --dry_run."
                )
    return args


# ---------------------------------------------------------------------------------------------------- the folder
@dataclass
class Job:
    """One model to upload, with what was read and checked before anything is written or sent."""

    model_dir: Path
    repo_id: str
    dry_folder: Path | None
    metrics: dict
    train_args: dict
    merge_into: Path | None  # with --merge_lora: the folder whose weights the adapter is merged into


class WriteFailed(RunError):
    """Writing the upload folder failed (disk full, file-size limit, quota, permissions): one line saying so."""

    def __init__(self, folder: Path, code: int | None, reason: str, dry: bool):
        super().__init__(reason)
        self.folder, self.code, self.reason, self.dry = folder, code, reason, dry
        self.cleanup = "the folder was removed"  # main() and push_models() say what clean-up really did

    def __str__(self) -> str:
        fix = {
            errno.ENOSPC: "free space on that disk",
            errno.EDQUOT: "free space within your disk quota",
            errno.EFBIG: "raise the file-size limit (ulimit -f) or pass a smaller --max_shard_size",
        }.get(self.code, "check that the folder can be written")
        if self.dry:
            elsewhere = (
                " or pass a --dry_run folder on another disk" if self.code in (errno.ENOSPC, errno.EDQUOT) else ""
            )
            return (
                f"writing the dry-run folder {self.folder} failed: {self.reason} (errno {self.code}). Nothing was sent; "
                f"{self.cleanup}. Fix: {fix}{elsewhere}, and run again."
            )
        return (
            f"writing the temporary upload folder {self.folder} failed: {self.reason} (errno {self.code}). Nothing was "
            f"sent for this model (repositories listed above, if any, were pushed); {self.cleanup}. Fix: {fix}, or "
            "set TMPDIR to a folder on a disk with room, and run again."
        )


@contextlib.contextmanager
def writing(folder: Path, dry: bool):
    """A failed write into the upload folder becomes a WriteFailed line instead of a traceback."""
    from safetensors import SafetensorError

    try:
        yield
    except OSError as error:
        raise WriteFailed(folder, error.errno, error.strerror or first_line(error), dry) from error
    except SafetensorError as error:  # safetensors writes from Rust and puts the OS error into its message
        found = re.search(r"\(os error (\d+)\)", str(error))  # "I/O error: File too large (os error 27)"
        if found is None:
            raise
        code = int(found.group(1))
        raise WriteFailed(folder, code, os.strerror(code), dry) from error


def check_local_dir(path, flag: str, required: tuple[str, ...] = ()) -> Path:
    """A missing local folder would be taken for a Hub id by from_pretrained: fail here and say so."""
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise PushError(f"{flag} {path}: a file, not a folder. Expected a local folder; check the path.")
    if not folder.is_dir():
        raise PushError(f"{flag} {path}: no such folder. Expected a local folder; check the path.")
    missing = [name for name in required if not (folder / name).exists()]
    if missing:
        raise PushError(f"{flag} {path}: missing {', '.join(missing)}. Expected a train_hf.py output folder.")
    return folder


def read_json(path: Path, expected: str, fix: str):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise PushError(
            f"{path}: cannot be read as JSON ({type(error).__name__}: {first_line(error)}). Expected {expected}. "
            f"Fix: {fix}; nothing was sent."
        ) from None


def merge_base(model_dir: Path, merge_lora: bool, base_model_dir: str | None) -> Path | None:
    """Checks the folder's weights against --merge_lora without loading them: None for a full model, else the folder
    whose weights the adapter is merged into."""
    has_weights = any((model_dir / name).exists() for name in ("model.safetensors", "model.safetensors.index.json"))
    if not (model_dir / "adapter_config.json").exists():
        if merge_lora:
            raise PushError(f"--merge_lora: {model_dir} holds no adapter_config.json; drop --merge_lora.")
        if not has_weights or not (model_dir / "config.json").is_file():
            raise PushError(
                f"--model_dir {model_dir}: no config.json + model.safetensors. Expected a train_hf.py output folder."
            )
        return None
    if not merge_lora:
        raise PushError(
            f"--model_dir {model_dir} holds a LoRA adapter (adapter_config.json), which AutoModelForImageTextToText "
            "cannot load alone. Pass --merge_lora to upload the merged full weights."
        )
    if adapters.is_adapter_folder(model_dir):  # it names its base (cnngemma.adapters)
        record = read_json(model_dir / adapters.ADAPTER_FILE, "train_hf.py's adapter record", "save it again")
        if isinstance(record, dict) and record.get("load_in_4bit"):
            raise PushError(
                f"--merge_lora: {model_dir} trained on a 4-bit base, so its scores are the 4-bit model's and the "
                "merged weights would score otherwise. Merge it (python -m cnngemma.adapters merge DIR OUT), score OUT "
                "(python -m metrics.evaluation --model OUT --output_dir EVAL), copy EVAL/metrics.json into OUT and "
                "push OUT; nothing was sent."
            )
        return model_dir
    if has_weights:
        return model_dir
    if base_model_dir is not None:
        return check_local_dir(base_model_dir, "--base_model_dir")
    adapter = read_json(model_dir / "adapter_config.json", "peft's adapter_config.json", "save the adapter again")
    named = (adapter.get("base_model_name_or_path") if isinstance(adapter, dict) else None) or ""
    if not isinstance(named, str) or not named or not Path(named).is_dir():
        raise PushError(
            f"--merge_lora: {model_dir} has no full weights and its adapter's base_model_name_or_path "
            f"{named!r} is not a local folder. Pass --base_model_dir with the base model's save_pretrained folder."
        )
    return check_local_dir(named, "base model")


def load_weights(folder: Path, flag: str):
    """The model in `folder`; a folder that cannot load, or lacks tensors that would be uploaded as random values,
    is refused in one line."""
    from safetensors import SafetensorError
    from transformers.utils import logging as transformers_logging

    from modeling_cnngemma import CNNGemmaForConditionalGeneration

    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()  # the load report table would precede our one line
    try:
        model, info = CNNGemmaForConditionalGeneration.from_pretrained(folder, dtype="auto", output_loading_info=True)
    except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as error:
        raise PushError(
            f"{flag} {folder}: cannot load the model ({type(error).__name__}: {first_line(error)}). Expected the "
            "complete save_pretrained files of a train_hf.py run; nothing was sent. Fix: copy or save the folder again."
        ) from None
    finally:
        transformers_logging.set_verbosity(verbosity)
    if missing := sorted(info["missing_keys"]):
        raise PushError(
            f"{flag} {folder}: the weights lack {len(missing)} tensor(s) the model needs ({', '.join(missing[:3])}"
            f"{', ...' if len(missing) > 3 else ''}); they would be uploaded as random values. Nothing was sent. "
            "Fix: copy or save the folder again."
        )
    return model


def load_model(job: Job):
    """The model of a job, with its LoRA adapter merged into the base weights when --merge_lora names one."""
    if job.merge_into is None:
        return load_weights(job.model_dir, "--model_dir").eval()
    if adapters.is_adapter_folder(job.model_dir):  # rebuilt on its base in full precision, and merged
        return adapters.load_adapter(job.model_dir, load_in_4bit=False, flag="--model_dir")[0]
    from peft import PeftModel

    base = load_weights(job.merge_into, "base model")
    try:
        return PeftModel.from_pretrained(base, job.model_dir).merge_and_unload().eval()
    except (OSError, ValueError, KeyError, RuntimeError) as error:
        raise PushError(
            f"--merge_lora: the adapter in {job.model_dir} does not fit the base model {job.merge_into} "
            f"({type(error).__name__}: {first_line(error)}). Nothing was sent. Fix: pass the base model it was "
            "trained from with --base_model_dir."
        ) from None


def load_processor(model_dir: Path):
    """The processor, built with this repo's classes: `from_pretrained` would import the folder's remote code."""
    from transformers import AutoTokenizer
    from transformers.models.auto.tokenization_auto import tokenizer_class_from_name

    from modeling_cnngemma import CNNGemmaImageProcessor, CNNGemmaProcessor

    fix = "copy or save the folder again"
    saved = read_json(model_dir / "processor_config.json", "the processor_config.json train_hf.py saves", fix)
    tokenizer_config = read_json(model_dir / "tokenizer_config.json", "a tokenizer_config.json", fix)
    try:
        image_processor = CNNGemmaImageProcessor.from_dict(saved["image_processor"])
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
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise PushError(
            f"--model_dir {model_dir}: cannot load the processor and tokenizer ({type(error).__name__}: "
            f"{first_line(error)}). Expected the processor files train_hf.py saves; nothing was sent. Fix: {fix}."
        ) from None


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


def finite_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def read_metrics(model_dir: Path) -> dict:
    """metrics.json, refused unless every score the card shows is a finite number: a card never publishes NaN."""
    from metrics.caption_metrics import METRIC_KEYS

    path = model_dir / "metrics.json"
    if not path.is_file():
        raise PushError(f"--model_dir {model_dir}: no metrics.json. Expected the test evaluation train_hf.py writes.")
    rerun = (
        f"re-run the evaluation (python -m metrics.evaluation --model {model_dir}) and use the metrics.json it writes"
    )
    metrics = read_json(path, "train_hf.py's metrics.json", rerun)
    if not isinstance(metrics, dict):
        raise PushError(f"{path}: expected a JSON object of scores, got {type(metrics).__name__}. Fix: {rerun}.")
    missing = [key for key in METRIC_KEYS if not isinstance(metrics.get(key), (int, float))]
    if missing:
        raise PushError(f"{path}: no numeric {', '.join(missing)}. Expected train_hf.py's metrics.json format.")
    shown = {key: metrics[key] for key in METRIC_KEYS}
    shown.update({key: value for key, value in metrics.items() if key.endswith("_per_second")})
    history = metrics.get("history")
    if isinstance(history, list) and history and isinstance(history[-1], dict) and "cider" in history[-1]:
        shown["history[-1].cider"] = history[-1]["cider"]
    if bad := [f"{key} is {value!r}" for key, value in shown.items() if not finite_number(value)]:
        raise PushError(
            f"{path}: {', '.join(bad)}; expected finite numbers (a card never publishes NaN or infinite scores). "
            f"Nothing was written. Fix: {rerun}."
        )
    return metrics


def read_train_args(model_dir: Path) -> dict:
    """The flags train_hf.py ran with (train_args.json), if written; secrets are dropped, never shown."""
    path = model_dir / "train_args.json"
    if not path.is_file():
        return {}
    data = read_json(path, "a JSON object of train_hf.py's flags", "fix or delete it (the card then lists no flags)")
    if not isinstance(data, dict):
        raise PushError(f"{path}: expected a JSON object of flags, got {type(data).__name__}. Fix or delete it.")
    return {key: value for key, value in data.items() if not SECRET_KEY.search(key)}


def plan(args) -> list[Job]:
    """Reads and checks every folder the flags name before anything is written or sent: a bad metrics.json in the
    third --all variant stops the push before the first upload."""
    dry = Path(args.dry_run) if args.dry_run is not None else None
    if args.dataset_dir is not None:
        check_local_dir(args.dataset_dir, "--dataset_dir")
    if args.model_dir is not None:
        repo_id = args.repo_id or "your-namespace/" + Path(args.model_dir).resolve().name
        targets = [(args.model_dir, repo_id, dry)]
    elif args.all is not None:
        namespace = args.namespace or "your-namespace"
        targets = []
        for variant, folder in find_variants(args.all).items():
            slug = variant.replace("_", "-")
            targets.append((folder, f"{namespace}/cnngemma-{slug}", dry / f"cnngemma-{slug}" if dry else None))
    else:
        targets = []
    jobs = []
    for model_dir, repo_id, dry_folder in targets:
        folder = check_local_dir(model_dir, "--model_dir", ("processor_config.json", "tokenizer_config.json"))
        metrics, train_args = read_metrics(folder), read_train_args(folder)
        base = merge_base(folder, args.merge_lora, args.base_model_dir)
        jobs.append(Job(folder, repo_id, dry_folder, metrics, train_args, base))
    return jobs


def prepare_folder(job: Job, out: Path, args) -> dict:
    """Writes the upload folder for one model into `out` (an empty folder); returns the card's facts."""
    from transformers import __version__ as transformers_version

    model = load_model(job)
    processor = load_processor(job.model_dir)
    facts = {
        "repo_id": job.repo_id,
        "config": model.config,
        "metrics": job.metrics,
        "train_args": job.train_args,
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "transformers_version": transformers_version,
        "merged_lora": args.merge_lora,
    }
    card = model_card(facts, args)
    dry = args.dry_run is not None
    # Re-saving through this repo's classes writes its remote-code files and local auto_map entries.
    with writing(Path(args.dry_run) if dry else out, dry):
        model.save_pretrained(out, max_shard_size=args.max_shard_size)
        processor.save_pretrained(out)
        saving.stamp(out, saving.new_save_id())  # one save: readers of the folder check the ids
        # the licence files the decoder's weights come with (Gemma's NOTICE and terms), as train_hf.py saved them
        shipped = [job.model_dir / name for name in NOTICE_NAMES if (job.model_dir / name).is_file()]
        for path in shipped or notice_files(model.config):
            shutil.copyfile(path, out / path.name)
    check_auto_maps(out)
    with writing(Path(args.dry_run) if dry else out, dry):
        shutil.copyfile(job.model_dir / "metrics.json", out / "metrics.json")
        card.save(out / "README.md")
    return facts


# ---------------------------------------------------------------------------------------------------- the card
# The train_hf.py flags a card publishes: those that say how the model was trained, each only with the type that
# train_hf.py gives it. Data and output paths, trackers, logging, tokens and unknown keys stay off the card.
CARD_NUMBERS = (
    "learning_rate",
    "vision_lr",
    "projector_lr",
    "language_model_lr",
    "weight_decay",
    "warmup_steps",
    "batch_size",
    "gradient_accumulation_steps",
    "num_epochs",
    "max_steps",
    "max_caption_tokens",
    "seed",
    "lora_r",
    "num_beams",
    "max_new_tokens",
)
CARD_LORA_NUMBERS = ("lora_alpha", "lora_dropout")  # shown with lora_r > 0, like lora_target_modules
CARD_SWITCHES = ("freeze_vision", "train_language_model", "gradient_checkpointing", "augment")
CARD_SOURCES = ("model", "language_model", "vision_pretrained")  # a Hub id, 'imagenet' or a local path (last part)
MIXED_PRECISION = ("no", "fp16", "bf16")
# Strings that look like credentials (Hub, OpenAI-style, GitHub, AWS): never published, whichever key holds them.
TOKEN_LIKE = re.compile(
    r"hf_[A-Za-z0-9]{16,}|api_org_[A-Za-z0-9]{16,}|sk-[A-Za-z0-9_-]{8,}|gh[opsu]_\w{20,}|AKIA[A-Z0-9]{16}"
)
# RISCM's caption sources as its table names them (dataset_builder keeps them in stats.json), and as cards name them.
RISCM_SOURCES = {"RSICD": "RSICD", "UCM": "UCM-Captions", "NWPU": "NWPU-Captions"}


def card_flags(train_args: dict) -> dict:
    """The allow-listed flags of train_args.json that the card's settings table shows."""
    lora = finite_number(train_args.get("lora_r")) and train_args["lora_r"] > 0
    shown = {}
    for key, value in train_args.items():
        if key in CARD_NUMBERS or (lora and key in CARD_LORA_NUMBERS):
            keep = finite_number(value)
        elif key in CARD_SWITCHES:
            keep = isinstance(value, bool)
        elif key == "mixed_precision":
            keep = value in MIXED_PRECISION
        elif key in CARD_SOURCES or (lora and key == "lora_target_modules"):
            keep = isinstance(value, str) and bool(value.strip()) and not TOKEN_LIKE.search(value)
        elif key == "synth_images":  # the demo set's size, only when the run trained on it
            keep = finite_number(value) and train_args.get("dataset") is None
        else:
            keep = False
        if keep:
            shown[key] = public_value(value) if key in CARD_SOURCES else value
    return shown


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


def holds_gemma(config, train_args: dict) -> bool:
    """Gemma weights are inside when training started from a language model or the decoder has Gemma's vocabulary."""
    from modeling_cnngemma.configuration_cnngemma import PALIGEMMA_VOCAB_SIZE

    pretrained_decoder = "language_model" in (getattr(config, "provenance", None) or {})  # recorded by from_backbones
    return (
        pretrained_decoder
        or bool(train_args.get("language_model"))
        or config.text_config.vocab_size == PALIGEMMA_VOCAB_SIZE
    )


def variant_name(config) -> str:
    """The encoder family (mobilenet, efficientnet, else timm's model name) and token mode: the --all folder names."""
    name = config.vision_model_name
    family = "efficientnet" if "efficientnet" in name else "mobilenet" if "mobilenet" in name else name
    mode = f"grid{config.token_grid}" if config.token_mode == "grid" else config.token_mode
    return f"{family}_{mode}"


def token_description(config) -> str:
    if config.token_mode == "single":
        return "1 image token (the globally pooled final feature map)"
    rows, columns = config.vision_grid
    if config.token_mode == "grid":
        side = config.token_grid
        return (
            f"{config.num_image_tokens} image tokens (the {rows}x{columns} final feature map pooled to a "
            f"{side}x{side} grid)"
        )
    return f"{config.num_image_tokens} image tokens (every position of the {rows}x{columns} final feature map)"


def hub_ids(values) -> list[str]:
    """The Hub ids among `values`; local paths (which would mean nothing on the Hub) are left out."""
    return [
        v
        for v in values
        if isinstance(v, str) and not repo_id_problem(v) and not os.path.exists(v) and not TOKEN_LIKE.search(v)
    ]


def joined(names: list[str]) -> str:
    return " and ".join(names) if len(names) < 3 else f"{', '.join(names[:-1])} and {names[-1]}"


@dataclass
class TrainingData:
    """What a card says its scores were measured on."""

    name: str  # the model-index dataset name, e.g. "me/riscm", "local dataset riscm", "synthetic demo set"
    kind: str  # "riscm", "synthetic", "other" or "unrecorded": which sentence the card uses
    hub_ids: list[str]
    sources: str = ""  # the caption sources the card names, e.g. "RSICD, UCM-Captions and NWPU-Captions"
    trained_on: str = ""  # the card's words for it


def folder_sources(folder: Path) -> tuple[str, str]:
    """(kind, sources) of a local dataset_builder folder from the caption sources its stats.json counts; when that
    cannot be read here (the folder is on another machine), from its name: RISCM only when the name says riscm."""
    try:
        stats = json.loads((folder / "stats.json").read_text(encoding="utf-8"))
        found = {str(row["source"]).strip() for row in stats["counts"]}
    except (OSError, ValueError, KeyError, TypeError):
        found = set()
    if not found:
        return ("riscm", joined(list(RISCM_SOURCES.values()))) if "riscm" in folder.name.lower() else ("other", "")
    if {source.upper() for source in found} <= set(RISCM_SOURCES):
        return "riscm", joined([name for key, name in RISCM_SOURCES.items() if key in {s.upper() for s in found}])
    if {source.upper() for source in found} == {"SYNTH"}:
        return "synthetic", ""
    return "other", joined(sorted(source for source in found if not TOKEN_LIKE.search(source)))


def training_data(train_args: dict, args) -> TrainingData:
    """What the scores were measured on; RISCM (and its sources) only when the record says so:

    - Hub ids (--datasets, else a Hub id recorded as train_hf.py's --dataset): RISCM when an id's name holds "riscm";
    - a local dataset_builder folder: by the sources its stats.json counts (RSICD/UCM/NWPU: RISCM, naming those
      present; SYNTH: the synthetic demo set; others: named as found), or by its name when it is not on this machine;
    - train_hf.py's default (no --dataset, synth_images set): the synthetic demo set; nothing recorded: unrecorded.
    """
    recorded = train_args.get("dataset")
    ids = list(args.datasets or [])
    if not ids and isinstance(recorded, str):
        ids = hub_ids([recorded])
    if ids:
        riscm = any("riscm" in value.split("/")[-1].lower() for value in ids)
        names = ", ".join(f"`{value}`" for value in ids)
        return TrainingData(
            ids[0], "riscm" if riscm else "other", ids, joined(list(RISCM_SOURCES.values())) if riscm else "", names
        )
    if isinstance(recorded, str) and recorded.strip():
        folder = Path(os.path.expanduser(recorded))
        if TOKEN_LIKE.search(recorded):
            return TrainingData("local dataset", "other", [], "", "a local dataset (its recorded name is not shown)")
        kind, sources = folder_sources(folder)
        # --dataset_dir pushes this very folder: the card can name it by its Hub id
        same = args.dataset_dir is not None and Path(args.dataset_dir).resolve() == folder.resolve()
        ids = [args.dataset_repo_id] if same else []
        name = ids[0] if ids else f"local dataset {folder.name}"
        words = f"`{ids[0]}`" if ids else f"local dataset `{folder.name}`"
        if kind == "synthetic":
            words += ", built by `dataset_builder` from the synthetic demo set"
        return TrainingData(name, kind, ids, sources, words)
    if train_args.get("synth_images"):
        return TrainingData("synthetic demo set", "synthetic", [], "", "the synthetic demo set")
    return TrainingData("unrecorded dataset", "unrecorded", [], "", "an unrecorded dataset")


def card_data(facts: dict, args):
    """The card's metadata (`ModelCardData`, with the scores as model-index results), the training data and whether
    Gemma is inside."""
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
    data = training_data(train_args, args)
    split = str(metrics.get("split", "test"))
    results = [
        EvalResult(
            task_type="image-to-text",
            task_name="Image captioning",
            dataset_type=data.name,
            dataset_name=f"{data.name} ({split})",
            dataset_split=split,
            metric_type=key.split("_")[0],  # bleu_1 -> bleu, rouge_l -> rouge: the Hub's metric ids
            metric_name=METRIC_NAMES[key],
            metric_value=round(float(metrics[key]), 4),
        )
        for key in METRIC_KEYS
    ]
    card = ModelCardData(
        library_name="transformers",
        pipeline_tag="image-text-to-text",
        license=args.license or ("gemma" if has_gemma else "apache-2.0"),
        base_model=base_models or None,
        datasets=data.hub_ids or None,
        tags=["remote-sensing", "image-captioning", "cnngemma", "custom_code"],
        language=["en"],
        model_name=facts["repo_id"].split("/")[-1],
        eval_results=results,
    )
    return card, data, has_gemma


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

    card, data, has_gemma = card_data(facts, args)
    config, metrics, train_args = facts["config"], facts["metrics"], facts["train_args"]
    history = metrics.get("history") or []
    last_validation = None
    if isinstance(history, list) and history and isinstance(history[-1], dict):
        last = history[-1]
        cider = last.get("cider")  # read_metrics refused a non-finite one
        last_validation = {"runs": len(history), "step": last.get("step", "?"), "cider": cider}
    return ModelCard.from_template(
        card,
        template_path=str(TEMPLATES / "model_card.md"),
        model_name=card.model_name,
        repo_id=facts["repo_id"],
        variant=variant_name(config),
        config=config,
        text=config.text_config,
        tokens=token_description(config),
        vocab_size=f"{config.text_config.vocab_size:,}",
        num_parameters=f"{facts['num_parameters']:,}",
        merged_lora=facts["merged_lora"],
        data=data,
        settings="\n".join(
            f"| `{key}` | `{json.dumps(value)}` |" for key, value in sorted(card_flags(train_args).items())
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
        links="\n".join(
            f"- [`{repo}`](https://huggingface.co/{repo}): encoder `{facts['config'].vision_model_name}`, "
            f"{token_description(facts['config'])}"
            for repo, facts in pushed
        ),
        results_table=results_table([(repo, facts["metrics"]) for repo, facts in pushed]),
    )


# ---------------------------------------------------------------------------------------------------- the push
def list_folder(folder: Path, prefix: str = "") -> None:
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        print(f"{path.stat().st_size:>14,}  {prefix}{path.relative_to(folder)}")


def new_empty_dir(path) -> tuple[Path, Path | None]:
    """The empty --dry_run folder, and the outermost folder this call created (None when it was there, empty)."""
    folder = Path(path)
    try:
        if folder.exists() and not folder.is_dir():
            raise PushError(
                f"--dry_run {path}: a file, not a folder. Pass a new or empty folder; nothing was written."
            )
        if folder.exists() and any(folder.iterdir()):
            raise PushError(
                f"--dry_run {path}: exists and is not empty. Pass a new or empty folder; nothing was written."
            )
        above = next(p for p in folder.parents if p.exists())  # "." always exists
        if not above.is_dir():
            raise PushError(
                f"--dry_run {path}: {above} is a file, so no folder can be made inside it. Pass a path whose parents "
                "are folders (or new); nothing was written."
            )
    except OSError as error:
        raise PushError(f"--dry_run {path}: cannot be read ({error.strerror}). Pass another folder.") from None
    created = next((p for p in reversed([folder, *folder.parents]) if not p.exists()), None)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)
        raise PushError(
            f"--dry_run {path}: cannot be created ({error.strerror}). Pass a folder you can write; nothing was written."
        ) from None
    return folder, created


def take_back(folder: Path, created: Path | None) -> str:
    """Undoes a failed dry run: removes what this run created; a folder that was there (empty) is emptied again.
    Returns what happened, for the error line."""
    if created is not None:
        shutil.rmtree(created, ignore_errors=True)
        return (
            f"{created} could not be removed completely: delete it by hand"
            if created.exists()
            else ("the folder was removed")
        )
    for child in folder.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child, ignore_errors=True)
        else:
            child.unlink(missing_ok=True)
    return (
        f"{folder} could not be emptied: delete its files by hand"
        if any(folder.iterdir())
        else ("the folder was emptied again")
    )


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
    if args.revision is not None:
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
        path = folder / "config.json"
        config = (
            read_json(path, "a train_hf.py config.json", "copy or save the folder again") if path.is_file() else {}
        )
        config = config if isinstance(config, dict) else {}
        actual = variant_name(
            argparse.Namespace(
                vision_model_name=str(config.get("vision_model_name", "")),
                token_mode=config.get("token_mode"),
                token_grid=config.get("token_grid"),
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


def dataset_summary(api, args, token) -> str:
    """Pushes (api=None: describes) --dataset_dir; a folder that cannot be read is refused in one line."""
    try:
        return push_dataset(api, args.dataset_dir, args.dataset_repo_id, private=args.private, token=token)
    except (OSError, ValueError) as error:  # Hub failures arrive as PushError; pyarrow's ArrowInvalid is a ValueError
        raise PushError(
            f"--dataset_dir {args.dataset_dir}: cannot read the dataset ({type(error).__name__}: {first_line(error)}"
            "). Expected a complete `python -m dataset_builder build` output; nothing was sent. Fix: build it again."
        ) from None


def run(args, jobs: list[Job], api=None, dry_root: Path | None = None) -> None:
    """Pushes (or, with `dry_root`, writes there) what the flags name. Only a run without --dry_run, with an
    explicit target (--repo_id, --namespace, --dataset_repo_id), ever reaches the Hub."""
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    token = None
    if args.dry_run is not None:
        api = None  # nothing is sent, whatever the caller passed
    else:
        if api is None:
            api = hub_api(args.token, fix=", or use --dry_run DIR")
        token = resolve_token(args)

    if args.dataset_dir is not None:
        print(dataset_summary(api, args, token))
    pushed = push_models(api, token, args, jobs)
    if args.all is not None:
        index_repo = args.index_repo_id or f"{args.namespace or 'your-namespace'}/cnngemma"
        with tempfile.TemporaryDirectory(prefix="cnngemma-index-", ignore_cleanup_errors=True) as scratch:
            folder = dry_root / "index" if dry_root else Path(scratch)
            has_gemma = any(holds_gemma(facts["config"], facts["train_args"]) for _, facts in pushed)
            card = index_card(pushed, has_gemma)
            with writing(dry_root if dry_root else folder, dry_root is not None):
                folder.mkdir(exist_ok=True)
                card.save(folder / "README.md")
            if dry_root:
                list_folder(folder, "index/")
            else:
                upload(api, token, folder, index_repo, args, "CNNGemma variants index")


def push_models(api, token, args, jobs: list[Job]) -> list[tuple[str, dict]]:
    pushed = []
    for job in jobs:
        scratch = None
        try:
            with tempfile.TemporaryDirectory(prefix="cnngemma-push-", ignore_cleanup_errors=True) as scratch:
                folder = job.dry_folder or Path(scratch)
                with writing(Path(args.dry_run) if job.dry_folder else folder, job.dry_folder is not None):
                    folder.mkdir(parents=True, exist_ok=True)
                facts = prepare_folder(job, folder, args)
                print(f"{job.repo_id} <- {job.model_dir}")
                list_folder(
                    folder, f"{folder.name}/" if job.dry_folder and job.dry_folder != Path(args.dry_run) else ""
                )
                if not job.dry_folder:
                    config = facts["config"]
                    message = f"CNNGemma {variant_name(config)}: {config.vision_model_name}, {config.num_image_tokens} tokens"
                    upload(api, token, folder, job.repo_id, args, message)
        except WriteFailed as error:
            if not error.dry and scratch is not None and Path(scratch).exists():
                error.cleanup = f"{scratch} could not be removed completely: delete it by hand"
            raise
        pushed.append((job.repo_id, facts))
    return pushed


def describe(error: Exception, args) -> str:
    """One line for any failure. Every input problem known is a PushError/RunError with its own line; anything
    else is a bug here, and the line says so. No line ever shows the token."""
    if isinstance(error, (PushError, RunError)):
        return str(error)
    from huggingface_hub import get_token

    message = first_line(error)
    for secret in {args.token, get_token()} - {None, ""}:
        message = message.replace(secret, "***")
    done = "Nothing was sent" if args.dry_run is not None else "Stopped here; any repository listed above was pushed"
    return (
        f"internal error: {type(error).__name__}: {message}. This is a bug in push_to_hub.py, not a diagnosis of "
        f"your input. {done}. Please report it with the command you ran."
    )


def main(argv=None, api=None) -> int:
    args = parse_args(argv)
    dry_root = created = None
    try:
        jobs = plan(args)  # every folder and file is read and checked first: nothing is written or sent yet
        if args.dry_run is not None:
            dry_root, created = new_empty_dir(args.dry_run)
        run(args, jobs, api=api, dry_root=dry_root)
    except BaseException as error:
        if dry_root is not None:  # any failure, expected or not, leaves no half-written dry-run folder behind
            cleanup = take_back(dry_root, created)
            if isinstance(error, WriteFailed):
                error.cleanup = cleanup
        if not isinstance(error, Exception):
            raise  # Ctrl-C and sys.exit keep their meaning
        print(f"push_to_hub.py: error: {describe(error, args)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
