"""One way for every command to report bad input: `UsageError` (exit 2) and `RunError` (exit 1), printed as one
`error: ...` line that says what was received, what was expected and how to fix it, plus the shared flag checks."""

import argparse
import math
import sys
from collections.abc import Callable


class UsageError(ValueError):
    """Bad flags found before any work starts: printed as one 'error: ...' line, exit code 2."""


class RunError(RuntimeError):
    """A fault in the data, a saved file or the run itself (not in the flags): one 'error: ...' line, exit code 1."""


def first_line(error: BaseException, limit: int = 300) -> str:
    """The first line of an exception's message, cut to `limit` characters: library messages can be pages long."""
    text = (str(error).strip().splitlines() or [""])[0]
    return text if len(text) <= limit else text[: limit - 3] + "..."


INTERRUPTED = (
    "interrupted (Ctrl-C): stopped before the end. Outputs are replaced only once complete, so earlier ones are as "
    "they were; a training run resumes with --resume_from_checkpoint latest."
)


def run_command(function: Callable[[], int | None]) -> int:
    """Runs a command's body and returns its exit code (0 when it returns None); a UsageError or RunError becomes
    one line on stderr and exit code 2 or 1, and Ctrl-C one line and 130 (the shell's code for SIGINT)."""
    try:
        return function() or 0
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except RunError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # the cleanup of each output (its lock, its partial files) has run on the way out
        print(INTERRUPTED, file=sys.stderr)
        return 130


def check_ranges(args, rules: list[tuple[str, bool, str]]):
    """Out-of-range flags fail before anything is loaded, naming the flag, the value and the range."""
    for name, ok, allowed in rules:
        if not ok:
            raise UsageError(f"--{name} {getattr(args, name)} is out of range; expected {allowed}.")


def finite(value: float) -> bool:
    return value is not None and math.isfinite(value)


def check_paths(args, names: tuple[str, ...]):
    """An empty or blank path flag (an unset shell variable, `--output_dir "$OUT"`) is refused: Path("") is the
    current folder, which the command would then write into or read from."""
    for name in names:
        value = getattr(args, name, None)
        if isinstance(value, str) and not value.strip():
            flag = name if name.startswith("-") else f"--{name}"
            raise UsageError(
                f"{flag} {value!r} is empty; expected a path. Pass one (an unset shell variable gives an empty value)."
            )


def path_type(text: str) -> str:
    """An argparse `type` for path flags: refuses an empty or blank value when the flags are read."""
    if not text.strip():
        raise argparse.ArgumentTypeError(
            f"got {text!r}, expected a path. Pass one (an unset shell variable gives an empty value)"
        )
    return text


def seed_type(text: str) -> int:
    """An argparse `type` for seeds: the range NumPy, torch and Python's random all accept."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"got {text!r}, expected a whole number in 0..4294967295") from None
    if not 0 <= value < 2**32:
        raise argparse.ArgumentTypeError(f"got {value}, expected a whole number in 0..4294967295 (NumPy's range)")
    return value
