"""`insitu report RUN_DIR`: one self-contained HTML file; every string escaped; checked in headless Chromium."""

from __future__ import annotations

import json
import re
from pathlib import Path

from browser import alert_text, browser, resource_urls, table_rows, wait_until  # noqa: F401 (fixture)
from test_dashboard import DP_CONFIG, HOSTILE, HOSTILE_REASON, hand_history
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
