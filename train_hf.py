"""Fine-tune CNNGemma with Accelerate (one or more GPUs, or CPU), optionally with LoRA or QLoRA (a 4-bit decoder); the
test split is scored at the end with metrics/evaluation.py (baselines, table, sample captions).

    python train_hf.py                      # CPU demo: synthetic aerial set, tiny config, learns in minutes
    python train_hf.py --model outputs/cnngemma-demo --dataset data/mine --output_dir outputs/mine   # fine-tune it
    accelerate launch train_hf.py --config configuration/mobilenet_single.json --dataset data/riscm \\
        --language_model google/paligemma-3b-pt-224 --vision_pretrained imagenet
    python train_hf.py --config configuration/lite0_grid3_270m.json --language_model gemma-3-270m.gguf \\
        --lora_r 16 --load_in_4bit           # QLoRA: an adapter folder (cnngemma/adapters.py)
"""

import argparse
import importlib.util
import json
import math
import os
import re
import resource
import sys
import time
import zipfile
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, LoggerType, ProjectConfiguration, broadcast_object_list, set_seed
from matplotlib.figure import Figure
from peft import LoraConfig, get_peft_model
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import AutoTokenizer, get_cosine_schedule_with_warmup

import checkpoints
from cnngemma import adapters
from cnngemma.backbones import from_backbones
from cnngemma.errors import RunError, UsageError, check_ranges, first_line, path_type, run_command, seed_type
from cnngemma.inference import check_generation_length, load_model
from cnngemma.saving import read_safetensors_metadata
from metrics import evaluation
from metrics.caption_metrics import METRIC_KEYS
from modeling_cnngemma import (
    CNNGemmaConfig,
    CNNGemmaProcessor,
    build_caption_tokenizer,
    check_source,
)

