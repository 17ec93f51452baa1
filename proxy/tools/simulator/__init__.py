"""A local stand-in for the OpenAI and Azure OpenAI APIs, honest to their wire formats.

Tests, demos and benchmarks run against it because the real APIs are not reachable offline.
It answers chat, legacy completions, embeddings, responses, models, moderations, images and
audio on both URL layouts, streams like the real service, and can be steered while it runs:
change the `system_fingerprint`, make seeded answers vary, add latency, inject faults.
It also keeps the stateful resources (files, batches, stored and background responses, vector
stores, fine-tuning jobs) in memory, their statuses moving one step per retrieve.
Control it in-process through `SimulatorState`, or over HTTP at `/_sim/state`.
"""

from __future__ import annotations

from .app import create_simulator
from .state import SIM_STATE, SimulatorState

__all__ = ["SIM_STATE", "SimulatorState", "create_simulator"]
