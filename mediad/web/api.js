// Talking to mediad: the session's token, JSON calls, and API errors in words.

const TOKEN = "mediad.token";
const USER = "mediad.user";

// The bearer token lives in sessionStorage only: never a cookie (no CSRF surface), never a URL.
export const session = {
  get token() { return sessionStorage.getItem(TOKEN); },
  get user() { return sessionStorage.getItem(USER); },
  save(token, user) {
    sessionStorage.setItem(TOKEN, token);
    sessionStorage.setItem(USER, user);
  },
  clear() {
    sessionStorage.removeItem(TOKEN);
    sessionStorage.removeItem(USER);
  },
};

export class ApiError extends Error {
  constructor(status, detail) {
    super(detail);
    this.name = "ApiError";
    this.status = status;
  }
}

// The sentence to show for a failed response: the problem+json `detail` when there is one.
export function problemDetail(status, text) {
  try {
    const body = JSON.parse(text);
    if (body && typeof body.detail === "string" && body.detail) return body.detail;
  } catch { /* not JSON: fall through */ }
  if (status === 0) return "the server could not be reached";
  return `the server answered ${status}`;
}

export function authHeaders() {
  const token = session.token;
  return token ? { Authorization: `Bearer ${token}` } : {};
}

// One JSON call. Resolves to the parsed body (null when there is none); rejects with ApiError.
export async function api(path, { method = "GET", json, body, headers = {} } = {}) {
  const init = { method, headers: { ...authHeaders(), ...headers }, cache: "no-store" };
  if (json !== undefined) {
    init.body = JSON.stringify(json);
    init.headers["Content-Type"] = "application/json";
  } else if (body !== undefined) {
    init.body = body;
  }
  let response;
  try {
    response = await fetch(path, init);
  } catch (err) {
    throw new ApiError(0, `the server could not be reached (${err.message})`);
  }
  const text = await response.text();
  if (!response.ok) {
    const error = new ApiError(response.status, problemDetail(response.status, text));
    if (response.status === 401 && session.token) window.dispatchEvent(new CustomEvent("mediad:unauthorized"));
    throw error;
  }
  return text ? JSON.parse(text) : null;
}

// A signed, expiring link to a file, as a same-origin path (fits the page's `media-src 'self'`).
export async function signedLink(fileId, { inline = false, expiresIn = 3600 } = {}) {
  return api(`/files/${encodeURIComponent(fileId)}/links`, {
    method: "POST", json: { expires_in: expiresIn, inline },
  });
}
