/* Loom console core: sign-in with an API key (kept in sessionStorage), the REST helper every page uses, and small
   DOM helpers. Every request goes to the same REST routes the SDKs call, with the key in X-API-Key; a 401 signs
   the tab out with a message. A page script registers its start function with Loom.onSignedIn(fn); Loom.stream
   reads a route's server-sent events (the OpenAI-compatible chat); Loom.fetchFile saves what a route answers as a
   file (the key goes in the header, never in a URL). Navigation links marked data-operators-only (the tenants
   page) are shown once GET /api/v1/admin/tenants/{own tenant} answers 200 for the signed-in key (a tenant that is
   not an operator gets 403); asked once per sign-in, so a role changed meanwhile shows at the next sign-in. */
"use strict";

const Loom = (() => {
  const KEY = "loom.apiKey";
  const OPERATOR = "loom.operator"; /* "true" or "false" once asked for the signed-in key */
  const starters = [];
  let started = false;

  class ApiError extends Error {
    constructor(status, code, message) {
      super(message);
      this.status = status;
      this.code = code;
    }
  }

  function $(selector) {
    return document.querySelector(selector);
  }

  /* el("td", {class: "x", text: "hi"}, child...) */
  function el(tag, attrs = {}, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs)) {
      if (value === undefined || value === null || value === false) continue;
      if (name === "text") node.textContent = value;
      else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
      else node.setAttribute(name, value === true ? "" : value);
    }
    for (const child of children) node.append(child);
    return node;
  }

  const numbers = new Intl.NumberFormat();

  /* A count with the reader's digit grouping (one formatter for every table cell: toLocaleString builds one each). */
  function formatNumber(n) {
    return n === null || n === undefined ? "" : numbers.format(n);
  }

  function formatBytes(n) {
    if (n === null || n === undefined) return "";
    const units = ["B", "KB", "MB", "GB", "TB"];
    let i = 0;
    while (n >= 1000 && i < units.length - 1) { n /= 1000; i++; }
    return `${i === 0 ? n : n.toFixed(1)} ${units[i]}`;
  }

  function formatTime(iso) {
    return iso ? new Date(iso).toLocaleString() : "";
  }

  function showError(message) {
    $("#page-error").textContent = message || "";
  }

  function signOut(message) {
    sessionStorage.removeItem(KEY);
    sessionStorage.removeItem(OPERATOR);
    $("#page").hidden = true;
    $("#sign-out").hidden = true;
    $("#whoami").textContent = "";
    $("#signin").hidden = false;
    $("#signin-error").textContent = message || "";
    $("#api-key").focus();
  }

  async function api(method, path, body) {
    const key = sessionStorage.getItem(KEY);
    const headers = { "X-API-Key": key || "" };
    if (body !== undefined) headers["Content-Type"] = "application/json";
    const response = await fetch(path, {
      method, headers, body: body === undefined ? undefined : JSON.stringify(body),
    });
    if (response.status === 204) return null;
    if (!response.ok) throw await failure(response, method, path);
    return response.json();
  }

  /* The ApiError of a refused request (a 401 also signs the tab out). */
  async function failure(response, method, path) {
    const data = await response.json().catch(() => null);
    const error = (data && data.error) || {};
    if (response.status === 401) {
      signOut("This API key is invalid or has been revoked. Sign in with a valid key.");
    }
    return new ApiError(response.status, error.code, error.message || `${method} ${path} answered ${response.status}`);
  }

  /* Saves `blob` as a file named `name` through a temporary link (the browser's own download). */
  function saveBlob(blob, name) {
    const link = el("a", { href: URL.createObjectURL(blob), download: name });
    document.body.append(link);
    link.click();
    link.remove();
  }

  /* GETs `path` with the key and saves the answer as a file, named as its Content-Disposition says or `name`. */
  async function fetchFile(path, name) {
    const response = await fetch(path, { headers: { "X-API-Key": sessionStorage.getItem(KEY) || "" } });
    if (!response.ok) throw await failure(response, "GET", path);
    const named = /filename="([^"]+)"/.exec(response.headers.get("Content-Disposition") || "");
    saveBlob(await response.blob(), named ? named[1] : name);
  }

  /* POSTs `body` and calls onEvent(json) for each server-sent `data:` event until `[DONE]`. */
  async function stream(path, body, onEvent) {
    const response = await fetch(path, {
      method: "POST",
      headers: { "X-API-Key": sessionStorage.getItem(KEY) || "", "Content-Type": "application/json" },
      body: JSON.stringify(body),
    });
    if (!response.ok) throw await failure(response, "POST", path);
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffered = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffered += value;
      const events = buffered.split("\n\n");
      buffered = events.pop();
      for (const event of events) {
        const data = event.split("\n").filter((line) => line.startsWith("data: "))
          .map((line) => line.slice(6)).join("");
        if (data === "[DONE]") return;
        if (data) onEvent(JSON.parse(data));
      }
    }
  }

  /* Runs `task`, showing its failure (other than a sign-out) above the page; a user's action (`clear`) first clears
     the last message, a background refresh leaves it. */
  async function attempt(task, { clear = true } = {}) {
    try {
      if (clear) showError("");
      return await task();
    } catch (error) {
      if (!(error instanceof ApiError && error.status === 401)) showError(error.message);
      return undefined;
    }
  }

  async function enter() {
    const me = await api("GET", "/api/v1/auth/apikey/me");
    $("#signin").hidden = true;
    $("#page").hidden = false;
    $("#sign-out").hidden = false;
    $("#whoami").textContent = `${me.tenant} · ${me.name} (${me.prefix}…)`;
    if (!started) {
      started = true;
      for (const start of starters) start();
      revealOperatorPages(me.tenant);
    }
  }

  /* Shows the operators' navigation links if this key may manage tenants (any failure leaves them hidden), and
     records the answer as the body's data-operator. A 200 or 403 is kept in the tab until the next sign-in. */
  async function revealOperatorPages(tenant) {
    if (!sessionStorage.getItem(OPERATOR)) {
      const path = `/api/v1/admin/tenants/${encodeURIComponent(tenant)}`;
      const answer = await api("GET", path).then(() => "true", (error) => (error.status === 403 ? "false" : null));
      if (answer) sessionStorage.setItem(OPERATOR, answer);
    }
    const operator = sessionStorage.getItem(OPERATOR) === "true";
    for (const link of document.querySelectorAll("[data-operators-only]")) link.hidden = !operator;
    document.body.dataset.operator = String(operator);
  }

  /* Enters with the stored key; a refused key has already signed out with its message (see api). */
  async function resume() {
    await enter().catch((error) => {
      if (error.status !== 401) signOut(error.message);
    });
  }

  function signedIn() {
    return Boolean(sessionStorage.getItem(KEY));
  }

  function onSignedIn(start) {
    starters.push(start);
  }

  document.addEventListener("DOMContentLoaded", () => {
    $("#signin-form").addEventListener("submit", async (event) => {
      event.preventDefault();
      sessionStorage.setItem(KEY, $("#api-key").value.trim());
      sessionStorage.removeItem(OPERATOR);
      $("#api-key").value = "";
      if (started) {  /* signed in before in this page: start afresh, nothing of the last key's data stays */
        window.location.reload();
        return;
      }
      await resume();
      if (!$("#page").hidden) $("#main").focus();
    });
    $("#sign-out").addEventListener("click", () => signOut("Signed out."));
    if (sessionStorage.getItem(KEY)) resume();
    else signOut("");
  });

  return {
    $, el, api, stream, fetchFile, saveBlob, attempt, formatNumber, formatBytes, formatTime, onSignedIn, signedIn,
  };
})();
