"""`scanbox doctor`: what the box sees, whether it matches the config, and what to fix.

Input devices (and which configured HID scanner each one is), serial ports (and whether a
configured ID card reader answers the SAM status command), PC/SC card readers (through pcscd, and
which configured reader or PSAM slot each one is), cameras, I2C buses (and whether the
configured display answers), the platform (from the running daemon's `status`, else asked
directly) and the clock (TLS and the platforms' signatures need the right time).

The source drivers' checks are each driver module's own `doctor` probe (drivers/base.py,
"`scanbox doctor`"): this module only runs them, with the configured sources of each. Everything
under /dev and /sys is read below `Roots`, so tests give it a tree in a temporary directory;
probes that talk to hardware (I2C, pcscd, the clock) are injectable.
"""

from __future__ import annotations

import asyncio
import glob
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import msgspec

import drivers
from agent import config as configuration
from agent.clock import Clock
from agent.config import Config, PlatformConfig
from agent.platforms.transport import Reply
from drivers.base import Finding, FindingStatus, ProbeContext, Roots

Status = FindingStatus

def i2c_answers(bus: int, address: int) -> bool:
    """Whether anything acknowledges `address` on /dev/i2c-`bus` (a quick write, as i2cdetect)."""
    from smbus2 import SMBus  # luma.core's dependency

    with SMBus(bus) as smbus:
        try:
            smbus.write_quick(address)
        except OSError:
            return False
    return True


