"""Render the network graph (``Network.graph()``) as DOT, Mermaid, JSON or an HTML page."""
from __future__ import annotations

import html
import json

__all__ = ["render", "FORMATS"]

FORMATS = ("dot", "mermaid", "json", "html", "svg")


def _short(node_id: str) -> str:
    return node_id.replace("SHA256:", "")[:10]


def _label(n: dict) -> str:
    name = n.get("url") or ("this node" if n.get("self") else _short(n["id"]))
    return name


def render(graph: dict, fmt: str) -> str:
    if fmt == "json":
        return json.dumps(graph, indent=2)
    if fmt == "dot":
        out = ["digraph utesla {", "  rankdir=LR;", "  node [shape=box, style=rounded];"]
        for n in graph["nodes"]:
            label = _label(n) + "\\n" + _short(n["id"]) + f"\\nhops {n['hops']}"
            if n["services"]:
                label += "\\n" + "\\n".join("/" + s for s in n["services"])
            label = label.replace('"', '\\"')
            out.append(f'  "{n["id"]}" [label="{label}"];')
        for e in graph["edges"]:
            out.append(f'  "{e["from"]}" -> "{e["to"]}";')
        out.append("}")
        return "\n".join(out) + "\n"
    if fmt == "mermaid":
        ids = {n["id"]: f"n{i}" for i, n in enumerate(graph["nodes"])}
        out = ["graph LR"]
        for n in graph["nodes"]:
            text = f"{_label(n)}<br/>hops {n['hops']}"
            if n["services"]:
                text += "<br/>" + "<br/>".join("/" + s for s in n["services"])
            out.append(f'  {ids[n["id"]]}["{text.replace(chr(34), "")}"]')
        for e in graph["edges"]:
            out.append(f"  {ids[e['from']]} --> {ids[e['to']]}")
        return "\n".join(out) + "\n"
    if fmt in ("svg", "html"):
        svg = _svg(graph)
        if fmt == "svg":
            return svg
        return ("<!doctype html><html><head><meta charset='utf-8'><title>utesla network</title>"
                "<style>body{font-family:sans-serif;margin:1em}</style></head><body>"
                f"<h1>utesla network</h1><p>{len(graph['nodes'])} nodes, "
                f"{len(graph['edges'])} links, as seen from this node.</p>{svg}</body></html>\n")
    raise ValueError(f"unknown format {fmt!r} (one of {', '.join(FORMATS)})")


#: Box text: font size 12; a generous average glyph width for a sans-serif font at that size
#: (Debian's DejaVu Sans averages about 6.5 px), and the longest line shown whole.
_CHAR_PX = 7.5
_MAX_CHARS = 44


def _fit(text: str) -> str:
    return text if len(text) <= _MAX_CHARS else text[:_MAX_CHARS - 1] + "\u2026"


def _box_lines(n: dict) -> list[str]:
    """What a node's box says.  Five lines fit: name, fingerprint and hops, then up to three
    services (two and "+N more" when there are more); the box's tooltip has everything."""
    services = ["/" + s for s in n["services"]]
    if len(services) > 3:
        services = services[:2] + [f"+{len(services) - 2} more"]
    return [_fit(t) for t in [_label(n), f"{_short(n['id'])} \u00b7 hops {n['hops']}"] + services]


def _svg(graph: dict) -> str:
    """Nodes in columns by hop distance; arrows for links.  No scripts, no external files."""
    cols: dict[int, list[dict]] = {}
    for n in graph["nodes"]:
        cols.setdefault(n["hops"], []).append(n)
    lines = {n["id"]: _box_lines(n) for n in graph["nodes"]}
    longest = max((len(t) for ls in lines.values() for t in ls), default=0)
    # Boxes as wide as the longest line needs (one width for all: columns stay aligned).
    w, h, gx, gy = max(200, round(16 + _CHAR_PX * longest)), 90, 80, 30
    pos = {}
    for c, items in sorted(cols.items()):
        for r, n in enumerate(items):
            pos[n["id"]] = (20 + c * (w + gx), 20 + r * (h + gy))
    width = 40 + (max(cols) + 1) * (w + gx) if cols else 100
    height = 40 + max(len(v) for v in cols.values()) * (h + gy) if cols else 100
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}">',
             '<defs><marker id="arrow" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="8" '
             'markerHeight="8" orient="auto"><path d="M0,0 L10,5 L0,10 z"/></marker></defs>']
    for e in graph["edges"]:
        if e["from"] in pos and e["to"] in pos:
            (x1, y1), (x2, y2) = pos[e["from"]], pos[e["to"]]
            parts.append(f'<line class="edge" x1="{x1 + w}" y1="{y1 + h / 2}" x2="{x2}" '
                         f'y2="{y2 + h / 2}" stroke="#555" marker-end="url(#arrow)"/>')
    for n in graph["nodes"]:
        x, y = pos[n["id"]]
        fill = "#dbeafe" if n.get("self") else "#f3f4f6"
        tip = "\n".join([n.get("url") or n["id"], n["id"]] + ["/" + s for s in n["services"]])
        parts.append(f'<g class="node" data-id="{html.escape(n["id"])}" data-hops="{n["hops"]}">'
                     f'<title>{html.escape(tip)}</title>'
                     f'<rect x="{x}" y="{y}" width="{w}" height="{h}" rx="8" fill="{fill}" '
                     f'stroke="#333"/>')
        for i, t in enumerate(lines[n["id"]]):
            weight = ' font-weight="bold"' if i == 0 else ""
            parts.append(f'<text x="{x + 8}" y="{y + 18 + i * 15}" font-size="12"{weight}>'
                         f'{html.escape(t)}</text>')
        parts.append("</g>")
    parts.append("</svg>")
    return "\n".join(parts)
