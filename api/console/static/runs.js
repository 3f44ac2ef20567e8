/* Runs page: the tenant's training runs (GET /api/v1/training_runs), the metrics of the ticked runs plotted with
   uPlot (GET /api/v1/training_runs/{id}/metrics, polled every two seconds; x = step or time, one chart per metric,
   runs overlaid, optional exponential smoothing), and one run's checkpoints (list, copy path, download exported
   weights through their signed links, publish/unpublish, delete, chat with it in the playground). */
"use strict";

(() => {
  const { $, el, api, attempt, formatBytes, formatTime } = Loom;
  const POLL_MS = 2000;
  const RUNS_EVERY = 5; /* polls between run list refreshes */
  const RUNS_PAGE = 100;
  const MAX_SHOWN = 1000; /* the route's largest page */
  const COLORS = ["#1f5fbf", "#c2410c", "#15803d", "#7e22ce", "#b91c1c", "#0e7490", "#a16207", "#4338ca"];
  const STEP_INCREMENTS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000];
  const selected = new Set();
  const metrics = new Map(); /* run id -> points */
  const charts = new Map(); /* metric name -> {figure, plot, signature} */
  let polls = 0;
  let shown = RUNS_PAGE; /* newest runs listed; "More runs" adds a page */

  function color(runId) {
    const runs = [...selected];
    return COLORS[runs.indexOf(runId) % COLORS.length];
  }

  function restUrl(tinkerPath) {
    const [runId, ...checkpoint] = tinkerPath.replace("tinker://", "").split("/");
    const segments = checkpoint.map(encodeURIComponent).join("/");
    return `/api/v1/training_runs/${encodeURIComponent(runId)}/checkpoints/${segments}`;
  }

  function runRow(run) {
    const id = run.training_run_id;
    const box = el("input", {
      type: "checkbox", id: `plot-${id}`, checked: selected.has(id),
      onchange: (event) => { toggle(id, event.target.checked); },
    });
    return el("tr", { "data-run": id },
      el("td", {}, box, el("label", { for: `plot-${id}`, class: "visually-hidden", text: `Plot run ${id}` })),
      el("td", {}, el("code", { text: id })),
      el("td", { text: run.base_model }),
      el("td", { text: run.lora_rank ?? "" }),
      el("td", { text: formatTime(run.last_request_time) }),
      el("td", {}, el("button", {
        type: "button", text: "Checkpoints", "aria-label": `Checkpoints of run ${id}`,
        onclick: () => attempt(() => showCheckpoints(id)),
      })));
  }

  async function loadRuns() {
    const page = await api("GET", `/api/v1/training_runs?limit=${shown}`);
    const focused = document.activeElement && document.activeElement.id;
    $("#runs-table tbody").replaceChildren(...page.training_runs.map(runRow));
    if (focused && document.getElementById(focused)) document.getElementById(focused).focus();
    const total = page.cursor.total_count;
    $("#runs-empty").hidden = total > 0;
    const listed = page.training_runs.length;
    $("#runs-count").textContent = total > listed ? `Newest ${listed} of ${total} runs.` : "";
    $("#more-runs").hidden = total <= listed || shown >= MAX_SHOWN;
  }

  function toggle(runId, on) {
    if (on) selected.add(runId);
    else { selected.delete(runId); metrics.delete(runId); }
    attempt(pollMetrics);
  }

  function smooth(values, alpha) {
    let last = null;
    return values.map((v) => {
      if (v === null) return null;
      last = last === null ? v : alpha * last + (1 - alpha) * v;
      return last;
    });
  }

  /* A point's x: its step, or (x axis "time") when it finished, in unix seconds. */
  function xOf(point) {
    return $("#x-axis").value === "time" ? Date.parse(point.time) / 1000 : point.step;
  }

  function chartData(name) {
    const runs = [...selected].filter((id) => (metrics.get(id) || []).some((p) => name in p.metrics));
    const reported = runs.map((id) => metrics.get(id).filter((p) => name in p.metrics));
    const xs = [...new Set(reported.flatMap((points) => points.map(xOf)))].sort((a, b) => a - b);
    const alpha = Number($("#smoothing").value);
    const series = reported.map((points) => {
      const byX = new Map(points.map((p) => [xOf(p), p.metrics[name]]));
      return smooth(xs.map((x) => (byX.has(x) ? byX.get(x) : null)), alpha);
    });
    const steps = new Set(reported.flatMap((points) => points.map((p) => p.step))).size;
    const latest = runs.map((id, i) => {
      const last = reported[i][reported[i].length - 1];
      return `${id}: ${last.metrics[name].toPrecision(4)} at step ${last.step}`;
    });
    return { runs, steps, data: [xs, ...series], caption: `${name} — ${steps} steps; ${latest.join("; ")}` };
  }

  function drawChart(name) {
    const { runs, steps, data, caption } = chartData(name);
    const axis = $("#x-axis").value;
    const signature = `${axis} ${runs.join(" ")}`;
    let chart = charts.get(name);
    if (chart && chart.signature !== signature) {
      chart.plot.destroy();
      chart.figure.remove();
      charts.delete(name);
      chart = undefined;
    }
    if (!chart) {
      const figure = el("figure", { class: "chart", "data-metric": name });
      const figcaption = el("figcaption");
      figure.append(figcaption);
      $("#charts").append(figure);
      const width = Math.max(320, Math.min(560, $("#charts").clientWidth - 16));
      const plot = new uPlot({
        width, height: 220,
        scales: { x: { time: axis === "time" } },
        series: [{ label: axis }, ...runs.map((id) => ({ label: id, stroke: color(id), width: 2, spanGaps: true }))],
        axes: [
          axis === "time" ? { label: "time" } : { label: "step", incrs: STEP_INCREMENTS },
          { label: name, size: 64, values: (_, ticks) => ticks.map((v) => String(Number(v.toPrecision(3)))) },
        ],
      }, data, figure);
      chart = { figure, plot, signature };
      charts.set(name, chart);
    } else {
      chart.plot.setData(data);
    }
    chart.figure.dataset.steps = String(steps);
    chart.figure.querySelector("figcaption").textContent = caption;
  }

  function drawCharts() {
    const points = [...selected].flatMap((id) => metrics.get(id) || []);
    const names = new Set(points.flatMap((p) => Object.keys(p.metrics)));
    for (const [name, chart] of charts) {
      if (!names.has(name)) { chart.plot.destroy(); chart.figure.remove(); charts.delete(name); }
    }
    const ordered = [...names].sort((a, b) => (a.startsWith("loss") ? -1 : 0) - (b.startsWith("loss") ? -1 : 0)
      || a.localeCompare(b));
    ordered.forEach(drawChart);
    $("#charts").append(...ordered.map((name) => charts.get(name).figure)); /* keeps the order after a redraw */
    $("#charts-empty").textContent = selected.size ? "No finished training steps yet." : "No run selected.";
    $("#charts-empty").hidden = names.size > 0;
  }

  async function pollMetrics() {
    const runs = [...selected];
    const answers = await Promise.all(
      runs.map((id) => api("GET", `/api/v1/training_runs/${encodeURIComponent(id)}/metrics`)));
    answers.forEach((answer, i) => { if (selected.has(runs[i])) metrics.set(runs[i], answer.points); });
    drawCharts();
  }

  async function tick() {
    polls += 1;
    if (Loom.signedIn() && polls % RUNS_EVERY === 0) await attempt(loadRuns, { clear: false });
    if (Loom.signedIn() && selected.size) await attempt(pollMetrics, { clear: false });
    setTimeout(tick, POLL_MS);
  }

  function checkpointRow(runId, c) {
    const url = restUrl(c.tinker_path);
    const actions = el("td", { class: "actions" }, el("a", {
      class: "button", href: `/console/playground?model=${encodeURIComponent(c.tinker_path)}`, text: "Chat",
      "aria-label": `Chat with ${c.tinker_path}`,
    }));
    if (c.checkpoint_type === "external") {
      actions.append(el("button", {
        type: "button", text: "Download", "aria-label": `Download ${c.tinker_path}`,
        onclick: () => attempt(() => showDownloads(c.tinker_path, url)),
      }));
    }
    actions.append(el("button", {
      type: "button", text: c.public ? "Unpublish" : "Publish",
      "aria-label": `${c.public ? "Unpublish" : "Publish"} ${c.tinker_path}`,
      onclick: () => attempt(async () => {
        await api(c.public ? "DELETE" : "POST", `${url}/publish`);
        await showCheckpoints(runId);
      }),
    }));
    actions.append(el("button", {
      type: "button", class: "danger", text: "Delete", "aria-label": `Delete ${c.tinker_path}`,
      onclick: () => attempt(async () => {
        if (!window.confirm(`Delete ${c.tinker_path}? Its files are removed at once.`)) return;
        await api("DELETE", url);
        await showCheckpoints(runId);
      }),
    }));
    return el("tr", { "data-path": c.tinker_path },
      el("td", {}, el("code", { text: c.tinker_path }), " ", el("button", {
        type: "button", text: "Copy", "aria-label": `Copy ${c.tinker_path}`,
        onclick: (event) => copy(c.tinker_path, event.target),
      })),
      el("td", { text: c.checkpoint_type }),
      el("td", { text: formatBytes(c.size_bytes) }),
      el("td", { text: formatTime(c.time) }),
      el("td", { text: c.expires_at ? formatTime(c.expires_at) : "never" }),
      el("td", { text: c.public ? "yes" : "no" }),
      actions);
  }

  async function copy(text, button) {
    try {
      await navigator.clipboard.writeText(text);
      button.textContent = "Copied";
    } catch {
      button.textContent = "Select and copy the path";
    }
  }

  async function showCheckpoints(runId) {
    const answer = await api("GET", `/api/v1/training_runs/${encodeURIComponent(runId)}/checkpoints`);
    $("#checkpoints").hidden = false;
    $("#checkpoints-title").textContent = `Checkpoints of ${runId}`;
    $("#checkpoints-table tbody").replaceChildren(...answer.checkpoints.map((c) => checkpointRow(runId, c)));
    $("#checkpoints-empty").hidden = answer.checkpoints.length > 0;
    $("#downloads").replaceChildren();
    $("#checkpoints-title").scrollIntoView();
  }

  async function showDownloads(tinkerPath, url) {
    const answer = await api("GET", `${url}/external_weights_urls`);
    const links = Object.entries(answer.urls).map(([file, href]) =>
      el("li", {}, el("a", { href, download: file, text: file })));
    $("#downloads").replaceChildren(
      el("h3", { text: `Files of ${tinkerPath}` }),
      el("p", { class: "hint", text: `Links valid until ${formatTime(answer.expires)}.` }),
      el("ul", {}, ...links));
  }

  Loom.onSignedIn(() => {
    $("#x-axis").addEventListener("change", drawCharts);
    $("#smoothing").addEventListener("input", () => {
      $("#smoothing-value").textContent = $("#smoothing").value;
      drawCharts();
    });
    $("#more-runs").addEventListener("click", () => {
      shown = Math.min(MAX_SHOWN, shown + RUNS_PAGE);
      attempt(loadRuns);
    });
    attempt(loadRuns).then(tick);
  });
})();
