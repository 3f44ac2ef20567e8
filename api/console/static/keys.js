/* Keys page: the tenant's API keys (GET /api/v1/keys), a new one (POST, its plaintext shown once) and revoking
   one (DELETE /api/v1/keys/{id}). Revoking the key this tab signed in with signs the tab out at its next request. */
"use strict";

(() => {
  const { $, el, api, attempt, formatTime } = Loom;

  function keyRow(key) {
    const status = key.revoked_at ? `revoked ${formatTime(key.revoked_at)}` : "active";
    const actions = el("td");
    if (!key.revoked_at) {
      actions.append(el("button", {
        type: "button", class: "danger", text: "Revoke", "aria-label": `Revoke key ${key.name} (${key.prefix})`,
        onclick: () => attempt(async () => {
          if (!window.confirm(`Revoke key ${key.name} (${key.prefix}…)? Requests with it will fail.`)) return;
          await api("DELETE", `/api/v1/keys/${encodeURIComponent(key.id)}`);
          await loadKeys();
        }),
      }));
    }
    return el("tr", { "data-key": key.prefix },
      el("td", { text: key.name }),
      el("td", {}, el("code", { text: `${key.prefix}…` })),
      el("td", { text: formatTime(key.created_at) }),
      el("td", { text: status }),
      actions);
  }

  async function loadKeys() {
    const answer = await api("GET", "/api/v1/keys");
    $("#keys-table tbody").replaceChildren(...answer.keys.map(keyRow));
  }

  Loom.onSignedIn(() => {
    $("#create-key-form").addEventListener("submit", (event) => {
      event.preventDefault();
      attempt(async () => {
        const created = await api("POST", "/api/v1/keys", { name: $("#key-name").value.trim() });
        $("#key-name").value = "";
        $("#new-key-value").value = created.api_key;
        $("#new-key").hidden = false;
        $("#new-key-value").focus();
        $("#new-key-value").select();
        await loadKeys();
      });
    });
    $("#copy-new-key").addEventListener("click", async (event) => {
      try {
        await navigator.clipboard.writeText($("#new-key-value").value);
        event.target.textContent = "Copied";
      } catch {
        $("#new-key-value").select();
        event.target.textContent = "Press Ctrl+C to copy";
      }
    });
    attempt(loadKeys);
  });
})();
