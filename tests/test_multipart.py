"""Multipart uploads are keyed by what they hold: different files never share a key, and no
other body can take an upload's key."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import httpx2
import orjson
import pytest
from openai import OpenAI
from replay_proxy.core.canonical import (
    IncomingRequest,
    KeyPolicy,
    canonical_request,
    multipart_parts,
    request_key,
)
from replay_proxy.core.errors import ProxyError
from replay_proxy.core.explain import explain_miss
from replay_proxy.core.modes import Mode
from replay_proxy.core.providers import parse_route
from replay_proxy.tools.testing import SimulatorThread

from tests.conftest import SECRET_KEY, ProxyFactory, recorded_files

TRANSCRIPTIONS = parse_route("/v1/audio/transcriptions", {})
BOUNDARY = "XyZ"
TYPE = f"multipart/form-data; boundary={BOUNDARY}"


def form(*parts: tuple[str, bytes], boundary: str = BOUNDARY) -> bytes:
    """A multipart body from (Content-Disposition parameters, content) pairs."""
    body = b""
    for disposition, content in parts:
        body += (f"--{boundary}\r\nContent-Disposition: form-data; {disposition}\r\n\r\n"
                 .encode() + content + b"\r\n")
    return body + f"--{boundary}--\r\n".encode()


def canonical(body: bytes, content_type: str = TYPE, route: Any = TRANSCRIPTIONS) -> dict[str, Any]:
    request = IncomingRequest("POST", route, (), {"content-type": content_type}, body)
    return canonical_request(request, KeyPolicy())


def key(body: bytes, content_type: str = TYPE, route: Any = TRANSCRIPTIONS) -> str:
    return request_key(canonical(body, content_type, route))


def test_binary_files_named_with_filename_star_are_keyed_by_their_bytes() -> None:
    def upload(audio: bytes) -> bytes:
        return form(('name="model"', b"whisper-1"),
                    ("name=\"file\"; filename*=UTF-8''t%C3%A9l%C3%A9phone.wav", audio))

    one, two = b"RIFF\xff\xfe\x00\x01", b"RIFF\xfd\xfc\x00\x01"
    assert key(upload(one)) != key(upload(two))
    file_part = next(p for p in multipart_parts(upload(one), TYPE) if p["name"] == "file")
    assert set(file_part) == {"name", "sha256", "size", "content_type"} and file_part["size"] == 8


def test_a_text_file_is_hashed_too_and_its_name_does_not_count() -> None:
    def upload(name: str, content: bytes) -> bytes:
        return form(('name="model"', b"whisper-1"), (f'name="file"; filename="{name}"', content))

    assert key(upload("a.txt", b"hello")) == key(upload("b.txt", b"hello"))
    assert key(upload("a.txt", b"hello")) != key(upload("a.txt", b"hello!"))
    assert "hello" not in orjson.dumps(canonical(upload("a.txt", b"hello"))).decode()


def test_field_values_that_are_not_utf8_are_hashed() -> None:
    # Decoded with replacement characters, these two would read the same.
    one = form(('name="prompt"', b"caf\xe9"))
    two = form(('name="prompt"', b"caf\xe8"))
    assert key(one) != key(two)
    assert multipart_parts(form(('name="prompt"', "café".encode())), TYPE) == [
        {"name": "prompt", "value": "café"}]


def test_quoted_names_keep_their_semicolons() -> None:
    parts = multipart_parts(form(('name="a; b"', b"1"), ('name="a; c"', b"2")), TYPE)
    assert parts == [{"name": "a; b", "value": "1"}, {"name": "a; c", "value": "2"}]


def test_content_holding_the_boundary_text_mid_line_is_legal() -> None:
    # Only CRLF + "--" + boundary ends a part; the same text inside a line is content.
    audio = b"RIFF--XyZ not a delimiter--XyZ--"
    parts = multipart_parts(form(('name="file"; filename="a.wav"', audio)), TYPE)
    assert parts[0]["size"] == len(audio)


def test_quoted_boundaries_and_repeated_fields() -> None:
    body = form(('name="timestamp_granularities[]"', b"word"),
                ('name="timestamp_granularities[]"', b"segment"), boundary="a;b=c")
    content_type = 'multipart/form-data; boundary="a;b=c"'
    assert [p["value"] for p in multipart_parts(body, content_type)] == ["word", "segment"]
    swapped = form(('name="timestamp_granularities[]"', b"segment"),
                   ('name="timestamp_granularities[]"', b"word"), boundary="a;b=c")
    assert key(body, content_type) != key(swapped, content_type)  # their order is kept
    reordered = form(('name="b"', b"2"), ('name="a"', b"1"))
    assert key(reordered) == key(form(('name="a"', b"1"), ('name="b"', b"2")))


def test_a_json_body_shaped_like_an_upload_never_gets_its_key() -> None:
    upload = form(('name="model"', b"whisper-1"), ('name="file"; filename="a.wav"', b"RIFF"))
    keyed = canonical(upload)
    assert keyed["body_kind"] == "multipart"
    for forged in ({"multipart": keyed["body"]}, keyed["body"], {"body": keyed["body"],
                                                                   "body_kind": "multipart"}):
        assert key(orjson.dumps(forged), "application/json") != key(upload)
    binary_route = parse_route("/v1/files/upload", {})
    raw = canonical(b"\x00\x01", "application/octet-stream", binary_route)
    assert raw["body_kind"] == "bytes"
    assert key(orjson.dumps(raw["body"]), "application/json", binary_route) != \
        key(b"\x00\x01", "application/octet-stream", binary_route)


def test_json_requests_carry_no_body_kind() -> None:
    chat = parse_route("/v1/chat/completions", {})
    assert "body_kind" not in canonical(b'{"model": "m", "messages": []}', "application/json", chat)


@pytest.mark.parametrize(("content_type", "body"), [
    ("multipart/form-data; boundary=\udce9", form(('name="a"', b"1"))),  # a \xe9 byte, decoded
    ("multipart/form-data; boundary=é", form(('name="a"', b"1"))),
    ("multipart/form-data", form(('name="a"', b"1"))),
    ("multipart/form-data; boundary=" + "b" * 71, form(('name="a"', b"1"), boundary="b" * 71)),
    (TYPE, form(('name="a"', b"1"))[:-8]),  # cut before the closing boundary
    (TYPE, b"--XyZ\r\nContent-Disposition: attachment\r\n\r\nx\r\n--XyZ--\r\n"),
    (TYPE, b"--XyZ\nno CRLF\n--XyZ--"),
    (TYPE, form((f'name="a"; x="{"y" * 20_000}"', b"1"))),  # part headers past the limit
])
def test_bad_multipart_is_a_clear_400(content_type: str, body: bytes) -> None:
    with pytest.raises(ProxyError) as caught:
        key(body, content_type)
    assert caught.value.status == 400 and caught.value.code == "invalid_multipart"


def test_a_miss_on_an_upload_names_the_differing_part() -> None:
    recorded = canonical(form(('name="model"', b"whisper-1"), ('name="language"', b"en")))
    requested = canonical(form(('name="model"', b"whisper-1"), ('name="language"', b"fr")))
    message = explain_miss("c", requested, "k" * 64, [("audio.transcriptions", "a" * 64,
                                                       recorded)])
    assert 'body[0].value: "en" -> "fr"' in message and "1 field(s)" in message


def test_uploads_record_and_replay_through_the_proxy(make_proxy: ProxyFactory,
                                                     simulator: SimulatorThread,
                                                     cassettes: Path) -> None:
    audio = b"RIFF\x24\x00\x00\x00WAVEfmt " + bytes(range(256))
    with make_proxy(Mode.RECORD) as proxy, OpenAI(base_url=proxy.url + "/v1",
                                                  api_key=SECRET_KEY) as client:
        first = client.audio.transcriptions.with_raw_response.create(
            model="whisper-1", file=("take.wav", io.BytesIO(audio)), language="en")
        # The same upload, its file named the RFC 5987 way: the same key.
        same = httpx2.post(proxy.url + "/v1/audio/transcriptions", headers={
            "Authorization": f"Bearer {SECRET_KEY}", "Content-Type": TYPE},
            content=form(('name="model"', b"whisper-1"), ('name="language"', b"en"),
                         ("name=\"file\"; filename*=UTF-8''d%C3%A9j%C3%A0.wav\r\n"
                          "Content-Type: audio/x-wav", audio)))
    assert first.headers["x-replay-status"] == "recorded"
    assert same.headers["x-replay-status"] == "hit", same.text
    simulator.stop()
    with make_proxy(Mode.REPLAY) as proxy, OpenAI(base_url=proxy.url + "/v1",
                                                  api_key="x") as client:
        again = client.audio.transcriptions.with_raw_response.create(
            model="whisper-1", file=("renamed.wav", io.BytesIO(audio)), language="en")
    assert again.http_response.content == first.http_response.content
    assert [orjson.loads(p.read_bytes())["request"]["body_kind"]
            for p in recorded_files(cassettes)] == ["multipart"]


@pytest.mark.parametrize("content_type", [b"multipart/form-data; boundary=\xe9",
                                          b"multipart/form-data; boundary=XyZ"])
def test_bad_multipart_through_the_proxy_is_a_400_and_nothing_is_stored(
        make_proxy: ProxyFactory, simulator: SimulatorThread, cassettes: Path,
        content_type: bytes) -> None:
    with make_proxy(Mode.RECORD) as proxy:
        response = httpx2.post(proxy.url + "/v1/audio/transcriptions", headers={
            "Authorization": f"Bearer {SECRET_KEY}", "Content-Type": content_type},
            content=b"--XyZ\r\nContent-Disposition: form-data; name=\"a\"\r\n\r\nunfinished")
        assert response.status_code == 400
        error = response.json()["error"]
        assert error["code"] == "invalid_multipart" and "multipart" in error["message"]
        assert simulator.state.calls == 0 and recorded_files(cassettes) == []
        healthy = httpx2.get(proxy.url + "/_replay/health")
        assert healthy.status_code == 200
