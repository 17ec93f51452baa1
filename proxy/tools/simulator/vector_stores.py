"""Vector stores, the files attached to them, and file batches.

An attached file answers `in_progress` and is processed one step per retrieve that shows it:
its own retrieve, its file batch's retrieve, or its vector store's retrieve. After
`poll_steps` such retrieves in progress, the next one completes it. A vector store is
`in_progress` while any of its files is, a file batch likewise, and their `file_counts`
count their files' statuses. While something is in progress its answers carry
`openai-poll-after-ms`, the interval the SDK's poll helpers (`create_and_poll`,
`upload_and_poll`) sleep between retrieves.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from typing import Any

from aiohttp import web

from .files import require_file
from .lifecycle import Lifecycle, Progress
from .records import FileBatchRecord, VectorStoreFileRecord, VectorStoreRecord
from .state import SIM_STATE, SimulatorState
from .wire import ApiError, Call, Endpoint, json_response, missing, now, page, poll_hint

FILE_LIFECYCLE = Lifecycle(created="in_progress", stages=("in_progress",), working="in_progress",
                           finished="completed")
_STATUSES = ("in_progress", "completed", "failed", "cancelled")


def _chunking(requested: Any) -> dict[str, Any]:
    """The strategy as the API reports it: `auto` (or none) is its static default."""
    if isinstance(requested, dict) and requested.get("type") == "static":
        return {"type": "static", "static": dict(requested.get("static") or {})}
    return {"type": "static", "static": {"max_chunk_size_tokens": 800, "chunk_overlap_tokens": 400}}


def _file_counts(records: Iterable[VectorStoreFileRecord]) -> dict[str, int]:
    counts = dict.fromkeys(_STATUSES, 0)
    for record in records:
        counts[record.progress.status] += 1
    return {**counts, "total": sum(counts.values())}


def _attach(state: SimulatorState, store: VectorStoreRecord, file_id: str,
            attributes: dict[str, Any] | None, chunking: Any,
            batch_id: str | None = None) -> VectorStoreFileRecord:
    stored = require_file(state, file_id, param="file_id")
    created = now()
    record = VectorStoreFileRecord(file_id=stored.id, created_at=created,
                                   usage_bytes=len(stored.content),
                                   progress=Progress(FILE_LIFECYCLE, state.poll_steps, created),
                                   attributes=attributes, chunking_strategy=_chunking(chunking),
                                   batch_id=batch_id)
    store.files.add(stored.id, record, state.resource_limit)
    return record


def _file_object(store: VectorStoreRecord, record: VectorStoreFileRecord) -> dict[str, Any]:
    status = record.progress.status
    return {"id": record.file_id, "object": "vector_store.file",
            "usage_bytes": record.usage_bytes if status == "completed" else 0,
            "created_at": record.created_at, "vector_store_id": store.id, "status": status,
            "last_error": None, "chunking_strategy": record.chunking_strategy,
            "attributes": record.attributes or {}}


def _store_object(store: VectorStoreRecord) -> dict[str, Any]:
    counts = _file_counts(store.files)
    days = (store.expires_after or {}).get("days")
    return {"id": store.id, "object": "vector_store", "created_at": store.created_at,
            "name": store.name,
            "usage_bytes": sum(r.usage_bytes for r in store.files
                               if r.progress.status == "completed"),
            "file_counts": counts,
            "status": "in_progress" if counts["in_progress"] else "completed",
            "expires_after": store.expires_after,
            "expires_at": store.last_active_at + int(days) * 86_400 if days else None,
            "last_active_at": store.last_active_at, "metadata": store.metadata or {}}


def _batch_files(store: VectorStoreRecord, batch: FileBatchRecord) -> list[VectorStoreFileRecord]:
    """The batch's files still attached by it (a later attachment of the same file is not)."""
    found = (store.files.get(file_id) for file_id in batch.file_ids)
    return [record for record in found if record is not None and record.batch_id == batch.id]


def _batch_object(store: VectorStoreRecord, batch: FileBatchRecord) -> dict[str, Any]:
    counts = _file_counts(_batch_files(store, batch))
    status = "cancelled" if batch.cancelled else \
        "in_progress" if counts["in_progress"] else "completed"
    return {"id": batch.id, "object": "vector_store.files_batch", "created_at": batch.created_at,
            "vector_store_id": store.id, "status": status, "file_counts": counts}


