"""The chat page at / in headless Chromium (Selenium) against a real `dllama api` with the default
SmolLM2 model and an API key: the key asked for, a streamed answer growing, the stop button,
error replies shown, conversations kept across a reload, text never read as HTML, and a
phone-sized screen. The tests run in order, as one visitor's session in one browser.

Chromium and its driver come from Debian (`apt-get install chromium chromium-driver`, which
.ci/run does); without them these tests fail, unless DLLAMA_SKIP_BROWSER=1."""
from __future__ import annotations

import os
import shutil
import time

import pytest

try:
    import httpx
except ImportError:  # some environments ship httpx's successor under this name
    import httpx2 as httpx

from tests.processes import Server, wait_idle

pytestmark = pytest.mark.slow

KEY = "page-key"
STORY = "Write a long story about a dragon who lives in a castle."
QUESTION = "What is the capital of France?"
SCREENSHOTS = os.environ.get("DLLAMA_SCREENSHOTS")  # a folder to copy the screenshots into (the README's)


def _chromium() -> tuple[str, str]:
    browser = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
    driver = shutil.which("chromedriver")
    if os.environ.get("DLLAMA_SKIP_BROWSER") == "1":
        pytest.skip("DLLAMA_SKIP_BROWSER=1")
    if browser is None or driver is None:
        pytest.fail("the chat page tests need Chromium and its driver: apt-get install chromium chromium-driver "
                    "(.ci/run does), or set DLLAMA_SKIP_BROWSER=1 to skip them")
    return browser, driver


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    browser, chromedriver = _chromium()  # before the server: a missing browser fails at once
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--no-proxy-server",
                 "--hide-scrollbars", "--window-size=1100,760", "--force-device-scale-factor=1",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium')}"):  # a fresh localStorage
        options.add_argument(flag)
    d = webdriver.Chrome(options=options, service=Service(executable_path=chromedriver))  # no Selenium Manager
    d.set_script_timeout(30)
    yield d
    d.quit()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("page"), "--api-key", KEY)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.base, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def page(driver, server):
    driver.get(f"{server.base}/")
    return driver


# -- helpers ------------------------------------------------------------------------------------
def js(page, script: str, *args):
    return page.execute_script(script, *args)


def until(condition, timeout: float = 60, why: str = ""):
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, why or "timed out"
        time.sleep(0.05)
    return value


def el(page, css: str):
    from selenium.webdriver.common.by import By

    return page.find_element(By.CSS_SELECTOR, css)


def visible(page, css: str) -> bool:
    return js(page, "const e = document.querySelector(arguments[0]); return !!e && e.offsetParent !== null;", css)


def messages(page) -> list[tuple[str, str]]:
    """(role, text) of every bubble shown."""
    return [tuple(m) for m in js(page, """return [...document.querySelectorAll('#messages .msg')].map(
        m => [m.classList.contains('user') ? 'user' : 'assistant', m.querySelector('.text').textContent]);""")]


def answer_length(page) -> int:
    return js(page, "const a = [...document.querySelectorAll('#messages .msg.assistant .text')].pop();"
                    "return a ? a.textContent.length : -1;")


def type_and_send(page, text: str) -> None:
    box = el(page, "#prompt")
    box.clear()
    if len(text) < 200:
        box.send_keys(text)
    else:  # WebDriver types key by key: long texts are pasted
        js(page, "arguments[0].value = arguments[1];", box, text)
    el(page, "#send").click()


def set_field(page, css: str, value: str) -> None:
    field = el(page, css)
    field.clear()
    field.send_keys(value)


def finished(page) -> None:
    until(lambda: visible(page, "#send") and not visible(page, "#stop"), 120, "the answer did not end")


def screenshot(page, path) -> None:
    page.save_screenshot(str(path))
    if SCREENSHOTS:
        shutil.copy(path, os.path.join(SCREENSHOTS, path.name))


