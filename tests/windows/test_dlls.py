"""WSCallDLL.dll and OneTrans2.dll (windows/): built with mingw-w64 for 32- and 64-bit Windows,
their export tables checked, and the 64-bit build driven under wine by a test program written
like spec 001's VC++ example (LoadLibrary, GetProcAddress, caller-owned buffers) against a
running box with the wondersgroup simulator and a serial scanner pty."""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import itertools
import json
import os
import re
import shutil
import socket
import subprocess
from pathlib import Path

import pytest

from agent import tls
from agent.simulator.wondersgroup import WondersgroupServer, WondersgroupSimulator
from tests.api.test_onetrans import APP_ID, APP_KEY, SPEC_READ_CARD, SPEC_RECHARGE
from tests.conftest import ADMIN_TOKEN, TOKEN, until
from tests.platforms.test_wondersgroup import ORG

ROOT = Path(__file__).resolve().parent.parent.parent
WINDOWS = ROOT / "windows"
WSCALL_EXPORTS = {"WSC_getAuthKey", "WSC_syncCardInfo", "WSC_virIdCardVerify", "WSC_updateCardInfo", "WSC_downQr",
                  "ReadPeopleInfo_V2", "ReadCardInfo_V2", "ShowForm_V2"}
# what the DLLs may import: Windows' own DLLs, nothing a HIS PC would lack
SYSTEM_DLLS = {"kernel32.dll", "msvcrt.dll", "winhttp.dll", "bcrypt.dll", "secur32.dll", "ws2_32.dll", "crypt32.dll"}


def wine_binary() -> str:
    found = shutil.which("wine64") or shutil.which("wine")
    if found is None and Path("/usr/lib/wine/wine64").exists():
        found = "/usr/lib/wine/wine64"  # Debian's wine64 without the wine wrapper package
    assert found, "wine64 is not installed (bootstrap.sh installs it)"
    return found


