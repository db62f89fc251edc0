"""examples/read_card.html in real headless Chromium (Debian's chromium and chromedriver; nothing
is downloaded) against a running daemon: a nurse's page reads a card over the WebSocket."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from aiohttp import web
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions
from selenium.webdriver.support.ui import WebDriverWait

from agent import tls
from tests.conftest import TOKEN

EXAMPLES = Path(__file__).resolve().parent.parent.parent / "examples"
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"


@pytest.fixture
async def page_server():
    """The example page served from its own origin, as a web HIS would serve it."""
    app = web.Application()
    app.router.add_static("/", EXAMPLES)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    yield "http://127.0.0.1:%d" % port
    await runner.cleanup()


def _chromium(tmp_path: Path, *extra: str) -> webdriver.Chrome:
    for path in (CHROMIUM, CHROMEDRIVER):
        assert Path(path).exists(), "%s is missing: bootstrap.sh installs chromium and chromium-driver" % path
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--user-data-dir=%s" % (tmp_path / "chromium"), *extra):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


@pytest.fixture
def browser(tmp_path: Path):
    driver = _chromium(tmp_path)
    yield driver
    driver.quit()


@pytest.fixture
def tls_box_certificate(tmp_path: Path) -> tls.BoxCertificate:
    """The box's certificate made before the browser starts: the browser pins its key."""
    certificate = tls.default_paths(tmp_path / "state")
    tls.make(certificate)
    return certificate


def _text_is(element_id: str, text: str):
    return expected_conditions.text_to_be_present_in_element((By.ID, element_id), text)


def _connect(browser, page_server: str, ws_url: str) -> None:
    """Open the example page as a web HIS developer would: the box's address, a token, Connect."""
    browser.get(page_server + "/read_card.html")
    box_field = browser.find_element(By.ID, "box")
    box_field.clear()
    box_field.send_keys(ws_url)
    browser.find_element(By.ID, "token").send_keys(TOKEN)
    browser.find_element(By.ID, "connect").click()


async def test_the_html_example_reads_a_card_over_the_websocket_in_chromium(box, page_server, browser):
    await box.start(api={"http": "127.0.0.1:0", "cors_origins": [page_server]})
    await _read_a_card(box, page_server, browser, "ws://%s:%d/ws" % box.daemon.http.address)


async def test_the_html_example_over_wss_with_the_box_key_pinned(box, page_server, tmp_path, tls_box_certificate):
    """As docs/api.md says for a browser: Chromium trusts this one box's key
    (--ignore-certificate-errors-spki-list), not any certificate."""
    pinned = await asyncio.to_thread(_chromium, tmp_path, "--ignore-certificate-errors-spki-list="
                                     + tls_box_certificate.spki_sha256())
    try:
        await box.start(api={"http": "127.0.0.1:0", "cors_origins": [page_server], "tls": "on"})
        assert box.daemon.tls_fingerprint == tls_box_certificate.fingerprint()
        await _read_a_card(box, page_server, pinned, "wss://%s:%d/ws" % box.daemon.http.address)
    finally:
        await asyncio.to_thread(pinned.quit)


async def test_a_browser_without_the_pin_cannot_connect_over_wss(box, page_server, browser):
    await box.start(sources={}, api={"http": "127.0.0.1:0", "cors_origins": [page_server], "tls": "on"})

    def try_to_connect() -> str:
        _connect(browser, page_server, "wss://%s:%d/ws" % box.daemon.http.address)
        WebDriverWait(browser, 15).until(_text_is("state", "连接失败"))
        return browser.find_element(By.ID, "state").text

    assert "cannot connect" in await asyncio.to_thread(try_to_connect)
    assert box.daemon.http.websockets == set()


async def _read_a_card(box, page_server: str, browser, ws_url: str) -> None:
    def open_and_connect() -> None:
        _connect(browser, page_server, ws_url)
        WebDriverWait(browser, 15).until(_text_is("state", "connected as his"))
        browser.find_element(By.ID, "read").click()

    await asyncio.to_thread(open_and_connect)
    await box.waiting(1)
    resident = box.resident()
    box.scan(resident.static_qr)

    def result_shown() -> dict[str, str]:
        WebDriverWait(browser, 15).until(_text_is("name", resident.name))
        WebDriverWait(browser, 5).until(_text_is("events", "verification"))
        return {key: browser.find_element(By.ID, key).text
                for key in ("name", "id_number", "verified", "payload", "state", "events")}

    shown = await asyncio.to_thread(result_shown)
    assert shown["id_number"] == resident.id_card
    assert shown["verified"].startswith("是") and shown["payload"] == resident.static_qr
    assert "done" in shown["state"]
    assert "scan: qr from serial:counter" in shown["events"]


async def test_a_page_from_another_origin_cannot_connect(box, page_server, browser):
    await box.start(sources={}, api={"http": "127.0.0.1:0", "cors_origins": ["http://his.example"]})
    ws_url = "ws://%s:%d/ws" % box.daemon.http.address

    def try_to_connect() -> str:
        _connect(browser, page_server, ws_url)
        WebDriverWait(browser, 15).until(_text_is("state", "连接失败"))
        return browser.find_element(By.ID, "state").text

    assert "cannot connect" in await asyncio.to_thread(try_to_connect)
    assert box.daemon.http.websockets == set()
