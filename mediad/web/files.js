// The file list and what can be done to a file: preview, download, share, delete; the usage line.

import { api, signedLink } from "./api.js";
import { galleryShown, renderGallery } from "./gallery.js";
import { moveButton, refreshTree } from "./tree.js";
import { $, clearError, h, humanSize, showError, shownName } from "./ui.js";

const PAGE_SIZE = 200;

// ---- usage -------------------------------------------------------------------------------------

export async function refreshUsage() {
  try {
    const usage = await api("/usage");
    const quota = usage.quota == null ? ""
      : ` of ${humanSize(usage.quota)} (${Math.min(100, Math.round((100 * usage.bytes) / Math.max(usage.quota, 1)))}%)`;
    $("usage").textContent = `${usage.files} ${usage.files === 1 ? "file" : "files"} · ${humanSize(usage.bytes)}${quota}`;
  } catch (err) {
    $("usage").textContent = "";
    if (err.status !== 401) showError(err, "Could not read your usage");
  }
}

// ---- the file list -----------------------------------------------------------------------------

let files = [];
let nextCursor = null;
let refreshTimer = null;

export function scheduleRefresh() {
  clearTimeout(refreshTimer);
  refreshTimer = setTimeout(refreshFiles, 200);
}

function listQuery(cursor) {
  const params = new URLSearchParams({ limit: String(PAGE_SIZE) });
  const prefix = $("prefix").value.trim();
  if (prefix) params.set("prefix", prefix.startsWith("/") ? prefix : `/${prefix}`);
  if ($("kind").value) params.set("kind", $("kind").value);
  if (cursor) params.set("cursor", cursor);
  return `/files?${params}`;
}

export async function refreshFiles() {
  refreshUsage();
  refreshTree();
  $("files-status").textContent = "Loading…";
  try {
    const page = await api(listQuery(null));
    files = page.files;
    nextCursor = page.next_cursor;
    renderFiles();
  } catch (err) {
    $("files-status").textContent = "";
    if (err.status !== 401) showError(err, "Could not list your files");
  }
}

export async function loadMore() {
  try {
    const page = await api(listQuery(nextCursor));
    files = files.concat(page.files);
    nextCursor = page.next_cursor;
    renderFiles();
  } catch (err) {
    showError(err, "Could not list more files");
  }
}

const SORTS = {
  date: (a, b) => a.created_at.localeCompare(b.created_at) || a.id.localeCompare(b.id),
  name: (a, b) => a.name.localeCompare(b.name, undefined, { numeric: true, sensitivity: "base" }),
  size: (a, b) => a.size - b.size,
  type: (a, b) => a.format.localeCompare(b.format) || a.name.localeCompare(b.name),
};

function sortedFiles() {
  const [key, direction] = $("sort").value.split("-");
  const sorted = [...files].sort(SORTS[key]);
  return direction === "desc" ? sorted.reverse() : sorted;
}

function previewKind(file) {
  const kind = file.format.split("/")[0];
  return ["image", "audio", "video"].includes(kind) ? kind : null;
}

function fileRow(file) {
  const kind = previewKind(file);
  const created = new Date(file.created_at);
  const cloud = file.cloud.state + (file.local ? "" : " (not on this server's disk)");
  const actions = h("td", { class: "actions", "data-label": "Actions" });
  if (kind) {
    actions.append(h("button", {
      type: "button", class: "secondary", onclick: () => preview(file),
      text: kind === "image" ? "View" : "Play", "aria-label": `${kind === "image" ? "View" : "Play"} ${shownName(file.name)}`,
    }));
  }
  actions.append(
    h("button", { type: "button", class: "secondary", onclick: () => download(file), text: "Download",
      "aria-label": `Download ${shownName(file.name)}` }),
    h("button", { type: "button", class: "secondary", onclick: () => share(file), text: "Copy link",
      "aria-label": `Copy a link to ${shownName(file.name)}` }),
    moveButton(file),
    h("button", { type: "button", class: "danger", onclick: () => remove(file), text: "Delete",
      "aria-label": `Delete ${shownName(file.name)}` }),
  );
  return h("tr", { "data-id": file.id, "data-name": file.name },
    h("td", { class: "name", "data-label": "Name", text: shownName(file.name), dir: "auto" }),
    h("td", { class: "path", "data-label": "Path", text: file.path ? shownName(file.path) : "—", dir: "auto" }),
    h("td", { class: "size", "data-label": "Size", "data-bytes": String(file.size), title: `${file.size} bytes`,
      text: humanSize(file.size) }),
    h("td", { class: "type", "data-label": "Type", text: file.format }),
    h("td", { class: "date", "data-label": "Date" },
      h("time", { datetime: file.created_at, title: file.created_at, text: created.toLocaleString(undefined, { dateStyle: "medium", timeStyle: "short" }) })),
    h("td", { class: "cloud", "data-label": "Cloud", text: cloud }),
    actions);
}

