// The public APIs, reached through the console's pass-through (/console/api/<service>/<path>) with the
// credential the user signed in with. Every error is the API's own {"error": {code, message, details}}.

const TOKEN_KEY = "flywheel.token";
const ROLE_KEY = "flywheel.role";

export class ApiError extends Error {
  constructor(status, code, message, details) {
    super(message);
    this.status = status;
    this.code = code;
    this.details = details || {};
  }

  // Field-level messages (marshmallow's details.fields), flattened to {"field.path": "message"}.
  get fields() {
    const flat = {};
    const walk = (value, path) => {
      if (Array.isArray(value) && value.every((v) => typeof v === "string")) flat[path] = value.join(" ");
      else if (value && typeof value === "object") for (const [k, v] of Object.entries(value)) walk(v, path ? `${path}.${k}` : k);
      else if (value !== undefined) flat[path] = String(value);
    };
    walk(this.details.fields, "");
    return flat;
  }
}

export const auth = {
  get token() { return sessionStorage.getItem(TOKEN_KEY); },
  get role() { return sessionStorage.getItem(ROLE_KEY); },
  signIn(token, role) { sessionStorage.setItem(TOKEN_KEY, token); sessionStorage.setItem(ROLE_KEY, role); },
  signOut() { sessionStorage.removeItem(TOKEN_KEY); sessionStorage.removeItem(ROLE_KEY); },
};

// The kind of credential, by its public prefix: annotator token, partner key, or (anything else) the internal token.
export function roleOf(token) {
  if (token.startsWith("fwa_")) return "annotator";
  if (token.startsWith("fwk_")) return "partner";
  return "operator";
}

export async function api(service, path, { method = "GET", body, query, blob = false, token, headers: extra } = {}) {
  const url = new URL(`api/${service}${path}`, document.baseURI);
  for (const [name, value] of Object.entries(query || {})) {
    if (value !== undefined && value !== null && value !== "") url.searchParams.set(name, value);
  }
  const headers = { Accept: "application/json", ...(extra || {}) };
  const credential = token || auth.token;
  if (credential) headers.Authorization = `Bearer ${credential}`;
  const init = { method, headers };
  if (body !== undefined) {
    headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch(url, init);
  } catch (error) {
    throw new ApiError(0, "unreachable", "the console's server does not answer; check that Flywheel is running");
  }
  if (response.status === 204) return null;
  if (!response.ok) {
    let error = {};
    try { error = (await response.json()).error || {}; } catch (_) { /* not JSON */ }
    throw new ApiError(response.status, error.code || `http_${response.status}`, error.message || response.statusText, error.details);
  }
  if (blob) return response.blob();
  const type = response.headers.get("Content-Type") || "";
  return type.includes("json") ? response.json() : response.text();
}
