// The grid view beside the table: thumbnails through signed thumbnail links, loaded only as tiles
// scroll into view; durations on video and audio, dimensions on images; a dialog with the metadata.

import { api } from "./api.js";
import { $, h, humanSize, shownName } from "./ui.js";

const THUMBNAIL_PX = 256;
const LINK_LIFETIME_S = 86400;
const VIEW = "mediad.view";
const PENDING_POLLS = 20; // re-list while files are still being probed, slower each time (~2 min in all)

const links = new Map(); // `${id}.${sha256}` → a signed thumbnail path (a replaced file gets a new one)
let observer = null;
let pendingPolls = 0;
let pollTimer = null;

export function galleryShown() {
  return localStorage.getItem(VIEW) === "grid";
}

// The Table/Grid switch; `render` redraws the list in the chosen view.
export function setUpGallery(render) {
  const apply = () => {
    const grid = galleryShown();
    $("view-table").setAttribute("aria-pressed", String(!grid));
    $("view-grid").setAttribute("aria-pressed", String(grid));
    $("files").hidden = grid;
    $("gallery").hidden = !grid;
  };
  for (const [id, view] of [["view-table", "table"], ["view-grid", "grid"]]) {
    $(id).addEventListener("click", () => {
      localStorage.setItem(VIEW, view); // a layout choice, not a secret: it may outlive the session
      apply();
      render();
    });
  }
  $("details-close").addEventListener("click", () => $("details").close());
  apply();
}

export function formatDuration(seconds) {
  const total = Math.round(seconds);
  const [hours, minutes, secs] = [Math.floor(total / 3600), Math.floor(total / 60) % 60, total % 60];
  const two = (n) => String(n).padStart(2, "0");
  return hours ? `${hours}:${two(minutes)}:${two(secs)}` : `${minutes}:${two(secs)}`;
}

function caption(media) {
  if (media === null) return "Reading…";
  if (media.status === "failed") return "Unreadable";
  if (media.duration_s !== undefined) return formatDuration(media.duration_s);
  if (media.width !== undefined) return `${media.width}×${media.height}`;
  return "";
}

function mayHavePicture(file) {
  return file.media ? file.media.status === "ready" && file.media.kind !== "other"
    : ["image", "video", "audio"].includes(file.format.split("/")[0]);
}

async function loadThumbnail(picture, file) {
  const key = `${file.id}.${file.sha256}`;
  try {
    if (!links.has(key)) {
      const link = await api(`/files/${encodeURIComponent(file.id)}/links`, {
        method: "POST", json: { thumbnail: THUMBNAIL_PX, expires_in: LINK_LIFETIME_S },
      });
      links.set(key, link.path);
    }
    const img = h("img", { src: links.get(key), alt: "", decoding: "async" });
    img.addEventListener("load", () => picture.replaceChildren(img), { once: true });
    img.addEventListener("error", () => { picture.textContent = "No preview"; }, { once: true });
  } catch {
    picture.textContent = "No preview";
  }
}

function watch(picture, file) {
  if (!observer) {
    observer = new IntersectionObserver((entries) => {
      for (const entry of entries) {
        if (!entry.isIntersecting) continue;
        observer.unobserve(entry.target);
        loadThumbnail(entry.target, entry.target.mediadFile);
      }
    }, { rootMargin: "200px" });
  }
  picture.mediadFile = file;
  observer.observe(picture);
}

function tile(file, actions) {
  const kind = file.media ? file.media.kind : file.format.split("/")[0];
  const picture = h("span", { class: `picture kind-${kind}`, "aria-hidden": "true" });
  if (mayHavePicture(file)) watch(picture, file);
  else picture.textContent = file.extension ? file.extension.toUpperCase() : "FILE";
  const label = caption(file.media);
  const button = h("button", {
    type: "button", class: "tile", onclick: () => showDetails(file, actions),
    "aria-label": `${shownName(file.name)}${label ? `, ${label}` : ""}: details`,
  }, picture,
  h("span", { class: "tile-name", text: shownName(file.name), dir: "auto" }),
  h("span", { class: "tile-meta", text: label }));
  return h("li", { "data-id": file.id }, button);
}

// Draws the grid for `files` (already sorted); `actions` has preview/download from the table.
export function renderGallery(files, actions, refresh) {
  if (observer) observer.disconnect();
  observer = null;
  $("gallery").replaceChildren(...files.map((file) => tile(file, actions)));
  clearTimeout(pollTimer);
  if (files.some((file) => file.media === null) && pendingPolls < PENDING_POLLS) {
    pollTimer = setTimeout(refresh, Math.min(1000 + 500 * pendingPolls, 8000));
    pendingPolls += 1;
  } else if (!files.some((file) => file.media === null)) {
    pendingPolls = 0;
  }
}

const FIELDS = [
  ["Kind", (m) => m.kind],
  ["Dimensions", (m) => m.width !== undefined && `${m.width} × ${m.height} px`],
  ["Duration", (m) => m.duration_s !== undefined && `${formatDuration(m.duration_s)} (${m.duration_s} s)`],
  ["Container", (m) => m.container],
  ["Video codec", (m) => m.video_codec],
  ["Frame rate", (m) => m.frame_rate !== undefined && `${m.frame_rate} fps`],
  ["Rotation", (m) => m.rotation ? `${m.rotation}°` : null],
  ["Audio codec", (m) => m.audio_codec],
  ["Channels", (m) => m.channels],
  ["Sample rate", (m) => m.sample_rate !== undefined && `${m.sample_rate} Hz`],
  ["Bitrate", (m) => m.bitrate !== undefined && `${Math.round(m.bitrate / 1000)} kbit/s`],
  ["Taken", (m) => m.taken_at && new Date(m.taken_at).toLocaleString()],
  ["Camera", (m) => m.camera],
  ["Problem", (m) => m.error],
];

function showDetails(file, actions) {
  const rows = [["Type", file.format], ["Size", humanSize(file.size)], ["Path", file.path || "—"]];
  if (file.media === null) rows.push(["Media", "not read yet"]);
  else for (const [name, value] of FIELDS) {
    const shown = value(file.media);
    if (shown !== undefined && shown !== null && shown !== false && shown !== "") rows.push([name, String(shown)]);
  }
  const list = h("dl", { class: "details" });
  for (const [name, value] of rows) list.append(h("dt", { text: name }), h("dd", { text: value, dir: "auto" }));
  const buttons = h("div", { class: "row" });
  const kind = file.format.split("/")[0];
  if (["image", "audio", "video"].includes(kind)) {
    buttons.append(h("button", { type: "button", text: kind === "image" ? "View" : "Play",
      onclick: () => { $("details").close(); actions.preview(file); } }));
  }
  buttons.append(h("button", { type: "button", class: "secondary", text: "Download",
    onclick: () => actions.download(file) }));
  $("details-title").textContent = shownName(file.name);
  $("details-body").replaceChildren(list, buttons);
  $("details").showModal();
}
