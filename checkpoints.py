"""The rules of a training run's folder: which checkpoints count (complete ones, marked last), which run they belong
to, how train_hf.py saves, rotates, checks and resumes them, and how a finished run replaces its final model."""

import fnmatch
import json
import os
import shutil
import tempfile
import uuid
import zipfile
from pathlib import Path

from safetensors import safe_open

from metrics.evaluation import RunError, UsageError

MARKER = "checkpoint_complete.json"  # written last: a step_N folder without it was never completely saved
# The final model (save_pretrained, the processor, its remote code) and the run's reports at the top of OUTPUT_DIR:
# what --overwrite_output_dir removes with the checkpoints, and what a finished run replaces.
MODEL_FILES = (
    *("config.json", "generation_config.json", "*.safetensors", "*.safetensors.index.json", "adapter_config.json"),
    *("processor_config.json", "preprocessor_config.json", "tokenizer*.json", "special_tokens_map.json"),
    *("chat_template.jinja", "*_cnngemma.py"),
)
RUN_FILES = ("metrics.json", "predictions.jsonl", "samples.html", "loss_curve.png", "train_args.json")


def step_of(path: Path) -> int | None:
    return int(path.name[5:]) if path.name.startswith("step_") and path.name[5:].isdigit() else None


def step_folders(output_dir: Path) -> list[Path]:
    """Every OUTPUT_DIR/checkpoints/step_N folder, complete or not, by step."""
    folders = [p for p in (output_dir / "checkpoints").glob("step_*") if step_of(p) is not None and p.is_dir()]
    return sorted(folders, key=step_of)


def read_marker(checkpoint: Path) -> dict | None:
    """The marker's content, or None when it is missing or not what save_checkpoint writes."""
    try:
        marker = json.loads((checkpoint / MARKER).read_text())
    except (OSError, ValueError):
        return None
    kinds = {"run_id": str, "global_step": int, "num_processes": int, "files": dict}
    return marker if isinstance(marker, dict) and all(isinstance(marker.get(k), t) for k, t in kinds.items()) else None


def names(paths: list[Path]) -> str:
    shown = ", ".join(p.name for p in paths[:3])
    return shown + (f" and {len(paths) - 3} more" if len(paths) > 3 else "")


def check_run_folder(args) -> tuple[Path | None, str]:
    """Checks OUTPUT_DIR before any work and picks the checkpoint to resume from. Returns it (or None) and the run
    id that marks this run's checkpoints: a resumed run keeps its checkpoint's id, a new run gets a fresh one."""
    output_dir = Path(args.output_dir)
    for path in (output_dir, output_dir / "checkpoints"):
        if path.exists() and not path.is_dir():
            raise UsageError(
                f"--output_dir {output_dir}: {path} is a file; expected a folder for checkpoints and the final model. "
                "Pass another --output_dir, or move the file away."
            )
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=output_dir).close()
    except OSError as error:
        raise UsageError(
            f"--output_dir {output_dir} cannot be written ({error.strerror}). Pass a writable folder."
        ) from error
    found = step_folders(output_dir)
    resume = find_resume(args.resume_from_checkpoint, output_dir) if args.resume_from_checkpoint else None
    marker = read_marker(resume) if resume is not None else None
    if resume is not None and (marker is None or resume.name.startswith(".partial-")):
        raise RunError(
            f"checkpoint {resume} is incomplete: no readable {MARKER}, which is written last (the save was killed, "
            "or an older train_hf.py wrote it). Resume from an earlier checkpoint, or start again with "
            "--overwrite_output_dir."
        )
    ours = resume is not None and resume.resolve().parent == (output_dir / "checkpoints").resolve()
    if args.overwrite_output_dir and ours:
        raise UsageError(
            f"--overwrite_output_dir would delete {resume}, the checkpoint --resume_from_checkpoint resumes from. "
            "Drop one of the two flags."
        )
    if found and not ours and not args.overwrite_output_dir:
        raise UsageError(
            f"--output_dir {output_dir} holds another run's checkpoints ({names(found)}); a new run there would mix "
            "with them. Continue that run with --resume_from_checkpoint latest, delete them (and its final model) "
            "with --overwrite_output_dir, or pass another --output_dir."
        )
    later = [p for p in found if ours and step_of(p) > marker["global_step"] and read_marker(p)]
    if later:
        raise UsageError(
            f"--resume_from_checkpoint {resume}: {resume.parent} also holds later checkpoints ({names(later)}), "
            "which this run would overwrite. Resume from the latest (--resume_from_checkpoint latest), or delete the "
            "later ones first."
        )
    if resume is None:
        return None, uuid.uuid4().hex
    return resume, marker["run_id"]


def find_resume(value: str, output_dir: Path) -> Path:
    if value != "latest":
        path = Path(value)
        if not (path / "training_state.json").is_file():
            raise UsageError(
                f"--resume_from_checkpoint {path}: not a checkpoint folder (no training_state.json). "
                "Pass 'latest' or an OUTPUT_DIR/checkpoints/step_N folder."
            )
        return path
    found = step_folders(output_dir)
    if not found:
        raise UsageError(f"--resume_from_checkpoint latest: no checkpoint in {output_dir / 'checkpoints'}.")
    if read_marker(found[-1]) is None:
        complete = [p for p in found if read_marker(p) is not None]
        fix = (
            f"Resume from {complete[-1]}, the newest complete one, or start" if complete else "None is complete: start"
        )
        raise RunError(
            f"--resume_from_checkpoint latest: {found[-1]} is incomplete: no readable {MARKER}, which is written "
            f"last (the save was killed, or an older train_hf.py wrote it). {fix} again with --overwrite_output_dir."
        )
    return found[-1]


