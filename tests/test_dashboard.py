"""The dashboard: its feed (hand-computed counts, fairness, privacy), its read-only HTTP app, and, in a real
headless Chromium, a live `insitu simulate --dashboard` run, `insitu dashboard RUN_DIR` and a hostile feed."""

from __future__ import annotations

import json
import os
import re
import subprocess
import threading
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from browser import alert_text, browser, resource_urls, screenshot, table_rows, wait_until  # noqa: F401 (fixture)
from cli_harness import BIN, ENV

from insitu.dashboard.feed import DashboardFeed
from insitu.report.summary import failure_kind
from insitu.run.history import Evaluation, History, RoundRecord


def printed_address(proc: subprocess.Popen, log_path: Path, command: str) -> str:
    """The dashboard URL ``command`` prints to its log (it must keep running until it does)."""
    def url() -> str | None:
        assert proc.poll() is None, f"{command} exited early:\n{log_path.read_text()}"
        found = re.search(r"Dashboard: (http://127\.0\.0\.1:\d+/)", log_path.read_text())
        return found.group(1) if found else None

    return wait_until(url, 120, f"{command} to print the dashboard's address")


# Each test run takes its screenshots beside the run it checks; INSITU_SCREENSHOTS=docs/img refreshes the
# pictures in the docs (a plain test run leaves the working tree as it found it).
SCREENSHOTS = Path(os.environ["INSITU_SCREENSHOTS"]).resolve() if os.environ.get("INSITU_SCREENSHOTS") else None
HOSTILE = '<img src=x onerror=alert(1)>'
HOSTILE_REASON = '"><script>window.__pwned = 1</script><svg onload=alert(2)>'
DP_CONFIG = {"rounds": 2, "strategy": "fedavg", "dataset": "digits", "model": "mlp", "num_clients": 3,
             "dp_clip": 1.0, "dp_noise": 1.1, "dp_delta": 1e-5, "dp_mode": "central", "dp_accountant": "rdp"}


def hand_history(client: str = "2", reason: str = "parameters do not match the global model: x") -> History:
    """Two rounds whose counts, fairness and privacy are worked out by hand in the tests below."""
    r1 = RoundRecord(1, selected=["0", "1", client], num_results=2,
                     failures=[{"client": client, "stage": "fit", "reason": "fit failed: ClientDroppedOut: gone"}],
                     clients={"0": {"eval_accuracy": 0.5}, "1": {"eval_accuracy": 0.9}}, fit_metrics={"epsilon": 0.5},
                     centralized=Evaluation(0.7, {"accuracy": 0.8}), timings={"total_s": 1.5, "clock_s": 1.5})
    r2 = RoundRecord(2, selected=["0", client], num_results=1,
                     failures=[{"client": "0", "stage": "fit", "reason": reason},
                               {"client": client, "stage": "evaluate", "reason": "evaluate failed: RuntimeError: boom"}],
                     clients={"0": {"eval_accuracy": 0.6}, "1": {"eval_accuracy": 1.0}}, fit_metrics={"epsilon": 0.9},
                     centralized=Evaluation(0.4, {"accuracy": 0.85}), timings={"total_s": 2.0, "clock_s": 3.5})
    return History([r1, r2], initial=Evaluation(2.3, {"accuracy": 0.1}))


def fed(history: History, config: dict[str, Any] | None = None, mode: str = "finished run") -> DashboardFeed:
    feed = DashboardFeed(config if config is not None else DP_CONFIG, mode=mode)
    for record in history.rounds:
        feed.on_round(record)
    feed.finish(history)
    return feed


# -- the feed ------------------------------------------------------------------------------------------


def test_failure_kinds():
    assert failure_kind("fit failed: ClientDroppedOut: dropped out at 40% of the task") == "dropped"
    assert failure_kind("fit failed: RoundDeadlineError: no result within the round deadline") == "dropped"
    assert failure_kind("fit failed: ValueError: bad data") == "failed"
    assert failure_kind("parameters do not match the global model: w") == "rejected"


