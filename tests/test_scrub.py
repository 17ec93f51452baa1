"""The scrubber removes credentials and nothing else: stored text is the text that was answered."""

from __future__ import annotations

import itertools
import json

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from replay_proxy.core.scrub import REDACTED, scrub, scrub_stream, scrub_text, secret_values
from replay_proxy.core.sse import event_data

from tests.conftest import ORG_ID, PROJECT_ID, SECRET_KEY

# Words that look a little like credential prefixes but are ordinary text.
LOOKALIKES = ["risk-averse", "task-oriented", "desk-based", "ask-me-anything", "proj_manager",
              "org-chart", "org-wide-restructuring-announcement", "sk-learn",
              "sk-learn-is-a-machine-learning-library", "Bearer of bad news",
              "Authorization: Bearer YOUR_KEY", "whisk-together-the-eggs-and-the-flour",
              "proj_management_dashboard_v2", "kiosk-mode", "Dansk-sproget", "bask-in-sunlight"]
# A token too short to be any credential shape (the shortest is a prefix plus 16 characters),
# from any alphabet at all.
short_tokens = st.text(max_size=19)
# None of them can continue a credential (a "." could: bearer tokens hold dots).
separators = st.sampled_from([" ", "\n", ", ", "! ", "\t", '"', "(", ")", ":", "; ", "\r\n"])
innocent_text = st.lists(
    st.tuples(st.sampled_from(LOOKALIKES) | short_tokens, separators), max_size=30,
).map(lambda pairs: "".join(token + separator for token, separator in pairs))
# Credentials of the exchange, which the text does not contain.
absent_secrets = st.lists(
    st.text(st.characters(min_codepoint=33, max_codepoint=126), min_size=24, max_size=40)
    .map(lambda tail: "cred-" + tail), max_size=3)


@settings(max_examples=300, deadline=None)
@given(text=innocent_text, secrets=absent_secrets)
def test_text_without_a_credential_is_never_changed(text: str, secrets: list[str]) -> None:
    encoded = [secret.encode() for secret in secrets if secret not in text]
    assert scrub(text.encode(), encoded) == text.encode()
    assert scrub_text(text, encoded) == text
    for as_json in (orjson.dumps({"output": text, "instructions": [text, text[:7]]}),
                    json.dumps({"output": text}, ensure_ascii=True, indent=1).encode()):
        assert scrub(as_json, encoded) == as_json


@pytest.mark.parametrize("word", LOOKALIKES)
def test_lookalike_words_are_kept(word: str) -> None:
    sentence = f"A {word} answer; ({word}) and {word}.".encode()
    assert scrub(sentence) == sentence


@pytest.mark.parametrize("credential", [
    SECRET_KEY, ORG_ID, PROJECT_ID,
    "sk-" + "Ab3" * 16,  # a legacy key: 48 random characters
    "sk-svcacct-" + "xY9_-" * 20,
    "sk-admin-" + "Q1w2E3r4" * 5,
    "sk-proj-" + "*" * 40 + "cdef",  # masked, as a 401 quotes it
    "org-" + "AbCdEf0123456789ghIJklmn",
    "proj_" + "AbCdEf0123456789ghIJklmn",
])
def test_credential_shapes_are_redacted(credential: str) -> None:
    text = f"Incorrect API key provided: {credential}. See your settings."
    assert scrub(text.encode()) == f"Incorrect API key provided: {REDACTED}. See your settings.".encode()


def test_bearer_tokens_are_redacted_but_placeholders_kept() -> None:
    token = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N"
    assert scrub(f"Authorization: Bearer {token}".encode()) == f"Authorization: {REDACTED}".encode()
    kept = b"Use an Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY)."
    assert scrub(kept) == kept


def test_exact_credentials_go_first_whatever_their_shape() -> None:
    headers = {"authorization": "Bearer plain-words-key", "api-key": "0123456789abcdef0123",
               "cookie": "session=abc", "openai-organization": ORG_ID}
    secrets = secret_values(headers)
    assert secrets == [b"plain-words-key", b"0123456789abcdef0123", ORG_ID.encode(),
                       b"session=abc"]
    text = b"echo plain-words-key and 0123456789abcdef0123 in risk-averse text, org " + \
        ORG_ID.encode()
    assert scrub(text, secrets) == \
        f"echo {REDACTED} and {REDACTED} in risk-averse text, org {REDACTED}".encode()


