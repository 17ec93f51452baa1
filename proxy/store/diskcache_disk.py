"""A diskcache `Disk` that never unpickles, and never touches a file it did not name.

diskcache stores any key or value it cannot keep natively as a pickle, and unpickles it when
read. replay-proxy writes only text keys and byte or integer values, which diskcache keeps
natively, so a pickled key or value can only be tampering: unpickling it would run its code.
A pickled value is refused as a corrupt store. A pickled key is never loaded either: listing
keys yields a `RefusedKey` in its place, so that one planted row is reported while every
other key keeps working.

diskcache also keeps large values in files whose names it reads back from its database, and
opens or deletes them by that name: a planted row naming `../../somewhere` would be read or
deleted outside the store. Only names of the shape diskcache itself generates, inside the
store's folder, are opened or removed.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from typing import Any

import diskcache

from ..core.errors import CassetteError

# What Disk.filename() generates: two levels of two hex digits, then 28 hex digits and `.val`.
_VALUE_FILE = re.compile(r"[0-9a-f]{2}/[0-9a-f]{2}/[0-9a-f]{28}\.val")


@dataclass(frozen=True)
class RefusedKey:
    """A row whose key is a pickle, listed without loading it: `digest` tells rows apart."""

    digest: str

    def __str__(self) -> str:
        return f"pickled key {self.digest}"


class NoPickleDisk(diskcache.Disk):  # type: ignore[misc]
    def get(self, key: Any, raw: bool) -> Any:
        if not raw:
            data = key if isinstance(key, (bytes, memoryview)) else repr(key).encode()
            return RefusedKey(hashlib.sha256(data).hexdigest()[:16])
        return super().get(key, raw)

    def fetch(self, mode: int, filename: str | None, value: object, read: bool) -> object:
        if mode == diskcache.core.MODE_PICKLE:
            raise CassetteError(
                f"A value in the diskcache store at {self._directory} is a pickle, which "
                "replay-proxy never writes; refusing to load it. Delete that folder."
            )
        if mode in (diskcache.core.MODE_BINARY, diskcache.core.MODE_TEXT):
            self._own_file(filename)
        elif mode != diskcache.core.MODE_RAW:
            raise CassetteError(f"A value in the diskcache store at {self._directory} has an "
                                f"unknown storage mode ({mode!r}); delete that folder.")
        return super().fetch(mode, filename, value, read)

    def remove(self, file_path: str) -> None:
        # A name this store did not generate is left alone: the row is gone either way, and a
        # planted name must not delete a file elsewhere.
        try:
            self._own_file(file_path)
        except CassetteError:
            return
        super().remove(file_path)

    def _own_file(self, filename: object) -> None:
        directory = os.path.realpath(self._directory)
        if isinstance(filename, str) and _VALUE_FILE.fullmatch(filename.replace(os.sep, "/")):
            real = os.path.realpath(os.path.join(self._directory, filename))
            if real.startswith(directory + os.sep):
                return
        raise CassetteError(
            f"A row in the diskcache store at {self._directory} names the value file "
            f"{str(filename)[:80]!r}, which is not one diskcache made inside the store; "
            "refusing to open it. Delete that folder."
        )
