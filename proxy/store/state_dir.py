"""`.replay-proxy/` beside the cassettes: the proxy's own files (locks, usage log, run counters),
ignored by git wherever the cassettes are committed."""

from __future__ import annotations

from pathlib import Path

STATE_DIR = ".replay-proxy"


def state_dir(cassettes: Path) -> Path:
    return cassettes / STATE_DIR


def ensure_state_dir(directory: Path) -> None:
    """Create the folder with a .gitignore that ignores everything in it."""
    if not directory.is_dir():
        directory.mkdir(parents=True, exist_ok=True)
        (directory / ".gitignore").write_text("# replay-proxy's usage log and locks\n*\n")
