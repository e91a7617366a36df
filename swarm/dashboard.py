"""A live web dashboard of a swarm (`swarm status --serve`): a read-only HTTP server over the status that
:mod:`swarm.status` reads from the DHT.

- ``/``: one static page that fetches ``/api/status`` every few seconds and renders the stages with their peers
  (state, throughput, micro-batches served, reputation, blacklisted and why), the trainers' loss curve and the
  swarm's recent events (a peer's reputation falling, a verdict, a peer leaving, micro-batches retried or dropped),
  so an attack can be watched as it unfolds. Every string a peer controls is inserted with ``textContent`` (never
  parsed as HTML), and the page allows no script but its own (Content-Security-Policy).
- ``/api/status``: the status JSON (schema of :mod:`swarm.status`), the loss history and the events.
- ``/metrics``: the same figures in Prometheus' text format, for the monitoring operators already run.

The server only reads what the last DHT read left in :class:`Dashboard`; a slow or absent DHT never blocks a
request. It binds to 127.0.0.1 unless told otherwise. Bounded: at most ``MAX_HISTORY`` loss points and
``MAX_EVENTS`` events are kept.
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections import deque
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Deque, Dict, List, Optional, Tuple

MAX_HISTORY = 5000  # (step, loss) points of the loss curve
MAX_EVENTS = 200
REPUTATION_DROP = 0.1  # an event when a peer's reputation falls by at least this much between two reads


class Dashboard:
    """The latest status and what changed from one read to the next. Thread-safe: the reader updates it, the HTTP
    server's threads read it."""

    def __init__(self, refresh_s: float = 5.0):
        self.refresh_s = refresh_s
        self._lock = threading.Lock()
        self._status: Optional[Dict[str, Any]] = None
        self._error: Optional[str] = None
        self._history: Deque[Tuple[int, float]] = deque(maxlen=MAX_HISTORY)
        self._events: Deque[Dict[str, Any]] = deque(maxlen=MAX_EVENTS)
        self._updated_at: Optional[float] = None

    def update(self, status: Dict[str, Any], now: Optional[float] = None) -> None:
        """A new status (``SwarmStatus.to_json()``): kept, and compared with the previous one for events."""
        now = time.time() if now is None else now
        with self._lock:
            previous, self._status, self._error, self._updated_at = self._status, status, None, now
            for event in diff_events(previous, status):
                self._events.append(dict(event, at=now))
            for trainer in status.get("trainers") or []:
                step, loss = trainer.get("step"), trainer.get("loss")
                if isinstance(step, int) and isinstance(loss, (int, float)) and math.isfinite(loss):
                    if not self._history or step > self._history[-1][0]:
                        self._history.append((step, float(loss)))

    def failed(self, message: str) -> None:
        """The last read failed: shown on the page, the previous status kept."""
        with self._lock:
            self._error = message

    def snapshot(self) -> Dict[str, Any]:
        with self._lock:
            return {
                "status": self._status,
                "error": self._error,
                "updated_at": self._updated_at,
                "refresh_s": self.refresh_s,
                "loss_history": [list(p) for p in self._history],
                "events": list(self._events)[::-1],
            }

    def metrics(self) -> str:
        with self._lock:
            status = self._status
        return metrics_text(status)


