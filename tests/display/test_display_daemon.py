"""The screen in the running daemon: what a patient sees after a scan, kiosk text over the API,
and a display that is not there."""

from __future__ import annotations

from PIL import ImageChops

from agent.ui import render
from tests.conftest import until


def shown(box):
    """The picture on luma's dummy device, and the picture the UI meant."""
    device = box.daemon.display.device
    expected = render(box.daemon.ui.screen, (128, 64), box.daemon.ui.fonts)
    return device, expected


def on_panel(box) -> bool:
    device, expected = shown(box)
    if device is None:
        return False
    return ImageChops.difference(device.image.convert("L"), expected.convert("L")).getbbox() is None


async def test_a_scan_ends_on_the_panel_as_a_masked_success(box):
    await box.start(display={"model": "dummy", "result_s": 30})
    await until(lambda: box.daemon.display.connected and box.daemon.ui.screen is not None)
    box.scan(box.resident().static_qr)
    await until(lambda: box.daemon.ui.screen.kind == "success", timeout=10)
    await until(lambda: on_panel(box), timeout=10)
    assert box.daemon.ui.screen.lines == ("张*明  电子健康卡",)
    client = await box.unix()
    status = await client.call("status")
    assert status["display"]["connected"] is True and status["display"]["screen"] == "success"
    assert status["display"]["cjk_font"] is True


async def test_display_show_puts_kiosk_text_up(box):
    await box.start(sources={}, display={"model": "dummy"})
    client = await box.unix()
    assert await client.call("display.show", {"lines": ["请到3号窗口缴费"], "seconds": 20}) == {
        "shown": True, "seconds": 20.0}
    await until(lambda: box.daemon.ui.screen.kind == "message" and on_panel(box), timeout=10)
    bad = await client.request("display.show", {"lines": ["x" * 65]})
    assert bad["error"]["data"]["reason"] == "BAD_REQUEST"
    too_many = await client.request("display.show", {"lines": ["a", "b", "c", "d", "e"]})
    assert too_many["error"]["data"]["reason"] == "BAD_REQUEST"


async def test_without_a_display_display_show_says_so(box):
    await box.start(sources={})
    client = await box.unix()
    refused = await client.request("display.show", {"lines": ["hello"]})
    assert refused["error"]["data"]["reason"] == "NOT_SUPPORTED"
    assert (await client.call("status"))["display"] == {"configured": False, "connected": False}


async def test_a_missing_display_is_an_alarm_and_scanning_goes_on(box):
    await box.start(sources={}, display={"model": "ssd1306", "i2c_port": 99})
    client = await box.unix()
    await box.events.wait("status", lambda d: "display" in d and d["display"]["connected"] is False)
    status = await client.call("status")
    alarm = next(a for a in status["alarms"] if a["code"] == "DISPLAY_MISSING")
    assert "i2c-99" in alarm["text"] and alarm["source"] == "ssd1306 on i2c-99 at 0x3C"
    assert (await client.call("verify_qr", {"qr": box.resident().static_qr}))["verification"]["ok"]


async def test_the_tls_fingerprint_is_on_the_screen_after_start(box):
    await box.start(sources={}, display={"model": "dummy"}, api={"tls": "on"})
    digits = box.daemon.tls_fingerprint.replace(":", "")
    await until(lambda: box.daemon.ui.screen is not None and box.daemon.ui.screen.kind == "message"
                and on_panel(box), timeout=10)
    assert box.daemon.ui.screen.lines == ("TLS SHA-256", " ".join(digits[i:i + 4] for i in range(0, 16, 4)),
                                          " ".join(digits[i:i + 4] for i in range(16, 32, 4)))


async def test_an_uploader_that_keeps_failing_is_on_the_panel(box):
    """A part that fails again and again: COMPONENT_FAILED in `status` and 故障 on the OLED."""
    from typing_extensions import override

    from agent.model import UsageRecord, now_local
    from agent.platforms.base import VerifyRequest
    from agent.platforms.rhc import RhcPlatform
    from agent.qr import QrKind
    from agent.supervisor import Supervisor

    class UploadAlwaysFails(RhcPlatform):
        @override
        async def upload(self, record: UsageRecord) -> tuple[str | None, str | None]:
            raise RuntimeError("adapter bug")

    await box.start(supervisor=Supervisor(backoff_initial=0.2, backoff_max=2.0), sources={},
                    display={"model": "dummy"},
                    adapter=lambda config: UploadAlwaysFails(config.platform, config.site, config.state_dir()))
    await until(lambda: box.daemon.display.connected and box.daemon.ui.screen is not None)
    record = box.daemon.platform.verify_record(
        VerifyRequest(box.resident().static_qr, QrKind.STATIC, now_local(), "010101", "01"), "scan-x")
    await box.daemon.store.enqueue(record)
    box.daemon.uploader.wake()
    await until(lambda: box.daemon.ui.screen.kind == "fault" and on_panel(box), timeout=20)
    assert box.daemon.ui.screen.lines[0] == "故障 uploader"
    status = await (await box.unix()).call("status")
    assert status["components"]["uploader"]["in_a_row"] >= 2
    assert any(a["code"] == "COMPONENT_FAILED" and a["source"] == "uploader" for a in status["alarms"])