@pytest.fixture(scope="session")
def built() -> Path:
    out = ROOT / "build" / "windows"  # make rebuilds what changed
    run = subprocess.run(["make", "-C", str(WINDOWS), "OUT=%s" % out, "-j2"], capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "warning" not in run.stderr.lower(), run.stderr
    return out


@pytest.fixture(scope="session")
def wine(tmp_path_factory):
    """A throwaway prefix made once per session, its wineserver kept up between runs; no X
    display is used (DISPLAY unset, wineboot without the Mono/Gecko installers)."""
    prefix = tmp_path_factory.mktemp("wine") / "prefix"
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY")}
    env.update(WINEPREFIX=str(prefix), WINEDEBUG="-all", WINEDLLOVERRIDES="mscoree,mshtml=")
    binary = wine_binary()
    boot = subprocess.run([binary, "wineboot", "--init"], env=env, capture_output=True, text=True, timeout=300)
    assert prefix.joinpath("system.reg").exists(), boot.stderr
    server = shutil.which("wineserver") or "/usr/lib/wine/wineserver"
    subprocess.run([server, "-p"], env=env, timeout=60)
    yield binary, env
    subprocess.run([server, "-k"], env=env, timeout=60)


class Pc:
    """A HIS PC's program folder: the DLLs, their ini and the test program."""

    def __init__(self, folder: Path, build: Path, wine: tuple[str, dict[str, str]], arch: str = "x64") -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        for name in ("WSCallDLL.dll", "OneTrans2.dll", "dlltest.exe"):
            shutil.copy(build / arch / name, folder / name)
        self.binary, self.env = wine
        self._files = itertools.count()

    def ini(self, name: str, text: str) -> None:
        self.folder.joinpath(name).write_bytes(text.replace("\n", "\r\n").encode("gbk"))

    def file(self, data: bytes) -> str:
        path = self.folder / ("input%d.txt" % next(self._files))
        path.write_bytes(data)
        return path.name

    async def start(self, *args: str) -> asyncio.subprocess.Process:
        return await asyncio.create_subprocess_exec(
            self.binary, str(self.folder / "dlltest.exe"), *args, cwd=self.folder, env=self.env,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)

    @staticmethod
    async def result(process: asyncio.subprocess.Process, timeout: float = 60) -> dict[str, str]:
        out, _ = await asyncio.wait_for(process.communicate(), timeout)
        return parse(out)

    async def run(self, *args: str, timeout: float = 60) -> dict[str, str]:
        return await self.result(await self.start(*args), timeout)


def parse(output: bytes) -> dict[str, str]:
    fields = {}
    for line in output.decode("ascii", "replace").splitlines():
        key, _, value = line.strip().partition("=")
        if key in ("out", "msg", "second_out"):
            value = bytes.fromhex(value).decode("gbk")
        fields[key] = value
    assert "error" not in fields, fields
    return fields


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
async def wg_server():
    server = await WondersgroupServer(WondersgroupSimulator(org_code=ORG)).start("127.0.0.1", 0)
    yield server
    await server.close()


ONETRANS = {"region": "630000", "read_timeout_s": 10, "apps": {APP_ID: {"app_key": APP_KEY}}}


async def started(box, wg_server, **api) -> str:
    await box.start(platform={"kind": "wondersgroup", "endpoint": wg_server.endpoint,
                              "wsdl": wg_server.endpoint + "?wsdl",
                              "wondersgroup": {"org_code": ORG, "user_name": "scanbox",
                                               "pass_word": "scanbox-secret"}},
                    api={"http": "127.0.0.1:0", "onetrans": ONETRANS, **api})
    return "%s://%s:%d" % ("https" if api.get("tls") == "on" else "http", *box.daemon.http.address)


def wscall_ini(url: str, token: str = ADMIN_TOKEN, **scanbox: object) -> str:
    """The hospital's WSCallConfig.ini with its two [WEBSERVICE] lines pointed at the box."""
    extra = "".join("%s=%s\n" % item for item in scanbox.items())
    return ("[MANU_DIR]\nINCLUDE_DIR=<WDCARD:WD><HuaDa:HD>\n[WEBSERVICE]\nurl=%s\norgCode=20121221\n"
            "userName=20121221\npassWord=123456\nauthKey=%s\nLOG=1\n[CardDevEnv]\nDevSuitType=0\n"
            "SMDDevName=WDScannerDLLMD.dll\n%s" % (url, token, "[SCANBOX]\n" + extra if extra else ""))


_sequence = itertools.count(1)


def p_in_data(example: dict, **changes) -> bytes:
    """What the HIS passes OneTrans: the spec's pInData with the app's id and key, a new msgid,
    in GBK."""
    now = dt.datetime.now()
    message = {k: v for k, v in example.items() if k not in ("appId", "appKey", "app_id", "app_key")}
    message.update(appId=APP_ID, appKey=APP_KEY, enc_type="SM4",
                   msgid="H35058300252%s%04d" % (now.strftime("%Y%m%d%H%M%S"), next(_sequence)),
                   timestamp=now.strftime("%Y%m%d%H%M%S") + "%03d" % (now.microsecond // 1000))
    message.update(changes)
    return json.dumps(message, ensure_ascii=False).encode("gbk")


# --- builds and exports -------------------------------------------------------------------

@pytest.mark.parametrize("arch,objdump", [("x86", "i686-w64-mingw32-objdump"), ("x64", "x86_64-w64-mingw32-objdump")])
def test_both_dlls_export_the_specs_names_undecorated(built, arch, objdump):
    for dll, names in (("WSCallDLL.dll", WSCALL_EXPORTS), ("OneTrans2.dll", {"OneTrans"})):
        dump = subprocess.run([objdump, "-p", str(built / arch / dll)], capture_output=True, text=True,
                              check=True).stdout
        table = dump[dump.index("[Ordinal/Name Pointer] Table"):]
        exported = set(re.findall(r"^\s*\[\s*\d+\]\s+(\S+)$", table, re.M))
        assert exported == names, (dll, arch, exported)  # no _Name@12 (stdcall decoration) on 32-bit
        assert ("file format pei-i386" if arch == "x86" else "file format pei-x86-64") in dump
        imported = {name.lower() for name in re.findall(r"DLL Name: (\S+)", dump)}
        assert imported <= SYSTEM_DLLS, imported


def test_the_dlls_crypto_meets_the_standard_vectors_under_wine(built, wine, tmp_path):
    result = asyncio.run(Pc(tmp_path / "pc", built, wine).run("vectors"))
    for name in ("sm3_abc", "sm3_abcd16", "sm4_a1", "sm4_a2", "mac_key", "sm4_key", "sign", "data"):
        assert result[name].endswith(" ok"), (name, result[name])
    assert result["data_back"] == "ok"
    assert result["rc"] == "0"


# --- WSCallDLL.dll ---------------------------------------------------------------------------

async def test_read_people_info_answers_the_next_scan_in_gbk(box, wg_server, built, wine, tmp_path):
    url = await started(box, wg_server)
    pc = Pc(tmp_path / "pc", built, wine)
    pc.ini("WSCallConfig.ini", wscall_ini(url, TOKEN, read_timeout_s=20))
    person = next(iter(wg_server.sim.people.values()))
    for function, root in (("ReadPeopleInfo_V2", "PeopleInfo"), ("ReadCardInfo_V2", "CardInfo")):
        reading = await pc.start("read", function, "5120", "1024")
        await _wait_for_reader(box)
        box.scan(person.static_qr)
        result = await pc.result(reading)
        assert result["rc"] == "0" and result["guard"] == "ok", result
        out = result["out"]
        assert out.startswith('<?xml version="1.0" encoding="GBK"?><%s>' % root), out
        assert "<xm>%s</xm>" % person.people["xm"] in out and "<zjhm>%s</zjhm>" % person.people["zjhm"] in out
        assert "<kind>qr</kind>" in out and ("<klx>3</klx>" in out) == (root == "CardInfo")
    assert (await pc.run("showform"))["rc"] == "0"


async def _wait_for_reader(box) -> None:
    """Until the DLL's read_card waits at the box (wine starts the program in a few seconds)."""
    await until(lambda: box.daemon.hub.waiting >= 1, timeout=60)


async def test_a_reading_call_times_out_with_24_and_an_unreachable_box_is_33(box, wg_server, built, wine, tmp_path):
    url = await started(box, wg_server)
    pc = Pc(tmp_path / "pc", built, wine)
    pc.ini("WSCallConfig.ini", wscall_ini(url, TOKEN, read_timeout_s=1))
    result = await pc.run("read", "ReadPeopleInfo_V2", "5120", "1024")
    assert result["rc"] == "-24" and result["msg"].startswith("未寻到卡") and result["out"] == "", result
    # the box stopped: nothing listens at the address any more
    pc.ini("WSCallConfig.ini", wscall_ini("http://127.0.0.1:%d" % free_port(), TOKEN, timeout_s=3))
    for args in (("read", "ReadPeopleInfo_V2", "5120", "1024"),
                 ("wsc", "WSC_getAuthKey", pc.file(b"<orgCode>1</orgCode>"), "5120", "1024")):
        result = await pc.run(*args)
        assert result["rc"] == "-33" and "设备连接异常" in result["msg"] and result["guard"] == "ok", result
    # a wrong token is the configuration's fault
    pc.ini("WSCallConfig.ini", wscall_ini(url, "not-the-token"))
    result = await pc.run("read", "ReadPeopleInfo_V2", "5120", "1024")
    assert result["rc"] == "-100" and "token" in result["msg"], result


async def test_an_answer_larger_than_the_callers_buffer_is_cut_never_overrun(box, wg_server, built, wine, tmp_path):
    url = await started(box, wg_server)
    pc = Pc(tmp_path / "pc", built, wine)
    # a Delphi caller with the spec's array[0..255] of char buffers says so in the ini
    pc.ini("WSCallConfig.ini", wscall_ini(url, ADMIN_TOKEN, read_timeout_s=20, out_size=256, msg_size=256))
    person = next(iter(wg_server.sim.people.values()))
    reading = await pc.start("read", "ReadPeopleInfo_V2", "256", "256")
    await _wait_for_reader(box)
    box.scan(person.static_qr)
    result = await pc.result(reading)
    assert result["rc"] == "-16" and result["guard"] == "ok", result
    assert "does not fit" in result["msg"] and "out_size" in result["msg"]
    assert len(result["out"].encode("gbk")) <= 255 and result["out"].startswith("<?xml")
    # the WSC_* answer with its PNG does not fit 256 bytes either
    result = await pc.run("wsc", "WSC_downQr", pc.file(
        ("<name>%s</name><zjlx>01</zjlx><zjhm>%s</zjhm>" % (person.people["xm"], person.people["zjhm"])).encode("gbk")),
        "256", "256")
    assert result["rc"] == "-16" and result["guard"] == "ok" and "does not fit" in result["msg"], result


async def test_the_platform_calls_forward_to_the_box_which_renews_the_auth_key(box, wg_server, built, wine, tmp_path):
    url = await started(box, wg_server)
    pc = Pc(tmp_path / "pc", built, wine)
    pc.ini("WSCallConfig.ini", wscall_ini(url, ADMIN_TOKEN))
    person = next(iter(wg_server.sim.people.values()))
    result = await pc.run("wsc", "WSC_getAuthKey", pc.file(
        b"<orgCode>20121221</orgCode><userName>20121221</userName><passWord>123456</passWord>"), "5120", "1024")
    assert result["rc"] == "10000" and "<authKey>scanbox:test-box</authKey>" in result["out"], result
    # spec 001's own example input: the whole SOAP envelope, GBK
    envelope = (
        '<soapenv:Envelope xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/" '
        'xmlns:card="http://www.wondersgroup.com/card"><soapenv:Header/><soapenv:Body><card:virIdCardVerify>'
        '<!--Optional: 注册组织机构代码、平台获取--><orgCode>121212</orgCode>'
        '<authKey>748d60cd9aba9dc7934cf7b54d6291825d139935</authKey><qrCode>%s</qrCode>'
        '</card:virIdCardVerify></soapenv:Body></soapenv:Envelope>' % person.static_qr).encode("gbk")
    verify = pc.file(envelope)
    result = await pc.run("wsc", "WSC_virIdCardVerify", verify, "5120", "1024")
    assert result["rc"] == "10000" and result["guard"] == "ok", result
    assert "<resultCode>10000</resultCode>" in result["out"] and "<xm>%s</xm>" % person.people["xm"] in result["out"]
    assert "<vuid>%s</vuid>" % person.vuid in result["out"]
    sent = wg_server.sim.journal_for("virIdCardVerify")[-1].values
    assert sent["orgCode"] == ORG and sent["authKey"] != "748d60cd9aba9dc7934cf7b54d6291825d139935"
    # the platform's authKey expires: the box renews it, the HIS sees nothing
    assert wg_server.sim.expire_auth() >= 1
    result = await pc.run("wsc", "WSC_virIdCardVerify", verify, "5120", "1024")
    assert result["rc"] == "10000", result
    # a refusal is the platform's code, its message in szMsg
    result = await pc.run("wsc", "WSC_downQr", pc.file(
        "<name>某人</name><zjlx>01</zjlx><zjhm>110101199003071234</zjhm>".encode("gbk")), "5120", "1024")
    assert result["rc"] == "10108" and "身份证未办卡" in result["msg"], result
    result = await pc.run("wsc", "WSC_downQr", pc.file(
        ("<name>%s</name><zjlx>01</zjlx><zjhm>%s</zjhm>" % (person.people["xm"], person.people["zjhm"])).encode("gbk")),
        "65536", "1024")
    assert result["rc"] == "10000" and "<vuid>%s</vuid>" % person.vuid in result["out"], result
    # input that is not XML
    result = await pc.run("wsc", "WSC_updateCardInfo", pc.file(b"qrCode=1"), "5120", "1024")
    assert result["rc"] == "-15" and "传入数据格式无效" in result["msg"], result


# --- OneTrans2.dll ---------------------------------------------------------------------------

async def test_onetrans_reads_a_card_signing_on_the_pc_and_checking_the_answer(box, wg_server, built, wine, tmp_path):
    url = await started(box, wg_server)
    pc = Pc(tmp_path / "pc", built, wine)
    pc.ini("OneTrans2.ini", "[SCANBOX]\nurl=%s\nread_timeout_s=15\n" % url)
    person = next(iter(wg_server.sim.people.values()))
    p_in = pc.file(p_in_data(SPEC_READ_CARD))
    calling = await pc.start("onetrans", p_in, "8192")
    await _wait_for_reader(box)
    box.scan(person.static_qr)
    result = await pc.result(calling)
    assert result["rc"] == "0" and result["guard"] == "ok", result
    out = json.loads(result["out"])
    assert out["code"] == "000000" and out["err_msg"] == "成功" and "sign" not in out, out
    assert out["data"]["baseinfo"]["psn_name"] == person.people["xm"]  # decrypted on the PC
    assert out["data"]["baseinfo"]["certno"] == person.people["zjhm"]
    # the HIS sends the same pInData again: the box refuses the replay, the DLL passes it on
    result = await pc.run("onetrans", p_in, "8192")
    assert json.loads(result["out"])["code"] == "100009", result
    # a trans_type the box does not do, plain (enc_type NONE)
    result = await pc.run("onetrans", pc.file(p_in_data(SPEC_RECHARGE, enc_type="NONE")), "8192")
    assert json.loads(result["out"])["code"] == "100007" and result["rc"] == "0"
    # the wrong key: the box cannot authenticate it and says so, unsigned
    result = await pc.run("onetrans", pc.file(p_in_data(SPEC_RECHARGE, appKey="wrong-key")), "8192")
    assert json.loads(result["out"])["code"] == "100003", result
    # not JSON, and a pOutData too small for the answer
    result = await pc.run("onetrans", pc.file("不是JSON".encode("gbk")), "8192")
    assert json.loads(result["out"])["code"] == "900002" and result["rc"] == "0", result
    pc.ini("OneTrans2.ini", "[SCANBOX]\nurl=%s\nout_size=100\n" % url)
    result = await pc.run("onetrans", pc.file(p_in_data(SPEC_RECHARGE)), "100")
    assert result["rc"] == "-1" and result["guard"] == "ok" and json.loads(result["out"])["code"] == "900006", result
    # the box stopped
    pc.ini("OneTrans2.ini", "[SCANBOX]\nurl=http://127.0.0.1:%d\ntimeout_s=3\nread_timeout_s=1\n" % free_port())
    result = await pc.run("onetrans", pc.file(p_in_data(SPEC_RECHARGE)), "8192")
    assert json.loads(result["out"])["code"] == "900003" and result["rc"] == "0", result


async def test_a_concurrent_onetrans_call_answers_600001(box, wg_server, built, wine, tmp_path):
    url = await started(box, wg_server)
    pc = Pc(tmp_path / "pc", built, wine)
    pc.ini("OneTrans2.ini", "[SCANBOX]\nurl=%s\nread_timeout_s=15\n" % url)
    person = next(iter(wg_server.sim.people.values()))
    calling = await pc.start("concurrent", pc.file(p_in_data(SPEC_READ_CARD)), pc.file(p_in_data(SPEC_RECHARGE)))
    await _wait_for_reader(box)  # the first call is inside the DLL, waiting for a scan
    calling.stdin.write(b"go\n")
    await calling.stdin.drain()
    line = b""
    while not line.startswith(b"second_out="):
        line = await asyncio.wait_for(calling.stdout.readline(), 30)
        assert line, "the test program ended early"
    second = json.loads(bytes.fromhex(line.decode().strip().partition("=")[2]).decode("gbk"))
    assert second["code"] == "600001" and "并发" in second["err_msg"], second
    box.scan(person.static_qr)
    result = await pc.result(calling)
    assert result["rc"] == "0" and json.loads(result["out"])["code"] == "000000" and result["guard"] == "ok"


# --- https:// with the box's certificate pinned ---------------------------------------------

async def test_over_https_with_the_fingerprint_pinned_the_dlls_answer_as_over_http(box, wg_server, built, wine,
                                                                                   tmp_path):
    url = await started(box, wg_server, tls="on")
    assert url.startswith("https://")
    pin = box.daemon.tls_fingerprint
    pc = Pc(tmp_path / "pc", built, wine)
    pc.ini("WSCallConfig.ini", wscall_ini(url, ADMIN_TOKEN, read_timeout_s=20, fingerprint=pin))
    person = next(iter(wg_server.sim.people.values()))
    reading = await pc.start("read", "ReadPeopleInfo_V2", "5120", "1024")
    await _wait_for_reader(box)
    box.scan(person.static_qr)
    result = await pc.result(reading)
    assert result["rc"] == "0" and result["guard"] == "ok", result
    assert "<xm>%s</xm>" % person.people["xm"] in result["out"]
    verify = pc.file(("<qrCode>%s</qrCode>" % person.static_qr).encode("gbk"))
    result = await pc.run("wsc", "WSC_virIdCardVerify", verify, "5120", "1024")
    assert result["rc"] == "10000" and "<vuid>%s</vuid>" % person.vuid in result["out"], result
    # a large answer (the QR image), read to its Content-Length through many TLS records
    result = await pc.run("wsc", "WSC_downQr", pc.file(
        ("<name>%s</name><zjlx>01</zjlx><zjhm>%s</zjhm>" % (person.people["xm"], person.people["zjhm"])).encode("gbk")),
        "65536", "1024")
    assert result["rc"] == "10000" and "<vuid>%s</vuid>" % person.vuid in result["out"], result
    # OneTrans2.dll, the pin written as openssl's lower-case digits without colons
    pc.ini("OneTrans2.ini", "[SCANBOX]\nurl=%s\nread_timeout_s=15\nfingerprint=%s\n"
           % (url, pin.replace(":", "").lower()))
    calling = await pc.start("onetrans", pc.file(p_in_data(SPEC_READ_CARD)), "8192")
    await _wait_for_reader(box)
    box.scan(person.static_qr)
    result = await pc.result(calling)
    out = json.loads(result["out"])
    assert result["rc"] == "0" and out["code"] == "000000", result
    assert out["data"]["baseinfo"]["psn_name"] == person.people["xm"]


async def test_a_wrong_pin_sends_nothing_and_no_pin_trusts_only_the_pcs_cas(box, wg_server, built, wine, tmp_path,
                                                                            caplog):
    caplog.set_level("INFO", logger="agent")
    url = await started(box, wg_server, tls="on")
    pin, other = box.daemon.tls_fingerprint, "00:" * 31 + "01"
    pc = Pc(tmp_path / "pc", built, wine)
    # a token the box would refuse (and count) if it ever arrived
    pc.ini("WSCallConfig.ini", wscall_ini(url, "a-token-the-box-would-count", fingerprint=other))
    for args in (("read", "ReadPeopleInfo_V2", "5120", "1024"),
                 ("wsc", "WSC_getAuthKey", pc.file(b"<orgCode>1</orgCode>"), "5120", "1024")):
        result = await pc.run(*args)
        assert result["rc"] == "-33" and result["guard"] == "ok", result
        assert "设备连接异常" in result["msg"] and pin in result["msg"] and other in result["msg"], result
        assert "nothing was sent" in result["msg"], result
    # without a pin, the PC's CAs do not know the box's own certificate
    pc.ini("WSCallConfig.ini", wscall_ini(url, "a-token-the-box-would-count"))
    result = await pc.run("read", "ReadPeopleInfo_V2", "5120", "1024")
    assert result["rc"] == "-33" and "CAs" in result["msg"] and pin in result["msg"], result
    # OneTrans2.dll: its own code; the request never reached the box, so the same msgid is
    # still new when it goes with the right pin
    person = next(iter(wg_server.sim.people.values()))
    p_in = pc.file(p_in_data(SPEC_READ_CARD))
    for ini in ("[SCANBOX]\nurl=%s\nfingerprint=%s\n" % (url, other), "[SCANBOX]\nurl=%s\n" % url):
        pc.ini("OneTrans2.ini", ini)
        result = await pc.run("onetrans", p_in, "8192")
        out = json.loads(result["out"])
        assert result["rc"] == "0" and out["code"] == "900007" and pin in out["err_msg"], result
    assert box.daemon.api.guard.failures("127.0.0.1") == 0  # no token was ever tried
    assert not [r for r in caplog.records if "refused" in r.getMessage()], caplog.text
    pc.ini("OneTrans2.ini", "[SCANBOX]\nurl=%s\nread_timeout_s=15\nfingerprint=%s\n" % (url, pin))
    calling = await pc.start("onetrans", p_in, "8192")
    await _wait_for_reader(box)
    box.scan(person.static_qr)
    result = await pc.result(calling)
    assert json.loads(result["out"])["code"] == "000000", result


async def test_a_malformed_fingerprint_is_a_configuration_error(built, wine, tmp_path):
    pc = Pc(tmp_path / "pc", built, wine)
    port = free_port()  # nothing listens: a configuration error is found before any connection
    for url, fingerprint, why in (
            ("https://127.0.0.1:%d" % port, "AA:BB:CC", "fingerprint must be"),
            ("https://127.0.0.1:%d" % port, "ZZ:" * 31 + "ZZ", "fingerprint must be"),
            ("https://127.0.0.1:%d" % port, "AA" * 31 + ":AA", "fingerprint must be"),
            ("http://127.0.0.1:%d" % port, "AA:" * 31 + "AA", "fingerprint is for an https:// url")):
        pc.ini("WSCallConfig.ini", wscall_ini(url, TOKEN, fingerprint=fingerprint))
        result = await pc.run("read", "ReadPeopleInfo_V2", "5120", "1024")
        assert result["rc"] == "-100" and why in result["msg"] and "WSCallConfig.ini" in result["msg"], result
        pc.ini("OneTrans2.ini", "[SCANBOX]\nurl=%s\nfingerprint=%s\n" % (url, fingerprint))
        result = await pc.run("onetrans", pc.file(p_in_data(SPEC_RECHARGE)), "8192")
        out = json.loads(result["out"])
        assert out["code"] == "900001" and why in out["err_msg"], result


def _site_ca(folder: Path) -> tuple[bytes, Path, Path]:
    """A hospital's CA (its certificate, DER) and a box certificate it signed for 127.0.0.1."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = dt.datetime.now(dt.timezone.utc)
    ca_key, box_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Hospital test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(days=1))
          .not_valid_after(now + dt.timedelta(days=30))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .sign(ca_key, hashes.SHA256()))
    leaf = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
            .issuer_name(ca_name).public_key(box_key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=30))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    folder.mkdir(parents=True)
    cert, key = folder / "box.crt", folder / "box.key"
    cert.write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    key.write_bytes(box_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    key.chmod(0o600)
    return ca.public_bytes(serialization.Encoding.DER), cert, key


async def test_without_a_pin_a_certificate_from_a_ca_the_pc_trusts_is_accepted_for_its_name(box, wg_server, built,
                                                                                           wine, tmp_path):
    ca, cert, key = _site_ca(tmp_path / "site")
    url = await started(box, wg_server, tls="on", tls_cert=str(cert), tls_key=str(key))
    pc = Pc(tmp_path / "pc", built, wine)
    auth = pc.file(b"<orgCode>1</orgCode>")
    pc.ini("WSCallConfig.ini", wscall_ini(url, ADMIN_TOKEN))
    result = await pc.run("wsc", "WSC_getAuthKey", auth, "5120", "1024")
    assert result["rc"] == "-33" and "CAs" in result["msg"], result  # not yet trusted on this PC
    assert (await pc.run("trust", pc.file(ca)))["rc"] == "0"
    result = await pc.run("wsc", "WSC_getAuthKey", auth, "5120", "1024")
    assert result["rc"] == "10000" and "<authKey>scanbox:test-box</authKey>" in result["out"], result
    # the same certificate under a name it does not carry
    pc.ini("WSCallConfig.ini", wscall_ini(url.replace("127.0.0.1", "localhost"), ADMIN_TOKEN))
    result = await pc.run("wsc", "WSC_getAuthKey", auth, "5120", "1024")
    assert result["rc"] == "-33" and "under the name localhost" in result["msg"], result


class TlsStub:
    """A TLS server with the box's kind of certificate that records what each connection sent
    after the handshake and answers with canned bytes, written in pieces (many TLS records)."""

    def __init__(self, tmp: Path, answers: list[list[bytes]]) -> None:
        self.certificate = tls.default_paths(tmp)
        tls.make(self.certificate)
        self.answers = answers
        self.received: list[bytes] = []
        self.server: asyncio.Server | None = None

    async def __aenter__(self) -> "TlsStub":
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0,
                                                 ssl=self.certificate.server_context())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()

    @property
    def url(self) -> str:
        assert self.server is not None
        return "https://127.0.0.1:%d" % self.server.sockets[0].getsockname()[1]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            length = re.search(rb"\r\nContent-Length: (\d+)\r\n", head)
            self.received.append(head + await reader.readexactly(int(length.group(1)) if length else 0))
        except (asyncio.IncompleteReadError, ConnectionError) as exc:
            self.received.append(getattr(exc, "partial", b""))
            writer.close()
            return
        for piece in self.answers.pop(0):
            writer.write(piece)
            await writer.drain()
        writer.close()


def _chunked(body: bytes, size: int) -> list[bytes]:
    pieces = [b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"]
    pieces += [b"%x\r\n%s\r\n" % (len(body[i:i + size]), body[i:i + size]) for i in range(0, len(body), size)]
    return pieces + [b"0\r\n\r\n"]


async def test_the_https_client_reads_chunks_a_close_delimited_body_and_refuses_a_cut_one(built, wine, tmp_path):
    device = "box-" + "x" * 100000  # an answer of many TLS records
    status = json.dumps({"jsonrpc": "2.0", "id": 1, "result": {"device_id": device}}).encode()
    answers = [_chunked(status, 7000),
               [b"HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n\r\n", status[:5000], status[5000:]],
               [b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(status), status[:1000]]]
    async with TlsStub(tmp_path / "stub", answers) as stub:
        pc = Pc(tmp_path / "pc", built, wine)
        pin = stub.certificate.fingerprint()
        pc.ini("WSCallConfig.ini", wscall_ini(stub.url, TOKEN, fingerprint=pin, out_size=200000))
        auth = pc.file(b"<orgCode>1</orgCode>")
        for _ in range(2):
            result = await pc.run("wsc", "WSC_getAuthKey", auth, "200000", "1024")
            assert result["rc"] == "10000" and "<authKey>scanbox:%s</authKey>" % device in result["out"], result["msg"]
        result = await pc.run("wsc", "WSC_getAuthKey", auth, "200000", "1024")
        assert result["rc"] == "-33" and "cut off" in result["msg"], result
        head, _, body = stub.received[0].partition(b"\r\n\r\n")
        assert head.startswith(b"POST /rpc HTTP/1.1\r\n") and b"\r\nConnection: close" in head
        assert b"\r\nHost: 127.0.0.1:%s" % stub.url.rsplit(":", 1)[1].encode() in head
        assert b"\r\nAuthorization: Bearer %s" % TOKEN.encode() in head
        assert json.loads(body)["method"] == "status"
        # the wrong pin: the handshake is made, then the connection closed with not one byte sent
        pc.ini("WSCallConfig.ini", wscall_ini(stub.url, TOKEN, fingerprint="AB:" * 31 + "AB"))
        result = await pc.run("wsc", "WSC_getAuthKey", auth, "5120", "1024")
        assert result["rc"] == "-33" and pin in result["msg"], result
        await until(lambda: len(stub.received) == 4, timeout=10)
        assert stub.received[3] == b""


async def test_a_box_that_never_finishes_the_handshake_costs_timeout_s_not_a_hung_his(built, wine, tmp_path):
    held: list[asyncio.StreamWriter] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)  # reads nothing, answers nothing

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    try:
        url = "https://127.0.0.1:%d" % server.sockets[0].getsockname()[1]
        pc = Pc(tmp_path / "pc", built, wine)
        pc.ini("WSCallConfig.ini", wscall_ini(url, TOKEN, timeout_s=2, fingerprint="AB:" * 31 + "AB"))
        result = await pc.run("wsc", "WSC_getAuthKey", pc.file(b"<orgCode>1</orgCode>"), "5120", "1024", timeout=30)
        assert result["rc"] == "-33" and "did not answer within 2 s" in result["msg"], result
        pc.ini("OneTrans2.ini", "[SCANBOX]\nurl=%s\ntimeout_s=1\nread_timeout_s=1\nfingerprint=%s\n"
               % (url, "AB:" * 31 + "AB"))
        result = await pc.run("onetrans", pc.file(p_in_data(SPEC_RECHARGE)), "8192", timeout=30)
        assert json.loads(result["out"])["code"] == "900004", result
    finally:
        for writer in held:
            writer.close()
        server.close()


# --- a bad answer from the network never crashes the HIS ------------------------------------

BAD_ANSWERS = [
    b"",
    b"not json at all",
    b"[" * 100000,
    b'{"jsonrpc": "2.0", "id": 1, "result": {"identity": "x", "verification": 5, "scan": []}}',
    b'{"jsonrpc": "2.0", "id": 1, "result": {"identity": {"name": 1}, "verification": {"ok": 1}}}',
    b'{"jsonrpc": "2.0", "id": 1, "error": {"code": 1, "data": 5}}',
    b'{"jsonrpc": "2.0", "id": 1, "error": "x"}',
    b'{"code": "000000", "data": {"baseinfo": {}}, "msgid": "x"}',
    b'{"code": "000000", "data": "////", "enc_type": "SM4", "sign": "00", "msgid": "x"}',
    b'{"a": "\\ud800"}',
    '{"名": "'.encode() + b'\xff\xfe"}',  # not UTF-8
    b'{"x": 1e999999, "y": -0, "z": [1.5, true, false, null]}',
    b'\xef\xbb\xbf{"code": 1}',
    b"x" * (1 << 20),
]


async def test_garbage_from_the_network_gets_an_error_code_never_a_crash(built, wine, tmp_path):
    from aiohttp import web

    answers = iter(BAD_ANSWERS * 2)

    async def handler(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(body=next(answers), content_type="application/json")

    app = web.Application()
    app.router.add_post("/rpc", handler)
    app.router.add_post("/onetrans", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        url = "http://127.0.0.1:%d" % runner.addresses[0][1]
        pc = Pc(tmp_path / "pc", built, wine)
        pc.ini("WSCallConfig.ini", wscall_ini(url, TOKEN, read_timeout_s=5))
        pc.ini("OneTrans2.ini", "[SCANBOX]\nurl=%s\nread_timeout_s=5\n" % url)
        p_in = pc.file(p_in_data(SPEC_READ_CARD))
        for body in BAD_ANSWERS:
            result = await pc.run("read", "ReadPeopleInfo_V2", "5120", "1024")
            assert result["guard"] == "ok" and int(result["rc"]) < 0 and result["msg"], (body[:40], result)
        for body in BAD_ANSWERS:
            result = await pc.run("onetrans", p_in, "8192")
            assert result["guard"] == "ok" and result["rc"] == "0", (body[:40], result)
            assert json.loads(result["out"])["code"] == "900005", (body[:40], result)
    finally:
        await runner.cleanup()


def test_the_hospitals_page_lists_every_code_the_dlls_answer():
    page = (ROOT / "docs" / "windows.md").read_text(encoding="utf-8")
    onetrans = set(re.findall(r'"(9000\d\d|600001)"', (WINDOWS / "onetrans2.c").read_text(encoding="utf-8")))
    assert onetrans and all("`%s`" % code in page for code in onetrans), onetrans
    wscall = (WINDOWS / "wscall.c").read_text(encoding="utf-8")
    codes = set(re.findall(r"#define E_\w+ \((-\d+)\)", wscall))
    assert codes and all("| %s |" % code in page for code in codes), codes