# -- the session --------------------------------------------------------------------------------
def test_the_page_loads_alone_and_asks_for_the_key(page):
    assert page.title == "dllama chat"
    until(lambda: "API key needed" in el(page, "#model").text, 10, "no key hint in the header")
    type_and_send(page, QUESTION)
    until(lambda: visible(page, "#notice"), 30, "no message about the key")
    assert "needs an API key" in el(page, "#notice").text
    assert visible(page, "#settings")  # opened on the key field
    assert el(page, "#prompt").get_attribute("value") == QUESTION  # given back, nothing lost
    assert messages(page) == [] and js(page, "return document.querySelectorAll('#conversations li').length") == 0
    set_field(page, "#api-key", "wrong")
    type_and_send(page, QUESTION)
    until(lambda: "refused this API key" in el(page, "#notice").text, 30, "no message about a wrong key")


def test_an_answer_streams_and_the_stop_button_ends_it(page, server, http):
    set_field(page, "#api-key", KEY)
    until(lambda: el(page, "#model").text == server.model_id, 10, "the model's id is not shown")
    set_field(page, "#temperature", "0")
    set_field(page, "#max-tokens", "400")
    el(page, "#settings-toggle").click()
    assert not visible(page, "#settings")
    type_and_send(page, STORY)
    assert not visible(page, "#notice")
    assert visible(page, "#stop") and not visible(page, "#send")
    lengths = [answer_length(page)]
    until(lambda: lengths.append(answer_length(page)) or len(set(lengths)) >= 6, 60,
          f"the answer did not grow: {sorted(set(lengths))}")
    assert lengths == sorted(lengths), "the answer shrank"  # it grows, chunk by chunk
    assert visible(page, "#stop"), "the answer ended before it could be stopped"
    el(page, "#stop").click()
    until(lambda: visible(page, "#send") and not visible(page, "#stop"), 5, "the UI did not come back")
    stopped = answer_length(page)
    time.sleep(1.0)
    assert answer_length(page) == stopped > 0  # no more text after the stop
    assert "Stopped." in el(page, "#messages .msg.assistant .note").text
    wait_idle(http, 10)  # the server let the generation go
    until(lambda: "POST /v1/chat/completions 200" in server.output() and "(client left)" in server.output(), 10,
          "no access log line for the stopped stream")
    # usable again: a short question gets a whole answer, after the stopped one
    el(page, "#settings-toggle").click()
    set_field(page, "#max-tokens", "40")  # the conversation must leave room in the context
    el(page, "#settings-toggle").click()
    type_and_send(page, QUESTION)
    finished(page)
    shown = messages(page)
    assert [role for role, _ in shown] == ["user", "assistant", "user", "assistant"]
    assert shown[0][1] == STORY and shown[2][1] == QUESTION and "Paris" in shown[3][1]


def test_an_error_reply_is_shown(page):
    before = messages(page)
    type_and_send(page, "word " * 3000)  # more than the server's --max-seq-len holds
    until(lambda: visible(page, "#notice"), 30, "no error shown")
    assert "context" in el(page, "#notice").text and "new chat" in el(page, "#notice").text
    assert messages(page) == before  # the exchange is undone, the text is back in the box to shorten
    assert el(page, "#prompt").get_attribute("value").startswith("word word")
    el(page, "#prompt").clear()


