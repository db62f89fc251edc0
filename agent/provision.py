"""First boot: the technician's one file on the boot partition becomes the box's configuration.

`scanbox provision --from /boot/firmware/scanbox.toml` (scanbox-provision.service) reads the
file a technician wrote on a PC (config and secrets together), validates all of it, and only then
installs /etc/scanbox/scanbox.toml (0644) and /etc/scanbox/secrets.toml (0600, root's: the daemon
gets it as a systemd credential). Both are written beside their final place, read back the way
the daemon reads them, and renamed in; secrets.toml goes first and the unit needs both, so a
power cut leaves either the old configuration or the new one, never a mix that runs.

Then the file leaves the FAT partition, which anyone with a card reader can read: its bytes are
overwritten before it is deleted, and `scanbox-applied.toml` (the same settings without the
secrets) is left for the technician and for support. A bad file changes nothing in /etc: it
stays where it is, with `scanbox-error.txt` beside it listing every problem, so the technician
can fix it on the PC; but its secrets do not stay on the card: each secret's value is replaced
by a placeholder (the file rewritten over its own clusters), which provisioning refuses until
the technician enters the secret again. Either way the outcome goes to the journal and the OLED.

Provisioning also makes /etc/scanbox/store.key, the key that seals personal data at rest
(agent/sealing.py), unless it exists.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
import tomllib
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

import msgspec

from agent import config as configuration, schema, sealing
from agent.config import ConfigError, ConfigProblem
from drivers.display import Options as DisplayOptions, open_device

logger = logging.getLogger(__name__)

APPLIED_NAME = "scanbox-applied.toml"
ERROR_NAME = "scanbox-error.txt"
STAGING_PREFIX = ".provision-"
# the outcome, for the daemon to show when it starts right after (on success it starts at once
# and would replace the screen provisioning drew): scanbox-provision.service's RuntimeDirectory
OUTCOME_FILE = Path("/run/scanbox-provision/outcome.json")
OUTCOME_FRESH_S = 120.0
# what a secret's value becomes on the card after a failed attempt
PLACEHOLDER = "REMOVED-enter-it-again"


class Outcome(msgspec.Struct):
    ok: bool
    problems: list[ConfigProblem] = msgspec.field(default_factory=list)
    config: configuration.Config | None = None
    note: str = ""  # what the technician should know beyond the problems

    def screen_lines(self) -> list[str]:
        if self.ok and self.config is not None:
            site = self.config.site
            return [self.config.device.id or "scanbox", site.hospital_name or site.org_code]
        if not self.problems:
            return [self.note]
        lines = [str(self.problems[0])]
        if len(self.problems) > 1:
            lines.append("+%d: %s" % (len(self.problems) - 1, ERROR_NAME))
        return lines


def etc_dir(root: Path = Path("/")) -> Path:
    return root / configuration.DEFAULT_CONFIG.parent.relative_to("/")


def provision(source: Path, root: Path = Path("/")) -> Outcome:
    """Validate `source` and install it under `root`/etc/scanbox; never half-way."""
    etc = etc_dir(root)
    if not source.is_file():
        problem = ConfigProblem(str(source), "no such file: nothing to provision")
        logger.error("%s", problem)
        return Outcome(False, [problem], note="nothing to provision")
    try:
        data = read(source)
        removed = [ConfigProblem(path, "this secret was removed from the card after a failed attempt: "
                                 "enter it again") for path in _placeholders(data)]
        try:
            config = configuration.validate(data)
        except ConfigError as exc:
            raise ConfigError(removed + exc.problems, str(source)) from None
        if removed:
            raise ConfigError(removed, str(source))
    except ConfigError as exc:
        outcome = Outcome(False, exc.problems, note="nothing installed")
        _report_failure(source, outcome)
        return outcome
    try:
        install(data, etc)
    except (OSError, ConfigError) as exc:
        problems = exc.problems if isinstance(exc, ConfigError) else [ConfigProblem(str(etc), _oserror(exc))]
        outcome = Outcome(False, problems, note="could not install into %s: nothing changed" % etc)
        _report_failure(source, outcome)
        return outcome
    outcome = Outcome(True, config=config)
    logger.info("provisioned %s from %s into %s", config.device.id or "this box", source, etc)
    make_certificate(config, root)
    from agent import confine

    confine.install(config, root)
    try:
        consume(source, data)
    except OSError as exc:
        # installed, but the secrets are still on the card: say so loudly, and run anyway
        outcome.note = "installed, but %s could not be wiped: %s" % (source, _oserror(exc))
        logger.error("%s; delete it from the card by hand", outcome.note)
    return outcome


def make_certificate(config: configuration.Config, root: Path = Path("/")) -> None:
    """The box's own TLS key and certificate (agent/tls.py) in its state directory, unless the
    site supplies its own (api.tls_cert). The daemon makes them at its first start otherwise:
    a failure here is logged, not fatal."""
    if config.api.tls_cert is not None:
        return
    from agent import tls

    target = tls.default_paths(root / config.state_dir().relative_to("/"))
    try:
        if tls.make(target):
            # systemd's StateDirectory= gives the directory to the daemon's user at its start
            logger.info("TLS certificate %s made; SHA-256 fingerprint %s", target.cert, target.fingerprint())
    except OSError as exc:
        logger.error("could not make the TLS certificate in %s: %s (the daemon makes it at start)",
                     target.cert.parent, _oserror(exc))


def read(source: Path) -> dict[str, Any]:
    """The technician's file: UTF-8 (a byte-order mark, as Windows Notepad writes, is fine)."""
    where = str(source)
    try:
        raw = source.read_bytes()
    except FileNotFoundError:
        raise ConfigError([ConfigProblem(where, "no such file")], where) from None
    except OSError as exc:
        raise ConfigError([ConfigProblem(where, _oserror(exc))], where) from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise ConfigError([ConfigProblem(where, "not UTF-8 text: save it as UTF-8 (in Notepad: Save as, "
                                         "Encoding UTF-8), not ANSI/GBK")], where) from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([ConfigProblem(where, "not valid TOML: %s" % exc)], where) from None


