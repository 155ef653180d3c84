"""The operator console at /console: its routes and headers, its static files, and the page
itself driven in headless Chromium against real server processes."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2
import pytest
from playwright.sync_api import Browser, Locator, Page, Request, expect, sync_playwright
from starlette.testclient import TestClient

from audience_server.app import create_app
from audience_server.console import STATIC_DIR
from audience_server.settings import Settings
from tests.conftest import make_users
from tests.emulators.webhook import WebhookEmulator
from tests.helpers import HOOK_SECRET, form
from tests.servers import ServerProcess, clean_env

CHROMIUM = Path("/usr/bin/chromium")
SCREENSHOTS_ENV = "AUDIENCE_TEST_SCREENSHOTS"
WAIT_MS = 30_000  # a limit for what the page shows by itself, never a wait for a result
API_KEY = "console-key-7f3a9c"
AUTH = {"Authorization": f"Bearer {API_KEY}"}

# -- without a browser ------------------------------------------------------------------------


@pytest.fixture
def console(tmp_path: Path) -> Iterator[TestClient]:
    """The app on a SQLite file, API keys configured: the console must not need one."""
    settings = Settings(
        database_url=f"sqlite:///{tmp_path / 'audience.db'}", api_keys={API_KEY: "ops"}
    )
    app = create_app(settings, sweeper=False, destinations={}, worker=False)
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client


def test_root_redirects_to_the_console(console: TestClient) -> None:
    response = console.get("/", follow_redirects=False)
    assert response.status_code == 307
    assert response.headers["location"] == "/console"


def test_the_page_is_public_and_locked_down(console: TestClient) -> None:
    response = console.get("/console")
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/html; charset=utf-8"
    policy = dict(
        part.strip().split(" ", 1)
        for part in response.headers["content-security-policy"].split(";")
    )
    assert policy["default-src"] == "'self'"
    assert policy["script-src"] == "'self'"
    assert policy["style-src"] == "'self'"
    assert policy["frame-ancestors"] == "'none'"
    assert "unsafe" not in response.headers["content-security-policy"]
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["referrer-policy"] == "no-referrer"
    assert response.headers["cache-control"] == "no-store"
    assert 'src="/console/static/console.js"' in response.text
    assert 'href="/console/static/console.css"' in response.text
    # The page is public; the data is not.
    assert console.get("/audience/sessions").status_code == 401


@pytest.mark.parametrize(
    ("name", "media_type"),
    [("console.js", "text/javascript"), ("console.css", "text/css"), ("index.html", "text/html")],
)
def test_static_files_are_served_with_their_types(
    console: TestClient, name: str, media_type: str
) -> None:
    response = console.get(f"/console/static/{name}")
    assert response.status_code == 200
    assert response.headers["content-type"] == f"{media_type}; charset=utf-8"
    assert response.headers["x-content-type-options"] == "nosniff"
    assert "frame-ancestors 'none'" in response.headers["content-security-policy"]
    assert response.content == (STATIC_DIR / name).read_bytes()


def test_unknown_static_file_is_404(console: TestClient) -> None:
    assert console.get("/console/static/nope.js").status_code == 404
    assert console.get("/console/static/../console.py").status_code == 404


def static_files() -> list[Path]:
    files = sorted(STATIC_DIR.iterdir())
    assert {path.name for path in files} == {"index.html", "console.js", "console.css"}
    return files


def test_no_external_url_in_any_static_file() -> None:
    for path in static_files():
        text = path.read_text()
        found = re.findall(r"https?://|src=[\"']//|href=[\"']//|url\(\s*[\"']?//", text, re.I)
        assert not found, f"{path.name} refers to another origin: {found}"
        assert "@import" not in text, path.name


def test_the_page_has_no_inline_script_or_style() -> None:
    html = (STATIC_DIR / "index.html").read_text()
    assert re.findall(r"<script\b[^>]*>", html) == [
        '<script type="module" src="/console/static/console.js">'
    ]
    assert "<style" not in html
    assert not re.search(r"\sstyle=", html)
    assert not re.search(r"\son[a-z]+=", html)  # no inline event handlers


def test_the_script_never_writes_markup() -> None:
    script = (STATIC_DIR / "console.js").read_text()
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval("):
        assert sink not in script, sink
    assert "localStorage" not in script  # the key lives in sessionStorage only


# -- in Chromium ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not CHROMIUM.exists():
        reason = f"the console's browser tests need Debian's chromium at {CHROMIUM}"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{reason} (.ci/run installs it)")
        pytest.skip(f"{reason} (apt-get install chromium)")
    expect.set_options(timeout=WAIT_MS)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True)
        yield browser
        browser.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    """A fresh tab (its own storage) that fails the test on a script error or a CSP report."""
    context = browser.new_context(viewport={"width": 1280, "height": 860})
    page = context.new_page()
    page.set_default_timeout(WAIT_MS)
    problems: list[str] = []
    page.on("pageerror", lambda error: problems.append(f"script error: {error}"))
    page.on(
        "console",
        lambda message: (
            problems.append(f"console: {message.text}")
            if "Content Security Policy" in message.text
            else None
        ),
    )
    yield page
    context.close()
    assert not problems, problems


@pytest.fixture
def shots(tmp_path: Path) -> Path:
    """Where screenshots go: AUDIENCE_TEST_SCREENSHOTS when set (for a look), else tmp_path."""
    where = os.environ.get(SCREENSHOTS_ENV)
    folder = Path(where) if where else tmp_path
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def send_batch(
    base: str,
    key: str,
    sequence: int,
    total_batches: int,
    total_users: int,
    users: list[dict[str, Any]],
    *,
    name: str,
    api_key: str | None = None,
) -> None:
    fields = form(key, sequence, total_batches, total_users, users, name=name)
    files = {k: (None, v) for k, v in fields.items()}
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    response = httpx2.post(f"{base}/audience", files=files, headers=headers, timeout=30)
    assert response.status_code == 200, response.text


def upload(base: str, key: str, users: list[dict[str, Any]], per_batch: int, **kw: Any) -> None:
    """Every batch of ``users``, in order."""
    parts = [users[i : i + per_batch] for i in range(0, len(users), per_batch)]
    for sequence, part in enumerate(parts, 1):
        send_batch(base, key, sequence, len(parts), len(users), part, **kw)


def api(base: str, path: str, api_key: str | None = None) -> Any:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    response = httpx2.get(f"{base}{path}", headers=headers, timeout=30)
    assert response.status_code == 200, response.text
    return response.json()


def row(page: Page, key: str) -> Locator:
    return page.locator(f'#sessions-body tr[data-session-id="{key}"]')


def state_of(listed: Locator) -> Locator:
    """A listed session's state badge (its deliveries have badges too)."""
    return listed.locator("td").nth(1).locator(".badge")


