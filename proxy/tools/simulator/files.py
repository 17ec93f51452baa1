"""The Files API: upload (multipart), list, retrieve, content and delete, kept in memory.

Batches read their input here and write their output here; fine-tuning jobs read their
training file. Ids look like the real ones (`file-` + 22 base62 characters).
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from .records import StoredFile
from .state import SIM_STATE, SimulatorState
from .wire import (
    ApiError,
    Call,
    Endpoint,
    json_response,
    missing,
    new_id,
    now,
    openai_headers,
    page,
    read_form,
)

# What a client may upload with; the *_output and *-results purposes are the API's own.
UPLOAD_PURPOSES = ("assistants", "batch", "fine-tune", "vision", "user_data", "evals")


def store_file(state: SimulatorState, filename: str, purpose: str, content: bytes,
               expires_at: int | None = None) -> StoredFile:
    stored = StoredFile(new_id("file-", 22), filename, purpose, now(), content, expires_at)
    state.resources.files.put(stored, state.resource_limit, state.file_bytes_limit)
    return stored


def require_file(state: SimulatorState, file_id: str, param: str = "id") -> StoredFile:
    stored = state.resources.files.get(file_id)
    if stored is None:
        raise ApiError(404, f"No such File object: {file_id}", param=param)
    return stored


def file_object(stored: StoredFile) -> dict[str, Any]:
    return {"id": stored.id, "object": "file", "bytes": len(stored.content),
            "created_at": stored.created_at, "expires_at": stored.expires_at,
            "filename": stored.filename, "purpose": stored.purpose,
            "status": "processed", "status_details": None}


async def _upload(request: web.Request, call: Call) -> web.StreamResponse:
    state = request.app[SIM_STATE]
    form = await read_form(request)
    upload = form.get("file")
    if upload is None or upload.filename is None:
        raise missing("file")
    purpose_part = form.get("purpose")
    if purpose_part is None:
        raise missing("purpose")
    purpose = purpose_part.content.decode("utf-8", "replace")
    if purpose not in UPLOAD_PURPOSES:
        raise ApiError(400, f"'{purpose}' is not one of {list(UPLOAD_PURPOSES)} - 'purpose'",
                       param="purpose")
    expires_at = None
    seconds = form.get("expires_after[seconds]")
    if seconds is not None:
        try:
            expires_at = now() + int(seconds.content)
        except ValueError:
            raise ApiError(400, "Invalid 'expires_after[seconds]': expected an integer.",
                           param="expires_after[seconds]") from None
    stored = store_file(state, upload.filename, purpose, upload.content, expires_at)
    return json_response(request, state, file_object(stored))


async def _list(request: web.Request, call: Call) -> web.StreamResponse:
    state = request.app[SIM_STATE]
    purpose = request.query.get("purpose")
    files = [file_object(stored) for stored in state.resources.files.newest_first()
             if purpose is None or stored.purpose == purpose]
    return json_response(request, state, page(request, files, default_limit=10_000))


async def _retrieve(request: web.Request, call: Call) -> web.StreamResponse:
    state = request.app[SIM_STATE]
    return json_response(request, state, file_object(require_file(state, call.params["file_id"])))


async def _content(request: web.Request, call: Call) -> web.StreamResponse:
    stored = require_file(request.app[SIM_STATE], call.params["file_id"])
    return web.Response(body=stored.content, content_type="application/octet-stream",
                        headers=openai_headers())


async def _delete(request: web.Request, call: Call) -> web.StreamResponse:
    state = request.app[SIM_STATE]
    stored = require_file(state, call.params["file_id"])
    state.resources.files.pop(stored.id)
    return json_response(request, state, {"id": stored.id, "object": "file", "deleted": True})


ENDPOINTS = (
    Endpoint("POST", "files", _upload, resource=True),
    Endpoint("GET", "files", _list, resource=True),
    Endpoint("GET", "files/{file_id}", _retrieve, resource=True),
    Endpoint("GET", "files/{file_id}/content", _content, resource=True),
    Endpoint("DELETE", "files/{file_id}", _delete, resource=True),
)
