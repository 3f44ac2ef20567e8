/* Usage page: the tenant's tokens trained and sampled, checkpoints saved and bytes stored per training run
   (GET /api/v1/billing/usage/runs) and per session and base model (GET /api/v1/billing/usage/events), in a window
   of whole UTC hours (at most 14 days), the checkpoint bytes stored now per project
   (GET /api/v1/billing/usage/checkpoints/current), and CSVs of the runs and of the hourly events, made here. */
"use strict";

(() => {
  const { $, el, api, attempt, formatBytes } = Loom;
  const HOUR_MS = 3600 * 1000;
  const COLUMNS = ["training", "sampling_prefill", "sampling_prefill_cached", "sampling_sample", "checkpoint"];
  const RUN_COLUMNS = [
    "training_tokens", "sampling_prefill_tokens", "sampling_prefill_cached_tokens", "sampling_sample_tokens",
    "checkpoints_saved", "stored_bytes",
  ];
  let events = [];
  let runs = [];

  function windowQuery(hours) {
    const end = new Date(Math.floor(Date.now() / HOUR_MS) * HOUR_MS + HOUR_MS);
    const start = new Date(end.getTime() - hours * HOUR_MS);
    const iso = (d) => d.toISOString().replace(".000Z", "Z");
    return `starting_on=${encodeURIComponent(iso(start))}&ending_before=${encodeURIComponent(iso(end))}`;
  }

  function column(info) {
    if (info.type === "sampling_prefill" && info.cached) return "sampling_prefill_cached";
    return info.type;
  }

  function quantity(info) {
    return info.type === "checkpoint" ? info.count : info.type === "storage" ? info.gigabyte_hours : info.token_count;
  }

  function totals() {
    const rows = new Map();
    let storage = 0;
    for (const event of events) {
      const info = event.event_info;
      if (info.type === "storage") { storage += info.gigabyte_hours; continue; }
      const key = `${event.session_id || ""}\u0000${event.base_model || ""}`;
      if (!rows.has(key)) {
        rows.set(key, { session: event.session_id || "(none)", project: event.project_id || "",
          model: event.base_model || "", ...Object.fromEntries(COLUMNS.map((c) => [c, 0])) });
      }
      rows.get(key)[column(info)] += quantity(info);
    }
    return { rows: [...rows.values()], storage };
  }

  function render() {
    const { rows, storage } = totals();
    $("#usage-table tbody").replaceChildren(...rows.map((row) => el("tr", {},
      el("td", {}, el("code", { text: row.session })), el("td", { text: row.project }), el("td", { text: row.model }),
      ...COLUMNS.map((c) => el("td", { class: "number", text: row[c].toLocaleString() })))));
    $("#usage-empty").hidden = rows.length > 0;
    $("#storage-gbh").textContent = storage.toPrecision(3);
  }

  async function load() {
    const hours = Number($("#usage-window").value);
    const [usage, perRun, stored] = await Promise.all([
      api("GET", `/api/v1/billing/usage/events?${windowQuery(hours)}`),
      api("GET", `/api/v1/billing/usage/runs?${windowQuery(hours)}`),
      api("GET", "/api/v1/billing/usage/checkpoints/current"),
    ]);
    events = usage.data;
    runs = perRun.runs;
    render();
    $("#runs-usage-table tbody").replaceChildren(...runs.map((run) => el("tr", { "data-run": run.training_run_id },
      el("td", {}, el("code", { text: run.training_run_id })), el("td", { text: run.base_model }),
      ...RUN_COLUMNS.map((c) => el("td", { class: "number", text: run[c].toLocaleString() })))));
    $("#runs-usage-empty").hidden = runs.length > 0;
    $("#storage-table tbody").replaceChildren(...stored.data.map((item) => el("tr", {},
      el("td", { text: item.project_id || "(none)" }), el("td", { class: "number", text: item.checkpoint_count }),
      el("td", { class: "number", text: `${item.size_bytes} (${formatBytes(item.size_bytes)})` }))));
  }

  function csvCell(value) {
    const text = value === null || value === undefined ? "" : String(value);
    return /[",\n]/.test(text) ? `"${text.replace(/"/g, '""')}"` : text;
  }

  function download(name, header, rows) {
    const lines = [header, ...rows].map((row) => row.map(csvCell).join(","));
    const blob = new Blob([lines.join("\n") + "\n"], { type: "text/csv" });
    const link = el("a", { href: URL.createObjectURL(blob), download: name });
    document.body.append(link);
    link.click();
    link.remove();
  }

  function exportEvents() {
    const header = [
      "bucket_start", "bucket_end", "session_id", "project_id", "base_model", "type", "cached", "quantity",
    ];
    download("loom-usage-hourly.csv", header, events.map((e) => [e.bucket_start, e.bucket_end, e.session_id,
      e.project_id, e.base_model, e.event_info.type, e.event_info.cached ?? "", quantity(e.event_info)]));
  }

  function exportRuns() {
    const header = ["training_run_id", "base_model", "session_id", ...RUN_COLUMNS];
    download("loom-usage-runs.csv", header, runs.map((run) => header.map((c) => run[c])));
  }

  Loom.onSignedIn(() => {
    $("#usage-window").addEventListener("change", () => attempt(load));
    $("#usage-csv").addEventListener("click", exportEvents);
    $("#runs-csv").addEventListener("click", exportRuns);
    attempt(load);
  });
})();
