// The operator console: a list of sessions and a page per session, read from the JSON
// operator API. No build step, no dependency. Everything from the API is untrusted text:
// it reaches the page through textContent and createElement only, never as markup.

const PAGE_SIZE = 25; // sessions per page (the hash may say otherwise: #/?limit=2)
const FAST_REFRESH_MS = 2000; // while something shown is still moving
const SLOW_REFRESH_MS = 15000; // when everything shown has ended
const MISSING_SHOWN = 20; // missing sequences listed before "… and K more"
const KEY_STORAGE = "audience-console-key"; // sessionStorage only: gone with the tab

const SESSION_STATES = [
  "receiving", "complete", "delivering", "delivered", "partially_delivered",
  "failed", "inconsistent", "expired", "aborted",
];
// Nothing more happens to these by itself (states.ENDED, and expired).
const SESSION_ENDED = new Set(["delivered", "partially_delivered", "failed", "aborted",
  "inconsistent", "expired"]);
// An abort would change nothing that matters here (states.ABORT_KEEPS, and the ended ones).
const ABORT_DISABLED = new Set(["delivered", "partially_delivered", "failed", "aborted",
  "expired"]);
const DELIVERY_MOVING = new Set(["pending", "running"]);

// -- small DOM helpers ----------------------------------------------------------------------

/** An element with attributes (strings, via setAttribute) and children (nodes or text). */
function h(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) continue;
    if (name === "text") node.textContent = String(value);
    else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else node.setAttribute(name, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

const $ = (id) => document.getElementById(id);
const fmt = new Intl.NumberFormat("en-US");
const num = (value) => (value === null || value === undefined ? "—" : fmt.format(value));
const pad = (n) => String(n).padStart(2, "0");

function clock(date) {
  return `${pad(date.getHours())}:${pad(date.getMinutes())}:${pad(date.getSeconds())}`;
}

/** "3 min ago" / "in 2 h" from an ISO time; "—" for null. */
function relative(iso, now = Date.now()) {
  if (!iso) return "—";
  const seconds = Math.round((Date.parse(iso) - now) / 1000);
  const size = Math.abs(seconds);
  let text;
  if (size < 10) return seconds <= 0 ? "just now" : "in a moment";
  if (size < 60) text = `${size} s`;
  else if (size < 3600) text = `${Math.floor(size / 60)} min`;
  else if (size < 86400) text = `${Math.floor(size / 3600)} h`;
  else text = `${Math.floor(size / 86400)} d`;
  return seconds < 0 ? `${text} ago` : `in ${text}`;
}

/** A <time> that keeps its relative text current (see tickTimes). */
function timeAgo(iso) {
  if (!iso) return h("span", { class: "muted", text: "—" });
  return h("time", { datetime: iso, title: iso, "data-relative": "", text: relative(iso) });
}

function tickTimes() {
  const now = Date.now();
  for (const node of document.querySelectorAll("time[data-relative]")) {
    node.textContent = relative(node.getAttribute("datetime"), now);
  }
}

function badge(state, kind = "session") {
  const label = String(state).replaceAll("_", " ");
  return h("span", { class: `badge ${kind}-${state}`, "data-state": state, text: label });
}

function meter(label, value, max) {
  const done = Math.min(value ?? 0, max ?? 0);
  const bar = h("progress", {
    max: Math.max(max ?? 0, 1),
    value: done,
    "aria-label": label,
    "aria-valuemin": 0,
    "aria-valuenow": value ?? 0,
    "aria-valuemax": max ?? 0,
    "data-meter": label,
  });
  return h("div", { class: "meter" },
    h("span", { class: "meter-label", text: label }),
    bar,
    h("span", { class: "meter-count", text: `${num(value)} / ${num(max)}` }));
}

// -- the API --------------------------------------------------------------------------------

class AuthNeeded extends Error {}

class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

function storedKey() {
  return sessionStorage.getItem(KEY_STORAGE);
}

/** The API's answer as JSON; AuthNeeded on 401, ApiError with the API's own words otherwise. */
async function api(method, path) {
  const headers = { Accept: "application/json" };
  const key = storedKey();
  if (key) headers.Authorization = `Bearer ${key}`;
  let response;
  try {
    response = await fetch(path, { method, headers, cache: "no-store", credentials: "omit" });
  } catch (error) {
    throw new ApiError(0, `The server cannot be reached (${error.message}).`);
  }
  const text = await response.text();
  let body = null;
  try {
    body = text ? JSON.parse(text) : null;
  } catch {
    body = null;
  }
  if (response.status === 401) throw new AuthNeeded(errorText(body, text, response));
  if (!response.ok) throw new ApiError(response.status, errorText(body, text, response));
  return body;
}

function errorText(body, text, response) {
  if (body && Array.isArray(body.errors) && body.errors.length) return body.errors.join(" ");
  if (text && !body) return text.slice(0, 500);
  return `HTTP ${response.status} ${response.statusText}`.trim();
}

// -- the key form ---------------------------------------------------------------------------

function showKeyForm(refused) {
  $("view").replaceChildren();
  $("key-panel").hidden = false;
  const error = $("key-error");
  error.hidden = !refused;
  error.textContent = refused ? "That key was refused. Check it and try again." : "";
  $("refresh-status").textContent = "";
  $("key-input").focus();
}

function setUpKeyForm() {
  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const key = $("key-input").value.trim();
    if (!key) return;
    sessionStorage.setItem(KEY_STORAGE, key);
    $("key-input").value = "";
    $("key-panel").hidden = true;
    updateForgetLink();
    route();
  });
  $("forget-key").addEventListener("click", (event) => {
    event.preventDefault();
    sessionStorage.removeItem(KEY_STORAGE);
    updateForgetLink();
    route();
  });
}

