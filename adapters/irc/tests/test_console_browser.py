"""The operator console in a real browser: Debian's Chromium, driven by Selenium through
Debian's chromedriver, against a real ``oco run`` with the IRC adapter on a real ngircd and
a launched callback, with ``console:`` configured and tokens made by ``oco console token
create``. People on IRC talk to the bot while an operator watches, grants and is refused.

It lives with the IRC adapter's tests, not oco-core's: it needs the IRC adapter, which
oco-core's own test environment does not install (that isolation is what catches an
undeclared dependency), and it reuses this folder's ngircd and IRC people.

One bot, one browser, one test: each step builds on what the last one left (the login, the
traffic, the grant), as an operator's session does; the step that fails names itself.

With ``OCO_CONSOLE_SCREENSHOTS=<folder>`` set (``nox -s screenshots`` sets docs/console),
it also saves a PNG of each page, at a fixed window size, once the bot has some traffic.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import pytest
import trio
from selenium import webdriver
from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException, WebDriverException
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.chrome.webdriver import WebDriver
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys

from oco_core.testing import OcoProcess, oco_cli, run_oco
from oco_core.testing.pytest_plugin import server_unavailable, server_used

pytestmark = pytest.mark.server("ngircd")

T = TypeVar("T")

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
#: The window every page is seen (and photographed) in.
WINDOW = (1280, 800)
SCREENSHOTS_ENV = "OCO_CONSOLE_SCREENSHOTS"

CHANNEL = "#test"
BOT = r":oco!\S+ PRIVMSG #test :"
DENIED = "you need the permission `deploy` for that"

#: The launched callback: an open `ping`, and a `deploy` that needs the permission.
CALLBACK = """\
from oco_core import Callback, Message

cb = Callback()


@cb.respond(r"^ping$", help="ping - PONG")
async def ping(message: Message) -> None:
    await message.reply("PONG")


@cb.respond(r"^deploy (\\w+)$", help="deploy <app> - ship it", permission="deploy")
async def deploy(message: Message) -> None:
    await message.reply(f"deploying {message.match(1)}")


if __name__ == "__main__":
    cb.run()
"""


def _rest(workdir: Path) -> str:
    """What follows the IRC bot's config: the HTTP server with the console, the launched
    callback, and who may deploy."""
    return f"""\
http:
  listen: 127.0.0.1:0
  address_file: {workdir / "http.address"}
console:
  show_bodies: false
callbacks:
  - id: ops
    command: ["{sys.executable}", "{workdir / "ops.py"}"]
auth:
  admins: ["irc/alice"]
  roles: {{deployers: [deploy]}}
