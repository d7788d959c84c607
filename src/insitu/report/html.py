"""``insitu report RUN_DIR``: a finished run as one self-contained HTML file.

Plots are inline SVG drawn here, the style sheet is inline, and there is no script and no external
reference at all, so the file opens offline, can be mailed or archived, and makes no request. Every
string from the run (client ids and rejection reasons come from clients) is HTML-escaped.
"""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
from collections.abc import Sequence
from html import escape
from pathlib import Path
from typing import Any

from insitu.report.summary import load_run, run_view
from insitu.run.history import History

COLORS = ("#2563eb", "#dc2626", "#16a34a", "#d97706", "#7c3aed")
SYSTEMS_KEYS = ("speed_sigma", "latency", "dropout", "straggler_fraction")

STYLE = """
body{margin:0;font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#1d2330;background:#f7f8fa}
header{padding:14px 22px;background:#fff;border-bottom:1px solid #e4e7ec}h1{font-size:19px;margin:0}
main{padding:16px 22px;display:grid;gap:16px}section{background:#fff;border:1px solid #e4e7ec;border-radius:8px;
padding:12px 14px}h2{font-size:15px;margin:0 0 8px}.muted{color:#667085}
.cards{display:grid;grid-template-columns:repeat(auto-fill,minmax(160px,1fr));gap:10px}
.card{border:1px solid #e4e7ec;border-radius:8px;padding:8px 12px}.card .label{color:#667085;font-size:12px}
.card .value{font-size:20px;font-weight:600}.charts{display:grid;grid-template-columns:repeat(auto-fill,minmax(380px,1fr));
gap:10px}figure{margin:0;border:1px solid #e4e7ec;border-radius:8px;padding:8px}figcaption{font-weight:600;font-size:13px}
svg{width:100%;height:auto;display:block}svg text{fill:#667085;font-size:11px}svg .legend text{fill:#1d2330}
table{border-collapse:collapse;width:100%;font-size:13px}th,td{text-align:left;padding:4px 8px;border-bottom:1px solid
#e4e7ec;vertical-align:top}th{color:#667085}td.num{text-align:right;font-variant-numeric:tabular-nums}
tr.failed td{color:#dc2626}td.reason{overflow-wrap:anywhere;max-width:560px}.kv td:first-child{color:#667085;width:30%}
"""


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.2f}%"


def _num(x: float | None, digits: int = 4) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def _short(x: float) -> str:
    if x != 0 and (abs(x) >= 1000 or abs(x) < 0.01):
        return f"{x:.3g}"
    return f"{round(x, 3):g}"


def _ticks(lo: float, hi: float, count: int) -> list[float]:
    span = (hi - lo) or 1.0
    step0 = span / count
    mag = 10 ** math.floor(math.log10(step0))
    step = next((m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= step0), step0)
    first = math.ceil(lo / step) * step
    return [float(f"{first + i * step:.12g}") for i in range(int((hi - first) / step + 1e-9) + 1)]


