"""The gateway's benchmark harness: ``python -m bench [--smoke]`` (docs/performance.md)."""