"""


@pytest.fixture(scope="module")
def chromium() -> Iterator[WebDriver]:
    """Headless Chromium at a fixed window size, through Debian's chromedriver: both paths
    given, so Selenium never downloads a driver or a browser of its own."""
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not os.access(p, os.X_OK)]
    if missing:
        server_unavailable(
            "Chromium",
            f"{' and '.join(missing)} not found: install them with `apt-get install chromium chromium-driver`",
        )
    server_used("chromium", str(CHROMIUM))
    options = Options()
    options.binary_location = str(CHROMIUM)
    for argument in (
        "--headless=new",
        f"--window-size={WINDOW[0]},{WINDOW[1]}",
        "--force-device-scale-factor=1",
        "--hide-scrollbars",
        "--disable-extensions",
        "--no-first-run",
    ):
        options.add_argument(argument)
    if os.geteuid() == 0:
        # Chromium refuses to start its sandbox as root (CI runs as root); a user keeps it.
        options.add_argument("--no-sandbox")
    service = Service(executable_path=str(CHROMEDRIVER), log_output=subprocess.DEVNULL)
    driver = webdriver.Chrome(options=options, service=service)
    try:
        yield driver
    finally:
        driver.quit()


class Browser:
    """The module's Chromium seen from trio: each WebDriver call runs in a worker thread,
    so the IRC people's readers in the test's nursery keep reading meanwhile."""

    def __init__(self, driver: WebDriver, base: str, screenshots: Path | None) -> None:
        self.driver = driver
        self.base = base
        self.screenshots = screenshots

    async def run(self, action: Callable[[WebDriver], T]) -> T:
        return await trio.to_thread.run_sync(action, self.driver)

    async def open(self, path: str) -> None:
        await self.run(lambda d: d.get(self.base + path))

    async def path(self) -> str:
        return urlsplit(await self.run(lambda d: d.current_url)).path

    async def text(self, css: str) -> str:
        return await self.run(lambda d: d.find_element(By.CSS_SELECTOR, css).text.strip())

    async def texts(self, css: str) -> list[str]:
        return await self.run(lambda d: [e.text.strip() for e in d.find_elements(By.CSS_SELECTOR, css)])

    async def count(self, css: str) -> int:
        return await self.run(lambda d: len(d.find_elements(By.CSS_SELECTOR, css)))

    async def until(
        self, what: str, check: Callable[[WebDriver], T | None], *, reload: bool = False, timeout: float = 20.0
    ) -> T:
        """Wait until ``check`` returns something other than None or False (an element not
        there yet counts as None); with ``reload``, the page is loaded again between tries
        (a server-rendered page, without script, shows what was when it was sent)."""

        def attempt(driver: WebDriver) -> T | None:
            try:
                return check(driver)
            except (NoSuchElementException, StaleElementReferenceException):
                return None
            except WebDriverException as exc:
                # Chromium reports an element of the page a reload replaced this way, not
                # always as a stale element.
                if "does not belong to the document" in str(exc):
                    return None
                raise

        with trio.move_on_after(timeout):
            while True:
                result = await self.run(attempt)
                if result is not None and result is not False:
                    return result
                await trio.sleep(0.1)
                if reload:
                    await self.run(lambda d: d.refresh())
        page = await self.run(lambda d: f"{d.current_url}: {d.find_element(By.TAG_NAME, 'body').text[:1500]!r}")
        raise AssertionError(f"timed out after {timeout} s waiting for {what}; the browser shows {page}")

    async def at(self, path: str) -> None:
        """Wait until the browser is at ``path`` (after a redirect or a form's submission)."""
        await self.until(f"the browser to be at {path}", lambda d: urlsplit(d.current_url).path == path)

    async def keys(self, *keys: str) -> None:
        """Press keys as a person at the keyboard does, into whatever has the focus."""
        await self.run(lambda d: ActionChains(d).send_keys(*keys).perform())

    async def focused(self) -> str:
        """The id of the element that has the keyboard's focus ('' for none)."""
        return await self.run(lambda d: d.switch_to.active_element.get_attribute("id") or "")

    async def tab_to(self, element_id: str, most: int = 20) -> None:
        """Press Tab until ``element_id`` has the focus; fail after ``most`` presses."""
        for _ in range(most):
            if await self.focused() == element_id:
                return
            await self.keys(Keys.TAB)
        raise AssertionError(f"#{element_id} never got the focus in {most} presses of Tab")

    async def fill(self, form: str, **values: str) -> None:
        """Type ``values`` into the fields of ``form`` (CSS) by their names."""

        def type_in(driver: WebDriver) -> None:
            for name, value in values.items():
                field = driver.find_element(By.CSS_SELECTOR, f"{form} [name={name}]")
                field.clear()
                field.send_keys(value)

        await self.run(type_in)

    async def click(self, css: str) -> None:
        await self.run(lambda d: d.find_element(By.CSS_SELECTOR, css).click())

    async def mark(self) -> None:
        """Leave a mark in the page's JavaScript state; :meth:`not_reloaded` finds it
        only if the page was not loaded again since."""
        await self.run(lambda d: d.execute_script("window.ocoTestMark = 'still here';"))

    async def not_reloaded(self) -> bool:
        mark: object = await self.run(lambda d: d.execute_script("return window.ocoTestMark;"))
        return mark == "still here"

    async def shoot(self, name: str, path: str | None = None) -> None:
        """Save the page (``path``, else the current one) as ``<name>.png`` in the
        screenshots folder, when there is one."""
        if self.screenshots is None:
            return
        if path is not None:
            await self.open(path)
        target = self.screenshots / f"{name}.png"
        assert await self.run(lambda d: d.save_screenshot(str(target))), f"no screenshot saved at {target}"


async def _create_token(bot_dir: Path, role: str, name: str) -> str:
    """``oco console token create``: the token it prints once, alone on standard output."""
    config = str(bot_dir / "oco.yaml")
    result = await trio.to_thread.run_sync(
        partial(oco_cli, "console", "token", "create", "--role", role, "--name", name, "--config", config, cwd=bot_dir)
    )
    assert result.returncode == 0, result.stderr
    token = result.stdout.strip()
    assert re.fullmatch(r"\S{20,}", token), f"not a token alone: {result.stdout!r}"
    return token


async def _ask(person: Any, text: str, answer: str) -> None:
    """Say ``oco: <text>`` in the channel and wait for the bot's line ``answer``."""
    since = person.mark()
    await person.say(CHANNEL, f"oco: {text}")
    await person.expect(BOT + answer, since=since)


def _cell(driver: WebDriver, row: str, cell: str) -> str:
    return str(driver.find_element(By.CSS_SELECTOR, f"{row} {cell}").text.strip())


def _live_row(driver: WebDriver, user: str, route: str) -> dict[str, str] | None:
    """The newest row of the live view for ``user``'s message to ``route``, cell by cell."""
    for row in driver.find_elements(By.CSS_SELECTOR, "#live-rows tr.live-message"):
        cells = {
            name: row.find_element(By.CSS_SELECTOR, f".{name}").text.strip()
            for name in ("when", "adapter", "room", "user", "route", "callback", "duration", "body")
        }
        if cells["user"] == user and cells["route"] == route:
            return cells
    return None


def _replied(driver: WebDriver, user: str, route: str) -> dict[str, str] | None:
    """The live view's row for ``user``'s message to ``route`` once its reply went out."""
    row = _live_row(driver, user, route)
    return row if row is not None and row["duration"] else None


def _audit_index(driver: WebDriver, user: str, decision: str) -> tuple[int, dict[str, str]] | None:
    """The place (0: the top) and cells of the newest record on the audit page that is
    ``user``'s with ``decision``, once there is one. Not simply the top row: another
    program on this machine may knock at the bot's gRPC port, which is audited too."""
    return next(
        ((i, row) for i, row in enumerate(_audit_rows(driver)) if (row["user"], row["decision"]) == (user, decision)),
        None,
    )


def _audit_rows(driver: WebDriver) -> list[dict[str, str]]:
    return [
        {
            name: row.find_element(By.CSS_SELECTOR, f".{name}").text.strip()
            for name in ("when", "user", "callback", "kind", "decision", "detail")
        }
        for row in driver.find_elements(By.CSS_SELECTOR, "#audit tr.audit-record")
    ]


def _roles(driver: WebDriver, user: str) -> list[str]:
    """The roles the people page lists for ``user`` (none when the user has no row)."""
    rows = driver.find_elements(By.CSS_SELECTOR, f'#people tr[data-user="{user}"]')
    return [role.text.strip() for row in rows for role in row.find_elements(By.CSS_SELECTOR, ".roles span.role")]


async def _forge_post(browser: Browser, action: str, fields: dict[str, str]) -> None:
    """Submit a form the page does not offer, as a forger in the page would: the fields
    given, posted to ``action``; the browser then shows the answer."""
    script = """
        const form = document.createElement('form');
        form.method = 'post';
        form.action = arguments[0];
        for (const [name, value] of Object.entries(arguments[1])) {
            const input = document.createElement('input');
            input.type = 'hidden';
            input.name = name;
            input.value = value;
            form.appendChild(input);
        }
        document.body.appendChild(form);
        form.submit();
    """
    await browser.run(lambda d: d.execute_script(script, action, fields))


async def _fetch(browser: Browser, method: str, path: str, fields: dict[str, str] | None = None) -> tuple[int, str]:
    """``(status, body)`` of a request the page makes itself with ``fetch`` (its cookie
    goes along, as with any request of the page), for the status a page does not show."""
    script = """
        const done = arguments[arguments.length - 1];
        const init = {method: arguments[0], redirect: 'manual'};
        if (arguments[2] !== null) init.body = new URLSearchParams(arguments[2]);
        fetch(arguments[1], init)
            .then(async (r) => done([r.status, r.type === 'opaqueredirect' ? '' : await r.text()]))
            .catch((e) => done([-1, String(e)]));
    """
    status, body = await browser.run(lambda d: d.execute_async_script(script, method, path, fields))
    return int(status), str(body)


async def test_an_operator_watches_grants_and_is_refused_in_a_real_browser(
    kit: Any, tmp_path: Path, chromium: WebDriver
) -> None:
    workdir = tmp_path / "bot"
    workdir.mkdir()
    (workdir / "ops.py").write_text(CALLBACK)
    config = kit.oco_config(tmp_path, _rest(workdir))
    (workdir / "oco.yaml").write_text(config)
    # Tokens are made before the bot runs; the console reads them from the shared store.
    admin_token = await _create_token(workdir, "admin", "ops-admin")
    viewer_token = await _create_token(workdir, "viewer", "ops-viewer")
    shots = os.environ.get(SCREENSHOTS_ENV)
    if shots:
        Path(shots).mkdir(parents=True, exist_ok=True)

    async with (
        kit.person("alice") as alice,
        kit.person("bob") as bob,
        run_oco(config, workdir) as bot,
    ):
        await alice.expect(r":oco!\S+ JOIN :?#test", timeout=30)
        base = "http://" + await bot.written("http.address")
        browser = Browser(chromium, base, Path(shots) if shots else None)
        await _walk_through(browser, bot, alice, bob, admin_token, viewer_token)
        assert await bot.stop() == 0


async def _walk_through(b: Browser, bot: OcoProcess, alice: Any, bob: Any, admin_token: str, viewer_token: str) -> None:
    # -- Without a session every page sends the browser to the login page.
    for path in ("/console/", "/console/people", "/console/live"):
        await b.open(path)
        await b.at("/console/login")
    await b.shoot("login")

    # -- A wrong token: the login page again, with an error that says what to do.
    await b.fill("#login", token="not-a-console-token")
    await b.click("#login-submit")
    error = await b.until("the login error", lambda d: d.find_element(By.CSS_SELECTOR, "#error[role=alert]").text)
    assert "token" in error, error
    assert await b.count("form#login") == 1, "a wrong token does not get the login form back"

    # -- Logging in with the keyboard alone: Tab to the token, type it, Tab to the
    # button, Enter.
    await b.open("/console/login")
    await b.tab_to("token")
    await b.keys(admin_token)
    await b.tab_to("login-submit", most=5)
    await b.keys(Keys.ENTER)
    await b.at("/console/")
    whoami = await b.text("#whoami")
    assert "ops-admin" in whoami, whoami
    assert "admin" in whoami.replace("ops-admin", ""), whoami
    assert admin_token not in await b.run(lambda d: d.page_source), "the page shows the token"

    # -- The overview: the IRC adapter connected, the bot active.
    await b.until(
        "the IRC adapter to show connected",
        lambda d: _cell(d, 'tr[data-adapter="irc"]', "td.state").startswith("connected"),
        reload=True,
    )
    assert await b.text("#bot-name") == "oco"
    assert await b.text("#bot-role") == "active"
    assert await b.count("svg#chart-messages") == 1

    # -- The callbacks page: the launched callback with its one replica.
    ops = 'tr[data-callback="ops"]'
    await b.open("/console/callbacks")
    await b.until(
        "the callback ops to show 1 replica",
        lambda d: _cell(d, ops, ".replicas") == "1",
        reload=True,
    )
    assert await b.text(f"{ops} .kind") == "launched"
    matched_before = int(await b.text(f"{ops} .matched"))
    replies_before = int(await b.text(f"{ops} .replies"))

    # -- The live view: bob's command appears, without a reload, with how long the
    # answer took, and without its text (bodies are hidden unless configured).
    await b.open("/console/live")
    await b.mark()
    await _ask(bob, "ping", "bob: PONG$")
    row = await b.until(
        "bob's ping in the live view, with its duration", partial(_replied, user="irc/bob", route="ping")
    )
    assert await b.not_reloaded(), "the live view was reloaded to show the message"
    assert (row["adapter"], row["room"], row["callback"], row["body"]) == ("irc", "irc/#test", "ops", "hidden"), row
    assert re.search(r"\d", row["duration"]), row

    # -- The callback's counters moved.
    await b.open("/console/callbacks")
    await b.until(
        "the callback's counters to count bob's ping",
        lambda d: (
            int(_cell(d, ops, ".matched")) == matched_before + 1
            and int(_cell(d, ops, ".replies")) == replies_before + 1
        ),
        reload=True,
    )
    await b.click(f"{ops} a.detail")
    await b.at("/console/callbacks/ops")
    assert await b.text("#callback-id") == "ops"
    assert await b.text("#kind") == "launched"
    assert await b.count("#replicas tr.replica") == 1
    assert await b.text('#routes tr[data-route="deploy"] .permission') == "deploy"
    assert await b.text('#routes tr[data-route="deploy"] .help') == "deploy <app> - ship it"
    assert int(await b.text("#matched")) == matched_before + 1

    # -- The audit log, live: bob's refused deploy appears at the top without a reload.
    await b.open("/console/audit")
    await b.mark()
    # The page says so once its stream is open: what happens from then on is shown.
    await b.until("the audit page to go live", lambda d: d.find_element(By.ID, "audit-live").text.startswith("Live"))
    await _ask(bob, "deploy web", f"bob: {re.escape(DENIED)}")
    place, refused = await b.until(
        "bob's refusal in the audit log", partial(_audit_index, user="irc/bob", decision="denied")
    )
    assert await b.not_reloaded(), "the audit log was reloaded to show the record"
    assert (refused["kind"], refused["callback"]) == ("route", "ops/deploy"), refused
    allowed = await b.run(partial(_audit_index, user="irc/bob", decision="allowed"))
    assert allowed is not None, "bob's ping is not in the audit log"
    assert place < allowed[0], "the newer record is not above the older one"
    # The same filters as `oco audit`: only refusals.
    await b.open("/console/audit?decision=denied")
    decisions = await b.texts("#audit tr.audit-record .decision")
    assert decisions, "no refusals shown"
    assert set(decisions) == {"denied"}, decisions

    # -- As admin, grant bob the role on the people page: his next deploy is answered.
    await b.open("/console/people")
    await b.fill("#grant", user="irc/bob", role="deployers")
    await b.click("#grant-submit")
    await b.until(
        "bob to hold deployers on the people page", lambda d: "deployers" in _roles(d, "irc/bob"), reload=True
    )
    await _ask(bob, "deploy web", "bob: deploying web$")
    # Audited as the console's token (the log is written in batches: reload until it is).
    await b.open("/console/audit?kind=admin&user=console:ops-admin")
    grant = await b.until("the grant in the audit log", lambda d: _audit_rows(d)[0], reload=True)
    assert ("irc/bob" in grant["detail"], "deployers" in grant["detail"]) == (True, True), grant

    # -- A forged CSRF token: refused, and nothing granted.
    await b.open("/console/people")
    await b.fill("#grant", user="irc/carol", role="deployers")
    await b.run(lambda d: d.execute_script("document.querySelector('#grant [name=csrf]').value = 'forged';"))
    await b.click("#grant-submit")
    error = await b.until("the CSRF refusal", lambda d: d.find_element(By.ID, "error").text)
    assert "CSRF" in error, error
    # The answer is a 403, here as for a request of the page's own with a forged token.
    status, body = await _fetch(b, "POST", "/console/people/grant", {"user": "irc/carol", "role": "x", "csrf": "no"})
    assert (status, "CSRF" in body) == (403, True), body[:500]
    await b.open("/console/people")
    assert await b.run(lambda d: _roles(d, "irc/carol")) == []

    # -- Every page, photographed once there is some traffic and bob holds a role
    # (nox -s screenshots).
    await _ask(alice, "ping", "alice: PONG$")
    await _ask(alice, "deploy api", "alice: deploying api$")
    await b.shoot("overview", "/console/")
    await b.shoot("callbacks", "/console/callbacks")
    await b.shoot("callback", "/console/callbacks/ops")
    await b.shoot("audit", "/console/audit")
    await b.shoot("people", "/console/people")
    await b.shoot("live", "/console/live")

    # -- Revoking it there takes it away in chat as well.
    await b.open("/console/people")
    revoke = 'tr[data-user="irc/bob"] form.revoke'
    await b.run(
        lambda d: (
            next(
                form
                for form in d.find_elements(By.CSS_SELECTOR, revoke)
                if form.find_element(By.NAME, "role").get_attribute("value") == "deployers"
            )
            .find_element(By.TAG_NAME, "button")
            .click()
        )
    )
    await b.until("bob's role to be revoked", lambda d: "deployers" not in _roles(d, "irc/bob"), reload=True)
    await _ask(bob, "deploy web", f"bob: {re.escape(DENIED)}")

    # -- Logging out ends the session.
    await b.open("/console/")
    await b.click("#logout [type=submit]")
    await b.at("/console/login")
    await b.open("/console/callbacks")
    await b.at("/console/login")
    # The live streams answer 401 rather than a login page a script cannot follow.
    assert (await _fetch(b, "GET", "/console/live/stream"))[0] == 401

    # -- A viewer reads, sees no forms, and a forged grant (with the session's own CSRF
    # token, so it is the role that refuses it) is refused.
    await b.fill("#login", token=viewer_token)
    await b.click("#login-submit")
    await b.at("/console/")
    assert "viewer" in await b.text("#whoami")
    await b.open("/console/people")
    assert await b.count("#people") == 1
    assert await b.count("form#grant") == 0
    assert await b.count("form.revoke") == 0
    csrf = await b.run(lambda d: d.find_element(By.CSS_SELECTOR, "#logout [name=csrf]").get_attribute("value") or "")
    assert csrf, "the logout form has no CSRF token"
    await _forge_post(b, "/console/people/grant", {"user": "irc/carol", "role": "deployers", "csrf": csrf})
    error = await b.until("the viewer's refusal", lambda d: d.find_element(By.ID, "error").text)
    assert error.strip(), "the refusal says nothing"
    status, body = await _fetch(b, "POST", "/console/people/grant", {"user": "irc/carol", "role": "x", "csrf": csrf})
    assert (status, 'id="error"' in body) == (403, True), body[:500]
    await b.open("/console/people")
    assert await b.run(lambda d: _roles(d, "irc/carol")) == []
    await _ask(alice, "ping", "alice: PONG$")  # the bot is still well
    assert bot.process.returncode is None
