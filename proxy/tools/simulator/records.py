"""What the simulator keeps between calls: uploaded files and the stateful resources, in memory.

Everything is bounded so that a long benchmark cannot grow the simulator without limit: each
kind of resource keeps at most `SimulatorState.resource_limit` entries and the files at most
`SimulatorState.file_bytes_limit` bytes of content; past either, the oldest are dropped, the way
the real API expires what nobody fetched. A dropped resource answers 404 like any unknown id.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from .lifecycle import Progress

Item = TypeVar("Item")


class Bounded(Generic[Item]):
    """Entries by id in creation order; adding past the limit drops the oldest."""

    def __init__(self) -> None:
        self._entries: dict[str, Item] = {}

    def add(self, key: str, item: Item, limit: int) -> None:
        self._entries[key] = item
        while len(self._entries) > max(limit, 1):
            del self._entries[next(iter(self._entries))]

    def get(self, key: str) -> Item | None:
        return self._entries.get(key)

    def pop(self, key: str) -> Item | None:
        return self._entries.pop(key, None)

    def newest_first(self) -> list[Item]:
        return list(reversed(self._entries.values()))

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[Item]:
        return iter(list(self._entries.values()))


@dataclass(frozen=True)
class StoredFile:
    id: str
    filename: str
    purpose: str
    created_at: int
    content: bytes
    expires_at: int | None = None


class FileStore(Bounded[StoredFile]):
    """Files under a byte budget as well as a count: their content is what takes memory."""

    def __init__(self) -> None:
        super().__init__()
        self.total_bytes = 0

    def put(self, stored: StoredFile, limit: int, byte_limit: int) -> None:
        self._entries[stored.id] = stored
        self.total_bytes += len(stored.content)
        # The newest file stays even when it alone is over the budget: it was just accepted.
        while len(self._entries) > 1 and (len(self._entries) > max(limit, 1)
                                          or self.total_bytes > byte_limit):
            oldest = self._entries.pop(next(iter(self._entries)))
            self.total_bytes -= len(oldest.content)

    def pop(self, key: str) -> StoredFile | None:
        stored = self._entries.pop(key, None)
        if stored is not None:
            self.total_bytes -= len(stored.content)
        return stored

    def clear(self) -> None:
        super().clear()
        self.total_bytes = 0


@dataclass
class BatchRecord:
    id: str
    provider: str
    endpoint: str
    route: str  # the endpoint as a simulator route, e.g. "chat/completions"
    input_file_id: str
    completion_window: str
    metadata: dict[str, Any] | None
    created_at: int
    progress: Progress
    line_count: int
    # The input file's bytes while the batch still has to run them (the same object the file
    # store holds, not a copy); dropped once the batch ends.
    pending_input: bytes | None
    model: str | None = None
    errors: list[dict[str, Any]] | None = None
    # The answers, computed when the batch starts finalizing and filed once it completes.
    output_lines: list[bytes] | None = None
    error_lines: list[bytes] | None = None
    output_file_id: str | None = None
    error_file_id: str | None = None
    completed: int = 0
    failed: int = 0
    usage: dict[str, Any] | None = None


@dataclass
class StoredResponse:
    id: str
    final: dict[str, Any]  # the object as it reads once completed
    progress: Progress | None  # None: answered in the foreground, completed from the start


@dataclass
class VectorStoreFileRecord:
    file_id: str
    created_at: int
    usage_bytes: int
    progress: Progress
    attributes: dict[str, Any] | None
    chunking_strategy: dict[str, Any]
    batch_id: str | None = None


@dataclass
class FileBatchRecord:
    id: str
    created_at: int
    file_ids: tuple[str, ...]
    cancelled: bool = False


@dataclass
class VectorStoreRecord:
    id: str
    name: str
    created_at: int
    metadata: dict[str, Any] | None
    expires_after: dict[str, Any] | None
    last_active_at: int
    files: Bounded[VectorStoreFileRecord] = field(default_factory=Bounded)
    file_batches: Bounded[FileBatchRecord] = field(default_factory=Bounded)


@dataclass
class FineTuningJobRecord:
    id: str
    model: str
    training_file: str
    validation_file: str | None
    created_at: int
    progress: Progress
    seed: int
    hyperparameters: dict[str, Any]  # as requested
    method: dict[str, Any] | None  # as requested
    suffix: str | None
    metadata: dict[str, Any] | None
    trained_tokens: int
    events: list[dict[str, Any]] = field(default_factory=list)
    fine_tuned_model: str | None = None
    result_file_id: str | None = None


@dataclass
class Resources:
    files: FileStore = field(default_factory=FileStore)
    batches: Bounded[BatchRecord] = field(default_factory=Bounded)
    responses: Bounded[StoredResponse] = field(default_factory=Bounded)
    vector_stores: Bounded[VectorStoreRecord] = field(default_factory=Bounded)
    fine_tuning_jobs: Bounded[FineTuningJobRecord] = field(default_factory=Bounded)

    def clear(self) -> None:
        for collection in (self.files, self.batches, self.responses, self.vector_stores,
                           self.fine_tuning_jobs):
            collection.clear()

    def counts(self) -> dict[str, int]:
        return {"files": len(self.files), "file_bytes": self.files.total_bytes,
                "batches": len(self.batches), "responses": len(self.responses),
                "vector_stores": len(self.vector_stores),
                "fine_tuning_jobs": len(self.fine_tuning_jobs)}
