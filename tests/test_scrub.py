"""The scrubber removes credentials and nothing else: stored text is the text that was answered."""

from __future__ import annotations

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from replay_proxy.core.scrub import REDACTED, scrub, scrub_text, secret_values

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
    as_json = orjson.dumps({"output": text, "instructions": [text, text[:7]]})
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
