from __future__ import annotations

from replay_proxy.core.explain import differences, explain_miss, nearest

RECORDED = {"provider": "openai", "method": "POST", "route": "chat/completions",
            "body": {"model": "gpt-4o-mini", "temperature": 0.7, "seed": 1,
                     "messages": [{"role": "user", "content": "Tell me about Mars today"}]}}


def _with(**body: object) -> dict[str, object]:
    return {**RECORDED, "body": {**RECORDED["body"], **body}}  # type: ignore[dict-item]


def test_lists_exactly_the_differing_fields() -> None:
    requested = _with(temperature=0.8, messages=[{"role": "user",
                                                  "content": "Tell me about Venus today"}])
    message = explain_miss("suite", requested, "f" * 64, [("chat.completions", "a" * 64, RECORDED)])
    assert "cassette 'suite'" in message and "POST chat/completions" in message
    assert "temperature: 0.7 -> 0.8" in message
    assert 'messages[0].content: "Tell me about Mars today" -> "Tell me about Venus today"' \
        in message
    long_before, long_after = "x" * 100 + " Mars " + "y" * 100, "x" * 100 + " Venus " + "y" * 100
    clipped = explain_miss("s", _with(messages=[{"role": "user", "content": long_after}]), "f" * 64,
                           [("l", "a", _with(messages=[{"role": "user", "content": long_before}]))])
    assert '"...xxxxxxxxxxx Mars yyyyyyyyyy..." -> "...xxxxxxxxxxx Venus yyyyyyyyyy..."' in clipped
    assert "2 field(s)" in message and "seed" not in message.split("differs")[1].split("To")[0]


def test_added_and_removed_fields_show_as_absent() -> None:
    requested = {**RECORDED, "body": {k: v for k, v in RECORDED["body"].items()  # type: ignore
                                      if k != "seed"}}
    found = differences({"seed": 1}, {})
    assert [d.render() for d in found] == ["seed: 1 -> (absent)"]
    assert "seed: 1 -> (absent)" in explain_miss("c", requested, "k" * 64,
                                                 [("l", "a" * 64, RECORDED)])


def test_nearest_prefers_the_same_route_then_fewest_differences() -> None:
    other_route = {**RECORDED, "route": "embeddings"}
    close = _with(temperature=0.9)
    far = _with(temperature=0.9, seed=5, model="o3")
    best = nearest(_with(temperature=0.8), [("e", "1", other_route), ("far", "2", far),
                                            ("close", "3", close)])
    assert best is not None and best.label == "close"