export function renderFiles() {
  if (galleryShown()) {
    renderGallery(sortedFiles(), { preview, download }, refreshFiles);
    $("file-rows").replaceChildren();
  } else {
    $("file-rows").replaceChildren(...sortedFiles().map(fileRow));
  }
  $("more").hidden = !nextCursor;
  const prefix = $("prefix").value.trim();
  $("files-status").textContent = files.length
    ? `${files.length}${nextCursor ? "+" : ""} ${files.length === 1 ? "file" : "files"}${prefix ? ` under ${prefix}` : ""}`
    : prefix ? `No files under ${prefix}.` : "No files yet: upload some above.";
}

// ---- actions on a file -------------------------------------------------------------------------

async function download(file) {
  clearError();
  try {
    // The token cannot ride along on a navigation, so downloads go through a short signed link:
    // the browser streams it to disk itself, whatever the size.
    const link = await signedLink(file.id, { inline: false, expiresIn: 300 });
    const anchor = h("a", { href: link.path, download: shownName(file.name), hidden: true });
    document.body.append(anchor);
    anchor.click();
    anchor.remove();
  } catch (err) {
    showError(err, `Could not download ${shownName(file.name)}`);
  }
}

async function share(file) {
  clearError();
  try {
    const link = await signedLink(file.id, { inline: false, expiresIn: Number($("link-expiry").value) });
    // The page's own origin: the address this person reached mediad by.
    const url = new URL(link.path, location.href).href;
    $("share-url").value = url;
    $("share-expiry").textContent = new Date(link.expires_at).toLocaleString();
    $("share-status").textContent = "";
    $("share").showModal();
    $("share-url").select();
    try {
      await navigator.clipboard.writeText(url);
      $("share-status").textContent = "Copied to the clipboard.";
    } catch {
      $("share-status").textContent = "Press Ctrl+C (⌘C) to copy the selected link.";
    }
  } catch (err) {
    showError(err, `Could not make a link to ${shownName(file.name)}`);
  }
}

export function confirmDialog(text) {
  const dialog = $("confirm");
  $("confirm-text").textContent = text;
  dialog.returnValue = "";
  dialog.showModal();
  return new Promise((resolve) => {
    dialog.addEventListener("close", () => resolve(dialog.returnValue === "ok"), { once: true });
  });
}

async function remove(file) {
  clearError();
  if (!(await confirmDialog(`Delete “${shownName(file.name)}”? This cannot be undone.`))) return;
  try {
    await api(`/files/${encodeURIComponent(file.id)}`, { method: "DELETE" });
    files = files.filter((f) => f.id !== file.id);
    renderFiles();
    refreshUsage();
  } catch (err) {
    showError(err, `Could not delete ${shownName(file.name)}`);
  }
}

async function preview(file) {
  clearError();
  const kind = previewKind(file);
  try {
    // Long enough to watch a long film: the link must outlive the range requests of seeking.
    const link = await signedLink(file.id, { inline: true, expiresIn: 86400 });
    let media;
    if (kind === "image") media = h("img", { src: link.path, alt: shownName(file.name) });
    else media = h(kind, { src: link.path, controls: true, preload: "metadata", "aria-label": shownName(file.name) });
    media.addEventListener("error", () => {
      showError(new Error(kind === "image" ? "the browser cannot show this image"
        : "the browser cannot play this file (format or codec not supported)"), `Preview of ${shownName(file.name)}`);
    });
    $("preview-title").textContent = shownName(file.name);
    $("preview-body").replaceChildren(media);
    $("preview").showModal();
    if (kind !== "image") media.focus();
  } catch (err) {
    showError(err, `Could not preview ${shownName(file.name)}`);
  }
}

export function closePreview() {
  const media = $("preview-body").querySelector("audio, video");
  if (media) {
    media.pause();
    media.removeAttribute("src"); // stop fetching ranges
    media.load();
  }
  $("preview-body").replaceChildren();
}

export function resetFiles() {
  files = [];
  nextCursor = null;
  $("file-rows").replaceChildren();
}
