"""The configuration file: the nearest replay-proxy.toml, or pyproject.toml with a
[tool.replay-proxy] table, found and read without click.

`configuration` turns its values into option defaults (and its problems into usage errors); the
pytest plugin reads it at the start of a session that uses the proxy, before anything heavier is
imported, to find the cassette folder that test collection can skip.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CONFIG_FILE = "replay-proxy.toml"
CONFIG_ENV = "REPLAY_PROXY_CONFIG"  # names the file instead of the search (`--config`)


class ConfigFileError(ValueError):
    """A configuration file that cannot be read, or holds no options; the message names it."""


@dataclass(frozen=True)
class ConfigFile:
    path: Path
    values: Mapping[str, Any]

    @property
    def where(self) -> str:
        if self.path.name == "pyproject.toml":
            return f"[tool.replay-proxy] in {self.path}"
        return str(self.path)

    def value(self, name: str) -> Any:
        """The value of key `name` (a long option name), however the file spells it; None
        when it has none."""
        return next((value for key, value in self.values.items()
                     if normalise_key(str(key)) == name), None)


def normalise_key(key: str) -> str:
    """A file's key as a long option name: `ignore_field` and ` ignore-field` are one key."""
    return key.strip().replace("_", "-")


def named_or_found(start: Path, environ: Mapping[str, str]) -> ConfigFile | None:
    """The file REPLAY_PROXY_CONFIG names, else the nearest one from `start` up."""
    named = environ.get(CONFIG_ENV)
    return read_config(Path(named)) if named else find_config(start)


def find_config(start: Path) -> ConfigFile | None:
    """The nearest replay-proxy.toml, or pyproject.toml with [tool.replay-proxy], from `start` up."""
    folder = start.resolve()
    for candidate in (folder, *folder.parents):
        own = candidate / CONFIG_FILE
        if own.is_file():
            return read_config(own)
        project = candidate / "pyproject.toml"
        if project.is_file():
            found = read_config(project, required=False)
            if found is not None:
                return found
    return None


def read_config(path: Path, required: bool = True) -> ConfigFile | None:
    """A file's [tool.replay-proxy] table; a file other than pyproject.toml may instead hold
    the options at its top level."""
    try:
        document = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigFileError(f"Cannot read the configuration file {path}: "
                              f"{exc.strerror}.") from exc
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigFileError(f"{path} is not valid TOML: {exc}.") from exc
    tool = document.get("tool")
    table = tool.get("replay-proxy") if isinstance(tool, dict) else None
    if table is None and path.name != "pyproject.toml":
        table = document
    if table is None:
        if required:
            raise ConfigFileError(f"{path} has no [tool.replay-proxy] table.")
        return None
    if not isinstance(table, dict):
        raise ConfigFileError(f"{path}: tool.replay-proxy must be a table of options.")
    return ConfigFile(path.resolve(), table)
