"""The chat page in headless Chromium (Debian's, through playwright): a typed message gets a streamed answer.

Needs /usr/bin/chromium and the playwright package: scripts/install_browser.sh installs both (it never
downloads a browser of playwright's own).  Takes a screenshot of the page; with
FLEXPIPE_UPDATE_SCREENSHOT=1 it replaces docs/chat_screenshot.png (else a test run would dirty the tree).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
from pathlib import Path

import pytest

pytestmark = pytest.mark.browser

CHROMIUM = os.environ.get("FLEXPIPE_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
SCREENSHOT = Path(__file__).resolve().parent.parent / "docs" / "chat_screenshot.png"

pytest.importorskip("starlette", reason="the 'serve' extra is not installed")
sync_api = pytest.importorskip("playwright.sync_api",
                               reason="playwright is not installed: run scripts/install_browser.sh")
if not (os.path.isfile(CHROMIUM) or shutil.which(CHROMIUM)):
    pytest.skip(f"no chromium at {CHROMIUM}: run scripts/install_browser.sh", allow_module_level=True)

import httpx  # noqa: E402

from flexpipe.server import ServerThread, create_app  # noqa: E402


@pytest.fixture(scope="module")
def url():
    from flexpipe.api import FlexPipe

    app = create_app(lambda: FlexPipe.launch(model="tiny", stages=2))
    with ServerThread(app) as base:
        # Reshaped here, in the module's fixture, so that the stage processes it starts belong to the
        # server's lifetime and not to one test; the panel then has a reshape to show.
        r = httpx.post(f"{base}/v1/flexpipe/reshape", json={"stages": 3}, timeout=120)
        assert r.status_code == 200, r.text
        yield base


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def page(url, browser):
    ctx = browser.new_context(viewport={"width": 1200, "height": 720})
    pg = ctx.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    pg.goto(url + "/")
    yield pg
    ctx.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


def test_page_streams_an_answer(page):
    page.wait_for_function("document.getElementById('model').textContent.startsWith('tiny')", timeout=15000)
    page.click("#settings summary")
    page.fill("#max-tokens", "48")
    page.fill("#temperature", "0")
    page.fill("#prompt", "Hello, pipeline!")
    page.press("#prompt", "Enter")
    user = page.locator(".msg.user")
    sync_api.expect(user).to_have_text("Hello, pipeline!")
    answer = page.locator(".msg.assistant").last
    # The answer arrives in pieces: the page counts the SSE deltas it rendered.
    page.wait_for_function("Number(document.querySelector('.msg.assistant').dataset.chunks) >= 2",
                           timeout=30000)
    sync_api.expect(answer).to_have_attribute("data-state", "done", timeout=60000)
    assert int(answer.get_attribute("data-chunks")) >= 2
    meta = answer.locator(".meta").inner_text()
    assert "tokens in" in meta and "first token" in meta
    assert len(answer.inner_text()) > len(meta)
    assert page.locator(".msg.error").count() == 0


def test_pipeline_panel_shows_the_shape_and_the_last_reshape(page, tmp_path):
    sync_api.expect(page.locator("#stages li")).to_have_count(3, timeout=10000)
    sync_api.expect(page.locator("#conn")).to_have_text("connected")
    sync_api.expect(page.locator("#epoch")).to_have_text("epoch 1")
    assert "units [0," in page.locator("#stages li").first.inner_text()
    sync_api.expect(page.locator("#last-reshape")).to_contain_text("2 → 3 stages, pause ")
    assert page.locator("#devices").inner_text() == "3"
    # The answer above has finished: the panel's next poll shows its request and KV blocks freed.
    sync_api.expect(page.locator("#load")).to_have_text("0 running, 0 waiting", timeout=10000)
    sync_api.expect(page.locator("#kv-text")).to_have_text(re.compile(r"^0 / \d+ blocks$"))
    shot = SCREENSHOT if os.environ.get("FLEXPIPE_UPDATE_SCREENSHOT") == "1" else tmp_path / "chat.png"
    page.screenshot(path=str(shot))
    assert shot.stat().st_size > 10_000


def test_on_a_keyed_server_the_status_poll_leaves_the_typed_message_alone(browser):
    # The status poll gets 401 every second on a server with an API key.  It used to answer each with
    # the focus in the key field: what the user typed went into the password field (Enter saved it).
    from flexpipe.api import FlexPipe

    app = create_app(lambda: FlexPipe.launch(model="tiny", stages=1, in_process=True), api_key="sk-page")
    with ServerThread(app) as base:
        ctx = browser.new_context()
        try:
            pg = ctx.new_page()
            pg.goto(base + "/")
            conn, key = pg.locator("#conn"), pg.locator("#api-key")
            sync_api.expect(conn).to_have_text("API key needed", timeout=10000)
            sync_api.expect(key).to_be_focused()   # the page's first model load asks for the key
            pg.click("#prompt")
            parts = ["Hello ", "from ", "a keyed ", "server"]
            for part in parts:
                # typed while polls answer: the label is cleared here and set again by the next poll's
                # 401, only after that poll has done all it does with the focus
                pg.evaluate("document.getElementById('conn').textContent = ''")
                pg.keyboard.type(part)
                sync_api.expect(conn).to_have_text("API key needed", timeout=10000)
            assert pg.input_value("#prompt") == "".join(parts)
            assert pg.input_value("#api-key") == ""
            sync_api.expect(pg.locator("#prompt")).to_be_focused()
        finally:
            ctx.close()


@contextlib.contextmanager
def _chat_page(browser, base):
    """A fresh page on `base`, as (page, the JSON bodies of its chat requests in order); closed after,
    and the test fails if the page raised a JavaScript error."""
    ctx = browser.new_context()
    pg = ctx.new_page()
    bodies: list[dict] = []
    errors: list[str] = []
    pg.on("request", lambda r: bodies.append(r.post_data_json) if r.url.endswith("/v1/chat/completions") else None)
    pg.on("pageerror", lambda e: errors.append(str(e)))
    try:
        pg.goto(base + "/")
        sync_api.expect(pg.locator("#model")).to_contain_text("tiny", timeout=15000)
        pg.click("#settings summary")
        pg.fill("#temperature", "0")
        yield pg, bodies
    finally:
        ctx.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


@contextlib.contextmanager
def _own_server():
    """A server of the test's own on an in-process tiny pipeline (what the test does to it must not
    reach the module's server); yields its URL and `on_engine(fn)`, which calls fn(engine) on the
    server's event loop."""
    from flexpipe.api import FlexPipe

    loops: list[asyncio.AbstractEventLoop] = []

    def launch():
        loops.append(asyncio.get_running_loop())
        return FlexPipe.launch(model="tiny", stages=1, in_process=True)

    app = create_app(launch)
    with ServerThread(app) as base:
        yield base, lambda fn: loops[0].call_soon_threadsafe(fn, app.state.server.engine)


