"""The log's formats at their edges: an error with a traceback under `--log-format json`, and
the misses kept for the summary past their limit."""

from __future__ import annotations

import io
import logging

import orjson
from replay_proxy.server.access_log import LOGGER, Access, JsonLines, Misses


def _logger(name: str, handler: logging.Handler) -> logging.Logger:
    logger = logging.getLogger(name)
    logger.handlers = [handler]
    logger.propagate = False
    logger.setLevel(logging.INFO)
    return logger


def test_an_error_with_its_traceback_is_one_json_line() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonLines())
    logger = _logger("replay_proxy.test_json_lines", handler)
    try:
        try:
            raise OSError(28, "No space left on device")
        except OSError:
            logger.exception("could not store the answer for %s", "POST chat/completions")
    finally:
        logger.handlers, logger.propagate = [], True
    [line] = stream.getvalue().splitlines()  # the traceback does not break the line
    record = orjson.loads(line)
    assert record["level"] == "error" and record["logger"] == "replay_proxy.test_json_lines"
    assert record["message"] == "could not store the answer for POST chat/completions"
    assert record["exception"].startswith("Traceback")
    assert "OSError: [Errno 28] No space left on device" in record["exception"]
    assert record["time"].endswith("Z")


def _miss(number: int) -> Access:
    return Access("POST", "/v1/chat/completions", "default", f"{number:016x}", "miss", 404,
                  None, 1.0)


def test_misses_past_the_limit_are_counted_not_kept() -> None:
    misses = Misses(limit=2)
    logger = _logger(LOGGER + ".test_misses", misses)
    try:
        for number in range(5):
            logger.info("%s", _miss(number).text(), extra={"access": _miss(number)})
        hit = Access("POST", "/v1/chat/completions", "default", "f" * 16, "hit", 200, None, 1.0)
        logger.info("%s", hit.text(), extra={"access": hit})
        logger.info("a line that is not a request")
    finally:
        logger.handlers, logger.propagate = [], True
    assert [access.key for access in misses.found] == [f"{0:016x}", f"{1:016x}"]
    assert misses.dropped == 3