REPO_ROOT = Path(__file__).resolve().parent
# Each of these builds a new model; a --model folder brings its own weights, config, tokenizer and processor instead.
NEW_MODEL_FLAGS = ("config", "text_config", "language_model", "vision_pretrained", "tokenizer")
DEFAULT_LORA_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
TRACKERS = sorted(str(tracker.value) for tracker in LoggerType if tracker.value != "all")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    data = parser.add_argument_group("data and model")
    data.add_argument(
        "--model",
        type=path_type,
        help="Fine-tune a trained CNNGemma (folder or Hub id) with its own config, tokenizer and processor.",
    )
    data.add_argument(
        "--config",
        type=path_type,
        help="A configuration/*.json file (model shape). Default: the CPU demo's tiny.json.",
    )
    data.add_argument(
        "--dataset",
        type=path_type,
        help="A dataset_builder output folder or a Hub dataset id. Default: build (or reuse) the "
        f"synthetic aerial set in {evaluation.DEMO_DATA.relative_to(REPO_ROOT)}/.",
    )
    data.add_argument("--synth_images", type=int, default=2000, help="Images in the default synthetic set.")
    data.add_argument(
        "--synth_size",
        type=int,
        default=128,
        help="Image side of the default synthetic set: 128 for the tiny demo, 224 for real ImageNet CNNs (the same "
        "captions, drawn larger).",
    )
    data.add_argument(
        "--language_model",
        type=path_type,
        help="The decoder and tokenizer: a Gemma or PaliGemma checkpoint (folder or Hub id), or a Gemma .gguf file "
        "(dequantized once into $HF_HOME/cnngemma/gguf/). Default: a randomly initialised decoder and a BPE "
        "tokenizer trained on the captions.",
    )
    data.add_argument(
        "--vision_pretrained",
        type=path_type,
        help="'imagenet' for timm's ImageNet weights (Hub), or a weights file. Default: timm init.",
    )
    data.add_argument("--tokenizer", type=path_type, help="Tokenizer folder to use with a random decoder.")
    data.add_argument(
        "--text_config",
        type=path_type,
        help="Take text_config and image_token_id from this configuration/*.json instead (e.g. a "
        "full variant's real encoder with tiny.json's decoder for CPU comparisons).",
    )
    data.add_argument(
        "--output_dir",
        type=path_type,
        default=str(REPO_ROOT / "outputs" / "cnngemma-demo"),
        help="Where checkpoints, the final model, metrics.json and plots go: a new or empty folder, or an earlier run "
        "to resume or replace. One run writes there at a time.",
    )
    data.add_argument("--max_caption_tokens", type=int, default=64, help="Cut longer training captions to N tokens.")

    train = parser.add_argument_group("what trains")
    train.add_argument("--freeze_vision", action="store_true", help="Freeze the CNN (kept in eval mode).")
    train.add_argument(
        "--train_language_model",
        action="store_true",
        help="Fully train a --language_model decoder (frozen by default, as in the report). A random decoder "
        "always trains, and so does a --model decoder: this project trained it on captions.",
    )
    train.add_argument("--lora_r", type=int, default=0, help="LoRA rank on the decoder (0 = no LoRA).")
    train.add_argument("--lora_alpha", type=int, default=16, help="LoRA alpha.")
    train.add_argument("--lora_dropout", type=float, default=0.0, help="LoRA dropout.")
    train.add_argument(
        "--lora_target_modules", default=DEFAULT_LORA_TARGETS, help="Regex of the decoder modules to adapt with LoRA."
    )
    train.add_argument(
        "--load_in_4bit",
        action="store_true",
        help="QLoRA: the --language_model decoder in 4-bit NF4 (bitsandbytes), frozen, with LoRA adapters; the CNN "
        "and projector stay in full precision.",
    )
    train.add_argument(
        "--save",
        choices=("merged", "adapter"),
        help="With LoRA: 'merged' writes the whole model, 'adapter' the adapters, CNN and projector with the base "
        "named (a Hub id or a .gguf package and sha256). Default: adapter with --load_in_4bit (merging into 4 bits "
        "is lossy; a merged save reloads the base in full precision), else merged.",
    )

    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--learning_rate", type=float, default=2e-3, help="Peak learning rate for every part.")
    optim.add_argument("--vision_lr", type=float, help="Learning rate of the CNN (default: --learning_rate).")
    optim.add_argument("--projector_lr", type=float, help="Learning rate of the projector.")
    optim.add_argument("--language_model_lr", type=float, help="Learning rate of the decoder / LoRA.")
    optim.add_argument("--weight_decay", type=float, default=0.01, help="AdamW weight decay.")
    optim.add_argument(
        "--warmup_steps", type=int, default=100, help="Optimizer steps of linear warmup before the cosine decay."
    )
    optim.add_argument("--batch_size", type=int, default=32, help="Training pairs per device per micro-batch.")
    optim.add_argument("--gradient_accumulation_steps", type=int, default=1, help="Micro-batches per optimizer step.")
    optim.add_argument("--num_epochs", type=int, default=4, help="Epochs over the training pairs.")
    optim.add_argument("--max_steps", type=int, default=0, help="Optimizer steps; overrides --num_epochs when > 0.")
    optim.add_argument("--mixed_precision", choices=("no", "fp16", "bf16"), default="no", help="Autocast precision.")
    optim.add_argument("--gradient_checkpointing", action="store_true", help="Recompute decoder activations.")
    optim.add_argument("--augment", action="store_true", help="Random flips and 90-degree rotations of images.")
    optim.add_argument(
        "--seed", type=seed_type, default=42, help="Seed for weights, data order and augmentation (0..2**32-1)."
    )
    optim.add_argument("--num_workers", type=int, default=0, help="DataLoader worker processes.")

    scoring = parser.add_argument_group("evaluation")
    scoring.add_argument("--eval_steps", type=int, default=0, help="Score validation every N steps (0: end only).")
    scoring.add_argument("--max_eval_images", type=int, default=0, help="Cap on validation images (0: all).")
    evaluation.add_generation_arguments(scoring)
    scoring.add_argument(
        "--no_eval", action="store_true", help="Skip every evaluation (smoke tests, timing runs): no metrics.json."
    )
    scoring.add_argument(
        "--skip_baselines", action="store_true", help="Do not score the starting model and the image-blind baseline."
    )

    state = parser.add_argument_group("checkpoints and logging")
    state.add_argument("--checkpointing_steps", type=int, default=0, help="save_state every N steps (0: never).")
    state.add_argument("--checkpoints_total_limit", type=int, default=2, help="Keep the last K checkpoints.")
    state.add_argument("--resume_from_checkpoint", type=path_type, help="'latest' or a checkpoint folder.")
    state.add_argument(
        "--apply_changed_flags",
        action="store_true",
        help="Resume even though flags that change training differ from the checkpoint's, with the new values "
        "(learning rates, batch size, ...; they are logged). Without it such a resume is refused.",
    )
    state.add_argument(
        "--overwrite_output_dir",
        action="store_true",
        help="Replace an earlier run in --output_dir. The new run works in a sub-folder until it has finished (disk "
        "use doubles meanwhile); then only the earlier run's own files are deleted. A failed run changes nothing.",
    )
    state.add_argument(
        "--report_to",
        default="tensorboard",
        help=f"Accelerate trackers, comma-separated: {', '.join(TRACKERS)}, all or none (installed ones only).",
    )
    state.add_argument("--logging_steps", type=int, default=20, help="Log loss, lr and samples/s every N steps.")
    args = parser.parse_args(argv)
    check_flags(args)
    return args


