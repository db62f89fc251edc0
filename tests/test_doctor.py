"""`scanbox doctor` over a /dev and /sys tree in a temporary directory, a pty ID card reader,
the platform simulator, a running daemon, and injected I2C and clock probes."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import pytest

from agent import cli, doctor
from agent.clock import RELEASE_FLOOR, Clock
from agent.config import Config
from drivers import pcsc
from tests.conftest import config_dict, make_config, write_config
from tests.drivers.sam_emulator import SamEmulator
from tests.drivers.test_hid import fake_sysfs


@pytest.fixture
def roots(tmp_path: Path) -> doctor.Roots:
    dev, sys = fake_sysfs(tmp_path / "root")
    (dev / "ttyUSB0").touch()
    (dev / "ttyAMA0").touch()
    (dev / "video0").touch()
    (sys / "class" / "video4linux" / "video0").mkdir(parents=True)
    (sys / "class" / "video4linux" / "video0" / "name").write_text("USB2.0 HD UVC WebCam\n")
    (dev / "i2c-1").touch()
    return doctor.Roots(dev, sys)


def a_clock(directory: Path, synchronised: bool | None = True, now: float | None = None) -> Clock:
    """The daemon's Clock with systemd-timesyncd's directory in `directory` (absent: None)."""
    timesync = directory / "timesync"
    if synchronised is not None:
        timesync.mkdir(exist_ok=True)
        if synchronised:
            (timesync / "synchronized").touch()
    return Clock(time_source=time.time if now is None else (lambda: now), timesync_dir=timesync,
                 kernel=lambda: None)


async def findings_of(config: Config | None, roots: doctor.Roots, **kw: Any) -> list[doctor.Finding]:
    kw.setdefault("wall_clock", a_clock(roots.dev.parent))
    kw.setdefault("i2c_probe", lambda bus, address: True)
    kw.setdefault("pcsc_list", lambda: [])  # the real pcscd: tests/cards/test_doctor_pcsc.py
    kw.setdefault("probe_timeout_s", 0.3)
    return await doctor.Doctor(config, roots, **kw).run()


def by_subject(findings: list[doctor.Finding]) -> dict[str, doctor.Finding]:
    return {f.subject: f for f in findings}


async def test_a_box_as_configured(tmp_path: Path, roots: doctor.Roots, sim_server) -> None:
    reader = SamEmulator(tmp_path)
    try:
        config = make_config(sim_server, tmp_path, sources={
            "counter": {"driver": "hid", "devices": ["/dev/input/by-id/usb-Honeywell*-event-kbd"]},
            "kiosk": {"driver": "hid", "devices": ["1eab:1a03"]},
            "reader": {"driver": "idcard", "port": str(reader.path)},
            "cam": {"driver": "camera", "device": "/dev/video0"},
        }, display={"model": "ssd1306", "i2c_port": 1})
        found = by_subject(await findings_of(config, roots))
    finally:
        reader.close()
    event3, event11 = str(roots.dev / "input/event3"), str(roots.dev / "input/event11")
    assert found[event3].status == "ok" and "scanner for source counter" in found[event3].text
    assert "Honeywell Imaging 1950g (0c2e:0b61) usb-Honeywell_1950g-event-kbd" in found[event3].text
    assert found[event11].status == "ok" and "source kiosk" in found[event11].text
    assert found[str(roots.dev / "input/event0")].status == "info"
    assert found["idcard:reader"].status == "ok"
    assert "SAM status 0x90 (ok)" in found["idcard:reader"].text
    assert found[str(roots.dev / "ttyUSB0")].text == "not configured"
    assert found[str(roots.dev / "video0")].text == "USB2.0 HD UVC WebCam"
    assert found["camera:cam"].status == "ok"
    assert found["display"].status == "ok"
    assert found["platform"].status == "ok" and "asked directly" in found["platform"].text
    assert found["clock"].status == "ok"
    assert not [f for f in found.values() if f.status in ("warn", "fail")]


async def test_what_to_fix(tmp_path: Path, roots: doctor.Roots) -> None:
    silent = SamEmulator(tmp_path)
    silent.silent = True
    try:
        config = make_config(None, tmp_path, sources={
            "counter": {"driver": "hid", "devices": ["ffff:0001"]},
            "reader": {"driver": "idcard", "port": str(silent.path)},
            "gone": {"driver": "idcard", "port": str(tmp_path / "ttyNothing")},
            "scanner": {"driver": "serial_scanner", "port": "/dev/ttyACM0"},
            "cam": {"driver": "camera", "device": "picamera2"},
        }, display={"model": "ssd1306", "i2c_port": 1, "i2c_address": "0x3D"})
        found = by_subject(await findings_of(config, roots, i2c_probe=lambda bus, address: False,
                                             wall_clock=a_clock(tmp_path, synchronised=False)))
    finally:
        silent.close()
    hid = found["hid:counter"]
    assert hid.status == "fail" and "no input device matches ffff:0001" in hid.text
    assert "usb-Honeywell_1950g-event-kbd" in hid.fix  # what it could be set to
    assert found["idcard:reader"].status == "fail" and "nothing answers the SAM status" in found["idcard:reader"].text
    assert "115200" in found["idcard:reader"].fix
    assert found["idcard:gone"].status == "fail" and "plug the reader in" in found["idcard:gone"].fix
    assert found["serial:scanner"].status == "fail" and "ttyUSB0" in found["serial:scanner"].fix
    assert found["camera:cam"].status == "fail" and "python3-picamera2" in found["camera:cam"].fix
    assert found["display"].status == "fail" and "nothing answers at 0x3D on i2c-1" in found["display"].text
    assert found["platform"].status == "fail" and "platform.endpoint" in found["platform"].fix
    assert found["clock"].status == "warn" and "set-ntp" in found["clock"].fix


async def test_an_unconfigured_reader_is_found(tmp_path: Path, roots: doctor.Roots) -> None:
    reader = SamEmulator(tmp_path)
    (roots.dev / "ttyUSB1").symlink_to(reader.slave_name)  # as a USB reader appears
    try:
        found = by_subject(await findings_of(None, roots))
        assert reader.commands == [(0x11, 0xFF)]
        quiet = by_subject(await findings_of(None, roots, probe_unconfigured=False))
    finally:
        reader.close()
    usb1 = found[str(roots.dev / "ttyUSB1")]
    assert usb1.status == "warn" and "an ID card reader answers (SAM status 0x90 (ok))" in usb1.text
    assert 'driver = "idcard"' in usb1.fix
    assert found[str(roots.dev / "ttyUSB0")].text == "not configured"  # a plain file: no answer
    assert quiet[str(roots.dev / "ttyUSB1")].text == "not configured"


async def test_a_missing_i2c_bus_and_a_clock_in_the_past(tmp_path: Path, roots: doctor.Roots) -> None:
    os.unlink(roots.dev / "i2c-1")
    config = make_config(None, tmp_path, display={"model": "sh1106", "i2c_port": 1})
    found = by_subject(await findings_of(config, roots, wall_clock=a_clock(tmp_path, None, 946684800.0)))  # 2000
    assert found["display"].status == "fail" and "dtparam=i2c_arm=on" in found["display"].fix
    assert found["clock"].status == "fail" and "NTP" in found["clock"].fix


async def test_the_platform_from_the_running_daemon(tmp_path: Path, roots: doctor.Roots, box) -> None:
    await box.start(sources={})
    verify = await box.unix()
    await verify.call("verify_qr", {"qr": box.resident().static_qr})  # the platform has answered once
    found = by_subject(await findings_of(box.daemon.config, roots))
    assert found["platform"].status == "ok"
    assert "from the running daemon): reachable, last answer" in found["platform"].text


def test_the_command(tmp_path: Path, roots: doctor.Roots, capsys: pytest.CaptureFixture[str]) -> None:
    config_file, secrets = write_config(tmp_path, config_dict(None, tmp_path, sources={
        "counter": {"driver": "hid", "devices": ["ffff:0001"]}}))
    code = cli.main(["doctor", "--config", str(config_file), "--secrets", str(secrets), "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 1  # the scanner is missing (on this machine, whatever its devices)
    assert {"area": "input", "status": "fail", "subject": "hid:counter"}.items() <= \
        next(f for f in out if f["subject"] == "hid:counter").items()
    text = doctor.report([doctor.Finding("clock", "warn", "clock", "not synchronised", "set-ntp"),
                          doctor.Finding("input", "ok", "/dev/input/event3", "scanner")])
    assert text.splitlines() == ["clock:", "  WARN clock: not synchronised", "         fix: set-ntp",
                                 "input:", "  ok   /dev/input/event3: scanner", "1 problem"]
    assert time.time() > RELEASE_FLOOR


async def test_a_configured_card_reader_without_pcscd(tmp_path: Path, roots: doctor.Roots) -> None:
    def no_pcscd() -> list[str]:
        raise pcsc.PcscUnavailable("Service not available.")

    bare = await findings_of(None, roots, pcsc_list=no_pcscd)
    assert not [f for f in bare if f.area == "cards"]  # no card reader configured: nothing to say
    config = make_config(None, tmp_path, sources={"cards": {"driver": "pcsc", "reader": "ACR1281"}})
    (finding,) = [f for f in await findings_of(config, roots, pcsc_list=no_pcscd) if f.area == "cards"]
    assert finding.status == "fail" and "Service not available" in finding.text and "pcscd" in finding.fix


async def test_a_platform_path_that_is_not_there_is_a_failure(tmp_path: Path, roots: doctor.Roots, sim_server) -> None:
    """An HTTP 404 from the platform's host used to be called "ok"."""
    config = make_config(None, tmp_path, platform={"endpoint": sim_server.endpoint + "/wrong"})
    found = by_subject(await findings_of(config, roots))
    assert found["platform"].status == "fail" and "HTTP 404: no service at this address" in found["platform"].text
    assert "platform.endpoint" in found["platform"].fix
    right = by_subject(await findings_of(make_config(sim_server, tmp_path), roots))
    assert right["platform"].status == "ok" and "its WSDL" in right["platform"].text


