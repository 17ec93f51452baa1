from __future__ import annotations

import pytest
from replay_proxy.core.errors import ProxyError
from replay_proxy.core.providers import parse_route, split_cassette_prefix, validate_cassette_name


@pytest.mark.parametrize(("path", "query", "expected"), [
    ("/v1/chat/completions", {}, ("openai", "chat/completions", None, None)),
    ("/v1/models/gpt-4o", {}, ("openai", "models/gpt-4o", None, None)),
    ("/v1/audio/speech", {}, ("openai", "audio/speech", None, None)),
    ("/openai/deployments/my-gpt/chat/completions", {"api-version": "2024-10-21"},
     ("azure", "chat/completions", "my-gpt", "2024-10-21")),
    ("/openai/v1/responses", {}, ("azure", "responses", None, None)),
    ("/openai/models", {"api-version": "2024-10-21"}, ("azure", "models", None, "2024-10-21")),
])
def test_routes(path: str, query: dict[str, str], expected: tuple[object, ...]) -> None:
    route = parse_route(path, query)
    assert route is not None
    assert (route.provider, route.route, route.deployment, route.api_version) == expected


@pytest.mark.parametrize("path", ["/", "/v2/chat", "/v1/", "/openai/deployments//chat",
                                  "/v1/../admin", "/health", "/openai/deployments/a/../../x"])
def test_non_api_paths_have_no_route(path: str) -> None:
    assert parse_route(path, {}) is None


def test_cassette_prefix() -> None:
    assert split_cassette_prefix("/c/my-suite/v1/chat/completions") == \
        ("my-suite", "/v1/chat/completions")
    assert split_cassette_prefix("/c/tests.test_a/test_b/openai/deployments/d/embeddings") == \
        ("tests.test_a/test_b", "/openai/deployments/d/embeddings")
    assert split_cassette_prefix("/v1/models") == (None, "/v1/models")


@pytest.mark.parametrize("name", ["..", "../etc", "a/../../b", "/etc/passwd", "a//b", "a/",
                                  ".hidden", "a\\b", "%2e%2e", "a%2fb", "", "x" * 300, "a b",
                                  "nul\x00"])
def test_cassette_names_cannot_escape_the_root(name: str) -> None:
    with pytest.raises(ProxyError) as caught:
        validate_cassette_name(name)
    assert caught.value.status == 400 and caught.value.code == "invalid_cassette_name"


@pytest.mark.parametrize("path", ["/c/..%2f..%2fetc/v1/models", "/c/%2e%2e/v1/models",
                                  "/c/../v1/models", "/c//v1/models", "/c/v1/models"])
def test_cassette_prefix_refuses_traversal(path: str) -> None:
    with pytest.raises(ProxyError):
        split_cassette_prefix(path)


@pytest.mark.parametrize("deployment", [".", "gpt\n", "-x", ".hidden", "a b", "x" * 129,
                                        "gpt\x00"])
def test_an_azure_deployment_name_that_is_not_one_is_refused(deployment: str) -> None:
    """`/openai/deployments/./chat/completions` would be keyed as deployment `.` while the
    upstream's URL handling sends it to another route: refused, as a client error."""
    with pytest.raises(ProxyError) as caught:
        parse_route(f"/openai/deployments/{deployment}/chat/completions", {})
    assert caught.value.status == 400 and caught.value.code == "invalid_deployment"


@pytest.mark.parametrize("name", ["suite\n", "a/b\n"])
def test_a_trailing_newline_is_no_part_of_a_cassette_name(name: str) -> None:
    with pytest.raises(ProxyError):
        validate_cassette_name(name)