def check_flags(args):
    """Bad flags fail before anything is loaded: out-of-range values, LoRA-only flags, missing files."""
    rules = [
        ("batch_size", args.batch_size >= 1, ">= 1"),
        ("gradient_accumulation_steps", args.gradient_accumulation_steps >= 1, ">= 1"),
        ("num_epochs", args.num_epochs >= 1, ">= 1"),
        ("max_steps", args.max_steps >= 0, ">= 0"),
        ("weight_decay", math.isfinite(args.weight_decay) and args.weight_decay >= 0, "a finite number >= 0"),
        ("warmup_steps", args.warmup_steps >= 0, ">= 0"),
        ("lora_r", args.lora_r >= 0, ">= 0"),
        ("lora_alpha", args.lora_alpha >= 1, ">= 1"),
        ("lora_dropout", 0 <= args.lora_dropout < 1, "in [0, 1)"),
        ("eval_steps", args.eval_steps >= 0, ">= 0"),
        ("checkpointing_steps", args.checkpointing_steps >= 0, ">= 0"),
        ("checkpoints_total_limit", args.checkpoints_total_limit >= 1, ">= 1"),
        ("num_workers", args.num_workers >= 0, ">= 0"),
        ("synth_images", args.synth_images >= 20, ">= 20"),
        ("synth_size", args.synth_size >= 32, ">= 32"),
        ("logging_steps", args.logging_steps >= 1, ">= 1"),
        ("max_eval_images", args.max_eval_images >= 0, ">= 0"),
        ("max_caption_tokens", args.max_caption_tokens >= 1, ">= 1"),
        *evaluation.generation_rules(args),
    ]
    for name in ("learning_rate", "vision_lr", "projector_lr", "language_model_lr"):
        lr = getattr(args, name)
        rules.append((name, lr is None or (math.isfinite(lr) and lr > 0), "a finite number > 0"))
    check_ranges(args, rules)
    try:
        re.compile(args.lora_target_modules)
    except re.error as error:
        raise UsageError(
            f"--lora_target_modules {args.lora_target_modules!r} is not a valid regular expression ({error}). "
            f"Pass a Python regex of module names, e.g. the default {DEFAULT_LORA_TARGETS!r}."
        ) from None
    unknown = [t for t in args.report_to.split(",") if t not in (*TRACKERS, "all", "none")]
    if unknown:
        raise UsageError(
            f"--report_to {args.report_to!r}: unknown tracker(s) {', '.join(unknown)}. Expected a comma-separated "
            f"list of {', '.join(TRACKERS)}, or all, or none."
        )
    check_qlora_flags(args)
    for name in NEW_MODEL_FLAGS if args.model else ():
        if getattr(args, name) is not None:
            raise UsageError(
                f"--{name} cannot be combined with --model: the --model folder brings its own weights, config, "
                f"tokenizer and processor. Drop --{name}, or drop --model to build a new model."
            )
    if args.model and adapters.is_adapter_folder(args.model):
        raise UsageError(
            f"--model {args.model} is an adapter folder (the base is not in it). Merge it first (python -m "
            "cnngemma.adapters merge DIR OUT) and pass --model OUT."
        )
    if args.model and Path(args.model).resolve() == Path(args.output_dir).resolve():
        raise UsageError(
            f"--output_dir {args.output_dir} is the --model folder: the fine-tune would overwrite the model it starts "
            "from. Pass another --output_dir."
        )
    vision_file = None if args.vision_pretrained in (None, "imagenet") else args.vision_pretrained
    sources = [
        ("--model", args.model, False),
        ("--config", args.config, True),
        ("--text_config", args.text_config, True),
        ("--vision_pretrained", vision_file, True),
        ("--tokenizer", args.tokenizer, False),
        ("--language_model", args.language_model, str(args.language_model).endswith(".gguf")),
    ]
    for flag, value, must_be_local in sources:
        try:
            if value is not None:
                check_source(value, flag, must_be_local=must_be_local)
        except OSError as error:
            raise UsageError(str(error)) from error
    if vision_file is not None:
        check_weights_file(Path(vision_file), "--vision_pretrained")