async def test_a_soap_service_that_faults_a_get_is_there(tmp_path: Path, roots: doctor.Roots) -> None:
    """CXF answers a GET of a service's address with HTTP 500 and a SOAP fault "No such
    operation": the service is there (this used to be a warning)."""
    from aiohttp import web

    fault = ('<soap:Envelope xmlns:soap="http://schemas.xmlsoap.org/soap/envelope/"><soap:Body><soap:Fault>'
             '<faultcode>soap:Server</faultcode><faultstring>No such operation: (HTTP GET PATH_INFO: '
             '/services/HealthCardService)</faultstring></soap:Fault></soap:Body></soap:Envelope>')

    async def cxf(request: web.Request) -> web.Response:
        return web.Response(status=500, text=fault, content_type="text/xml")

    async def broken(request: web.Request) -> web.Response:
        return web.Response(status=500, text="<html>Internal Server Error</html>", content_type="text/html")

    app = web.Application()
    app.router.add_get("/services/HealthCardService", cxf)
    app.router.add_get("/services/Broken", broken)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        config = make_config(None, tmp_path, platform={
            "endpoint": "http://127.0.0.1:%d/services/HealthCardService" % port})
        found = by_subject(await findings_of(config, roots))
        broken_config = make_config(None, tmp_path, platform={"endpoint": "http://127.0.0.1:%d/services/Broken" % port})
        failing = by_subject(await findings_of(broken_config, roots))
    finally:
        await runner.cleanup()
    assert found["platform"].status == "ok" and "a SOAP service answers" in found["platform"].text
    assert "No such operation" in found["platform"].text
    assert failing["platform"].status == "warn" and "the platform's server fails" in failing["platform"].text


