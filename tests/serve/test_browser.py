"""The web chat page driven in headless Chromium: a streamed answer, an uploaded image, the stop button.

Uses Debian's ``chromium`` and ``chromium-driver`` (``make setup-test`` installs them where apt-get can run)
through selenium, against the live fixture server of conftest.py. The fixture model is deterministic at
temperature 0, so what the page shows is compared with what the API returns for the same request.
"""

from __future__ import annotations

import os
import shutil
import time

import httpx
import pytest

from tests.serve.conftest import MODEL_ID, png

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install -e '.[test]')")
from selenium.common.exceptions import TimeoutException  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

CHROMIUM = shutil.which("chromium")
CHROMEDRIVER = "/usr/bin/chromedriver" if os.access("/usr/bin/chromedriver", os.X_OK) else shutil.which("chromedriver")
if CHROMIUM is None or CHROMEDRIVER is None:
    pytest.skip("headless Chromium is not installed: the Debian packages chromium and chromium-driver are needed "
                "(`make setup-test` installs them where apt-get runs as root or with passwordless sudo)",
                allow_module_level=True)

# Every text node the page puts into an assistant reply, with the time and the observer call that saw it:
# the intermediate states of a streamed answer, which the final DOM no longer shows.
OBSERVE = """
window.replyUpdates = [];
let call = 0;
new MutationObserver((records) => {
  call += 1;
  for (const r of records) {
    if (!(r.target instanceof Element) || !r.target.matches(".msg.assistant > span")) continue;
    for (const n of r.addedNodes) {
      if (n.nodeType === Node.TEXT_NODE) window.replyUpdates.push({ call, t: performance.now(), text: n.data });
    }
  }
}).observe(document.getElementById("log"), { childList: true, subtree: true });
"""


@pytest.fixture(scope="module")
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1200,900"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def wait_for(driver, condition, what: str, timeout: float = 20.0):
    """Poll ``condition(driver)`` until truthy; on timeout fail showing the conversation and the console."""
    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.02).until(condition)
    except TimeoutException:
        log = driver.find_element(By.ID, "log").get_attribute("innerText")
        console = [f"{e['level']}: {e['message']}" for e in driver.get_log("browser")]
        raise AssertionError(f"timed out after {timeout} s waiting for {what}; the conversation: {log!r}; "
                             f"the console: {console}") from None


@pytest.fixture
def page(browser, server):
    """The chat page freshly loaded (an empty conversation), connected, at temperature 0."""
    browser.get(server.url + "/")
    wait_for(browser, lambda d: d.find_element(By.ID, "status").text == "model: " + MODEL_ID, "the page to connect")
    browser.execute_script(OBSERVE)
    temperature = browser.find_element(By.ID, "temperature")
    temperature.clear()
    temperature.send_keys("0")
    return browser


def set_max_tokens(driver, n: int) -> None:
    field = driver.find_element(By.ID, "max-tokens")
    field.clear()
    field.send_keys(str(n))


def last_reply(driver):
    replies = driver.find_elements(By.CSS_SELECTOR, "#log > .msg")
    assert replies and "user" not in replies[-1].get_attribute("class"), "no reply bubble after the message"
    return replies[-1]


def reply_text(driver, reply) -> str:
    return driver.execute_script("return arguments[0].querySelector(':scope > span').textContent", reply)


def finished_reply(driver) -> tuple[str, str]:
    """Wait until the last reply has its closing line; returns (answer text, closing line)."""
    wait_for(driver, lambda d: last_reply(d).find_elements(By.CLASS_NAME, "meta"), "the answer to finish")
    reply = last_reply(driver)
    assert reply.get_attribute("class") == "msg assistant", f"the reply is an error: {reply.text!r}"
    return reply_text(driver, reply), reply.find_element(By.CLASS_NAME, "meta").text


def scrape(server) -> dict[str, float]:
    """The unlabelled samples of /metrics (counters and gauges)."""
    response = httpx.get(server.url + "/metrics")
    assert response.status_code == 200
    samples = {}
    for line in response.text.splitlines():
        if line and not line.startswith("#") and "{" not in line:
            name, value = line.split()
            samples[name] = float(value)
    return samples


