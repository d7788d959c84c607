"""`insitu report RUN_DIR`: one self-contained HTML file; every string escaped; checked in headless Chromium."""

from __future__ import annotations

import json
import re
from pathlib import Path

from browser import alert_text, browser, resource_urls, table_rows, wait_until  # noqa: F401 (fixture)
from test_dashboard import DP_CONFIG, HOSTILE, HOSTILE_REASON, fed, hand_history
from typer.testing import CliRunner

from insitu.cli.main import app
from insitu.report.html import line_chart, render_report

EXTERNAL = re.compile(r"""(src|href|action)\s*=\s*["']?\s*(https?:)?//""", re.IGNORECASE)


def write_run(root: Path, history_text: str | None = None, config: dict | None = None) -> Path:
    run = root / "run"
    run.mkdir()
    history = hand_history(client=HOSTILE, reason=HOSTILE_REASON)
    (run / "history.json").write_text(history_text if history_text is not None else json.dumps(history.to_dict()))
    (run / "config.json").write_text(json.dumps(config if config is not None else {**DP_CONFIG, "note": HOSTILE}))
    return run


def test_report_escapes_everything_and_references_nothing():
    html = render_report(hand_history(client=HOSTILE, reason=HOSTILE_REASON), {**DP_CONFIG, "note": HOSTILE},
                         title=HOSTILE)
    assert HOSTILE not in html and HOSTILE_REASON not in html and "<script" not in html
    assert "&lt;img src=x onerror=alert(1)&gt;" in html
    assert "&quot;&gt;&lt;script&gt;window.__pwned = 1&lt;/script&gt;" in html
    assert not EXTERNAL.search(html)
    assert "default-src 'none'" in html  # the file may load nothing, even if something slipped through


def test_report_numbers_privacy_and_fairness_by_hand():
    html = render_report(hand_history(), DP_CONFIG)
    assert re.search(r'<tr data-round="2"><td class="num">2</td><td class="reason">ok</td><td class="num acc">85.00%</td>'
                     r'<td class="num loss">0.4000</td><td class="num eps">0.900</td><td class="num">2</td>'
                     r'<td class="num">1</td><td class="num">1</td><td class="num">0</td><td class="num">1</td>', html)
    # round 2's clients [0.6, 1.0]: mean 80%, worst 10% 60%, std 20%
    assert "Round 2, 2 client(s) evaluated: mean 80.00%, worst 10% 60.00%, std 20.00%" in html
    assert "<td>ε spent</td><td>0.900</td>" in html and "<td>δ</td><td>1e-05</td>" in html
    assert "<td>noise multiplier</td><td>1.1</td>" in html and "<td>clip</td><td>1.0</td>" in html
    # client 2: selected 2, finished 1, failed 1, dropped 1, rejected 0
    assert ('<tr data-client="2"><td class="client">2</td><td class="num">2</td><td class="num">1</td>'
            '<td class="num">1</td><td class="num">1</td><td class="num">0</td>') in html
    no_dp = render_report(hand_history(), {"rounds": 2})
    assert "<h2>Privacy</h2>" not in no_dp


def test_line_chart_places_points_on_the_axes():
    svg = line_chart([("acc", [(1.0, 0.0), (3.0, 10.0)])], "acc", y_min=0)
    # x 1..3 spans 50..448 px; y 0..10.5 (5% headroom) spans 182..12 px
    assert '<path d="M50.0,182.0L448.0,20.1"' in svg
    assert line_chart([("acc", [(1.0, None)])], "acc") == '<p class="muted">no data</p>'


def test_report_command(tmp_path):
    run = write_run(tmp_path)
    result = CliRunner().invoke(app, ["report", str(run)])
    assert result.exit_code == 0, result.output
    assert (run / "report.html").is_file() and "report.html" in result.output
    out = tmp_path / "elsewhere.html"
    assert CliRunner().invoke(app, ["report", str(run), "--out", str(out)]).exit_code == 0
    assert out.read_text() == (run / "report.html").read_text()


def test_report_command_names_a_missing_or_broken_history(tmp_path):
    result = CliRunner().invoke(app, ["report", str(tmp_path)])
    assert result.exit_code == 2 and "no history.json" in result.output
    broken = write_run(tmp_path, history_text="{not json")
    result = CliRunner().invoke(app, ["report", str(broken)])
    assert result.exit_code == 2 and "is not a run history written by insitu" in result.output