def test_feed_counts_clients_fairness_and_privacy_by_hand():
    snap = fed(hand_history()).snapshot()
    clients = {c["client"]: c for c in snap["clients"]}
    assert [c["client"] for c in snap["clients"]] == ["0", "1", "2"]
    # client 0: selected twice; round 2's fit result rejected; latest evaluation 0.6
    assert (clients["0"]["selected"], clients["0"]["finished"], clients["0"]["rejected"]) == (2, 1, 1)
    assert clients["0"]["accuracy"] == 0.6
    assert clients["0"]["last_problem"] == "round 2, fit: parameters do not match the global model: x"
    # client 2: dropped in round 1 (fit); in round 2 its fit counted, its evaluation raised
    assert (clients["2"]["selected"], clients["2"]["finished"], clients["2"]["dropped"], clients["2"]["failed"]) == (2, 1, 1, 1)
    assert (clients["1"]["selected"], clients["1"]["finished"], clients["1"]["accuracy"]) == (1, 1, 1.0)
    rows = snap["rounds"]
    assert [r["failure_counts"] for r in rows] == [{"failed": 0, "dropped": 1, "rejected": 0},
                                                   {"failed": 1, "dropped": 0, "rejected": 1}]
    assert [(r["accuracy"], r["loss"], r["epsilon"], r["selected"], r["results"]) for r in rows] == [
        (0.8, 0.7, 0.5, 3, 2), (0.85, 0.4, 0.9, 2, 1)]
    # round 2's per-client accuracies [0.6, 1.0]: mean 0.8, worst 10% (one client) 0.6, population std 0.2
    fair = snap["fairness"]
    assert (fair["round"], fair["clients"]) == (2, 2)
    assert fair["mean"] == pytest.approx(0.8) and fair["worst10"] == pytest.approx(0.6) and fair["std"] == pytest.approx(0.2)
    assert rows[0]["fairness"]["mean"] == pytest.approx(0.7)
    assert snap["privacy"]["epsilon"] == 0.9 and snap["privacy"]["delta"] == 1e-5 and snap["privacy"]["clip"] == 1.0
    assert snap["initial"] == {"loss": 2.3, "accuracy": 0.1, "examples": None}
    assert snap["done"] and snap["live"] is None
    # a page that already holds round 1 gets only round 2
    assert [r["round"] for r in fed(hand_history()).snapshot(1)["rounds"]] == [2]


def test_feed_without_dp_has_no_privacy_and_non_finite_values_become_null():
    history = History([RoundRecord(1, selected=["0"], num_results=1, centralized=Evaluation(float("nan"), {"accuracy": 0.5}),
                                   timings={"total_s": float("inf")})])
    snap = fed(history, {"rounds": 1}).snapshot()
    assert snap["privacy"] is None
    assert snap["rounds"][0]["loss"] is None and snap["rounds"][0]["timings"]["total_s"] is None
    json.dumps(snap, allow_nan=False)  # what the event stream sends: strict JSON


class FakePool:
    """A server pool's two live facts."""

    def __init__(self, connected: list[str], in_flight: int) -> None:
        self.ids, self.in_flight = connected, in_flight

    def connected(self) -> list[str]:
        return list(self.ids)

    def outstanding(self) -> int:
        return self.in_flight


def test_server_feed_shows_connected_clients_tasks_in_flight_and_events():
    feed = DashboardFeed(DP_CONFIG, mode="server")
    feed.attach_pool(FakePool(["0", "1", HOSTILE], 2))
    feed.client_event("joined", HOSTILE, "ipv4:127.0.0.1:5000")
    feed.client_event("rejected", "1", "update has 10 values, the model 7")
    feed.client_event("left", "0", "no heartbeat for 16 s")
    snap = feed.snapshot()
    assert snap["live"] == {"connected": ["0", "1", HOSTILE], "num_connected": 3, "in_flight": 2}
    assert [(e["event"], e["client"], e["detail"]) for e in snap["events"]] == [
        ("joined", HOSTILE, "ipv4:127.0.0.1:5000"), ("rejected", "1", "update has 10 values, the model 7"),
        ("left", "0", "no heartbeat for 16 s")]
    feed.finish()
    assert feed.snapshot()["live"] is None  # the pool is gone with the server


# -- the web app (no browser) -----------------------------------------------------------------------------

@pytest.fixture
def served():
    from insitu.dashboard.app import DashboardServer

    feed = DashboardFeed(DP_CONFIG, mode="simulation")
    server = DashboardServer(feed, "127.0.0.1", 0).start()
    yield feed, server
    server.stop(grace_s=0)