def test_a_credential_inside_a_longer_token_is_still_removed() -> None:
    # The pattern needs a token start, the exact value does not: its bytes must go wherever
    # they are.
    assert scrub(b"key=xxplain-words-keyxx", [b"plain-words-key"]) == f"key=xx{REDACTED}xx".encode()


def test_overlapping_matches_become_one_marker() -> None:
    assert scrub(f"[{SECRET_KEY}]".encode(), [SECRET_KEY.encode(), SECRET_KEY[:20].encode()]) \
        == f"[{REDACTED}]".encode()


def test_binary_bodies_round_trip() -> None:
    audio = b"ID3\x04\x00\xff\xfe" + bytes(range(256))
    assert scrub(audio, [b"plain-words-key"]) == audio
    assert scrub(audio + SECRET_KEY.encode() + b"\xff") == audio + REDACTED.encode() + b"\xff"


# ---- escaped and split secrets -----------------------------------------------------------

def _escaped(text: str) -> str:
    return "".join(f"\\u{ord(char):04x}" for char in text)


def _chat_event(content: str, index: int = 0, ascii_only: bool = False) -> bytes:
    payload = {"id": "chatcmpl-1", "object": "chat.completion.chunk",
               "choices": [{"index": index, "delta": {"content": content}}]}
    data = json.dumps(payload, ensure_ascii=True) if ascii_only else orjson.dumps(payload).decode()
    return f"data: {data}\n\n".encode()


def _content(events: list[bytes]) -> str:
    """What a client assembles from chat stream events."""
    text = ""
    for raw in events:
        data = event_data(raw)
        if data and data != b"[DONE]":
            text += orjson.loads(data)["choices"][0]["delta"]["content"]
    return text


@pytest.mark.parametrize("secret", [SECRET_KEY, "plain-words-key-of-the-proxy"])
def test_a_json_escaped_secret_is_found_and_only_its_bytes_change(secret: str) -> None:
    body = ('{\n  "id": "x",\n  "text": "caf\\u00e9 \\n key=' + _escaped(secret[:5]) + secret[5:]
            + ' end",\n  "n": 1.50\n}\n').encode()
    scrubbed = scrub(body, [secret.encode()])
    assert scrubbed == ('{\n  "id": "x",\n  "text": "caf\\u00e9 \\n key=' + REDACTED
                        + ' end",\n  "n": 1.50\n}\n').encode()
    assert orjson.loads(scrubbed)["text"] == f"café \n key={REDACTED} end"


def test_escapes_outside_the_secret_keep_their_spelling() -> None:
    body = ('["\\ud83d\\ude00 \\u0041\\t' + _escaped(SECRET_KEY) + '\\/\\"", "\\u00e9"]').encode()
    assert scrub(body) == ('["\\ud83d\\ude00 \\u0041\\t' + REDACTED + '\\/\\"", "\\u00e9"]').encode()


def test_a_key_streamed_four_characters_per_event_is_redacted_where_it_starts() -> None:
    text = f"Your key is {SECRET_KEY}, keep it safe."
    events = [_chat_event(text[i:i + 4]) for i in range(0, len(text), 4)] + [b"data: [DONE]\n\n"]
    scrubbed = scrub_stream(events, [])
    assert _content(scrubbed) == f"Your key is {REDACTED}, keep it safe."
    first = text.index("sk-") // 4
    last = (text.index("sk-") + len(SECRET_KEY) - 1) // 4
    assert scrubbed[:first] == events[:first] and scrubbed[last + 1:] == events[last + 1:]
    assert all(SECRET_KEY[i:i + 4].encode() not in b"".join(scrubbed[first:last + 1])
               for i in range(4, len(SECRET_KEY) - 4, 4))
    assert scrubbed[first + 1] == _chat_event("")  # a middle piece becomes an empty delta


def test_the_exact_secret_is_found_across_events_whatever_its_shape() -> None:
    secret = "upstream-key-held-by-the-proxy"
    text = f"echo {secret}!"
    events = [_chat_event(text[i:i + 3], ascii_only=True) for i in range(0, len(text), 3)]
    assert _content(scrub_stream(events, [secret.encode()])) == f"echo {REDACTED}!"
    assert _content(scrub_stream(events, [])) == text  # without the secret, nothing to find


