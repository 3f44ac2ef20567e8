/* Queue page: the tenant's pending and running requests with how many are ahead of each, the live workers and the
   served base models (GET /api/v1/queue), and the tenant's rate limits and quotas with its use now
   (GET /api/v1/limits), refreshed every three seconds while signed in. Limits: the route's first 100 requests. */
"use strict";

(() => {
  const { $, el, api, attempt, formatNumber, formatBytes, formatTime } = Loom;
  const POLL_MS = 3000;
  const LIMITS = [
    ["requests_per_minute", "Requests per minute", formatNumber],
    ["tokens_per_minute", "Tokens per minute", formatNumber],
    ["concurrent_runs", "Concurrent training runs", formatNumber],
    ["stored_bytes", "Checkpoint bytes stored", (n) => `${formatNumber(n)} (${formatBytes(n)})`],
  ];

  function requestRow(r) {
    return el("tr", { "data-request": r.request_id },
      el("td", {}, el("code", { text: r.request_id })), el("td", { text: r.kind }),
      el("td", {}, el("code", { text: r.model_id || "" })), el("td", { text: r.base_model }),
      el("td", { text: r.state === "leased" ? "running" : "queued" }),
      el("td", { class: "number", text: formatNumber(r.ahead) }),
      el("td", { text: formatTime(r.created_at) }), el("td", { text: formatTime(r.started_at) }));
  }

  /* A rate (`reset_seconds` set) or quota of GET /api/v1/limits; a rate without a limit is absent (null). */
  function limitRow([field, label, format], use) {
    const limited = use && use.limit !== null && use.limit !== undefined;
    const reset = use && use.reset_seconds !== undefined ? `in ${Math.ceil(use.reset_seconds)} s` : "";
    return el("tr", { "data-limit": field },
      el("th", { scope: "row", text: label }),
      el("td", { class: "number", text: use ? format(use.used) : "—" }),  /* an unlimited rate is not counted */
      el("td", { class: "number", text: limited ? format(use.limit) : "no limit" }),
      el("td", { text: limited ? reset : "" }));
  }

  function workerRow(w) {
    return el("tr", { "data-worker": w.id },
      el("td", {}, el("code", { text: w.id })), el("td", { text: w.role }),
      el("td", { text: w.base_models.join(", ") }), el("td", { text: formatTime(w.started_at) }),
      el("td", { text: w.heartbeat_at ? formatTime(w.heartbeat_at) : "— (inside the API process)" }));
  }

  async function load() {
    const [queue, limits] = await Promise.all([api("GET", "/api/v1/queue"), api("GET", "/api/v1/limits")]);
    $("#queue-table tbody").replaceChildren(...queue.requests.map(requestRow));
    $("#queue-empty").hidden = queue.requests.length > 0;
    $("#limits-table tbody").replaceChildren(...LIMITS.map((limit) => limitRow(limit, limits[limit[0]])));
    $("#workers-table tbody").replaceChildren(...queue.workers.map(workerRow));
    $("#workers-empty").hidden = queue.workers.length > 0;
    $("#base-models").replaceChildren(...queue.base_models.map((name) => el("li", {}, el("code", { text: name }))));
  }

  async function tick() {
    if (Loom.signedIn()) await attempt(load, { clear: false });
    setTimeout(tick, POLL_MS);
  }

  Loom.onSignedIn(() => {
    attempt(load).then(() => setTimeout(tick, POLL_MS));
  });
})();