def test_an_error_event_in_the_stream_is_shown(page):
    """A stream that fails midway (as a lost cluster makes it): the text so far is kept, the
    error said. The reply is made up in the page, so the test needs no broken cluster."""
    el(page, "#new-chat").click()
    js(page, """const real = window.fetch;
        window.fetch = (url, init) => url !== 'v1/chat/completions' ? real(url, init) : Promise.resolve(new Response(
            'data: {"choices": [{"delta": {"content": "Half an ans"}}]}\\n\\n' +
            'data: {"error": {"message": "the model is unavailable: test"}}\\n\\ndata: [DONE]\\n\\n',
            {headers: {'Content-Type': 'text/event-stream'}}));""")
    type_and_send(page, "Hello?")
    finished(page)
    assert messages(page) == [("user", "Hello?"), ("assistant", "Half an ans")]
    assert "the model is unavailable: test" in el(page, "#notice").text
    assert "Interrupted" in el(page, "#messages .msg.assistant .note").text
    assert js(page, "return document.querySelectorAll('#conversations li').length") == 2
    el(page, "#conversations li.current .delete").click()
    assert messages(page) == [] and js(page, "return document.querySelectorAll('#conversations li').length") == 1


def test_a_reload_keeps_the_conversation_and_the_settings(page, tmp_path):
    el(page, "#conversations li .open").click()
    shown = messages(page)
    page.refresh()
    until(lambda: js(page, "return document.readyState") == "complete")
    assert js(page, "return document.querySelectorAll('#conversations li').length") == 1
    assert el(page, "#conversations li .open").get_attribute("textContent") == STORY
    assert messages(page) == shown  # the current conversation opens again
    assert "Stopped." in el(page, "#messages .msg.assistant .note").text
    el(page, "#settings-toggle").click()
    assert el(page, "#api-key").get_attribute("value") == KEY
    assert el(page, "#temperature").get_attribute("value") == "0"
    assert el(page, "#max-tokens").get_attribute("value") == "40"
    el(page, "#settings-toggle").click()
    screenshot(page, tmp_path / "chat-page-desktop.png")


def test_text_is_never_read_as_html(page):
    markup = "<b>bold</b> <img src=x onerror=\"document.title='hacked'\">"
    el(page, "#new-chat").click()
    type_and_send(page, markup + " Repeat this.")
    finished(page)
    assert messages(page)[-2] == ("user", markup + " Repeat this."), el(page, "#notice").text
    assert js(page, "return document.querySelectorAll('#messages b, #messages img').length") == 0
    assert page.title == "dllama chat"


def test_a_phone_sized_screen(page, tmp_path):
    page.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                         {"width": 390, "height": 844, "deviceScaleFactor": 1, "mobile": True})
    try:
        page.refresh()
        until(lambda: js(page, "return document.readyState") == "complete")
        width = js(page, "return window.innerWidth")
        assert width == 390
        overflow = """return [document.documentElement, ...document.querySelectorAll('#app *')]
            .filter(e => e.offsetParent !== null && e.closest('#sidebar') === null)
            .filter(e => e.getBoundingClientRect().right > window.innerWidth + 0.5 || e.scrollWidth > e.clientWidth + 1
                         && getComputedStyle(e).overflowX !== 'hidden')
            .map(e => e.id || e.className || e.tagName);"""
        assert js(page, overflow) == []  # nothing wider than the screen
        rect = "return document.querySelector(arguments[0]).getBoundingClientRect().toJSON();"
        composer = js(page, rect, "#composer")
        assert composer["bottom"] <= 844 + 0.5 and composer["width"] <= width
        assert js(page, rect, "#sidebar")["right"] <= 0  # the list is a drawer, closed
        el(page, "#menu").click()
        until(lambda: js(page, rect, "#sidebar")["left"] >= 0, 5, "the drawer did not open")
        assert js(page, rect, "#sidebar")["right"] <= width
        from selenium.webdriver import ActionChains

        backdrop = el(page, "#backdrop")  # tapped right of the drawer, which covers its middle
        ActionChains(page).move_to_element_with_offset(backdrop, width // 2 - 20, 0).click().perform()
        until(lambda: js(page, rect, "#sidebar")["right"] <= 0, 5, "the drawer did not close")
        el(page, "#settings-toggle").click()
        assert visible(page, "#settings") and js(page, overflow) == []
        el(page, "#settings-toggle").click()
        screenshot(page, tmp_path / "chat-page-phone.png")
    finally:
        page.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
