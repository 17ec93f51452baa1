"""Cassettes as folders of JSON files: the format users commit and review.

`<root>/<cassette>/<label>-<key>.json`, one file per key. Writes go to a temporary file in the
same folder and are renamed into place, so a reader or a crash never sees half a file.
"""

from __future__ import annotations

import asyncio
import errno
import os
import secrets
import stat
import time
from collections.abc import Sequence
from pathlib import Path

from ..core.cassette import Entry, encode_entry, is_key, is_label
from ..core.errors import CassetteError, ProxyError
from ..core.providers import validate_cassette_name
from .base import StoredItem, checked_entry, stored_item, writable_name
from .local import LocalCoordination
from .state_dir import STATE_DIR

SLOW_WRITE_S = 0.005
# Opening a cassette file refuses a link in its last step, where the system can (not Windows):
# a plain file needs no walk to the root, a linked one gets the full check.
_NO_FOLLOW = getattr(os, "O_NOFOLLOW", 0)
_READ_FLAGS = os.O_RDONLY | _NO_FOLLOW | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)


def _write_atomically(path: Path, data: bytes) -> None:
    temporary = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    try:
        with open(temporary, "wb") as handle:
            handle.write(data)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


class DirectoryStore(LocalCoordination):
    def __init__(self, root: Path) -> None:
        self.root = root
        self.description = f"directory {root}"
        self._real_root: Path | None = None
        # Folders found (or made) inside the root, each checked once: a folder below a checked
        # one costs one lstat unless it is a link.
        self._checked: set[Path] = {root}
        super().__init__(locks=root / STATE_DIR / "locks", sequences=root / STATE_DIR / "sequences")
        self._write_cost = 0.0  # seconds: a moving average of the writes made on the loop

    def path_for(self, cassette: str, key: str, label: str) -> Path:
        """The file of a key: built from a checked cassette name, key and label only."""
        writable_name(cassette, key, label)
        return self.root / cassette / f"{label}-{key}.json"

    def _inside(self, path: Path) -> Path:
        """`path`, unless a symbolic link on the way leads out of the cassette root: a folder or
        file committed as a link to elsewhere must not be read, written or deleted through."""
        real_root = self._real_root or self.root.resolve()
        if self._real_root is None and self.root.is_dir():
            self._real_root = real_root
        if not path.resolve().is_relative_to(real_root):
            raise CassetteError(
                f"{path} is a symbolic link (or lies under one) that leads out of the cassette "
                f"root {self.root}; replay-proxy never reads or writes through it. Replace the "
                "link with a folder or file of its own."
            )
        return path

    def _check_folder(self, folder: Path) -> bool:
        """Whether `folder` exists; raises if a link on the way leads out of the root."""
        if folder in self._checked:
            return True
        if folder.parent == folder:  # not under the root (no path this store makes)
            self._inside(folder)
            return folder.is_dir()
        if not self._check_folder(folder.parent):
            return False
        try:
            mode = os.lstat(folder).st_mode
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise CassetteError(f"Cassette folder {folder} cannot be read ({exc.strerror}).") \
                from exc
        if stat.S_ISLNK(mode):
            self._inside(folder)  # a link that stays inside the root is followed
        self._checked.add(folder)
        return True

    def _read(self, path: Path) -> bytes:
        """A file in a checked folder; a link is read only if it stays inside the root."""
        if not _NO_FOLLOW:
            self._inside(path)
        try:
            descriptor = os.open(path, _READ_FLAGS)
        except OSError as exc:
            if exc.errno != errno.ELOOP:
                raise
            return self._inside(path).read_bytes()  # the file is a link
        with open(descriptor, "rb") as handle:
            return handle.read()

    async def get(self, cassette: str, key: str, label: str) -> Entry | None:
        path = self.path_for(cassette, key, label)
        if not self._check_folder(path.parent):
            return None
        try:
            raw = self._read(path)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise CassetteError(f"Cassette file {path} cannot be read ({exc.strerror}).") from exc
        return checked_entry(raw, str(path), key, label)

    async def put(self, cassette: str, entry: Entry) -> None:
        path = self.path_for(cassette, entry.key, entry.label)
        if not self._check_folder(path.parent):
            path.parent.mkdir(parents=True, exist_ok=True)
            self._check_folder(path.parent)  # what was made: nothing on the way is a link out
        data = encode_entry(entry)
        if self._write_cost > SLOW_WRITE_S:
            await asyncio.to_thread(_write_atomically, path, data)
            return
        # The clients already have their answers. A local write costs less than handing it to a
        # thread (whose wake-ups and GIL hand-overs slow the next request); on a slow disk or
        # network file system, writes move to a thread so that the event loop keeps serving.
        started = time.perf_counter()
        _write_atomically(path, data)
        self._write_cost += (time.perf_counter() - started - self._write_cost) * 0.2

    async def delete(self, cassette: str, key: str, label: str) -> bool:
        try:
            path = self.path_for(cassette, key, label)
            self._check_folder(path.parent)  # a linked file may go, nothing through a folder
        except ProxyError:  # (CassetteError included) no file this store would have made
            return False
        try:
            path.unlink()
        except FileNotFoundError:
            return False
        return True

    async def cassettes(self) -> list[str]:
        if not self.root.is_dir():
            return []
        names = set()
        # os.walk does not follow links to folders; a linked folder is listed by name, so that
        # `ls` shows it refused (or, when it stays inside the root, its files under its name).
        for folder, folders, files in os.walk(self.root):
            here = Path(folder)
            relative = here.relative_to(self.root)
            folders[:] = [name for name in folders if not name.startswith(".")]
            for name in folders:
                if (here / name).is_symlink():
                    names.add((relative / name).as_posix())
            if relative.parts and any(name.endswith(".json") and not name.startswith(".")
                                      for name in files):
                names.add(relative.as_posix())
        return sorted(names)

    async def items(self, cassette: str) -> Sequence[StoredItem]:
        folder = self.root / cassette
        try:
            validate_cassette_name(cassette)
            if not self._check_folder(folder):
                return []
        except ProxyError as exc:  # CassetteError included
            error = CassetteError(f"Cassette {cassette!r} in {self.root}: {exc.message}")
            return [StoredItem(cassette, "", "", None, error)]
        found = []
        for path in sorted(folder.glob("*.json")):
            if path.name.startswith("."):
                continue
            label, _, key = path.stem.rpartition("-")
            if not is_key(key) or not is_label(label):
                found.append(StoredItem(cassette, label, key, None, CassetteError(
                    f"Cassette file {path} is not named <label>-<key>.json as replay-proxy "
                    "names its files, so it is never used. Rename or delete it.")))
                continue
            try:
                raw = self._read(path)
            except CassetteError as exc:
                found.append(StoredItem(cassette, label, key, None, exc))
                continue
            except OSError as exc:
                found.append(StoredItem(cassette, label, key, None, CassetteError(
                    f"Cassette file {path} cannot be read ({exc.strerror}).")))
                continue
            found.append(stored_item(cassette, label, key, raw, str(path)))
        return found

    async def close(self) -> None:
        self.close_coordination()