def install(data: dict[str, Any], etc: Path) -> None:
    """scanbox.toml and secrets.toml into `etc`, atomically each, secrets first; both are read
    back as the daemon reads them before either replaces anything."""
    public, secrets = configuration.split_secrets(data)
    etc.mkdir(parents=True, exist_ok=True, mode=0o755)
    for stale in etc.glob(STAGING_PREFIX + "*"):  # a power cut during an earlier attempt
        shutil.rmtree(stale, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=etc))
    try:
        staged_config = _write(staging / configuration.DEFAULT_CONFIG.name, configuration.to_toml(public), 0o644)
        staged_secrets = _write(staging / configuration.DEFAULT_SECRETS.name, configuration.to_toml(secrets), 0o600)
        configuration.load(staged_config, staged_secrets)  # what the daemon will see, or ConfigError
        os.replace(staged_secrets, etc / configuration.DEFAULT_SECRETS.name)
        os.replace(staged_config, etc / configuration.DEFAULT_CONFIG.name)
        if sealing.new_key_file(etc / sealing.KEY_NAME):
            logger.info("made %s, the key that seals personal data at rest", etc / sealing.KEY_NAME)
        _fsync_dir(etc)
    finally:
        for leftover in staging.iterdir():
            leftover.unlink()
        staging.rmdir()


def consume(source: Path, data: dict[str, Any]) -> None:
    """Leave the settings without the secrets as scanbox-applied.toml; wipe and delete the file."""
    public, _ = configuration.split_secrets(data)
    header = ("# Installed in /etc/scanbox by scanbox provision on %s. The secrets were removed\n"
              "# from this card. To change the box: edit, save as scanbox.toml with the secrets, reboot.\n\n"
              % datetime.now().strftime("%Y-%m-%d %H:%M"))
    _write(source.parent / APPLIED_NAME, header + configuration.to_toml(public))
    (source.parent / ERROR_NAME).unlink(missing_ok=True)
    # FAT frees clusters without clearing them: overwrite first, so the password is not left
    # on the card for whoever reads its raw blocks
    with open(source, "r+b") as fh:
        size = os.fstat(fh.fileno()).st_size
        fh.write(b"\0" * size)
        fh.flush()
        os.fsync(fh.fileno())
    source.unlink()
    _fsync_dir(source.parent)


def _report_failure(source: Path, outcome: Outcome) -> None:
    logger.error("provisioning from %s failed (%s); %d problem%s:", source, outcome.note, len(outcome.problems),
                 "" if len(outcome.problems) == 1 else "s")
    for problem in outcome.problems:
        logger.error("  %s", problem)
    try:
        scrubbed = scrub(source)
    except OSError as exc:
        scrubbed = []
        logger.error("could not remove the secrets from %s: %s; delete it from the card by hand",
                     source, _oserror(exc))
    text = ("scanbox could not use %s (%s). Fix these and power the box on again:\n\n%s\n"
            % (source.name, outcome.note, "\n".join("  %s" % p for p in outcome.problems)))
    if scrubbed:
        logger.info("removed %d secret%s from %s (%s)", len(scrubbed), "" if len(scrubbed) == 1 else "s", source,
                    ", ".join(scrubbed))
        text += ("\nThe secrets in the file (%s) were replaced by %s so that they do not stay on this card:\n"
                 "enter them again.\n" % (", ".join(scrubbed), PLACEHOLDER))
    try:
        _write(source.parent / ERROR_NAME, text.replace("\n", "\r\n"))  # read on Windows
    except OSError as exc:
        logger.warning("could not write %s: %s", source.parent / ERROR_NAME, _oserror(exc))


