/* Aliases page: the tenant's aliases (GET /api/v1/aliases), set or re-point one (PUT /api/v1/aliases/{name} with a
   checkpoint from GET /api/v1/checkpoints, the newest 1000), delete one, chat with one in the playground. */
"use strict";

(() => {
  const { $, el, api, attempt, formatTime } = Loom;

  function aliasUrl(name) {
    return `/api/v1/aliases/${name.split("/").map(encodeURIComponent).join("/")}`;
  }

  function aliasRow(alias) {
    return el("tr", { "data-alias": alias.name },
      el("td", {}, el("code", { text: alias.name })),
      el("td", {}, el("code", { text: alias.tinker_path })),
      el("td", { text: formatTime(alias.updated_at) }),
      el("td", { class: "actions" },
        el("a", {
          class: "button", href: `/console/playground?model=${encodeURIComponent(alias.name)}`, text: "Chat",
          "aria-label": `Chat with ${alias.name}`,
        }),
        el("button", {
          type: "button", text: "Re-point", "aria-label": `Re-point ${alias.name}`,
          onclick: () => { $("#alias-name").value = alias.name; $("#alias-target").focus(); },
        }),
        el("button", {
          type: "button", class: "danger", text: "Delete", "aria-label": `Delete alias ${alias.name}`,
          onclick: () => attempt(async () => {
            if (!window.confirm(`Delete alias ${alias.name}? The checkpoint stays.`)) return;
            await api("DELETE", aliasUrl(alias.name));
            await loadAliases();
          }),
        })));
  }

  async function loadAliases() {
    const answer = await api("GET", "/api/v1/aliases");
    $("#aliases-table tbody").replaceChildren(...answer.aliases.map(aliasRow));
    $("#aliases-empty").hidden = answer.aliases.length > 0;
  }

  async function loadCheckpoints() {
    const answer = await api("GET", "/api/v1/checkpoints?limit=1000");
    $("#alias-target").replaceChildren(...answer.checkpoints.map((c) =>
      el("option", { value: c.tinker_path, text: `${c.tinker_path} (${formatTime(c.time)})` })));
  }

  Loom.onSignedIn(() => {
    $("#alias-form").addEventListener("submit", (event) => {
      event.preventDefault();
      attempt(async () => {
        await api("PUT", aliasUrl($("#alias-name").value.trim()), { tinker_path: $("#alias-target").value });
        await loadAliases();
      });
    });
    attempt(loadCheckpoints);
    attempt(loadAliases);
  });
})();