def test_responses_deltas_are_read_per_item_and_event_name() -> None:
    def delta(item: str, text: str) -> bytes:
        data = orjson.dumps({"type": "response.output_text.delta", "item_id": item,
                             "output_index": 0, "content_index": 0, "delta": text})
        return b"event: response.output_text.delta\ndata: " + data + b"\n\n"

    key = SECRET_KEY
    # Two items streamed side by side: only item b's deltas add up to the key.
    events = [delta("a", "sk-p"), delta("b", key[:8]), delta("a", "lain text"),
              delta("b", key[8:20]), delta("b", key[20:])]
    scrubbed = scrub_stream(events, [])
    assert scrubbed[0] == events[0] and scrubbed[2] == events[2]
    deltas = [orjson.loads(event_data(raw) or b"")["delta"] for raw in scrubbed]
    assert [deltas[1], deltas[3], deltas[4]] == [REDACTED, "", ""]


def test_choices_are_told_apart_by_their_index() -> None:
    key = SECRET_KEY
    events = [_chat_event(key[:10], index=1), _chat_event("sk-", index=0),
              _chat_event(key[10:], index=1), _chat_event("learn", index=0)]
    scrubbed = scrub_stream(events, [])
    assert scrubbed[1] == events[1] and scrubbed[3] == events[3]
    assert scrubbed[0] == _chat_event(REDACTED, index=1) and scrubbed[2] == _chat_event("", 1)


def test_events_that_are_not_json_are_scrubbed_one_by_one() -> None:
    events = [b"event: error\ndata: bad key " + SECRET_KEY.encode() + b"\n\n",
              b": comment " + SECRET_KEY.encode() + b"\n\n", b"data: a\ndata: b\n\n"]
    assert scrub_stream(events, []) == [b"event: error\ndata: bad key " + REDACTED.encode()
                                        + b"\n\n", b": comment " + REDACTED.encode() + b"\n\n",
                                        events[2]]


def test_duplicate_keys_or_deep_nesting_still_scrub_each_string() -> None:
    duplicate = b'{"a": "x", "a": "' + SECRET_KEY.encode() + b'"}'
    assert scrub_stream([b"data: " + duplicate + b"\n\n"], []) == \
        [b'data: {"a": "x", "a": "' + REDACTED.encode() + b'"}\n\n']
    deep = b"[" * 1000 + b'"' + SECRET_KEY.encode() + b'"' + b"]" * 1000
    assert scrub_stream([b"data: " + deep + b"\n\n"], []) == \
        [b"data: " + deep.replace(SECRET_KEY.encode(), REDACTED.encode()) + b"\n\n"]


def _streamed(text: str, cuts: list[int], ascii_only: bool) -> list[bytes]:
    bounds = [0, *sorted(set(cut % (len(text) + 1) for cut in cuts)), len(text)]
    return [_chat_event(text[start:end], ascii_only=ascii_only)
            for start, end in itertools.pairwise(bounds)]


@settings(max_examples=200, deadline=None)
@given(text=innocent_text, cuts=st.lists(st.integers(0, 10_000), max_size=20),
       ascii_only=st.booleans(), secrets=absent_secrets)
def test_a_stream_without_a_credential_keeps_every_byte(text: str, cuts: list[int],
                                                        ascii_only: bool,
                                                        secrets: list[str]) -> None:
    events = _streamed(text, cuts, ascii_only)
    encoded = [secret.encode() for secret in secrets if secret not in text]
    assert scrub_stream(events, encoded) == events


@settings(max_examples=200, deadline=None)
@given(before=innocent_text, after=innocent_text, cuts=st.lists(st.integers(0, 10_000),
                                                                  max_size=20),
       ascii_only=st.booleans(), secret=st.sampled_from([SECRET_KEY, "exact-secret-value"]))
def test_a_streamed_secret_leaves_exactly_the_scrubbed_text(before: str, after: str,
                                                            cuts: list[int], ascii_only: bool,
                                                            secret: str) -> None:
    text = f"{before} {secret} {after}"
    events = _streamed(text, cuts, ascii_only)
    scrubbed = scrub_stream(events, [secret.encode()])
    assert _content(scrubbed) == f"{before} {REDACTED} {after}"
    for raw in scrubbed:
        assert secret.encode() not in raw and _escaped(secret).encode() not in raw
