// The file tree: breadcrumbs and the folders of the current folder (GET /folders), moving and
// renaming a file (PATCH /files/{id}), deleting a folder with everything in it (DELETE /folders).
// The file list below follows the current folder through its prefix filter.

import { api } from "./api.js";
import { confirmDialog, refreshFiles } from "./files.js";
import { $, clearError, folderPath, h, humanSize, showError, shownName } from "./ui.js";

const FOLDER_PAGE = 1000; // folders come first in a page of GET /folders

// The folder the page shows: the prefix filter when it names a folder, else the root.
export function currentFolder() {
  return folderPath($("prefix").value) || "/";
}

export function openFolder(path) {
  $("prefix").value = path === "/" ? "" : path;
  refreshFiles();
}

function parentOf(path) {
  return path === "/" ? "/" : path.slice(0, path.slice(0, -1).lastIndexOf("/") + 1);
}

function renderCrumbs(folder) {
  const parts = folder.split("/").filter(Boolean);
  const crumbs = [h("button", { type: "button", class: "link", onclick: () => openFolder("/"), text: "All files",
    "aria-current": parts.length ? null : "page" })];
  let path = "/";
  parts.forEach((part, index) => {
    path += `${part}/`;
    const target = path;
    const last = index === parts.length - 1;
    crumbs.push(h("span", { class: "muted", "aria-hidden": "true", text: "›" }),
      h("button", { type: "button", class: "link", onclick: () => openFolder(target), text: shownName(part),
        dir: "auto", "aria-current": last ? "page" : null }));
  });
  $("crumbs").replaceChildren(...crumbs);
  $("folder-up").hidden = folder === "/";
}

function folderItem(folder) {
  const name = folder.path.slice(0, -1).split("/").pop();
  const count = `${folder.files} ${folder.files === 1 ? "file" : "files"} · ${humanSize(folder.bytes)}`;
  return h("li", { "data-path": folder.path },
    h("button", { type: "button", class: "link folder-open", onclick: () => openFolder(folder.path),
      "aria-label": `Open folder ${shownName(name)}` }, h("span", { text: shownName(name), dir: "auto" }),
    h("span", { "aria-hidden": "true", text: "/" })),
    h("span", { class: "muted", text: count }),
    h("button", { type: "button", class: "danger", onclick: () => deleteFolder(folder), text: "Delete folder",
      "aria-label": `Delete folder ${shownName(name)}` }));
}

// Called with every refresh of the file list.
export async function refreshTree() {
  const folder = currentFolder();
  renderCrumbs(folder);
  try {
    const page = await api(`/folders?${new URLSearchParams({ path: folder, limit: String(FOLDER_PAGE) })}`);
    $("folders").replaceChildren(...page.folders.map(folderItem));
  } catch (err) {
    $("folders").replaceChildren();
    if (err.status === 404) return; // not a folder (yet): the list below says what is there
    if (err.status !== 401) showError(err, "Could not list the folders");
  }
}

async function deleteFolder(folder) {
  clearError();
  const what = `${folder.files} ${folder.files === 1 ? "file" : "files"} (${humanSize(folder.bytes)})`;
  if (!(await confirmDialog(`Delete the folder “${shownName(folder.path)}” and the ${what} in it? `
    + "This cannot be undone."))) return;
  try {
    const params = new URLSearchParams({ path: folder.path, recursive: "true" });
    const answer = await api(`/folders?${params}`, { method: "DELETE" });
    await refreshFiles();
    const status = $("files-status");
    status.textContent = `Deleted ${answer.deleted} ${answer.deleted === 1 ? "file" : "files"}. ${status.textContent}`;
  } catch (err) {
    showError(err, `Could not delete the folder ${shownName(folder.path)}`);
  }
}

// ---- moving and renaming -----------------------------------------------------------------------

let moving = null;

export function moveButton(file) {
  return h("button", { type: "button", class: "secondary", onclick: () => openMove(file), text: "Move",
    "aria-label": `Move or rename ${shownName(file.name)}` });
}

function openMove(file) {
  clearError();
  moving = file;
  $("move-path").value = file.path || `${currentFolder()}${file.name}`;
  $("move-status").textContent = "";
  $("move").showModal();
  const input = $("move-path");
  const slash = input.value.lastIndexOf("/") + 1;
  input.setSelectionRange(slash, input.value.length); // the name, as file managers do on rename
}

async function patchFile(file, body) {
  return api(`/files/${encodeURIComponent(file.id)}`, { method: "PATCH", json: body });
}

async function submitMove(event) {
  event.preventDefault();
  if (!moving) return;
  const target = $("move-path").value.trim();
  const path = target.startsWith("/") ? target : `/${target}`;
  try {
    try {
      await patchFile(moving, { path });
    } catch (err) {
      if (err.status !== 409) throw err;
      $("move").close();
      if (!(await confirmDialog(`${err.message}. Replace that file with “${shownName(moving.name)}”?`))) return;
      await patchFile(moving, { path, replace: true });
    }
    if ($("move").open) $("move").close();
    moving = null;
    refreshFiles();
  } catch (err) {
    if ($("move").open) $("move-status").textContent = err.message;
    else showError(err, `Could not move ${shownName(moving.name)}`);
  }
}

$("move-form").addEventListener("submit", submitMove);
$("move-cancel").addEventListener("click", () => { moving = null; $("move").close(); });
$("folder-up").addEventListener("click", () => openFolder(parentOf(currentFolder())));