def get(url: str, method: str = "GET", host: str | None = None) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, method=method, headers={"Host": host} if host else {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


def test_app_serves_its_own_assets_read_only_with_a_strict_policy(served):
    feed, server = served
    status, headers, body = get(server.url)
    assert status == 200 and b'<script src="dashboard.js"' in body
    assert "script-src 'self'" in headers["content-security-policy"] and headers["x-content-type-options"] == "nosniff"
    for asset in ("dashboard.js", "dashboard.css"):
        assert get(server.url + asset)[0] == 200
    assert not re.search(rb"""(src|href)\s*=\s*["']?(https?:)?//""", body)  # nothing from another origin
    feed.on_round(hand_history().rounds[0])
    status, _, body = get(server.url + "api/state")
    assert status == 200 and json.loads(body)["rounds"][0]["accuracy"] == 0.8
    for method in ("POST", "PUT", "DELETE"):  # no endpoint changes anything
        assert get(server.url + "api/state", method)[0] == 405
        assert get(server.url + "events", method)[0] == 405
    assert get(server.url + "api/state", host="attacker.example")[0] == 400  # DNS rebinding: a foreign Host is refused


def test_a_non_loopback_address_needs_asking_for_it():
    from insitu.dashboard.app import DashboardServer

    with pytest.raises(ValueError, match="--dashboard-host 0.0.0.0"):
        DashboardServer(DashboardFeed({}), "0.0.0.0", 0)
    with pytest.raises(ValueError, match="0 \\(any free port\\) to 65535"):
        DashboardServer(DashboardFeed({}), "127.0.0.1", 70000)


def test_start_dashboard_warns_when_listening_beyond_this_machine(capsys):
    from insitu.dashboard.cli import start_dashboard

    server = start_dashboard(DashboardFeed({}), 0, "0.0.0.0")
    try:
        out, err = (" ".join(text.split()) for text in capsys.readouterr())  # rich wraps long lines
        assert "warning" in err and "0.0.0.0" in err and "anyone who reaches it" in err
        assert f"http://127.0.0.1:{server.port}/" in out
    finally:
        server.stop(grace_s=0)


def read_event(response: Any) -> dict[str, Any]:
    while True:
        line = response.readline()
        assert line, "the event stream ended before an event"
        if line.startswith(b"data: "):
            return json.loads(line[6:])


def test_a_browser_that_disconnects_never_stalls_or_breaks_the_run(served):
    feed, server = served
    history = hand_history()
    response = urllib.request.urlopen(server.url + "events", timeout=10)
    assert read_event(response)["rounds"] == []
    wait_until(lambda: feed.viewers == 1, 5, "the stream to count its viewer")
    response.close()  # the page goes away mid-run
    for record in history.rounds:
        feed.on_round(record)  # the run's callback: only takes the feed's lock, whoever listens or not
    wait_until(lambda: feed.viewers == 0, 10, "the server to notice the page left")
    with urllib.request.urlopen(server.url + "events", timeout=10) as again:  # a new page gets every round so far
        assert [r["round"] for r in read_event(again)["rounds"]] == [1, 2]
        feed.finish(history)
        assert read_event(again)["done"]
        assert again.read().strip() == b""  # the stream ends (read() returns) once the run has
    stopping = threading.Thread(target=server.stop)
    stopping.start()
    stopping.join(30)  # a liveness bound, not a timing claim: a hung stop would hang the CLI at the run's end
    assert not stopping.is_alive()


# -- in a real browser ----------------------------------------------------------------------------------


def test_hostile_client_ids_and_reasons_render_as_text(browser):  # noqa: F811
    from insitu.dashboard.app import DashboardServer

    history = hand_history(client=HOSTILE, reason=HOSTILE_REASON)
    feed = DashboardFeed(DP_CONFIG, mode="server")
    feed.attach_pool(FakePool(["0", HOSTILE], 1))
    feed.client_event("rejected", HOSTILE, HOSTILE_REASON)
    for record in history.rounds:
        feed.on_round(record)
    server = DashboardServer(feed, "127.0.0.1", 0).start()
    try:
        browser.get(server.url)
        wait_until(lambda: table_rows(browser, "events"), 30, "the client events table")
        assert alert_text(browser) is None
        assert browser.execute_script("return document.querySelectorAll('main img, main script, main svg[onload]').length") == 0
        assert browser.execute_script("return window.__pwned === undefined")
        clients = [row[0] for row in table_rows(browser, "clients")]
        assert HOSTILE in clients  # shown as the literal text it is
        assert [HOSTILE, "rejected", HOSTILE_REASON] == table_rows(browser, "events")[0][1:]
        assert any(HOSTILE_REASON in row[4] for row in table_rows(browser, "failures"))
        assert HOSTILE in browser.find_element("id", "live-connected").text
        assert "1 task(s) in flight" in browser.find_element("id", "live-summary").text
        # DP: the epsilon card, chart and privacy table show the last round's epsilon and the settings
        assert browser.find_element("id", "card-epsilon").text.endswith("0.900")
        assert browser.find_element("id", "fig-epsilon").is_displayed()
        privacy = dict(table_rows(browser, "privacy"))
        assert (privacy["ε spent"], privacy["δ"], privacy["noise multiplier"], privacy["clip"]) == ("0.900", "0.00001", "1.1", "1")
        assert all(url.startswith(server.url) for url in resource_urls(browser))
    finally:
        server.stop(grace_s=0)


@dataclass
class LiveRun:
    """What the browser saw of a live `insitu simulate --dashboard` run, and what the run wrote."""

    out: Path
    url: str
    status_at_round_3: str
    rounds: list[list[str]]
    clients: list[list[str]]
    failures: list[list[str]]
    clock_shown: bool
    fairness: str
    resources: list[str]
    alert: str | None


@pytest.fixture(scope="module")
def live_run(browser, tmp_path_factory) -> LiveRun:  # noqa: F811
    """A small real run (digits, 3 clients, 4 rounds, per-client evaluation, simulated dropouts: with seed 0
    clients drop in rounds 2-4) watched from its first round."""
    root = tmp_path_factory.mktemp("live")
    log_path = root / "simulate.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([str(BIN / "insitu"), "simulate", "--rounds", "4", "--num-clients", "3",
                                 "--local-epochs", "1", "--fraction-evaluate", "1", "--dropout", "0.3", "--dashboard", "--dashboard-port",
                                 "0", "--dashboard-wait", "-o", str(root / "run")],
                                stdout=log, stderr=subprocess.STDOUT, env=ENV, cwd=root)
    try:
        address = printed_address(proc, log_path, "simulate")
        browser.get(address)
        wait_until(lambda: browser.find_elements("css selector", "#rounds tr[data-round='3']"), 120, "round 3 on the page")
        status = browser.find_element("id", "status").text
        wait_until(lambda: "finished" in browser.find_element("id", "status").text, 120, "the run to finish on the page")
        assert proc.wait(60) == 0, log_path.read_text()
        run = LiveRun(root / "run", address, status, table_rows(browser, "rounds"), table_rows(browser, "clients"),
                      table_rows(browser, "failures"), browser.find_element("id", "fig-clock").is_displayed(),
                      browser.find_element("id", "fairness").text, resource_urls(browser), alert_text(browser))
        screenshot(browser, (SCREENSHOTS or root) / "dashboard.png")
        return run
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def expected_round_cells(history: dict[str, Any]) -> dict[str, list[str]]:
    """round -> [accuracy, loss, selected, results] as the page formats them, from history.json."""
    cells = {}
    for r in history["rounds"]:
        ev = r["centralized"]
        cells[str(r["round"])] = [f"{100 * ev['metrics']['accuracy']:.2f}%", f"{ev['loss']:.4f}",
                                  str(len(r["selected"])), str(r["num_results"])]
    return cells


