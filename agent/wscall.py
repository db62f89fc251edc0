"""`scanbox config import-wscall`: a DLL-era WSCallConfig.ini (spec 001, 配置文件说明) turned into
a scanbox config and secrets file for the wondersgroup platform.

What carries over: [WEBSERVICE] url (the endpoint, and the WSDL when the url names one),
orgCode, userName, passWord (to the secrets file). What cannot, and why, is reported line by
line: the DLL's cached authKey (scanbox gets and keeps its own), its LOG switch (scanbox logs to
the journal), [MANU_DIR] vendor DLL folders and [CardDevEnv] scanner DLLs (scanbox's readers and
scanners are `[sources.*]` sections, one per device, which the ini cannot describe: port paths
are not in it).

Windows-era files are GBK (or GB18030) more often than UTF-8; both are read, with or without a
byte-order mark.
"""

from __future__ import annotations

import configparser
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.config import split_secrets, to_toml, validate


class WscallError(Exception):
    """The ini cannot be read or converted; the message says why."""


@dataclass
class Imported:
    config: dict[str, Any]
    encoding: str
    carried: list[str] = field(default_factory=list)  # "ini key -> scanbox key"
    not_carried: list[str] = field(default_factory=list)  # "ini key: why"
    security_allow: list[str] = field(default_factory=list)  # [security] allow the DLL's setup needs


def decode(raw: bytes) -> tuple[str, str]:
    """The file's text and the encoding it was read in: UTF-8 when it is valid UTF-8 (a BOM is
    dropped), else GB18030, the superset of GBK that Windows' "ANSI" Chinese files use."""
    if raw.startswith(b"\xef\xbb\xbf"):
        return raw[3:].decode("utf-8"), "utf-8"
    try:
        return raw.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        pass
    try:
        return raw.decode("gb18030"), "gbk"
    except UnicodeDecodeError as exc:
        raise WscallError("neither UTF-8 nor GBK text (byte %d): is this a WSCallConfig.ini?" % exc.start) from None


def convert(raw: bytes) -> Imported:
    text, encoding = decode(raw)
    parser = configparser.ConfigParser(interpolation=None, strict=False, delimiters=("=",),
                                       comment_prefixes=(";", "#"), inline_comment_prefixes=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # keys keep their case
    try:
        parser.read_string(text)
    except configparser.Error as exc:
        raise WscallError("not an ini file: %s" % str(exc).splitlines()[0]) from None
    sections = {name.upper(): name for name in parser.sections()}
    if "WEBSERVICE" not in sections:
        raise WscallError("no [WEBSERVICE] section: nothing to import (sections: %s)"
                           % (", ".join(parser.sections()) or "none"))
    web = {k.lower(): (k, v.strip()) for k, v in parser[sections["WEBSERVICE"]].items()}
    result = Imported({}, encoding)
    wondersgroup: dict[str, Any] = {}
    platform: dict[str, Any] = {"kind": "wondersgroup", "wondersgroup": wondersgroup}

    url = web.pop("url", (None, ""))[1]
    if url:
        base, _, query = url.partition("?")
        platform["endpoint"] = base
        result.carried.append("[WEBSERVICE] url -> platform.endpoint = %s" % base)
        if query.lower() == "wsdl":
            platform["wsdl"] = url
            result.carried.append("[WEBSERVICE] url -> platform.wsdl = %s (fetched at start, cached for "
                                  "offline starts)" % url)
        if base.lower().startswith("http://"):
            # the DLL spoke in clear; scanbox refuses that unless the site says it means it
            result.security_allow.append("plain_platform")
            result.carried.append("[WEBSERVICE] url is http:// -> [security] allow = [\"plain_platform\"] "
                                  "(identities cross the network in clear: use https:// if the platform has it)")
    for ini_key, key in (("orgcode", "org_code"), ("username", "user_name"), ("password", "pass_word")):
        name, value = web.pop(ini_key, (None, ""))
        if value:
            wondersgroup[key] = value
            where = "secrets file" if key == "pass_word" else "config"
            result.carried.append("[WEBSERVICE] %s -> platform.wondersgroup.%s (%s)" % (name, key, where))
    if "authkey" in web:
        name, value = web.pop("authkey")
        if value:
            result.not_carried.append("[WEBSERVICE] %s: the DLL's cached authKey; scanbox asks getAuthKey for "
                                      "its own and keeps it in its state directory" % name)
    if "log" in web:
        name, value = web.pop("log")
        result.not_carried.append("[WEBSERVICE] %s=%s: scanbox logs to the journal; set device.log_level "
                                  "(debug, info, warning, error)" % (name, value))
    for name, value in web.values():
        result.not_carried.append("[WEBSERVICE] %s=%s: not a setting scanbox knows" % (name, value))

    for section in parser.sections():
        upper = section.upper()
        if upper == "WEBSERVICE":
            continue
        for key, value in parser[section].items():
            result.not_carried.append("[%s] %s=%s: %s" % (section, key, value.strip(), _why(upper, key, value)))
    result.config = {"platform": platform}
    if result.security_allow:
        result.config["security"] = {"allow": result.security_allow}
    return result


def _why(section: str, key: str, value: str) -> str:
    if section == "MANU_DIR":
        return "vendor driver DLL folders; scanbox's readers are [sources.*] sections (driver and port)"
    if section == "CARDDEVENV" and key.lower() == "devsuittype":
        use = {"0": "a card reader only", "1": "a card reader and a QR scanner (读卡器优先)"}.get(value.strip(),
                                                                                                "unknown value")
        return "%s: add one [sources.NAME] section per device (see config/scanbox.example.toml)" % use
    if section == "CARDDEVENV" and key.lower() == "smddevname":
        return "the QR scanner's Windows DLL; a USB scanner is a [sources.NAME] section with driver " \
               "serial_scanner (VCOM mode) or hid"
    return "not a setting scanbox knows"


def write(imported: Imported, out_dir: Path, force: bool = False) -> tuple[Path, Path]:
    """Validate the result and write scanbox.toml and secrets.toml (0600) into `out_dir`.

    Raises ConfigError when the ini lacks what a config needs (each problem with its key), and
    WscallError rather than overwrite an existing file without `force`."""
    validate(imported.config)
    public, secrets = split_secrets(imported.config)
    config_path, secrets_path = out_dir / "scanbox.toml", out_dir / "secrets.toml"
    if not force:
        existing = [str(p) for p in (config_path, secrets_path) if p.exists()]
        if existing:
            raise WscallError("%s already exist%s; use --force to replace" % (
                " and ".join(existing), "s" if len(existing) == 1 else ""))
    out_dir.mkdir(parents=True, exist_ok=True)
    header = ["# scanbox configuration imported from a WSCallConfig.ini (platform: wondersgroup, spec 001).",
              "# Check it with: scanbox config check %s --secrets %s" % (config_path, secrets_path)]
    if imported.not_carried:
        header.append("# Not carried over from the ini:")
        header += ["#   %s" % line for line in imported.not_carried]
    header.append("# Add [site], [sources.*] and [api] sections as config/scanbox.example.toml shows.")
    config_path.write_text("\n".join(header) + "\n\n" + to_toml(public), encoding="utf-8")
    fd = os.open(secrets_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write("# scanbox secrets imported from a WSCallConfig.ini; mode 0600\n\n" + to_toml(secrets))
    os.chmod(secrets_path, 0o600)  # an existing file replaced with --force keeps its old mode otherwise
    return config_path, secrets_path