@dataclass
class Doctor:
    config: Config | None
    roots: Roots = field(default_factory=Roots)
    socket_path: Path | None = None
    probe_timeout_s: float = 1.0
    # ask unconfigured USB serial ports for the SAM status (writes 10 bytes to each)
    probe_unconfigured: bool = True
    i2c_probe: Callable[[int, int], bool] = i2c_answers
    pcsc_list: Callable[[], list[str]] | None = None  # None: ask pcscd
    # the clock as the daemon judges it (agent/clock.py), for when no daemon runs to say
    wall_clock: Clock = field(default_factory=Clock)

    async def run(self) -> list[Finding]:
        findings: list[Finding] = []
        if self.config is None:
            findings.append(Finding("config", "warn", "config", "no config: listing devices only",
                                    "scanbox doctor --config /etc/scanbox/scanbox.toml"))
        findings += await asyncio.to_thread(self.sources)
        findings += self.displays()
        status = await self._daemon_status()
        findings += await self.platform(status)
        findings += self.clock(status)
        findings += self.daemon_alarms(status)
        findings += self.tls()
        return findings

    def daemon_alarms(self, status: dict[str, Any] | None) -> list[Finding]:
        """What the running daemon's components say is wrong (`status.alarms`)."""
        if status is None:
            return []
        return [Finding("daemon", "warn", str(a.get("source")), "%s: %s" % (a.get("code"), a.get("text")))
                for a in status.get("alarms") or [] if isinstance(a, dict)]

    # -- the API's TLS certificate ---------------------------------------------------------------

    def tls(self) -> list[Finding]:
        """The certificate the TLS listeners present, and the fingerprint a HIS pins."""
        if self.config is None:
            return []
        from agent import tls

        api = self.config.api
        listeners = [value for _, value, secure in configuration.listeners(self.config) if secure]
        if not listeners:
            return [Finding("tls", "ok", "tls", "no listener speaks TLS (plain on loopback and the USB link only)")]
        certificate = (tls.BoxCertificate(api.tls_cert, api.tls_key) if api.tls_cert and api.tls_key
                       else tls.default_paths(self.config.state_dir()))
        if not certificate.cert.exists() and api.tls_cert is None:
            return [Finding("tls", "warn", str(certificate.cert), "no certificate yet: the daemon makes one at "
                            "its first start", "scanbox tls init, then give the HIS the fingerprint it shows")]
        try:
            certificate.server_context()
            fingerprint = certificate.fingerprint()
        except tls.TlsError as exc:
            return [Finding("tls", "fail", str(certificate.cert), str(exc),
                            "chmod 600 the key, or scanbox tls init --force (every HIS then pins the new one)")]
        return [Finding("tls", "ok", str(certificate.cert), "%s over TLS; SHA-256 fingerprint %s (what the HIS "
                        "pins)" % (", ".join(listeners), fingerprint))]

    def sources(self) -> list[Finding]:
        """Each source driver's own probe (its module's `doctor`), given its configured sources:
        a new driver brings its checks with it."""
        configured = self.config.sources if self.config is not None else {}
        ctx = ProbeContext(self.roots, self.probe_timeout_s, self.probe_unconfigured, pcsc_list=self.pcsc_list)
        for name, opts in configured.items():
            port = getattr(opts, "port", None)
            if isinstance(port, str) and "://" not in port:
                ctx.claimed[str(ctx.dev(port))] = "%s:%s" % (opts.driver, name)
        out: list[Finding] = []
        for driver in drivers.SOURCE_DRIVERS:
            probe = getattr(drivers.source_module(driver), "doctor", None)
            if probe is None:
                continue
            mine = {name: opts for name, opts in configured.items() if opts.driver == driver}
            try:
                out += probe(mine, ctx)
            except Exception as exc:  # a probe's bug is one finding, not the end of doctor
                out.append(Finding(driver, "fail", driver, "the %s driver's check failed: %s" % (driver, exc)))
        return out

    # -- I2C displays --------------------------------------------------------------------------

    def displays(self) -> list[Finding]:
        out = []
        buses = sorted(glob.glob(str(self.roots.dev / "i2c-*")))
        for bus in buses:
            out.append(Finding("i2c", "info", bus, "I2C bus"))
        display = self.config.display if self.config is not None else None
        if display is None or display.model == "dummy" or display.interface != "i2c":
            return out
        subject = "display"
        bus_node = self.roots.dev / ("i2c-%d" % display.i2c_port)
        if not bus_node.exists():
            out.append(Finding("i2c", "fail", subject, "%s: %s does not exist" % (display.describe(), bus_node),
                               "enable I2C (raspi-config nonint do_i2c 0, or dtparam=i2c_arm=on in "
                               "config.txt) and reboot"))
            return out
        try:
            answers = self.i2c_probe(display.i2c_port, display.i2c_address)
        except OSError as exc:
            out.append(Finding("i2c", "fail", subject, "%s: cannot open the bus: %s" % (display.describe(), exc),
                               "add the service user to group 'i2c'"))
            return out
        if answers:
            out.append(Finding("i2c", "ok", subject, "%s answers" % display.describe()))
        else:
            out.append(Finding("i2c", "fail", subject, "nothing answers at 0x%02X on i2c-%d"
                               % (display.i2c_address, display.i2c_port),
                               "check the wiring (SDA, SCL, 3.3 V, GND) and the address (`i2cdetect -y %d`; "
                               "0x3C or 0x3D)" % display.i2c_port))
        return out

    # -- platform ------------------------------------------------------------------------------

    async def platform(self, status: dict[str, Any] | None) -> list[Finding]:
        if status is not None:
            p = status.get("platform") or {}
            age = p.get("credential_age_s")
            text = "%s (from the running daemon): %s" % (
                p.get("kind"), {True: "reachable", False: "unreachable", None: "not asked yet"}[p.get("reachable")])
            if p.get("last_ok_at"):
                text += ", last answer %s" % p["last_ok_at"]
            if age is not None:
                text += ", credential %s old" % _age(age)
            failed = p.get("reachable") is False
            return [Finding("platform", "fail" if failed else "ok", "platform", text,
                            ("the platform says: %s; check the network and platform.endpoint"
                             % p.get("last_error")) if failed else None)]
        if self.config is None:
            return []
        return [await self._ask_platform(self.config.platform)]

    async def _daemon_status(self) -> dict[str, Any] | None:
        path = self.socket_path or (self.config.unix_socket() if self.config else None)
        if path is None or not path.exists():
            return None
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(str(path)), 2)
        except (OSError, asyncio.TimeoutError):
            return None
        try:
            writer.write(b'{"jsonrpc":"2.0","id":1,"method":"status","params":{}}\n')
            line = await asyncio.wait_for(reader.readline(), 5)
            return json.loads(line).get("result")
        except (OSError, asyncio.TimeoutError, ValueError, AttributeError):
            return None
        finally:
            writer.close()

    async def _ask_platform(self, cfg: PlatformConfig) -> Finding:
        from agent.platforms.base import PlatformUnavailable
        from agent.platforms.transport import HttpClient

        http = HttpClient(timeout_s=cfg.timeout_s, tls_verify=cfg.tls_verify)
        try:
            response = await http.get(cfg.endpoint)
            wsdl = None
            if response.status in (404, 410) and cfg.kind in SOAP_KINDS:
                # a SOAP service need not answer a plain GET, but serves its WSDL at ?wsdl
                wsdl = await http.get(cfg.endpoint + ("&" if "?" in cfg.endpoint else "?") + "wsdl")
        except PlatformUnavailable as exc:
            text = exc.message
            fix = "check the network (default route, DNS) and platform.endpoint; timeout_s is %.0f s" % cfg.timeout_s
            if "TLS" in text:  # transport.HTTP_ERRORS names TLS failures so
                fix = "TLS failed: check the clock, and platform.tls_verify (the platform's CA)"
            return Finding("platform", "fail", "platform", text, fix)
        finally:
            await http.close()
        status, said, what_to_do = _judge_platform_answer(cfg.kind, response, wsdl)
        credentials = "; the box's credentials travel with every call" if cfg.kind == "rhc" else ""
        return Finding("platform", status, "platform", "%s: %s (asked directly: no daemon running)%s"
                       % (cfg.endpoint, said, credentials), what_to_do)

    # -- clock ---------------------------------------------------------------------------------

    def clock(self, status: dict[str, Any] | None = None) -> list[Finding]:
        """The running daemon's verdict on its clock (`status.clock`: its floor includes the
        newest time in its outbox), else the same judgement made here (agent.clock.Clock)."""
        clock = self.wall_clock
        daemon = status.get("clock") if status is not None else None
        if isinstance(daemon, dict) and "sane" in daemon:
            synced, by, sane = daemon.get("synchronised"), daemon.get("synchronised_by"), daemon.get("sane")
            shown, whose = str(daemon.get("now")), "the running daemon's clock"
            floor = "%s (%s)" % (daemon.get("floor"), daemon.get("floor_source"))
        else:
            synced, by = clock.synchronised_by()
            sane = clock.sane()
            shown, whose = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(clock.now())), "the clock"
            floor = "%s (%s)" % (time.strftime("%Y-%m-%d", time.localtime(clock.floor)), clock.floor_source)
        set_ntp = ("TLS and platform signatures need the right time: `timedatectl set-ntp true`, and let the box "
                   "reach an NTP server (or the hospital's)")
        if not sane:
            return [Finding("clock", "fail", "clock", "%s says %s, before %s: wrong and not synchronised"
                            % (whose, shown, floor),
                            "the box has no battery-backed clock: it needs NTP (check network access to "
                            "an NTP server; `timedatectl set-ntp true`)")]
        if synced is None:
            return [Finding("clock", "warn", "clock", "%s; cannot tell whether NTP keeps it right" % shown)]
        told = " (%s)" % by if by else ""
        if not synced:
            return [Finding("clock", "warn", "clock", "%s, not synchronised%s" % (shown, told), set_ntp)]
        return [Finding("clock", "ok", "clock", "%s, synchronised%s" % (shown, told))]