def test_live_simulation_dashboard_matches_history_json(live_run):
    from insitu.experiments.runner import fairness

    assert live_run.status_at_round_3.startswith("running: round") or live_run.status_at_round_3.startswith("finished")
    history = json.loads((live_run.out / "history.json").read_text())
    assert len(history["rounds"]) == 4
    shown = {row[0]: [row[2], row[3], row[5], row[6]] for row in live_run.rounds}
    assert shown == expected_round_cells(history)
    assert {row[0]: row[11] for row in live_run.rounds} == {str(r["round"]): f"{r['timings']['clock_s']:.1f}"
                                                             for r in history["rounds"]}
    assert live_run.clock_shown  # the systems model's simulated clock has its chart
    # per client: [selected, finished, failed, dropped, rejected], counted from history.json
    counts: dict[str, list[int]] = {}
    for r in history["rounds"]:
        dropped = {f["client"] for f in r["failures"] if "ClientDroppedOut" in f["reason"]}
        for cid in r["selected"]:
            c = counts.setdefault(cid, [0, 0, 0, 0, 0])
            c[0] += 1
            c[1] += cid not in dropped
            c[3] += cid in dropped
    assert sum(c[3] for c in counts.values()) == 4  # seed 0: four dropouts in rounds 2-4
    assert {row[0]: [int(v) for v in row[1:6]] for row in live_run.clients} == counts
    assert sorted((row[0], row[1], row[2], row[3], row[4]) for row in live_run.failures) == sorted(
        (str(r["round"]), f["client"], "fit", "dropped", f["reason"]) for r in history["rounds"] for f in r["failures"])
    fair = fairness(History.from_dict(history))
    assert fair is not None
    assert live_run.fairness == (f"Round {fair.round}, {fair.n_clients} client(s) evaluated: mean {100 * fair.mean:.2f}%, "
                                 f"worst 10% {100 * fair.worst10:.2f}%, std {100 * fair.std:.2f}%")
    assert live_run.alert is None
    assert live_run.resources and all(url.startswith(live_run.url) for url in live_run.resources)


