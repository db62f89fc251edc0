"""`scanbox` subcommands. The only place that prints (STYLE.md item 9)."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import sys
from pathlib import Path
from typing import Any, Sequence

import agent
from agent import config as configuration
from agent import logs


def _bounded_int(low: int, high: int) -> Any:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError("%r is not a whole number" % text) from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError("%d is outside %d..%d" % (value, low, high))
        return value
    return parse


# an outbox id is a SQLite INTEGER (64-bit signed); a larger one raises in the database thread
_record_id = _bounded_int(1, 2 ** 63 - 1)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["run"]:
        # the daemon's start (every boot, every restart) builds only its own command's parser:
        # the whole tree of commands costs 13 ms of it
        parser = _run_arguments(argparse.ArgumentParser(prog="scanbox run", description=RUN_HELP))
        argv = argv[1:]
    else:
        parser = _parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130


RUN_HELP = "run the daemon"


def _run_arguments(run: argparse.ArgumentParser) -> argparse.ArgumentParser:
    run.add_argument("--config", type=Path, default=configuration.DEFAULT_CONFIG)
    run.add_argument("--secrets", type=Path, help="secrets file (default: systemd credential "
                     "secrets.toml, else %s)" % configuration.DEFAULT_SECRETS)
    run.set_defaults(func=_run)
    return run


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="scanbox", description="e-health card scan box")
    p.add_argument("--version", action="version", version="scanbox %s" % agent.__version__,
                   help="show the version and exit")
    sub = p.add_subparsers(metavar="COMMAND")

    _run_arguments(sub.add_parser("run", help=RUN_HELP))

    demo = sub.add_parser("demo", help="the box with a simulated platform and a scanner on stdin")
    demo.add_argument("--tcp", default="127.0.0.1:7800", help="HIS API TCP address (default %(default)s); "
                      "'off' to disable")
    demo.add_argument("--http", default="127.0.0.1:7801", help="HIS API HTTP/WebSocket address (default "
                      "%(default)s); 'off' for none")
    demo.add_argument("--verbose", action="store_true", help="show the daemon's log")
    demo.set_defaults(func=_demo)

    cfg = sub.add_parser("config", help="configuration tools").add_subparsers(metavar="ACTION")
    check = cfg.add_parser("check", help="validate a config file without starting anything")
    check.add_argument("file", type=Path)
    check.add_argument("--secrets", type=Path)
    check.add_argument("--quiet", action="store_true", help="print only problems")
    check.set_defaults(func=_config_check)

    sim = sub.add_parser("simulate", help="run a platform simulator").add_subparsers(metavar="PLATFORM")
    rhc = sim.add_parser("rhc", help="spec 000, the Qinghai resident health card platform")
    rhc.add_argument("--listen", default="127.0.0.1:8780", help="HOST:PORT (default %(default)s)")
    rhc.add_argument("--namespace", help="WSDL target namespace (default: the shipped WSDL's)")
    rhc.add_argument("--parts", default="action,message", help="names of the two parameters, "
                     "e.g. arg0,arg1 for a JAX-WS service without @WebParam (default %(default)s)")
    rhc.add_argument("--external-schema", action="store_true", help="serve the schema from ?xsd=1")
    rhc.add_argument("--latency-ms", type=float, default=0.0, help="added to every answer")
    rhc.set_defaults(func=_simulate_rhc)
    for name, title in (("wondersgroup", "spec 001, the wondersgroup healthCardService (SOAP)"),
                        ("fsjson", "spec 003, the Foshan electronic health card JSON interface")):
        other = sim.add_parser(name, help=title)
        other.add_argument("--listen", default="127.0.0.1:8781", help="HOST:PORT (default %(default)s)")
        other.add_argument("--latency-ms", type=float, default=0.0, help="added to every answer")
        other.add_argument("--encoding", default="UTF-8", choices=("UTF-8", "GBK"), help="charset of the answers")
        other.set_defaults(func=_simulate_other, platform=name)

    wscall = cfg.add_parser("import-wscall", help="turn a DLL-era WSCallConfig.ini (spec 001) into a config "
                            "and secrets file for platform wondersgroup")
    wscall.add_argument("ini", type=Path)
    wscall.add_argument("--out", type=Path, default=Path("."), help="directory for scanbox.toml and "
                        "secrets.toml (default: the current one)")
    wscall.add_argument("--force", action="store_true", help="replace existing files")
    wscall.set_defaults(func=_import_wscall)

    outbox = sub.add_parser("outbox", help="usage records waiting for the platform")
    where = outbox.add_mutually_exclusive_group()
    where.add_argument("--config", type=Path, help="find the state directory in this config "
                       "(default %s)" % configuration.DEFAULT_CONFIG)
    where.add_argument("--state-dir", type=Path, help="the state directory itself")
    actions = outbox.add_subparsers(metavar="ACTION")
    actions.add_parser("stats", help="counts and the oldest pending record's age").set_defaults(func=_outbox,
                                                                                               action="stats")
    listing = actions.add_parser("list", help="records in a state")
    listing.add_argument("--state", choices=("pending", "dead", "sent"), default="pending")
    listing.add_argument("--limit", type=_bounded_int(1, 100_000), default=50)
    listing.set_defaults(func=_outbox, action="list")
    show = actions.add_parser("show", help="one record, with its message")
    show.add_argument("id", type=_record_id)
    show.set_defaults(func=_outbox, action="show")
    retry = actions.add_parser("retry", help="send a dead (or waiting) record again")
    retry.add_argument("id", type=_record_id)
    placed = retry.add_mutually_exclusive_group()
    placed.add_argument("--at", metavar="TIME", help="for a record made while the clock was wrong in an earlier "
                        "boot: the scan's time (YYYY-MM-DD HH:MM:SS), which the daemon puts in the message")
    placed.add_argument("--keep-time", action="store_true", help="for such a record: send it with the time it "
                        "carries")
    retry.set_defaults(func=_outbox, action="retry")
    actions.add_parser("purge-dead", help="delete every dead record").set_defaults(func=_outbox, action="purge-dead")
    unrecorded = actions.add_parser("unrecorded", help="uses that could not be recorded (a full disk): "
                                    "their count, scan ids and times")
    unrecorded.add_argument("--clear", action="store_true", help="forget them (once reported)")
    unrecorded.set_defaults(func=_outbox, action="unrecorded")

    key = sub.add_parser("store-key", help="make the key that seals personal data at rest, unless it "
                         "exists (the unit runs this as root before each start)")
    key.add_argument("path", type=Path, nargs="?", default=Path("/etc/scanbox/store.key"))
    key.set_defaults(func=_store_key)

    display = sub.add_parser("display", help="the OLED screens").add_subparsers(metavar="ACTION")
    preview = display.add_parser("preview", help="write a screen as PNG, scaled up")
    preview.add_argument("--screen", default="all", help="a screen name, or all (default)")
    preview.add_argument("--size", default="128x64", choices=("128x64", "128x32"))
    preview.add_argument("--out", type=Path, help="file (one screen) or directory (all); default: here")
    preview.add_argument("--scale", type=int, default=4)
    preview.add_argument("--font", type=Path, help="a CJK font file (default: WenQuanYi Zen Hei)")
    preview.set_defaults(func=_display_preview)

    prov = sub.add_parser("provision", help="first boot: install the technician's file from the boot partition")
    prov.add_argument("--from", dest="source", type=Path, default=Path("/boot/firmware/scanbox.toml"),
                      help="config and secrets in one file (default %(default)s); wiped once installed")
    prov.add_argument("--root", type=Path, default=Path("/"), help="install under this directory "
                      "instead of / (image builds, tests)")
    prov.set_defaults(func=_provision)
    doctor = sub.add_parser("doctor", help="what the box sees (scanners, readers, cameras, display, "
                            "platform, clock) and what to fix")
    doctor.add_argument("--config", type=Path, help="default %s when it exists" % configuration.DEFAULT_CONFIG)
    doctor.add_argument("--secrets", type=Path)
    doctor.add_argument("--socket", type=Path, help="the running daemon's API socket (default: from the config)")
    doctor.add_argument("--json", action="store_true", help="findings as JSON")
    doctor.add_argument("--no-probe", action="store_true", help="do not ask unconfigured USB serial ports "
                        "whether they are ID card readers")
    doctor.set_defaults(func=_doctor)

    tls = sub.add_parser("tls", help="the box's TLS certificate (what a HIS pins)").add_subparsers(metavar="ACTION")
    for action, text in (("init", "make the box's key and certificate unless there are some"),
                         ("show", "the certificate's SHA-256 fingerprints")):
        tls_cmd = tls.add_parser(action, help=text)
        where = tls_cmd.add_mutually_exclusive_group()
        where.add_argument("--config", type=Path, help="the state directory and api.tls_cert from this config "
                           "(default %s)" % configuration.DEFAULT_CONFIG)
        where.add_argument("--state-dir", type=Path, help="the state directory itself")
        if action == "init":
            tls_cmd.add_argument("--force", action="store_true", help="replace an existing key: every HIS "
                                 "that pinned the old fingerprint must pin the new one")
            tls_cmd.add_argument("--name", action="append", default=[], help="a name or address of the box "
                                 "for the certificate (repeatable; default: host name, NAME.local, localhost, "
                                 "127.0.0.1, 192.168.7.1)")
        tls_cmd.set_defaults(func=_tls, action=action)

    api = sub.add_parser("api", help="call the HIS API (for checks and scripts)")
    target = api.add_mutually_exclusive_group()
    target.add_argument("--socket", type=Path, help="Unix socket (default /run/scanbox/api.sock)")
    target.add_argument("--tcp", help="HOST:PORT")
    api.add_argument("--token", help="token for TCP (default: $SCANBOX_TOKEN)")
    api.add_argument("--fingerprint", help="TCP over TLS: the box certificate's SHA-256 (scanbox tls show)")
    api.add_argument("method")
    api.add_argument("params", nargs="?", default="{}", help="JSON object")
    api.set_defaults(func=_api)
    return p


def _load(path: Path, secrets: Path | None) -> configuration.Config | None:
    try:
        return configuration.load(path, secrets)
    except configuration.ConfigError as exc:
        print("%s: %d problem%s" % (exc.source or path, len(exc.problems), "" if len(exc.problems) == 1 else "s"),
              file=sys.stderr)
        for problem in exc.problems:
            print("  %s" % problem, file=sys.stderr)
        return None


def _run(args: argparse.Namespace) -> int:
    config = _load(args.config, args.secrets)
    if config is None:
        return 1
    logs.setup(config.device.log_level, fmt=config.device.log_format)
    import logging

    for risk in configuration.risks(config, configuration.find_secrets(args.secrets)):
        logging.getLogger("agent.config").warning("config: %s (allowed by [security] allow = [\"%s\"])", risk,
                                                  risk.allow)
    for notice in configuration.notices(config):
        logging.getLogger("agent.config").warning("config: %s", notice)
    from agent.daemon import run

    return run(config)


def _demo(args: argparse.Namespace) -> int:
    logs.setup("info" if args.verbose else "warning")
    from agent.demo import run_demo

    tcp = None if args.tcp in ("", "off") else args.tcp
    http = None if args.http in ("", "off") else args.http
    try:
        asyncio.run(run_demo(tcp, http=http))
    except RuntimeError as exc:
        print("scanbox demo: %s" % exc, file=sys.stderr)
        return 1
    return 0


def _config_check(args: argparse.Namespace) -> int:
    config = _load(args.file, args.secrets)
    if config is None:
        return 1
    # what [security] allow lets through is said every time, not only once
    for risk in configuration.risks(config, configuration.find_secrets(args.secrets)):
        print("warning: %s (allowed by [security] allow = [\"%s\"])" % (risk, risk.allow), file=sys.stderr)
    for notice in configuration.notices(config):
        print("warning: %s" % notice, file=sys.stderr)
    if not args.quiet:
        print("%s: OK" % args.file)
        print(configuration.to_toml(configuration.dump(config)))
    return 0


def _simulate_rhc(args: argparse.Namespace) -> int:
    logs.setup("info")
    from agent.simulator.rhc import RhcSimulator
    from agent.simulator.soap import DEFAULT_NAMESPACE, SimServer, WsdlStyle

    host, port = configuration.parse_hostport(args.listen)
    parts = [p.strip() for p in args.parts.split(",")]
    if len(parts) != 2 or not all(parts):
        print("--parts: two names separated by a comma", file=sys.stderr)
        return 2
    style = WsdlStyle(args.namespace or DEFAULT_NAMESPACE, parts[0], parts[1], args.external_schema)

    from agent.simulator.standalone import until_signalled

    async def serve() -> None:
        server = await SimServer(RhcSimulator(), style).start(host, port)
        server.faults.base_latency_s = args.latency_ms / 1000
        print("RHC simulator: endpoint %s\n  WSDL %s\n  credentials: userName=%s userPwd=%s orgId=QH0001"
              % (server.endpoint, server.wsdl_url, server.sim.user_name, server.sim.user_pwd))
        print("  control: GET /_sim/residents, /_sim/journal; POST /_sim/dynamic {id_card, ttl_s}, "
              "/_sim/faults {mode, count, latency_s}")
        for r in server.sim.residents.values():
            print("  %s status %s static QR %s" % (r.id_card[-4:], r.status, r.static_qr))
        sys.stdout.flush()
        await until_signalled(server)

    asyncio.run(serve())
    return 0


def _simulate_other(args: argparse.Namespace) -> int:
    logs.setup("info")
    from agent.simulator import standalone

    host, port = configuration.parse_hostport(args.listen)
    getattr(standalone, args.platform)(host, port, args.latency_ms, args.encoding)
    return 0


def _import_wscall(args: argparse.Namespace) -> int:
    from agent import wscall

    try:
        imported = wscall.convert(args.ini.read_bytes())
        config_path, secrets_path = wscall.write(imported, args.out, args.force)
    except OSError as exc:
        print("%s: %s" % (args.ini, exc.strerror or exc), file=sys.stderr)
        return 1
    except wscall.WscallError as exc:
        print("%s: %s" % (args.ini, exc), file=sys.stderr)
        return 1
    except configuration.ConfigError as exc:
        print("%s (%s): cannot make a valid config, %d problem%s:" % (
            args.ini, imported.encoding, len(exc.problems), "" if len(exc.problems) == 1 else "s"), file=sys.stderr)
        for problem in exc.problems:
            print("  %s" % problem, file=sys.stderr)
        return 1
    print("%s (%s) -> %s, %s" % (args.ini, imported.encoding, config_path, secrets_path))
    for line in imported.carried:
        print("  carried over: %s" % line)
    for line in imported.not_carried:
        print("  NOT carried over: %s" % line)
    print("Next: add [site], [sources.*] and [api] sections, then: scanbox config check %s --secrets %s"
          % (config_path, secrets_path))
    return 0


def _display_preview(args: argparse.Namespace) -> int:
    from agent.ui import Fonts, preview, samples

    fonts = Fonts(args.font)
    if not fonts.cjk:
        print("no Chinese font found: showing the English screens (install fonts-wqy-zenhei)", file=sys.stderr)
    screens = samples(fonts)
    width, height = (int(v) for v in args.size.split("x"))
    names = list(screens) if args.screen == "all" else [args.screen]
    unknown = [n for n in names if n not in screens]
    if unknown:
        print("unknown screen %s; screens: %s" % (", ".join(unknown), ", ".join(screens)), file=sys.stderr)
        return 2
    for name in names:
        if args.out is not None and args.screen != "all":
            path = args.out
        else:
            path = (args.out or Path(".")) / ("%s-%dx%d.png" % (name, width, height))
            path.parent.mkdir(parents=True, exist_ok=True)
        preview(screens[name], (width, height), fonts, args.scale).save(path)
        print(path)
    return 0


def _provision(args: argparse.Namespace) -> int:
    logs.setup("info")
    from agent import provision

    # the screen's address comes from the file itself, which is gone once it is installed
    options = provision.display_options(args.source, provision.etc_dir(args.root))
    present = args.source.is_file()
    outcome = provision.provision(args.source, args.root)
    if present:
        try:  # for the daemon, which starts next and takes the screen over
            provision.save_outcome(outcome, args.root / provision.OUTCOME_FILE.relative_to("/"))
        except OSError as exc:
            print("could not save the outcome for the display: %s" % exc, file=sys.stderr)
    if options is not None and present:
        provision.show(outcome, options)
    return 0 if outcome.ok else 1


def _outbox(args: argparse.Namespace) -> int:
    from agent.outbox import RetryRefused, Store, StoreUnavailable, scan_time

    if args.state_dir is not None:
        state_dir = args.state_dir
    else:
        config = _load(args.config or configuration.DEFAULT_CONFIG, None)
        if config is None:
            return 1
        state_dir = config.state_dir()
    path = state_dir / "outbox.db"
    if args.action == "unrecorded":
        from agent.outbox import LEDGER_NAME, Ledger

        ledger = Ledger(state_dir / LEDGER_NAME)
        entries = ledger.entries()
        for entry in entries:
            print("%s  scan %s  %s  msgGuid %s" % (_when(entry["at"]), entry["scan_id"], entry["operation"],
                                                  entry["msg_guid"]))
        print("%d use%s could not be recorded%s" % (ledger.count, "" if ledger.count == 1 else "s",
                                                    "" if ledger.count == len(entries)
                                                    else " (the first %d listed)" % len(entries)))
        if args.clear:
            ledger.clear()
            print("cleared (a running daemon clears its alarm at its next restart)")
        return 0
    if not path.exists():
        print("no outbox at %s" % path, file=sys.stderr)
        return 1

    async def act() -> int:
        # the key as the daemon has it (as root: /etc/scanbox/store.key), never a new one; without
        # it (as the daemon's user) counts and states, not the values
        store = Store(path, owner=False)
        await store.open()
        try:
            if args.action == "stats":
                print(json.dumps(await store.stats(), indent=2))
            elif args.action == "list":
                rows = await store.rows(args.state, args.limit)
                for row in rows:
                    # a pending record made while the clock was not right waits to be re-timed
                    held = "  (held for the clock)" if not row.clock_ok and row.state == "pending" else ""
                    print("%6d  %-9s %-7s %s  attempts %d  %s%s" % (
                        row.id, row.operation, row.state, _when(row.created_at), row.attempts,
                        "%s %s" % (row.platform_code or "", row.platform_message or row.last_error or ""), held))
                print("%d %s record%s" % (len(rows), args.state, "" if len(rows) == 1 else "s"))
            elif args.action == "show":
                found = await store.get(args.id)
                if found is None:
                    print("no record %d" % args.id, file=sys.stderr)
                    return 1
                print(json.dumps(found.to_json(), ensure_ascii=False, indent=2))
            elif args.action == "retry":
                try:
                    at = scan_time(args.at) if args.at is not None else None
                except ValueError as exc:
                    print("--at: %s" % exc, file=sys.stderr)
                    return 1
                try:
                    retried = await store.retry(args.id, at=at, keep_time=args.keep_time)
                except RetryRefused as exc:
                    print(exc, file=sys.stderr)
                    return 1
                if not retried:
                    print("no pending or dead record %d" % args.id, file=sys.stderr)
                    return 1
                print("record %d will be sent again (a running daemon picks it up within a minute)" % args.id)
            elif args.action == "purge-dead":
                print("deleted %d dead records" % await store.purge_dead())
        except StoreUnavailable as exc:
            print("outbox unavailable: %s" % exc, file=sys.stderr)
            return 1
        finally:
            await store.close()
        return 0

    return asyncio.run(act())


def _store_key(args: argparse.Namespace) -> int:
    from agent import sealing

    try:
        made = sealing.new_key_file(args.path)
    except OSError as exc:
        print("%s: %s" % (args.path, exc.strerror or exc), file=sys.stderr)
        return 1
    if made:
        print("made %s" % args.path)
    return 0


def _tls(args: argparse.Namespace) -> int:
    from agent import tls

    if args.state_dir is not None:
        certificate = tls.default_paths(args.state_dir)
    else:
        config = _load(args.config or configuration.DEFAULT_CONFIG, None)
        if config is None:
            return 1
        certificate = (tls.BoxCertificate(config.api.tls_cert, config.api.tls_key) if config.api.tls_cert
                       and config.api.tls_key else tls.default_paths(config.state_dir()))
    try:
        if args.action == "init":
            made = tls.make(certificate, (args.name + tls.box_names()) if args.name else None, force=args.force)
            print("%s %s" % ("made" if made else "kept the existing", certificate.cert))
        print("SHA-256 fingerprint: %s" % certificate.fingerprint())
        print("SPKI SHA-256 (base64, for Chromium's --ignore-certificate-errors-spki-list): %s"
              % certificate.spki_sha256())
    except (OSError, tls.TlsError) as exc:
        print("scanbox tls: %s" % exc, file=sys.stderr)
        return 1
    return 0


def _doctor(args: argparse.Namespace) -> int:
    from agent import doctor

    config = None
    path = args.config or (configuration.DEFAULT_CONFIG if configuration.DEFAULT_CONFIG.exists() else None)
    if path is not None:
        config = _load(path, args.secrets)
        if config is None:
            return 1
    findings = asyncio.run(doctor.Doctor(config, socket_path=args.socket, probe_unconfigured=not args.no_probe).run())
    if args.json:
        print(json.dumps(doctor.to_json(findings), ensure_ascii=False, indent=2))
    else:
        print(doctor.report(findings))
    return 1 if doctor.problems_in(findings) else 0  # what it printed as problems


def _when(ts: float) -> str:
    from datetime import datetime

    return datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")


def _pinned_tls(sock: socket.socket, fingerprint: str) -> socket.socket | None:
    """TLS to the box, its certificate checked against the pinned SHA-256 before the token goes."""
    import hashlib
    import hmac
    import ssl

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # the box's own certificate: the fingerprint is the check
    tls_sock = context.wrap_socket(sock)
    seen = hashlib.sha256(tls_sock.getpeercert(binary_form=True) or b"").hexdigest()
    if not hmac.compare_digest(seen, fingerprint.replace(":", "").lower()):
        tls_sock.close()
        print("the box's certificate is not the pinned one (SHA-256 %s)" % seen, file=sys.stderr)
        return None
    return tls_sock


def _api(args: argparse.Namespace) -> int:
    try:
        params = json.loads(args.params)
    except json.JSONDecodeError as exc:
        print("params: not JSON: %s" % exc, file=sys.stderr)
        return 2
    requests: list[dict[str, Any]] = []
    token = args.token or os.environ.get("SCANBOX_TOKEN")
    if args.tcp:
        host, port = configuration.parse_hostport(args.tcp)
        sock = socket.create_connection((host, port), timeout=10)
        if args.fingerprint:
            pinned = _pinned_tls(sock, args.fingerprint)
            if pinned is None:
                return 1
            sock = pinned
        if token:
            requests.append({"jsonrpc": "2.0", "id": "auth", "method": "auth", "params": {"token": token}})
    else:
        path = args.socket or Path(os.environ.get("RUNTIME_DIRECTORY", "/run/scanbox")) / "api.sock"
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(str(path))
        except OSError as exc:
            print("cannot connect to %s: %s" % (path, exc.strerror), file=sys.stderr)
            return 1
    requests.append({"jsonrpc": "2.0", "id": 1, "method": args.method, "params": params})
    sock.settimeout(None)
    with sock, sock.makefile("rwb") as stream:
        for request in requests:
            stream.write(json.dumps(request, ensure_ascii=False).encode("utf-8") + b"\n")
        stream.flush()
        for line in stream:
            response = json.loads(line)
            if response.get("id") == "auth" and "error" not in response:
                continue
            print(json.dumps(response, ensure_ascii=False, indent=2))
            if response.get("id") in (1, "auth"):
                return 1 if "error" in response else 0
    return 1
