"""replay-proxy: record OpenAI and Azure OpenAI calls once, replay them byte for byte."""

from __future__ import annotations

__version__ = "0.1.0"
