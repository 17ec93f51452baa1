from __future__ import annotations

import gzip
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from replay_proxy.core.canonical import IncomingRequest, KeyPolicy, canonical_request, request_key
from replay_proxy.core.errors import ProxyError
from replay_proxy.core.providers import parse_route

CHAT_ROUTE = parse_route("/v1/chat/completions", {})
assert CHAT_ROUTE is not None
POLICY = KeyPolicy()
JSON = {"content-type": "application/json"}


def key_of(body: bytes, headers: dict[str, str] | None = None, policy: KeyPolicy = POLICY,
           route: Any = CHAT_ROUTE, query: tuple[tuple[str, str], ...] = ()) -> str:
    request = IncomingRequest("POST", route, query, {**JSON, **(headers or {})}, body)
    return request_key(canonical_request(request, policy))


BASE: dict[str, Any] = {
    "model": "gpt-4o-mini",
    "messages": [{"role": "system", "content": "Be brief."},
                 {"role": "user", "content": "Hello"}],
    "seed": 42, "temperature": 0.5, "max_tokens": 100,
    "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
    "stream": False,
}

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=3)
    | st.dictionaries(st.text(max_size=5), children, max_size=3),
    max_leaves=10,
)


def _shuffled(value: Any, data: st.DataObject) -> Any:
    if isinstance(value, dict):
        names = data.draw(st.permutations(list(value)))
        return {name: _shuffled(value[name], data) for name in names}
    if isinstance(value, list):
        return [_shuffled(item, data) for item in value]
    return value


def _spell_floats(value: Any) -> Any:
    """Integers written as floats (1 -> 1.0), which must not change the key."""
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int):
        return float(value)
    if isinstance(value, dict):
        return {k: _spell_floats(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_spell_floats(v) for v in value]
    return value


@settings(max_examples=150, deadline=None)
@given(extra=st.dictionaries(st.sampled_from(["top_p", "n", "stop", "response_format"]),
                             json_values, max_size=3),
       data=st.data(), indent=st.booleans())
def test_key_is_stable_under_order_whitespace_and_number_spelling(
        extra: dict[str, Any], data: st.DataObject, indent: bool) -> None:
    body = {**BASE, **extra}
    reference = key_of(orjson.dumps(body))
    reordered = _shuffled(body, data)
    option = orjson.OPT_INDENT_2 if indent else 0
    assert key_of(orjson.dumps(reordered, option=option)) == reference
    assert key_of(orjson.dumps(_spell_floats(reordered))) == reference


semantic_changes = st.one_of(
    st.tuples(st.just("model"), st.sampled_from(["gpt-4o", "gpt-4.1-mini", "o3"])),
    st.tuples(st.just("seed"), st.integers(0, 2**31).filter(lambda s: s != 42)),
    st.tuples(st.just("temperature"), st.floats(0, 2).filter(lambda t: t != 0.5)),
    st.tuples(st.just("max_tokens"), st.integers(1, 4096).filter(lambda t: t != 100)),
    st.tuples(st.just("stream"), st.just(True)),
    st.tuples(st.just("messages"), st.text(min_size=1).filter(lambda t: t != "Hello").map(
        lambda text: [BASE["messages"][0], {"role": "user", "content": text}])),
    st.tuples(st.just("tools"), st.text(min_size=1, max_size=10).filter(lambda n: n != "f").map(
        lambda name: [{"type": "function", "function": {"name": name,
                                                        "parameters": {"type": "object"}}}])),
)


@settings(max_examples=200, deadline=None)
@given(change=semantic_changes)
def test_key_changes_under_any_semantic_change(change: tuple[str, Any]) -> None:
    name, value = change
    assert key_of(orjson.dumps({**BASE, name: value})) != key_of(orjson.dumps(BASE))


@given(seed=st.integers(0, 2**40))
def test_removing_the_seed_changes_the_key(seed: int) -> None:
    with_seed = {**BASE, "seed": seed}
    without = {k: v for k, v in BASE.items() if k != "seed"}
    assert key_of(orjson.dumps(with_seed)) != key_of(orjson.dumps(without))


def test_null_fields_equal_absent_ones_and_ignored_fields_do_not_count() -> None:
    without = {k: v for k, v in BASE.items() if k != "seed"}
    assert key_of(orjson.dumps({**without, "seed": None})) == key_of(orjson.dumps(without))
    tagged = {**BASE, "user": "alice", "metadata": {"run": "1"}, "store": True}
    assert key_of(orjson.dumps(tagged)) == key_of(orjson.dumps(BASE))


def test_match_field_brings_an_ignored_field_back() -> None:
    policy = KeyPolicy.build(match=("user",))
    assert key_of(orjson.dumps({**BASE, "user": "a"}), policy=policy) != \
        key_of(orjson.dumps({**BASE, "user": "b"}), policy=policy)


def test_ignore_field_drops_a_field_but_never_the_seed() -> None:
    policy = KeyPolicy.build(ignore=("temperature",))
    assert key_of(orjson.dumps({**BASE, "temperature": 0.1}), policy=policy) == \
        key_of(orjson.dumps(BASE), policy=policy)
    with pytest.raises(ValueError, match="seed"):
        KeyPolicy.build(ignore=("seed",))


def test_headers_credentials_and_sdk_noise_are_not_keyed_but_openai_beta_is() -> None:
    body = orjson.dumps(BASE)
    noisy = {"authorization": "Bearer sk-a", "api-key": "b", "user-agent": "OpenAI/Python 9",
             "x-stainless-retry-count": "2", "x-stainless-os": "Linux",
             "openai-organization": "org-1"}
    assert key_of(body, noisy) == key_of(body)
    assert key_of(body, {"openai-beta": "assistants=v2"}) != key_of(body)


def test_azure_deployment_and_api_version_are_keyed() -> None:
    def azure(deployment: str, version: str) -> str:
        route = parse_route(f"/openai/deployments/{deployment}/chat/completions",
                            {"api-version": version})
        return key_of(orjson.dumps(BASE), route=route, query=(("api-version", version),))

    assert azure("a", "2024-10-21") != azure("b", "2024-10-21")
    assert azure("a", "2024-10-21") != azure("a", "2025-01-01")
    assert azure("a", "2024-10-21") != key_of(orjson.dumps(BASE))


def test_gzip_request_body_is_decoded_before_keying() -> None:
    body = orjson.dumps(BASE)
    assert key_of(gzip.compress(body), {"content-encoding": "gzip"}) == key_of(body)


def test_non_json_bodies_are_keyed_by_bytes_and_multipart_by_part_content() -> None:
    route = parse_route("/v1/audio/transcriptions", {})

    def multipart(filename: str, content: bytes, model: str = "whisper-1") -> str:
        boundary = "XyZ"
        body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\n{model}\r\n"
                f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; "
                f"filename=\"{filename}\"\r\nContent-Type: audio/wav\r\n\r\n").encode() + \
            content + f"\r\n--{boundary}--\r\n".encode()
        return key_of(body, {"content-type": f"multipart/form-data; boundary={boundary}"},
                      route=route)

    assert multipart("a.wav", b"RIFF1") == multipart("renamed.wav", b"RIFF1")
    assert multipart("a.wav", b"RIFF1") != multipart("a.wav", b"RIFF2")
    assert multipart("a.wav", b"RIFF1") != multipart("a.wav", b"RIFF1", model="whisper-2")
    binary_route = parse_route("/v1/files/upload", {})
    assert key_of(b"\x00\x01", {"content-type": "application/octet-stream"}, route=binary_route) \
        != key_of(b"\x00\x02", {"content-type": "application/octet-stream"}, route=binary_route)


