"""The chat page in a real headless Chromium (Debian's `chromium`, driven by Playwright) against a
live server: streaming, stop (the server's slot is freed), regenerate, edit, Markdown with model
output that tries to run script (shown as text, never run), tool calls, error banners for 400 and
503, phone width. Screenshots are kept under $PICOCHAT_TEST_ARTIFACTS (default: pytest's tmp dir)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
CHROMIUM = "/usr/bin/chromium"
if not Path(CHROMIUM).exists():
    pytest.skip(f"{CHROMIUM} is absent (apt-get install chromium)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")

from picochat.infer.scheduler import SchedulerConfig  # noqa: E402
from picochat.serve.api import create_app  # noqa: E402

from serve_support import LiveServer, ScriptedModel, byte_tokenizer, script_tokens, serving, wait_until  # noqa: E402

ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run", "--disable-quic"]

REPLY = ["Here is **bold**, *italic*, `code`.\n\n",
         "<script>window.__pwned = 1</script><img src=x onerror=\"window.__pwned = 2\">",
         "[link](javascript:window.__pwned=3)\n\n",
         "- one\n- two\n\n```python\nprint('<b>hi</b>')\n```\n\nLet me compute: ",
         "<|python_start|>", "6*7", "<|python_end|>", "<|output_start|>", "42", "<|output_end|>",
         " So the answer is 42.", "<|assistant_end|>"]


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> Path:
    folder = os.environ.get("PICOCHAT_TEST_ARTIFACTS")
    path = Path(folder) if folder else tmp_path_factory.mktemp("ui")
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        yield b
        b.close()


@pytest.fixture(scope="module")
def live(tok):
    model = ScriptedModel(script_tokens(tok, REPLY), tok.vocab_size, seq_len=1024, delay=0.004)
    with serving(model, tok, scheduler_config=SchedulerConfig(slots=2, sync_every=1)) as (server, scheduler):
        yield server, scheduler


@pytest.fixture(scope="module")
def slow(tok):
    """Never stops by itself and takes ~20 ms a token: long enough to press Stop."""
    model = ScriptedModel(script_tokens(tok, ["lorem ipsum dolor sit amet "]), tok.vocab_size, seq_len=4096, delay=0.02)
    with serving(model, tok, scheduler_config=SchedulerConfig(slots=2, sync_every=1)) as (server, scheduler):
        yield server, scheduler


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1000, "height": 800})
    pg = context.new_page()
    dialogs: list[str] = []
    pg.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    pg.dialogs = dialogs
    yield pg
    context.close()


def send(page, text: str) -> None:
    page.fill("#input", text)
    page.press("#input", "Enter")


def last_reply(page):
    return page.locator(".msg.assistant").last


def test_streamed_reply_renders_safely(page, live, artifacts):
    server, _ = live
    page.goto(server.url + "/")
    # The model's name arrives from /v1/models after the page has loaded: wait for it, do not race it.
    sync_api.expect(page.locator("#model")).to_have_text("picochat-test", timeout=10_000)
    send(page, "What is 6 times 7?")
    # The stats line is written once, when the stream has ended (a fast stream may show #stop for
    # less time than a poll takes, so waiting for it would be a race too).
    page.wait_for_selector(".msg.assistant .stats", timeout=30_000)
    page.wait_for_selector("#send", state="visible", timeout=30_000)
    reply = last_reply(page)
    body = reply.locator(".body")
    assert body.locator("strong").inner_text() == "bold" and body.locator("em").first.inner_text() == "italic"
    assert body.locator("li").all_inner_texts() == ["one", "two"]
    assert "print('<b>hi</b>')" in body.locator("pre code").inner_text()
    text = body.inner_text()
    assert "<script>window.__pwned = 1</script><img src=x onerror" in text
    assert page.evaluate("window.__pwned") is None and page.dialogs == []
    assert page.locator("#messages script, #messages img, #messages a[href^='javascript']").count() == 0
    assert reply.locator(".tool-call code").inner_text() == "6*7"
    assert reply.locator(".tool-output code").inner_text() == "42"
    assert "tok/s" in reply.locator(".stats").inner_text()
    page.screenshot(path=str(artifacts / "ui_reply.png"), full_page=True)


def test_regenerate_and_edit(page, live):
    server, _ = live
    page.goto(server.url + "/")
    send(page, "first question")
    page.wait_for_selector("text=Regenerate", timeout=30_000)
    requests: list[str] = []
    page.on("request", lambda r: requests.append(r.post_data or "") if r.url.endswith("/chat/completions") else None)
    page.click("text=Regenerate")
    page.wait_for_selector("text=Regenerate", timeout=30_000)
    assert len(requests) == 1 and '"first question"' in requests[0]
    assert page.locator(".msg.assistant").count() == 1
    page.locator(".msg.user").first.locator("text=Edit").click()
    page.fill(".msg.user textarea.edit", "second question")
    page.click("text=Save & send")
    page.wait_for_selector("text=Regenerate", timeout=30_000)
    assert page.locator(".msg.user").all_inner_texts()[0].startswith("second question")
    assert page.locator(".msg.assistant").count() == 1 and '"second question"' in requests[-1]
    assert "first question" not in requests[-1]


def test_stop_frees_the_server_slot(page, slow, artifacts):
    server, scheduler = slow
    page.goto(server.url + "/")
    page.click("#toggle-settings")
    page.fill("#max-tokens", "3000")
    send(page, "talk forever")
    assert wait_until(lambda: len(last_reply(page).locator(".body").inner_text()) > 20, timeout=30)
    assert scheduler.stats()["slots_used"] == 1
    page.click("#stop")
    page.wait_for_selector("#send", state="visible")
    assert "(stopped)" in last_reply(page).inner_text()
    assert wait_until(lambda: scheduler.stats()["slots_used"] == 0, timeout=5)
    kept = last_reply(page).locator(".body").inner_text()
    assert kept.startswith("lorem ipsum")
    page.screenshot(path=str(artifacts / "ui_stopped.png"))


def test_errors_are_shown(page, live, tok):
    server, _ = live
    page.goto(server.url + "/")
    send(page, "x" * 1100)  # longer than the 1024-token context
    page.wait_for_selector("#error", state="visible")
    assert "400" in page.inner_text("#error") and "context of 1024" in page.inner_text("#error")
    assert page.locator(".msg.assistant").count() == 0 and page.locator("text=Retry").count() == 1
    assert page.is_visible("#send")

    loading = LiveServer(create_app())  # no model attached: every request gets 503
    with loading:
        page.goto(loading.url + "/")
        send(page, "hello?")
        page.wait_for_selector("#error", state="visible")
        assert "503" in page.inner_text("#error") and "loading" in page.inner_text("#error")


def test_phone_width(browser, live, artifacts):
    server, _ = live
    context = browser.new_context(viewport={"width": 390, "height": 780}, is_mobile=True, has_touch=True)
    page = context.new_page()
    page.goto(server.url + "/")
    send(page, "hi from a phone")
    page.wait_for_selector(".tool-output", timeout=30_000)
    page.wait_for_selector("#send", state="visible", timeout=30_000)
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    assert page.locator("#composer").bounding_box()["y"] + 10 < 780
    page.screenshot(path=str(artifacts / "ui_phone.png"))
    context.close()


def test_readme_screenshot(browser, tok, artifacts):
    """The README's picture (also written to docs/img/ui.png when PICOCHAT_UI_SCREENSHOT=1)."""
    reply = ["Seven times six is a multiplication; let me use the calculator: ", "<|python_start|>", "7*6",
             "<|python_end|>", "<|output_start|>", "42", "<|output_end|>",
             "\n\nSo **7 × 6 = 42**. In Python:\n\n```python\nprint(7 * 6)\n```", "<|assistant_end|>"]
    model = ScriptedModel(script_tokens(tok, reply), tok.vocab_size, seq_len=1024)
    with serving(model, tok, scheduler_config=SchedulerConfig(slots=2)) as (server, _):
        context = browser.new_context(viewport={"width": 900, "height": 560})
        page = context.new_page()
        page.goto(server.url + "/")
        send(page, "What is 7 times 6?")
        page.wait_for_selector("text=Regenerate", timeout=30_000)
        page.click("#toggle-settings")
        out = artifacts / "ui.png"
        page.screenshot(path=str(out))
        context.close()
    if os.environ.get("PICOCHAT_UI_SCREENSHOT") == "1":
        target = Path(__file__).resolve().parents[1] / "docs" / "img" / "ui.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(out, target)