function updateForgetLink() {
  $("forget-key").hidden = !storedKey();
}

// -- refreshing -----------------------------------------------------------------------------

// One view is live at a time; a view is { refresh(): Promise<boolean> } whose result says
// whether anything it shows is still moving. Stale answers (of a view left meanwhile) are
// dropped by comparing generations.
let generation = 0;
let timer = null;
let current = null;
let refreshing = false;
let again = false; // asked for while a refresh was on its way: its answer may predate a change

function schedule(ms) {
  clearTimeout(timer);
  timer = setTimeout(tick, ms);
}

async function tick() {
  if (document.visibilityState === "hidden") return; // resumed on visibilitychange
  await refreshNow();
}

async function refreshNow() {
  const view = current;
  const mine = generation;
  if (!view) return;
  if (refreshing) {
    again = true;
    return;
  }
  refreshing = true;
  again = false;
  clearTimeout(timer);
  let moving = false;
  try {
    moving = await view.refresh(mine);
    if (mine !== generation) return;
    $("key-panel").hidden = true;
    $("refresh-status").textContent = `updated ${clock(new Date())}`;
    view.showError(null);
  } catch (error) {
    if (mine !== generation) return;
    if (error instanceof AuthNeeded) {
      const hadKey = Boolean(storedKey());
      current = null;
      showKeyForm(hadKey);
      return;
    }
    view.showError(error.message);
    moving = error.status !== 404; // soon, unless it is gone: the server may be back
  } finally {
    refreshing = false;
  }
  if (mine !== generation) return;
  if (again) refreshNow();
  else schedule(moving ? FAST_REFRESH_MS : SLOW_REFRESH_MS);
}

function start(view) {
  generation += 1;
  clearTimeout(timer);
  refreshing = false;
  again = false;
  current = view;
  refreshNow();
}

// -- routing --------------------------------------------------------------------------------