def _ask(pg, text, max_tokens):
    pg.fill("#max-tokens", str(max_tokens))
    pg.fill("#prompt", text)
    pg.press("#prompt", "Enter")


def _wait_for_chunks(pg, n, answer=0):
    """Until the `answer`-th answer of the page has shown `n` streamed pieces."""
    pg.wait_for_function(f"Number(document.querySelectorAll('.msg.assistant')[{answer}].dataset.chunks) >= {n}",
                         timeout=30000)


def _answer_text(answer):
    return answer.evaluate("el => el.firstChild ? el.firstChild.textContent : ''")   # without its .meta


def _turns(body):
    return [(m["role"], m["content"]) for m in body["messages"]]


@pytest.mark.timeout(60)
def test_new_chat_while_streaming_stops_the_answer_and_forgets_it(url, browser):
    # "New chat" used to leave the answer streaming (Send stayed disabled, the server kept generating)
    # and, when it ended, put the old turn into the new conversation's history.
    with _chat_page(browser, url) as (pg, bodies):
        _ask(pg, "OLD topic", 1900)
        _wait_for_chunks(pg, 2)
        pg.click("#reset")
        sync_api.expect(pg.locator("#messages .msg")).to_have_count(0)
        sync_api.expect(pg.locator("#send")).to_be_enabled()
        sync_api.expect(pg.locator("#stop")).to_be_disabled()
        _ask(pg, "new chat hello", 2)
        answer = pg.locator(".msg.assistant")
        sync_api.expect(answer).to_have_attribute("data-state", "done", timeout=30000)
        assert _turns(bodies[-1]) == [("user", "new chat hello")]
        assert pg.locator("#messages .msg.user").all_inner_texts() == ["new chat hello"]
        assert pg.locator("#messages .msg.error").count() == 0
        # the old answer's generation was cancelled on the server, not left to run to its 1900 tokens
        sync_api.expect(pg.locator("#load")).to_have_text("0 running, 0 waiting", timeout=10000)


@pytest.mark.timeout(60)
def test_a_stopped_answer_stays_in_the_context_as_shown(url, browser):
    # A stopped turn used to drop out of the next request's messages while the page still showed it.
    with _chat_page(browser, url) as (pg, bodies):
        _ask(pg, "first question", 1900)
        _wait_for_chunks(pg, 3)
        pg.click("#stop")
        first = pg.locator(".msg.assistant").first
        sync_api.expect(first).to_have_attribute("data-state", "stopped", timeout=10000)
        sync_api.expect(first.locator(".meta")).to_contain_text("stopped, kept in the conversation")
        sync_api.expect(first).to_have_attribute("data-context", "in")
        partial = _answer_text(first)
        assert partial
        _ask(pg, "second question", 2)
        sync_api.expect(pg.locator(".msg.assistant").nth(1)).to_have_attribute("data-state", "done",
                                                                                timeout=30000)
        assert _turns(bodies[-1]) == [("user", "first question"), ("assistant", partial),
                                      ("user", "second question")]