def destinations_file(tmp_path: Path, hook: WebhookEmulator) -> Path:
    path = tmp_path / "destinations.toml"
    path.write_text(
        "[[destinations]]\n"
        f'id = "archive"\nkind = "file"\ndir = "{tmp_path / "out"}"\n\n'
        "[[destinations]]\n"
        f'id = "crm"\nkind = "webhook"\nurl = "{hook.url}"\nsecret = "${{HOOK_SECRET}}"\n'
        "chunk_size = 25\n"
    )
    return path


@pytest.mark.slow
def test_a_session_is_followed_delivered_and_retried_from_the_console(
    database_url: str, tmp_path: Path, hook: WebhookEmulator, page: Page, shots: Path
) -> None:
    accepting = threading.Event()
    hook.fail(
        503,
        {"error": "receiver down for maintenance"},
        times=1_000_000,
        on=lambda incoming: not accepting.is_set(),
    )
    server = ServerProcess(
        database_url,
        tmp_path / "server.log",
        AUDIENCE_DESTINATIONS=str(destinations_file(tmp_path, hook)),
        HOOK_SECRET=HOOK_SECRET,
        AUDIENCE_DELIVERY_MAX_ATTEMPTS="1",  # the webhook fails at its first refusal
        AUDIENCE_WORKER_POLL="0.1s",
        AUDIENCE_LOG_LEVEL="WARNING",
    ).start()
    try:
        base = server.url
        users = make_users(40)
        parts = [users[i : i + 10] for i in range(0, 40, 10)]
        for sequence in (1, 2, 3):
            send_batch(base, "q1-2026", sequence, 4, 40, parts[sequence - 1], name="Q1 buyers")
        send_batch(base, "to-abort", 1, 3, 30, make_users(10, 100), name="Mistaken <b>upload</b>")

        page.goto(f"{base}/")  # redirected to /console
        assert page.url == f"{base}/console"
        listed = row(page, "q1-2026")
        expect(state_of(listed)).to_have_attribute("data-state", "receiving")
        batches = listed.get_by_role("progressbar", name="batches")
        expect(batches).to_have_attribute("aria-valuenow", "3")
        expect(batches).to_have_attribute("aria-valuemax", "4")
        users_bar = listed.get_by_role("progressbar", name="users")
        expect(users_bar).to_have_attribute("aria-valuenow", "30")
        expect(users_bar).to_have_attribute("aria-valuemax", "40")
        expect(listed.locator("td").nth(4).locator("time")).to_have_count(1)  # expires
        expect(listed.locator("time").first).to_have_attribute("title", re.compile(r"^20\d\d-"))
        # The untrusted name is text, never markup.
        expect(row(page, "to-abort").locator("td.name a")).to_have_text("Mistaken <b>upload</b>")
        expect(row(page, "to-abort").locator("b")).to_have_count(0)
        expect(page.locator("#refresh-status")).to_have_text(
            re.compile(r"^updated \d\d:\d\d:\d\d$")
        )

        send_batch(base, "q1-2026", 4, 4, 40, parts[3], name="Q1 buyers")
        # The page refreshes by itself: the session moves on to its deliveries' verdict.
        expect(state_of(listed)).to_have_attribute(
            "data-state", "partially_delivered", timeout=WAIT_MS
        )
        expect(batches).to_have_attribute("aria-valuenow", "4")
        expect(listed.locator('li[data-destination="archive"]')).to_have_attribute(
            "data-state", "succeeded"
        )
        expect(listed.locator('li[data-destination="crm"]')).to_have_attribute(
            "data-state", "failed"
        )
        expect(listed.locator("td").nth(4)).to_have_text("—")  # no expiry once received
        page.screenshot(path=str(shots / "console-list.png"), full_page=True)

        listed.get_by_role("link", name="Q1 buyers").click()
        expect(page).to_have_url(f"{base}/console#/sessions/q1-2026")
        expect(page.locator("#session-name")).to_have_text("Q1 buyers")
        expect(page.locator("#session-state .badge")).to_have_attribute(
            "data-state", "partially_delivered"
        )
        crm = page.locator('#deliveries tr[data-destination="crm"]')
        expect(crm).to_have_attribute("data-state", "failed")
        expect(crm.locator("td.last-error")).to_contain_text("503")
        stored = api(base, "/audience/sessions/q1-2026")
        (failed,) = [d for d in stored["deliveries"] if d["destination"] == "crm"]
        expect(crm.locator("td.last-error")).to_have_text(failed["lastError"])
        archive = page.locator('#deliveries tr[data-destination="archive"]')
        expect(archive.locator("td").nth(5)).to_have_text("40")  # users sent
        expect(page.locator('[data-field="Unique users"]')).to_have_text("40")
        expect(page.locator('[data-field="Missing sequences"]')).to_have_text("none")
        expect(page.locator("#abort")).to_be_disabled()  # its deliveries have ended
        retry = page.locator("#retry")
        expect(retry).to_be_enabled()
        page.screenshot(path=str(shots / "console-session.png"), full_page=True)

        accepting.set()
        retry.click()
        expect(page.locator("#session-notice")).to_have_text("Re-queued delivery: crm.")
        expect(crm).to_have_attribute("data-state", "succeeded", timeout=WAIT_MS)
        expect(page.locator("#session-state .badge")).to_have_attribute(
            "data-state", "delivered", timeout=WAIT_MS
        )
        expect(retry).to_be_disabled()
        expect(crm.locator("td").nth(5)).to_have_text("40")
        received = hook.wait_for_segment("q1-2026")
        assert sorted(u["edgeTagId"] for u in received) == sorted(u["edgeTagId"] for u in users)

        # Abort another session, through the dialog: cancel first, then confirm.
        page.locator("#back").click()
        row(page, "to-abort").get_by_role("link").click()
        expect(page.locator("#session-name")).to_have_text("Mistaken <b>upload</b>")
        expect(page.locator("#session-state .badge")).to_have_attribute("data-state", "receiving")
        expect(page.locator('[data-field="Missing sequences"]')).to_have_text("2, 3")
        dialog = page.locator("#abort-dialog")
        page.locator("#abort").click()
        expect(dialog).to_be_visible()
        expect(dialog.locator("#abort-name")).to_have_text("Mistaken <b>upload</b>")
        dialog.get_by_role("button", name="Keep it").click()
        expect(dialog).to_be_hidden()
        assert api(base, "/audience/sessions/to-abort")["state"] == "receiving"
        expect(page.locator("#session-state .badge")).to_have_attribute("data-state", "receiving")

        page.locator("#abort").click()
        dialog.get_by_role("button", name="Abort session").click()
        expect(page.locator("#session-state .badge")).to_have_attribute("data-state", "aborted")
        assert api(base, "/audience/sessions/to-abort")["state"] == "aborted"
        expect(page.locator("#abort")).to_be_disabled()
        expect(page.locator("#session-error")).to_be_hidden()
    finally:
        server.stop()