def diff_events(before: Optional[Dict[str, Any]], after: Dict[str, Any]) -> List[Dict[str, Any]]:
    """What changed between two statuses, as events ``{"kind", "peer", "stage", "text"}``: a peer blacklisted, its
    reputation falling by ``REPUTATION_DROP`` or more, a peer joining or leaving, micro-batches retried or dropped."""

    def peers(status):
        return {
            p["peer_id"]: p for stage in (status or {}).get("stages") or [] for p in stage.get("peers") or []
        }

    events: List[Dict[str, Any]] = []
    old, new = peers(before), peers(after)
    for pid, peer in new.items():
        was = old.get(pid)
        short, stage = peer.get("short_id") or pid[-8:], peer.get("stage")
        if peer.get("blacklisted") and not (was and was.get("blacklisted")):
            events.append(
                dict(
                    kind="blacklisted",
                    peer=pid,
                    stage=stage,
                    text=f"{short} (stage {stage}) blacklisted swarm-wide: {peer.get('blacklist_reason')}",
                )
            )
        rep, old_rep = peer.get("reputation"), (was or {}).get("reputation")
        if (
            isinstance(rep, (int, float))
            and isinstance(old_rep, (int, float))
            and old_rep - rep >= REPUTATION_DROP
        ):
            events.append(
                dict(
                    kind="reputation",
                    peer=pid,
                    stage=stage,
                    text=f"{short} (stage {stage}) reputation {old_rep:.2f} -> {rep:.2f}",
                )
            )
        if before is not None and was is None:
            events.append(dict(kind="joined", peer=pid, stage=stage, text=f"{short} joined stage {stage}"))
        elif was is not None and was.get("state") != peer.get("state") and peer.get("state") == "offline":
            events.append(
                dict(kind="left", peer=pid, stage=stage, text=f"{short} (stage {stage}) went offline")
            )
    for pid, peer in old.items():
        if pid not in new:
            events.append(
                dict(
                    kind="gone",
                    peer=pid,
                    stage=peer.get("stage"),
                    text=f"{peer.get('short_id') or pid[-8:]} (stage {peer.get('stage')}) is gone",
                )
            )
    trainers_before = {t["peer_id"]: t for t in (before or {}).get("trainers") or []}
    for trainer in after.get("trainers") or []:
        was = trainers_before.get(trainer["peer_id"])
        if was is None:
            continue
        for key in ("retried", "dropped"):
            grew = (trainer.get(key) or 0) - (was.get(key) or 0)
            if grew > 0:
                events.append(
                    dict(
                        kind=key,
                        peer=trainer["peer_id"],
                        stage=None,
                        text=f"trainer {trainer['peer_id'][-8:]}: {grew} micro-batch(es) {key} "
                        f"(step {trainer.get('step')})",
                    )
                )
    return events


def _label(value: Any) -> str:
    """A Prometheus label value: backslash, double quote and newline escaped."""
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: Any) -> Optional[str]:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, (int, float)) and math.isfinite(value):
        return repr(float(value)) if isinstance(value, float) else str(value)
    return None