def check_checkpoint(checkpoint: Path, num_processes: int):
    """Every file the marker lists is there, whole and readable, before `load_state`: accelerate would otherwise stop
    with a traceback, or skip an unreadable RNG state silently and resume without continuing exactly."""
    marker = read_marker(checkpoint)
    written_by, files = marker["num_processes"], marker["files"]
    if written_by != num_processes:
        raise RunError(
            f"checkpoint {checkpoint} was written by {written_by} process(es); this run has {num_processes}. Resume "
            f"with {written_by}: the data shards and random states are per process."
        )
    weights = "model.safetensors" if "model.safetensors" in files else "pytorch_model.bin"
    needed = [weights, "optimizer.bin", "scheduler.bin", "training_state.json"]
    needed += [f"random_states_{i}.pkl" for i in range(num_processes)]
    for name in dict.fromkeys([*needed, *files]):
        path, size = checkpoint / name, files.get(name)
        if size is None or not path.is_file():
            raise RunError(
                f"checkpoint {checkpoint} is damaged: {name} is missing. Resume from another checkpoint, or start "
                "again with --overwrite_output_dir."
            )
        problem = (
            f"{path.stat().st_size} bytes, {size} when saved" if path.stat().st_size != size else unreadable(path)
        )
        if problem:
            raise RunError(
                f"checkpoint {checkpoint} is damaged: {name} is corrupt ({problem}). Resume from another checkpoint, "
                "or start again with --overwrite_output_dir."
            )


def unreadable(path: Path) -> str | None:
    """Why a checkpoint file cannot be read, or None. torch.save files are zip archives: their CRCs are checked."""
    try:
        if path.suffix == ".json":
            json.loads(path.read_text())
        elif path.suffix == ".safetensors":
            with safe_open(path, "pt") as file:
                file.keys()
        else:
            with zipfile.ZipFile(path) as archive:
                if bad := archive.testzip():
                    return f"bad CRC in {bad}"
    except Exception as error:  # each reader has its own errors; any of them means the file cannot be loaded
        return f"{type(error).__name__}: {error}"
    return None


def clear_output_dir(output_dir: Path):
    """--overwrite_output_dir: the earlier run's checkpoints, final model and reports go before this run starts."""
    shutil.rmtree(output_dir / "checkpoints", ignore_errors=True)
    for path in matching(output_dir, MODEL_FILES + RUN_FILES):
        path.unlink()


def matching(folder: Path, patterns) -> list[Path]:
    return [p for p in folder.iterdir() if p.is_file() and any(fnmatch.fnmatch(p.name, pat) for pat in patterns)]


def save_checkpoint(accelerator, output_dir: Path, state: dict, keep: int, run_id: str):
    """save_state into a temporary folder, mark it complete, then rename it: a killed run never leaves a step_N
    folder that looks whole. Then only this run's checkpoints beyond the newest `keep` are deleted."""
    final = output_dir / "checkpoints" / f"step_{state['global_step']:06d}"
    partial = final.with_name(f".partial-{final.name}")
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (partial / "training_state.json").write_text(json.dumps(state))
        files = {p.name: p.stat().st_size for p in sorted(partial.iterdir()) if p.is_file()}
        marker = dict(run_id=run_id, global_step=state["global_step"], num_processes=accelerator.num_processes)
        (partial / MARKER).write_text(json.dumps({**marker, "files": files}, indent=1) + "\n")
        if final.exists():  # an incomplete leftover: check_run_folder refuses runs that would replace complete ones
            delete(final)
        os.replace(partial, final)
        ours = [p for p in step_folders(output_dir) if (read_marker(p) or {}).get("run_id") == run_id]
        for old in ours[:-keep]:
            delete(old)
    accelerator.wait_for_everyone()


def delete(folder: Path):
    """Renamed first: a deletion cut short leaves a hidden folder, not a step_N with files missing."""
    doomed = folder.with_name(f".deleting-{folder.name}")
    os.replace(folder, doomed)
    shutil.rmtree(doomed)


def load_checkpoint(accelerator, checkpoint: Path) -> dict:
    """load_state from a checkpoint that check_checkpoint passed; returns its training_state.json."""
    try:
        accelerator.load_state(str(checkpoint))
    except Exception as error:  # whole, readable files that still do not fit this model: other flags wrote them
        detail = f"{type(error).__name__}: {' '.join(str(error).split())[:300]}"
        raise RunError(
            f"checkpoint {checkpoint} does not load into this run ({detail}). Use the flags that wrote it."
        ) from error
    return json.loads((checkpoint / "training_state.json").read_text())


def save_final_model(accelerator, model, processor, output_dir: Path):
    """save_pretrained (model and processor) into a temporary folder, then moved into OUTPUT_DIR by atomic renames,
    weights last: a run that dies while writing keeps its previous model; only the renames (milliseconds) are not one
    step. The previous model's files that the new one lacks (e.g. adapter files before a merged save) go last."""
    staging = output_dir / ".partial-final"
    if accelerator.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)
    accelerator.wait_for_everyone()
    model.save_pretrained(staging, save_function=accelerator.save, is_main_process=accelerator.is_main_process)
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        return
    processor.save_pretrained(staging)
    new = sorted(staging.iterdir(), key=lambda p: p.suffix == ".safetensors")
    for path in new:
        os.replace(path, output_dir / path.name)
    for old in matching(output_dir, MODEL_FILES):
        if old.name not in {p.name for p in new}:
            old.unlink()
    shutil.rmtree(staging)
