"""The defaults of the proxy's limits and addresses. Pure constants, with no imports: the option
table that every pytest start reads (`tools/options.py`) shows them without importing the core."""

from __future__ import annotations

DEFAULT_PORT = 8787
DEFAULT_MAX_BODY = 32 * 1024 * 1024
# Larger answers are passed through but not stored: a cassette is committed and reviewed.
DEFAULT_MAX_ANSWER = 64 * 1024 * 1024
DEFAULT_CACHE_MB = 256
DEFAULT_UPSTREAM_TIMEOUT = 600.0
# Longer than the openai SDK's own 10-minute default, so the proxy never gives up first.
DEFAULT_UPSTREAM_TOTAL_TIMEOUT = 900.0
DEFAULT_HEADER_TIMEOUT = 15.0
DEFAULT_MAX_CONNECTIONS = 1024
OPENAI_UPSTREAM = "https://api.openai.com"
