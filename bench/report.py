"""The benchmark's tables and its targets (docs/performance.md), from the results dictionary.

Tables are Markdown, so the output of a run pastes into docs/performance.md.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from bench import litellm

PROXIES = ("naive", "fast", "gateway-sqlite", "gateway-postgres")
TARGET_PATH = "gateway-postgres"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [
        max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)
    ]
    line = "| " + " | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)) + " |"
    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    body = [
        "| "
        + " | ".join(
            c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))
        )
        + " |"
        for r in rows
    ]
    return "\n".join([line, rule, *body])


def _num(value: float | None, digits: int = 0, suffix: str = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:,.{digits}f}{suffix}"


def peak(results: dict[str, Any], path: str) -> float | None:
    levels = results.get("throughput", {}).get(path)
    if not levels:
        return None
    return float(max(level["answers_per_s"] for level in levels.values()))


def _top_level(results: dict[str, Any]) -> str:
    return str(max(results["settings"]["connections"]))


def throughput_table(results: dict[str, Any]) -> str:
    levels = [str(c) for c in results["settings"]["connections"]]
    top = _top_level(results)
    header = [
        "path",
        *(f"answers/s @{c}" for c in levels),
        f"proxy CPU @{top} (cores)",
        "in kernel",
        "CPU s / 1,000 answers",
        "with database",
        f"upstream CPU @{top}",
        f"wrk CPU @{top}",
        "failed",
    ]
    rows = []
    for path, by_level in results["throughput"].items():
        at_top = by_level[top]
        failed = sum(level["failed"] for level in by_level.values())
        proxied = path != "direct"
        share = at_top.get("proxy_system_share")
        rows.append(
            [
                path,
                *(_num(by_level[c]["answers_per_s"]) for c in levels),
                _num(at_top["cpu_cores"]["proxy"], 2) if proxied else "-",
                _num(100 * share, 0, "%") if proxied and share is not None else "-",
                _num(at_top["cpu_per_1000"], 2) if proxied else "-",
                _num(at_top["cpu_per_1000_with_database"], 2)
                if at_top["cpu_seconds"]["database"]
                else "-",
                _num(at_top["cpu_cores"]["upstream"], 2),
                _num(at_top["cpu_cores"]["wrk"], 2),
                str(failed),
            ]
        )
    return _table(header, rows)


def latency_table(results: dict[str, Any]) -> str:
    latency = results["latency"]
    direct = latency.get("direct")
    header = [
        "path",
        "TTFB p50",
        "TTFB p99",
        "TTLB p50",
        "TTLB p99",
        "added TTFB p50",
        "added TTFB p99",
        "samples",
        "failed",
    ]
    rows = []
    for path, r in latency.items():
        added50 = added99 = None
        if direct and path != "direct":
            added50 = r["ttfb_ms"]["p50"] - direct["ttfb_ms"]["p50"]
            added99 = r["ttfb_ms"]["p99"] - direct["ttfb_ms"]["p99"]
        rows.append(
            [
                path,
                _num(r["ttfb_ms"]["p50"], 2, " ms"),
                _num(r["ttfb_ms"]["p99"], 2, " ms"),
                _num(r["ttlb_ms"]["p50"], 1, " ms"),
                _num(r["ttlb_ms"]["p99"], 1, " ms"),
                _num(added50, 2, " ms") if path != "direct" else "-",
                _num(added99, 2, " ms") if path != "direct" else "-",
                str(r["samples"]),
                str(r["failed"]),
            ]
        )
    table = _table(header, rows)
    own = [
        f"{path} {r['ledger_overhead_ms']['p50']:.2f} ms p50, "
        f"{r['ledger_overhead_ms']['p99']:.2f} ms p99"
        for path, r in latency.items()
        if "ledger_overhead_ms" in r
    ]
    if own:
        table += (
            "\n\nReceiving to forwarding, as the gateway recorded it (ledger overhead_ms, "
            "same answers): " + "; ".join(own) + "."
        )
    return table


def memory_table(results: dict[str, Any]) -> str:
    streams = results["settings"]["streams"]
    after = results.get("rss_after_throughput", {})
    header = [
        "path",
        "RSS before",
        f"RSS with {streams:,} open streams",
        "per open stream",
        "opened",
        "RSS after the throughput phase",
    ]
    rows = [
        [
            path,
            _num(r["rss_before"] / 2**20, 1, " MiB"),
            _num(r["rss_during"] / 2**20, 1, " MiB"),
            _num(r["per_stream_kb"], 1, " KB"),
            f"{r['opened']:,}",
            _num(after[path] / 2**20, 1, " MiB") if path in after else "-",
        ]
        for path, r in results["memory"].items()
    ]
    return _table(header, rows)


def database_table(results: dict[str, Any]) -> str:
    db = results["database"]
    many = db.get("concurrent")
    at_once = f"{many['concurrency']} at a time" if many else "-"

    def row(name: str, one: float | None, batched: float | None) -> list[str]:
        return [name, _num(one, 2), _num(batched, 2)]

    rows = [
        row(
            "xact_commit (pg_stat_database)",
            db["xact_commit_per_answer"],
            many["xact_commit_per_answer"] if many else None,
        ),
        row(
            "round trips (counted on the wire)",
            db["round_trips_per_answer"],
            many["round_trips_per_answer"] if many else None,
        ),
    ]
    names = sorted({*db["by_statement"], *(many["by_statement"] if many else {})})
    rows += [
        row(
            f"  {name}",
            db["by_statement"].get(name, 0.0),
            many["by_statement"].get(name, 0.0) if many else None,
        )
        for name in names
    ]
    return _table(
        [f"gateway-postgres, per answer ({db['answers']:,} answers)", "one at a time", at_once],
        rows,
    )


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The targets for the gateway on PostgreSQL, one worker (docs/performance.md)."""
    out: list[dict[str, Any]] = []

    def add(name: str, goal: str, measured: float | None, ok: bool | None, detail: str) -> None:
        out.append(
            {"target": name, "goal": goal, "measured": measured, "pass": ok, "detail": detail}
        )

    gw, naive, fast = peak(results, TARGET_PATH), peak(results, "naive"), peak(results, "fast")
    if gw and naive and fast:
        add(
            "throughput vs naive pass-through",
            ">= 3.00x",
            gw / naive,
            gw / naive >= 3,
            f"{gw:,.0f} vs {naive:,.0f} answers/s",
        )
        # Issue 12 set 0.5x; the benchmark's first targets had 0.6x. Both are
        # reported so a run shows where it stands against each.
        for goal, aim in ((0.5, "issue 12"), (0.6, "first aim")):
            add(
                f"throughput vs fast pass-through ({aim})",
                f">= {goal:.2f}x",
                gw / fast,
                gw / fast >= goal,
                f"{gw:,.0f} vs {fast:,.0f} answers/s",
            )
    latency = results.get("latency", {})
    if TARGET_PATH in latency and "direct" in latency:
        for q, limit in (("p50", 1.0), ("p99", 5.0)):
            added = latency[TARGET_PATH]["ttfb_ms"][q] - latency["direct"]["ttfb_ms"][q]
            add(
                f"added time to first byte, {q}",
                f"<= {limit:.0f} ms",
                added,
                added <= limit,
                f"{latency[TARGET_PATH]['ttfb_ms'][q]:.2f} vs {latency['direct']['ttfb_ms'][q]:.2f} ms direct",
            )
    own = latency.get(TARGET_PATH, {}).get("ledger_overhead_ms")
    if own:
        # Issue 24: the gateway's own time from receiving a request to forwarding it.
        for q, limit in (("p50", 1.0), ("p99", 5.0)):
            add(
                f"receive-to-forward (ledger overhead_ms), {q}",
                f"<= {limit:.0f} ms",
                own[q],
                own[q] <= limit,
                f"{own['answers']:,} answers at {results['settings']['rate']:.0f}/s",
            )
    memory = results.get("memory", {}).get(TARGET_PATH)
    if memory:
        add(
            "memory per open stream",
            "<= 50 KB",
            memory["per_stream_kb"],
            memory["per_stream_kb"] <= 50,
            f"{memory['opened']:,} streams",
        )
    db = results.get("database")
    if db:
        add(
            "round trips on admission",
            "1",
            db["admission_round_trips"],
            db["admission_round_trips"] <= 1.0001,
            "gateway_admit and what the pool runs around it",
        )
        add(
            "writes per settled answer",
            "<= 1",
            db["settle_writes"],
            db["settle_writes"] <= 1.0001,
            f"{db['settle_round_trips']:.2f} round trips in all for settling",
        )
    for mode, by_name in results.get("openai", {}).get("modes", {}).items():
        for peer, goal in litellm.GOALS.items():
            ratio = by_name.get(f"ratio_{peer}")
            if ratio is None:
                continue
            add(
                f"OpenAI {mode}: gateway-openai (full accounting) vs {peer}",
                f">= {goal:g}x",
                ratio,
                ratio >= goal,
                f"{by_name['gateway-openai']['answers_per_s']:,.0f} vs "
                f"{by_name[peer]['answers_per_s']:,.0f} answers/s",
            )
    return out