def line_chart(series: Sequence[tuple[str, Sequence[tuple[float, float | None]]]], label: str,
               y_min: float | None = None, colors: Sequence[str] = COLORS) -> str:
    """An inline SVG line chart of ``(name, [(x, y), ...])`` series (None values are skipped)."""
    width, height, left, right, top, bottom = 460, 210, 50, 12, 26 if len(series) > 1 else 12, 28
    points = [(x, y) for _, pts in series for x, y in pts if y is not None and math.isfinite(y)]
    if not points:
        return '<p class="muted">no data</p>'
    x0, x1 = min(p[0] for p in points), max(p[0] for p in points)
    y0, y1 = min(p[1] for p in points), max(p[1] for p in points)
    if y_min is not None:
        y0 = min(y0, y_min)
    if x1 == x0:
        x1 = x0 + 1
    if y1 == y0:
        y1 = y0 + (abs(y0) or 1) * 0.1
        y0 = y0 - ((abs(y0) or 1) * 0.1 if y_min is None else 0)
    pad = (y1 - y0) * 0.05
    y1 += pad
    if y_min is None or y0 > y_min:
        y0 -= pad

    def sx(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * (width - left - right)

    def sy(y: float) -> float:
        return height - bottom - (y - y0) / (y1 - y0) * (height - top - bottom)

    parts = [(f'<svg viewBox="0 0 {width} {height}" role="img" aria-label="{escape(label)}" '
             'xmlns="http://www.w3.org/2000/svg">')]
    for t in _ticks(y0, y1, 4):
        parts.append(f'<line x1="{left}" x2="{width - right}" y1="{sy(t):.1f}" y2="{sy(t):.1f}" stroke="#e4e7ec"/>')
        parts.append(f'<text x="{left - 6}" y="{sy(t) + 4:.1f}" text-anchor="end">{escape(_short(t))}</text>')
    for t in _ticks(x0, x1, 6):
        if float(t).is_integer():
            parts.append(f'<text x="{sx(t):.1f}" y="{height - bottom + 16}" text-anchor="middle">{_short(t)}</text>')
    parts.append(f'<line x1="{left}" x2="{width - right}" y1="{height - bottom}" y2="{height - bottom}" stroke="#98a2b3"/>')
    parts.append(f'<line x1="{left}" x2="{left}" y1="{top}" y2="{height - bottom}" stroke="#98a2b3"/>')
    for i, (name, pts) in enumerate(series):
        color = colors[i % len(colors)]
        usable = [(x, y) for x, y in pts if y is not None and math.isfinite(y)]
        if not usable:
            continue
        d = "".join(f"{'L' if j else 'M'}{sx(x):.1f},{sy(y):.1f}" for j, (x, y) in enumerate(usable))
        parts.append(f'<path d="{d}" fill="none" stroke="{color}" stroke-width="2"/>')
        if len(usable) <= 80:
            parts += [f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="2.8" fill="{color}"><title>{escape(name)}, '
                      f'round {x:g}: {escape(_short(y))}</title></circle>' for x, y in usable]
    if len(series) > 1:
        x = left + 8
        parts.append('<g class="legend">')
        for i, (name, _) in enumerate(series):
            parts.append(f'<rect x="{x}" y="4" width="10" height="10" fill="{colors[i % len(colors)]}"/>'
                         f'<text x="{x + 14}" y="13">{escape(name)}</text>')
            x += 22 + 7 * len(name)
        parts.append("</g>")
    parts.append("</svg>")
    return "".join(parts)


def _table(table_id: str, header: Sequence[str], rows: Sequence[Sequence[tuple[str, str]]],
           row_attrs: Sequence[str] | None = None, css: str = "") -> str:
    """A table whose cells are (text, css class) pairs; the text is escaped here."""
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    body = []
    for i, row in enumerate(rows):
        attrs = row_attrs[i] if row_attrs else ""
        cells = "".join(f'<td class="{cls}">{escape(text)}</td>' if cls else f"<td>{escape(text)}</td>" for text, cls in row)
        body.append(f"<tr{attrs}>{cells}</tr>")
    return (f'<table id="{table_id}"{f" class={chr(34)}{css}{chr(34)}" if css else ""}><thead><tr>{head}</tr></thead>'
            f"<tbody>{''.join(body)}</tbody></table>")


def render_report(history: History, config: dict[str, Any], title: str = "", source: str = "") -> str:
    """The report's HTML: summary cards, charts, fairness, privacy, the rounds, the clients, failures, config."""
    view = run_view(history, config, title=title)
    rounds: list[dict[str, Any]] = view["rounds"]
    initial = [(0.0, view["initial"])] if view["initial"] else []

    def series(key: str, scale: float = 1.0) -> list[tuple[float, float | None]]:
        out = [(x, None if e[key] is None else e[key] * scale) for x, e in initial]
        return out + [(float(r["round"]), None if r[key] is None else r[key] * scale) for r in rounds]

    last = next((r for r in reversed(rounds) if r["accuracy"] is not None), None)
    totals = {k: sum(r["failure_counts"][k] for r in rounds) for k in ("failed", "dropped", "rejected")}
    privacy = view["privacy"]
    cards = [("rounds", f"{len(rounds)} / {view['num_rounds'] if view['num_rounds'] is not None else '?'}"),
             ("final accuracy", _pct(last["accuracy"]) if last else "–"),
             ("final loss", _num(last["loss"]) if last else "–"),
             ("clients seen", str(view["num_clients_seen"])),
             ("failed / dropped / rejected", f"{totals['failed']} / {totals['dropped']} / {totals['rejected']}")]
    if privacy and privacy.get("epsilon") is not None:
        cards.insert(3, ("ε spent", _num(privacy["epsilon"], 3)))
    card_html = "".join(f'<div class="card"><div class="label">{escape(k)}</div><div class="value">{escape(v)}</div></div>'
                        for k, v in cards)

    charts = [("Accuracy (%)", line_chart([("accuracy", series("accuracy", 100))], "accuracy per round")),
              ("Loss", line_chart([("loss", series("loss"))], "loss per round"))]
    if any(r["epsilon"] is not None for r in rounds):
        charts.append(("Privacy spent (ε)", line_chart([("epsilon", [(r["round"], r["epsilon"]) for r in rounds])],
                                                       "epsilon per round", y_min=0)))
    visible = [r for r in rounds if not r["withheld"]]
    if visible:
        charts.append(("Clients per round", line_chart([
            ("selected", [(r["round"], r["selected"]) for r in visible]),
            ("results", [(r["round"], r["results"]) for r in visible]),
            ("failures", [(r["round"], r["num_failures"]) for r in visible])], "clients per round", y_min=0,
            colors=(COLORS[0], COLORS[2], COLORS[1]))))
        charts.append(("Round time (s)", line_chart([("round time", [(r["round"], r["timings"].get("total_s"))
                                                                     for r in visible])], "round time", y_min=0)))
    if any(float(config.get(k) or 0) > 0 for k in SYSTEMS_KEYS):
        charts.append(("Simulated clock (s)", line_chart([("clock", [(r["round"], r["timings"].get("clock_s"))
                                                                     for r in visible])], "simulated clock", y_min=0)))
    fair_rounds = [r for r in rounds if r["fairness"]]
    if fair_rounds:
        charts.append(("Per-client accuracy (%)", line_chart([
            ("mean", [(r["round"], 100 * r["fairness"]["mean"]) for r in fair_rounds]),
            ("worst 10%", [(r["round"], 100 * r["fairness"]["worst10"]) for r in fair_rounds])], "per-client accuracy")))
    chart_html = "".join(f"<figure><figcaption>{escape(name)}</figcaption>{svg}</figure>" for name, svg in charts)

    fairness = view["fairness"]
    if fairness:
        fair_html = (f'<p id="fairness">Round {escape(str(fairness["round"]))}, {escape(str(fairness["clients"]))} '
                     f'client(s) evaluated: mean '
                     f'{_pct(fairness["mean"])}, worst 10% {_pct(fairness["worst10"])}, std {_pct(fairness["std"])}</p>')
    else:
        fair_html = '<p id="fairness" class="muted">No per-client evaluation ran (fraction_evaluate = 0, or withheld under DP).</p>'

    privacy_html = ""
    if privacy:
        kv: list[tuple[str, str]] = []
        if "mode" in privacy:
            clip = f"{privacy['clip']}" + (f" (adaptive, final {_num(privacy['final_clip'], 3)})"
                                             if privacy["adaptive_clip"] else "")
            kv += [("DP", privacy["mode"]), ("ε spent", _num(privacy["epsilon"], 3)), ("δ", f"{privacy['delta']}"),
                   ("noise multiplier", f"{privacy['noise_multiplier']}"), ("clip", clip),
                   ("target ε", f"{privacy['target_epsilon']}" if privacy["target_epsilon"] else "none"),
                   ("accountant", privacy["accountant"])]
        if "local" in privacy:
            kv += [("local DP noise multiplier", f"{privacy['local']['noise_multiplier']}"),
                   ("local DP clip", f"{privacy['local']['clip']}")]
        privacy_html = ("<section><h2>Privacy</h2>" + _table("privacy", ["", ""], [[(k, ""), (v, "")] for k, v in kv],
                                                             css="kv") + "</section>")

    round_rows = [[(str(r["round"]), "num"), ("ok" if r["status"] == "ok" else f"failed: {r['error'] or ''}", "reason"),
                   (_pct(r["accuracy"]), "num acc"), (_num(r["loss"]), "num loss"), (_num(r["epsilon"], 3), "num eps"),
                   ("withheld" if r["withheld"] else str(r["selected"]), "num"),
                   ("–" if r["withheld"] else str(r["results"]), "num"), (str(r["failure_counts"]["failed"]), "num"),
                   (str(r["failure_counts"]["dropped"]), "num"), (str(r["failure_counts"]["rejected"]), "num"),
                   (_num(r["timings"].get("total_s"), 2), "num"), (_num(r["timings"].get("clock_s"), 1), "num")]
                  for r in rounds]
    round_attrs = [f' data-round="{escape(str(r["round"]))}"' + ("" if r["status"] == "ok" else ' class="failed"') for r in rounds]
    clients = view["clients"]
    client_rows = [[(c["client"], "client"), (str(c["selected"]), "num"), (str(c["finished"]), "num"),
                    (str(c["failed"]), "num"), (str(c["dropped"]), "num"), (str(c["rejected"]), "num"),
                    (_pct(c["accuracy"]), "num"), (c["last_problem"] or "", "reason")] for c in clients]
    failures = [[(str(r["round"]), "num"), (f["client"], "client"), (f["stage"], ""), (f["kind"], ""), (f["reason"], "reason")]
                for r in rounds for f in r["failures"]]
    config_rows = [[(k, ""), (v, "")] for k, v in view["config"]]
    shown = "" if len(clients) == view["num_clients_seen"] else f" ({len(clients)} of {view['num_clients_seen']} shown)"
    stopped = f"<p>Stopped early: {escape(view['stopped'])}</p>" if view["stopped"] else ""
    return "".join([
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1"><link rel="icon" href="data:,">',
        # No script, no external resource: the policy lets the file load nothing but its own inline style.
        ("<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; style-src 'unsafe-inline'; "
        "img-src data:\">"),
        f"<title>insitu report: {escape(view['title'])}</title><style>{STYLE}</style></head><body>",
        (f'<header><h1 id="title">{escape(view["title"])}</h1><div class="muted">insitu report'
        f'{(" of " + escape(source)) if source else ""}</div></header><main>'),
        f'<section class="cards" id="cards">{card_html}</section>{stopped}',
        f'<section><div class="charts">{chart_html}</div></section>',
        f"<section><h2>Fairness across clients</h2>{fair_html}</section>",
        privacy_html,
        "<section><h2>Rounds</h2>", _table("rounds", ["round", "status", "accuracy", "loss", "ε", "selected", "results",
                                                       "failed", "dropped", "rejected", "time (s)", "clock (s)"],
                                            round_rows, round_attrs), "</section>",
        f"<section><h2>Clients{escape(shown)}</h2>",
        _table("clients", ["client", "selected", "finished", "failed", "dropped", "rejected", "accuracy", "last problem"],
               client_rows, [f' data-client="{escape(c["client"])}"' for c in clients]), "</section>",
        "<section><h2>Failures and rejections</h2>",
        _table("failures", ["round", "client", "stage", "kind", "reason"], failures) if failures
        else '<p class="muted">None.</p>', "</section>",
        "<section><h2>Configuration</h2>", _table("config", ["setting", "value"], config_rows, css="kv"), "</section>",
        "</main></body></html>\n",
    ])


def write_report(run_dir: Path, out: Path | None = None) -> Path:
    """Read ``run_dir``'s history.json and config.json and write the report (default RUN_DIR/report.html).

    The report is written to a new file beside ``path`` and renamed over it, so a ``report.html`` planted as a
    symlink (a run folder from someone else) is replaced, never followed into the file it points at."""
    history, config = load_run(run_dir)
    path = out or run_dir / "report.html"
    html = render_report(history, config, source=str(run_dir))
    fd, temporary = tempfile.mkstemp(prefix=".report-", suffix=".html.tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as file:
            file.write(html)
        os.chmod(temporary, 0o644)  # mkstemp's 0600 would hide the report from the team sharing the folder
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    return path