def check_qlora_flags(args):
    """--load_in_4bit and --save: what they need, before anything loads."""
    if args.save is not None and args.lora_r == 0:
        raise UsageError(f"--save {args.save} needs LoRA: set --lora_r > 0, or drop --save.")
    if args.load_in_4bit:
        if args.lora_r == 0:
            raise UsageError(
                "--load_in_4bit needs LoRA: the 4-bit decoder stays frozen and only adapters train on it. Add --lora_r "
                "16 (or another rank)."
            )
        if args.model or args.language_model is None:
            got = f"--model {args.model}" if args.model else "a random decoder (no --language_model)"
            raise UsageError(
                f"--load_in_4bit quantizes the pretrained decoder of --language_model, but got {got}. Pass "
                "--language_model (a Gemma checkpoint, Hub id or .gguf file)."
            )
        if args.train_language_model:
            raise UsageError("--load_in_4bit keeps the decoder frozen; drop --train_language_model (LoRA trains it).")
        adapters.require_bitsandbytes("--load_in_4bit")
    args.save = args.save or ("adapter" if args.load_in_4bit else "merged")
    if args.lora_r and args.save == "adapter" and args.language_model is None:
        raise UsageError("--save adapter needs a pretrained --language_model to name as its base. Pass --save merged.")
    if args.lora_r and args.save == "adapter" and Path(args.language_model).is_dir():
        raise UsageError(
            f"--save adapter names the base decoder for others to find (a Hub id or a .gguf file), but "
            f"--language_model {args.language_model} is a local folder. Pass --save merged."
        )


def check_weights_file(path: Path, flag: str):
    """A weights file is safetensors or a torch.save zip archive: anything else would reach the unpickler."""
    if path.is_dir():
        raise UsageError(f"{flag} {path} is a folder; expected a weights file (.safetensors, or a torch.save .pth).")
    if zipfile.is_zipfile(path):
        return
    try:
        read_safetensors_metadata(path)
    except ValueError:
        with open(path, "rb") as file:
            start = file.read(16)
        raise UsageError(
            f"{flag} {path}: not a weights file (neither safetensors nor a torch.save archive; it starts with "
            f"{start!r}). Pass the CNN's weights, e.g. scripts/convert_efficientnet_lite0.py's output, or 'imagenet'."
        ) from None


def training_function(args):
    """The launch's main process takes the output folder's lock before anything loads; a failed or interrupted run
    leaves an earlier run there as it was."""
    run = checkpoints.open_run_folder(args) if int(os.environ.get("RANK", "0")) == 0 else None
    try:
        train(args, run)
    except BaseException:
        if run is not None:
            checkpoints.abandon_run(run)
        raise


