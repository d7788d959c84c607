// insitu dashboard: renders the run's feed (server-sent events from /events) as cards, SVG charts and tables.
// Every string from the run (client ids, reasons, settings) is inserted as text (textContent / Text nodes),
// never as HTML, so a hostile client id cannot inject markup; the page makes no request but to its own server.
"use strict";
(function () {
  const SVG = "http://www.w3.org/2000/svg";
  const COLORS = ["#2563eb", "#dc2626", "#16a34a", "#d97706", "#7c3aed"];
  const state = { rounds: [], snap: null, done: false, source: null };

  const $ = (id) => document.getElementById(id);

  // An element with attributes and children; strings become Text nodes (never parsed as HTML).
  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
    for (const child of children) node.append(child instanceof Node ? child : String(child ?? ""));
    return node;
  }
  function svg(tag, attrs, text) {
    const node = document.createElementNS(SVG, tag);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
    if (text !== undefined) node.textContent = String(text);
    return node;
  }

  const isNum = (x) => typeof x === "number" && isFinite(x);
  const pct = (x) => (isNum(x) ? (100 * x).toFixed(2) + "%" : "–");
  const num = (x, digits = 4) => (isNum(x) ? x.toFixed(digits) : "–");
  const short = (x) => (isNum(x) ? (Math.abs(x) >= 1000 || (x !== 0 && Math.abs(x) < 0.01) ? x.toPrecision(3) : +x.toFixed(3)).toString() : "–");

  function niceTicks(lo, hi, count) {
    const span = hi - lo || 1;
    const step0 = span / count;
    const mag = Math.pow(10, Math.floor(Math.log10(step0)));
    const step = [1, 2, 2.5, 5, 10].map((m) => m * mag).find((s) => s >= step0) || step0;
    const ticks = [];
    for (let t = Math.ceil(lo / step) * step; t <= hi + step * 1e-9; t += step) ticks.push(+t.toPrecision(12));
    return ticks;
  }

  // A line chart of series [{name, points: [[x, y], ...]}] into container (SVG, drawn from scratch each time).
  function lineChart(container, series, opts = {}) {
    const W = 460, H = 210, m = { l: 50, r: 12, t: series.length > 1 ? 26 : 12, b: 28 };
    const points = series.flatMap((s) => s.points).filter((p) => isNum(p[0]) && isNum(p[1]));
    if (!points.length) {
      container.replaceChildren(el("p", { class: "empty" }, "no data yet"));
      return;
    }
    let x0 = Math.min(...points.map((p) => p[0])), x1 = Math.max(...points.map((p) => p[0]));
    let y0 = Math.min(...points.map((p) => p[1])), y1 = Math.max(...points.map((p) => p[1]));
    if (opts.yMin !== undefined) y0 = Math.min(y0, opts.yMin);
    if (x1 === x0) x1 = x0 + 1;
    if (y1 === y0) { y1 = y0 + (Math.abs(y0) || 1) * 0.1; y0 = y0 - (opts.yMin === undefined ? (Math.abs(y0) || 1) * 0.1 : 0); }
    const pad = (y1 - y0) * 0.05;
    y1 += pad; if (opts.yMin === undefined || y0 > opts.yMin) y0 -= pad;
    const sx = (x) => m.l + ((x - x0) / (x1 - x0)) * (W - m.l - m.r);
    const sy = (y) => H - m.b - ((y - y0) / (y1 - y0)) * (H - m.t - m.b);
    const root = svg("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": opts.label || "chart" });
    for (const t of niceTicks(y0, y1, 4)) {
      root.append(svg("line", { class: "grid", x1: m.l, x2: W - m.r, y1: sy(t), y2: sy(t) }));
      root.append(svg("text", { x: m.l - 6, y: sy(t) + 4, "text-anchor": "end" }, opts.yFormat ? opts.yFormat(t) : short(t)));
    }
    for (const t of niceTicks(x0, x1, 6).filter((t) => Number.isInteger(t) || !opts.integerX)) {
      root.append(svg("text", { x: sx(t), y: H - m.b + 16, "text-anchor": "middle" }, short(t)));
    }
    root.append(svg("line", { class: "axis", x1: m.l, x2: W - m.r, y1: H - m.b, y2: H - m.b }));
    root.append(svg("line", { class: "axis", x1: m.l, x2: m.l, y1: m.t, y2: H - m.b }));
    series.forEach((s, i) => {
      const color = s.color || COLORS[i % COLORS.length];
      const pts = s.points.filter((p) => isNum(p[0]) && isNum(p[1]));
      if (!pts.length) return;
      const d = pts.map((p, j) => `${j ? "L" : "M"}${sx(p[0]).toFixed(1)},${sy(p[1]).toFixed(1)}`).join("");
      root.append(svg("path", { d, fill: "none", stroke: color, "stroke-width": 2 }));
      if (pts.length <= 80) {
        for (const p of pts) {
          const dot = svg("circle", { cx: sx(p[0]), cy: sy(p[1]), r: 2.8, fill: color });
          dot.append(svg("title", {}, `${s.name}, round ${p[0]}: ${opts.yFormat ? opts.yFormat(p[1]) : short(p[1])}`));
          root.append(dot);
        }
      }
    });
    if (series.length > 1) {
      const legend = svg("g", { class: "legend" });
      let x = m.l + 8;
      series.forEach((s, i) => {
        legend.append(svg("rect", { x, y: 4, width: 10, height: 10, fill: s.color || COLORS[i % COLORS.length] }));
        legend.append(svg("text", { x: x + 14, y: 13 }, s.name));
        x += 22 + 7 * s.name.length;
      });
      root.append(legend);
    }
    container.replaceChildren(root);
  }

  function card(label, value, id) {
    return el("div", { class: "card", id }, el("div", { class: "label" }, label), el("div", { class: "value" }, value));
  }

  function cell(text, cls) { return el("td", cls ? { class: cls } : {}, text); }

  function render() {
    const snap = state.snap;
    const rounds = state.rounds;
    document.title = `insitu: ${snap.title}`;
    $("title").textContent = snap.title;
    const last = rounds[rounds.length - 1];
    const status = $("status");
    if (snap.error) { status.textContent = `failed: ${snap.error}`; status.className = "badge bad"; }
    else if (snap.done) { status.textContent = `finished: ${rounds.length} round(s)` + (snap.stopped ? ` (stopped: ${snap.stopped})` : ""); status.className = "badge done"; }
    else { status.textContent = `running: round ${last ? last.round : 0} of ${snap.num_rounds ?? "?"}`; status.className = "badge"; }

    const acc = [...rounds].reverse().find((r) => isNum(r.accuracy));
    const loss = [...rounds].reverse().find((r) => isNum(r.loss));
    const eps = [...rounds].reverse().find((r) => isNum(r.epsilon));
    const totals = rounds.reduce((t, r) => { for (const k in r.failure_counts) t[k] = (t[k] || 0) + r.failure_counts[k]; return t; }, {});
    const cards = [card("round", last ? `${last.round} / ${snap.num_rounds ?? "?"}` : "–", "card-round"),
      card("accuracy", acc ? pct(acc.accuracy) : "–", "card-accuracy"), card("loss", loss ? num(loss.loss) : "–", "card-loss"),
      card("clients seen", String(snap.num_clients_seen), "card-clients"),
      card("failed / dropped / rejected", `${totals.failed || 0} / ${totals.dropped || 0} / ${totals.rejected || 0}`, "card-failures")];
    if (eps) cards.splice(3, 0, card("ε spent", num(eps.epsilon, 3), "card-epsilon"));
    if (snap.live) cards.push(card("connected / in flight", `${snap.live.num_connected ?? 0} / ${snap.live.in_flight ?? 0}`, "card-live"));
    $("cards").replaceChildren(...cards);

    const start = snap.initial ? [[0, snap.initial]] : [];
    const series = (key, scale = 1) => start.concat(rounds.map((r) => [r.round, r])).map(([x, r]) => [x, isNum(r[key]) ? r[key] * scale : null]);
    lineChart($("chart-accuracy"), [{ name: "accuracy", points: series("accuracy", 100) }], { label: "accuracy per round", integerX: true });
    lineChart($("chart-loss"), [{ name: "loss", points: series("loss"), color: COLORS[1] }], { label: "loss per round", integerX: true });
    $("fig-epsilon").hidden = !eps;
    if (eps) lineChart($("chart-epsilon"), [{ name: "epsilon", points: rounds.map((r) => [r.round, r.epsilon]), color: COLORS[4] }], { label: "epsilon", yMin: 0, integerX: true });
    lineChart($("chart-clients"), [
      { name: "selected", points: rounds.map((r) => [r.round, r.withheld ? null : r.selected]) },
      { name: "results", points: rounds.map((r) => [r.round, r.withheld ? null : r.results]), color: COLORS[2] },
      { name: "failures", points: rounds.map((r) => [r.round, r.withheld ? null : r.num_failures]), color: COLORS[1] }],
    { label: "clients per round", yMin: 0, integerX: true });
    lineChart($("chart-time"), [{ name: "round time", points: rounds.map((r) => [r.round, r.timings.total_s]) }], { label: "round time", yMin: 0, integerX: true });
    const systems = (snap.config || []).some(([k, v]) => ["speed_sigma", "latency", "dropout", "straggler_fraction"].includes(k) && parseFloat(v) > 0);
    $("fig-clock").hidden = !systems;
    if (systems) lineChart($("chart-clock"), [{ name: "clock", points: rounds.map((r) => [r.round, r.timings.clock_s]), color: COLORS[3] }], { label: "simulated clock", yMin: 0, integerX: true });
    const fair = rounds.filter((r) => r.fairness);
    $("fig-fairness").hidden = !fair.length;
    $("fairness-section").hidden = !snap.fairness;
    if (fair.length) {
      lineChart($("chart-fairness"), [{ name: "mean", points: fair.map((r) => [r.round, 100 * r.fairness.mean]) },
        { name: "worst 10%", points: fair.map((r) => [r.round, 100 * r.fairness.worst10]), color: COLORS[1] }], { label: "per-client accuracy", integerX: true });
    }
    if (snap.fairness) {
      const f = snap.fairness;
      $("fairness").textContent = `Round ${f.round}, ${f.clients} client(s) evaluated: mean ${pct(f.mean)}, worst 10% ${pct(f.worst10)}, std ${pct(f.std)}`;
    }

    $("privacy-section").hidden = !snap.privacy;
    if (snap.privacy) {
      const p = snap.privacy, rows = [];
      if (p.mode) rows.push(["DP", p.mode], ["ε spent", num(p.epsilon, 3)], ["δ", String(p.delta)], ["noise multiplier", String(p.noise_multiplier)],
        ["clip", String(p.clip) + (p.adaptive_clip ? ` (adaptive, now ${num(p.final_clip, 3)})` : "")], ["target ε", p.target_epsilon ?? "none"], ["accountant", p.accountant]);
      if (p.local) rows.push(["local DP noise multiplier", String(p.local.noise_multiplier)], ["local DP clip", String(p.local.clip)]);
      $("privacy").tBodies[0].replaceChildren(...rows.map(([k, v]) => el("tr", {}, cell(k), cell(v))));
    }

    const roundRows = rounds.slice(-500).reverse().map((r) => el("tr", { "data-round": r.round, class: r.status === "ok" ? "" : "failed" },
      cell(r.round, "num"), cell(r.status === "ok" ? "ok" : `failed: ${r.error || ""}`, "reason"), cell(pct(r.accuracy), "num acc"),
      cell(num(r.loss), "num loss"), cell(num(r.epsilon, 3), "num eps"), cell(r.withheld ? "withheld" : r.selected, "num"),
      cell(r.withheld ? "–" : r.results, "num"), cell(r.failure_counts.failed, "num"), cell(r.failure_counts.dropped, "num"),
      cell(r.failure_counts.rejected, "num"), cell(num(r.timings.total_s, 2), "num"), cell(num(r.timings.clock_s, 1), "num")));
    $("rounds").tBodies[0].replaceChildren(...roundRows);

    $("clients-count").textContent = snap.clients.length < snap.num_clients_seen ? `(${snap.clients.length} of ${snap.num_clients_seen} shown)` : `(${snap.num_clients_seen})`;
    $("clients").tBodies[0].replaceChildren(...snap.clients.map((c) => el("tr", { "data-client": c.client },
      cell(c.client, "client"), cell(c.selected, "num"), cell(c.finished, "num"), cell(c.failed, "num"), cell(c.dropped, "num"),
      cell(c.rejected, "num"), cell(pct(c.accuracy), "num"), cell(c.last_problem || "", "reason"))));

    const failures = rounds.flatMap((r) => r.failures.map((f) => [r.round, f])).slice(-300).reverse();
    $("failures").tBodies[0].replaceChildren(...failures.map(([round, f]) => el("tr", {}, cell(round, "num"), cell(f.client, "client"),
      cell(f.stage), cell(f.kind), cell(f.reason, "reason"))));

    $("live-section").hidden = !(snap.live || (snap.events && snap.events.length));
    if (snap.live) {
      $("live-summary").textContent = `${snap.live.num_connected ?? 0} client(s) connected, ${snap.live.in_flight ?? 0} task(s) in flight` + (snap.live.error ? ` (${snap.live.error})` : "");
      $("live-connected").textContent = (snap.live.connected || []).join(", ") || "none";
    } else if (snap.done) {
      $("live-summary").textContent = "the run has ended";
    }
    $("events").tBodies[0].replaceChildren(...(snap.events || []).slice().reverse().map((e) => el("tr", {},
      cell(new Date(e.time * 1000).toLocaleTimeString()), cell(e.client, "client"), cell(e.event), cell(e.detail, "reason"))));

    $("config").tBodies[0].replaceChildren(...(snap.config || []).map(([k, v]) => el("tr", {}, cell(k), cell(v))));
  }

  function receive(snap) {
    if (snap.rounds_from === 0) state.rounds = [];
    if (snap.rounds_from === state.rounds.length) for (const r of snap.rounds) state.rounds.push(r);
    state.snap = snap;
    render();
    if (snap.done) {
      state.done = true;
      state.source.close();
    }
  }

  function connect() {
    state.source = new EventSource("events");
    state.source.onmessage = (event) => receive(JSON.parse(event.data));
    state.source.onerror = () => {
      if (state.done) return;
      const status = $("status");
      status.textContent = "connection lost: the run or server may have stopped (retrying)";
      status.className = "badge bad";
    };
  }

  connect();
})();