def test_dashboard_of_a_finished_run_dir(live_run, browser):  # noqa: F811
    with open(live_run.out.parent / "dashboard.log", "w") as log:
        proc = subprocess.Popen([str(BIN / "insitu"), "dashboard", str(live_run.out), "--port", "0"], stdout=log,
                                stderr=subprocess.STDOUT, env=ENV)
    try:
        log_path = live_run.out.parent / "dashboard.log"

        address = printed_address(proc, log_path, "insitu dashboard")
        browser.get(address)
        wait_until(lambda: "finished: 4 round(s)" in browser.find_element("id", "status").text, 30, "the finished run")
        history = json.loads((live_run.out / "history.json").read_text())
        shown = {row[0]: [row[2], row[3], row[5], row[6]] for row in table_rows(browser, "rounds")}
        assert shown == expected_round_cells(history)
        assert table_rows(browser, "clients") == live_run.clients
        assert browser.find_element("id", "card-accuracy").text.endswith(
            f"{100 * history['rounds'][-1]['centralized']['metrics']['accuracy']:.2f}%")
    finally:
        proc.terminate()
        proc.wait(10)


def test_report_of_the_live_run_renders_offline(live_run, browser):  # noqa: F811
    """`insitu report` on the real run: opened from disk, it shows history.json's numbers and fetches nothing."""
    from typer.testing import CliRunner

    from insitu.cli.main import app

    result = CliRunner().invoke(app, ["report", str(live_run.out)])
    assert result.exit_code == 0, result.output
    page = live_run.out / "report.html"
    html = page.read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", html) and "<script" not in html
    browser.get(page.as_uri())
    wait_until(lambda: table_rows(browser, "rounds"), 30, "the report's rounds table")
    history = json.loads((live_run.out / "history.json").read_text())
    shown = {row[0]: [row[2], row[3], row[5], row[6]] for row in table_rows(browser, "rounds")}
    assert shown == expected_round_cells(history)
    assert resource_urls(browser) == []
    assert browser.execute_script("return document.querySelectorAll('svg path').length") >= 4  # the charts drew
    screenshot(browser, (SCREENSHOTS or live_run.out) / "report.png")


@pytest.mark.slow
def test_server_dashboard_shows_connected_clients_and_their_events(browser, procs, tmp_path):  # noqa: F811
    """`insitu server --dashboard` with real clients: the page shows who is connected before the first round,
    each client's events, and the rounds as history.json has them."""
    from cli_harness import free_port

    port = free_port()
    procs.start("server", "server", "--insecure", "--address", f"127.0.0.1:{port}", "--rounds", "3", "--min-clients",
                "2", "--local-epochs", "1", "-o", "out", "--dashboard", "--dashboard-port", "0")
    procs.wait_for_text("server", "Dashboard: http")
    address = re.search(r"Dashboard: (http://127\.0\.0\.1:\d+/)", procs.log("server")).group(1)
    browser.get(address)

    def client(cid: int) -> None:
        procs.start(f"client{cid}", "client", "--insecure", "--address", f"127.0.0.1:{port}", "--client-id", str(cid),
                    "--num-partitions", "2")

    client(0)  # the server waits for two: nothing runs yet
    wait_until(lambda: browser.find_element("id", "live-summary").text == "1 client(s) connected, 0 task(s) in flight",
               120, "client 0 on the page")
    assert browser.find_element("id", "live-connected").text == "0"
    client(1)
    wait_until(lambda: "finished: 3 round(s)" in browser.find_element("id", "status").text, 180, "the finished run")
    assert procs.wait("server") == 0, procs.log("server")
    events = {(row[1], row[2]) for row in table_rows(browser, "events")}
    assert {("0", "joined"), ("1", "joined")} <= events
    history = json.loads((tmp_path / "out" / "history.json").read_text())
    shown = {row[0]: [row[2], row[3], row[5], row[6]] for row in table_rows(browser, "rounds")}
    assert shown == expected_round_cells(history)


