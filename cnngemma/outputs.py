"""The rules for every folder a CNNGemma command writes: it replaces only its own earlier output, and only once the new
one is complete; one writer at a time.

- **Record.** A finished output holds `cnngemma_output.json`: the tool, the package version, and every file it wrote
  with its size and sha256. Only files listed there, still of that size and hash, are ever deleted. Outputs of earlier
  versions (no record) are recognised by their layout once; files outside that layout are kept and listed.
- **New first.** The new output is written completely into a hidden sibling (`.NAME.partial-PID-*`), then swapped in
  with two renames; files of the old folder that are not verifiably the tool's own are moved into the new one, and
  the rest of the old one is deleted last. Disk use doubles until the swap.
- **Lock.** `RunLock` holds an exclusive `flock` on `FOLDER/.cnngemma.lock` while a command writes there.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import hashlib
import json
import os
import shutil
import socket
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from .errors import RunError, UsageError

RECORD = "cnngemma_output.json"
LOCK = ".cnngemma.lock"
NOT_RECORDED = {RECORD, LOCK}
LegacyRule = Callable[[Path], "list[str] | None"]  # a folder -> the relative paths an older version wrote, or None


def version() -> str:
    try:
        from importlib.metadata import version as package_version

        return f"cnngemma {package_version('cnngemma')}"
    except Exception:  # not installed (a copied checkout): the record still names the tool
        return "cnngemma (not installed)"


def sha256(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while block := file.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def files_under(folder: Path) -> list[str]:
    """Every regular file below `folder` as a sorted relative POSIX path (symlinks are listed, not followed)."""
    found = []
    for root, dirs, files in os.walk(folder):
        base = Path(root).relative_to(folder)
        found += [(base / name).as_posix() for name in files]
        found += [(base / name).as_posix() for name in dirs if (Path(root) / name).is_symlink()]
    return sorted(found)


def describe_files(folder: Path, names: list[str] | None = None) -> dict[str, dict]:
    """{relative path: {size, sha256}} for `names` (default: every file) under `folder`."""
    names = files_under(folder) if names is None else names
    return {
        name: {"size": (folder / name).stat().st_size, "sha256": sha256(folder / name)}
        for name in names
        if name not in NOT_RECORDED and (folder / name).is_file() and not (folder / name).is_symlink()
    }


def write_record(folder: Path, tool: str, files: dict[str, dict] | None = None, **extra) -> dict:
    """Writes the record of what `tool` wrote in `folder` (default: every file there), atomically."""
    record = {
        "tool": tool,
        "version": version(),
        "written": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        **extra,
        "files": describe_files(folder) if files is None else files,
    }
    write_text_atomically(folder / RECORD, json.dumps(record, indent=1) + "\n")
    return record


def read_record(folder: Path) -> dict | None:
    try:
        record = json.loads((folder / RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if isinstance(record, dict) and isinstance(record.get("tool"), str) and isinstance(record.get("files"), dict):
        return record
    return None


def write_text_atomically(path: Path, text: str):
    """Writes a file beside its target and renames it into place: a reader sees the old or the new content."""
    partial = path.with_name(f".{path.name}.partial-{os.getpid()}")
    try:
        partial.write_text(text, encoding="utf-8")
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


@dataclass
class Existing:
    """What is at an output path before a command writes there."""

    path: Path
    kind: str  # "absent", "empty", "ours" (a record of this tool), "legacy" (an older version's layout), "foreign"
    own: list[str] = field(default_factory=list)  # files this tool wrote and may delete (verified when recorded)
    kept: list[str] = field(default_factory=list)  # everything else there: never deleted
    record: dict | None = None

    def summary(self, limit: int = 4) -> str:
        shown = ", ".join(self.kept[:limit])
        return shown + (f" and {len(self.kept) - limit} more" if len(self.kept) > limit else "")


def survey(
    path: Path, tool: str, legacy: LegacyRule | None = None, verified: LegacyRule | None = None, verify: bool = True
) -> Existing:
    """Classifies `path` for `tool`. `verified` names files that are the tool's own by a check of their own (e.g.
    checkpoints against their markers); `verify=False` trusts names in the record without hashing (enough to decide
    whether to refuse; `publish` verifies before it deletes). A file in the way is refused here."""
    path = Path(path)
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        raise UsageError(
            f"{path} is a {'symlink' if path.is_symlink() else 'file'}; expected a folder for {tool}'s output. "
            "Pass another path; nothing was changed."
        )
    if not path.exists():
        return Existing(path, "absent")
    present = files_under(path)
    if not set(present) - NOT_RECORDED:  # empty folders, or only a lock file
        return Existing(path, "empty", [name for name in present if name in NOT_RECORDED])
    record = read_record(path)
    extra = set(verified(path)) if verified is not None else set()
    if record is not None and record["tool"] == tool:
        recorded = record["files"]
        own = [
            name
            for name in present
            if name in NOT_RECORDED
            or name in extra
            or (matches(path / name, recorded.get(name)) if verify else name in recorded)
        ]
        return Existing(path, "ours", own, [name for name in present if name not in own], record)
    if record is None and legacy is not None and (layout := legacy(path)) is not None:
        own = [name for name in present if name in set(layout) | extra | NOT_RECORDED]
        return Existing(path, "legacy", own, [name for name in present if name not in own])
    return Existing(path, "foreign", [], [name for name in present if name not in NOT_RECORDED], record)


def matches(path: Path, entry: dict | None) -> bool:
    """The file is still the one recorded: same size (cheap, first) and same sha256."""
    if not isinstance(entry, dict) or path.is_symlink() or not path.is_file():
        return False
    return path.stat().st_size == entry.get("size") and sha256(path) == entry.get("sha256")


def refuse_foreign(existing: Existing, tool: str, flag: str):
    if existing.kind == "foreign":
        writer = f" (written by {existing.record['tool']})" if existing.record else ""
        raise UsageError(
            f"{flag} {existing.path} holds files that {tool} did not write{writer}: {existing.summary()}. Expected a "
            f"new or empty folder, or an earlier output of {tool}; no flag replaces other files. Pass another "
            f"{flag}."
        )


def check_replaceable(target, tool: str, legacy: LegacyRule | None = None, flag: str = "--output"):
    """Before any work: refuses an output path that holds files `tool` did not write (one line naming them)."""
    refuse_foreign(survey(Path(target), tool, legacy, verify=False), tool, flag)


def remove_stale(target: Path) -> list[Path]:
    """Removes hidden leftovers of killed runs beside `target` whose process is gone: `.NAME.partial-PID-*` folders
    (wholly this tool's) and, from `.NAME.old-PID-*` folders, only the files their record verifies. Returns the
    leftovers that still hold other files, which are kept."""
    kept = []
    for leftover in target.parent.glob(f".{target.name}.*-*"):
        kind, _, rest = leftover.name[len(target.name) + 2 :].partition("-")
        pid = rest.split("-")[0]
        if kind not in ("partial", "old") or not pid.isdigit() or pid_alive(int(pid)) or not leftover.is_dir():
            continue
        if kind == "partial":
            shutil.rmtree(leftover, ignore_errors=True)
        elif delete_own(leftover, read_record(leftover)):
            kept.append(leftover)
    return kept


def delete_own(folder: Path, record: dict | None, own: list[str] | None = None) -> list[str]:
    """Deletes from `folder` the files its record verifies and the files in `own` (already verified by `survey`),
    then empty sub-folders and the folder itself if empty. Returns the files left there."""
    names = files_under(folder)
    for name in names:
        recorded = record is not None and matches(folder / name, record["files"].get(name))
        if recorded or name in NOT_RECORDED or (own is not None and name in own):
            (folder / name).unlink()
    for root, _, _ in sorted(os.walk(folder), key=lambda item: -len(item[0])):
        with contextlib.suppress(OSError):
            os.rmdir(root)  # only empty ones go
    return files_under(folder) if folder.exists() else []


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def new_partial(target: Path) -> Path:
    """A fresh hidden folder beside `target`, with the permissions an ordinary new folder gets."""
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-{os.getpid()}-", dir=target.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(partial, 0o777 & ~umask)  # mkdtemp makes it private; the output should read like any other folder
    return partial


def publish(
    new: Path,
    target: Path,
    tool: str,
    legacy: LegacyRule | None = None,
    flag: str = "--output",
    verified: LegacyRule | None = None,
) -> list[str]:
    """Swaps the complete folder `new` (holding its record) in at `target`. Files at `target` that are not verifiably
    `tool`'s own are moved into the new folder (a name the new output also uses goes under `kept-TIMESTAMP/`); the
    old folder's own files are deleted last. Returns the kept files' new relative paths."""
    existing = survey(target, tool, legacy, verified)
    refuse_foreign(existing, tool, flag)  # checked again: the folder may have changed while the new one was written
    if existing.kind == "absent":
        os.rename(new, target)
        return []
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-{os.getpid()}-", dir=target.parent))
    os.rmdir(old)
    os.rename(target, old)
    os.rename(new, target)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    moved = []
    for name in existing.kept:
        destination = name if not taken(target, name) else f"kept-{stamp}/{name}"
        (target / destination).parent.mkdir(parents=True, exist_ok=True)
        os.rename(old / name, target / destination)
        moved.append(destination)
    left = delete_own(old, None, existing.own)  # verified by survey above
    if left:  # changed while we worked: never deleted, the folder stays beside the output
        print(f"warning: {old} still holds {', '.join(left[:4])}: moved aside, not deleted.", file=sys.stderr)
    return moved


def taken(folder: Path, name: str) -> bool:
    """Whether the relative path `name` cannot be made in `folder`: it exists, or a folder on its way is a file
    there (a kept README.md/notes.txt when the new output has a README.md file)."""
    parents = Path(name).parents
    return os.path.lexists(folder / name) or any(
        os.path.lexists(folder / parent) and not (folder / parent).is_dir() for parent in list(parents)[:-1]
    )


@contextlib.contextmanager
def replace_folder(
    target: str | Path, tool: str, legacy: LegacyRule | None = None, flag: str = "--output", **record_extra
) -> Iterator[Path]:
    """Yields an empty hidden folder beside `target`; when the block ends without an error, records its files and
    swaps it in with `publish`. On any error (or Ctrl-C) the hidden folder goes and `target` is untouched."""
    target = Path(target)
    check_replaceable(target, tool, legacy, flag)
    remove_stale(target)
    partial = new_partial(target)
    try:
        yield partial
        write_record(partial, tool, **record_extra)
        kept = publish(partial, target, tool, legacy, flag)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    if kept:
        print(f"{target}: kept {len(kept)} file(s) that {tool} did not write: {', '.join(kept[:4])}", file=sys.stderr)


class RunLock:
    """An exclusive `flock` on FOLDER/.cnngemma.lock for as long as a command writes into FOLDER. The file names
    the holder (host, PID, start time, command) for the message another writer gets; the kernel drops the lock when
    the process ends, however it ends, so a stale file never blocks anyone."""

    def __init__(self, folder: Path, flag: str = "--output_dir"):
        self.folder, self.flag, self.file = Path(folder), flag, None

    def acquire(self) -> RunLock:
        path = self.folder / LOCK
        file = open(path, "a+", encoding="utf-8")  # noqa: SIM115 - held open for the lock's lifetime
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            file.seek(0)
            holder = file.read().strip() or "another process"
            file.close()
            raise UsageError(
                f"{self.flag} {self.folder} is in use by {holder}. One writer at a time: wait for it to finish, or "
                f"pass another {self.flag}."
            ) from None
        file.seek(0)
        file.truncate()
        started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
        command = " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])[:200]
        file.write(f"{socket.gethostname()} PID {os.getpid()} (started {started}: {command})\n")
        file.flush()
        self.file = file
        return self

    def release(self):
        if self.file is not None:
            self.file.close()  # closing drops the flock; the file stays (deleting lock files races)
            self.file = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


def require_writable(folder: Path, flag: str):
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as error:
        raise UsageError(f"{flag} {folder} cannot be written ({error.strerror}). Pass a writable folder.") from error


def no_space_message(error: OSError, what: str) -> RunError:
    """A failed write (disk full, file-size limit, quota) as one RunError line."""
    return RunError(
        f"{what} failed: {error.strerror or error} ({type(error).__name__}). Nothing half-written was kept; free "
        "space (or raise the limit) and run again."
    )
