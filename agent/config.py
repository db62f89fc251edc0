"""Load and validate scanbox's TOML config and its secrets file.

Every problem is reported at once, each with its key path; unknown keys are errors with a
suggestion for the likely typo; secrets live in their own file (0600, or a systemd credential)
and print as `********` everywhere. The sections are msgspec Structs checked by agent/schema.py.
"""

import ipaddress
import os
import re
import stat
import tomllib
from pathlib import Path
from typing import Annotated, Any, Iterable, Literal, Mapping

import msgspec
from msgspec import UNSET, Meta, UnsetType, field

import drivers
from agent import schema
from agent.codes import member_of, qwb002, wondersgroup
from agent.schema import Check, Custom, Regex, Schema
from drivers.base import DriverOptions
from drivers.display import Options as DisplayOptions

DEFAULT_CONFIG = Path("/etc/scanbox/scanbox.toml")
DEFAULT_SECRETS = Path("/etc/scanbox/secrets.toml")
CREDENTIAL_NAME = "secrets.toml"  # LoadCredential=secrets.toml:/etc/scanbox/secrets.toml
MASK = "********"


class Secret(Custom):
    """A password, token or key: `get_secret_value()` gives the text; repr, str, `dump` and
    `config check` give `********`."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    @classmethod
    def decode(cls, value: Any) -> "Secret":
        if not isinstance(value, str):
            raise ValueError("Expected `str`, got `%s`" % type(value).__name__)
        secret = cls(value)
        secret.check()
        return secret

    def check(self) -> None:
        """Raise ValueError when the text is no good for this kind of secret."""

    def encode(self) -> str:
        return MASK

    def get_secret_value(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "%s(%r)" % (type(self).__name__, MASK)

    def __str__(self) -> str:
        return MASK

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


# a token or key someone could guess or read over a shoulder is refused (config check and start):
# at least this long, and not one character repeated or a short run of a few
MIN_SECRET_LENGTH = 16
MIN_SECRET_DISTINCT = 8


class StrongSecret(Secret):
    """Tokens and keys scanbox's own clients use: scanbox sets their strength."""

    __slots__ = ()

    def check(self) -> None:
        text = self.get_secret_value()
        if len(text) < MIN_SECRET_LENGTH or len(set(text)) < MIN_SECRET_DISTINCT:
            raise ValueError("too weak: at least %d characters with %d different ones (e.g. the output of "
                             "`openssl rand -hex 16`)" % (MIN_SECRET_LENGTH, MIN_SECRET_DISTINCT))


class PlatformSecret(Secret):
    """Passwords a platform issued: scanbox cannot choose them, but an empty one is a mistake."""

    __slots__ = ()

    def check(self) -> None:
        if not self.get_secret_value():
            raise ValueError("empty")


_DURATION = re.compile(r"([0-9]+(?:\.[0-9]+)?)\s*(ms|s|m|h|d)?")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


class Duration(float, Custom):
    """Seconds, from a number or a string such as "90s", "10m", "24h", "7d"."""

    __slots__ = ()

    @classmethod
    def decode(cls, value: Any) -> "Duration":
        if isinstance(value, bool):
            raise ValueError("a duration: seconds, or a string like \"10m\", \"24h\", \"7d\"")
        if isinstance(value, (int, float)):
            seconds = float(value)
        elif isinstance(value, str) and (m := _DURATION.fullmatch(value.strip())):
            seconds = float(m.group(1)) * _UNIT_S[m.group(2)]
        else:
            raise ValueError("a duration: seconds, or a string like \"10m\", \"24h\", \"7d\"")
        if seconds < 0:
            raise ValueError("a duration cannot be negative")
        return cls(seconds)

    def encode(self) -> float:
        return float(self)


Section = Schema  # a [section] of the config file