def metrics_text(status: Optional[Dict[str, Any]]) -> str:
    """The status in Prometheus' text exposition format (version 0.0.4)."""
    out: List[str] = []

    def family(name: str, kind: str, help_text: str, samples: List[Tuple[Dict[str, Any], Any]]) -> None:
        out.append(f"# HELP {name} {help_text}")
        out.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            number = _number(value)
            if number is None:
                continue
            text = ",".join(f'{k}="{_label(v)}"' for k, v in labels.items())
            out.append(f"{name}{{{text}}} {number}" if text else f"{name} {number}")

    family("swarm_up", "gauge", "1 if the last read of the swarm's DHT succeeded", [({}, status is not None)])
    if status is None:
        return "\n".join(out) + "\n"
    run = {"run_id": status.get("run_id")}
    stages = status.get("stages") or []
    peers = [p for s in stages for p in s.get("peers") or []]
    family(
        "swarm_stage_peers_online",
        "gauge",
        "online peers per stage",
        [(dict(run, stage=s.get("stage")), s.get("online")) for s in stages],
    )
    for name, key, help_text in (
        ("swarm_peer_throughput", "throughput", "a peer's announced samples per second"),
        ("swarm_peer_served", "served", "micro-batches a peer says it served"),
        ("swarm_peer_reputation", "reputation", "a peer's reputation in [0, 1]"),
        ("swarm_peer_blacklisted", "blacklisted", "1 if the swarm-wide verdict blacklists it"),
        ("swarm_peer_last_seen_seconds", "last_seen_s", "seconds since its last announcement"),
    ):
        family(
            name,
            "gauge",
            help_text,
            [
                (dict(run, peer_id=p.get("peer_id"), stage=p.get("stage"), state=p.get("state")), p.get(key))
                for p in peers
            ],
        )
    trainers = status.get("trainers") or []
    for name, key, help_text in (
        ("swarm_trainer_step", "step", "the trainer's optimizer step"),
        ("swarm_trainer_loss", "loss", "the trainer's latest training loss"),
        ("swarm_trainer_tokens_per_second", "tokens_per_s", "tokens trained per second"),
        ("swarm_trainer_microbatches_completed", "completed", "micro-batches completed"),
        ("swarm_trainer_microbatches_retried", "retried", "micro-batch attempts retried"),
        ("swarm_trainer_microbatches_dropped", "dropped", "micro-batches given up"),
    ):
        family(
            name,
            "gauge",
            help_text,
            [(dict(run, peer_id=t.get("peer_id"), state=t.get("state")), t.get(key)) for t in trainers],
        )
    totals = status.get("totals") or {}
    family(
        "swarm_peers_blacklisted",
        "gauge",
        "peers blacklisted swarm-wide",
        [(run, totals.get("peers_blacklisted"))],
    )
    return "\n".join(out) + "\n"


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>swarm dashboard</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body{font-family:system-ui,sans-serif;margin:1.2em;color:#1d2330;background:#f6f7f9}
h1{font-size:1.3em;margin:0 0 .2em}h2{font-size:1.05em;margin:1.2em 0 .4em}
.muted{color:#6b7280}.err{color:#b42318;font-weight:600}
.grid{display:grid;grid-template-columns:repeat(auto-fit,minmax(240px,1fr));gap:.8em}
.card{background:#fff;border:1px solid #e3e6eb;border-radius:8px;padding:.7em .9em}
.big{font-size:1.5em;font-weight:600}
table{border-collapse:collapse;width:100%;background:#fff;font-size:.9em}
th,td{border-bottom:1px solid #eceef2;padding:.3em .5em;text-align:left;white-space:nowrap}
th{background:#f0f2f5}td.num{text-align:right;font-variant-numeric:tabular-nums}
tr.bl td{background:#fde8e8}.state-online{color:#067647}.state-offline,.state-joining{color:#b54708}
#events li{margin:.15em 0}.ev-blacklisted{color:#b42318;font-weight:600}.ev-reputation{color:#b54708}
svg{background:#fff;border:1px solid #e3e6eb;border-radius:8px}
</style></head><body>
<h1>swarm <span id="run"></span></h1>
<div class="muted" id="meta">waiting for the first read of the swarm's DHT...</div>
<div class="err" id="error"></div>
<div class="grid" id="totals"></div>
<h2>Loss</h2><svg id="loss" width="720" height="200" role="img" aria-label="training loss by step"></svg>
<h2>Stages</h2><div id="stages"></div>
<h2>Recent events</h2><ul id="events"><li class="muted">none yet</li></ul>
<script src="/app.js"></script>
</body></html>
"""

SCRIPT = r"""'use strict';
function el(tag, text, cls) { const e = document.createElement(tag); if (text !== undefined && text !== null)
  e.textContent = String(text); if (cls) e.className = cls; return e; }
function fmt(x, d) { return (typeof x === 'number' && isFinite(x)) ? x.toFixed(d) : 'n/a'; }
function card(label, value) { const c = el('div', null, 'card'); c.appendChild(el('div', label, 'muted'));
  c.appendChild(el('div', value, 'big')); return c; }
function row(cells, cls) { const tr = el('tr', null, cls); for (const [v, c] of cells) tr.appendChild(el('td', v, c));
  return tr; }
function drawLoss(points) {
  const svg = document.getElementById('loss'), ns = 'http://www.w3.org/2000/svg';
  while (svg.firstChild) svg.removeChild(svg.firstChild);
  const W = 720, H = 200, P = 36;
  if (points.length < 2) { const t = document.createElementNS(ns, 'text'); t.setAttribute('x', P);
    t.setAttribute('y', H / 2); t.textContent = points.length ? 'step ' + points[0][0] + ': loss ' +
      fmt(points[0][1], 4) + ' (the curve grows as the trainer reports steps)' : 'no loss reported yet';
    svg.appendChild(t); return; }
  const xs = points.map(p => p[0]), ys = points.map(p => p[1]);
  const x0 = Math.min(...xs), x1 = Math.max(...xs), y0 = Math.min(...ys), y1 = Math.max(...ys);
  const sx = x => P + (W - 2 * P) * (x - x0) / Math.max(1, x1 - x0);
  const sy = y => H - P + (-(H - 2 * P)) * (y - y0) / Math.max(1e-9, y1 - y0);
  const line = document.createElementNS(ns, 'polyline');
  line.setAttribute('points', points.map(p => sx(p[0]) + ',' + sy(p[1])).join(' '));
  line.setAttribute('fill', 'none'); line.setAttribute('stroke', '#2563eb'); line.setAttribute('stroke-width', '2');
  svg.appendChild(line);
  for (const [x, y, text] of [[4, sy(y1) + 4, fmt(y1, 3)], [4, sy(y0), fmt(y0, 3)], [sx(x0), H - 8, 'step ' + x0],
                              [sx(x1) - 50, H - 8, 'step ' + x1]]) {
    const t = document.createElementNS(ns, 'text'); t.setAttribute('x', x); t.setAttribute('y', y);
    t.setAttribute('font-size', '11'); t.textContent = text; svg.appendChild(t); }
}
function render(data) {
  document.getElementById('error').textContent = data.error ? 'last read failed: ' + data.error : '';
  const s = data.status; if (!s) return;
  document.getElementById('run').textContent = JSON.stringify(s.run_id);
  const when = new Date(s.queried_at * 1000).toISOString().replace('T', ' ').slice(0, 19) + ' UTC';
  document.getElementById('meta').textContent = s.num_stages + ' stages; model ' + (s.model.layers || '?') +
    ' layers x ' + (s.model.hidden || '?') + ' hidden; read ' + when + '; refreshing every ' + data.refresh_s + ' s';
  const t = s.totals || {}, totals = document.getElementById('totals');
  totals.replaceChildren(card('step', t.step ?? 'n/a'), card('loss', fmt(t.loss, 4)),
    card('tokens/s', fmt(t.tokens_per_s, 0)), card('peers online', (t.peers_online ?? 0) + ' of ' + (t.peers_total ?? 0)),
    card('blacklisted', t.peers_blacklisted ?? 0),
    card('micro-batches done / dropped', (t.microbatches_completed ?? 'n/a') + ' / ' + (t.microbatches_dropped ?? 'n/a')));
  drawLoss(data.loss_history || []);
  const stages = document.getElementById('stages'); stages.replaceChildren();
  for (const st of s.stages) {
    stages.appendChild(el('h3', 'stage ' + st.stage + ' (' + st.online + ' online)'));
    const table = el('table'), head = el('tr');
    for (const h of ['peer', 'state', 'address', 'throughput', 'served', 'reputation', 'blacklisted', 'seen'])
      head.appendChild(el('th', h));
    table.appendChild(head);
    for (const p of st.peers) {
      const addr = (p.address || '').split('/p2p/')[0];  // the peer id is in the row's tooltip
      const tr = row([[p.short_id, null], [p.state, 'state-' + p.state], [addr, null],
        [fmt(p.throughput, 1), 'num'], [p.served, 'num'], [fmt(p.reputation, 2), 'num'],
        [p.blacklisted ? 'yes: ' + (p.blacklist_reason || '') : 'no', null], [fmt(p.last_seen_s, 0) + ' s ago', 'num']],
        p.blacklisted ? 'bl' : '');
      tr.title = p.peer_id; table.appendChild(tr);
    }
    if (!st.peers.length) table.appendChild(row([['no peer serves this stage', 'muted']]));
    stages.appendChild(table);
  }
  const events = document.getElementById('events'); events.replaceChildren();
  for (const e of (data.events || []).slice(0, 50))
    events.appendChild(el('li', new Date(e.at * 1000).toISOString().slice(11, 19) + '  ' + e.text, 'ev-' + e.kind));
  if (!events.firstChild) events.appendChild(el('li', 'none yet', 'muted'));
}
async function refresh() {
  let wait = 5;
  try { const r = await fetch('/api/status', {cache: 'no-store'}); const data = await r.json(); render(data);
        wait = data.refresh_s || 5; }
  catch (e) { document.getElementById('error').textContent = 'the dashboard server does not answer: ' + e; }
  setTimeout(refresh, wait * 1000);
}
refresh();
"""

CSP = "default-src 'none'; script-src 'self'; connect-src 'self'; style-src 'unsafe-inline'; img-src 'self'"


class _Handler(BaseHTTPRequestHandler):
    dashboard: Dashboard  # set on the class made by serve()
    server_version = "swarm-dashboard"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the base class's name)
        pass  # an operator's browser polling every 5 s must not fill the terminal

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Content-Security-Policy", CSP)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        path = self.path.split("?", 1)[0]
        if path == "/":
            self._send(HTTPStatus.OK, PAGE.encode(), "text/html; charset=utf-8")
        elif path == "/app.js":
            self._send(HTTPStatus.OK, SCRIPT.encode(), "text/javascript; charset=utf-8")
        elif path == "/api/status":
            self._send(
                HTTPStatus.OK,
                json.dumps(self.dashboard.snapshot(), allow_nan=False, default=str).encode(),
                "application/json",
            )
        elif path == "/metrics":
            self._send(
                HTTPStatus.OK, self.dashboard.metrics().encode(), "text/plain; version=0.0.4; charset=utf-8"
            )
        else:
            self._send(HTTPStatus.NOT_FOUND, b"not found\n", "text/plain; charset=utf-8")

    do_HEAD = do_GET

    def _refuse(self) -> None:
        self._send(HTTPStatus.METHOD_NOT_ALLOWED, b"read-only\n", "text/plain; charset=utf-8")

    do_POST = do_PUT = do_DELETE = do_PATCH = _refuse


def serve(dashboard: Dashboard, host: str = "127.0.0.1", port: int = 0) -> ThreadingHTTPServer:
    """Start the dashboard's HTTP server in a daemon thread; ``server.server_address`` holds the bound port. Stop it
    with ``server.shutdown()``."""
    handler = type("DashboardHandler", (_Handler,), {"dashboard": dashboard})
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="dashboard-http", daemon=True).start()
    return server
