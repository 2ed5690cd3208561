"""The network graph page (``utesla-cli graph --format html``), opened in headless Chromium.

A small live network of in-process nodes (A links to B and C, B links to D) writes its state
file; the real console script renders the page from it; Debian's ``chromium`` loads the page
and we check what a person would see: one box per node at its hop distance, with its URL (or
"this node"), its short fingerprint and its services, one arrow per link, nothing drawn
outside its box or on top of another box, and the colours actually painted in a screenshot.

Chromium is required under ``CI=true`` (``.ci/run`` installs it); elsewhere the browser part
is skipped with a reason when the binary is absent.
"""
from __future__ import annotations

import asyncio
import html
import html.parser
import json
import os
import shutil
import struct
import subprocess
import zlib
from pathlib import Path

import pytest

from helpers import Net, run_cli, wait_for

CI = os.environ.get("CI", "").lower() == "true"
CHROMIUM_TIMEOUT = 90          # seconds, per browser run (a cold start on a loaded machine)

#: A service name long enough to test that labels stay inside their box.
LONG = "inventory_reservation_reconciliation_worker"


def service(text: str) -> str:
    return f"""
    class Handler:
        async def get(self):
            await self.write({text!r})
    """


def chromium_binary() -> str:
    path = shutil.which("chromium")
    if path is None:
        if CI:
            pytest.fail("chromium is not installed but CI=true: .ci/run installs it "
                        "(apt-get install --no-install-recommends chromium)")
        pytest.skip("Debian's chromium is not installed (apt-get install chromium); "
                    "the HTML graph is not rendered here")
    return path


def run_chromium(binary: str, profile: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [binary, "--headless", "--no-sandbox", "--disable-gpu",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--no-first-run", "--hide-scrollbars", "--force-device-scale-factor=1",
           f"--user-data-dir={profile}", *args]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=CHROMIUM_TIMEOUT,
                              env={**os.environ, "HOME": str(profile)})
    except subprocess.TimeoutExpired:
        pytest.fail(f"chromium did not finish within {CHROMIUM_TIMEOUT} s: {' '.join(cmd)}")
    assert proc.returncode == 0, f"chromium failed ({proc.returncode}): {proc.stderr[-2000:]}"
    return proc


# --------------------------------------------------------------------------- DOM parsing

class _Dom(html.parser.HTMLParser):
    """The elements we care about: ``g.node`` with the texts inside, ``line.edge``, h1, p."""

    def __init__(self):
        super().__init__()
        self.nodes: list[dict] = []
        self.edges: list[dict] = []
        self.texts: dict[str, list[str]] = {}
        self.paragraphs: list[str] = []
        self.headings: list[str] = []
        self.scripts = 0
        self.external: list[str] = []
        self._in_node = None
        self._capture: list[str] | None = None
        self._tag: str | None = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        classes = (a.get("class") or "").split()
        if tag == "script":
            self.scripts += 1
        for attr in ("src", "href"):
            if a.get(attr) and not a[attr].startswith("#"):
                self.external.append(a[attr])
        if tag == "g" and "node" in classes:
            self._in_node = a.get("data-id")
            self.nodes.append(a)
            self.texts[self._in_node] = []
        elif tag == "line" and "edge" in classes:
            self.edges.append(a)
        elif tag == "text" and self._in_node is not None:
            self._capture, self._tag = [], "text"
        elif tag in ("p", "h1"):
            self._capture, self._tag = [], tag

    def handle_endtag(self, tag):
        if tag == "g":
            self._in_node = None
        if self._capture is not None and tag == self._tag:
            text = "".join(self._capture)
            if tag == "text":
                self.texts[self.nodes[-1]["data-id"]].append(text)
            elif tag == "p":
                self.paragraphs.append(text)
            else:
                self.headings.append(text)
            self._capture = self._tag = None

    def handle_data(self, data):
        if self._capture is not None:
            self._capture.append(data)


def parse_dom(text: str) -> _Dom:
    dom = _Dom()
    dom.feed(text)
    return dom


