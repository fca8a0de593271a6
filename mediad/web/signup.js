// Whether this server lets anyone create an account (MEDIAD_SIGNUP): when it does not, the page
// offers sign-in only. Until the answer arrives both buttons stay as served; the server refuses a
// closed sign-up with 403 anyway.

import { api } from "./api.js";
import { $ } from "./ui.js";

export async function applySignupPolicy() {
  let config;
  try {
    config = await api("/auth/config");
  } catch {
    return; // an older or unreachable server: leave the form as it is
  }
  const closed = config && config.signup === "closed";
  $("sign-up").hidden = closed;
  $("auth-title").textContent = closed ? "Sign in" : "Sign in or create an account";
  $("auth-closed").hidden = !closed;
}