@pytest.mark.timeout(60)
def test_with_the_server_down_the_page_says_which_server_to_start(browser):
    # fetch's own "Failed to fetch" used to be all the page showed.
    with contextlib.ExitStack() as stack:
        with _own_server() as (base, _):
            pg, bodies = stack.enter_context(_chat_page(browser, base))
        failed: list[str] = []
        pg.on("requestfailed", lambda r: failed.append(r.url))
        _ask(pg, "anyone there?", 4)
        expected = f"Cannot reach the server at {base}: is `flexpipe serve` running?"
        sync_api.expect(pg.locator(".msg.error")).to_contain_text(expected, timeout=10000)
        sync_api.expect(pg.locator(".msg.assistant")).to_have_attribute("data-state", "error")
        assert _turns(bodies[-1]) == [("user", "anyone there?")]
        assert f"{base}/v1/chat/completions" in failed
        sync_api.expect(pg.locator("#send")).to_be_enabled()
        pg.fill("#reshape-stages", "2")
        pg.click("#reshape-form button")
        sync_api.expect(pg.locator("#reshape-result")).to_have_text(expected, timeout=10000)


LEFT_OUT = "This message and its answer are not part of the conversation: the model is not given them."


def _expect_left_out(pg, turn, error):
    """The page shows the `turn`-th exchange as failed and out of the context: its message and answer
    dimmed and marked, then the server's `error` and the note that says so."""
    for bubble in (pg.locator(".msg.user").nth(turn), pg.locator(".msg.assistant").nth(turn)):
        sync_api.expect(bubble).to_have_attribute("data-context", "out", timeout=30000)
    answer = pg.locator(".msg.assistant").nth(turn)
    sync_api.expect(answer).to_have_attribute("data-state", "error")
    sync_api.expect(answer.locator(".meta")).to_contain_text("failed, not in the conversation")
    note = answer.locator("xpath=following-sibling::div[1]")
    sync_api.expect(note).to_have_class(re.compile(r"\berror\b"))
    sync_api.expect(note).to_contain_text(error)
    sync_api.expect(note.locator(".meta")).to_have_text(LEFT_OUT)


@pytest.mark.timeout(60)
def test_a_refused_message_is_shown_out_of_the_context_and_retry_sends_it_again(url, browser):
    # A failed turn used to look like the others while the next request left it out; now the page says
    # it is out, and Retry resends it (here once Max tokens is put right) in its place.
    with _chat_page(browser, url) as (pg, bodies):
        _ask(pg, "retry me", 100000)   # past tiny's context: the server's request validation says 400
        _expect_left_out(pg, 0, "maximum context length is")
        pg.fill("#max-tokens", "2")
        pg.click(".msg.error button.retry")
        answer = pg.locator(".msg.assistant").first
        sync_api.expect(answer).to_have_attribute("data-state", "done", timeout=30000)
        # the failed exchange left the page: what it shows is what the model is given
        assert pg.locator("#messages .msg").count() == 2 and pg.locator(".msg.error").count() == 0
        assert pg.locator(".msg.user").all_inner_texts() == ["retry me"]
        sync_api.expect(pg.locator(".msg.user")).to_have_attribute("data-context", "in")
        sync_api.expect(answer).to_have_attribute("data-context", "in")
        assert _turns(bodies[-1]) == [("user", "retry me")] and bodies[-1]["max_tokens"] == 2
        _ask(pg, "and then?", 2)
        sync_api.expect(pg.locator(".msg.assistant").nth(1)).to_have_attribute("data-state", "done",
                                                                                timeout=30000)
        assert _turns(bodies[-1]) == [("user", "retry me"), ("assistant", _answer_text(answer)),
                                      ("user", "and then?")]
        assert len(bodies) == 3


@pytest.mark.timeout(60)
def test_an_answer_cut_short_by_a_failed_pipeline_is_shown_out_of_the_context(browser):
    # The pipeline fails mid-answer (a stage died and could not be replaced): the partial answer stays
    # on the page, said to be out of the conversation, and the next message is sent without it.
    with _own_server() as (base, on_engine), _chat_page(browser, base) as (pg, bodies):
        _ask(pg, "first question", 1900)
        _wait_for_chunks(pg, 2)
        on_engine(lambda engine: engine.router.fail_all("stage 0 died and could not be replaced"))
        _expect_left_out(pg, 0, "The pipeline ended this request early")
        assert _answer_text(pg.locator(".msg.assistant").first)   # the partial answer is still shown
        _ask(pg, "second question", 2)   # the pipeline is down for good: this one fails too
        _expect_left_out(pg, 1, "The pipeline is down")
        assert _turns(bodies[-1]) == [("user", "second question")]
        # only the last turn can be retried: resent now, the first question would come after the second
        assert pg.locator(".msg.error").count() == 2
        assert pg.locator(".msg.error button.retry").count() == 1
        sync_api.expect(pg.locator(".msg.error").nth(1).locator("button.retry")).to_be_visible()