def test_a_message_gets_a_streamed_answer_equal_to_the_api_reply(page, client):
    set_max_tokens(page, 40)
    page.find_element(By.ID, "prompt").send_keys("Hello Max")
    page.find_element(By.ID, "send").click()
    text, meta = finished_reply(page)

    user = page.find_elements(By.CSS_SELECTOR, "#log > .msg.user")
    assert [u.text for u in user] == ["Hello Max"]
    assert page.find_element(By.ID, "prompt").get_attribute("value") == ""
    expected = client.chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": "Hello Max"}],
                                              max_tokens=40, temperature=0)
    assert text == expected.choices[0].message.content and text.strip()
    assert meta == "length, 40 tokens"
    # streamed: the answer grew piece by piece, over more than one moment, each state a prefix of the next
    updates = page.execute_script("return window.replyUpdates")
    states = [u["text"] for u in updates]
    assert len(set(states)) > 1, f"the answer appeared in one piece: {states}"
    assert all(b.startswith(a) for a, b in zip(states, states[1:])), f"the answer did not only grow: {states}"
    assert states[-1] == text
    assert len({u["call"] for u in updates}) > 1 and updates[-1]["t"] > updates[0]["t"]
    assert page.find_element(By.ID, "send").is_enabled() and not page.find_element(By.ID, "stop").is_enabled()


def test_an_uploaded_image_is_sent_and_answered(page, server, client, tmp_path):
    picture = tmp_path / "red.png"
    picture.write_bytes(png(64, 48, (220, 30, 30)))
    set_max_tokens(page, 12)
    page.find_element(By.ID, "image").send_keys(str(picture))  # the hidden file input behind the Image button
    wait_for(page, lambda d: d.find_elements(By.CSS_SELECTOR, "#pending img"), "the picked image to be shown")
    before = scrape(server)
    prompt = page.find_element(By.ID, "prompt")
    prompt.send_keys("What colour is this?")
    prompt.send_keys(Keys.ENTER)
    text, meta = finished_reply(page)
    after = scrape(server)

    assert not page.find_elements(By.CSS_SELECTOR, "#pending img"), "the image stayed attached after sending"
    shown = page.find_elements(By.CSS_SELECTOR, "#log > .msg.user img")
    assert len(shown) == 1
    url = shown[0].get_attribute("src")
    assert url.startswith("data:image/png;base64,")
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                             {"type": "text", "text": "What colour is this?"}]}]
    expected = client.chat.completions.create(model=MODEL_ID, messages=messages, max_tokens=12, temperature=0)
    assert text == expected.choices[0].message.content
    assert meta == "length, 12 tokens"
    # the page's prompt was the API's prompt with the image: same length (prefilled + reused from the cache)
    page_prompt = (after["llama4_prompt_tokens_total"] - before["llama4_prompt_tokens_total"]
                   + after["llama4_prefix_cache_hit_tokens_total"] - before["llama4_prefix_cache_hit_tokens_total"])
    text_only = client.chat.completions.create(model=MODEL_ID, max_tokens=1, temperature=0, messages=[
        {"role": "user", "content": "What colour is this?"}])
    assert page_prompt == expected.usage.prompt_tokens > text_only.usage.prompt_tokens + 100


def test_stop_ends_a_long_answer_and_frees_its_slot(page, server):
    set_max_tokens(page, 1500)
    generated_before = scrape(server)["llama4_generated_tokens_total"]
    cancelled_before = server.app.state.metrics.finished["cancelled"]
    page.find_element(By.ID, "prompt").send_keys("Tell me a long story about Max")
    page.find_element(By.ID, "send").click()
    wait_for(page, lambda d: d.execute_script("return window.replyUpdates.length") >= 3, "the answer to start")
    assert scrape(server)["llama4_running_requests"] == 1
    page.find_element(By.ID, "stop").click()
    text, meta = finished_reply(page)

    assert meta == "stopped"
    assert page.find_element(By.ID, "send").is_enabled() and not page.find_element(By.ID, "stop").is_enabled()
    deadline = time.monotonic() + 10
    while scrape(server)["llama4_running_requests"] != 0:
        assert time.monotonic() < deadline, "the stopped answer still runs on the server"
        time.sleep(0.02)
    assert httpx.get(server.url + "/health").json()["running"] == 0
    assert server.app.state.metrics.finished["cancelled"] == cancelled_before + 1
    assert scrape(server)["llama4_generated_tokens_total"] - generated_before < 1500
    time.sleep(0.3)
    assert reply_text(page, last_reply(page)) == text, "the answer kept growing after stop"