def _answer(request: web.Request, payload: dict[str, Any]) -> web.Response:
    state = request.app[SIM_STATE]
    return json_response(request, state, payload,
                         extra_headers=poll_hint(state, payload["status"] == "in_progress"))


def _store(state: SimulatorState, call: Call) -> VectorStoreRecord:
    store_id = call.params["vector_store_id"]
    store = state.resources.vector_stores.get(store_id)
    if store is None:
        raise ApiError(404, f"No vector store found with id '{store_id}'.")
    store.last_active_at = now()
    return store


def _attached(store: VectorStoreRecord, call: Call) -> VectorStoreFileRecord:
    file_id = call.params["file_id"]
    record = store.files.get(file_id)
    if record is None:
        raise ApiError(404, f"No file found with id '{file_id}' in vector store '{store.id}'.")
    return record


def _file_batch(store: VectorStoreRecord, call: Call) -> FileBatchRecord:
    batch_id = call.params["batch_id"]
    batch = store.file_batches.get(batch_id)
    if batch is None:
        raise ApiError(404, f"No file batch found with id '{batch_id}' in vector store "
                       f"'{store.id}'.")
    return batch


def _listed(request: web.Request, store: VectorStoreRecord,
            records: Iterable[VectorStoreFileRecord]) -> web.Response:
    wanted = request.query.get("filter")
    shown = [_file_object(store, record) for record in records
             if wanted is None or record.progress.status == wanted]
    return json_response(request, request.app[SIM_STATE], page(request, shown))


def _file_ids(body: dict[str, Any], name: str) -> list[str]:
    file_ids = body.get(name) or []
    if not isinstance(file_ids, list) or not all(isinstance(i, str) for i in file_ids):
        raise ApiError(400, f"Invalid '{name}': expected an array of file ids.", param=name)
    return file_ids


async def _create_store(request: web.Request, call: Call) -> web.StreamResponse:
    state = request.app[SIM_STATE]
    file_ids = _file_ids(call.body, "file_ids")
    for file_id in file_ids:
        require_file(state, file_id, param="file_ids")
    created = now()
    store = VectorStoreRecord(id="vs_" + uuid.uuid4().hex, name=str(call.body.get("name") or ""),
                              created_at=created, metadata=call.body.get("metadata"),
                              expires_after=call.body.get("expires_after"),
                              last_active_at=created)
    for file_id in file_ids:
        _attach(state, store, file_id, None, call.body.get("chunking_strategy"))
    state.resources.vector_stores.add(store.id, store, state.resource_limit)
    return _answer(request, _store_object(store))


async def _list_stores(request: web.Request, call: Call) -> web.StreamResponse:
    state = request.app[SIM_STATE]
    stores = [_store_object(store) for store in state.resources.vector_stores.newest_first()]
    return json_response(request, state, page(request, stores))


async def _retrieve_store(request: web.Request, call: Call) -> web.StreamResponse:
    store = _store(request.app[SIM_STATE], call)
    for record in store.files:
        record.progress.advance(now())
    return _answer(request, _store_object(store))


async def _update_store(request: web.Request, call: Call) -> web.StreamResponse:
    store = _store(request.app[SIM_STATE], call)
    if "name" in call.body:
        store.name = str(call.body["name"] or "")
    if "metadata" in call.body:
        store.metadata = call.body["metadata"]
    if "expires_after" in call.body:
        store.expires_after = call.body["expires_after"]
    return _answer(request, _store_object(store))


async def _delete_store(request: web.Request, call: Call) -> web.StreamResponse:
    state = request.app[SIM_STATE]
    store = _store(state, call)
    state.resources.vector_stores.pop(store.id)
    return json_response(request, state, {"id": store.id, "object": "vector_store.deleted",
                                          "deleted": True})


async def _create_file(request: web.Request, call: Call) -> web.StreamResponse:
    state = request.app[SIM_STATE]
    store = _store(state, call)
    file_id = call.body.get("file_id")
    if not isinstance(file_id, str) or not file_id:
        raise missing("file_id")
    record = _attach(state, store, file_id, call.body.get("attributes"),
                     call.body.get("chunking_strategy"))
    return _answer(request, _file_object(store, record))


async def _list_files(request: web.Request, call: Call) -> web.StreamResponse:
    store = _store(request.app[SIM_STATE], call)
    return _listed(request, store, store.files.newest_first())


async def _retrieve_file(request: web.Request, call: Call) -> web.StreamResponse:
    store = _store(request.app[SIM_STATE], call)
    record = _attached(store, call)
    record.progress.advance(now())
    return _answer(request, _file_object(store, record))


