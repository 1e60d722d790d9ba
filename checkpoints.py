"""The rules of a training run's folder: one writer (a lock), what counts as an earlier run, which checkpoints count
(complete ones, marked last, of this run), how a resume checks its flags, and how a run replaces an earlier one.

A new run into a folder holding an earlier run is refused unless it resumes it or `--overwrite_output_dir` asks to
replace it. A replacing run writes everything into `OUTPUT_DIR/.overwrite-RUN_ID/` (disk use doubles meanwhile); only
at its successful end is that folder swapped in, and only the earlier run's files whose size and sha256 match its
record are deleted. Anything else in the folder (a user's notes) is kept.
"""

import fnmatch
import json
import os
import shutil
import uuid
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from safetensors import SafetensorError, safe_open

from cnngemma import adapters, outputs, saving
from cnngemma.backbones import notice_files
from cnngemma.errors import RunError, UsageError

TOOL = "train_hf.py"
MARKER = "checkpoint_complete.json"  # written last: a step_N folder without it was never completely saved
OVERWRITE_PREFIX = ".overwrite-"
# The final model and the run's reports, as the train_hf.py versions before the record wrote them: the layout by
# which such a folder (config.json + train_args.json, no record) is recognised as an earlier run once.
MODEL_FILES = (
    *("config.json", "generation_config.json", "*.safetensors", "*.safetensors.index.json", "adapter_config.json"),
    adapters.ADAPTER_FILE,
    *("processor_config.json", "preprocessor_config.json", "tokenizer*.json", "special_tokens_map.json"),
    *("chat_template.jinja", "*_cnngemma.py", "NOTICE.md", "GEMMA_TERMS.html"),
)
RUN_FILES = ("metrics.json", "predictions.jsonl", "samples.html", "loss_curve.png", "train_args.json")
# Flags a resume may change: they do not change what is trained. Every other difference is refused (or applied with
# --apply_changed_flags); --max_steps may grow.
RESUME_MAY_CHANGE = {
    *("logging_steps", "report_to", "num_workers", "checkpointing_steps", "checkpoints_total_limit"),
    *("eval_steps", "max_eval_images", "eval_batch_size", "num_beams", "max_new_tokens", "compile_generation"),
    *("no_eval", "skip_baselines", "output_dir", "resume_from_checkpoint", "overwrite_output_dir"),
    *("apply_changed_flags", "max_steps"),
}
# Write failures of save_state / save_pretrained: a full disk, a file-size limit, a quota (torch.save reports them as
# RuntimeError, safetensors as SafetensorError).
SAVE_ERRORS = (OSError, RuntimeError, SafetensorError)


@dataclass
class RunFolder:
    """Where a run writes. `run_dir` is `output_dir`, or its `.overwrite-RUN_ID/` sub-folder for a replacing run."""

    output_dir: Path
    run_dir: Path
    run_id: str
    resume: Path | None = None
    kept: list[str] = field(default_factory=list)  # files already in output_dir that are not this run's
    fresh: bool = False  # output_dir was absent or empty: a run that fails before writing anything leaves no trace
    created: bool = False  # output_dir was made by this run
    locks: list = field(default_factory=list, repr=False, compare=False)

    @property
    def replacing(self) -> bool:
        return self.run_dir != self.output_dir

    def __getstate__(self):  # sent to the other processes, which hold no lock
        return {**self.__dict__, "locks": []}


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


def names(paths: list) -> str:
    shown = ", ".join(getattr(p, "name", str(p)) for p in paths[:3])
    return shown + (f" and {len(paths) - 3} more" if len(paths) > 3 else "")


def legacy_run(folder: Path) -> list[str] | None:
    """An earlier train_hf.py's run without a record: a final model with train_args.json, or complete checkpoints.
    Its own files are those of the run layout."""
    has_model = (folder / "config.json").is_file() and (folder / "train_args.json").is_file()
    if not has_model and not verified_checkpoints(folder):
        return None
    layout = []
    for name in outputs.files_under(folder):
        top = name.split("/", 1)[0]
        if "/" not in name and any(fnmatch.fnmatch(name, pattern) for pattern in MODEL_FILES + RUN_FILES):
            layout.append(name)
        elif top == "logs":
            layout.append(name)
    return layout + verified_checkpoints(folder)


