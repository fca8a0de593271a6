// A small tus 1.0.0 client: core protocol, creation and termination (https://tus.io/protocols/resumable-upload).
//
// Chunks go up with XMLHttpRequest because fetch() reports no upload progress. The upload URL is
// kept in localStorage under the file's fingerprint, so choosing the same file again, after a
// reload, a dropped connection or a server restart, asks the server for its offset (HEAD) and
// continues from there instead of starting over.

import { authHeaders, problemDetail } from "./api.js";

const TUS = "1.0.0";
const STORE_PREFIX = "mediad.tus:";
const CHUNK_BYTES = 8 * 1024 * 1024; // a server crash loses at most the chunk in flight
const RETRY_DELAYS_MS = [500, 1000, 2000, 3000, 5000]; // then every 5 s: a restart takes seconds
const MAX_ATTEMPTS = 120; // ~10 minutes of trying without progress, then the user decides

class UploadError extends Error {
  constructor(message, { retry = false, restart = false, resync = false } = {}) {
    super(message);
    this.retry = retry; // worth trying again after a delay
    this.restart = restart; // the upload is gone on the server: create a new one
    this.resync = resync; // our offset is stale: ask the server (no delay)
  }
}

function b64(text) {
  const bytes = new TextEncoder().encode(text);
  let binary = "";
  for (const byte of bytes) binary += String.fromCharCode(byte);
  return btoa(binary);
}

export function fingerprint(owner, file, path) {
  return `${STORE_PREFIX}${owner}:${path || ""}:${file.name}:${file.size}:${file.lastModified}`;
}

// Unfinished uploads this browser remembers for `owner`: [{key, url, name, size, path}].
export function rememberedUploads(owner) {
  const found = [];
  for (let i = 0; i < localStorage.length; i += 1) {
    const key = localStorage.key(i);
    if (!key || !key.startsWith(`${STORE_PREFIX}${owner}:`)) continue;
    try {
      found.push({ key, ...JSON.parse(localStorage.getItem(key)) });
    } catch {
      localStorage.removeItem(key);
    }
  }
  return found;
}

// Remove an upload's partial bytes from the server (termination); true when they are gone.
// A PATCH that was just aborted may still hold the upload for a moment (423): try again briefly.
async function terminate(url) {
  for (let attempt = 1; attempt <= 8; attempt += 1) {
    let response;
    try {
      response = await fetch(url, { method: "DELETE", headers: { ...authHeaders(), "Tus-Resumable": TUS } });
    } catch {
      return false; // unreachable: the upload expires on the server anyway
    }
    if (response.status !== 423) return response.ok || response.status === 404 || response.status === 410;
    await new Promise((resolve) => { setTimeout(resolve, 150 * attempt); });
  }
  return false;
}

// Forget an unfinished upload and remove its partial bytes from the server.
export async function discardUpload(entry) {
  localStorage.removeItem(entry.key);
  await terminate(entry.url);
}

function request(method, url, { headers = {}, body = null, onProgress = null, track = null } = {}) {
  return new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    xhr.open(method, url);
    for (const [name, value] of Object.entries({ ...authHeaders(), "Tus-Resumable": TUS, ...headers })) {
      xhr.setRequestHeader(name, value);
    }
    if (onProgress) xhr.upload.onprogress = (event) => onProgress(event.loaded);
    xhr.onload = () => resolve(xhr);
    xhr.onerror = () => reject(new UploadError("the connection to the server failed", { retry: true }));
    xhr.ontimeout = () => reject(new UploadError("the server did not answer in time", { retry: true }));
    xhr.onabort = () => reject(new UploadError("stopped"));
    if (track) track(xhr);
    xhr.send(body);
  });
}

// Turn a non-success answer into an UploadError that says what to do next.
function failure(xhr, what) {
  const status = xhr.status;
  const detail = problemDetail(status, xhr.responseText);
  if (status === 404 || status === 410) return new UploadError(`${what}: ${detail}`, { restart: true });
  if (status === 409) return new UploadError(`${what}: ${detail}`, { resync: true });
  if (status === 423 || status === 429 || status >= 500 || status === 0) {
    return new UploadError(`${what}: ${detail}`, { retry: true });
  }
  return new UploadError(detail); // 400, 401, 413, 415, 422, 460…: retrying would not help
}

export class TusUpload {
  // options: endpoint, owner, path (target folder or null), onProgress(sent, total),
  // onStatus(text), onSuccess(fileId), onError(message), onStateChange(state)
  constructor(file, options) {
    this.file = file;
    this.options = options;
    this.key = fingerprint(options.owner, file, options.path);
    this.url = null;
    this.offset = 0;
    this.state = "idle"; // idle | running | paused | done | failed | cancelled
    this.xhr = null;
    this.wake = null;
  }

  get total() { return this.file.size; }

  start() {
    if (this.state === "running" || this.state === "done" || this.state === "cancelled") return;
    this._setState("running");
    this._run();
  }

  pause() {
    if (this.state !== "running") return;
    this._setState("paused");
    this._interrupt();
    this.options.onStatus("Paused");
  }

