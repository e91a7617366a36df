"""The web dashboard (`swarm status --serve`): events and Prometheus metrics (pure), the HTTP server in-process, and
the page rendered by a real headless browser (Debian's chromium; skipped where it is not installed), with strings a
peer controls shown as text, never run. The live test (a real swarm) is in test_status.py."""

import copy
import json
import shutil
import subprocess
import urllib.error
import urllib.request

import pytest

from swarm.dashboard import Dashboard, diff_events, metrics_text, serve

HOSTILE = '<img src=x onerror="document.title=1">"\\\n</script>'


def status(
    reputation=0.9,
    blacklisted=False,
    step=3,
    loss=6.5,
    retried=0,
    peer_id="QmPeerAAAAAAAAAAAA11111111",
    address="/ip4/127.0.0.1/tcp/4001",
    reason=None,
):
    peer = {
        "peer_id": peer_id,
        "short_id": peer_id[-8:],
        "state": "online",
        "stage": 1,
        "address": address,
        "addrs": [address],
        "throughput": 12.5,
        "served": 40,
        "device": "cpu",
        "reputation": reputation,
        "blacklisted": blacklisted,
        "blacklist_reason": reason,
        "blacklisted_by": 2 if blacklisted else 0,
        "blacklist_publishers": 2,
        "last_seen_s": 1.5,
        "updated_at": 1.0,
    }
    other = dict(
        peer,
        peer_id="QmPeerBBBBBBBBBBBB00000000",
        short_id="B0000000",
        stage=0,
        reputation=1.0,
        blacklisted=False,
        blacklist_reason=None,
    )
    return {
        "schema": 1,
        "run_id": "demo",
        "queried_at": 1.7e9,
        "num_stages": 2,
        "model": {"layers": 4, "hidden": 128, "vocab": 4096},
        "stages": [{"stage": 0, "online": 1, "peers": [other]}, {"stage": 1, "online": 1, "peers": [peer]}],
        "trainers": [
            {
                "peer_id": "QmTrainer",
                "state": "training",
                "step": step,
                "steps_total": 10,
                "loss": loss,
                "tokens": 100,
                "tokens_per_s": 50.0,
                "completed": 12,
                "dropped": 0,
                "retried": retried,
                "updated_at": 1.0,
                "last_seen_s": 1.0,
            }
        ],
        "totals": {
            "step": step,
            "loss": loss,
            "tokens_per_s": 50.0,
            "microbatches_completed": 12,
            "microbatches_dropped": 0,
            "peers_per_stage": [1, 1],
            "stages_without_peer": [],
            "peers_online": 2,
            "peers_total": 2,
            "peers_blacklisted": int(blacklisted),
        },
        "notes": [],
    }


def test_events_show_an_attack_unfolding():
    before, after = status(), status(reputation=0.4, blacklisted=True, reason="audit", retried=3)
    kinds = [e["kind"] for e in diff_events(before, after)]
    assert kinds == ["blacklisted", "reputation", "retried"]
    assert "blacklisted swarm-wide: audit" in diff_events(before, after)[0]["text"]
    gone = copy.deepcopy(before)
    gone["stages"][1]["peers"] = []
    assert [e["kind"] for e in diff_events(before, gone)] == ["gone"]
    assert [e["kind"] for e in diff_events(gone, before)] == ["joined"]
    assert diff_events(None, before) == []  # the first read is no news


def test_dashboard_keeps_a_bounded_loss_history_and_events():
    board = Dashboard()
    for step in range(5):
        board.update(status(step=step, loss=8.0 - step), now=float(step))
    board.update(status(step=4, loss=3.0, reputation=0.5), now=9.0)  # a repeated step adds no point
    snap = board.snapshot()
    assert snap["loss_history"] == [[s, 8.0 - s] for s in range(5)]
    assert snap["events"][0]["kind"] == "reputation" and snap["events"][0]["at"] == 9.0
    board.failed("no answer from the DHT")
    assert board.snapshot()["error"] == "no answer from the DHT" and board.snapshot()["status"] is not None


def test_metrics_are_prometheus_text_with_escaped_labels():
    text = metrics_text(status(peer_id=HOSTILE))
    assert "swarm_up 1" in text
    assert 'swarm_stage_peers_online{run_id="demo",stage="1"} 1' in text
    line = next(
        line for line in text.splitlines() if line.startswith("swarm_peer_reputation{") and "img" in line
    )
    assert '\\"document.title=1\\"' in line and "\\n" in line and "\n" not in line
    assert line.endswith(" 0.9")
    assert (
        metrics_text(None) == "# HELP swarm_up 1 if the last read of the swarm's DHT succeeded\n"
        "# TYPE swarm_up gauge\nswarm_up 0\n"
    )
    for line in text.splitlines():  # every sample line: name{labels} value
        assert (
            line.startswith("#")
            or " " in line
            and float(line.rsplit(" ", 1)[1]) == float(line.rsplit(" ", 1)[1])
        )


def _get(url, method="GET"):
    request = urllib.request.Request(url, method=method)
    try:
        with urllib.request.urlopen(request, timeout=10) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def test_the_server_is_read_only_and_answers_each_path():
    board = Dashboard(refresh_s=2.0)
    board.update(status())
    server = serve(board, "127.0.0.1", 0)
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        code, headers, body = _get(base + "/")
        assert code == 200 and headers["Content-Type"].startswith("text/html") and b"/app.js" in body
        assert "script-src 'self'" in headers["Content-Security-Policy"]
        assert _get(base + "/app.js")[0] == 200
        code, headers, body = _get(base + "/api/status")
        data = json.loads(body)
        assert code == 200 and data["status"]["run_id"] == "demo" and data["refresh_s"] == 2.0
        code, headers, body = _get(base + "/metrics")
        assert (
            code == 200
            and headers["Content-Type"].startswith("text/plain; version=0.0.4")
            and b"swarm_up 1" in body
        )
        assert _get(base + "/nope")[0] == 404
        assert _get(base + "/api/status", method="POST")[0] == 405
    finally:
        server.shutdown()


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def render_in_browser(url: str, screenshot: str = None, budget_ms: int = 8000) -> str:
    """The page's DOM after its script ran, from headless chromium; with ``screenshot``, a PNG of it too."""
    base = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        f"--virtual-time-budget={budget_ms}",
        "--window-size=1100,900",
    ]
    if screenshot:
        subprocess.run(base + [f"--screenshot={screenshot}", url], capture_output=True, timeout=120)
    proc = subprocess.run(base + ["--dump-dom", url], capture_output=True, text=True, timeout=120)
    return proc.stdout


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)")
def test_a_browser_renders_peer_strings_as_text_never_as_html(tmp_path):
    board = Dashboard()
    board.update(status())
    board.update(
        status(peer_id="Qm" + HOSTILE, address=HOSTILE, reason=HOSTILE, blacklisted=True, reputation=0.1)
    )
    server = serve(board, "127.0.0.1", 0)
    try:
        shot = tmp_path / "page.png"
        dom = render_in_browser(f"http://127.0.0.1:{server.server_address[1]}/", str(shot))
    finally:
        server.shutdown()
    assert "stage 0 (1 online)" in dom and "stage 1 (1 online)" in dom, dom[-3000:]
    assert "B0000000" in dom  # the honest peer's short id, in its stage's table
    assert "&lt;img src=x onerror=" in dom and "<img" not in dom  # shown as text, never parsed
    assert "<title>swarm dashboard</title>" in dom  # the hostile onerror never ran (it would set the title)
    assert "blacklisted swarm-wide" in dom  # the event
    assert shot.exists() and shot.stat().st_size > 10_000