def test_hostile_report_in_the_browser(tmp_path, browser):  # noqa: F811
    run = write_run(tmp_path)
    assert CliRunner().invoke(app, ["report", str(run)]).exit_code == 0
    browser.get((run / "report.html").as_uri())
    wait_until(lambda: table_rows(browser, "clients"), 30, "the clients table")
    assert alert_text(browser) is None
    assert browser.execute_script("return document.querySelectorAll('img, script').length") == 0
    assert browser.execute_script("return window.__pwned === undefined")
    assert HOSTILE in [row[0] for row in table_rows(browser, "clients")]
    assert any(row[4] == HOSTILE_REASON for row in table_rows(browser, "failures"))
    assert browser.find_element("id", "title").text == "fedavg on digits (mlp, 3 clients)"
    assert [row[2] for row in table_rows(browser, "rounds")] == ["80.00%", "85.00%"]
    assert resource_urls(browser) == []


def test_a_clients_epsilon_never_shows_as_privacy_spent_without_server_dp():
    """Without server-side DP a round's fit metrics are the clients' average: a client reporting `epsilon` or
    `clip_norm` must not give the report (or the dashboard: the same rows) an ε column, chart or card."""
    from insitu.report.summary import run_view

    history = hand_history()  # its fit metrics hold epsilon 0.5 and 0.9, as a lying client could send
    for record in history.rounds:
        record.fit_metrics["clip_norm"] = 3.0
    view = run_view(history, {"rounds": 2})
    assert [(r["epsilon"], r["clip_norm"]) for r in view["rounds"]] == [(None, None), (None, None)]
    assert view["privacy"] is None
    html = render_report(history, {"rounds": 2})
    assert "Privacy spent" not in html and "ε spent" not in html and '<td class="num eps">–</td>' in html
    assert '<td class="num eps">0.900</td>' not in html
    with_dp = run_view(history, DP_CONFIG)  # the server's own accounting is shown
    assert [(r["epsilon"], r["clip_norm"]) for r in with_dp["rounds"]] == [(0.5, 3.0), (0.9, 3.0)]
    local_dp = run_view(history, {"rounds": 2, "local_dp_noise": 1.0, "local_dp_clip": 1.0})
    assert [r["epsilon"] for r in local_dp["rounds"]] == [0.5, 0.9]  # local DP: the clients' own accountants
    assert local_dp["privacy"]["local"]["noise_multiplier"] == 1.0
    snap = fed(history, {"rounds": 2}).snapshot()
    assert [r["epsilon"] for r in snap["rounds"]] == [None, None] and snap["privacy"] is None


def test_huge_client_reasons_are_cut_everywhere_they_are_copied():
    from insitu.report.summary import MAX_REASON_CHARS, run_view

    reason = "parameters do not match: " + "x" * 200_000
    view = run_view(hand_history(reason=reason), DP_CONFIG)
    shown = view["rounds"][1]["failures"][0]["reason"]
    assert len(shown) == MAX_REASON_CHARS and shown.endswith("…") and shown.startswith("parameters do not match: xx")
    assert view["rounds"][1]["failure_counts"]["rejected"] == 1  # still classified by the whole reason
    (client0,) = [c for c in view["clients"] if c["client"] == "0"]
    assert len(client0["last_problem"]) < MAX_REASON_CHARS + 40 and client0["last_problem"].endswith("…")
    feed = fed(hand_history(reason=reason))
    feed.client_event("rejected", "0", reason)
    snap = feed.snapshot()
    assert len(snap["events"][0]["detail"]) == MAX_REASON_CHARS and len(json.dumps(snap)) < 20_000
    assert len(render_report(hand_history(reason=reason), DP_CONFIG)) < 40_000


def test_a_planted_report_symlink_is_replaced_and_its_target_left_alone(tmp_path):
    from insitu.report.html import write_report

    run = write_run(tmp_path)
    target = tmp_path / "bashrc"
    target.write_text("export PATH=/usr/bin\n")
    (run / "report.html").symlink_to(target)
    path = write_report(run)
    assert path == run / "report.html" and not path.is_symlink() and "<!doctype html>" in path.read_text()
    assert target.read_text() == "export PATH=/usr/bin\n"
    assert sorted(p.name for p in run.iterdir()) == ["config.json", "history.json", "report.html"]  # no temp left
    assert (path.stat().st_mode & 0o777) == 0o644
