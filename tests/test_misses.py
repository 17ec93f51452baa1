"""The miss index: the recordings sharing the most fields with a request come first."""

from __future__ import annotations

from typing import Any

from replay_proxy.core.explain import bucket, features
from replay_proxy.server.misses import CassetteIndex


def _request(route: str = "chat/completions", **body: Any) -> dict[str, Any]:
    fields = {"model": "gpt-4o-mini", "seed": 1, "temperature": 0.5,
              "messages": [{"role": "system", "content": "Be brief."},
                           {"role": "user", "content": "Hi"}], **body}
    return {"provider": "openai", "method": "POST", "route": route, "deployment": None,
            "api_version": None, "query": [], "headers": {}, "body": fields}


def test_features_differ_exactly_where_the_requests_do() -> None:
    same = features(_request()), features(_request())
    assert same[0] == same[1]
    changed = set(features(_request(temperature=0.9))) ^ set(features(_request()))
    assert len(changed) == 2  # one feature out, one in
    later_message = _request(messages=[{"role": "system", "content": "Be brief."},
                                       {"role": "user", "content": "Bye"}])
    assert len(set(features(later_message)) ^ set(features(_request()))) == 2
    assert bucket(_request()) != bucket(_request(model="o3"))


async def test_the_nearest_share_the_most_fields() -> None:
    index = CassetteIndex(built_at=0.0)
    for seed in range(200):
        index.add("chat.completions", f"seed-{seed}", _request(seed=seed))
    index.add("chat.completions", "two-off", _request(seed=7, temperature=0.1, top_p=0.5))
    index.add("embeddings", "embedding", _request(route="embeddings"))
    nearest = await index.nearest(_request(seed=7, temperature=0.1), limit=3)
    assert nearest[:2] in ([("chat.completions", "seed-7"), ("chat.completions", "two-off")],
                           [("chat.completions", "two-off"), ("chat.completions", "seed-7")])
    assert len(nearest) == 3
    # Another model: no bucket of its own, so the closest buckets answer.
    elsewhere = await index.nearest(_request(model="o3", seed=7), limit=2)
    assert len(elsewhere) == 2 and all(label == "chat.completions" for label, _ in elsewhere)
    index.add("chat.completions", "seed-7", _request(seed=7))  # known keys are not added twice
    assert sum(len(b.names) for b in index.buckets.values()) == 202
