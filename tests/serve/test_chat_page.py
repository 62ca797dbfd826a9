"""The chat page at ``/`` in a real browser: Debian's chromium driven by Playwright (skipped without them)."""

import contextlib
import shutil

import pytest

httpx = pytest.importorskip("httpx")

sync_api = pytest.importorskip("playwright.sync_api")

CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH (apt-get install chromium)")


@contextlib.contextmanager
def chat_page(server):
    """The server's chat page open in a headless chromium (skips when chromium does not start)."""
    with sync_api.sync_playwright() as p:
        try:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        except Exception as e:  # chromium present but unusable (e.g. missing libraries)
            pytest.skip(f"chromium does not start: {e}")
        try:
            page = browser.new_page()
            page.goto(server.url + "/")
            yield page
        finally:
            browser.close()


def test_chat_page_streams_the_same_answer_as_the_api(server):
    expected = httpx.post(server.url + "/v1/chat/completions", timeout=60, json={
        "model": "tiny", "messages": [{"role": "user", "content": "Hello"}], "temperature": 0, "max_tokens": 30,
    }).json()["choices"][0]["message"]["content"]
    with chat_page(server) as page:
        assert page.title() == "bitnet chat"
        page.fill("#temperature", "0")
        page.fill("#max_tokens", "30")
        page.fill("#input", "Hello")
        page.click("#send")
        page.wait_for_selector(".msg.assistant[data-done='true']", timeout=30_000)
        assert page.inner_text(".msg.user") == "You: Hello"
        assert page.eval_on_selector(".msg.assistant", "e => e.textContent") == expected
        assert page.get_attribute(".msg.assistant", "data-finish") in ("length", "stop")
        assert page.inner_text("#status") == "ready"
        # a second turn carries the history: the page sends both turns
        page.fill("#input", "More")
        page.click("#send")
        page.wait_for_selector(".msg.assistant:nth-of-type(4)[data-done='true']", timeout=30_000)
        assert page.locator(".msg.user").count() == 2
        assert page.locator(".msg.error").count() == 0


def test_chat_page_default_max_tokens_fits_the_context(server):
    """The page caps its default answer length at half the context that /v1/models reports (a 128-token model
    cannot take the old fixed 200): here context 256 -> 128, and the first message then succeeds."""
    with chat_page(server) as page:
        page.wait_for_selector("#max_tokens[data-fitted='true']", timeout=30_000)
        assert page.input_value("#max_tokens") == str(min(200, server.engine.context // 2))
        page.fill("#input", "Hello")
        page.click("#send")
        page.wait_for_selector(".msg.assistant[data-done='true']", timeout=60_000)
        assert page.locator(".msg.error").count() == 0