async def _update_file(request: web.Request, call: Call) -> web.StreamResponse:
    store = _store(request.app[SIM_STATE], call)
    record = _attached(store, call)
    if "attributes" in call.body:
        record.attributes = call.body["attributes"]
    return _answer(request, _file_object(store, record))


async def _delete_file(request: web.Request, call: Call) -> web.StreamResponse:
    state = request.app[SIM_STATE]
    store = _store(state, call)
    record = _attached(store, call)
    store.files.pop(record.file_id)
    return json_response(request, state, {"id": record.file_id,
                                          "object": "vector_store.file.deleted", "deleted": True})


async def _create_file_batch(request: web.Request, call: Call) -> web.StreamResponse:
    state = request.app[SIM_STATE]
    store = _store(state, call)
    # `file_ids` share the batch's attributes; `files` give each file its own.
    entries: list[tuple[str, Any, Any]] = [
        (file_id, call.body.get("attributes"), call.body.get("chunking_strategy"))
        for file_id in _file_ids(call.body, "file_ids")]
    for entry in call.body.get("files") or []:
        if not isinstance(entry, dict) or not isinstance(entry.get("file_id"), str):
            raise ApiError(400, "Invalid 'files': each entry needs a 'file_id'.", param="files")
        entries.append((entry["file_id"], entry.get("attributes", call.body.get("attributes")),
                        entry.get("chunking_strategy", call.body.get("chunking_strategy"))))
    if not entries:
        raise missing("file_ids")
    for file_id, _, _ in entries:
        require_file(state, file_id, param="file_ids")
    batch = FileBatchRecord(id="vsfb_" + uuid.uuid4().hex, created_at=now(),
                            file_ids=tuple(file_id for file_id, _, _ in entries))
    for file_id, attributes, chunking in entries:
        _attach(state, store, file_id, attributes, chunking, batch_id=batch.id)
    store.file_batches.add(batch.id, batch, state.resource_limit)
    return _answer(request, _batch_object(store, batch))


async def _retrieve_file_batch(request: web.Request, call: Call) -> web.StreamResponse:
    store = _store(request.app[SIM_STATE], call)
    batch = _file_batch(store, call)
    for record in _batch_files(store, batch):
        record.progress.advance(now())
    return _answer(request, _batch_object(store, batch))


async def _cancel_file_batch(request: web.Request, call: Call) -> web.StreamResponse:
    store = _store(request.app[SIM_STATE], call)
    batch = _file_batch(store, call)
    records = _batch_files(store, batch)
    if not batch.cancelled and not any(r.progress.status == "in_progress" for r in records):
        raise ApiError(400, "Cannot cancel a file batch that has already completed.")
    batch.cancelled = True
    for record in records:
        record.progress.interrupt("cancelled", now())
    return _answer(request, _batch_object(store, batch))


async def _list_file_batch_files(request: web.Request, call: Call) -> web.StreamResponse:
    store = _store(request.app[SIM_STATE], call)
    batch = _file_batch(store, call)
    return _listed(request, store, reversed(_batch_files(store, batch)))


_STORE = "vector_stores/{vector_store_id}"
ENDPOINTS = (
    Endpoint("POST", "vector_stores", _create_store, resource=True),
    Endpoint("GET", "vector_stores", _list_stores, resource=True),
    Endpoint("GET", _STORE, _retrieve_store, resource=True),
    Endpoint("POST", _STORE, _update_store, resource=True),
    Endpoint("DELETE", _STORE, _delete_store, resource=True),
    Endpoint("POST", f"{_STORE}/files", _create_file, resource=True),
    Endpoint("GET", f"{_STORE}/files", _list_files, resource=True),
    Endpoint("GET", f"{_STORE}/files/{{file_id}}", _retrieve_file, resource=True),
    Endpoint("POST", f"{_STORE}/files/{{file_id}}", _update_file, resource=True),
    Endpoint("DELETE", f"{_STORE}/files/{{file_id}}", _delete_file, resource=True),
    Endpoint("POST", f"{_STORE}/file_batches", _create_file_batch, resource=True),
    Endpoint("GET", f"{_STORE}/file_batches/{{batch_id}}", _retrieve_file_batch, resource=True),
    Endpoint("POST", f"{_STORE}/file_batches/{{batch_id}}/cancel", _cancel_file_batch,
             resource=True),
    Endpoint("GET", f"{_STORE}/file_batches/{{batch_id}}/files", _list_file_batch_files,
             resource=True),
)
