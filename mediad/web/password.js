// Changing the password: POST /users/me/password. The server signs out every other session of
// the account and keeps this one.

import { api } from "./api.js";
import { $, clearError, showError } from "./ui.js";

async function changePassword(event) {
  event.preventDefault();
  clearError();
  const current = $("password-current").value;
  const next = $("password-new").value;
  const status = $("password-status");
  status.textContent = "";
  if (next.length < 8) {
    showError(new Error("the new password must be at least 8 characters long"));
    $("password-new").focus();
    return;
  }
  try {
    await api("/users/me/password", { method: "POST", json: { password: current || null, new_password: next } });
  } catch (err) {
    showError(err, "Could not change the password");
    return;
  }
  $("password-form").reset();
  status.textContent = "Password changed. Every other session of this account was signed out.";
}

export function setUpPasswordForm() {
  $("password-form").addEventListener("submit", changePassword);
}

export function resetPasswordForm() {
  $("password-form").reset();
  $("password-status").textContent = "";
}
