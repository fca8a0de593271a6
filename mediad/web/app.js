// The mediad web app: sign in, then uploads (uploads.js), the file list (files.js) and records.

import { revokeSession, setUpAccount } from "./account.js";
import { api, session } from "./api.js";
import { closePreview, loadMore, refreshFiles, renderFiles, resetFiles, scheduleRefresh } from "./files.js";
import { setUpGallery } from "./gallery.js";
import { canRecord, startRecording } from "./recorder.js";
import { $, clearError, h, humanSize, showError, shownName } from "./ui.js";
import { clearFinished, resetUploads, setUpDropzone, showRemembered, uploadsRunning } from "./uploads.js";
import { resetPasswordForm, setUpPasswordForm } from "./password.js";
import { applySignupPolicy } from "./signup.js";
import { refreshWebhooks, resetWebhooks, setUpWebhooks } from "./webhooks.js";

// ---- signing in --------------------------------------------------------------------------------

async function authenticate(event) {
  event.preventDefault();
  clearError();
  const signup = event.submitter && event.submitter.value === "signup";
  const name = $("auth-name").value.trim();
  const password = $("auth-password").value;
  if (!name) {
    showError(new Error("enter a name"));
    $("auth-name").focus();
    return;
  }
  try {
    const body = { name, password };
    const answer = signup
      ? await api("/users", { method: "POST", json: password ? body : { name } })
      : await api("/auth/login", { method: "POST", json: { ...body, token_name: browserName() } });
    session.save(answer.token, signup ? answer.name : name);
    $("auth-password").value = "";
    enterWorkspace();
  } catch (err) {
    showError(err, signup ? "Could not create the account" : "Could not sign in");
  }
}

// Signing out revokes this browser's token on the server, then forgets it here.
async function signOutEverywhere() {
  await revokeSession();
  signOut();
}

// What GET /auth/tokens will call this sign-in: the browser and system, in a few words.
function browserName() {
  const agent = navigator.userAgent;
  const browser = /Firefox\//.test(agent) ? "Firefox" : /Edg\//.test(agent) ? "Edge"
    : /Chrom(e|ium)\//.test(agent) ? "Chromium" : /Safari\//.test(agent) ? "Safari" : "browser";
  const system = /Android/.test(agent) ? "Android" : /iPhone|iPad/.test(agent) ? "iOS"
    : /Mac OS X/.test(agent) ? "macOS" : /Windows/.test(agent) ? "Windows" : /Linux/.test(agent) ? "Linux" : "";
  return `web app, ${browser}${system ? ` on ${system}` : ""}`;
}

function signOut(message) {
  if ($("account-dialog").open) $("account-dialog").close();
  resetUploads();
  session.clear();
  resetFiles();
  resetPasswordForm();
  resetWebhooks();
  $("records").replaceChildren();
  $("workspace").hidden = true;
  $("account").hidden = true;
  $("auth").hidden = false;
  if (message) showError(new Error(message));
  $("auth-name").focus();
}

function enterWorkspace() {
  $("auth").hidden = true;
  $("workspace").hidden = false;
  $("account").hidden = false;
  $("whoami").textContent = session.user;
  showRemembered();
  refreshFiles();
  refreshWebhooks();
}

// ---- records -----------------------------------------------------------------------------------

let recording = null;
let recordTimer = null;

async function toggleRecording() {
  clearError();
  const button = $("record-toggle");
  if (!recording) {
    if (!canRecord()) {
      showError(new Error("this browser cannot record audio here (it needs a secure origin and a microphone)"));
      return;
    }
    try {
      recording = await startRecording();
    } catch (err) {
      showError(err, "Could not start recording");
      return;
    }
    button.textContent = "Stop and upload";
    button.classList.add("danger");
    recordTimer = setInterval(() => {
      $("record-time").textContent = `Recording… ${recording.elapsed().toFixed(1)} s`;
    }, 200);
    return;
  }
  clearInterval(recordTimer);
  button.textContent = "Start recording";
  button.classList.remove("danger");
  $("record-time").textContent = "";
  const wav = await recording.stop();
  recording = null;
  const stamp = new Date().toISOString().replace(/[:.]/g, "-").slice(0, 19);
  await sendRecord(wav, `record-${stamp}.wav`);
}

async function sendRecord(blob, name) {
  $("record-status").textContent = `Converting ${name} to MP3…`;
  const form = new FormData();
  form.append("file", blob, name);
  try {
    const record = await api("/records", { method: "POST", body: form });
    $("record-status").textContent = `Saved ${shownName(record.file.name)} (${humanSize(record.file.size)}).`;
    // The record link needs no token; played as a same-origin path for `media-src 'self'`.
    const target = new URL(record.url);
    const player = h("audio", { controls: true, preload: "metadata", src: target.pathname + target.search,
      "aria-label": `Play ${shownName(record.file.name)}` });
    $("records").prepend(h("li", { "data-id": record.id }, h("span", { text: shownName(record.file.name), dir: "auto" }), player));
    scheduleRefresh();
  } catch (err) {
    $("record-status").textContent = "";
    showError(err, `Could not save the record ${name}`);
  }
}

// ---- start -------------------------------------------------------------------------------------

function start() {
  $("auth-form").addEventListener("submit", authenticate);
  $("sign-out").addEventListener("click", signOutEverywhere);
  setUpAccount(signOutEverywhere);
  $("alert-close").addEventListener("click", clearError);
  $("filter-form").addEventListener("submit", (event) => {
    event.preventDefault();
    refreshFiles();
  });
  $("refresh").addEventListener("click", refreshFiles);
  $("clear-uploads").addEventListener("click", clearFinished);
  $("sort").addEventListener("change", renderFiles);
  $("kind").addEventListener("change", refreshFiles);
  setUpGallery(renderFiles);
  $("more").addEventListener("click", loadMore);
  $("preview-close").addEventListener("click", () => $("preview").close());
  $("preview").addEventListener("close", closePreview);
  $("record-toggle").addEventListener("click", toggleRecording);
  $("record-file").addEventListener("change", async (event) => {
    const [file] = event.target.files;
    event.target.value = "";
    if (file) await sendRecord(file, file.name);
  });
  setUpDropzone();
  setUpPasswordForm();
  applySignupPolicy();
  setUpWebhooks();
  window.addEventListener("mediad:unauthorized", () => signOut("Your session is no longer valid; sign in again."));
  window.addEventListener("beforeunload", (event) => {
    if (uploadsRunning()) event.preventDefault(); // they could resume, but ask
  });
  if (session.token) enterWorkspace();
  else {
    $("auth").hidden = false;
    $("auth-name").focus();
  }
}

start();