@pytest.mark.slow
def test_with_api_keys_the_console_asks_for_the_key_and_keeps_it_out_of_urls(
    sqlite_url: str, tmp_path: Path, page: Page
) -> None:
    server = KeyedServer(
        sqlite_url, tmp_path / "server.log", AUDIENCE_API_KEYS=f"ops:{API_KEY}"
    ).start()
    try:
        upload(server.url, "keyed", make_users(4), 2, name="Keyed", api_key=API_KEY)
        requests: list[Request] = []
        page.on("request", lambda request: requests.append(request))
        page.goto(f"{server.url}/console")
        panel = page.locator("#key-panel")
        expect(panel).to_be_visible()
        expect(page.locator("#sessions")).to_have_count(0)
        key_input = page.locator("#key-input")
        expect(key_input).to_have_attribute("type", "password")

        key_input.fill("not-the-key")
        key_input.press("Enter")
        expect(page.locator("#key-error")).to_have_text(re.compile("refused"))
        expect(panel).to_be_visible()

        key_input.fill(API_KEY)
        page.get_by_role("button", name="Use key").click()
        expect(panel).to_be_hidden()
        expect(state_of(row(page, "keyed"))).to_have_attribute("data-state", "complete")
        row(page, "keyed").get_by_role("link", name="Keyed").click()
        expect(page.locator("#session-name")).to_have_text("Keyed")

        assert API_KEY not in page.url
        assert requests, "the page made no request"
        for request in requests:
            assert API_KEY not in request.url, request.url
        api_calls = [r for r in requests if "/audience/" in r.url]
        assert api_calls
        assert api_calls[-1].headers["authorization"] == f"Bearer {API_KEY}"
        stored = page.evaluate("() => JSON.stringify({...sessionStorage})")
        assert API_KEY in json.loads(stored).values()
        local = page.evaluate("() => JSON.stringify({...localStorage})")
        assert API_KEY not in local
        assert page.context.cookies() == []

        page.get_by_role("link", name="forget key").click()
        expect(panel).to_be_visible()
        expect(page.locator("#key-error")).to_be_hidden()
        assert page.evaluate("() => sessionStorage.length") == 0
    finally:
        server.stop()


