"""`.replay-proxy/` beside the cassettes: the proxy's own files (locks, usage log, run counters),
ignored by git wherever the cassettes are committed."""

from __future__ import annotations

from pathlib import Path

STATE_DIR = ".replay-proxy"
# The names the proxy writes under STATE_DIR.
_OWN_NAMES = (".gitignore", "usage.jsonl", "runs", "locks", "sequences")


class StateDirRefused(OSError):
    """The state folder, or a name the proxy writes in it, is a symbolic link."""


def state_dir(cassettes: Path) -> Path:
    return cassettes / STATE_DIR


def ensure_state_dir(directory: Path) -> None:
    """Create the folder with a .gitignore that ignores everything in it.

    The folder sits beside cassettes that arrive in pull requests, so it could arrive as a link
    to elsewhere: then nothing is written through it (StateDirRefused, an OSError, which the
    callers treat as a folder they cannot write)."""
    for path in (directory, *(directory / name for name in _OWN_NAMES)):
        if path.is_symlink():
            raise StateDirRefused(
                f"{path} is a symbolic link; replay-proxy keeps its own files there and never "
                "writes through a link. Remove it (the proxy makes the folder again)."
            )
    if not directory.is_dir():
        directory.mkdir(parents=True, exist_ok=True)
        (directory / ".gitignore").write_text("# replay-proxy's usage log and locks\n*\n")