#: Appended to a copy of the page: measures what the browser laid out and writes it into
#: the DOM as JSON, so ``--dump-dom`` carries it out.
LAYOUT_SCRIPT = """
<script>
(function () {
  function box(el) { const r = el.getBoundingClientRect();
    return {left: r.left, top: r.top, right: r.right, bottom: r.bottom}; }
  const svg = document.querySelector("svg");
  const out = {svg: box(svg), nodes: [], edges: []};
  document.querySelectorAll("g.node").forEach(function (g) {
    out.nodes.push({id: g.getAttribute("data-id"), rect: box(g.querySelector("rect")),
                    fill: getComputedStyle(g.querySelector("rect")).fill,
                    texts: Array.from(g.querySelectorAll("text")).map(function (t) {
                      return {text: t.textContent, box: box(t),
                              visible: getComputedStyle(t).visibility === "visible"}; })});
  });
  const m = svg.getScreenCTM();
  document.querySelectorAll("line.edge").forEach(function (l) {
    out.edges.push({x1: l.x1.baseVal.value + m.e, y1: l.y1.baseVal.value + m.f,
                    x2: l.x2.baseVal.value + m.e, y2: l.y2.baseVal.value + m.f});
  });
  const pre = document.createElement("pre");
  pre.id = "layout";
  pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
})();
</script>
"""


# --------------------------------------------------------------------------- PNG decoding

def read_png(data: bytes) -> tuple[int, int, int, list[bytes]]:
    """(width, height, bytes per pixel, rows) of an 8-bit RGB/RGBA non-interlaced PNG."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG file"
    pos, idat, ihdr = 8, [], None
    while pos < len(data):
        n, kind = struct.unpack(">I4s", data[pos:pos + 8])
        chunk = data[pos + 8:pos + 8 + n]
        pos += 12 + n
        if kind == b"IHDR":
            ihdr = struct.unpack(">IIBBBBB", chunk)
        elif kind == b"IDAT":
            idat.append(chunk)
        elif kind == b"IEND":
            break
    assert ihdr is not None, "PNG without IHDR"
    w, h, depth, ctype, _, _, interlace = ihdr
    assert depth == 8 and interlace == 0 and ctype in (2, 6), f"unexpected PNG format {ihdr}"
    bpp = 3 if ctype == 2 else 4
    raw = zlib.decompress(b"".join(idat))
    stride = w * bpp
    rows, prev, i = [], bytearray(stride), 0
    for _ in range(h):
        f = raw[i]
        line = bytearray(raw[i + 1:i + 1 + stride])
        i += 1 + stride
        if f == 1:
            for x in range(bpp, stride):
                line[x] = (line[x] + line[x - bpp]) & 255
        elif f == 2:
            line = bytearray((a + b) & 255 for a, b in zip(line, prev))
        elif f == 3:
            for x in range(stride):
                left = line[x - bpp] if x >= bpp else 0
                line[x] = (line[x] + ((left + prev[x]) >> 1)) & 255
        elif f == 4:
            for x in range(stride):
                a = line[x - bpp] if x >= bpp else 0
                b = prev[x]
                c = prev[x - bpp] if x >= bpp else 0
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[x] = (line[x] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        rows.append(bytes(line))
        prev = line
    return w, h, bpp, rows


def pixel(rows, bpp, x: float, y: float) -> tuple[int, int, int]:
    r = rows[int(y)]
    o = int(x) * bpp
    return r[o], r[o + 1], r[o + 2]


def hex_rgb(colour: str) -> tuple[int, int, int]:
    return tuple(int(colour[i:i + 2], 16) for i in (1, 3, 5))


# --------------------------------------------------------------------------- the test

async def build_network(root: Path) -> tuple[dict, Path]:
    """A -> B, A -> C, B -> D; returns A's graph (as the CLI prints it) and A's folder."""
    net = Net(root)
    try:
        a = await net.node("a", {"alpha": service("alpha")})
        b = await net.node("b", {"bravo": service("bravo"), "bravo2": service("b2"),
                                 "bravo3": service("b3"), "bravo4": service("b4")})
        c = await net.node("c", {"charlie": service("charlie"), LONG: service("long")})
        d = await net.node("d", {"delta": service("delta")})
        await net.link(b, d, service="delta")
        await net.link(a, c, service="charlie")
        await net.link(a, b, service="delta")

        def complete() -> bool:
            """A's state file (what the CLI reads) shows the whole network."""
            try:
                st = json.loads((a.folder / "data" / "status.json").read_text())
            except (FileNotFoundError, ValueError):
                return False
            g = st.get("network", {}).get("graph", {})
            return len(g.get("nodes", [])) == 4 and len(g.get("edges", [])) == 3 and \
                all(n["services"] for n in g["nodes"])

        await wait_for(complete, 15, interval=0.05)
        # The console scripts, run while the nodes are alive (in a thread: the nodes live
        # in this event loop).
        out = await asyncio.to_thread(run_cli, "graph", "--format", "json", cwd=a.folder)
        graph = json.loads(out.stdout)
        await asyncio.to_thread(run_cli, "graph", "--format", "html", "-o", "graph.html",
                                cwd=a.folder)
        ids = {h.name: h.key.public.fingerprint() for h in (a, b, c, d)}
        urls = {h.name: h.url for h in (b, c)}
    finally:
        await net.close()
    graph["_ids"], graph["_urls"] = ids, urls
    return graph, a.folder