class KeyedServer(ServerProcess):
    """A server with API keys: ServerProcess polls /readyz without one, so this one waits on
    //readyz with the key."""

    def start(self, timeout: float = 30.0) -> KeyedServer:
        env = clean_env(AUDIENCE_DATABASE_URL=self.database_url, **self.env)
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "audience_server", "serve", "--port", str(self.port)],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.process.poll() is None:
            try:
                ready = httpx2.get(f"{self.url}/readyz", headers=AUTH, timeout=1)
                if ready.status_code == 200:
                    return self
            except httpx2.TransportError:
                pass
            time.sleep(0.05)  # polling for readiness, not waiting for a result
        self.stop()
        raise RuntimeError(f"server not ready:\n{self.log_path.read_text()[-3000:]}")


@pytest.fixture
def sqlite_url(tmp_path: Path, sqlite_template: Path) -> str:
    path = tmp_path / "audience.db"
    path.write_bytes(sqlite_template.read_bytes())
    return f"sqlite:///{path}"


def shown_ids(page: Page) -> list[str]:
    ids: list[str] = page.locator("#sessions-body tr").evaluate_all(
        "rows => rows.map(r => r.dataset.sessionId)"
    )
    return ids


@pytest.mark.slow
def test_filters_and_paging(receiving: ServerProcess, page: Page) -> None:
    base = receiving.url
    names = {"s1": "Alpha one", "s2": "Beta two", "s3": "Alpha three", "s4": "Gamma four"}
    names |= {"s5": "Beta five"}
    for key, name in names.items():
        complete = key in ("s2", "s3")  # no worker: these stay complete
        users = make_users(4, int(key[1]) * 10)
        if complete:
            upload(base, key, users, 2, name=name)
        else:
            send_batch(base, key, 1, 2, 4, users[:2], name=name)

    def pages(query: str) -> list[list[str]]:
        found: list[list[str]] = []
        cursor: str | None = None
        while True:
            path = f"/audience/sessions?limit=2{query}" + (f"&cursor={cursor}" if cursor else "")
            body = api(base, path)
            found.append([s["sessionId"] for s in body["sessions"]])
            cursor = body["nextCursor"]
            if cursor is None:
                return found

    expected = pages("")
    assert [len(p) for p in expected] == [2, 2, 1]

    page.goto(f"{base}/console#/?limit=2")
    previous, next_ = page.locator("#page-previous"), page.locator("#page-next")
    expect(page.locator("#sessions-body tr")).to_have_count(2)
    assert shown_ids(page) == expected[0]
    expect(previous).to_be_disabled()
    next_.click()
    expect(page.locator("#page-info")).to_have_text("page 2")
    expect(page.locator("#sessions-body tr").first).to_have_attribute(
        "data-session-id", expected[1][0]
    )
    assert shown_ids(page) == expected[1]
    next_.click()
    expect(page.locator("#sessions-body tr")).to_have_count(1)
    assert shown_ids(page) == expected[2]
    expect(next_).to_be_disabled()
    previous.click()
    expect(page.locator("#page-info")).to_have_text("page 2")
    expect(page.locator("#sessions-body tr")).to_have_count(2)
    assert shown_ids(page) == expected[1]

    page.locator("#filter-state").select_option("complete")
    expect(page).to_have_url(re.compile(r"#/\?state=complete&limit=2$"))
    expect(page.locator("#page-info")).to_have_text("page 1")
    expect(page.locator("#sessions-body tr")).to_have_count(2)
    assert sorted(shown_ids(page)) == ["s2", "s3"]
    for state in page.locator("#sessions-body tr").evaluate_all("r => r.map(x => x.dataset.state)"):
        assert state == "complete"

    page.locator("#filter-state").select_option("")
    page.locator("#filter-name").fill("beta")
    page.locator("#filter-name").press("Enter")
    expect(page).to_have_url(re.compile(r"#/\?name=beta&limit=2$"))
    expect(page.locator("#sessions-body tr")).to_have_count(2)
    assert sorted(shown_ids(page)) == ["s2", "s5"]
    expect(next_).to_be_disabled()

    page.locator("#filter-name").fill("nothing like it")
    page.locator("#filter-name").press("Enter")
    expect(page.locator("#sessions-empty")).to_have_text("No session matches these filters.")
    expect(page.locator("#sessions")).to_be_hidden()


