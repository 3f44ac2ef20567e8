/* Usage page: the tenant's tokens trained and sampled and checkpoints saved per session and base model, from the
   billing usage route (GET /api/v1/billing/usage/events, whole UTC hours, at most 14 days), the checkpoint bytes
   stored now (GET /api/v1/billing/usage/checkpoints/current), and a CSV of the hourly events made in the browser. */
"use strict";

(() => {
  const { $, el, api, attempt, formatBytes } = Loom;
  const HOUR_MS = 3600 * 1000;
  const COLUMNS = ["training", "sampling_prefill", "sampling_prefill_cached", "sampling_sample", "checkpoint"];
  let events = [];

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
    const [usage, stored] = await Promise.all([
      api("GET", `/api/v1/billing/usage/events?${windowQuery(hours)}`),
      api("GET", "/api/v1/billing/usage/checkpoints/current"),
    ]);
    events = usage.data;
    render();
    $("#storage-table tbody").replaceChildren(...stored.data.map((item) => el("tr", {},
      el("td", { text: item.project_id || "(none)" }), el("td", { class: "number", text: item.checkpoint_count }),
      el("td", { class: "number", text: `${item.size_bytes} (${formatBytes(item.size_bytes)})` }))));
  }

  function csvCell(value) {
    const text = value === null || value === undefined ? "" : String(value);
    return /[",\n]/.test(text) ? `"${text.replace(/"/g, '""')}"` : text;
  }

  function exportCsv() {
    const header = [
      "bucket_start", "bucket_end", "session_id", "project_id", "base_model", "type", "cached", "quantity",
    ];
    const lines = events.map((e) => [e.bucket_start, e.bucket_end, e.session_id, e.project_id, e.base_model,
      e.event_info.type, e.event_info.cached ?? "", quantity(e.event_info)].map(csvCell).join(","));
    const blob = new Blob([[header.join(","), ...lines].join("\n") + "\n"], { type: "text/csv" });
    const link = el("a", { href: URL.createObjectURL(blob), download: "loom-usage.csv" });
    document.body.append(link);
    link.click();
    link.remove();
  }

  Loom.onSignedIn(() => {
    $("#usage-window").addEventListener("change", () => attempt(load));
    $("#usage-csv").addEventListener("click", exportCsv);
    attempt(load);
  });
})();
