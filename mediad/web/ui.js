// Shared page helpers: element lookup and building, sizes in words, the error banner.

export const $ = (id) => document.getElementById(id);

// Elements are built with textContent only: file names are user input, never HTML.
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === false || value === null || value === undefined) continue;
    if (name.startsWith("on")) el.addEventListener(name.slice(2), value);
    else if (name === "text") el.textContent = value;
    else el.setAttribute(name, value === true ? "" : value);
  }
  for (const child of children) if (child !== null && child !== undefined) el.append(child);
  return el;
}

// Bidi embedding, override and isolate controls can make "evil\u202Etxt.exe" read "evilexe.txt":
// names are stored as sent, so the page shows those controls as visible code points instead.
const BIDI_CONTROLS = /[\u202A-\u202E\u2066-\u2069]/g;

export function shownName(text) {
  return text.replace(BIDI_CONTROLS, (c) => `[U+${c.codePointAt(0).toString(16).toUpperCase()}]`);
}

export function humanSize(bytes) {
  if (bytes < 1024) return `${bytes} ${bytes === 1 ? "byte" : "bytes"}`;
  const units = ["KiB", "MiB", "GiB", "TiB", "PiB"];
  let value = bytes / 1024;
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit += 1;
  }
  return `${value < 10 ? value.toFixed(1) : Math.round(value)} ${units[unit]}`;
}

function errorText(err) {
  return err && err.message ? err.message : String(err); // an ApiError's message is the problem's detail
}

export function showError(err, what) {
  $("alert-text").textContent = what ? `${what}: ${errorText(err)}` : errorText(err);
  $("alert").hidden = false;
}

export function clearError() {
  $("alert").hidden = true;
}

// A folder as the API wants it: absolute, ending in "/" (or null for none).
export function folderPath(text) {
  const trimmed = text.trim();
  if (!trimmed) return null;
  let path = trimmed.startsWith("/") ? trimmed : `/${trimmed}`;
  if (!path.endsWith("/")) path += "/";
  return path;
}
