"""The demo's report, built only from the spans that the sidecars exported."""

from __future__ import annotations

from collections import defaultdict

from trustmesh.demo.otlp_receiver import ReceivedSpan

__all__ = ["call_rows", "render_table", "render_tree"]


def _short(spiffe_id: object) -> str:
    text = str(spiffe_id or "")
    return text.rsplit("/", 1)[-1] if text else "?"


def call_rows(spans: list[ReceivedSpan]) -> list[dict[str, str]]:
    """One row per inter-agent call: the callee's decision if it got that far."""
    servers = {s.parent_span_id: s for s in spans if s.kind == "SERVER"}
    rows = []
    for client in sorted((s for s in spans if s.kind == "CLIENT"), key=lambda s: s.start_ns):
        server = servers.get(client.span_id)
        decided = server or client
        rows.append(
            {
                "caller": _short(client.attributes.get("trustmesh.caller.spiffe_id")),
                "callee": _short(
                    decided.attributes.get("trustmesh.callee.spiffe_id")
                    or client.attributes.get("trustmesh.callee.spiffe_id")
                    or client.attributes.get("trustmesh.target")
                ),
                "method": "/" + client.name,
                "decision": str(decided.attributes.get("trustmesh.decision", "?")),
                "reason": str(decided.attributes.get("trustmesh.reason", "?")),
                "decided_by": "callee" if server else "caller",
                "latency": f"{client.duration_ms:.1f} ms",
            }
        )
    return rows


def render_table(spans: list[ReceivedSpan]) -> str:
    rows = call_rows(spans)
    head = {
        "caller": "CALLER",
        "callee": "CALLEE",
        "method": "METHOD",
        "decision": "DECISION",
        "reason": "REASON",
        "decided_by": "DECIDED BY",
        "latency": "LATENCY",
    }
    cols = list(head)
    widths = {
        c: max(len(head[c]), *(len(r[c]) for r in rows)) if rows else len(head[c]) for c in cols
    }
    lines = [
        "calls (from exported spans):",
        "  " + "  ".join(head[c].ljust(widths[c]) for c in cols),
    ]
    lines += ["  " + "  ".join(r[c].ljust(widths[c]) for c in cols) for r in rows]
    return "\n".join(lines)


def _label(s: ReceivedSpan) -> str:
    a = s.attributes
    side = "client" if s.kind == "CLIENT" else "server"
    callee = a.get("trustmesh.callee.spiffe_id") or a.get("trustmesh.target")
    who = _short(a.get("trustmesh.caller.spiffe_id")) + " -> " + _short(callee)
    verdict = f"{a.get('trustmesh.decision', '?')} ({a.get('trustmesh.reason', '?')})"
    where = s.service.removeprefix("sidecar-")
    line = f"[{side}@{where}] /{s.name}  {who}  {verdict}  {s.duration_ms:.1f} ms"
    origin = a.get("trustmesh.origin")
    if origin:  # a verified delegation chain: who started it, and through whom
        path = " > ".join(_short(p) for p in str(a.get("trustmesh.chain", "")).split(" > "))
        line += f"  [origin {str(origin).removeprefix('user:')}; chain {path}]"
    return line


def _walk(
    children: dict[str, list[ReceivedSpan]], parent: str, depth: int, lines: list[str]
) -> None:
    for s in sorted(children.get(parent, []), key=lambda x: x.start_ns):
        lines.append("    " + "  " * depth + "└─ " + _label(s))
        _walk(children, s.span_id, depth + 1, lines)


def render_tree(spans: list[ReceivedSpan]) -> str:
    by_trace: dict[str, list[ReceivedSpan]] = defaultdict(list)
    for s in spans:
        by_trace[s.trace_id].append(s)
    lines = ["traces (from exported spans):"]
    for trace_id, members in sorted(
        by_trace.items(), key=lambda kv: min(s.start_ns for s in kv[1])
    ):
        ids = {s.span_id for s in members}
        children: dict[str, list[ReceivedSpan]] = defaultdict(list)
        for s in members:
            children[s.parent_span_id if s.parent_span_id in ids else ""].append(s)
        lines.append(f"  trace {trace_id[:16]}")

        _walk(children, "", 0, lines)
    return "\n".join(lines)