def train(args, run: checkpoints.RunFolder | None):
    accelerator = make_accelerator(args, run)
    run = broadcast_object_list([run])[0] if accelerator.num_processes > 1 else run  # the other ranks learn it here
    log, output_dir = accelerator.print, run.run_dir
    state = None
    if run.resume is not None:
        checkpoints.check_checkpoint(run.resume, accelerator.num_processes)
        state = json.loads((run.resume / "training_state.json").read_text())
        changes = checkpoints.changed_flags(state.get("args"), args)  # refused in open_run_folder unless applied
    with accelerator.main_process_first():
        dataset = evaluation.load_caption_dataset(args.dataset, args.synth_images, args.seed, args.synth_size)
    train_pairs = dataset["train"]
    val_split = "validation" if "validation" in dataset else "test"
    test_split = "test" if "test" in dataset else "validation"
    if len(train_pairs) < args.batch_size * accelerator.num_processes:  # drop_last: a process would get no batch
        raise UsageError(
            f"--batch_size {args.batch_size} with {accelerator.num_processes} process(es) needs at least "
            f"{args.batch_size * accelerator.num_processes} training pairs; the train split has {len(train_pairs)}. "
            f"Pass --batch_size {max(len(train_pairs) // accelerator.num_processes, 1)} or less."
        )
    val = evaluation.group_by_image(dataset[val_split], args.max_eval_images)
    test = evaluation.group_by_image(dataset[test_split])

    set_seed(args.seed)
    model, processor = build_model_and_processor(args, train_pairs["caption"], accelerator.device)
    positions = model.config.text_config.max_position_embeddings
    cuts = caption_cuts(train_pairs["caption"], processor, positions, args.max_caption_tokens, log)
    if not args.no_eval:
        check_generation_length(model, processor, args.max_new_tokens)
    model = apply_training_policy(model, args)
    counts = count_parameters(model)
    log(
        f"CNNGemma {model.config.vision_model_name} ({model.config.token_mode}, {model.config.num_image_tokens} "
        f"tokens) | {counts['total']:,} parameters, {counts['trainable']:,} trainable | {accelerator.num_processes} "
        f"process(es) on {accelerator.device} | train {len(train_pairs):,} pairs, {val_split} {len(val[0]):,} images, "
        f"{test_split} {len(test[0]):,} images"
    )

    def collate(rows):
        captions = [cuts.get(row["caption"], row["caption"]) for row in rows]  # long ones cut to --max_caption_tokens
        return processor(images=[row["image"] for row in rows], suffix=captions)

    train_loader = DataLoader(
        train_pairs.select_columns(["image", "caption"]),
        batch_size=args.batch_size,
        shuffle=True,
        collate_fn=collate,
        num_workers=args.num_workers,
        drop_last=True,
    )
    optimizer = torch.optim.AdamW(param_groups(model, args), weight_decay=args.weight_decay)
    model, optimizer, train_loader = accelerator.prepare(model, optimizer, train_loader)
    trainable = checkpoints.keep_trainable_only(accelerator, model) if args.load_in_4bit else None
    # The schedule needs the steps per epoch of this process's shard, known once the loader is prepared.
    updates_per_epoch = math.ceil(len(train_loader) / args.gradient_accumulation_steps)
    max_steps = args.max_steps or args.num_epochs * updates_per_epoch
    num_epochs = math.ceil(max_steps / updates_per_epoch)
    if args.warmup_steps >= max_steps:
        log(
            f"warning: --warmup_steps {args.warmup_steps} >= the run's {max_steps} optimizer steps: the learning "
            f"rate never reaches its peak ({args.learning_rate:g})."
        )
    # A prepared scheduler steps once per process at each optimizer step (accelerate's AcceleratedScheduler.step),
    # so both lengths count in those units: warmup and decay span the optimizer steps asked for.
    n = accelerator.num_processes
    scheduler = accelerator.prepare(get_cosine_schedule_with_warmup(optimizer, args.warmup_steps * n, max_steps * n))

    scorer = evaluation.CaptionScorer() if accelerator.is_main_process and not args.no_eval else None
    results = {}
    if not (args.skip_baselines or args.no_eval) and run.resume is None:
        first = "starting model" if args.model else "untrained model"  # --model: the loaded model before training
        results = evaluation.score_baselines(
            accelerator, model, processor, scorer, train_pairs["caption"], val, test, args, test_split, first
        )

    config = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in vars(args).items()}
    accelerator.init_trackers("cnngemma", config=config)
    global_step, start_epoch, skip_batches, history, loss_history = 0, 0, 0, [], []
    if run.resume is not None:
        checkpoints.load_checkpoint(accelerator, run.resume, trainable)
        global_step, start_epoch, skip_batches = state["global_step"], state["epoch"], state["batches_in_epoch"]
        history, loss_history = state["history"], [tuple(x) for x in state["loss_history"]]
        if changes:
            skip_batches = apply_changed_flags(changes, args, optimizer, scheduler, skip_batches, log)
        log(f"resumed from {run.resume} at step {global_step} (epoch {start_epoch}, batch {skip_batches})")
    with tqdm(
        total=max_steps, initial=global_step, desc="training", disable=not accelerator.is_local_main_process
    ) as progress:  # closed on errors too, so that its last line does not follow an error line
        model.train()
        # The logged loss is the mean over the micro-batches since the last log: fewer than logging_steps x
        # gradient_accumulation_steps after a resume and at a last step that is not a multiple of logging_steps.
        window_loss, window_batches, window_samples, window_start = 0.0, 0, 0, time.perf_counter()
        train_seconds, train_samples, tick = 0.0, 0, time.perf_counter()  # excludes evaluation and checkpoints
        for epoch in range(start_epoch, num_epochs):
            train_loader.set_epoch(epoch)
            loader = accelerator.skip_first_batches(train_loader, skip_batches) if skip_batches else train_loader
            batches_in_epoch, skip_batches = skip_batches, 0
            for batch in loader:
                batches_in_epoch += 1
                if args.augment:
                    generator = torch.Generator().manual_seed(args.seed * 1_000_003 + global_step)
                    batch["pixel_values"] = augment(batch["pixel_values"].cpu(), generator).to(accelerator.device)
                with accelerator.accumulate(model):
                    loss = model(**batch).loss
                    loss_value = accelerator.reduce(
                        loss.detach().float(), "mean"
                    ).item()  # every process stops together
                    if not math.isfinite(loss_value):
                        raise RunError(
                            f"the training loss is {loss_value} at step {global_step + 1}: training stopped, no final "
                            "model saved. Lower --learning_rate or the per-part rates, or check the data."
                        )
                    accelerator.backward(loss)
                    if accelerator.sync_gradients:
                        accelerator.clip_grad_norm_(model.parameters(), 1.0)
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad()
                window_loss += loss_value
                window_batches += 1
                window_samples += batch["input_ids"].shape[0] * accelerator.num_processes
                train_samples += batch["input_ids"].shape[0] * accelerator.num_processes
                train_seconds, tick = train_seconds + time.perf_counter() - tick, time.perf_counter()
                if not accelerator.sync_gradients:
                    continue
                global_step += 1
                progress.update(1)
                if global_step % args.logging_steps == 0 or global_step == max_steps:
                    mean_loss, lr = window_loss / window_batches, scheduler.get_last_lr()[0]
                    speed = window_samples / (time.perf_counter() - window_start)
                    accelerator.log(
                        {"train/loss": mean_loss, "train/lr": lr, "train/samples_per_second": speed}, step=global_step
                    )
                    loss_history.append((global_step, mean_loss))
                    progress.set_postfix(loss=f"{mean_loss:.3f}", lr=f"{lr:.1e}", samples_s=f"{speed:.0f}")
                    window_loss, window_batches, window_samples, window_start = 0.0, 0, 0, time.perf_counter()
                if (
                    args.eval_steps
                    and not args.no_eval
                    and global_step % args.eval_steps == 0
                    and global_step < max_steps
                ):
                    result, _ = evaluation.evaluate_split(
                        accelerator, model, processor, scorer, val, args, global_step, val_split
                    )
                    history.append(result)
                    accelerator.log(
                        {f"{val_split}/{k}": result[k] for k in METRIC_KEYS if result.get(k) is not None},
                        step=global_step,
                    )
                    log(f"step {global_step}: {val_split} CIDEr {result.get('cider', float('nan')):.3f}")
                if args.checkpointing_steps and global_step % args.checkpointing_steps == 0:
                    state = dict(
                        global_step=global_step, epoch=epoch, batches_in_epoch=batches_in_epoch, history=history
                    )
                    state.update(loss_history=loss_history, args=json.loads(json.dumps(vars(args), default=str)))
                    if batches_in_epoch == len(train_loader):
                        state.update(epoch=epoch + 1, batches_in_epoch=0)
                    checkpoints.save_checkpoint(accelerator, run, state, args.checkpoints_total_limit)
                tick = time.perf_counter()
                if global_step >= max_steps:
                    break
            if global_step >= max_steps:
                break
    save_final_model(accelerator, model, processor, args, run)
    if accelerator.is_main_process:
        (output_dir / "train_args.json").write_text(json.dumps(vars(args), indent=2, default=str) + "\n")
        write_loss_curve(loss_history, output_dir / "loss_curve.png")
    if args.no_eval:
        finish(accelerator, run)
        return

    result, _ = evaluation.evaluate_split(accelerator, model, processor, scorer, val, args, global_step, val_split)
    history.append(result)
    final, rows = evaluation.evaluate_split(accelerator, model, processor, scorer, test, args, global_step, test_split)
    final.update(
        train_samples_per_second=train_samples / max(train_seconds, 1e-9),
        parameters_total=counts["total"],
        parameters_trainable=counts["trainable"],
        peak_memory_mb=peak_memory_mb(accelerator.device),
    )
    if accelerator.is_main_process:
        evaluation.write_outputs(output_dir, {**final, "history": history, "baselines": results}, rows, test[0])
        evaluation.report({**results, "fine-tuned model" if args.model else "trained model": final}, rows, test_split)
    finish(accelerator, run)