@pytest.mark.parametrize(("body", "headers", "code"), [
    (b"{not json", {}, "invalid_json"),
    (b"", {}, "empty_body"),
    (b'{"a": "\xff"}', {}, "invalid_json"),
    (b'{"model": "x"}', {"content-type": "text/plain"}, "invalid_content_type"),
    (b'{"model": "x"}', {"content-type": ""}, "invalid_content_type"),
    (b"not gzip", {"content-encoding": "gzip"}, "invalid_body_encoding"),
])
def test_bad_bodies_raise_clear_errors(body: bytes, headers: dict[str, str], code: str) -> None:
    with pytest.raises(ProxyError) as caught:
        key_of(body, headers)
    assert caught.value.code == code
    assert caught.value.status in (400, 415)


@pytest.mark.parametrize("name", ["api-key", "API-KEY", "api_key", "subscription-key",
                                  "access_token", "code", "key", "sig", "client_secret"])
def test_credential_query_parameters_are_no_part_of_the_key(name: str) -> None:
    body = orjson.dumps(BASE)
    request = IncomingRequest("POST", CHAT_ROUTE, ((name, "secret-value-123"), ("after", "x")),
                              JSON, body)
    canonical = canonical_request(request, POLICY)
    assert canonical["query"] == [["after", "x"]]
    assert b"secret-value-123" not in orjson.dumps(canonical)
    assert request_key(canonical) == key_of(body, query=(("after", "x"),))
    assert key_of(body, query=(("after", "y"),)) != request_key(canonical)  # others still count
