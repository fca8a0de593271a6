// Uploads: the drop zone and picker, one resumable tus upload per file with its progress row.

import { session } from "./api.js";
import { scheduleRefresh } from "./files.js";
import { discardUpload, fingerprint, rememberedUploads, TusUpload } from "./tus.js";
import { $, clearError, folderPath, h, humanSize, showError, shownName } from "./ui.js";

const uploads = [];

function owner() {
  return (session.user || "").toLowerCase();
}

function addFiles(fileList) {
  clearError();
  const path = folderPath($("folder").value);
  for (const file of fileList) addUpload(file, path);
}

function addUpload(file, path) {
  // The same file to the same folder is one upload: a second copy would fight it for the offset.
  const same = uploads.find((u) => u.key === fingerprint(owner(), file, path) && !finished(u));
  if (same) {
    if (same.state !== "running") same.start();
    return;
  }
  const bar = h("progress", { max: "100", value: "0", "aria-label": `Upload progress of ${shownName(file.name)}` });
  const numbers = h("span", { class: "numbers", text: `0% · 0 bytes of ${humanSize(file.size)}` });
  const status = h("span", { class: "status", role: "status", text: "Starting…" });
  const pause = h("button", { type: "button", class: "secondary", text: "Pause" });
  const cancel = h("button", { type: "button", class: "secondary", text: "Cancel" });
  const item = h("li", { class: "upload", "data-name": file.name },
    h("div", { class: "upload-head" },
      h("strong", { class: "name", text: shownName(file.name), dir: "auto" }),
      h("span", { class: "muted", text: path ? ` → ${path}` : "" })),
    bar,
    h("div", { class: "upload-foot" }, numbers, status,
      h("span", { class: "row" }, pause, cancel)));
  $("uploads").prepend(item);

  let lastBytes = 0;
  let lastTime = performance.now();
  let speed = 0;
  const upload = new TusUpload(file, {
    endpoint: "/uploads",
    owner: owner(),
    path,
    onProgress(sent, total) {
      const now = performance.now();
      const seconds = (now - lastTime) / 1000;
      if (seconds >= 0.25) { // smooth the rate over a quarter second at least
        const rate = Math.max(0, sent - lastBytes) / seconds;
        speed = speed ? 0.6 * speed + 0.4 * rate : rate;
        lastBytes = sent;
        lastTime = now;
      }
      const percent = total ? Math.floor((100 * sent) / total) : 100;
      bar.value = percent;
      item.dataset.percent = String(percent);
      const rate = upload.state === "running" && sent < total ? ` · ${humanSize(Math.round(speed))}/s` : "";
      numbers.textContent = `${percent}% · ${humanSize(sent)} of ${humanSize(total)}${rate}`;
      if (upload.state === "running" && sent > 0) status.textContent = "Uploading";
    },
    onStatus(text) { status.textContent = text; },
    onSuccess(fileId) {
      status.textContent = "Done";
      item.dataset.fileId = fileId;
      item.classList.add("done");
      pause.hidden = true;
      cancel.hidden = true;
      scheduleRefresh();
      showRemembered();
      showClearButton();
    },
    onError(message) {
      status.textContent = `Failed: ${message}`;
      item.classList.add("failed");
      pause.textContent = "Retry";
      showError(new Error(message), `Upload of ${shownName(file.name)} failed`);
    },
    onStateChange(state) {
      item.dataset.state = state;
      if (state === "running") {
        pause.textContent = "Pause";
        lastTime = performance.now();
        lastBytes = upload.offset;
        speed = 0;
      } else if (state === "paused") {
        pause.textContent = "Resume";
      } else if (state === "cancelled") {
        pause.hidden = true;
        cancel.hidden = true;
        item.classList.add("cancelled");
        showRemembered();
        showClearButton();
      }
    },
  });
  pause.addEventListener("click", () => {
    if (upload.state === "running") upload.pause();
    else upload.start();
  });
  cancel.addEventListener("click", () => upload.cancel());
  upload.item = item;
  uploads.push(upload);
  upload.start();
}

const finished = (upload) => upload.state === "done" || upload.state === "cancelled";

function showClearButton() {
  $("clear-uploads").hidden = !uploads.some(finished);
}

export function clearFinished() {
  for (const upload of uploads.filter(finished)) upload.item.remove();
  uploads.splice(0, uploads.length, ...uploads.filter((upload) => !finished(upload)));
  showClearButton();
}

export function showRemembered() {
  const active = new Set(uploads.filter((u) => u.state !== "cancelled" && u.state !== "done").map((u) => u.key));
  const entries = rememberedUploads(owner()).filter((entry) => !active.has(entry.key));
  $("remembered").hidden = entries.length === 0;
  $("remembered-list").replaceChildren(...entries.map((entry) => {
    const discard = h("button", { type: "button", class: "secondary", text: "Discard" });
    discard.addEventListener("click", async () => {
      await discardUpload(entry);
      showRemembered();
    });
    return h("li", {}, h("span", { text: `${shownName(entry.name)} (${humanSize(entry.size)})${entry.path ? ` → ${entry.path}` : ""}` }),
      discard);
  }));
}

export function setUpDropzone() {
  const zone = $("dropzone");
  const input = $("file-input");
  input.addEventListener("change", () => {
    addFiles(input.files);
    input.value = ""; // the same file can be chosen again (to resume it)
  });
  for (const type of ["dragenter", "dragover"]) {
    zone.addEventListener(type, (event) => {
      event.preventDefault();
      zone.classList.add("over");
    });
  }
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    zone.classList.remove("over");
    const files = [...event.dataTransfer.files];
    if (files.length) addFiles(files);
  });
  // A file dropped anywhere else must not make the browser navigate away from the page.
  window.addEventListener("dragover", (event) => event.preventDefault());
  window.addEventListener("drop", (event) => event.preventDefault());
}

export function uploadsRunning() {
  return uploads.some((upload) => upload.state === "running");
}

// Signing out: stop every upload (they stay resumable) and forget their rows.
export function resetUploads() {
  for (const upload of uploads) upload.pause();
  uploads.length = 0;
  $("uploads").replaceChildren();
  $("clear-uploads").hidden = true;
}