def targets_table(rows: list[dict[str, Any]]) -> str:
    return _table(
        ["target (gateway-postgres, 1 worker)", "goal", "measured", "result", "detail"],
        [
            [
                r["target"],
                r["goal"],
                _num(r["measured"], 2),
                "PASS" if r["pass"] else "FAIL",
                r["detail"],
            ]
            for r in rows
        ],
    )


def render(results: dict[str, Any]) -> str:
    s = results["settings"]
    parts = [
        f"# gateway benchmark ({'smoke' if s['smoke'] else 'full'}), {results['machine']['date']}"
    ]
    m = results["machine"]
    parts.append(
        f"{m['cpus']} CPUs ({m['cpu_model']}), Python {m['python']}, {m['os']}, "
        f"upstream: {s['upstream_procs']} processes, {s['events']} message events per answer"
    )
    if results.get("throughput"):
        parts.append(
            f"\n## Throughput at saturation (wrk -t1, {s['rounds']} x {s['duration']} s per cell, "
            f"upstream delay 0)\n"
        )
        parts.append(throughput_table(results))
        direct = peak(results, "direct")
        fastest = max((peak(results, p) or 0.0 for p in PROXIES), default=0.0)
        wrk = max(
            level["cpu_cores"]["wrk"]
            for by_level in results["throughput"].values()
            for level in by_level.values()
        )
        if direct and fastest:
            parts.append(
                f"\nDirect to the upstream: {direct:,.0f} answers/s, {direct / fastest:.1f}x the "
                f"fastest proxy ({fastest:,.0f}/s): the upstream is not the limit. wrk used at "
                f"most {wrk:.2f} of a core."
            )
    if results.get("latency"):
        parts.append(
            f"\n## Latency at {s['rate']:.0f} answers/s (open loop, upstream "
            f"{s['latency_delay_ms']:.0f} ms between events)\n"
        )
        parts.append(latency_table(results))
    if results.get("memory"):
        parts.append(
            f"\n## Memory with {s['streams']:,} open streams (upstream "
            f"{s['stream_delay_ms'] / 1000:.0f} s between events)\n"
        )
        parts.append(memory_table(results))
    if results.get("database"):
        parts.append("\n## Database work per answer (PostgreSQL)\n")
        parts.append(database_table(results))
    if results.get("targets"):
        parts.append("\n## Targets\n")
        parts.append(targets_table(results["targets"]))
    if results.get("profile"):
        p = results["profile"]
        idle = p.get("idle_pool_samples", 0)
        parts.append(
            f"\n## Profile of {p.get('path', 'the gateway')} under wrk ({p['samples']:,} samples"
            + (f"; {idle:,} of idle pool threads left out" if idle else "")
            + ")\n"
        )
        parts.append(
            _table(
                ["innermost gateway frame (own code + its direct library calls)", "% samples"],
                [[k, f"{v:.1f}"] for k, v in list(p["gateway_attributed_pct"].items())[:12]],
            )
        )
        parts.append("")
        parts.append(
            _table(
                ["package of the running Python code", "% samples"],
                [[k, f"{v:.1f}"] for k, v in list(p["by_package_pct"].items())[:10]],
            )
        )
        calls = ", ".join(f"{k} {v:.1f}%" for k, v in p.get("syscall_pct", {}).items())
        parts.append(
            f"\nGarbage collection: {p['gc_pct']:.1f}% of samples. In system calls: {calls} "
            "(a sample in a write includes waiting to run again after waking the receiver)."
        )
    openai = litellm.render(results)
    if openai:
        parts.append(openai)
    for note in results.get("notes", []):
        parts.append(f"\nnote: {note}")
    return "\n".join(parts)