def finish(accelerator, run: checkpoints.RunFolder):
    """The run is complete: recorded, and swapped in for an earlier run it replaces (main process)."""
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        checkpoints.finish_run(run)
    accelerator.end_training()  # also ends the process group: last


def apply_changed_flags(changes, args, optimizer, scheduler, skip_batches: int, log) -> int:
    """--apply_changed_flags: the new learning rates and weight decay replace the checkpoint's (the cosine schedule
    keeps its position), and the data position is kept in pairs when --batch_size changed. Returns the batches to
    skip in the current epoch."""
    rates = {group["name"]: group["lr"] for group in param_groups(None, args)}
    for index, group in enumerate(optimizer.param_groups):
        group["initial_lr"], group["weight_decay"] = rates[group["name"]], args.weight_decay
        scheduler.scheduler.base_lrs[index] = rates[group["name"]]
    changed = dict((name, old) for name, old, _ in changes)
    if "batch_size" in changed:
        seen = skip_batches * int(changed["batch_size"])
        skip_batches = seen // args.batch_size
        if seen % args.batch_size:
            log(
                f"note: {seen % args.batch_size} pair(s) of this epoch's order are trained again: {seen} pairs were "
                f"seen, not a multiple of --batch_size {args.batch_size}."
            )
    log("applied the new flags: " + "; ".join(f"--{name} {new} (checkpoint: {old})" for name, old, new in changes))
    return skip_batches


