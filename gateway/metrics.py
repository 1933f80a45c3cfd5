"""Process-local counters, rendered in the Prometheus text format at /metrics."""

from __future__ import annotations

from collections import Counter

_HELP: dict[str, str] = {
    "gateway_requests_total": "Requests handled by the proxy, by route kind and status class.",
    "gateway_refusals_total": "Requests refused by the gateway, by code.",
    "gateway_answers_settled_total": "Answers recorded in the ledger, by outcome.",
    "gateway_answers_duplicate_total": "Answers whose id was already in the ledger (not counted again).",
    "gateway_usage_estimated_total": "Answers charged by estimate because the upstream reported no usage.",
    "gateway_settle_retries_total": "Ledger writes retried after a storage error.",
    "gateway_settle_spooled_total": "Ledger writes spooled to the local file after retries failed.",
    "gateway_storage_errors_total": "Storage errors on the request path, by operation.",
    "gateway_upstream_errors_total": "Upstream failures, by kind.",
    "gateway_client_disconnects_total": "Clients that left before the answer ended.",
    "gateway_answers_recovered_total": "Pending answers of a gateway that died, charged by estimate.",
    "gateway_answers_cut_at_shutdown_total": "Answers still open when the shutdown grace ran out.",
}


class Metrics:
    def __init__(self) -> None:
        self._values: Counter[tuple[str, tuple[tuple[str, str], ...]]] = Counter()

    def inc(self, name: str, amount: int = 1, **labels: str) -> None:
        self._values[(name, tuple(sorted(labels.items())))] += amount

    def get(self, name: str, **labels: str) -> int:
        return self._values[(name, tuple(sorted(labels.items())))]

    def render(self) -> str:
        lines: list[str] = []
        for name, help_text in _HELP.items():
            lines.append(f"# HELP {name} {help_text}")
            lines.append(f"# TYPE {name} counter")
            for (metric, labels), value in sorted(self._values.items()):
                if metric != name:
                    continue
                rendered = ",".join(f'{k}="{v}"' for k, v in labels)
                lines.append(f"{name}{{{rendered}}} {value}" if rendered else f"{name} {value}")
        return "\n".join(lines) + "\n"
