// Webhooks: the caller's endpoints, adding one (its secret shown once), removing one, recent deliveries.

import { api } from "./api.js";
import { confirmDialog } from "./files.js";
import { $, clearError, h, showError } from "./ui.js";

const EVENTS = ["file.created", "file.replaced", "file.moved", "file.deleted", "file.stored", "file.evicted",
  "file.media_ready", "record.created", "upload.expired"];

function when(text) {
  return text ? new Date(text).toLocaleString() : "—";
}

function deliveryRow(d) {
  const result = d.status === "delivered" ? `delivered ${when(d.delivered_at)}`
    : d.status === "failed" ? "failed" : `retrying (next ${when(d.next_attempt_at)})`;
  const detail = d.last_error || (d.last_status_code ? `HTTP ${d.last_status_code}` : "");
  return h("tr", {},
    h("td", { text: d.event }), h("td", { text: when(d.created_at) }),
    h("td", { text: result, class: `delivery-${d.status}` }), h("td", { text: String(d.attempts) }),
    h("td", { text: detail, dir: "auto" }));
}

async function showDeliveries(hook, item) {
  clearError();
  const open = item.querySelector(".deliveries");
  if (open) {
    open.remove();
    return;
  }
  try {
    const { deliveries } = await api(`/webhooks/${encodeURIComponent(hook.id)}/deliveries`);
    const body = deliveries.length ? deliveries.map(deliveryRow)
      : [h("tr", {}, h("td", { colspan: "5", text: "No deliveries yet." }))];
    item.append(h("table", { class: "deliveries" },
      h("caption", { class: "visually-hidden", text: `Recent deliveries to ${hook.url}` }),
      h("thead", {}, h("tr", {}, ...["Event", "Created", "Result", "Attempts", "Last answer"]
        .map((name) => h("th", { scope: "col", text: name })))),
      h("tbody", {}, ...body)));
  } catch (err) {
    showError(err, "Could not load the deliveries");
  }
}

async function removeHook(hook) {
  clearError();
  if (!(await confirmDialog(`Remove the webhook to ${hook.url}? Queued deliveries are dropped.`))) return;
  try {
    await api(`/webhooks/${encodeURIComponent(hook.id)}`, { method: "DELETE" });
    await refreshWebhooks();
  } catch (err) {
    showError(err, "Could not remove the webhook");
  }
}

function hookItem(hook) {
  const events = hook.events.length === EVENTS.length ? "all events" : hook.events.join(", ");
  const item = h("li", { "data-id": hook.id },
    h("div", { class: "hook-head" },
      h("code", { text: hook.url, dir: "ltr" }),
      h("span", { class: "muted", text: ` — ${events}` })));
  item.firstChild.append(
    h("button", { type: "button", class: "secondary", text: "Deliveries",
      onclick: () => showDeliveries(hook, item) }),
    h("button", { type: "button", class: "danger", text: "Remove", onclick: () => removeHook(hook) }));
  return item;
}

export async function refreshWebhooks() {
  try {
    const { webhooks } = await api("/webhooks");
    $("hooks").replaceChildren(...webhooks.map(hookItem));
    $("hooks-status").textContent = webhooks.length ? "" : "No webhooks yet.";
  } catch (err) {
    showError(err, "Could not load your webhooks");
  }
}

async function addHook(event) {
  event.preventDefault();
  clearError();
  const chosen = EVENTS.filter((name) => $(`hook-event-${name}`).checked);
  const json = { url: $("hook-url").value.trim() };
  if (chosen.length) json.events = chosen;
  try {
    const created = await api("/webhooks", { method: "POST", json });
    $("hook-secret").value = created.secret;
    $("hook-secret-box").hidden = false;
    $("hook-secret").select();
    $("hook-form").reset();
    await refreshWebhooks();
  } catch (err) {
    showError(err, "Could not add the webhook");
  }
}

export function resetWebhooks() {
  $("hooks").replaceChildren();
  $("hook-secret").value = "";
  $("hook-secret-box").hidden = true;
}

export function setUpWebhooks() {
  $("hook-events").append(...EVENTS.map((name) => h("label", { class: "check" },
    h("input", { type: "checkbox", id: `hook-event-${name}`, value: name }), ` ${name}`)));
  $("hook-form").addEventListener("submit", addHook);
  $("hook-secret-done").addEventListener("click", () => resetWebhooks() || refreshWebhooks());
}