def caption_cuts(captions, processor, positions: int, max_tokens: int, log) -> dict[str, str]:
    """Each training caption over max_tokens tokens (counted as the processor counts them) -> the text of its first
    max_tokens tokens; the processor still appends <eos>. Refuses a limit that the decoder's positions cannot hold."""
    tokenizer, prefix, image = processor.tokenizer, processor.prompt_prefix, processor.num_image_tokens
    prompt = len(tokenizer(prefix + "\n", add_special_tokens=False)["input_ids"])
    if max_tokens > (room := positions - image - prompt - 2):  # 2: <bos> and <eos>
        raise UsageError(
            f"--max_caption_tokens {max_tokens} does not fit: the decoder's {positions} positions less {image} image "
            f"tokens, <bos>, {prompt} prompt tokens and <eos> leave {room}. Pass --max_caption_tokens {room} or less."
        )
    unique = list(dict.fromkeys(captions))
    encoded = tokenizer(unique, add_special_tokens=False, return_offsets_mapping=True)
    cuts, longest = {}, max(map(len, encoded["input_ids"]))
    for caption, ids, offsets in zip(unique, encoded["input_ids"], encoded["offset_mapping"], strict=True):
        keep = max_tokens
        while len(ids) > max_tokens and keep > 0:  # the text of the first `keep` tokens may re-tokenise differently
            cuts[caption] = caption[: offsets[keep - 1][1]]
            ids, keep = tokenizer(cuts[caption], add_special_tokens=False)["input_ids"], keep - 1
    if count := sum(caption in cuts for caption in captions):
        log(
            f"warning: {count:,} of {len(captions):,} training captions are longer than --max_caption_tokens "
            f"{max_tokens} (the longest has {longest:,} tokens): each is cut to its first {max_tokens} tokens."
        )
    return cuts


def make_accelerator(args, run: checkpoints.RunFolder | None) -> Accelerator:
    trackers = [] if args.report_to == "none" else ["all"] if args.report_to == "all" else args.report_to.split(",")
    available = [t for t in trackers if t == "all" or importlib.util.find_spec(t) is not None]
    folder = str(run.run_dir) if run is not None else args.output_dir  # trackers write on the main process only
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(),
        mixed_precision=args.mixed_precision,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        log_with=available or None,
        project_config=ProjectConfiguration(project_dir=folder, logging_dir=str(Path(folder) / "logs")),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    set_seed(args.seed)
    return accelerator


def build_model_and_processor(args, train_captions, device):
    if args.model:  # this repository's classes, not the folder's remote code: the code that trains is the code saved
        # float32 master weights whatever the saved dtype (--mixed_precision autocasts)
        return load_model(args.model, remote_code=False, dtype=torch.float32)
    config = read_config(args.config or REPO_ROOT / "configuration" / "tiny.json", "--config")
    if args.text_config:
        donor = read_config(args.text_config, "--text_config")
        config = CNNGemmaConfig.from_dict(
            {**config.to_dict(), "text_config": donor.text_config.to_dict(), "image_token_id": donor.image_token_id}
        )
    tokenizer = None
    if args.language_model is None:
        if args.tokenizer:
            files = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
            try:
                if not any((Path(args.tokenizer) / name).is_file() for name in files):
                    raise OSError(f"it holds none of {', '.join(files)}")
                tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
            except (OSError, ValueError) as error:
                raise UsageError(
                    f"--tokenizer {args.tokenizer}: not a tokenizer folder ({first_line(error)}). Pass a folder "
                    "written by a tokenizer's save_pretrained (tokenizer.json + tokenizer_config.json)."
                ) from None
        else:
            tokenizer = build_caption_tokenizer(
                train_captions, vocab_size=config.text_config.vocab_size, prompts=[config.prompt_prefix]
            )
    vision = args.vision_pretrained
    vision = True if vision == "imagenet" else (vision or False)
    loading = {"quantization_config": adapters.nf4_config(device)} if args.load_in_4bit else {}
    loading |= {"device_map": {"": device}} if args.load_in_4bit and device.type != "cpu" else {}
    try:
        model, tokenizer = from_backbones(
            config, language_model=args.language_model, vision_pretrained=vision, tokenizer=tokenizer, **loading
        )
    except (OSError, ValueError, ImportError) as error:
        raise UsageError(str(error)) from None
    return model, CNNGemmaProcessor.from_model_config(model.config, tokenizer)


def read_config(path, flag: str) -> CNNGemmaConfig:
    """A configuration/*.json file as a CNNGemmaConfig; anything the config refuses is one line naming the file."""
    try:
        config = CNNGemmaConfig.from_json_file(path)
    except (OSError, ValueError, TypeError) as error:
        raise UsageError(
            f"{flag} {path}: not a usable CNNGemma configuration ({type(error).__name__}: {first_line(error)}). "
            "Start from one of configuration/*.json."
        ) from None
    return config


