"""Masks, ignored paths and redactions: what the key leaves out of a request."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from replay_proxy.core.canonical import request_key
from replay_proxy.core.rules import (
    BUILTIN_MASKS,
    REDACTED,
    RuleError,
    Rules,
    compare_rules,
    parse_mask,
    parse_path,
)


def keyed(rules: Rules, body: Any) -> str:
    return request_key({"body": rules.apply(body).body})


@pytest.mark.parametrize(("name", "text", "expected"), [
    ("iso-date", "Today is 2026-11-21.", "Today is <iso-date>."),
    ("iso-datetime", "at 2026-11-21T18:22:14.548Z sharp", "at <iso-datetime> sharp"),
    ("iso-datetime", "at 2026-11-21 18:22 local", "at <iso-datetime> local"),
    ("uuid", "req 3f2b8c1e-9d4a-4b6f-8e2a-1c5d7f9a0b3e done", "req <uuid> done"),
    ("unix-ts", "ts=1795285235 ms=1795285235123", "ts=<unix-ts> ms=<unix-ts>"),
    ("hex-id", "trace 0123456789abcdef01 ok", "trace <hex-id> ok"),
    ("tmp-path", "read /tmp/pytest-of-root/p0/data.csv now", "read <tmp-path> now"),
])
def test_builtin_masks(name: str, text: str, expected: str) -> None:
    assert Rules.parse(masks=[name]).apply({"p": text}).body == {"p": expected}


@pytest.mark.parametrize(("name", "untouched"), [
    ("iso-date", "Version 2026-13-45 of nothing"), ("hex-id", "deadbeef is short"),
    ("unix-ts", "call 555-1234567"), ("uuid", "not-a-uuid-at-all"),
])
def test_builtin_masks_leave_lookalikes_alone(name: str, untouched: str) -> None:
    assert Rules.parse(masks=[name]).apply({"p": untouched}).body == {"p": untouched}


def test_a_regex_can_name_its_replacement_and_a_mask_can_be_limited_to_a_path() -> None:
    rules = Rules.parse(masks=[r"order-\d+=order-N", "messages[*].content:iso-date"])
    body = {"messages": [{"role": "user", "content": "order-42 on 2026-01-02"}],
            "metadata": {"note": "2026-01-02"}}
    applied = rules.apply(body)
    assert applied.body == {"messages": [{"role": "user", "content": "order-N on <iso-date>"}],
                            "metadata": {"note": "2026-01-02"}}
    assert applied.changed == {("messages", 0, "content"): "order-42 on 2026-01-02"}


def test_a_path_limited_mask_reaches_strings_under_the_path() -> None:
    rules = Rules.parse(masks=["messages[*].content:uuid"])
    body = {"messages": [{"content": [{"type": "text",
                                       "text": "id 3f2b8c1e-9d4a-4b6f-8e2a-1c5d7f9a0b3e"}]}]}
    assert rules.apply(body).body["messages"][0]["content"][0]["text"] == "id <uuid>"


def test_regexes_with_colons_equals_and_groups_are_whole_regexes() -> None:
    assert parse_mask(r"\d{2}:\d{2}").path is None
    assert parse_mask(r"(?<=id=)\w+").placeholder == "<masked>"
    mask = parse_mask(r"tool_calls[*]:call_\w+=call_X")
    assert str(mask.path) == "tool_calls[*]" and mask.placeholder == "call_X"


def test_ignored_paths_drop_nested_fields() -> None:
    rules = Rules.parse(ignore_paths=["metadata.trace_id", "messages[*].name",
                                      "tools[*].function.description"])
    body = {"metadata": {"trace_id": "t1", "team": "a"},
            "messages": [{"role": "user", "name": "ann", "content": "hi"}],
            "tools": [{"type": "function", "function": {"name": "f", "description": "d1"}}]}
    applied = rules.apply(body)
    assert applied.body == {"metadata": {"team": "a"},
                            "messages": [{"role": "user", "content": "hi"}],
                            "tools": [{"type": "function", "function": {"name": "f"}}]}
    assert set(applied.dropped) == {"metadata.trace_id", "messages[*].name",
                                    "tools[*].function.description"}
    other = {**body, "messages": [{"role": "user", "name": "bob", "content": "hi"}],
             "metadata": {"trace_id": "t2", "team": "a"}}
    assert keyed(rules, body) == keyed(rules, other)


@pytest.mark.parametrize("path", ["seed", "model", "messages", "messages[*]", "messages[0]",
                                  "messages[*].content", "messages[*].content[0].text",
                                  "input", "input[*].content", "prompt", "stream"])
def test_what_decides_the_answer_cannot_be_ignored(path: str) -> None:
    with pytest.raises(RuleError, match="decides the answer"):
        Rules.parse(ignore_paths=[path])


@pytest.mark.parametrize(("option", "value", "fragment"), [
    ("masks", "(unclosed", "not a valid regular expression"),
    ("masks", "x*", "matches the empty string"),
    ("redactions", "[", "not a valid regular expression"),
    ("ignore_paths", "messages..name", "is not a path"),
    ("ignore_paths", "a[x]", "is not a path"),
])
def test_bad_rules_say_what_to_write(option: str, value: str, fragment: str) -> None:
    with pytest.raises(RuleError, match=fragment):
        Rules.parse(**{option: [value]})


def test_redaction_applies_to_the_key_and_names_both() -> None:
    rules = Rules.parse(redactions=["email"])
    first = {"messages": [{"role": "user", "content": "Write to ann@example.com today"}]}
    second = {"messages": [{"role": "user", "content": "Write to bob@corp.example.org today"}]}
    assert rules.apply(first).body["messages"][0]["content"] == f"Write to {REDACTED} today"
    assert keyed(rules, first) == keyed(rules, second)
    assert rules.redact_text("call +1 415 555 0100") == "call +1 415 555 0100"
    assert Rules.parse(redactions=["phone"]).redact_text("call +1 415 555 0100") == \
        f"call {REDACTED}"


def test_rules_describe_themselves_and_say_how_they_changed() -> None:
    old = Rules.parse(masks=["iso-date"], ignore_paths=["metadata.trace_id"]).describe()
    assert old == {"mask": ["iso-date"], "ignore_path": ["metadata.trace_id"]}
    assert compare_rules(old, Rules.parse(masks=["iso-date"],
                                          ignore_paths=["metadata.trace_id"])) is None
    changed = compare_rules(old, Rules.parse(masks=["uuid"]))
    assert changed is not None
    assert "--mask 'uuid' is new" in changed
    assert "--mask 'iso-date' was in force when recorded and is not now" in changed
    assert "--ignore-path 'metadata.trace_id' was in force" in changed
    assert compare_rules(None, Rules()) is None


def test_paths_parse_with_a_body_prefix() -> None:
    assert parse_path("body.metadata.a[2]").steps == ("metadata", "a", 2)


# -- properties ------------------------------------------------------------------------------

MASKS = sorted(BUILTIN_MASKS)
text_without_digits = st.text(st.characters(blacklist_categories=["Nd"],
                                            blacklist_characters="/\\"), max_size=40)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | text_without_digits,
    lambda children: st.lists(children, max_size=3)
    | st.dictionaries(st.text(max_size=5), children, max_size=3), max_leaves=12)


@given(json_values, st.sampled_from(MASKS))
def test_a_mask_never_changes_what_it_does_not_match(value: Any, name: str) -> None:
    """No digits and no paths: none of the built-in masks can match, so nothing changes."""
    applied = Rules.parse(masks=[name]).apply(value)
    assert applied.body == value and not applied.changed


@given(st.lists(st.sampled_from(["2026-01-02", "1999-12-31", "2030-06-15"]), min_size=1,
                max_size=3),
       st.lists(st.sampled_from(["2026-03-04", "2001-01-01", "2042-10-10"]), min_size=1,
                max_size=3),
       st.text(alphabet="abc xyz", max_size=10))
def test_bodies_that_differ_only_in_masked_spans_share_a_key(
        first: list[str], second: list[str], prose: str) -> None:
    rules = Rules.parse(masks=["iso-date"])
    size = min(len(first), len(second))
    left = {"messages": [{"role": "user", "content": f"{prose} {day}."} for day in first[:size]]}
    right = {"messages": [{"role": "user", "content": f"{prose} {day}."}
                          for day in second[:size]]}
    assert keyed(rules, left) == keyed(rules, right)


@given(st.text(alphabet="abcdefg ", min_size=1, max_size=12),
       st.text(alphabet="abcdefg ", min_size=1, max_size=12))
def test_any_other_difference_changes_the_key(first: str, second: str) -> None:
    rules = Rules.parse(masks=["iso-date", "uuid"], ignore_paths=["metadata.trace_id"])
    left = {"messages": [{"role": "user", "content": f"{first} on 2026-01-02"}],
            "metadata": {"trace_id": "a"}}
    right = {"messages": [{"role": "user", "content": f"{second} on 2026-05-06"}],
             "metadata": {"trace_id": "b"}}
    assert (keyed(rules, left) == keyed(rules, right)) == (first == second)
