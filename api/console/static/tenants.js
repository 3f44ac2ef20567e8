/* Tenants page, for operators: every tenant with its own limits, live keys, live runs and bytes stored
   (GET /api/v1/admin/tenants), a new tenant with its first key shown once (POST), and a tenant's own limits changed
   (PATCH /api/v1/admin/tenants/{name}; an empty field sends null: the deployment's default). A key whose tenant is
   not an operator gets 403 there and sees only that the page is for operators. The operator role itself is changed
   with `loom tenants set`, not here. */
"use strict";

(() => {
  const { $, el, api, attempt, formatNumber, formatBytes } = Loom;
  const LIMITS = ["requests_per_minute", "tokens_per_minute", "concurrent_runs", "stored_bytes"];
  let editing = null;

  /* The limits typed in the form whose inputs are named `${prefix}-${limit}`: an empty one is null. */
  function limitsOf(prefix) {
    return Object.fromEntries(LIMITS.map((name) => {
      const value = $(`#${prefix}-${name}`).value.trim();
      return [name, value === "" ? null : Number(value)];
    }));
  }

  function edit(tenant) {
    editing = tenant.name;
    $("#edit-tenant-name").textContent = tenant.name;
    for (const name of LIMITS) $(`#edit-${name}`).value = tenant.limits[name] ?? "";
    $("#edit-tenant").hidden = false;
    $(`#edit-${LIMITS[0]}`).focus();
  }

  function tenantRow(t) {
    const own = (name) => (t.limits[name] == null ? "default" : formatNumber(t.limits[name]));
    const limit = (name) => el("td", { class: "number", text: own(name) });
    return el("tr", { "data-tenant": t.name },
      el("td", { text: t.name }), el("td", { text: t.operator ? "yes" : "no" }), ...LIMITS.map(limit),
      el("td", { class: "number", text: t.live_keys }), el("td", { class: "number", text: t.live_runs }),
      el("td", { class: "number", text: formatBytes(t.stored_bytes) }),
      el("td", {}, el("button", {
        type: "button", text: "Edit limits", "aria-label": `Edit limits of ${t.name}`, onclick: () => edit(t),
      })));
  }

  async function loadTenants() {
    const answer = await api("GET", "/api/v1/admin/tenants");
    $("#tenants-table tbody").replaceChildren(...answer.tenants.map(tenantRow));
  }

  /* Hides the edit form and puts the keyboard back on the edited tenant's button. */
  function closeEdit() {
    $("#edit-tenant").hidden = true;
    const button = $(`#tenants-table tr[data-tenant="${CSS.escape(editing)}"] button`);
    if (button) button.focus();
  }

  async function start() {
    try {
      await loadTenants();
    } catch (error) {
      if (error.status !== 403) throw error;
      $("#tenants-forbidden").hidden = false;
      return;
    }
    $("#tenants-admin").hidden = false;
  }

  Loom.onSignedIn(() => {
    $("#create-tenant-form").addEventListener("submit", (event) => {
      event.preventDefault();
      attempt(async () => {
        const created = await api("POST", "/api/v1/admin/tenants", {
          name: $("#tenant-name").value.trim(), operator: $("#tenant-operator").checked, limits: limitsOf("new"),
        });
        event.target.reset();
        $("#new-tenant-key").value = created.api_key;
        $("#new-tenant").hidden = false;
        $("#new-tenant-key").focus();
        $("#new-tenant-key").select();
        await loadTenants();
      });
    });
    $("#edit-tenant-form").addEventListener("submit", (event) => {
      event.preventDefault();
      attempt(async () => {
        await api("PATCH", `/api/v1/admin/tenants/${encodeURIComponent(editing)}`, limitsOf("edit"));
        await loadTenants();
        closeEdit();
      });
    });
    $("#edit-cancel").addEventListener("click", closeEdit);
    attempt(start);
  });
})();