def apply_training_policy(model, args):
    """Sets what trains (report: CNN + projector, pretrained LM frozen) and wraps LoRA adapters when asked."""
    train_lm = args.language_model is None or args.train_language_model
    if args.load_in_4bit:  # peft freezes every part (and sets up checkpointing); the CNN and projector train again
        model = adapters.prepare_kbit_training(model, args.gradient_checkpointing)
    model.set_trainable(
        vision_tower=not args.freeze_vision, multi_modal_projector=True, language_model=train_lm and args.lora_r == 0
    )
    if args.gradient_checkpointing and not args.load_in_4bit:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    if args.lora_r == 0:
        return model
    targets = [m for name, m in model.named_modules() if re.fullmatch(args.lora_target_modules, name)]
    if not targets:
        raise UsageError(
            f"--lora_target_modules {args.lora_target_modules!r} matches no module of the model (it must match whole "
            "names, e.g. 'model.language_model.layers.0.self_attn.q_proj'). Pass a regex such as the default "
            f"{DEFAULT_LORA_TARGETS!r}."
        )
    widths = [min(m.in_features, m.out_features) for m in targets if isinstance(m, torch.nn.Linear)]
    if widths and args.lora_r > min(widths):
        raise UsageError(
            f"--lora_r {args.lora_r} is larger than the narrowest adapted layer ({min(widths)} features): a rank "
            f"above a layer's width adds no capacity, only cost. Pass --lora_r {min(widths)} or less."
        )
    to_save = ["multi_modal_projector", "vision_tower"]  # saved with the adapters, so the folder needs only the base
    lora = LoraConfig(
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=args.lora_target_modules,
        modules_to_save=to_save,
    )
    try:
        model = get_peft_model(model, lora)
    except ValueError as error:  # peft: a matched module of a type LoRA cannot adapt
        raise UsageError(f"--lora_target_modules {args.lora_target_modules!r}: {first_line(error)}") from None
    model.base_model.model.set_trainable(  # modules_to_save copies train; a frozen CNN stays frozen (and in eval)
        vision_tower=not args.freeze_vision, multi_modal_projector=True, language_model=False
    )
    for name, param in model.named_parameters():
        param.requires_grad_("lora_" in name or (param.requires_grad and "modules_to_save" in name))
    return model


def param_groups(model, args):
    """AdamW groups per part, each with its learning rate; with `model=None`, just each part's rate."""
    lrs = {"vision_tower": args.vision_lr, "multi_modal_projector": args.projector_lr}
    groups = {} if model is not None else {part: [] for part in [*lrs, "language_model"]}
    for name, param in model.named_parameters() if model is not None else ():
        if param.requires_grad:  # outside the CNN and the projector: the decoder or its LoRA adapters
            groups.setdefault(next((part for part in lrs if part in name), "language_model"), []).append(param)
    lrs["language_model"] = args.language_model_lr
    return [{"params": params, "lr": lrs[part] or args.learning_rate, "name": part} for part, params in groups.items()]


def count_parameters(model) -> dict:
    unique = {id(p): p for p in model.parameters()}.values()
    return {"total": sum(p.numel() for p in unique), "trainable": sum(p.numel() for p in unique if p.requires_grad)}


def augment(pixel_values, generator):
    """Random horizontal/vertical flips and 90-degree rotations: aerial scenes have no up. Deterministic per step."""
    flips = torch.randint(0, 2, (pixel_values.shape[0], 3), generator=generator)
    out = []
    for image, (h, v, r) in zip(pixel_values, flips.tolist(), strict=True):
        image = image.flip(-1) if h else image
        image = image.flip(-2) if v else image
        out.append(image.rot90(1, dims=(-2, -1)) if r else image)
    return torch.stack(out)


def save_final_model(accelerator, model, processor, args, run: checkpoints.RunFolder):
    unwrapped = accelerator.unwrap_model(model)
    if args.lora_r and args.save == "adapter":
        checkpoints.save_final_model(accelerator, unwrapped, processor, run, adapter_in_4bit=args.load_in_4bit)
        return
    if args.load_in_4bit:
        unwrapped = adapters.merged_copy(unwrapped, args.language_model)
    elif args.lora_r:
        unwrapped = unwrapped.merge_and_unload()  # a plain CNNGemma again, loadable without peft
    checkpoints.save_final_model(accelerator, unwrapped, processor, run)


def peak_memory_mb(device) -> float:
    """Peak GPU memory allocated by torch, or on CPU the process's peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def write_loss_curve(history: list[tuple[int, float]], path: Path):
    if not history:
        return
    steps, losses = zip(*history, strict=True)
    fig = Figure(figsize=(6, 3.5), dpi=120)
    ax = fig.subplots()
    ax.plot(steps, losses, lw=1)
    ax.set(xlabel="optimizer step", ylabel="training loss", yscale="log", title="CNNGemma training loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)


def main(argv=None) -> int:
    return run_command(lambda: training_function(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
