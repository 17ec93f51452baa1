"""Forwarding to the configured OpenAI or Azure upstream, and only there.

The target is always one of the configured upstream base URLs plus the parsed API path: a
Host header or an absolute URI in the request never chooses where a request goes.
"""

from __future__ import annotations

from collections.abc import Mapping

import aiohttp
from yarl import URL

from ..core.canonical import is_credential_param
from ..core.errors import UpstreamError
from ..core.providers import Route
from ..core.settings import Settings

UPSTREAM_CONNECTIONS = 256  # the upstream pool's size

_HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
    "trailers", "transfer-encoding", "upgrade", "host", "content-length", "accept-encoding",
    "expect",
})


class Upstream:
    def __init__(self, settings: Settings, session: aiohttp.ClientSession) -> None:
        self._settings = settings
        self._session = session

    def url(self, route: Route, query: Mapping[str, str]) -> URL:
        base = (self._settings.openai_upstream if route.provider == "openai"
                else self._settings.azure_upstream)
        if not base:
            raise UpstreamError(
                f"No upstream is configured for {route.provider} requests: start the proxy with "
                f"--{route.provider}-upstream URL (for Azure, your resource's endpoint, e.g. "
                "https://my-resource.openai.azure.com).",
                code="upstream_not_configured",
            )
        root = URL(base.rstrip("/"))
        prefix = root.path.rstrip("/")
        path = route.upstream_path
        if prefix.endswith("/v1") and path.startswith("/v1/"):
            path = path[3:]
        if self._settings.auth_token is not None:
            # The client's credential is the proxy's access token, which never leaves it.
            query = {name: value for name, value in query.items()
                     if not is_credential_param(name)}
        return root.with_path(prefix + path, encoded=False).with_query(dict(query))

    def headers(self, route: Route, incoming: Mapping[str, str]) -> dict[str, str]:
        """The client's headers minus hop-by-hop and proxy-control ones, with the proxy's own
        upstream key in place of the client's when it has one."""
        headers = {
            name: value for name, value in incoming.items()
            if name not in _HOP_BY_HOP and not name.startswith("x-replay-")
        }
        # Ask for compression only when the client did, and only in encodings decoded here;
        # the answer reaches the client (and the store) decoded either way.
        accepted = [token.strip() for token in incoming.get("accept-encoding", "").split(",")
                    if token.split(";")[0].strip() in ("gzip", "deflate")]
        if accepted:
            headers["accept-encoding"] = ", ".join(accepted)
        if self._settings.auth_token is not None:
            # The client's key is the proxy's access token, never a provider credential.
            headers.pop("authorization", None)
            headers.pop("api-key", None)
        if route.provider == "openai" and self._settings.openai_api_key:
            headers["authorization"] = f"Bearer {self._settings.openai_api_key}"
        if route.provider == "azure" and self._settings.azure_api_key:
            headers.pop("authorization", None)
            headers["api-key"] = self._settings.azure_api_key
        return headers

    async def send(self, method: str, route: Route, query: Mapping[str, str],
                   headers: Mapping[str, str], body: bytes) -> aiohttp.ClientResponse:
        url = self.url(route, query)
        try:
            return await self._session.request(
                method, url, headers=dict(self.headers(route, headers)), data=body or None,
                allow_redirects=False, skip_auto_headers=("Accept-Encoding",),
            )
        except TimeoutError as exc:
            raise UpstreamError(
                f"The upstream {url.origin()} did not answer within the timeout "
                "(--upstream-timeout, --upstream-total-timeout).",
                status=504, code="upstream_timeout",
            ) from exc
        except aiohttp.ClientError as exc:
            raise UpstreamError(
                f"Could not reach the upstream {url.origin()}: {exc}. Check "
                f"--{route.provider}-upstream and your network.",
            ) from exc


def client_timeout(settings: Settings) -> aiohttp.ClientTimeout:
    # `total` covers reading the answer too: an endless body or stream ends there.
    return aiohttp.ClientTimeout(total=settings.upstream_total_timeout, sock_connect=10.0,
                                 sock_read=settings.upstream_timeout)
