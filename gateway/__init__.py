"""gateway: a usage-metering reverse proxy for LLM chat APIs (Dify, OpenAI-compatible)."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
