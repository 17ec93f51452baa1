"""The simulator's stateful resources, driven by the real openai SDK over a loopback socket.

Statuses move one step per retrieve (`poll_steps` retrieves see a resource unfinished, the
next finishes it), so each test can assert the exact sequence a polling client sees.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from openai import AzureOpenAI, BadRequestError, NotFoundError, OpenAI
from replay_proxy.tools.simulator.lifecycle import Lifecycle, Progress
from replay_proxy.tools.testing import SimulatorThread

AZURE_VERSION = "2024-10-21"


@pytest.fixture
def client(simulator: SimulatorThread) -> Iterator[OpenAI]:
    with OpenAI(base_url=simulator.url + "/v1", api_key="sk-test", max_retries=0) as openai:
        yield openai


@pytest.fixture
def azure(simulator: SimulatorThread) -> Iterator[AzureOpenAI]:
    with AzureOpenAI(azure_endpoint=simulator.url, api_key="azure-key", api_version=AZURE_VERSION,
                     max_retries=0) as openai:
        yield openai


def _error(raised: pytest.ExceptionInfo[NotFoundError] | pytest.ExceptionInfo[BadRequestError]
           ) -> dict[str, object]:
    body = raised.value.response.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}
    error: dict[str, object] = body["error"]
    return error


# The lifecycle rule, without a socket.

BATCH_LIKE = Lifecycle(created="validating", stages=("in_progress", "finalizing"),
                       working="in_progress", finished="completed")


@pytest.mark.parametrize(("poll_steps", "expected"), [
    (0, ()),
    (1, ("in_progress",)),
    (2, ("in_progress", "finalizing")),
    (4, ("in_progress", "in_progress", "in_progress", "finalizing")),
])
def test_schedule_shows_every_stage_and_stretches_the_working_one(
        poll_steps: int, expected: tuple[str, ...]) -> None:
    assert BATCH_LIKE.schedule(poll_steps) == expected


def test_progress_ends_after_poll_steps_and_an_interruption_shows_once() -> None:
    progress = Progress(BATCH_LIKE, poll_steps=2, now=100)
    seen = [progress.status]
    while not progress.advance(now=101):
        seen.append(progress.status)
    assert [*seen, progress.status] == ["validating", "in_progress", "finalizing", "completed"]
    assert progress.reached_at == {"validating": 100, "in_progress": 101, "finalizing": 101,
                                   "completed": 101}
    cancelled = Progress(BATCH_LIKE, poll_steps=2, now=100)
    cancelled.interrupt("cancelled", now=102, showing="cancelling")
    assert cancelled.status == "cancelling" and not cancelled.done
    assert cancelled.advance(now=103) and cancelled.status == "cancelled"
    assert not cancelled.advance(now=104) and cancelled.status == "cancelled"


# Responses: stored, and in the background.

# The Responses API has no `seed`; the simulator honours one sent as an extra field.
RESPONSE = {"model": "gpt-4o-mini", "input": "Say something seeded.", "extra_body": {"seed": 11}}


def test_background_response_moves_queued_in_progress_completed(
        client: OpenAI, simulator: SimulatorThread) -> None:
    foreground = client.responses.create(**RESPONSE)
    created = client.responses.create(**RESPONSE, background=True)
    assert (created.status, created.background, created.output, created.usage) == \
        ("queued", True, [], None)
    seen = [client.responses.retrieve(created.id) for _ in range(3)]
    assert [response.status for response in seen] == ["in_progress", "in_progress", "completed"]
    done = seen[-1]
    assert done.id == created.id and done.background is True
    assert done.output_text == foreground.output_text != ""
    assert done.usage is not None and done.usage.output_tokens == foreground.usage.output_tokens
    assert client.responses.retrieve(created.id).status == "completed"
    assert simulator.state.calls_by_route["responses/{response_id}"] == 4
    assert simulator.state.calls_by_endpoint["GET responses/{response_id}"] == 4


def test_poll_steps_is_read_when_a_resource_is_created(client: OpenAI,
                                                       simulator: SimulatorThread) -> None:
    simulator.state.poll_steps = 0
    quick = client.responses.create(**RESPONSE, background=True)
    simulator.state.poll_steps = 3
    slow = client.responses.create(**RESPONSE, background=True)
    assert client.responses.retrieve(quick.id).status == "completed"
    assert [client.responses.retrieve(slow.id).status for _ in range(4)] == \
        ["in_progress", "in_progress", "in_progress", "completed"]


def test_stored_response_is_retrievable_and_an_unstored_one_is_not(client: OpenAI) -> None:
    stored = client.responses.create(**RESPONSE)
    again = client.responses.retrieve(stored.id)
    assert again.status == "completed" and again.output_text == stored.output_text
    assert again.background is False
    unstored = client.responses.create(**RESPONSE, store=False)
    with pytest.raises(NotFoundError) as raised:
        client.responses.retrieve(unstored.id)
    assert _error(raised)["message"] == f"Response with id '{unstored.id}' not found."
    client.responses.delete(stored.id)
    with pytest.raises(NotFoundError):
        client.responses.retrieve(stored.id)


def test_streamed_response_is_stored_completed(client: OpenAI) -> None:
    with client.responses.stream(**RESPONSE) as stream:
        final = stream.get_final_response()
    assert client.responses.retrieve(final.id).output_text == final.output_text != ""


def test_cancel_background_response(client: OpenAI) -> None:
    created = client.responses.create(**RESPONSE, background=True)
    assert client.responses.retrieve(created.id).status == "in_progress"
    cancelled = client.responses.cancel(created.id)
    assert (cancelled.status, cancelled.output) == ("cancelled", [])
    assert client.responses.retrieve(created.id).status == "cancelled"
    assert client.responses.cancel(created.id).status == "cancelled"  # cancelling again is a no-op
    foreground = client.responses.create(**RESPONSE)
    with pytest.raises(BadRequestError):
        client.responses.cancel(foreground.id)
    finished = client.responses.create(**RESPONSE, background=True)
    for _ in range(3):
        client.responses.retrieve(finished.id)
    with pytest.raises(BadRequestError) as raised:
        client.responses.cancel(finished.id)
    assert "completed" in str(_error(raised)["message"])


# Files.

def test_file_upload_list_retrieve_content_delete(client: OpenAI,
                                                  simulator: SimulatorThread) -> None:
    content = b'{"prompt": "a"}\n{"prompt": "b"}\n'
    uploaded = client.files.create(file=("train.jsonl", content), purpose="fine-tune")
    assert uploaded.id.startswith("file-") and len(uploaded.id) == len("file-") + 22
    assert (uploaded.filename, uploaded.bytes, uploaded.purpose, uploaded.status) == \
        ("train.jsonl", len(content), "fine-tune", "processed")
    other = client.files.create(file=("notes.txt", b"notes"), purpose="assistants")
    assert [f.id for f in client.files.list()] == [other.id, uploaded.id]
    assert [f.id for f in client.files.list(purpose="fine-tune")] == [uploaded.id]
    assert client.files.retrieve(uploaded.id) == uploaded
    assert client.files.content(uploaded.id).content == content
    deleted = client.files.delete(uploaded.id)
    assert (deleted.id, deleted.deleted) == (uploaded.id, True)
    with pytest.raises(NotFoundError) as raised:
        client.files.retrieve(uploaded.id)
    assert _error(raised) == {"message": f"No such File object: {uploaded.id}",
                              "type": "invalid_request_error", "param": "id", "code": None}
    assert simulator.state.calls_by_route["files"] == 4
    assert simulator.state.calls_by_endpoint["GET files/{file_id}"] == 2
    assert simulator.state.calls_by_endpoint["DELETE files/{file_id}"] == 1


def test_file_upload_refuses_an_unknown_purpose(client: OpenAI) -> None:
    with pytest.raises(BadRequestError) as raised:
        client.files.create(file=("a.txt", b"a"), purpose="nonsense")
    assert _error(raised)["param"] == "purpose"


def test_files_past_the_byte_budget_drop_the_oldest(client: OpenAI,
                                                    simulator: SimulatorThread) -> None:
    simulator.state.file_bytes_limit = 100
    ids = [client.files.create(file=(f"{n}.bin", bytes(40)), purpose="user_data").id
           for n in range(3)]
    assert [f.id for f in client.files.list()] == [ids[2], ids[1]]
    assert simulator.state.resources.counts()["file_bytes"] == 80
    with pytest.raises(NotFoundError):
        client.files.content(ids[0])