function parseHash() {
  const raw = location.hash.replace(/^#/, "") || "/";
  const [path, query = ""] = raw.split("?");
  const match = path.match(/^\/sessions\/(.+)$/);
  if (match) return { page: "session", id: decodeURIComponent(match[1]) };
  return { page: "list", params: new URLSearchParams(query) };
}

function route() {
  const where = parseHash();
  $("key-panel").hidden = true;
  if (where.page === "session") start(sessionView(where.id));
  else start(listView(where.params));
}

// -- the list -------------------------------------------------------------------------------

function movingSession(session) {
  if (!SESSION_ENDED.has(session.state)) return true;
  return (session.deliveries || []).some((d) => DELIVERY_MOVING.has(d.state));
}

function listView(params) {
  const wanted = {
    state: params.get("state") || "",
    name: params.get("name") || "",
    limit: Number.parseInt(params.get("limit") || "", 10) || PAGE_SIZE,
  };
  const cursors = [null]; // cursors[i] fetches page i; Previous pops, Next pushes
  let nextCursor = null;
  let lastBody = null;

  const stateSelect = h("select", { id: "filter-state", name: "state", "aria-label": "state" },
    h("option", { value: "", text: "any state" }),
    SESSION_STATES.map((s) => h("option", { value: s, text: s.replaceAll("_", " ") })));
  stateSelect.value = wanted.state;
  const nameInput = h("input", {
    id: "filter-name", name: "name", type: "search", placeholder: "name contains…",
    "aria-label": "name", value: wanted.name, autocomplete: "off",
  });
  const applyFilters = (event) => {
    if (event) event.preventDefault();
    const query = new URLSearchParams();
    if (stateSelect.value) query.set("state", stateSelect.value);
    if (nameInput.value.trim()) query.set("name", nameInput.value.trim());
    if (wanted.limit !== PAGE_SIZE) query.set("limit", String(wanted.limit));
    const hash = `#/${query.toString() ? `?${query}` : ""}`;
    if (location.hash === hash) route();
    else location.hash = hash;
  };
  stateSelect.addEventListener("change", applyFilters);
  const filters = h("form", { class: "filters", id: "filters", onsubmit: applyFilters },
    h("label", {}, "State ", stateSelect),
    h("label", {}, "Name ", nameInput),
    h("button", { type: "submit", text: "Filter" }),
    (wanted.state || wanted.name) ? h("a", { href: "#/", class: "clear", text: "clear" }) : null);

  const error = h("p", { class: "error", role: "alert", hidden: true });
  const tbody = h("tbody", { id: "sessions-body" });
  const table = h("table", { class: "sessions", id: "sessions" },
    h("thead", {}, h("tr", {},
      ["Name", "State", "Progress", "Created", "Expires", "Deliveries"].map(
        (title) => h("th", { scope: "col", text: title }))),
    ),
    tbody);
  const empty = h("p", { class: "empty muted", id: "sessions-empty", hidden: true });
  const previous = h("button", { type: "button", id: "page-previous", text: "← Previous" });
  const next = h("button", { type: "button", id: "page-next", text: "Next →" });
  const pageInfo = h("span", { class: "muted", id: "page-info" });
  previous.addEventListener("click", () => {
    if (cursors.length > 1) cursors.pop();
    lastBody = null;
    refreshNow();
  });
  next.addEventListener("click", () => {
    if (!nextCursor) return;
    cursors.push(nextCursor);
    lastBody = null;
    refreshNow();
  });

  $("view").replaceChildren(
    h("div", { class: "heading" }, h("h1", { text: "Sessions" }), filters),
    error,
    h("div", { class: "card table-card" }, table, empty),
    h("nav", { class: "pager", "aria-label": "pages" }, previous, pageInfo, next),
  );
  document.title = "Sessions · Audience Server";

  function row(session) {
    const id = session.sessionId;
    const deliveries = session.deliveries || [];
    return h("tr", { "data-session-id": id, "data-state": session.state },
      h("td", { class: "name" },
        h("a", { href: `#/sessions/${encodeURIComponent(id)}`, text: session.name }),
        h("div", { class: "muted small mono", text: `${id} · ${session.type}` })),
      h("td", {}, badge(session.state)),
      h("td", { class: "progress" },
        meter("batches", session.receivedBatches, session.totalBatches),
        meter("users", session.receivedUsers, session.totalUsers)),
      h("td", { class: "nowrap" }, timeAgo(session.createdAt)),
      h("td", { class: "nowrap" }, session.expiresAt ? timeAgo(session.expiresAt)
        : h("span", { class: "muted", text: "—" })),
      h("td", { class: "deliveries" }, deliveries.length
        ? h("ul", { class: "plain" }, deliveries.map((d) => h("li", {
          "data-destination": d.destination, "data-state": d.state,
        }, h("span", { class: "destination", text: `${d.destination}: ` }),
        badge(d.state, "delivery"))))
        : h("span", { class: "muted", text: "none" })),
    );
  }

  return {
    showError(message) {
      error.hidden = !message;
      error.textContent = message || "";
    },
    async refresh(mine) {
      const query = new URLSearchParams({ limit: String(wanted.limit) });
      if (wanted.state) query.set("state", wanted.state);
      if (wanted.name) query.set("name", wanted.name);
      const cursor = cursors[cursors.length - 1];
      if (cursor) query.set("cursor", cursor);
      const body = await api("GET", `/audience/sessions?${query}`);
      if (mine !== generation) return false;
      const serialized = JSON.stringify(body);
      if (serialized !== lastBody) { // unchanged: keep the DOM (and the reader's selection)
        lastBody = serialized;
        tbody.replaceChildren(...body.sessions.map(row));
      }
      tickTimes();
      nextCursor = body.nextCursor;
      empty.hidden = body.sessions.length > 0;
      table.hidden = body.sessions.length === 0;
      empty.textContent = (wanted.state || wanted.name) ? "No session matches these filters."
        : (cursors.length > 1 ? "No more sessions." : "No sessions yet.");
      previous.disabled = cursors.length <= 1;
      next.disabled = !nextCursor;
      pageInfo.textContent = `page ${cursors.length}`;
      return body.sessions.some(movingSession);
    },
  };
}

// -- one session ----------------------------------------------------------------------------

function sessionView(id) {
  const path = `/audience/sessions/${encodeURIComponent(id)}`;
  let session = null;
  let lastBody = null;
  let refreshFailed = false; // the error shown is a refresh's (cleared by the next good one)

  const error = h("p", { class: "error", role: "alert", id: "session-error", hidden: true });
  const notice = h("p", { class: "notice", role: "status", id: "session-notice", hidden: true });
  const title = h("h1", { id: "session-name", text: id });
  const stateSlot = h("span", { id: "session-state" });
  const retry = h("button", { type: "button", id: "retry", disabled: true,
    text: "Retry failed deliveries" });
  const abort = h("button", { type: "button", id: "abort", class: "danger", disabled: true,
    text: "Abort" });
  const summary = h("div", { class: "card", id: "session-summary" });
  const deliveries = h("div", { class: "card table-card", id: "session-deliveries" });

  retry.addEventListener("click", () => act(retry, "POST", `${path}/retry`, (body) => {
    const names = (body && body.retried) || [];
    return `Re-queued ${names.length === 1 ? "delivery" : "deliveries"}: ${names.join(", ")}.`;
  }));
  abort.addEventListener("click", () => {
    const dialog = $("abort-dialog");
    $("abort-name").textContent = session ? session.name : id;
    $("abort-id").textContent = id;
    dialog.returnValue = "";
    dialog.addEventListener("close", () => {
      if (dialog.returnValue === "confirm") {
        act(abort, "DELETE", path, () => "Session aborted; its stored users were purged.");
      }
    }, { once: true });
    dialog.showModal();
  });

  async function act(button, method, url, describe) {
    const mine = generation;
    button.disabled = true;
    notice.hidden = true;
    try {
      const body = await api(method, url);
      if (mine !== generation) return;
      error.hidden = true;
      notice.textContent = describe(body);
      notice.hidden = false;
    } catch (failure) {
      if (mine !== generation) return;
      if (failure instanceof AuthNeeded) {
        current = null;
        showKeyForm(Boolean(storedKey()));
        return;
      }
      refreshFailed = false; // an action's error stays until the next action
      error.textContent = failure.message;
      error.hidden = false;
    }
    lastBody = null;
    await refreshNow();
  }

  $("view").replaceChildren(
    h("p", { class: "crumbs" }, h("a", { href: "#/", id: "back", text: "← Sessions" })),
    h("div", { class: "heading" },
      h("div", { class: "title" }, title, stateSlot),
      h("div", { class: "actions" }, retry, abort)),
    error,
    notice,
    summary,
    h("h2", { text: "Deliveries" }),
    deliveries,
  );
  document.title = `Session ${id} · Audience Server`;

  function field(label, ...value) {
    return [h("dt", { text: label }), h("dd", { "data-field": label }, ...value)];
  }

  function missing(list) {
    if (!list || list.length === 0) return h("span", { class: "muted", text: "none" });
    const shown = list.slice(0, MISSING_SHOWN).join(", ");
    const more = list.length - MISSING_SHOWN;
    return h("span", { class: "mono", id: "missing-sequences",
      text: more > 0 ? `${shown} … and ${fmt.format(more)} more` : shown });
  }

  function when(iso) {
    if (!iso) return h("span", { class: "muted", text: "—" });
    const shown = `${iso.replace("T", " ").replace(/\.\d+/, "").replace(/Z$/, "")} UTC`;
    return h("span", {}, h("span", { class: "mono", title: iso, text: shown }), " (",
      timeAgo(iso), ")");
  }

  function renderSummary(s) {
    const received = h("dl", { class: "fields" },
      field("Batches received", meter("batches", s.receivedBatches, s.totalBatches)),
      field("Users received", meter("users", s.receivedUsers, s.totalUsers)),
      field("Assembled users", s.assembledUsers === null ? h("span", { class: "muted",
        text: "not started" }) : `${num(s.assembledUsers)} of ${num(s.totalUsers)}`),
      field("Unique users", s.uniqueUsers === null ? h("span", { class: "muted",
        text: "not yet known" }) : num(s.uniqueUsers)),
      field("Missing sequences", missing(s.missingSequences)),
      field("Sequence base", s.sequenceBase === null ? h("span", { class: "muted",
        text: "not settled" }) : String(s.sequenceBase)),
    );
    const facts = h("dl", { class: "fields" },
      field("Session id", h("span", { class: "mono", text: s.sessionId })),
      field("Type", s.type),
      field("Reason", s.reason ? h("span", { id: "session-reason", text: s.reason })
        : h("span", { class: "muted", text: "—" })),
      field("Created", when(s.createdAt)),
      field("Updated", when(s.updatedAt)),
      field("Expires", when(s.expiresAt)),
    );
    summary.replaceChildren(h("div", { class: "columns" }, received, facts));
  }

  function renderDeliveries(list) {
    if (!list.length) {
      deliveries.replaceChildren(h("p", { class: "empty muted",
        text: "No deliveries (yet): they are created when the session is complete." }));
      return;
    }
    const headings = ["Destination", "Kind", "Segment", "State", "Attempts", "Users sent",
      "Invalid users", "Last error", "Updated"];
    deliveries.replaceChildren(h("table", { class: "deliveries", id: "deliveries" },
      h("thead", {}, h("tr", {}, headings.map((t) => h("th", { scope: "col", text: t })))),
      h("tbody", {}, list.map((d) => h("tr", {
        "data-destination": d.destination, "data-state": d.state,
      },
      h("td", { class: "strong", text: d.destination }),
      h("td", { text: d.kind }),
      h("td", { class: "mono small", text: d.segmentName }),
      h("td", {}, badge(d.state, "delivery")),
      h("td", { class: "num", text: num(d.attempts) }),
      h("td", { class: "num", text: num(d.usersSent) }),
      h("td", { class: "num", text: num(d.invalidUsers) }),
      h("td", { class: "last-error" }, d.lastError ? h("span", { class: "error-text",
        text: d.lastError }) : h("span", { class: "muted", text: "—" })),
      h("td", { class: "nowrap" }, timeAgo(d.updatedAt)),
      )))));
  }

  return {
    showError(message) {
      if (message) {
        refreshFailed = true;
        error.textContent = message;
        error.hidden = false;
      } else if (refreshFailed) {
        refreshFailed = false;
        error.hidden = true;
      }
    },
    async refresh(mine) {
      const body = await api("GET", path);
      if (mine !== generation) return false;
      const serialized = JSON.stringify(body);
      if (serialized !== lastBody) {
        lastBody = serialized;
        session = body;
        title.textContent = body.name;
        stateSlot.replaceChildren(badge(body.state));
        renderSummary(body);
        renderDeliveries(body.deliveries || []);
        document.title = `${body.name} · Audience Server`;
      }
      tickTimes();
      retry.disabled = !(body.deliveries || []).some((d) => d.state === "failed");
      retry.title = retry.disabled ? "No delivery has failed." : "Re-queue every failed delivery.";
      abort.disabled = ABORT_DISABLED.has(body.state);
      abort.title = abort.disabled ? `Nothing to abort: the session is ${body.state}.`
        : "Abort the session and purge its stored users.";
      return movingSession(body);
    },
  };
}

// -- start ----------------------------------------------------------------------------------

function main() {
  setUpKeyForm();
  updateForgetLink();
  window.addEventListener("hashchange", route);
  document.addEventListener("visibilitychange", () => {
    if (document.visibilityState === "visible") refreshNow();
  });
  route();
}

main();