async def test_html_graph_in_headless_chromium(tmp_path):
    binary = chromium_binary()
    graph, folder = await build_network(tmp_path / "net")
    ids, urls = graph.pop("_ids"), graph.pop("_urls")
    page = folder / "graph.html"
    assert page.is_file() and page.stat().st_size > 0

    # What the node reported: the topology we built, seen from A.
    hops = {n["id"]: n["hops"] for n in graph["nodes"]}
    assert hops == {ids["a"]: 0, ids["b"]: 1, ids["c"]: 1, ids["d"]: 2}
    assert {(e["from"], e["to"]) for e in graph["edges"]} == \
        {(ids["a"], ids["b"]), (ids["a"], ids["c"]), (ids["b"], ids["d"])}

    # 1. The DOM as Chromium built it from the page.
    dom_text = run_chromium(binary, tmp_path / "profile1", "--dump-dom",
                            page.resolve().as_uri()).stdout
    dom = parse_dom(dom_text)
    assert dom.scripts == 0 and dom.external == [], "the page must be self-contained"
    assert dom.headings == ["utesla network"]
    assert any("4 nodes, 3 links" in p for p in dom.paragraphs), dom.paragraphs
    assert len(dom.nodes) == 4, dom.nodes
    assert {n["data-id"]: int(n["data-hops"]) for n in dom.nodes} == hops
    assert len(dom.edges) == 3

    def short(fp: str) -> str:
        return fp.replace("SHA256:", "")[:10]

    texts = dom.texts
    assert texts[ids["a"]] == ["this node", f"{short(ids['a'])} · hops 0", "/alpha"]
    assert texts[ids["b"]] == [urls["b"], f"{short(ids['b'])} · hops 1",
                               "/bravo", "/bravo2", "+2 more"]
    assert texts[ids["c"]] == [urls["c"], f"{short(ids['c'])} · hops 1", "/charlie", "/" + LONG]
    # D is two hops away: no link of A's names its URL, so its fingerprint is the label.
    assert texts[ids["d"]] == [short(ids["d"]), f"{short(ids['d'])} · hops 2", "/delta"]

    # 2. The layout Chromium computed: boxes in columns by hop count, nothing overflowing
    #    or overlapping, each arrow from its source box to its target box.
    probe = tmp_path / "probe.html"
    probe.write_text(page.read_text().replace("</body>", LAYOUT_SCRIPT + "</body>"))
    probed = run_chromium(binary, tmp_path / "profile2", "--window-size=1400,800",
                          "--dump-dom", probe.resolve().as_uri()).stdout
    start = probed.index('<pre id="layout">') + len('<pre id="layout">')
    layout = json.loads(html.unescape(probed[start:probed.index("</pre>", start)]))
    boxes = {n["id"]: n["rect"] for n in layout["nodes"]}
    assert set(boxes) == set(hops)
    svg = layout["svg"]
    for n in layout["nodes"]:
        r = n["rect"]
        assert svg["left"] <= r["left"] and r["right"] <= svg["right"] + 0.5, n
        assert svg["top"] <= r["top"] and r["bottom"] <= svg["bottom"] + 0.5, n
        assert r["right"] <= 1400 and r["bottom"] <= 800, f"outside the window: {n}"
        for t in n["texts"]:
            b = t["box"]
            assert t["visible"] and b["right"] > b["left"], t
            assert r["left"] <= b["left"] and b["right"] <= r["right"], \
                f"label {t['text']!r} overflows its box: {b} vs {r}"
            assert r["top"] <= b["top"] and b["bottom"] <= r["bottom"], \
                f"label {t['text']!r} overflows its box: {b} vs {r}"
    ordered = sorted(boxes.items(), key=lambda kv: hops[kv[0]])
    for i, (id1, r1) in enumerate(ordered):
        for id2, r2 in ordered[i + 1:]:
            overlap = (min(r1["right"], r2["right"]) > max(r1["left"], r2["left"]) and
                       min(r1["bottom"], r2["bottom"]) > max(r1["top"], r2["top"]))
            assert not overlap, f"boxes overlap: {id1} {r1} / {id2} {r2}"
            if hops[id2] > hops[id1]:
                assert r2["left"] >= r1["right"], "a farther node is not to the right"
    assert len(layout["edges"]) == 3
    drawn = set()
    for e in layout["edges"]:
        src = [i for i, r in boxes.items()
               if abs(e["x1"] - r["right"]) < 1 and r["top"] <= e["y1"] <= r["bottom"]]
        dst = [i for i, r in boxes.items()
               if abs(e["x2"] - r["left"]) < 1 and r["top"] <= e["y2"] <= r["bottom"]]
        assert len(src) == 1 and len(dst) == 1, f"edge not anchored on two boxes: {e}"
        drawn.add((src[0], dst[0]))
    assert drawn == {(e["from"], e["to"]) for e in graph["edges"]}

    # 3. The pixels: a screenshot of the page shows the boxes in their colours and the arrows.
    shot = tmp_path / "graph.png"
    run_chromium(binary, tmp_path / "profile3", f"--screenshot={shot}",
                 "--window-size=1400,800", page.resolve().as_uri())
    assert shot.is_file() and shot.stat().st_size > 1000
    w, h, bpp, rows = read_png(shot.read_bytes())
    assert (w, h) == (1400, 800)
    for n in layout["nodes"]:
        r = n["rect"]
        want = hex_rgb("#dbeafe") if n["id"] == ids["a"] else hex_rgb("#f3f4f6")
        # Just inside the bottom-right corner (past the rounding), where no label is drawn.
        got = pixel(rows, bpp, r["right"] - 14, r["bottom"] - 10)
        assert all(abs(g - x) <= 3 for g, x in zip(got, want)), (n["id"], got, want)
        border = min(sum(pixel(rows, bpp, r["left"] + 30, y)) for y in
                     range(int(r["top"]) - 1, int(r["top"]) + 3))
        assert border < 3 * 160, f"no box outline drawn for {n['id']}"
    for e in layout["edges"]:
        mx, my = (e["x1"] + e["x2"]) / 2, (e["y1"] + e["y2"]) / 2
        darkest = min(sum(pixel(rows, bpp, mx + dx, my + dy))
                      for dx in range(-2, 3) for dy in range(-2, 3))
        assert darkest < 3 * 200, f"no arrow drawn at {mx},{my}"


def test_svg_boxes_stay_bounded_for_long_names_and_many_services():
    """No browser needed: a 64-character service name is cut with an ellipsis (whole in the
    tooltip), five services show as two and "+3 more", and boxes stop growing."""
    from utesla_node.graph import render
    huge = "s" * 64
    g = {"nodes": [{"id": "SHA256:" + "A" * 43, "hops": 0, "self": True,
                    "services": [huge, "b", "c", "d", "e"]}], "edges": []}
    dom = parse_dom(render(g, "html"))
    texts = dom.texts["SHA256:" + "A" * 43]
    assert texts[2] == "/" + "s" * 42 + "\u2026" and texts[3] == "/b" and texts[4] == "+3 more"
    assert len(texts) == 5 and all(len(t) <= 44 for t in texts)
    svg = render(g, "svg")
    assert f"/{huge}" in svg.split("<title>", 1)[1].split("</title>", 1)[0]
    width = int(svg.split('width="', 2)[2].split('"', 1)[0])      # the node's rect
    assert 200 <= width <= 16 + 7.5 * 44