def _secret_value(names: set[str]) -> re.Pattern[bytes]:
    keys = b"|".join(re.escape(n.encode()) for n in sorted(names))
    # key = value, at a line's start or inside an inline table ({ token = "..." }), the key bare
    # or quoted; the value a basic, literal or multi-line string, or anything up to a delimiter
    return re.compile(
        rb'((?:^|[{,])[ \t]*["\']?(' + keys + rb')["\']?[ \t]*=[ \t]*)'
        rb'("""[\s\S]*?"""|\'\'\'[\s\S]*?\'\'\'|"(?:[^"\\\r\n]|\\.)*"?|\'[^\'\r\n]*\'?|[^\s,}#]*)',
        re.MULTILINE)


def scrub(source: Path) -> list[str]:
    """Replace every secret's value in the technician's file with PLACEHOLDER, by key name (the
    file may not even parse), over the file's own clusters (FAT frees clusters without clearing
    them). The names of the keys replaced."""
    raw = source.read_bytes()
    found: list[str] = []

    def blank(m: re.Match[bytes]) -> bytes:
        if m.group(3).strip(b"\"'") == PLACEHOLDER.encode():
            return m.group(0)
        found.append(m.group(2).decode())
        return m.group(1) + b'"' + PLACEHOLDER.encode() + b'"'

    scrubbed = _secret_value(configuration.secret_names()).sub(blank, raw)
    if scrubbed == raw:
        return []
    with open(source, "r+b") as fh:
        fh.write(b"\0" * len(raw))
        fh.flush()
        os.fsync(fh.fileno())
        fh.seek(0)
        fh.write(scrubbed)
        fh.truncate(len(scrubbed))
        fh.flush()
        os.fsync(fh.fileno())
    return found


def _placeholders(data: Any, prefix: str = "") -> list[str]:
    """Key paths whose value is the placeholder a failed attempt left."""
    out: list[str] = []
    if isinstance(data, dict):
        for key, value in data.items():
            out += _placeholders(value, "%s.%s" % (prefix, key) if prefix else key)
    elif data == PLACEHOLDER:
        out.append(prefix)
    return out


def display_options(source: Path, etc: Path) -> DisplayOptions | None:
    """The [display] of the technician's file, else of the installed config, else none: even a
    file with problems elsewhere usually says where the screen is."""
    for path in (source, etc / configuration.DEFAULT_CONFIG.name):
        try:
            section = tomllib.loads(path.read_text(encoding="utf-8-sig")).get("display")
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
            continue
        if isinstance(section, dict):
            try:
                return schema.convert(section, DisplayOptions, strict=False)
            except schema.Invalid:
                continue
    return None


def show(outcome: Outcome, options: DisplayOptions, opener: Callable[[DisplayOptions], Any] = open_device) -> Any:
    """Draw the outcome on the OLED, where it stays (the device persists) until the daemon draws;
    returns the device, or None when there is no screen to draw on."""
    from agent.ui import Fonts, Screen, render

    screen = Screen("provisioning", title="provisioned" if outcome.ok else "provision_failed",
                    lines=tuple(outcome.screen_lines()))
    try:
        device = opener(options)
        device.display(render(screen, options.size, Fonts(options.font)))
    except Exception as exc:  # luma.core.error.Error, OSError, ImportError: the journal has it all
        logger.warning("display: %s: %s", options.describe(), exc or type(exc).__name__)
        return None
    return device


def save_outcome(outcome: Outcome, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    staged = _write(path.with_suffix(".tmp"), json.dumps({"ok": outcome.ok, "lines": outcome.screen_lines()},
                                                         ensure_ascii=False), 0o644)
    os.replace(staged, path)


def recent_outcome(path: Path | None = None) -> tuple[bool, list[str]] | None:
    """The outcome of a provisioning that ran in the last couple of minutes (this boot), if any."""
    path = path or OUTCOME_FILE
    try:
        age = time.time() - path.stat().st_mtime
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if age > OUTCOME_FRESH_S or not isinstance(data, dict) or not isinstance(data.get("lines"), list):
        return None
    return bool(data.get("ok")), [str(line) for line in data["lines"]]


def _write(path: Path, text: str, mode: int | None = None) -> Path:
    """`mode` whatever the umask (the provisioning unit's is 0077); None on FAT, which has no modes."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if mode is None else mode)
    with os.fdopen(fd, "w", encoding="utf-8", newline="") as fh:
        if mode is not None:
            os.fchmod(fd, mode)
        fh.write(text)
        fh.flush()
        os.fsync(fd)
    return path


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with contextlib.suppress(OSError):  # some file systems refuse fsync on a directory
            os.fsync(fd)
    finally:
        os.close(fd)


def _oserror(exc: OSError) -> str:
    return exc.strerror or str(exc)