class DeviceConfig(Section):
    id: Annotated[str, Meta(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._-]+$")] | None = None
    state_dir: Path | None = None  # default: $STATE_DIRECTORY, else /var/lib/scanbox
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    # "auto": journald's native protocol (with scan fields) under journald, else text lines;
    # "json": one JSON object a line on stderr, for a collector that is not journald
    # (the environment variable SCANBOX_LOG_FORMAT overrides; docs/fleet.md)
    log_format: Literal["auto", "journal", "json", "text"] = "auto"


def _department(value: str) -> str:
    # "0000": no department given (sam is then the organisation code and 0000)
    return value if value == "0000" else member_of(qwb002.DEPARTMENT, "spec 000 4.3.10")(value)


class SiteConfig(Section):
    """Who this box is: sent with every verification so the platform can record where a card
    was used (spec 000 3.3.2.2: sam, use_city*, hospital_*, channel_*, medstep_*)."""

    org_code: Annotated[str, Meta(max_length=16, pattern=r"^[0-9A-Za-z]*$")] = ""
    department: Annotated[str, Check(_department)] = "0000"
    hospital_code: Annotated[str, Meta(max_length=20)] = ""
    hospital_name: Annotated[str, Meta(max_length=50)] = ""
    city_code: Annotated[str, Meta(max_length=10, pattern=r"^[0-9]*$")] = ""
    city_name: Annotated[str, Meta(max_length=20)] = ""
    channel: Annotated[str, Check(member_of(qwb002.TERMINAL_TYPE, "spec 000 4.3.7"))] = "01"
    medstep: Annotated[str, Check(member_of(qwb002.MEDICAL_STEP, "spec 000 4.3.9"))] = "010101"

    @property
    def sam(self) -> str:
        """扫描枪终端标识号: organisation code + 4-digit department code."""
        return self.org_code + self.department if self.org_code else ""


# National mobile payment codes (付款码), as the issuers publish them for merchants' scanners:
# all digits, 16 to 24 long, told apart by their first digits. A counter scanner reads them too;
# none is ever a health card, so none is ever sent to a health platform.
PAYMENT_CODES = {
    "wechat": r"^1[0-5][0-9]{16}$",              # WeChat Pay: 18 digits, 10..15
    "alipay": r"^(2[5-9]|30)[0-9]{14,22}$",      # Alipay: 16..24 digits, 25..30
    "unionpay": r"^62[0-9]{17}$",                # UnionPay / 云闪付: 19 digits, 62
    "jdpay": r"^18[0-9]{16}$",                   # JD Pay: 18 digits, 18
    "qqwallet": r"^91[0-9]{16}$",                # QQ Wallet: 18 digits, 91
    "webank": r"^5678[0-9]{15}$",                # WeBank: 19 digits, 5678
    "lakala": r"^8[12][02][0-9]{16}$",           # Lakala: 19 digits, 810/812/820/822
    "ecny": r"^01[0-9]{17}$",                    # e-CNY (数字人民币): 19 digits, 01
}


def _regexes(value: dict[str, str]) -> dict[str, str]:
    for name, pattern in value.items():
        try:
            schema.regex(pattern)
        except ValueError as exc:
            raise ValueError("%s: %s" % (name, exc)) from None
    return value


class QrRules(Section):
    """QR classification (agent/qr.py); the defaults follow DESIGN.md. Where the specs leave a
    form loose, the default is the strictest reading they allow; a site whose platform issues
    other forms widens them here (docs/api.md "QR classification")."""

    max_length: Annotated[int, Meta(ge=20, le=4096)] = 512
    static: Regex = r"^[0-9A-F]{64}:1$"
    dynamic: Regex = r"^[0-9A-F]{64}:0:[0-9A-F]{32}$"
    # spec 000 3.12/3.13 give only "String 20": exactly 20 letters and digits, at least one a
    # letter (20 digits is the shape of a payment code, and of an order or ticket number)
    temporary: Regex = r"^(?=[0-9]*[A-Za-z])[0-9A-Za-z]{20}$"
    # spec 000 3.3 gives only "二维码密文, up to 256": binary encoded as base64 (whole 4-character
    # groups, = padding only at the end), 32 to 256 characters, at least one character outside
    # the hex digits, so a number, a hex id or a URL is delivered raw instead of being sent
    ciphertext: Regex = (r"^(?=.{32,256}$)(?=[0-9A-Fa-f]*[G-Zg-z+/])(?:[0-9A-Za-z+/]{4})*"
                         r"(?:[0-9A-Za-z+/]{4}|[0-9A-Za-z+/]{3}=|[0-9A-Za-z+/]{2}==)$")
    # checked before every other form: a code of one of these shapes never leaves the box.
    # Setting this table replaces the whole default (copy the entries to keep them).
    payment: Annotated[dict[str, str], Check(_regexes)] = field(default_factory=lambda: dict(PAYMENT_CODES))


# spec 000's WebService operation (the WSDL's one); agent/platforms/soapservice.py compiles it
RHC_OPERATION = "RHCMessageServer"


class RhcConfig(Section):
    """Credentials for spec 000: every `action` carries them (4.2.1)."""

    org_id: Annotated[str, Meta(max_length=32)] = ""
    app_code: Annotated[str, Meta(max_length=6)] = ""
    user_name: Annotated[str, Meta(min_length=1, max_length=32)]
    user_pwd: PlatformSecret
    std_ver_code: Annotated[str, Meta(max_length=100)] = "1.0"
    operation: str = RHC_OPERATION

    def check(self) -> None:
        # 4.2.1 remark: exactly one of orgId and appCode has a value
        if bool(self.org_id) == bool(self.app_code):
            raise ValueError("set exactly one of org_id (a medical institution) and app_code (an app)")


class WondersgroupConfig(Section):
    """Credentials and useCardInfo defaults for spec 001 (wondersgroup healthCardService).
    getAuthKey takes org_code/user_name/pass_word; the authKey it answers is kept in the state
    directory, not here."""

    org_code: Annotated[str, Meta(min_length=1, max_length=30)]
    user_name: Annotated[str, Meta(min_length=1, max_length=16)]
    pass_word: PlatformSecret
    # useCardInfo of every virIdCardVerify (spec 001 6.3, dictionaries 12.1.x)
    issuing_mode: Annotated[str, Check(member_of(wondersgroup.QR_CHANNEL, "spec 001 12.1.19"))] = "2"
    dep_code: Annotated[str, Meta(pattern=r"^[0-9]{4}$")] = "5500"
    dep_type: Annotated[str, Check(member_of(wondersgroup.DEPARTMENT_TYPE, "spec 001 12.1.14"))] = "1"
    # 机具号; the spec's fixed value when a scanner has no number of its own
    machine_code: Annotated[str, Meta(min_length=1, max_length=64)] = "SweepBlock"
    med_type: Annotated[str, Check(member_of(wondersgroup.MEDICAL_TYPE, "spec 001 12.1.18"))] = "2"
    # medStepcode and terminalType are the caller's step and channel, else [site] medstep and
    # channel: one place says where the box stands, whatever the platform


class FsjsonConfig(Section):
    """Spec 003 (Foshan JSON): the app registration every request carries in `app`, and the
    appSecret getWorkKey signs with."""

    app_id: Annotated[str, Meta(min_length=1, max_length=64)]
    app_secret: PlatformSecret
    term_id: Annotated[str, Meta(max_length=64)] = ""
    version: Annotated[str, Meta(max_length=16)] = "v1.1"
    app_version: Annotated[str, Meta(max_length=16)] = "1.1"
    app_package_name: Annotated[str, Meta(max_length=64)] = "scanbox"
    digest_type: Annotated[str, Meta(max_length=32)] = ""
    enc_type: Annotated[str, Meta(max_length=32)] = ""
    qr_type: Annotated[str, Meta(pattern=r"^[0-9]$")] = "0"  # 二维码类型: the spec defines 0, dynamic
    # "md5(appId|appSecret|timestamp)": scanbox reads "|" as a literal separator; "" signs the
    # plain concatenation, for a platform that reads the formula that way
    sign_separator: Literal["|", ""] = "|"


def _ca_file(value: str) -> str:
    if not Path(value).is_file():
        raise ValueError("true, false, or the path of a CA bundle; %s is not a file" % value)
    return value


class PlatformConfig(Section):
    kind: Literal["rhc", "wondersgroup", "fsjson"] = "rhc"
    endpoint: Annotated[str, Meta(pattern=r"^https?://")]
    wsdl: str | None = None  # URL or file; default: the WSDL shipped with scanbox
    timeout_s: Annotated[float, Meta(gt=0, le=120)] = 5.0
    # the whole of one verification at the counter, however many calls it takes (a credential
    # refresh, a retry); past it the scan is answered as the platform being unavailable
    verify_deadline_s: Annotated[float, Meta(gt=0, le=300)] = 8.0
    # or the path of the CA bundle of a private CA (HttpClient reads a string as that path)
    tls_verify: bool | Annotated[str, Check(_ca_file)] = True
    rhc: RhcConfig | None = None
    wondersgroup: WondersgroupConfig | None = None
    fsjson: FsjsonConfig | None = None
    qr: QrRules = QrRules()

    def check(self) -> None:
        if getattr(self, self.kind) is None:
            raise ValueError("kind %r needs a [platform.%s] section" % (self.kind, self.kind))


class ClientConfig(Section):
    token: StrongSecret
    # "metrics": GET /metrics only (a Prometheus server's token)
    scopes: list[Literal["read", "admin", "metrics"]] = field(default_factory=lambda: ["read"])


class OnetransApp(Section):
    """A HIS program that calls `onetrans` (spec 004's OneTrans2.dll envelope) under its app_id:
    app_key is the secret its requests' MAC and SM4 keys are derived from (docs/api.md); it never
    travels: the HIS's PC signs (scanbox's OneTrans2.dll does)."""

    app_key: StrongSecret


class OnetransConfig(Section):
    """The OneTrans2.dll compatibility layer (spec 004): `onetrans` over JSON-RPC, POST /onetrans."""

    # receiver's region code (医保区划, 6 digits): the start of every inf_refmsgid
    region: Annotated[str, Meta(pattern=r"^[0-9]{6}$")] = "000000"
    # hos.user.get waits this long for a card (the spec's envelope has no timeout of its own)
    read_timeout_s: Annotated[float, Meta(gt=0, le=3600)] = 60.0
    # a request's timestamp must be within this many seconds of the box's clock, and its msgid
    # is remembered (per app) this long: a recorded request cannot be replayed
    window_s: Annotated[float, Meta(ge=10, le=3600)] = 300.0
    apps: dict[str, OnetransApp] = {}


def _hostport(value: str) -> str | None:
    if value:
        parse_hostport(value)
    return value or None


def _http_listen(value: str) -> str | None:
    if value:
        parse_http_listen(value)
    return value or None


def _hosts(value: list[str]) -> list[str]:
    for host in value:
        if not re.fullmatch(r"[A-Za-z0-9.-]{1,253}", host):
            raise ValueError("%r is not a host name (no scheme, no port)" % host)
    return [h.lower() for h in value]


def _origins(value: list[str]) -> list[str]:
    for origin in value:
        if not re.fullmatch(r"https?://[A-Za-z0-9.-]+(:[0-9]{1,5})?|https?://\[[0-9A-Fa-f:.]+\](:[0-9]{1,5})?",
                            origin):
            raise ValueError("%r is not an origin (scheme://host[:port], no path, no trailing slash)" % origin)
    return value


def _networks(value: list[str]) -> list[str]:
    for item in value:
        try:
            ipaddress.ip_network(item, strict=False)
        except ValueError:
            raise ValueError("%r is not an IP address or network" % item) from None
    return value


class ApiConfig(Section):
    unix: Path | None = None  # default: $RUNTIME_DIRECTORY/api.sock, else /run/scanbox/api.sock
    unix_mode: Annotated[str, Meta(pattern=r"^0?[0-7]{3}$")] = "0660"
    unix_group: str | None = "scanbox"
    tcp: Annotated[str, Check(_hostport)] | None = None  # "HOST:PORT"; off by default
    # addresses (or networks) allowed on TCP without auth
    trusted: Annotated[list[str], Check(_networks)] = []
    max_message: Annotated[int, Meta(ge=1024, le=16 * 1024 * 1024)] = 64 * 1024
    idle_timeout_s: Annotated[float, Meta(gt=0)] = 300.0
    auth_timeout_s: Annotated[float, Meta(gt=0)] = 10.0
    max_clients: Annotated[int, Meta(ge=1, le=4096)] = 64
    clients: dict[str, ClientConfig] = {}
    # HTTP POST /rpc, WebSocket /ws and POST /onetrans: off unless set; "PORT" or ":PORT" alone
    # listens on loopback (127.0.0.1), never on every interface by accident
    http: Annotated[str, Check(_http_listen)] | None = None
    # browser origins (scheme://host[:port]) whose pages may call the HTTP API and open /ws
    cors_origins: Annotated[list[str], Check(_origins)] = []
    # per client address over HTTP and WebSocket: sustained requests per second, and the burst
    rate_per_s: Annotated[float, Meta(gt=0, le=100000)] = 50.0
    rate_burst: Annotated[int, Meta(ge=1, le=100000)] = 100
    # open HTTP connections (WebSockets included) at most; a request head must arrive within
    # auth_timeout_s of connecting
    http_max_connections: Annotated[int, Meta(ge=1, le=4096)] = 256
    # connections from one address that have not authenticated (TCP, HTTP, WebSocket), at most:
    # one address cannot fill max_clients or http_max_connections with idle sockets
    max_unauthenticated_per_address: Annotated[int, Meta(ge=1, le=1024)] = 8
    # TLS on TCP, HTTP and WebSocket: "auto" on every address but loopback and the USB cable link
    # (192.168.7.0/24); "on" everywhere; "off" nowhere (beyond loopback and the USB link only with
    # [security] allow = ["plain_listener"])
    tls: Literal["auto", "on", "off"] = "auto"
    # the technician's certificate and key (PEM); unset: the box's own, made by `scanbox provision`
    # or `scanbox tls init` (or at first start) in the state directory
    tls_cert: Path | None = None
    tls_key: Path | None = None
    # Host headers the HTTP API answers besides IP addresses, localhost and the box's own names
    # (a browser on a rebound DNS name is refused)
    http_hosts: Annotated[list[str], Check(_hosts)] = []
    onetrans: OnetransConfig = OnetransConfig()

    def check(self) -> None:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("set both tls_cert and tls_key, or neither (the box's own certificate)")


class ScansConfig(Section):
    # the same code from the same source inside this window is one scan (a camera sees a code
    # in many frames; some serial scanners repeat)
    dedupe_s: Annotated[float, Meta(ge=0, le=60)] = 3.0
    # a scan nobody is waiting for is kept this long for the next read_card (a nurse scans,
    # then clicks "read card" in the HIS); 0 disables
    hold_s: Annotated[float, Meta(ge=0, le=120)] = 10.0


class OutboxConfig(Section):
    """Store-and-forward of usage records (agent/outbox.py)."""

    # records the platform has are deleted this long after: they hold personal data
    retention: Duration = Duration(86400.0)
    # records the platform refused (dead-letter) are deleted this long after: a technician has
    # had the OUTBOX_DEAD alarm and `scanbox outbox list --state dead` all that time
    dead_retention: Duration = Duration(30 * 86400.0)
    max_in_flight: Annotated[int, Meta(ge=1, le=64)] = 4
    # backoff while the platform is down: doubling from backoff_initial, never over backoff_max
    backoff_initial: Duration = Duration(1.0)
    backoff_max: Duration = Duration(300.0)


_LABEL_NAME = r"^[a-zA-Z_][a-zA-Z0-9_]{0,63}$"


def _label_names(value: dict[str, str]) -> dict[str, str]:
    problems = ["%r is not a label name (letters, digits and _, not first a digit)" % k
                for k in value if not re.fullmatch(_LABEL_NAME, k) or k.startswith("__")]
    problems += ["%s: longer than 128 characters" % k for k, v in value.items() if len(v) > 128]
    taken = sorted(set(value) & BUILD_LABELS)
    if taken:
        problems.append("%s: scanbox_build_info sets these itself" % ", ".join(taken))
    if problems:
        raise ValueError("; ".join(problems))
    return value


class MetricsConfig(Section):
    """GET /metrics for Prometheus (agent/metrics.py, docs/fleet.md): always on the HTTP API's
    listener for a client with the "metrics" (or "admin") scope; optionally on a port of its own
    for a scraper on a management network."""

    # "HOST:PORT"; "PORT" or ":PORT" alone listens on loopback
    listen: Annotated[str, Check(_http_listen)] | None = None
    # TLS on `listen`, as api.tls: "auto" on every address but loopback and the USB cable link,
    # "on" everywhere, "off" nowhere (beyond loopback and the USB link only with [security]
    # allow = ["plain_listener"]); the box's certificate (api.tls_cert/api.tls_key, else its own).
    # Not given: "auto", and a notice while `listen` speaks TLS (`notices`)
    tls: Literal["auto", "on", "off"] | UnsetType = UNSET
    # false: anyone who reaches `listen` may scrape (a management network behind a firewall);
    # the API listener's /metrics always wants a token
    require_token: bool = True
    # constant labels on scanbox_build_info, e.g. {region = "xining", site = "clinic-4"}
    labels: Annotated[dict[str, str], Check(_label_names)] = {}


# the labels scanbox_build_info carries whatever the config says
BUILD_LABELS = frozenset({"version", "python", "box_id", "config_hash", "platform", "org_code",
                          "hospital_code", "city_code", "department"})


class CacheConfig(Section):
    """Identities of static codes verified online, for answering while the platform is down."""

    ttl: Duration = Duration(86400.0)  # 0: no cache, no offline answers


class ClockConfig(Section):
    """A Pi has no real-time clock (agent/clock.py)."""

    # after the start, verifications wait this long at most for NTP to set a clock that is not
    # yet synchronised (within each verification's deadline)
    sync_wait: Duration = Duration(20.0)


class SecurityConfig(Section):
    """Settings that weaken the box, each refused unless named here (`risks` below says what each
    lets through; docs/technician.md "Security settings")."""

    allow: list[Literal["plain_listener", "wide_trusted", "open_unix_socket", "plain_platform", "no_tls_verify",
                        "group_readable_secrets"]] = []


def _source_names(value: dict[str, Any]) -> dict[str, Any]:
    for name in value:
        if not re.fullmatch(r"[a-z0-9][a-z0-9_-]{0,31}", name):
            raise ValueError("source name %r: use lower-case letters, digits, - and _" % name)
    return value


class Config(Section):
    device: DeviceConfig = DeviceConfig()
    security: SecurityConfig = SecurityConfig()
    site: SiteConfig = SiteConfig()
    platform: PlatformConfig
    api: ApiConfig = ApiConfig()
    scans: ScansConfig = ScansConfig()
    outbox: OutboxConfig = OutboxConfig()
    cache: CacheConfig = CacheConfig()
    metrics: MetricsConfig = MetricsConfig()
    clock: ClockConfig = ClockConfig()
    display: DisplayOptions | None = None  # the OLED; none configured: no screen
    # validated per driver (drivers.SOURCE_DRIVERS) into each driver's own Options
    sources: Annotated[dict[str, Any], Check(_source_names)] = {}

    def state_dir(self) -> Path:
        if self.device.state_dir:
            return self.device.state_dir
        env = os.environ.get("STATE_DIRECTORY")
        return Path(env.split(":")[0]) if env else Path("/var/lib/scanbox")

    def unix_socket(self) -> Path:
        if self.api.unix:
            return self.api.unix
        env = os.environ.get("RUNTIME_DIRECTORY")
        return (Path(env.split(":")[0]) if env else Path("/run/scanbox")) / "api.sock"


def parse_hostport(value: str) -> tuple[str, int]:
    """"127.0.0.1:7800", "[::1]:7800", "box.local:7800"."""
    match = re.fullmatch(r"(?:\[([0-9A-Fa-f:.]+)\]|([A-Za-z0-9.-]+)):([0-9]{1,5})", value)
    if match is None or int(match.group(3)) > 65535:
        raise ValueError("%r is not HOST:PORT (an IPv6 host goes in brackets: [::1]:7800)" % value)
    return match.group(1) or match.group(2), int(match.group(3))


def parse_http_listen(value: str) -> tuple[str, int]:
    """`api.http`: HOST:PORT as parse_hostport, or "PORT" / ":PORT" for loopback only."""
    match = re.fullmatch(r":?([0-9]{1,5})", value)
    if match is not None:
        if int(match.group(1)) > 65535:
            raise ValueError("%r: port over 65535" % value)
        return "127.0.0.1", int(match.group(1))
    return parse_hostport(value)


# the gadget's link to the counter PC (image/stage-scanbox/01-usb-gadget): a cable, not a LAN
USB_LINK = ipaddress.ip_network("192.168.7.0/24")


def is_local_address(host: str) -> bool:
    """Loopback or the USB cable link: the only places a plain (non-TLS) listener may be."""
    if host.lower() == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    return address.is_loopback or address in USB_LINK


def uses_tls(section: ApiConfig | MetricsConfig, host: str) -> bool:
    """Whether a listener on `host` speaks TLS: the API's TCP and HTTP (api.tls), the metrics
    port (metrics.tls)."""
    mode = section.tls or "auto"  # metrics.tls not given: "auto"
    return mode == "on" or (mode == "auto" and not is_local_address(host))


def listeners(config: Config) -> list[tuple[str, str, bool]]:
    """(key, "HOST:PORT" as configured, speaks TLS) of every network listener."""
    found = []
    for key, value, section, parse in (("api.tcp", config.api.tcp, config.api, parse_hostport),
                                       ("api.http", config.api.http, config.api, parse_http_listen),
                                       ("metrics.listen", config.metrics.listen, config.metrics, parse_http_listen)):
        if value:
            found.append((key, value, uses_tls(section, parse(value)[0])))
    return found


def notices(config: Config) -> list[str]:
    """Settings that mean something else than they did in an earlier release: read as before,
    and said at every start and by `config check` until the site says it knows."""
    said = []
    metrics = config.metrics
    if metrics.listen and metrics.tls is UNSET and uses_tls(metrics, parse_http_listen(
            metrics.listen)[0]):
        said.append("metrics.listen = \"%s\" speaks TLS now (https, the box's certificate): a Prometheus that "
                    "scrapes it over http:// gets nothing; give its scrape job scheme: https and a tls_config "
                    "that trusts the box's certificate (docs/fleet.md), then set [metrics] tls = \"auto\" to say "
                    "so (this warning goes)" % metrics.listen)
    return said


class Risk(msgspec.Struct, frozen=True):
    """A setting that weakens the box, refused unless `[security] allow` names it."""

    allow: str
    path: str
    message: str

    def __str__(self) -> str:
        return "%s: %s" % (self.path, self.message)


def risks(config: Config, secrets_file: Path | None = None) -> list[Risk]:
    """Every dangerous setting in `config` (allowed ones included: see `config.security.allow`)."""
    found: list[Risk] = []
    api = config.api
    for key, value, tls in listeners(config):
        host = (parse_hostport if key == "api.tcp" else parse_http_listen)(value)[0]
        if not tls and not is_local_address(host):
            what = ("the metrics token and the box's state" if key == "metrics.listen"
                    else "tokens and identities")
            found.append(Risk("plain_listener", key, "%s without TLS (%s.tls = \"off\"): %s would cross the "
                              "network in clear" % (value, key.split(".")[0], what)))
    for item in api.trusted:
        net = ipaddress.ip_network(item, strict=False)
        if net.prefixlen < (24 if net.version == 4 else 64):
            found.append(Risk("wide_trusted", "api.trusted", "%s: every address in it reads without a token" % item))
    if int(api.unix_mode, 8) & 0o007:
        found.append(Risk("open_unix_socket", "api.unix_mode", "%s: every user on the box gets the admin "
                          "socket (0660 and api.unix_group)" % api.unix_mode))
    endpoint = config.platform.endpoint
    if endpoint.lower().startswith("http://"):
        host = re.sub(r"^http://(\[[^\]]*\]|[^/:]*).*$", r"\1", endpoint, flags=re.IGNORECASE).strip("[]")
        if not is_local_address(host):
            found.append(Risk("plain_platform", "platform.endpoint", "%s is http://: identities and the "
                              "platform password would cross the network in clear" % endpoint))
    if config.platform.tls_verify is False:
        found.append(Risk("no_tls_verify", "platform.tls_verify", "false: anyone on the path can pose as the "
                          "platform (give the CA bundle's path for a private CA)"))
    if secrets_file is not None:
        try:
            mode = secrets_file.stat().st_mode
        except OSError:
            mode = 0
        # others (or a writing group) are refused outright: _check_secrets_mode
        if mode & stat.S_IRGRP and not mode & (stat.S_IRWXO | stat.S_IWGRP):
            found.append(Risk("group_readable_secrets", str(secrets_file), "mode %04o: its group can read the "
                              "secrets (chmod 600)" % stat.S_IMODE(mode)))
    return found


class ConfigProblem(msgspec.Struct, frozen=True):
    path: str
    message: str

    def __str__(self) -> str:
        return "%s: %s" % (self.path or "(top level)", self.message)


class ConfigError(Exception):
    def __init__(self, problems: list[ConfigProblem], source: str = "") -> None:
        self.problems = problems
        self.source = source
        super().__init__("\n".join(str(p) for p in problems))


def load(config_path: Path | str, secrets_path: Path | str | None = None) -> Config:
    """Read and validate a config file and its secrets; raises ConfigError with every problem,
    including those of the secrets file, at once."""
    config_path = Path(config_path)
    problems: list[ConfigProblem] = []
    try:
        raw = _read_toml(config_path)
    except ConfigError as exc:
        raise ConfigError(exc.problems, str(config_path)) from None  # nothing to validate
    problems += [ConfigProblem(p, "is a secret: put it in the secrets file, not in %s" % config_path)
                 for p in _secret_paths(Config, raw)]
    secrets_file = find_secrets(secrets_path)
    secrets: dict[str, Any] = {}
    if secrets_file is not None:
        try:
            secrets = _read_toml(secrets_file)
        except ConfigError as exc:
            problems += exc.problems
        else:
            problems += _check_secrets_mode(secrets_file)
        secret_keys = set(_secret_paths(Config, secrets))
        problems += [ConfigProblem(p, "is not a secret: it belongs in %s" % config_path)
                     for p in _leaf_paths(secrets) if p not in secret_keys]
    try:
        config = validate(_deep_merge(raw, secrets))
    except ConfigError as exc:
        problems += exc.problems
    else:
        for risk in risks(config, secrets_file):
            if risk.allow not in config.security.allow:  # allowed ones: `config check`, `run` say them
                problems.append(ConfigProblem(risk.path, "%s; if this site means it: [security] allow = [\"%s\"]"
                                              % (risk.message, risk.allow)))
    if problems:
        raise ConfigError(problems, str(config_path))
    return config


def validate(data: Mapping[str, Any]) -> Config:
    """Validate a config mapping (file contents with secrets merged in)."""
    problems: list[ConfigProblem] = []
    config: Config | None = None
    try:
        config = schema.convert(data, Config, strict=False)
    except schema.Invalid as exc:
        problems += [ConfigProblem(path, message) for path, message in exc.problems]
    sources: dict[str, Any] = {}
    raw_sources = data.get("sources", {})
    if isinstance(raw_sources, Mapping):
        for name, section in raw_sources.items():
            try:
                sources[name] = validate_source(name, section)
            except ConfigError as exc:
                problems += exc.problems
    if problems or config is None:
        raise ConfigError(problems)
    return msgspec.structs.replace(config, sources=sources)


def validate_source(name: str, section: Any) -> DriverOptions:
    where = ("sources", name)
    if not isinstance(section, Mapping):
        raise ConfigError([ConfigProblem(_join(where), "must be a table")])
    driver = section.get("driver")
    if driver is None:
        raise ConfigError([ConfigProblem(_join(where + ("driver",)), "required: one of %s"
                                         % ", ".join(sorted(drivers.SOURCE_DRIVERS)))])
    if not isinstance(driver, str) or driver not in drivers.SOURCE_DRIVERS:  # a list is no key either
        hint = schema.suggest(str(driver), drivers.SOURCE_DRIVERS)
        raise ConfigError([ConfigProblem(_join(where + ("driver",)), "unknown driver %r%s; known: %s"
                                         % (driver, hint, ", ".join(sorted(drivers.SOURCE_DRIVERS))))])
    options_cls: type[DriverOptions] = drivers.source_module(driver).Options
    try:
        return schema.convert(section, options_cls, where, strict=False)
    except schema.Invalid as exc:
        raise ConfigError([ConfigProblem(path, message) for path, message in exc.problems]) from None


def dump(config: Config) -> dict[str, Any]:
    """The effective config as plain data, secrets masked: what `config check` prints."""
    out: dict[str, Any] = schema.to_builtins(config)
    out["metrics"].setdefault("tls", "auto")  # not given (UNSET, left out): what it means
    return out


def split_secrets(data: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """A config mapping as (the config file's part, the secrets file's part)."""
    secret = set(_secret_paths(Config, data))

    def split(node: Mapping[str, Any], prefix: tuple[str, ...]) -> tuple[dict[str, Any], dict[str, Any]]:
        public: dict[str, Any] = {}
        private: dict[str, Any] = {}
        for key, value in node.items():
            path = prefix + (key,)
            if isinstance(value, Mapping):
                pub, priv = split(value, path)
                if pub or not priv:
                    public[key] = pub
                if priv:
                    private[key] = priv
            elif _join(path) in secret:
                private[key] = value
            else:
                public[key] = value
        return public, private

    return split(data, ())


def secret_names(section: type[msgspec.Struct] | None = None) -> set[str]:
    """The key names that hold secrets anywhere in the schema (user_pwd, token, app_key, ...):
    what provisioning blanks in a file it could not even parse."""
    names: set[str] = set()
    for key, info in schema.fields(section or Config).items():
        if _is_secret(info.type):
            names.add(key)
        for sub in schema.structs_in(info.type):
            names |= secret_names(sub)
        inner = schema.dict_value_struct(info.type)
        if inner is not None:
            names |= secret_names(inner)
    return names


def to_toml(data: Mapping[str, Any]) -> str:
    """TOML text for a config mapping (tomllib only reads): what `config check` prints and what
    provisioning and import-wscall write. tomli-w quotes what a bare key cannot hold (a client
    named "front desk", an app id with a dot); TOML has no null, so unset values are left out."""
    import tomli_w  # writing config is for `config check`, provisioning and import-wscall, not a start

    return tomli_w.dumps(_without_none(data))


def _without_none(node: Any) -> Any:
    if isinstance(node, Mapping):
        return {str(k): _without_none(v) for k, v in node.items() if v is not None}
    if isinstance(node, (list, tuple)):
        return [_without_none(v) for v in node if v is not None]
    return node


# --- internals -------------------------------------------------------------------------------

def _read_toml(path: Path) -> dict[str, Any]:
    """File-level problems carry the file as their path."""
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError([ConfigProblem(str(path), "no such file")], str(path)) from None
    except PermissionError:
        raise ConfigError([ConfigProblem(str(path), "permission denied")], str(path)) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([ConfigProblem(str(path), "not valid TOML: %s" % exc)], str(path)) from None


def find_secrets(explicit: Path | str | None) -> Path | None:
    if explicit is not None:
        return Path(explicit)
    creds = os.environ.get("CREDENTIALS_DIRECTORY")
    if creds and (Path(creds) / CREDENTIAL_NAME).exists():
        return Path(creds) / CREDENTIAL_NAME
    return DEFAULT_SECRETS if DEFAULT_SECRETS.exists() else None


def _check_secrets_mode(path: Path) -> list[ConfigProblem]:
    try:
        st = path.stat()
    except OSError as exc:
        return [ConfigProblem(str(path), exc.strerror or str(exc))]
    # readable by its group: a Risk (group_readable_secrets); by others: always refused
    if st.st_mode & (stat.S_IRWXO | stat.S_IWGRP):
        return [ConfigProblem(str(path), "mode %04o: secrets must not be readable by others "
                              "(chmod 600)" % stat.S_IMODE(st.st_mode))]
    return []


def _deep_merge(base: Mapping[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _leaf_paths(data: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> Iterable[str]:
    for key, value in data.items():
        if isinstance(value, Mapping):
            yield from _leaf_paths(value, prefix + (key,))
        else:
            yield _join(prefix + (key,))


def _secret_paths(section: type[msgspec.Struct], data: Any, prefix: tuple[str, ...] = ()) -> Iterable[str]:
    """Paths in `data` whose schema type is a Secret."""
    if not isinstance(data, Mapping):
        return
    known = schema.fields(section)
    for key, value in data.items():
        info = known.get(key)
        if info is None:
            continue
        for sub in schema.structs_in(info.type):
            if isinstance(value, Mapping):
                yield from _secret_paths(sub, value, prefix + (key,))
        inner = schema.dict_value_struct(info.type)
        if inner is not None and isinstance(value, Mapping):
            for name, item in value.items():
                yield from _secret_paths(inner, item, prefix + (key, name))
        if _is_secret(info.type):
            yield _join(prefix + (key,))


def _is_secret(annotation: Any) -> bool:
    return any(isinstance(t, type) and issubclass(t, Secret) for t in schema.types_in(annotation))


def _join(parts: Iterable[Any]) -> str:
    return ".".join(str(p) for p in parts)
