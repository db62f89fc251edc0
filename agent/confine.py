"""What the daemon's unit may touch, from the site's config: written by `scanbox provision`.

scanbox.service ships with what every box allows. Two things depend on the site, so provisioning
writes them next to it:

- `/etc/udev/rules.d/71-scanbox-hid.rules`: the HID scanners the `[sources.*]` hid sections
  name get the `scanbox-scanner` group (70-scanbox.rules gives it to the scanner makers'
  keyboards). The daemon is not in `input`, which reads every keyboard.
- `/etc/systemd/system/scanbox.service.d/50-provisioned.conf`: `IPAddressDeny=any` with
  `IPAddressAllow=` the addresses this site needs (loopback, the USB cable link, the platform,
  `api.trusted`, and the private ranges when a listener serves the hospital network), and
  `MemoryDenyWriteExecute=no` where a camera source needs it.

A platform named by host name cannot be pinned to addresses (DNS answers change): then no
address list is written, and the log says so.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import subprocess
from pathlib import Path
from urllib.parse import urlsplit

from agent.config import Config, is_local_address, parse_hostport, parse_http_listen

logger = logging.getLogger(__name__)

HID_RULES = Path("/etc/udev/rules.d/71-scanbox-hid.rules")
DROP_IN = Path("/etc/systemd/system/scanbox.service.d/50-provisioned.conf")
SCANNER_GROUP = "scanbox-scanner"
USB_LINK = "192.168.7.0/24"
# where a hospital's HIS PCs are when a listener serves beyond loopback and the USB link
PRIVATE_NETWORKS = ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "169.254.0.0/16", "fc00::/7", "fe80::/10")
_BY_ID = re.compile(r"/dev/input/by-id/usb-(.+?)(?:-if[0-9*?]+)?-event-kbd")
_VENDOR_PRODUCT = re.compile(r"([0-9a-fA-F]{4}):([0-9a-fA-F]{4})")
_UDEV_GLOB = re.compile(r"[A-Za-z0-9_.*?\[\]-]+")


def hid_rules(config: Config) -> str:
    """udev rules giving the site's HID scanners the scanner group; "" when it has none."""
    lines: list[str] = []
    for name, options in config.sources.items():
        if getattr(options, "driver", None) != "hid":
            continue
        for selector in options.devices:
            match = _VENDOR_PRODUCT.fullmatch(selector)
            by_id = _BY_ID.fullmatch(selector)
            if match is not None:
                what = 'ATTRS{idVendor}=="%s", ATTRS{idProduct}=="%s"' % (match.group(1).lower(),
                                                                           match.group(2).lower())
            elif by_id is not None and _UDEV_GLOB.fullmatch(by_id.group(1)):
                what = 'ENV{ID_SERIAL}=="%s"' % by_id.group(1)
            else:
                logger.warning("sources.%s: %s names no USB device udev can match; a scanner it finds "
                               "is only readable when its maker is in 70-scanbox.rules (give vendor:product)",
                               name, selector)
                continue
            lines.append("# sources.%s: %s" % (name, selector))
            lines.append('SUBSYSTEM=="input", KERNEL=="event[0-9]*", SUBSYSTEMS=="usb", %s, GROUP="%s", MODE="0660"'
                         % (what, SCANNER_GROUP))
    if not lines:
        return ""
    return "# written by scanbox provision from /etc/scanbox/scanbox.toml; replaced on every provisioning\n" + \
        "\n".join(lines) + "\n"


def allowed_addresses(config: Config) -> list[str] | None:
    """What IPAddressAllow= lists for this site; None when the platform cannot be pinned."""
    allowed = ["localhost", USB_LINK]
    for url in (config.platform.endpoint, config.platform.wsdl):
        if not url or "://" not in url:
            continue  # a WSDL file on the box
        host = urlsplit(url).hostname or ""
        try:
            allowed.append(str(ipaddress.ip_address(host)))
        except ValueError:
            if not is_local_address(host):
                return None
    allowed += config.api.trusted
    api = config.api
    hosts = [parse_hostport(api.tcp)[0]] if api.tcp else []
    hosts += [parse_http_listen(api.http)[0]] if api.http else []
    if any(not is_local_address(host) for host in hosts):
        allowed += PRIVATE_NETWORKS
    return list(dict.fromkeys(allowed))


def drop_in(config: Config) -> str:
    lines = ["# written by scanbox provision from /etc/scanbox/scanbox.toml (agent/confine.py)", "[Service]"]
    allowed = allowed_addresses(config)
    if allowed is not None:
        lines += ["IPAddressDeny=any", "IPAddressAllow=%s" % " ".join(allowed)]
    else:
        lines.append("# no IPAddressAllow=: the platform is named by host name, whose addresses DNS may change")
    if any(getattr(options, "driver", None) == "camera" for options in config.sources.values()):
        lines += ["# a camera source: libffi closures in the camera stack need writable executable pages",
                  "MemoryDenyWriteExecute=no"]
    return "\n".join(lines) + "\n"


def install(config: Config, root: Path = Path("/")) -> None:
    """Write both files under `root`; on the box itself, tell udev and systemd. Failures are
    logged: the box runs with what the shipped unit and rules allow."""
    rules, unit = root / HID_RULES.relative_to("/"), root / DROP_IN.relative_to("/")
    try:
        text = hid_rules(config)
        if text:
            rules.parent.mkdir(parents=True, exist_ok=True)
            rules.write_text(text, encoding="utf-8")
        else:
            rules.unlink(missing_ok=True)
        unit.parent.mkdir(parents=True, exist_ok=True)
        unit.write_text(drop_in(config), encoding="utf-8")
        unit.chmod(0o644)
    except OSError as exc:
        logger.error("could not write the daemon's confinement (%s, %s): %s", rules, unit, exc)
        return
    if allowed_addresses(config) is None:
        logger.warning("platform.endpoint is a host name: the daemon may reach any address (no IPAddressAllow=)")
    if root == Path("/"):
        for argv in (["systemctl", "daemon-reload"], ["udevadm", "control", "--reload"],
                     ["udevadm", "trigger", "--subsystem-match=input", "--action=change"]):
            try:
                subprocess.run(argv, check=True, capture_output=True, timeout=60)
            except (OSError, subprocess.SubprocessError) as exc:
                logger.error("%s failed: %s (the new rules apply from the next boot)", " ".join(argv), exc)
