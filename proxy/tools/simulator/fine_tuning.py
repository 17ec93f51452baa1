"""Fine-tuning jobs: create, list, retrieve, cancel and their events.

A job answers `validating_files` when created and moves one step per retrieve:
`validating_files` -> `queued` -> `running` (`poll_steps` retrieves in all; more steps stay
`running`) -> `succeeded`, with `fine_tuned_model`, `trained_tokens`, `finished_at` and a
result file of step metrics. Each stage it reaches adds to its events (newest first).
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from aiohttp import web

from .files import require_file, store_file
from .lifecycle import Lifecycle, Progress
from .records import FineTuningJobRecord
from .state import SIM_STATE, SimulatorState
from .wire import ApiError, Call, Endpoint, json_response, missing, new_id, now, page

JOB_LIFECYCLE = Lifecycle(created="validating_files", stages=("queued", "running"),
                          working="running", finished="succeeded")
_DEFAULT_EPOCHS = 3
_RESOLVED: Mapping[str, int | float] = MappingProxyType({
    "batch_size": 1, "learning_rate_multiplier": 1.8, "n_epochs": _DEFAULT_EPOCHS})
_ORGANIZATION = "org-simulatedorg1234"
_STAGE_MESSAGES: Mapping[str, tuple[str, ...]] = MappingProxyType({
    "queued": ("Files validated, moving job to queued state",),
    "running": ("Fine-tuning job started",),
    "succeeded": ("New fine-tuned model created", "The job has successfully completed"),
    "cancelled": ("Fine-tuning job cancelled",),
})


def _hyperparameters(job: FineTuningJobRecord) -> dict[str, Any]:
    """As requested ("auto" where unset) until validated, then with the values chosen."""
    requested = {name: job.hyperparameters.get(name, "auto") for name in _RESOLVED}
    if job.progress.status == "validating_files":
        return requested
    return {name: _RESOLVED[name] if value == "auto" else value
            for name, value in requested.items()}


def _event(job: FineTuningJobRecord, message: str, at: int, kind: str = "message",
           data: dict[str, Any] | None = None) -> None:
    job.events.append({"object": "fine_tuning.job.event", "id": new_id("ftevent-"),
                       "created_at": at, "level": "info", "message": message,
                       "data": data or {}, "type": kind})


def _finish(job: FineTuningJobRecord, state: SimulatorState, at: int) -> None:
    tail = job.id.removeprefix("ftjob-")[:8]
    job.fine_tuned_model = f"ft:{job.model}:replay-sim:{job.suffix or ''}:{tail}"
    epochs = _hyperparameters(job)["n_epochs"]
    steps = max(1, int(epochs) * 3)
    rng = random.Random(job.seed)
    rows = [f"{step},{2.0 / step + rng.random() / 10:.4f},{0.5 + step / (2 * steps):.4f},,"
            for step in range(1, steps + 1)]
    metrics = "step,train_loss,train_accuracy,valid_loss,valid_mean_token_accuracy\n" \
        + "\n".join(rows) + "\n"
    job.result_file_id = store_file(state, "step_metrics.csv", "fine-tune-results",
                                    metrics.encode()).id
    _event(job, f"Step {steps}/{steps}: training loss={rows[-1].split(',')[1]}", at,
           kind="metrics", data={"step": steps, "total_steps": steps,
                                 "train_loss": float(rows[-1].split(",")[1])})


def _advance(job: FineTuningJobRecord, state: SimulatorState) -> None:
    before = job.progress.status
    at = now()
    job.progress.advance(at)
    status = job.progress.status
    if status == before:
        return
    if status == "succeeded":
        _finish(job, state, at)
    for message in _STAGE_MESSAGES.get(status, ()):
        _event(job, message, at)


def _job_object(job: FineTuningJobRecord) -> dict[str, Any]:
    status = job.progress.status
    succeeded = status == "succeeded"
    hyperparameters = _hyperparameters(job)
    method = job.method or {
        "type": "supervised", "supervised": {"hyperparameters": hyperparameters}}
    return {"object": "fine_tuning.job", "id": job.id, "model": job.model,
            "created_at": job.created_at,
            "finished_at": job.progress.reached_at.get(status) if job.progress.done else None,
            "fine_tuned_model": job.fine_tuned_model, "organization_id": _ORGANIZATION,
            "result_files": [job.result_file_id] if job.result_file_id else [],
            "status": status, "validation_file": job.validation_file,
            "training_file": job.training_file, "hyperparameters": hyperparameters,
            "trained_tokens": job.trained_tokens if succeeded else None,
            "integrations": [], "seed": job.seed, "estimated_finish": None, "method": method,
            "metadata": job.metadata, "error": None, "user_provided_suffix": job.suffix}


async def _create(request: web.Request, call: Call) -> web.StreamResponse:
    state = request.app[SIM_STATE]
    for name in ("model", "training_file"):
        if not isinstance(call.body.get(name), str) or not call.body[name]:
            raise missing(name)
    training = require_file(state, call.body["training_file"], param="training_file")
    if training.purpose != "fine-tune":
        raise ApiError(400, f"File {training.id} has purpose '{training.purpose}'; a training "
                       "file must have purpose 'fine-tune'.", param="training_file")
    validation_file = call.body.get("validation_file")
    if validation_file is not None:
        require_file(state, str(validation_file), param="validation_file")
    hyperparameters = dict(call.body.get("hyperparameters") or {})
    method = call.body.get("method")
    epochs = hyperparameters.get("n_epochs", "auto")
    epoch_count = _DEFAULT_EPOCHS if epochs == "auto" else int(epochs)
    seed = call.body.get("seed")
    created = now()
    job = FineTuningJobRecord(
        id=new_id("ftjob-"), model=call.body["model"], training_file=training.id,
        validation_file=validation_file, created_at=created,
        progress=Progress(JOB_LIFECYCLE, state.poll_steps, created),
        seed=int(seed) if isinstance(seed, int) else random.randrange(2**31),
        hyperparameters=hyperparameters, method=method if isinstance(method, dict) else None,
        suffix=call.body.get("suffix"), metadata=call.body.get("metadata"),
        trained_tokens=len(training.content.split()) * epoch_count)
    _event(job, f"Validating training file: {training.id}", created)
    state.resources.fine_tuning_jobs.add(job.id, job, state.resource_limit)
    return json_response(request, state, _job_object(job))


def _job(state: SimulatorState, call: Call) -> FineTuningJobRecord:
    job_id = call.params["fine_tuning_job_id"]
    job = state.resources.fine_tuning_jobs.get(job_id)
    if job is None:
        raise ApiError(404, f"Could not find fine-tuning job: {job_id}.",
                       param="fine_tuning_job_id")
    return job


async def _retrieve(request: web.Request, call: Call) -> web.StreamResponse:
    state = request.app[SIM_STATE]
    job = _job(state, call)
    _advance(job, state)
    return json_response(request, state, _job_object(job))


async def _cancel(request: web.Request, call: Call) -> web.StreamResponse:
    state = request.app[SIM_STATE]
    job = _job(state, call)
    status = job.progress.status
    if job.progress.done and status != "cancelled":
        raise ApiError(400, f"Cannot cancel a job with status '{status}'.")
    if status != "cancelled":
        at = now()
        job.progress.interrupt("cancelled", at)
        for message in _STAGE_MESSAGES["cancelled"]:
            _event(job, message, at)
    return json_response(request, state, _job_object(job))


async def _list(request: web.Request, call: Call) -> web.StreamResponse:
    state = request.app[SIM_STATE]
    jobs = [_job_object(job) for job in state.resources.fine_tuning_jobs.newest_first()]
    return json_response(request, state, page(request, jobs))


async def _events(request: web.Request, call: Call) -> web.StreamResponse:
    state = request.app[SIM_STATE]
    job = _job(state, call)
    return json_response(request, state, page(request, list(reversed(job.events))))


_JOB = "fine_tuning/jobs/{fine_tuning_job_id}"
ENDPOINTS = (
    Endpoint("POST", "fine_tuning/jobs", _create, resource=True),
    Endpoint("GET", "fine_tuning/jobs", _list, resource=True),
    Endpoint("GET", _JOB, _retrieve, resource=True),
    Endpoint("POST", f"{_JOB}/cancel", _cancel, resource=True),
    Endpoint("GET", f"{_JOB}/events", _events, resource=True),
)