def verified_checkpoints(folder: Path) -> list[str]:
    """The files of complete checkpoints whose sizes (and sha256, where recorded) still match their marker, plus the
    hidden leftovers of killed saves, which only this tool makes."""
    own = []
    for checkpoint in step_folders(folder):
        marker = read_marker(checkpoint)
        if marker is None:
            continue
        hashes = marker.get("sha256") or {}
        files = {name: {"size": size, "sha256": hashes.get(name)} for name, size in marker["files"].items()}
        for name, entry in files.items():
            path = checkpoint / name
            ok = path.is_file() and path.stat().st_size == entry["size"]
            if ok and entry["sha256"] is not None:
                ok = outputs.sha256(path) == entry["sha256"]
            if ok:
                own.append(f"checkpoints/{checkpoint.name}/{name}")
        own.append(f"checkpoints/{checkpoint.name}/{MARKER}")
    for name in outputs.files_under(folder):
        parts = name.split("/")
        if parts[0].startswith(".partial-") or (
            parts[0] == "checkpoints" and parts[1].startswith((".partial-", ".deleting-"))
        ):
            own.append(name)
    return own


def open_run_folder(args) -> RunFolder:
    """Checks OUTPUT_DIR before any work, in the launch's main process: takes its lock, refuses a folder that is not
    a run of this tool or an earlier run the flags do not resume or replace, and picks the checkpoint to resume."""
    output_dir = Path(args.output_dir)
    for path in (output_dir, output_dir / "checkpoints"):
        if path.exists() and not path.is_dir():
            raise UsageError(
                f"--output_dir {output_dir}: {path} is a file; expected a folder for checkpoints and the final model. "
                "Pass another --output_dir, or move the file away."
            )
    refuse_foreign(output_dir)  # before the lock file: nothing is written into a folder of someone else's
    created = not output_dir.exists()
    outputs.require_writable(output_dir, "--output_dir")
    lock = outputs.RunLock(output_dir).acquire()
    try:
        run = _open_run_folder(args, output_dir, lock)
        run.created = created
        return run
    except BaseException:
        lock.release()
        raise


def refuse_foreign(output_dir: Path):
    existing = outputs.survey(output_dir, TOOL, legacy_run, verified_checkpoints, verify=False)
    if existing.kind == "foreign":
        writer = f" (written by {existing.record['tool']})" if existing.record else ""
        raise UsageError(
            f"--output_dir {output_dir} holds files that train_hf.py did not write{writer}: {existing.summary()}. "
            "Expected a new or empty folder, or an earlier train_hf.py run; no flag replaces other files. Pass "
            "another --output_dir."
        )
    return existing


def _open_run_folder(args, output_dir: Path, lock) -> RunFolder:
    existing = refuse_foreign(output_dir)  # again, under the lock
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
    later = [p for p in found if ours and step_of(p) > marker["global_step"] and read_marker(p)]
    if later:
        raise UsageError(
            f"--resume_from_checkpoint {resume}: {resume.parent} also holds later checkpoints ({names(later)}), "
            "which this run would overwrite. Resume from the latest (--resume_from_checkpoint latest), or delete the "
            "later ones first."
        )
    if resume is not None:  # before the record changes: a refused resume leaves the folder as it was
        check_resume_flags(json.loads((resume / "training_state.json").read_text()), args, resume)
    run_id = marker["run_id"] if ours else uuid.uuid4().hex
    earlier_run = existing.kind in ("ours", "legacy") and not ours
    if earlier_run and not args.overwrite_output_dir:
        raise UsageError(refusal(output_dir, existing, found))
    fresh = existing.kind in ("absent", "empty")
    run = RunFolder(output_dir, output_dir, run_id, resume, existing.kept, fresh=fresh, locks=[lock])
    if earlier_run:  # --overwrite_output_dir: the new run works beside the old one until it has finished
        for stale in output_dir.glob(f"{OVERWRITE_PREFIX}*"):  # we hold the lock: their runs are gone
            shutil.rmtree(stale, ignore_errors=True)
        run.run_dir, run.kept = output_dir / f"{OVERWRITE_PREFIX}{run_id}", []
        run.run_dir.mkdir()
        run.locks.append(outputs.RunLock(run.run_dir).acquire())
    previous = outputs.read_record(run.run_dir) or {}
    files = previous.get("files", {}) if ours else {}
    outputs.write_record(run.run_dir, TOOL, files, run_id=run_id, status="running")
    return run


def refusal(output_dir: Path, existing, found: list[Path]) -> str:
    replace = (
        "replace it with --overwrite_output_dir (the earlier run is deleted only once the new one has finished; "
        "disk use doubles meanwhile), or pass another --output_dir."
    )
    if found:
        return (
            f"--output_dir {output_dir} holds another run's checkpoints ({names(found)}); a new run there would mix "
            f"with them. Continue that run with --resume_from_checkpoint latest, {replace}"
        )
    record = existing.record or {}
    what = "a finished run" if record.get("status") == "finished" or existing.kind == "legacy" else "an unfinished run"
    when = f", written {record['written']}" if record.get("written") else ""
    shown = [name for name in existing.own if "/" not in name and name not in outputs.NOT_RECORDED]
    return f"--output_dir {output_dir} holds {what} of train_hf.py{when} ({names(shown)}). To start again there, {replace}"


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
    except (OSError, ValueError, SafetensorError, zipfile.BadZipFile, EOFError) as error:
        return f"{type(error).__name__}: {error}"
    return None