COUNT_FETCHES = """
window.__apiCalls = 0;
const realFetch = window.fetch.bind(window);
window.fetch = (...args) => { window.__apiCalls += 1; return realFetch(...args); };
"""


def api_calls(page: Page) -> int:
    count: int = page.evaluate("() => window.__apiCalls")
    return count


def mark(page: Page) -> tuple[int, str]:
    """The API calls made so far and the "updated HH:MM:SS" shown now."""
    return api_calls(page), page.locator("#refresh-status").text_content() or ""


def refreshed(page: Page, since: tuple[int, str]) -> None:
    """Wait until the page made an API call after ``since`` and showed its answer (the
    page's clock moved on by then: the time shown differs)."""
    calls, shown = since
    page.wait_for_function("n => window.__apiCalls > n", arg=calls)
    expect(page.locator("#refresh-status")).not_to_have_text(shown)


def set_visibility(page: Page, state: str) -> None:
    page.evaluate(
        """state => {
            Object.defineProperty(document, "visibilityState", {value: state, configurable: true});
            document.dispatchEvent(new Event("visibilitychange"));
        }""",
        state,
    )


@pytest.mark.slow
def test_refreshes_fast_while_moving_slowly_when_ended_and_not_while_hidden(
    receiving: ServerProcess, page: Page
) -> None:
    base = receiving.url
    send_batch(base, "old", 1, 2, 2, make_users(1), name="Old")
    assert httpx2.delete(f"{base}/audience/sessions/old", timeout=30).status_code == 200
    page.add_init_script(COUNT_FETCHES)
    page.clock.install()  # the page's timers run when the test says, not when they would
    page.goto(f"{base}/console")
    expect(state_of(row(page, "old"))).to_have_attribute("data-state", "aborted")
    expect(page.locator("#refresh-status")).to_have_text(re.compile("updated"))
    before = mark(page)

    page.clock.run_for(5_000)  # all ended: no 2-second refresh
    assert api_calls(page) == before[0]
    send_batch(base, "new", 1, 2, 2, make_users(1, 5), name="New")
    page.clock.run_for(10_100)  # 15 s after the last one
    refreshed(page, before)
    expect(state_of(row(page, "new"))).to_have_attribute("data-state", "receiving")

    before = mark(page)  # something moves now: every 2 s
    page.clock.run_for(2_100)
    refreshed(page, before)

    before = mark(page)
    set_visibility(page, "hidden")
    page.clock.run_for(60_000)
    assert api_calls(page) == before[0]  # nothing while hidden
    set_visibility(page, "visible")
    refreshed(page, before)  # at once on coming back


@pytest.mark.slow
def test_session_page_shortens_missing_sequences_and_shows_api_errors(
    receiving: ServerProcess, page: Page
) -> None:
    base = receiving.url
    send_batch(base, "gappy", 2, 30, 30, make_users(1), name="Gappy")
    page.goto(f"{base}/console#/sessions/gappy")
    expect(page.locator("#session-state .badge")).to_have_attribute("data-state", "receiving")
    missing = ", ".join(str(n) for n in [1, *range(3, 22)])
    expect(page.locator("#missing-sequences")).to_have_text(f"{missing} … and 9 more")
    expect(page.locator("#deliveries")).to_have_count(0)
    expect(page.locator("#abort")).to_be_enabled()
    expect(page.locator("#retry")).to_be_disabled()

    page.goto(f"{base}/console#/sessions/no-such-session")
    expect(page.locator("#session-error")).to_have_text("session no-such-session does not exist.")