def test_without_a_config_the_problems_it_prints_make_it_exit_1(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    from agent import config as configuration

    monkeypatch.setattr(configuration, "DEFAULT_CONFIG", tmp_path / "missing.toml")
    code = cli.main(["doctor", "--no-probe"])
    out = capsys.readouterr().out
    assert "WARN config: no config" in out and "no problems found" not in out
    assert code == 1


async def test_the_running_daemons_alarms_are_findings(tmp_path: Path, roots: doctor.Roots, box) -> None:
    """doctor collects what the daemon's components report (a missing scanner here)."""
    await box.start(sources={})
    box.daemon.hub.source_connected("serial:gone", False, "cannot open /dev/ttyNothing")  # as its driver says
    found = [f for f in await findings_of(box.daemon.config, roots) if f.area == "daemon"]
    assert any(f.subject == "serial:gone" and f.text.startswith("SOURCE_DISCONNECTED") for f in found), found


async def test_a_new_driver_brings_its_own_check(tmp_path: Path, roots: doctor.Roots,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Adding a driver is one module and one registry line: its config section validates against
    its Options and doctor runs its probe, with no edit to doctor or config."""
    import sys
    import types

    import drivers
    from drivers.base import DriverOptions, Finding, ProbeContext

    module = types.ModuleType("tests_driver_nfc")

    class Options(DriverOptions):
        driver: str = "nfc"
        antenna: str

    def probe(sources: dict[str, Any], ctx: ProbeContext) -> list[Finding]:
        return [Finding("nfc", "ok", "nfc:%s" % name, "antenna %s" % opts.antenna) for name, opts in sources.items()]

    module.Options = Options  # type: ignore[attr-defined]
    module.doctor = probe  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "tests_driver_nfc", module)
    monkeypatch.setitem(drivers.SOURCE_DRIVERS, "nfc", "tests_driver_nfc")
    config = make_config(None, tmp_path, sources={"door": {"driver": "nfc", "antenna": "left"}})
    found = by_subject(await findings_of(config, roots))
    assert found["nfc:door"].status == "ok" and found["nfc:door"].text == "antenna left"


async def test_the_tls_fingerprint_a_his_pins(tmp_path: Path, roots: doctor.Roots) -> None:
    from agent import tls

    config = make_config(None, tmp_path, sources={}, api={"tcp": "0.0.0.0:7800"})  # TLS: not loopback
    [finding] = [f for f in await findings_of(config, roots) if f.area == "tls"]
    assert finding.status == "warn" and "scanbox tls init" in (finding.fix or "")
    certificate = tls.default_paths(config.state_dir())
    tls.make(certificate)
    [finding] = [f for f in await findings_of(config, roots) if f.area == "tls"]
    assert finding.status == "ok" and certificate.fingerprint() in finding.text
    certificate.key.chmod(0o644)
    [finding] = [f for f in await findings_of(config, roots) if f.area == "tls"]
    assert finding.status == "fail" and "mode 0644" in finding.text