def changed_flags(saved: dict | None, args) -> list[tuple[str, object, object]]:
    """(flag, checkpoint's value, this run's value) for every flag a resume may not change silently."""
    if saved is None:
        return []
    current = json.loads(json.dumps(vars(args), default=str))  # as training_state.json stores them
    return [
        (name, saved.get(name), value)
        for name, value in sorted(current.items())
        if name not in RESUME_MAY_CHANGE and name in saved and saved[name] != value
    ]


def check_resume_flags(state: dict, args, checkpoint: Path) -> list[tuple[str, object, object]]:
    """Refuses a resume whose flags change the training, unless --apply_changed_flags; returns the changes."""
    if args.max_steps and args.max_steps <= state["global_step"]:
        raise UsageError(
            f"--max_steps {args.max_steps} is at or below the step of {checkpoint} ({state['global_step']}): nothing "
            f"would train. Pass --max_steps {state['global_step'] + 1} or more to continue it."
        )
    changes = changed_flags(state.get("args"), args)
    if changes and not args.apply_changed_flags:
        listed = "; ".join(f"--{name} {new} (checkpoint: {old})" for name, old, new in changes)
        raise UsageError(
            f"--resume_from_checkpoint {checkpoint}: the flags differ from the run that wrote it: {listed}. Pass the "
            "checkpoint's values to continue it exactly, or add --apply_changed_flags to continue with the new ones."
        )
    return changes


def save_checkpoint(accelerator, run: RunFolder, state: dict, keep: int):
    """save_state into a temporary folder named for this run, mark it complete (sizes and sha256), then rename it:
    a killed run never leaves a step_N folder that looks whole. Then only this run's checkpoints beyond the newest
    `keep` are deleted."""
    final = run.run_dir / "checkpoints" / f"step_{state['global_step']:06d}"
    partial = final.with_name(f".partial-{run.run_id}-{final.name}")
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(partial))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            (partial / "training_state.json").write_text(json.dumps(state))
            files = {p.name: p.stat().st_size for p in sorted(partial.iterdir()) if p.is_file()}
            marker = dict(run_id=run.run_id, global_step=state["global_step"], num_processes=accelerator.num_processes)
            hashes = {name: outputs.sha256(partial / name) for name in files}
            (partial / MARKER).write_text(json.dumps({**marker, "files": files, "sha256": hashes}, indent=1) + "\n")
    except SAVE_ERRORS as error:
        shutil.rmtree(partial, ignore_errors=True)
        earlier = any(read_marker(p) for p in step_folders(run.run_dir))
        then = "resume from the last checkpoint (--resume_from_checkpoint latest)" if earlier else "run again"
        raise RunError(
            f"saving checkpoint {final.name} into {final.parent} failed ({type(error).__name__}: "
            f"{' '.join(str(error).split())[:200]}). Its partial folder was removed; free disk space and {then}."
        ) from None
    if accelerator.is_main_process:
        if final.exists():  # an incomplete leftover: open_run_folder refuses runs that would replace complete ones
            delete(final)
        os.replace(partial, final)
        ours = [p for p in step_folders(run.run_dir) if (read_marker(p) or {}).get("run_id") == run.run_id]
        for old in ours[:-keep]:
            delete(old)
    accelerator.wait_for_everyone()


def delete(folder: Path):
    """Renamed first: a deletion cut short leaves a hidden folder, not a step_N with files missing."""
    doomed = folder.with_name(f".deleting-{folder.name}")
    os.replace(folder, doomed)
    shutil.rmtree(doomed)


def keep_trainable_only(accelerator, model):
    """Checkpoints of a 4-bit run hold the trainable tensors only (adapters, CNN, projector): resume rebuilds the
    frozen base from --language_model, and a Linear4bit's state dict would not load back through load_state_dict.
    The buffers of trained modules (the CNN's BatchNorm statistics) count as trainable."""
    names = set()
    for prefix, module in model.named_modules():
        if any(param.requires_grad for param in module.parameters(recurse=False)):
            tensors = [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]
            names |= {f"{prefix}.{name}" if prefix else name for name, _ in tensors}

    def trainable_only(models, weights, output_dir):
        for state in weights:
            for key in [key for key in state if key not in names]:
                del state[key]

    accelerator.register_save_state_pre_hook(trainable_only)
    return names