  async cancel() {
    if (this.state === "done" || this.state === "cancelled") return;
    this._setState("cancelled");
    this._interrupt();
    localStorage.removeItem(this.key);
    const removed = !this.url || await terminate(this.url);
    this.options.onStatus(removed ? "Cancelled" : "Cancelled (the server removes the partial upload when it expires)");
  }

  _setState(state) {
    this.state = state;
    if (this.options.onStateChange) this.options.onStateChange(state);
  }

  _interrupt() {
    if (this.xhr) this.xhr.abort();
    if (this.wake) this.wake();
  }

  _sleep(ms) {
    return new Promise((resolve) => {
      const timer = setTimeout(resolve, ms);
      this.wake = () => { clearTimeout(timer); resolve(); };
    });
  }

  async _run() {
    let attempt = 0;
    let restarts = 0;
    while (this.state === "running") {
      try {
        if (!this.url) await this._resumeOrCreate();
        else await this._head();
        while (this.state === "running") {
          const fileId = await this._sendChunk();
          attempt = 0;
          if (fileId) {
            localStorage.removeItem(this.key);
            this._setState("done");
            this.options.onProgress(this.total, this.total);
            this.options.onSuccess(fileId);
            return;
          }
        }
      } catch (err) {
        if (this.state !== "running") return; // paused or cancelled: the abort is ours
        if (err.restart && restarts < 2) {
          localStorage.removeItem(this.key);
          this.url = null;
          this.offset = 0;
          restarts += 1;
        } else if (err.resync && attempt < MAX_ATTEMPTS) {
          attempt += 1; // HEAD at the top of the loop finds the server's offset
        } else if (err.retry && attempt < MAX_ATTEMPTS) {
          const delay = RETRY_DELAYS_MS[Math.min(attempt, RETRY_DELAYS_MS.length - 1)];
          attempt += 1;
          this.options.onStatus(`${err.message}; retrying in ${Math.ceil(delay / 1000)} s…`);
          await this._sleep(delay);
        } else {
          this._setState("failed");
          this.options.onError(err.message);
          return;
        }
      }
    }
  }

  async _resumeOrCreate() {
    const saved = localStorage.getItem(this.key);
    if (saved) {
      try {
        this.url = JSON.parse(saved).url;
        await this._head();
        this.options.onStatus(`Resuming at ${Math.round((100 * this.offset) / Math.max(this.total, 1))}%`);
        return;
      } catch (err) {
        if (!err.restart) throw err;
        localStorage.removeItem(this.key); // expired or removed on the server: start over
        this.url = null;
      }
    }
    const metadata = [`filename ${b64(this.file.name)}`];
    if (this.options.path) metadata.push(`path ${b64(this.options.path)}`);
    const xhr = await request("POST", this.options.endpoint, {
      headers: { "Upload-Length": String(this.total), "Upload-Metadata": metadata.join(",") },
      track: (x) => { this.xhr = x; },
    });
    if (xhr.status !== 201) throw failure(xhr, "could not start the upload");
    this.url = new URL(xhr.getResponseHeader("Location"), new URL(this.options.endpoint, location.href)).href;
    this.offset = 0;
    localStorage.setItem(this.key, JSON.stringify({
      url: this.url, name: this.file.name, size: this.total, path: this.options.path || null,
    }));
    const fileId = xhr.getResponseHeader("Mediad-File-Id"); // an empty file is done at creation
    if (fileId) this.createdFileId = fileId;
  }

  async _head() {
    const xhr = await request("HEAD", this.url, { track: (x) => { this.xhr = x; } });
    if (xhr.status !== 200 && xhr.status !== 204) throw failure(xhr, "could not resume the upload");
    this.offset = Number(xhr.getResponseHeader("Upload-Offset"));
    this.options.onProgress(this.offset, this.total);
  }

  // One PATCH; resolves to the File id when the upload is complete, else null.
  async _sendChunk() {
    if (this.createdFileId) return this.createdFileId;
    if (this.offset >= this.total && this.total > 0) return this._finishedFileId();
    const start = this.offset;
    const end = Math.min(start + CHUNK_BYTES, this.total);
    const xhr = await request("PATCH", this.url, {
      headers: { "Upload-Offset": String(start), "Content-Type": "application/offset+octet-stream" },
      body: this.file.slice(start, end),
      onProgress: (loaded) => this.options.onProgress(start + loaded, this.total),
      track: (x) => { this.xhr = x; },
    });
    if (xhr.status !== 204) throw failure(xhr, "the upload was interrupted");
    this.offset = Number(xhr.getResponseHeader("Upload-Offset"));
    this.options.onProgress(this.offset, this.total);
    return xhr.getResponseHeader("Mediad-File-Id");
  }

  // Every byte is on the server but the answer to the last PATCH was lost: ask which File it made.
  async _finishedFileId() {
    const xhr = await request("GET", this.url, { track: (x) => { this.xhr = x; } });
    if (xhr.status !== 200) throw failure(xhr, "could not check the finished upload");
    const status = JSON.parse(xhr.responseText);
    if (!status.file_id) throw new UploadError("the server is still finishing this upload", { retry: true });
    return status.file_id;
  }
}
