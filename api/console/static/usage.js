/* Usage page: the tenant's tokens trained and sampled, checkpoints saved and bytes stored per training run
   (GET /api/v1/billing/usage/runs), per API key (the rows of GET /api/v1/usage/report summed per key) and per
   session and base model (GET /api/v1/billing/usage/events), in a window of whole UTC hours (at most 14 days)
   ending at the next one, the checkpoint bytes stored now per project (GET /api/v1/billing/usage/checkpoints/current),
   CSVs of the runs and of the hourly events, made here, and the report's CSV (per hour, key and run), made by the
   server. */
"use strict";

(() => {
  const { $, el, api, attempt, formatNumber, formatBytes, saveBlob } = Loom;
  const HOUR_MS = 3600 * 1000;
  const COLUMNS = ["training", "sampling_prefill", "sampling_prefill_cached", "sampling_sample", "checkpoint"];
  const RUN_COLUMNS = [
    "training_tokens", "sampling_prefill_tokens", "sampling_prefill_cached_tokens", "sampling_sample_tokens",
    "checkpoints_saved", "stored_bytes",
  ];
  const KEY_COLUMNS = ["tokens_trained", "tokens_prompt", "tokens_generated", "requests"];
  const RUNS_SHOWN = 100; /* the table shows the runs that trained most; the runs CSV has every one */
  let events = [];
  let runs = [];

  /* The query of the chosen window, [start, end) in whole UTC hours, with the route's names for its ends. */
  function windowQuery(startName = "starting_on", endName = "ending_before") {
    const hours = Number($("#usage-window").value);
    const end = new Date(Math.floor(Date.now() / HOUR_MS) * HOUR_MS + HOUR_MS);
    const start = new Date(end.getTime() - hours * HOUR_MS);
    const iso = (d) => encodeURIComponent(d.toISOString().replace(".000Z", "Z"));
    return `${startName}=${iso(start)}&${endName}=${iso(end)}`;
  }

  /* The report's rows summed per API key (storage rows have none), keys that used nothing left out. */
  function perKey(rows) {
    const keys = new Map();
    for (const row of rows) {
      const id = row.api_key_id || "";
      if (!keys.has(id)) {
        keys.set(id, { name: row.api_key_name || "(no key)", prefix: row.api_key_prefix || "",
          ...Object.fromEntries(KEY_COLUMNS.map((c) => [c, 0])) });
      }
      for (const c of KEY_COLUMNS) keys.get(id)[c] += row[c];
    }
    return [...keys.values()].filter((key) => KEY_COLUMNS.some((c) => key[c] > 0));
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
      ...COLUMNS.map((c) => el("td", { class: "number", text: formatNumber(row[c]) })))));
    $("#usage-empty").hidden = rows.length > 0;
    $("#storage-gbh").textContent = storage.toPrecision(3);
  }

  async function load() {
    const [usage, perRun, report, stored] = await Promise.all([
      api("GET", `/api/v1/billing/usage/events?${windowQuery()}`),
      api("GET", `/api/v1/billing/usage/runs?${windowQuery()}`),
      api("GET", `/api/v1/usage/report?${windowQuery("start", "end")}&per=window`),
      api("GET", "/api/v1/billing/usage/checkpoints/current"),
    ]);
    events = usage.data;
    runs = perRun.runs;
    render();
    $("#runs-usage-table tbody").replaceChildren(...runs.slice(0, RUNS_SHOWN).map((run) => el("tr", {
      "data-run": run.training_run_id },
      el("td", {}, el("code", { text: run.training_run_id })), el("td", { text: run.base_model }),
      ...RUN_COLUMNS.map((c) => el("td", { class: "number", text: formatNumber(run[c]) })))));
    $("#runs-usage-empty").hidden = runs.length > 0;
    $("#runs-usage-more").hidden = runs.length <= RUNS_SHOWN;
    $("#runs-usage-more").textContent = `The ${RUNS_SHOWN} runs that trained most of ${formatNumber(runs.length)}: `
      + "the runs CSV has every one.";
    const keys = perKey(report.rows);
    $("#keys-usage-table tbody").replaceChildren(...keys.map((key) => el("tr", { "data-key": key.prefix },
      el("td", { text: key.name }), el("td", {}, el("code", { text: key.prefix ? `${key.prefix}…` : "" })),
      ...KEY_COLUMNS.map((c) => el("td", { class: "number", text: formatNumber(key[c]) })))));
    $("#keys-usage-empty").hidden = keys.length > 0;
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
    saveBlob(new Blob([lines.join("\n") + "\n"], { type: "text/csv" }), name);
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
    $("#report-csv").addEventListener("click", () => attempt(() => Loom.fetchFile(
      `/api/v1/usage/report?${windowQuery("start", "end")}&format=csv`, "loom-usage-report.csv")));
    attempt(load);
  });
})();