def load_checkpoint(accelerator, checkpoint: Path, trainable: set[str] | None = None) -> dict:
    """load_state from a checkpoint that check_checkpoint passed; returns its training_state.json. With `trainable`
    (a 4-bit run), the checkpoint's model file must hold exactly those tensors; the rest of the model is the base."""
    try:
        if trainable is not None:
            with safe_open(checkpoint / "model.safetensors", "pt") as file:
                saved = set(file.keys())
            if saved != trainable:
                raise ValueError(
                    f"its model file holds {len(saved)} tensors, this run trains {len(trainable)} "
                    f"({len(saved - trainable)} unknown, {len(trainable - saved)} missing)"
                )
            accelerator.load_state(str(checkpoint), strict=False)
        else:
            accelerator.load_state(str(checkpoint))
    except (RuntimeError, ValueError, KeyError, OSError) as error:  # whole, readable files written by other flags
        detail = f"{type(error).__name__}: {' '.join(str(error).split())[:300]}"
        raise RunError(
            f"checkpoint {checkpoint} does not load into this run ({detail}). Use the flags that wrote it."
        ) from error
    return json.loads((checkpoint / "training_state.json").read_text())


def save_final_model(accelerator, model, processor, run: RunFolder, adapter_in_4bit: bool | None = None):
    """save_pretrained (model and processor) into a staging folder of this run, stamped with a new save id, then
    renamed into the run folder weights first and config.json last (`cnngemma.saving`): a run that dies while
    writing keeps its previous model, and readers never load half of each. A previous model file that the new save
    lacks (e.g. adapter files before a merged save) is deleted only if the run's record verifies it. With
    `adapter_in_4bit` set, `model` is a PeftModel saved as an adapter folder (`cnngemma.adapters`)."""
    staging = run.run_dir / f".partial-{run.run_id}-final"
    if accelerator.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)
    accelerator.wait_for_everyone()
    try:
        if adapter_in_4bit is None:
            model.save_pretrained(staging, save_function=accelerator.save, is_main_process=accelerator.is_main_process)
        else:
            adapters.save_adapter(model, staging, adapter_in_4bit, accelerator.save, accelerator.is_main_process)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            processor.save_pretrained(staging)
            for path in notice_files(model.config):  # the licence files the decoder's weights come with
                shutil.copyfile(path, staging / path.name)
            saving.stamp(staging, saving.new_save_id())
    except SAVE_ERRORS as error:
        if accelerator.is_main_process:
            shutil.rmtree(staging, ignore_errors=True)
        raise RunError(
            f"saving the final model into {run.run_dir} failed ({type(error).__name__}: "
            f"{' '.join(str(error).split())[:200]}). The partial save was removed and the folder's previous model, if "
            "any, is untouched; free disk space and run again."
        ) from None
    if not accelerator.is_main_process:
        return
    record = outputs.read_record(run.run_dir) or {"files": {}}
    new = {path.name for path in staging.iterdir()}
    stale = [
        path
        for path in run.run_dir.iterdir()
        if path.is_file()
        and path.name not in new
        and any(fnmatch.fnmatch(path.name, pattern) for pattern in MODEL_FILES)
        and outputs.matches(path, record["files"].get(path.name))
    ]
    saving.move_into_place(staging, run.run_dir)
    for path in stale:
        path.unlink()


def finish_run(run: RunFolder):
    """Main process, after the run's last write: records every file the run wrote (sizes and sha256), and a replacing
    run takes the earlier run's place (`outputs.publish`: the earlier run's verified files go, anything else stays)."""
    written = [
        name
        for name in outputs.files_under(run.run_dir)
        if name not in run.kept and not name.startswith((OVERWRITE_PREFIX, ".partial-"))
    ]
    files = outputs.describe_files(run.run_dir, written)
    outputs.write_record(run.run_dir, TOOL, files, run_id=run.run_id, status="finished")
    if run.replacing:
        staged = run.output_dir.parent / f".{run.output_dir.name}.partial-{os.getpid()}-{run.run_id}"
        os.rename(run.run_dir, staged)
        kept = outputs.publish(staged, run.output_dir, TOOL, legacy_run, "--output_dir", verified_checkpoints)
        if kept:
            print(f"{run.output_dir}: kept {len(kept)} file(s) train_hf.py did not write: {names(kept)}")
    release(run)


def abandon_run(run: RunFolder):
    """Main process, when the run fails or is interrupted: a replacing run's folder goes and the earlier run stays; a
    new run that wrote nothing yet (a refused flag, a bad dataset) takes its record and lock back."""
    if run.replacing:
        shutil.rmtree(run.run_dir, ignore_errors=True)
    elif run.fresh and not set(outputs.files_under(run.run_dir)) - outputs.NOT_RECORDED:
        for name in outputs.NOT_RECORDED:
            (run.run_dir / name).unlink(missing_ok=True)
        if run.created:
            shutil.rmtree(run.run_dir, ignore_errors=True)  # empty sub-folders at most
    release(run)


def release(run: RunFolder):
    for lock in run.locks:
        lock.release()
    run.locks.clear()
