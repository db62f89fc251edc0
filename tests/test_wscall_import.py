"""`scanbox config import-wscall`: a DLL-era WSCallConfig.ini (GBK or UTF-8) becomes a config and
secrets file that load, talk to the platform, and say what could not be carried over."""

from __future__ import annotations

import stat
from datetime import datetime

import pytest

from agent import cli
from agent.config import load
from agent.platforms import create
from agent.platforms.base import VerifyRequest
from agent.qr import QrKind
from agent.simulator.wondersgroup import WondersgroupServer, WondersgroupSimulator

INI = """; 电子健康卡接口配置 (WSCallDLL.dll)
[MANU_DIR]
INCLUDE_DIR=<WDCARD:WD><CCYLCARD: CWI><HuaDa:HD>
[WEBSERVICE]
url={url}
orgCode=20121221
userName=佛山市禅城区医院
passWord=123456
authKey=b6a1f86bd7df997331737321ce837773ed8ac87e
LOG=1

[CardDevEnv]
DevSuitType=1
SMDDevName=WDScannerDLLMD.dll
"""
URL = "http://172.31.251.120:8090/HC_PDE/services/healthCardService?wsdl"


@pytest.mark.parametrize("encoding, prefix", [("gbk", b""), ("utf-8", b"\xef\xbb\xbf"), ("utf-8", b"")])
def test_import_gbk_or_utf8_ini(tmp_path, capsys, encoding, prefix):
    ini = tmp_path / "WSCallConfig.ini"
    ini.write_bytes(prefix + INI.format(url=URL).replace("\n", "\r\n").encode(encoding))
    out = tmp_path / "etc"
    assert cli.main(["config", "import-wscall", str(ini), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "(%s)" % ("gbk" if encoding == "gbk" else "utf-8") in printed
    config = load(out / "scanbox.toml", out / "secrets.toml")
    assert config.platform.kind == "wondersgroup"
    assert config.platform.endpoint == URL.removesuffix("?wsdl") and config.platform.wsdl == URL
    wg = config.platform.wondersgroup
    assert (wg.org_code, wg.user_name, wg.pass_word.get_secret_value()) == ("20121221", "佛山市禅城区医院", "123456")
    assert stat.S_IMODE((out / "secrets.toml").stat().st_mode) == 0o600
    assert "123456" not in (out / "scanbox.toml").read_text(encoding="utf-8")
    not_carried = [line for line in printed.splitlines() if line.startswith("  NOT carried over: [")]
    for what in ("authKey", "LOG=1", "INCLUDE_DIR", "DevSuitType=1", "SMDDevName"):
        assert any(what in line for line in not_carried), what
    assert "a card reader and a QR scanner" in printed
    assert "carried over: [WEBSERVICE] passWord -> platform.wondersgroup.pass_word (secrets file)" in printed
    # the file says the same, for whoever opens it later
    assert "DevSuitType=1" in (out / "scanbox.toml").read_text(encoding="utf-8")


def test_missing_password_says_which_key(tmp_path, capsys):
    ini = tmp_path / "WSCallConfig.ini"
    ini.write_bytes(INI.format(url=URL).replace("passWord=123456\n", "").encode("gbk"))
    assert cli.main(["config", "import-wscall", str(ini), "--out", str(tmp_path / "etc")]) == 1
    err = capsys.readouterr().err
    assert "platform.wondersgroup.pass_word" in err
    assert not (tmp_path / "etc" / "scanbox.toml").exists()


@pytest.mark.parametrize("content, message", [
    (b"[CardDevEnv]\nDevSuitType=0\n", "no [WEBSERVICE] section"),
    (b"\x81\x30\xff\xfe\x00garbage", "neither UTF-8 nor GBK"),
    (b"url=http://x\n", "not an ini file"),
])
def test_unusable_files_get_a_clear_error(tmp_path, capsys, content, message):
    ini = tmp_path / "WSCallConfig.ini"
    ini.write_bytes(content)
    assert cli.main(["config", "import-wscall", str(ini), "--out", str(tmp_path)]) == 1
    assert message in capsys.readouterr().err


def test_existing_files_are_not_replaced_without_force(tmp_path, capsys):
    ini = tmp_path / "WSCallConfig.ini"
    ini.write_bytes(INI.format(url=URL).encode("gbk"))
    (tmp_path / "scanbox.toml").write_text("# mine\n")
    assert cli.main(["config", "import-wscall", str(ini), "--out", str(tmp_path)]) == 1
    assert "--force" in capsys.readouterr().err
    assert (tmp_path / "scanbox.toml").read_text() == "# mine\n"
    assert cli.main(["config", "import-wscall", str(ini), "--out", str(tmp_path), "--force"]) == 0
    assert load(tmp_path / "scanbox.toml", tmp_path / "secrets.toml").platform.kind == "wondersgroup"


async def test_an_imported_config_verifies_at_the_platform(tmp_path, capsys):
    sim = WondersgroupSimulator(org_code="20121221", user_name="佛山市禅城区医院", pass_word="123456")
    server = await WondersgroupServer(sim).start("127.0.0.1", 0)
    try:
        ini = tmp_path / "WSCallConfig.ini"
        ini.write_bytes(INI.format(url=server.wsdl_url).encode("gbk"))
        assert cli.main(["config", "import-wscall", str(ini), "--out", str(tmp_path / "etc")]) == 0
        config = load(tmp_path / "etc" / "scanbox.toml", tmp_path / "etc" / "secrets.toml")
        platform = create(config, tmp_path / "state")
        await platform.start()
        try:
            person = next(iter(sim.people.values()))
            answer = await platform.verify_qr(VerifyRequest(person.static_qr, QrKind.STATIC, datetime.now(),
                                                            "010101", "01"))
            assert answer.identity.name == person.people["xm"]
        finally:
            await platform.close()
    finally:
        await server.close()
