"""Atomic output folders: everything is written to a hidden sibling folder and renamed into place at the end.

A build that is killed midway leaves only a hidden `.NAME.partial-PID-*` folder, which the next run removes, so
`DIR` is either absent, the previous complete output or the new complete output; never half-written.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

MARKER = "stats.json"  # every finished output folder has it; only such folders are ever replaced


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_partials(output: Path) -> list[Path]:
    """Remove leftovers of killed runs (`.NAME.partial-PID-*`, `.NAME.old-PID-*`) whose process is gone."""
    removed = []
    for leftover in output.parent.glob(f".{output.name}.*-*"):
        kind, _, rest = leftover.name[len(output.name) + 2 :].partition("-")
        pid = rest.split("-")[0]
        if kind in ("partial", "old") and pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(leftover, ignore_errors=True)
            removed.append(leftover)
    return removed


def check_replaceable(output: Path) -> None:
    """Refuse to replace a file, or a folder that is not an earlier output of this tool (it might be someone's data)."""
    if output.exists() and not output.is_dir():
        raise FileExistsError(
            f"--output {output} is a file. Expected a folder: a new or empty one, or an earlier output to replace. "
            "Fix: choose another --output; a file is never replaced."
        )
    if output.is_dir() and any(output.iterdir()) and not (output / MARKER).is_file():
        raise FileExistsError(
            f"--output {output} exists and is not a dataset_builder output (no {MARKER}). "
            "Expected a new or empty folder, or an earlier output to replace. "
            "Fix: choose another --output or remove that folder."
        )


@contextlib.contextmanager
def atomic_directory(output: str | Path) -> Iterator[Path]:
    """Yield a temporary folder next to `output`; on success it replaces `output` in two renames."""
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    check_replaceable(output)
    remove_stale_partials(output)
    partial = Path(tempfile.mkdtemp(prefix=f".{output.name}.partial-{os.getpid()}-", dir=output.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(partial, 0o777 & ~umask)  # mkdtemp makes it private; the output should read like any other folder
    try:
        yield partial
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    old = None
    if output.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{output.name}.old-{os.getpid()}-", dir=output.parent))
        os.rmdir(old)
        os.rename(output, old)
    os.rename(partial, output)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
