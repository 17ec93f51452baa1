"""A diskcache `Disk` that never unpickles.

diskcache stores any key or value it cannot keep natively as a pickle, and unpickles it when
read. replay-proxy writes only text keys and byte or integer values, which diskcache keeps
natively, so a pickled key or value can only be tampering: unpickling it would run its code. It
is refused instead, as a corrupt store.
"""

from __future__ import annotations

from typing import Any

import diskcache

from ..core.errors import CassetteError


class NoPickleDisk(diskcache.Disk):  # type: ignore[misc]
    def get(self, key: Any, raw: bool) -> Any:
        if not raw:
            raise CassetteError(
                f"A key in the diskcache store at {self._directory} is a pickle, which "
                "replay-proxy never writes; refusing to load it. Delete that folder."
            )
        return super().get(key, raw)

    def fetch(self, mode: int, filename: str, value: object, read: bool) -> object:
        if mode == diskcache.core.MODE_PICKLE:
            raise CassetteError(
                f"A value in the diskcache store at {self._directory} is a pickle, which "
                "replay-proxy never writes; refusing to load it. Delete that folder."
            )
        return super().fetch(mode, filename, value, read)