SOAP_KINDS = ("rhc", "wondersgroup")


def _soap_fault(response: Reply) -> str | None:
    """The faultstring when the answer is a SOAP fault (a SOAP service that did not like a GET)."""
    body = response.text()[:4096]
    if "Fault" not in body or "Envelope" not in body:
        return None
    import re

    found = re.search(r"<(?:\w+:)?(?:faultstring|Text)[^>]*>([^<]*)<", body)
    return found.group(1).strip() if found else "a SOAP fault"


def _judge_platform_answer(kind: str, response: Reply, wsdl: Reply | None) -> tuple[Status, str, str | None]:
    """What a GET of the platform's endpoint says: a service there (ok), nothing there (404:
    the path is wrong), or a server in trouble."""
    code = response.status
    fault = _soap_fault(response) if kind in SOAP_KINDS else None
    if fault is not None:
        return "ok", "a SOAP service answers (HTTP %d, %s: as to any GET)" % (code, fault), None
    if code in (404, 410):
        if wsdl is not None and wsdl.status == 200 and "definitions" in wsdl.text()[:4096]:
            return "ok", "a SOAP service answers (its WSDL at ?wsdl)", None
        return "fail", "HTTP %d: no service at this address" % code, \
            "check platform.endpoint: the host answers, but not at this path (the platform's documentation " \
            "gives the service's full URL)"
    if code < 400 or code == 405:  # 405: a service that takes only POST
        return "ok", "answers HTTP %d" % code, None
    if code in (401, 403):
        return "warn", "HTTP %d: the server refuses this box" % code, \
            "a proxy or firewall in front of the platform may need this box's address allowed"
    if code < 500:
        return "warn", "HTTP %d" % code, "check platform.endpoint"
    return "warn", "HTTP %d: the platform's server fails" % code, \
        "the platform itself has a problem; try later or call the platform's support"


def _age(seconds: float) -> str:
    if seconds < 120:
        return "%d s" % seconds
    if seconds < 7200:
        return "%d min" % (seconds // 60)
    if seconds < 172800:
        return "%d h" % (seconds // 3600)
    return "%d days" % (seconds // 86400)


def report(findings: list[Finding]) -> str:
    lines = []
    area = None
    marks = {"ok": "ok  ", "info": "    ", "warn": "WARN", "fail": "FAIL"}
    for f in findings:
        if f.area != area:
            area = f.area
            lines.append("%s:" % area)
        lines.append("  %s %s: %s" % (marks[f.status], f.subject, f.text))
        if f.fix:
            lines.append("         fix: %s" % f.fix)
    problems = problems_in(findings)
    lines.append("%d problem%s" % (len(problems), "" if len(problems) == 1 else "s") if problems
                 else "no problems found")
    return "\n".join(lines)


def problems_in(findings: list[Finding]) -> list[Finding]:
    """What `report` counts as problems, and what makes `scanbox doctor` exit 1."""
    return [f for f in findings if f.status in ("warn", "fail")]


def to_json(findings: list[Finding]) -> list[dict[str, Any]]:
    return [msgspec.structs.asdict(f) for f in findings]
