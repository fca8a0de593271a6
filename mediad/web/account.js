// The account dialog: who is signed in, their tokens (one per device or app), revoke and create.

import { ApiError, api, authHeaders } from "./api.js";
import { $, clearError, h, humanSize, showError } from "./ui.js";

let onCurrentRevoked = () => {};

function when(stamp) {
  return stamp ? new Date(stamp).toLocaleString() : "never";
}

function tokenRow(token) {
  const label = token.current ? `${token.name} (this browser)` : token.name;
  const revoke = h("button", {
    type: "button", class: "danger", "aria-label": `Revoke ${label}`,
    onclick: () => revokeToken(token),
  }, token.current ? "Sign out" : "Revoke");
  return h("tr", { "data-id": token.id },
    h("td", { class: "name", dir: "auto", text: label }),
    h("td", { class: "date", "data-label": "Created", text: when(token.created_at) }),
    h("td", { class: "date", "data-label": "Last used", text: when(token.last_used_at) }),
    h("td", { class: "actions" }, revoke));
}

async function loadAccount() {
  $("tokens-status").textContent = "Loading…";
  try {
    const [me, { tokens }] = await Promise.all([api("/users/me"), api("/auth/tokens")]);
    const files = `${me.usage.files} ${me.usage.files === 1 ? "file" : "files"}`;
    const quota = me.quota === null ? "" : ` of ${humanSize(me.quota)}`;
    $("account-summary").textContent =
      `${me.name} · ${files}, ${humanSize(me.usage.bytes)}${quota} · since ${new Date(me.created_at).toLocaleDateString()}`;
    $("token-rows").replaceChildren(...tokens.map(tokenRow));
    $("tokens-status").textContent = `${tokens.length} ${tokens.length === 1 ? "token" : "tokens"}`;
  } catch (err) {
    $("tokens-status").textContent = "";
    if (!(err instanceof ApiError && err.status === 401)) showError(err, "Could not load the account");
  }
}

async function revokeToken(token) {
  clearError();
  if (token.current) {
    $("account-dialog").close();
    onCurrentRevoked();
    return;
  }
  try {
    await api(`/auth/tokens/${encodeURIComponent(token.id)}`, { method: "DELETE" });
    $("tokens-status").textContent = `Revoked ${token.name}.`;
    await loadAccount();
  } catch (err) {
    showError(err, `Could not revoke ${token.name}`);
  }
}

async function createToken(event) {
  event.preventDefault();
  clearError();
  const name = $("token-name").value.trim();
  if (!name) {
    $("token-name").focus();
    return;
  }
  try {
    const created = await api("/auth/tokens", { method: "POST", json: { name } });
    $("token-name").value = "";
    $("new-token").hidden = false;
    $("new-token-value").value = created.token;
    await loadAccount();
    $("new-token-value").focus();
    $("new-token-value").select();
  } catch (err) {
    showError(err, "Could not create the token");
  }
}

// Sign out on the server too: DELETE /auth/token revokes the token this browser holds. Best effort:
// the page forgets the token whatever the answer (an unreachable server must not keep anyone in).
export async function revokeSession() {
  const headers = authHeaders();
  if (!headers.Authorization) return;
  try {
    await fetch("/auth/token", { method: "DELETE", headers, cache: "no-store", keepalive: true });
  } catch { /* offline: the token stays valid on the server until revoked from another session */ }
}

export function setUpAccount(signOut) {
  onCurrentRevoked = signOut;
  $("account-open").addEventListener("click", () => {
    clearError();
    $("new-token").hidden = true;
    $("new-token-value").value = "";
    $("account-dialog").showModal();
    loadAccount();
  });
  $("account-close").addEventListener("click", () => $("account-dialog").close());
  $("account-dialog").addEventListener("close", () => { $("new-token-value").value = ""; });
  $("token-form").addEventListener("submit", createToken);
}
