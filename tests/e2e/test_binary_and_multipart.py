"""Binary answers replay byte for byte; multipart uploads are keyed by content, not file name."""

from __future__ import annotations

import io
from pathlib import Path

from openai import OpenAI
from replay_proxy.core.modes import Mode
from replay_proxy.tools.testing import SimulatorThread

from tests.conftest import SECRET_KEY, ProxyFactory


def test_audio_speech_bytes_replay_losslessly(make_proxy: ProxyFactory,
                                              simulator: SimulatorThread, cassettes: Path) -> None:
    request = {"model": "gpt-4o-mini-tts", "voice": "alloy", "input": "Hello there"}
    with make_proxy(Mode.RECORD) as proxy, OpenAI(base_url=proxy.url + "/v1",
                                                  api_key=SECRET_KEY) as client:
        recorded = client.audio.speech.create(**request).content
    simulator.stop()
    with make_proxy(Mode.REPLAY) as proxy, OpenAI(base_url=proxy.url + "/v1",
                                                  api_key="x") as client:
        response = client.audio.speech.with_raw_response.create(**request)
    assert response.http_response.content == recorded
    assert recorded.startswith(b"ID3") and b"\xff" in recorded
    assert response.headers["content-type"] == "audio/mpeg"
    assert '"body_encoding": "base64"' in next(cassettes.rglob("audio.speech-*.json")).read_text()


def test_image_generation_replays(make_proxy: ProxyFactory, simulator: SimulatorThread) -> None:
    with make_proxy(Mode.RECORD) as proxy, OpenAI(base_url=proxy.url + "/v1",
                                                  api_key=SECRET_KEY) as client:
        recorded = client.images.generate(model="gpt-image-1", prompt="a fox")
    simulator.stop()
    with make_proxy(Mode.REPLAY) as proxy, OpenAI(base_url=proxy.url + "/v1",
                                                  api_key="x") as client:
        assert client.images.generate(model="gpt-image-1", prompt="a fox") == recorded


def test_transcription_is_keyed_by_file_content(make_proxy: ProxyFactory,
                                                simulator: SimulatorThread) -> None:
    audio = b"RIFF\x24\x00\x00\x00WAVEfmt " + bytes(range(64))
    with make_proxy(Mode.RECORD) as proxy, OpenAI(base_url=proxy.url + "/v1",
                                                  api_key=SECRET_KEY) as client:
        first = client.audio.transcriptions.with_raw_response.create(
            model="whisper-1", file=("take1.wav", io.BytesIO(audio)))
        renamed = client.audio.transcriptions.with_raw_response.create(
            model="whisper-1", file=("renamed.wav", io.BytesIO(audio)))
        different = client.audio.transcriptions.with_raw_response.create(
            model="whisper-1", file=("take1.wav", io.BytesIO(audio + b"\x01")))
    assert first.headers["x-replay-status"] == "recorded"
    assert renamed.headers["x-replay-status"] == "hit"
    assert different.headers["x-replay-status"] == "recorded"
    assert renamed.parse().text == first.parse().text
    assert simulator.state.calls == 2
