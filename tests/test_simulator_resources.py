"""The simulator's stateful resources, driven by the real openai SDK over a loopback socket.

Statuses move one step per retrieve (`poll_steps` retrieves see a resource unfinished, the
next finishes it), so each test can assert the exact sequence a polling client sees.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import httpx2
import orjson
import pytest
from openai import (
    AuthenticationError,
    AzureOpenAI,
    BadRequestError,
    InternalServerError,
    NotFoundError,
    OpenAI,
)
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


# Batches.

def _chat_line(custom_id: str, content: str, url: str = "/v1/chat/completions",
               model: str = "gpt-4o-mini") -> dict[str, object]:
    return {"custom_id": custom_id, "method": "POST", "url": url,
            "body": {"model": model, "messages": [{"role": "user", "content": content}],
                     "seed": 7}}


def _jsonl(lines: list[dict[str, object]]) -> bytes:
    return b"".join(orjson.dumps(line) + b"\n" for line in lines)


def test_batch_runs_each_line_as_a_direct_call_would_be_answered(
        client: OpenAI, simulator: SimulatorThread) -> None:
    lines = [_chat_line("first", "Hello"), _chat_line("second", "Goodbye"),
             _chat_line("third", "Hello again")]
    input_file = client.files.create(file=("requests.jsonl", _jsonl(lines)), purpose="batch")
    batch = client.batches.create(input_file_id=input_file.id, endpoint="/v1/chat/completions",
                                  completion_window="24h", metadata={"suite": "nightly"})
    assert batch.id.startswith("batch_")
    assert (batch.status, batch.output_file_id, batch.metadata) == \
        ("validating", None, {"suite": "nightly"})
    assert batch.request_counts is not None and batch.request_counts.total == 0
    seen = [client.batches.retrieve(batch.id) for _ in range(3)]
    assert [b.status for b in seen] == ["in_progress", "finalizing", "completed"]
    in_progress, _, done = seen
    assert in_progress.request_counts is not None
    assert (in_progress.request_counts.total, in_progress.request_counts.completed) == (3, 0)
    assert in_progress.in_progress_at is not None and in_progress.completed_at is None
    assert done.request_counts is not None
    assert (done.request_counts.total, done.request_counts.completed,
            done.request_counts.failed) == (3, 3, 0)
    assert done.output_file_id is not None and done.error_file_id is None
    assert done.completed_at is not None and done.finalizing_at is not None
    output = client.files.retrieve(done.output_file_id)
    assert (output.purpose, output.filename) == ("batch_output", f"{batch.id}_output.jsonl")
    results = [orjson.loads(line)
               for line in client.files.content(done.output_file_id).content.splitlines()]
    assert [result["custom_id"] for result in results] == ["first", "second", "third"]
    for line, result in zip(lines, results, strict=True):
        direct = client.chat.completions.create(**line["body"])
        assert result["response"]["status_code"] == 200 and result["error"] is None
        assert result["id"].startswith("batch_req_")
        body = result["response"]["body"]
        assert body["object"] == "chat.completion"
        assert body["choices"][0]["message"]["content"] == direct.choices[0].message.content
    assert done.usage is not None
    assert done.usage.output_tokens == sum(
        r["response"]["body"]["usage"]["completion_tokens"] for r in results)
    assert [b.id for b in client.batches.list()] == [batch.id]
    assert simulator.state.calls_by_route["batches/{batch_id}"] == 3
    assert simulator.state.calls_by_endpoint["POST batches"] == 1


def test_azure_files_and_batch_on_the_azure_layout(azure: AzureOpenAI,
                                                   simulator: SimulatorThread) -> None:
    lines = [_chat_line("only", "Hello", url="/chat/completions", model="my-deployment")]
    input_file = azure.files.create(file=("requests.jsonl", _jsonl(lines)), purpose="batch")
    batch = azure.batches.create(input_file_id=input_file.id,
                                 endpoint="/chat/completions",
                                 completion_window="24h")
    assert [azure.batches.retrieve(batch.id).status for _ in range(3)] == \
        ["in_progress", "finalizing", "completed"]
    done = azure.batches.retrieve(batch.id)
    assert done.output_file_id is not None
    result = orjson.loads(azure.files.content(done.output_file_id).content)
    direct = azure.chat.completions.create(**lines[0]["body"])
    body = result["response"]["body"]
    assert body["choices"][0]["message"]["content"] == direct.choices[0].message.content
    assert "content_filter_results" in body["choices"][0]  # answered as Azure answers
    assert simulator.state.last_headers["api-key"] == "azure-key"
    paths = simulator.state.calls_by_endpoint
    assert paths["POST files"] == 1 and paths["GET batches/{batch_id}"] == 4


def test_azure_resource_routes_need_an_api_version(simulator: SimulatorThread) -> None:
    headers = {"api-key": "azure-key"}
    missing = httpx2.get(simulator.url + "/openai/batches", headers=headers)
    assert missing.status_code == 400
    assert missing.json()["error"]["code"] == "MissingApiVersionParameter"
    listed = httpx2.get(simulator.url + "/openai/batches", headers=headers,
                        params={"api-version": AZURE_VERSION})
    assert listed.status_code == 200 and listed.json()["data"] == []
    assert httpx2.get(simulator.url + "/openai/v1/batches", headers=headers).status_code == 200
    under_deployment = httpx2.get(simulator.url + "/openai/deployments/d/batches",
                                  headers=headers, params={"api-version": AZURE_VERSION})
    assert under_deployment.status_code == 404


def test_batch_lines_a_generator_refuses_go_to_the_error_file(client: OpenAI) -> None:
    good = _chat_line("good", "Hello")
    bad = {"custom_id": "bad", "method": "POST", "url": "/v1/chat/completions",
           "body": {"model": "gpt-4o-mini", "messages": []}}
    input_file = client.files.create(file=("r.jsonl", _jsonl([good, bad])), purpose="batch")
    simulator_batch = client.batches.create(input_file_id=input_file.id,
                                            endpoint="/v1/chat/completions",
                                            completion_window="24h")
    for _ in range(3):
        done = client.batches.retrieve(simulator_batch.id)
    assert done.status == "completed" and done.request_counts is not None
    assert (done.request_counts.completed, done.request_counts.failed) == (1, 1)
    assert done.output_file_id is not None and done.error_file_id is not None
    refused = orjson.loads(client.files.content(done.error_file_id).content)
    assert refused["custom_id"] == "bad"
    assert refused["response"]["status_code"] == 400
    assert refused["response"]["body"]["error"]["code"] == "missing_required_parameter"


def test_batch_with_malformed_lines_fails_naming_them(client: OpenAI) -> None:
    content = _jsonl([_chat_line("a", "x"), _chat_line("a", "y"),
                      _chat_line("b", "z", url="/v1/embeddings")]) + b"{not json\n"
    input_file = client.files.create(file=("r.jsonl", content), purpose="batch")
    batch = client.batches.create(input_file_id=input_file.id, endpoint="/v1/chat/completions",
                                  completion_window="24h")
    assert batch.status == "validating"
    failed = client.batches.retrieve(batch.id)
    assert failed.status == "failed" and failed.failed_at is not None
    assert failed.errors is not None and failed.errors.data is not None
    assert [(e.line, e.code) for e in failed.errors.data] == \
        [(2, "duplicate_custom_id"), (3, "mismatched_url"), (4, "invalid_json_line")]
    assert failed.output_file_id is None
    assert client.batches.retrieve(batch.id).status == "failed"


def test_batch_refuses_a_missing_or_wrong_input_file(client: OpenAI) -> None:
    with pytest.raises(NotFoundError) as raised:
        client.batches.create(input_file_id="file-doesnotexist", endpoint="/v1/chat/completions",
                              completion_window="24h")
    assert _error(raised)["param"] == "input_file_id"
    not_for_batches = client.files.create(file=("a.jsonl", b"{}\n"), purpose="user_data")
    with pytest.raises(BadRequestError):
        client.batches.create(input_file_id=not_for_batches.id,
                              endpoint="/v1/chat/completions", completion_window="24h")
    with pytest.raises(NotFoundError) as unknown:
        client.batches.retrieve("batch_doesnotexist")
    assert _error(unknown)["message"] == "No batch found with id 'batch_doesnotexist'."


def test_cancelled_batch_passes_through_cancelling(client: OpenAI) -> None:
    input_file = client.files.create(file=("r.jsonl", _jsonl([_chat_line("a", "x")])),
                                     purpose="batch")
    batch = client.batches.create(input_file_id=input_file.id, endpoint="/v1/chat/completions",
                                  completion_window="24h")
    assert client.batches.retrieve(batch.id).status == "in_progress"
    cancelling = client.batches.cancel(batch.id)
    assert cancelling.status == "cancelling" and cancelling.cancelling_at is not None
    cancelled = client.batches.retrieve(batch.id)
    assert cancelled.status == "cancelled" and cancelled.cancelled_at is not None
    assert cancelled.output_file_id is None
    assert client.batches.retrieve(batch.id).status == "cancelled"
    finished = client.batches.create(input_file_id=input_file.id,
                                     endpoint="/v1/chat/completions", completion_window="24h")
    for _ in range(3):
        client.batches.retrieve(finished.id)
    with pytest.raises(BadRequestError):
        client.batches.cancel(finished.id)


# Vector stores, their files and file batches.

def _upload(client: OpenAI, name: str, content: bytes = b"Otters hold hands while asleep.\n"
            ) -> str:
    return client.files.create(file=(name, content), purpose="assistants").id


def test_vector_store_with_files_completes_and_counts_them(client: OpenAI,
                                                           simulator: SimulatorThread) -> None:
    file_ids = [_upload(client, "a.txt", b"aaaa"), _upload(client, "b.txt", b"bbbbbb")]
    raw = client.vector_stores.with_raw_response.create(name="notes", file_ids=file_ids)
    created = raw.parse()
    assert raw.headers["openai-poll-after-ms"] == "50"
    assert created.id.startswith("vs_") and created.name == "notes"
    assert created.status == "in_progress" and created.usage_bytes == 0
    assert (created.file_counts.in_progress, created.file_counts.total) == (2, 2)
    seen = [client.vector_stores.with_raw_response.retrieve(created.id) for _ in range(3)]
    assert [r.parse().status for r in seen] == ["in_progress", "in_progress", "completed"]
    assert "openai-poll-after-ms" not in seen[-1].headers
    done = seen[-1].parse()
    assert (done.file_counts.completed, done.file_counts.in_progress, done.usage_bytes) == \
        (2, 0, 10)
    assert sorted(f.id for f in client.vector_stores.files.list(created.id)) == sorted(file_ids)
    empty = client.vector_stores.with_raw_response.create(name="empty")
    assert empty.parse().status == "completed" and empty.parse().file_counts.total == 0
    assert "openai-poll-after-ms" not in empty.headers
    assert [s.id for s in client.vector_stores.list()] == [empty.parse().id, created.id]
    assert client.vector_stores.delete(created.id).deleted is True
    with pytest.raises(NotFoundError) as raised:
        client.vector_stores.retrieve(created.id)
    assert _error(raised)["message"] == f"No vector store found with id '{created.id}'."
    assert simulator.state.calls_by_route["vector_stores/{vector_store_id}"] == 5


def test_vector_store_file_moves_in_progress_to_completed(client: OpenAI) -> None:
    store = client.vector_stores.create(name="one")
    file_id = _upload(client, "c.txt", b"cccc")
    raw = client.vector_stores.files.with_raw_response.create(
        vector_store_id=store.id, file_id=file_id, attributes={"topic": "otters"})
    attached = raw.parse()
    assert raw.headers["openai-poll-after-ms"] == "50"
    assert (attached.id, attached.status, attached.vector_store_id) == \
        (file_id, "in_progress", store.id)
    assert attached.attributes == {"topic": "otters"}
    assert attached.chunking_strategy is not None and attached.chunking_strategy.type == "static"
    statuses = [client.vector_stores.files.retrieve(file_id, vector_store_id=store.id).status
                for _ in range(3)]
    assert statuses == ["in_progress", "in_progress", "completed"]
    assert [f.id for f in client.vector_stores.files.list(store.id, filter="completed")] == \
        [file_id]
    assert list(client.vector_stores.files.list(store.id, filter="in_progress")) == []
    deleted = client.vector_stores.files.delete(file_id, vector_store_id=store.id)
    assert (deleted.id, deleted.deleted) == (file_id, True)
    with pytest.raises(NotFoundError):
        client.vector_stores.files.retrieve(file_id, vector_store_id=store.id)
    with pytest.raises(NotFoundError) as raised:
        client.vector_stores.files.create(vector_store_id=store.id, file_id="file-nothere")
    assert _error(raised)["param"] == "file_id"


def test_file_batch_moves_to_completed_and_can_be_cancelled(client: OpenAI) -> None:
    store = client.vector_stores.create(name="batched")
    file_ids = [_upload(client, f"{n}.txt") for n in range(3)]
    raw = client.vector_stores.file_batches.with_raw_response.create(
        vector_store_id=store.id, file_ids=file_ids)
    batch = raw.parse()
    assert raw.headers["openai-poll-after-ms"] == "50"
    assert batch.id.startswith("vsfb_") and batch.status == "in_progress"
    assert (batch.file_counts.in_progress, batch.file_counts.total) == (3, 3)
    seen = [client.vector_stores.file_batches.retrieve(batch.id, vector_store_id=store.id)
            for _ in range(3)]
    assert [b.status for b in seen] == ["in_progress", "in_progress", "completed"]
    assert (seen[-1].file_counts.completed, seen[-1].file_counts.in_progress) == (3, 0)
    listed = client.vector_stores.file_batches.list_files(batch.id, vector_store_id=store.id)
    assert sorted(f.id for f in listed) == sorted(file_ids)
    assert all(f.status == "completed" for f in listed)
    with pytest.raises(BadRequestError):
        client.vector_stores.file_batches.cancel(batch.id, vector_store_id=store.id)
    second = client.vector_stores.file_batches.create(vector_store_id=store.id,
                                                      file_ids=[_upload(client, "late.txt")])
    cancelled = client.vector_stores.file_batches.cancel(second.id, vector_store_id=store.id)
    assert cancelled.status == "cancelled" and cancelled.file_counts.cancelled == 1
    assert client.vector_stores.file_batches.retrieve(
        second.id, vector_store_id=store.id).status == "cancelled"


def _upload_and_poll_file(client: OpenAI, store_id: str) -> tuple[str, int]:
    done = client.vector_stores.files.upload_and_poll(vector_store_id=store_id,
                                                      file=("u.txt", b"uploaded and polled"))
    return done.status, done.usage_bytes


def _create_and_poll_file(client: OpenAI, store_id: str) -> tuple[str, int]:
    file_id = _upload(client, "p.txt", b"attached")
    done = client.vector_stores.files.create_and_poll(file_id, vector_store_id=store_id)
    return done.status, done.usage_bytes


def _upload_and_poll_batch(client: OpenAI, store_id: str) -> tuple[str, int]:
    done = client.vector_stores.file_batches.upload_and_poll(
        store_id, files=[("x.txt", b"x"), ("y.txt", b"yy")])
    return done.status, done.file_counts.completed


def _create_and_poll_batch(client: OpenAI, store_id: str) -> tuple[str, int]:
    file_ids = [_upload(client, "z.txt"), _upload(client, "w.txt")]
    done = client.vector_stores.file_batches.create_and_poll(store_id, file_ids=file_ids)
    return done.status, done.file_counts.completed


@pytest.mark.parametrize(("helper", "expected", "polled"), [
    (_upload_and_poll_file, ("completed", 19), "files/{file_id}"),
    (_create_and_poll_file, ("completed", 8), "files/{file_id}"),
    (_upload_and_poll_batch, ("completed", 2), "file_batches/{batch_id}"),
    (_create_and_poll_batch, ("completed", 2), "file_batches/{batch_id}"),
])
def test_sdk_poll_helpers_complete_at_the_hinted_interval(
        client: OpenAI, simulator: SimulatorThread,
        helper: Callable[[OpenAI, str], tuple[str, int]], expected: tuple[str, int],
        polled: str) -> None:
    # Long enough to measure, far below the SDK's one-second default between polls.
    simulator.state.poll_after_ms = 120
    store_id = client.vector_stores.create(name="helpers").id
    started = time.monotonic()
    assert helper(client, store_id) == expected
    took = time.monotonic() - started
    assert 0.24 <= took < 0.9  # two sleeps of poll_after_ms, not two of a second
    assert simulator.state.calls_by_endpoint[
        f"GET vector_stores/{{vector_store_id}}/{polled}"] == 3


# Fine-tuning jobs.

TRAINING = _jsonl([{"messages": [{"role": "user", "content": "Hi there"},
                                 {"role": "assistant", "content": "Hello friend"}]}] * 4)


def test_fine_tuning_job_moves_to_succeeded_with_a_model(client: OpenAI,
                                                        simulator: SimulatorThread) -> None:
    training = client.files.create(file=("train.jsonl", TRAINING), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(training_file=training.id, model="gpt-4o-mini",
                                         suffix="otters", seed=5)
    assert job.id.startswith("ftjob-") and job.status == "validating_files"
    assert (job.fine_tuned_model, job.trained_tokens, job.finished_at) == (None, None, None)
    assert job.hyperparameters.n_epochs == "auto" and job.seed == 5
    seen = [client.fine_tuning.jobs.retrieve(job.id) for _ in range(3)]
    assert [j.status for j in seen] == ["queued", "running", "succeeded"]
    assert seen[0].hyperparameters.n_epochs == 3
    done = seen[-1]
    assert done.fine_tuned_model is not None
    assert done.fine_tuned_model.startswith("ft:gpt-4o-mini:replay-sim:otters:")
    assert done.trained_tokens == len(TRAINING.split()) * 3
    assert done.finished_at is not None and len(done.result_files) == 1
    metrics = client.files.content(done.result_files[0]).content.decode()
    assert metrics.startswith("step,train_loss,")
    events = list(client.fine_tuning.jobs.list_events(job.id))
    assert events[0].message == "The job has successfully completed"
    assert events[-1].message == f"Validating training file: {training.id}"
    assert [e.message for e in events if e.type == "message"] == [
        "The job has successfully completed", "New fine-tuned model created",
        "Fine-tuning job started", "Files validated, moving job to queued state",
        f"Validating training file: {training.id}"]
    assert [j.id for j in client.fine_tuning.jobs.list()] == [job.id]
    assert simulator.state.calls_by_route["fine_tuning/jobs/{fine_tuning_job_id}"] == 3
    assert simulator.state.calls_by_route["fine_tuning/jobs/{fine_tuning_job_id}/events"] == 1


def test_fine_tuning_job_cancel_and_unknown_ids(client: OpenAI) -> None:
    training = client.files.create(file=("train.jsonl", TRAINING), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(training_file=training.id, model="gpt-4o-mini")
    assert client.fine_tuning.jobs.retrieve(job.id).status == "queued"
    cancelled = client.fine_tuning.jobs.cancel(job.id)
    assert cancelled.status == "cancelled" and cancelled.fine_tuned_model is None
    assert client.fine_tuning.jobs.retrieve(job.id).status == "cancelled"
    with pytest.raises(NotFoundError) as raised:
        client.fine_tuning.jobs.retrieve("ftjob-doesnotexist")
    assert _error(raised)["type"] == "invalid_request_error"
    with pytest.raises(NotFoundError) as missing_file:
        client.fine_tuning.jobs.create(training_file="file-doesnotexist", model="gpt-4o-mini")
    assert _error(missing_file)["param"] == "training_file"
    wrong_purpose = client.files.create(file=("a.jsonl", TRAINING), purpose="batch")
    with pytest.raises(BadRequestError):
        client.fine_tuning.jobs.create(training_file=wrong_purpose.id, model="gpt-4o-mini")


# Knobs, bounds, and the simulator's usual behaviour on the new routes.

def test_knobs_are_set_and_reported_over_http(simulator: SimulatorThread, client: OpenAI) -> None:
    client.responses.create(**RESPONSE, background=True)
    changed = httpx2.post(simulator.url + "/_sim/state",
                          json={"poll_steps": 0, "poll_after_ms": 5, "resource_limit": 7})
    assert changed.status_code == 200
    reported = httpx2.get(simulator.url + "/_sim/state").json()
    assert (reported["poll_steps"], reported["poll_after_ms"], reported["resource_limit"]) == \
        (0, 5, 7)
    assert reported["resources"]["responses"] == 1
    assert reported["calls_by_endpoint"] == {"POST responses": 1}
    store = client.vector_stores.create(name="k", file_ids=[_upload(client, "k.txt")])
    raw = client.vector_stores.with_raw_response.retrieve(store.id)
    assert raw.parse().status == "completed"  # poll_steps 0: the first retrieve finishes it
    created = client.vector_stores.files.with_raw_response.create(
        vector_store_id=store.id, file_id=_upload(client, "l.txt"))
    assert created.headers["openai-poll-after-ms"] == "5"
    httpx2.post(simulator.url + "/_sim/state", json={"reset_resources": True,
                                                     "reset_calls": True})
    reported = httpx2.get(simulator.url + "/_sim/state").json()
    assert reported["resources"]["vector_stores"] == 0 and reported["calls"] == 0
    with pytest.raises(NotFoundError):
        client.vector_stores.retrieve(store.id)


def test_each_kind_keeps_at_most_resource_limit_entries(client: OpenAI,
                                                        simulator: SimulatorThread) -> None:
    simulator.state.resource_limit = 2
    ids = [client.responses.create(**RESPONSE, background=True).id for _ in range(3)]
    with pytest.raises(NotFoundError):
        client.responses.retrieve(ids[0])
    assert client.responses.retrieve(ids[2]).status == "in_progress"
    assert simulator.state.resources.counts()["responses"] == 2


def test_a_faulted_poll_does_not_move_the_resource(client: OpenAI,
                                                   simulator: SimulatorThread) -> None:
    created = client.responses.create(**RESPONSE, background=True)
    simulator.state.faults = ["status:500"]
    with pytest.raises(InternalServerError):
        client.responses.retrieve(created.id)
    assert client.responses.retrieve(created.id).status == "in_progress"
    assert simulator.state.calls_by_route["responses/{response_id}"] == 2


def test_resource_routes_check_the_key_and_compress(simulator: SimulatorThread,
                                                    client: OpenAI) -> None:
    simulator.state.api_key = "sk-test"
    with OpenAI(base_url=simulator.url + "/v1", api_key="sk-wrong", max_retries=0) as stranger:
        with pytest.raises(AuthenticationError):
            stranger.files.list()
    client.files.create(file=("a.txt", b"a" * 2000), purpose="user_data")
    listed = httpx2.get(simulator.url + "/v1/files", headers={
        "Authorization": "Bearer sk-test", "Accept-Encoding": "gzip"})
    assert listed.headers["content-encoding"] == "gzip"
    assert listed.json()["data"][0]["bytes"] == 2000


def test_calls_are_counted_by_route_pattern(client: OpenAI, simulator: SimulatorThread) -> None:
    client.models.retrieve("gpt-4o")
    client.models.retrieve("gpt-4o-mini")
    with pytest.raises(NotFoundError):
        client.batches.retrieve("batch_one")
    with pytest.raises(NotFoundError):
        client.batches.retrieve("batch_two")
    assert simulator.state.calls_by_route == {"models/{model}": 2, "batches/{batch_id}": 2}
    assert simulator.state.calls == 4