def test_every_static_asset_ships_in_the_wheel():
    """pyproject's package-data must name every file the app serves, or an installed dashboard has no page."""
    import fnmatch

    from insitu.dashboard.app import ASSETS
    from insitu.files import load_toml

    root = Path(__file__).resolve().parents[1]
    patterns = load_toml(root / "pyproject.toml", "pyproject")["tool"]["setuptools"]["package-data"]["insitu.dashboard"]
    static = root / "src" / "insitu" / "dashboard" / "static"
    assert set(ASSETS) == {p.name for p in static.iterdir()}
    for name in ASSETS:
        assert any(fnmatch.fnmatch(f"static/{name}", pattern) for pattern in patterns), name


def test_without_the_extra_the_error_says_what_to_install(monkeypatch):
    import sys

    from insitu.dashboard.app import DashboardServer

    monkeypatch.setitem(sys.modules, "uvicorn", None)  # as if not installed
    with pytest.raises(ImportError, match=r"pip install 'insitu\[dashboard\]'"):
        DashboardServer(DashboardFeed({}), "127.0.0.1", 0)


def test_a_run_that_raises_is_shown_as_failed_and_the_server_stops(capsys):
    from insitu.dashboard.cli import run_dashboard

    with pytest.raises(RuntimeError, match="out of memory"), run_dashboard({"rounds": 3}, True, 0) as live:
        live.also(lambda record, _p, _s: None)(hand_history().rounds[0], None, None)  # type: ignore[arg-type]
        feed, server = live.feed, live.server
        raise RuntimeError("out of memory")
    snap = feed.snapshot()
    assert snap["done"] and snap["error"] == "the run stopped: RuntimeError: out of memory"
    assert [r["round"] for r in snap["rounds"]] == [1]
    with pytest.raises(OSError):  # no longer serving
        urllib.request.urlopen(server.url, timeout=5)
    with run_dashboard({"rounds": 3}, False, 0) as off:  # off: nothing is served, callbacks pass through
        callback = lambda record, _p, _s: None
        assert off.also(callback) is callback and off.feed is None


def test_a_nan_in_config_json_still_gives_valid_json(tmp_path):
    from insitu.dashboard.app import DashboardServer

    config = json.loads('{"rounds": NaN, "dp_clip": Infinity, "lr": NaN}')  # json.loads accepts these
    feed = fed(hand_history(), config)
    server = DashboardServer(feed, "127.0.0.1", 0).start()
    try:
        status, _, body = get(server.url + "api/state")
    finally:
        server.stop(grace_s=0)
    assert status == 200
    state = json.loads(body)
    assert state["num_rounds"] is None and len(state["rounds"]) == 2
    assert state["rounds"][1]["epsilon"] is None  # an infinite dp_clip is no server DP
    json.dumps(feed.snapshot(), allow_nan=False)


def test_dashboard_command_turns_a_malformed_history_into_a_clean_failure(tmp_path):
    from typer.testing import CliRunner

    from insitu.cli.main import app

    run = tmp_path / "run"
    run.mkdir()
    history = hand_history().to_dict()
    history["rounds"][0]["failures"] = ["not a dict"]
    (run / "history.json").write_text(json.dumps(history))
    result = CliRunner().invoke(app, ["dashboard", str(run), "--port", "0"])
    assert result.exit_code != 0 and not isinstance(result.exception, AttributeError), result.output
    assert "history.json" in " ".join(result.output.split())
