"""A strict simulator of the spec 003 platform (Foshan electronic health card, JSON over HTTP),
on the machinery of `soap.py` (fault injection, control API, journal).

It checks what the spec's tables ask: the `app` block, a 13-digit millisecond timestamp within
`skew_limit_s` of its own clock (10110 otherwise), the md5 signature of every method (getWorkKey
with the appSecret: 10103; the others with the day's workKey, which is never sent, so a wrong
or stale key and a wrong signature are the same 10105), the data fields (the same checks as the
adapter, with the spec's codes), and the business rules (one card per person 10115, unknown
cards 10109, bind mismatches 10157). A workKey is good for the day it was issued on; expiry on
demand through /_sim/expire_auth. Answers carry a `Date` header from the simulator's clock.
"""

from __future__ import annotations

import email.utils
import hashlib
import json
import threading
import time
from datetime import datetime
from typing import Any, Callable, Mapping

from aiohttp import web

from agent.codes import wondersgroup as codes
from agent.platforms.fsjson import SIGNED, check_data, sign, signed_values
from agent.simulator.soap import SimServer
from agent.simulator.wondersgroup import Answer, JournalEntry, Person, WondersgroupSimulator, default_people

PATH = "/jkfs-dzjkk/dzjkk/websvi"
APP_FIELDS = ("termId", "version", "appVersion", "appPackageName", "digestType", "encType")


class FsjsonSimulator:
    def __init__(self, *, app_id: str = "39bf0ca6e9b340659852808173fdf705", app_secret: str = "scanbox-app-secret",
                 people: list[Person] | None = None, skew_limit_s: float = 300.0, separator: str = "|",
                 clock: Callable[[], float] = time.time) -> None:
        self.app_id = app_id
        self.app_secret = app_secret
        self.skew_limit_s = skew_limit_s
        self.separator = separator
        self.clock = clock
        self.work_keys: dict[str, str] = {}  # day -> that day's workKey
        self.generation = 0
        self.bindings: list[dict[str, str]] = []
        self.journal: list[JournalEntry] = []
        self._lock = threading.Lock()
        # the population and its QR codes, kept as the wondersgroup simulator keeps them
        self._cards = WondersgroupSimulator(people=people if people is not None else default_people(), clock=clock)

    @property
    def people(self) -> dict[str, Person]:
        return self._cards.people

    @property
    def dynamic_ttl_s(self) -> float:  # read by soap.py's /_sim/dynamic
        return self._cards.dynamic_ttl_s

    def issue_dynamic(self, id_card: str, ttl_s: float | None = None) -> str:
        return self._cards.issue_dynamic(id_card, ttl_s)

    def snapshot(self) -> list[dict[str, Any]]:
        return self._cards.snapshot()

    def journal_for(self, method: str) -> list[JournalEntry]:
        with self._lock:
            return [e for e in self.journal if e.operation == method]

    def today(self) -> str:
        return datetime.fromtimestamp(self.clock()).strftime("%Y%m%d")

    def expire_auth(self) -> int:
        """Today's workKey stops working; the next getWorkKey issues another."""
        with self._lock:
            count = len(self.work_keys)
            self.work_keys.clear()
            self.generation += 1
            return count

    # --- the service -------------------------------------------------------------------------

    def handle(self, method: str, body: Any) -> dict[str, Any]:
        """One request: the answer's fields (resultCode, message, ...)."""
        sent: dict[str, Any] = {}
        try:
            with self._lock:
                sent = self._accept(method, body)
                getattr(self, "_" + method.lower())(sent)
            raise Answer("10110", "参数错误")
        except Answer as answer:
            result = answer
        with self._lock:
            self.journal.append(JournalEntry(method, self.clock(), result.code, "", sent))
        return {"resultCode": int(result.code) if result.code.isdigit() else result.code,
                "message": result.message, **result.data}

    def _accept(self, method: str, body: Any) -> dict[str, Any]:
        if method != "getWorkKey" and method not in SIGNED:
            raise Answer("10112", "错误的操作代码")
        if not isinstance(body, dict) or not all(isinstance(body.get(k), dict) for k in ("app", "data")):
            raise Answer("10110", "参数错误: appId, app, data")
        app = body["app"]
        missing = [k for k in APP_FIELDS if not isinstance(app.get(k), str)]
        if missing:
            raise Answer("10110", "参数错误: app.%s" % ",".join(missing))
        if body.get("appId") != self.app_id:
            raise Answer("10101", "机构代码错误")
        data = dict(body["data"])
        timestamp, signature = data.pop("timestamp", None), data.pop("sign", None)
        if not isinstance(timestamp, str) or len(timestamp) != 13 or not timestamp.isdigit():
            raise Answer("10110", "参数错误: timestamp 应为13位毫秒时间戳")
        if abs(int(timestamp) / 1000 - self.clock()) > self.skew_limit_s:
            raise Answer("10110", "参数错误: timestamp 与平台时间相差过大")
        if not isinstance(signature, str):
            raise Answer("10110", "参数错误: sign")
        if method == "getWorkKey":
            if signature.upper() != sign(self.app_id, self.app_secret, timestamp, separator=self.separator):
                raise Answer("10103", "密码错误: 签名不正确")
            return data
        # the spec's table nests peopleInfo in cardInfo, its sample puts it beside: take both
        card = data.get("cardInfo")
        if method == "syncCardInfo" and isinstance(card, dict) and "peopleInfo" in card and "peopleInfo" not in data:
            data["peopleInfo"] = card.pop("peopleInfo")
        key = self.work_keys.get(self.today())
        if key is None or signature.upper() != sign(self.app_id, key, timestamp, *signed_values(method, data),
                                                    separator=self.separator):
            raise Answer(codes.AUTH_EXPIRED, "认证字符串无效")
        problems = check_data(method, data)
        if problems:
            raise Answer(problems[0].code, "参数错误: %s" % problems[0])
        return data

    def _getworkkey(self, data: Mapping[str, Any]) -> None:
        day = self.today()
        if day not in self.work_keys:
            self.work_keys[day] = hashlib.md5(("wk:%s:%s:%d" % (self.app_id, day, self.generation)).encode()
                                              ).hexdigest().upper()
        raise Answer(codes.SUCCESS, "操作成功", {"workKey": self.work_keys[day]})

    def _card_of(self, zjlx: str, zjhm: str) -> Person | None:
        return self.people.get("%s:%s" % (zjlx, zjhm))

    def _bindcardinfo(self, data: Mapping[str, Any]) -> None:
        p = self._card_of(data["zjlx"], data["zjhm"])
        if p is None:
            raise Answer("10108", "身份证未办卡")
        if p.people["xm"] != data["xm"]:
            raise Answer("10157", "绑定信息不匹配")
        if data["bindType"] == "1" and (data["bindZjlx"], data["bindZjhm"]) != (data["zjlx"], data["zjhm"]):
            raise Answer("10157", "绑定信息不匹配: 本人绑定须为本人证件")
        self.bindings.append({k: str(data[k]) for k in ("zjlx", "zjhm", "bindType", "bindZjlx", "bindZjhm")})
        raise Answer(codes.SUCCESS, "操作成功", {"ehealthCardId": p.vuid, "virtualCardNum": p.virtual_card_num})

    def _synccardinfo(self, data: Mapping[str, Any]) -> None:
        people = {k: v for k, v in data["peopleInfo"].items() if v}
        if self._card_of(people["zjlx"], people["zjhm"]) is not None:
            raise Answer("10115", "身份证已经办理过")
        p = self._cards.add(Person(people, org_code=data["cardInfo"]["orgCode"]))
        raise Answer(codes.SUCCESS, "操作成功", {"ehealthCardId": p.vuid, "virtualCardNum": p.virtual_card_num})

    def _getimg(self, data: Mapping[str, Any]) -> None:
        # both given: the ehealthCardId decides (说明 (2))
        wanted = data.get("ehealthCardId")
        p = next((p for p in self.people.values()
                  if (p.vuid == wanted if wanted else p.virtual_card_num == data.get("virtualCardNum"))), None)
        if p is None:
            raise Answer("10109", "卡号不存在")
        if p.status in ("3", "9", "4"):
            # spec 003: 1010 已挂失, 1040 已注销
            raise Answer("1010", "已挂失") if p.status == "3" else Answer("1040", "已注销")
        raise Answer(codes.SUCCESS, "操作成功", {"qRCode": self.issue_dynamic(p.people["zjhm"]), "img": ""})


class FsjsonServer(SimServer):
    """The simulator at `PATH/<method>.do`, with soap.py's faults and control API and
    /_sim/expire_auth. `encoding`: the charset of its answers."""

    def __init__(self, sim: FsjsonSimulator, encoding: str = "UTF-8") -> None:
        super().__init__(sim, path=PATH + "/{method}.do")  # type: ignore[arg-type]  # same control surface
        self.sim: FsjsonSimulator = sim  # type: ignore[assignment]
        self.encoding = encoding
        self.app.router.add_post("/_sim/expire_auth", self._expire_auth)

    @property
    def endpoint(self) -> str:
        return "http://%s:%d%s" % (self.host, self.port, PATH)

    async def _get(self, request: web.Request) -> web.Response:
        return web.Response(status=405, text="POST only")

    async def _soap(self, request: web.Request) -> web.StreamResponse:
        method = request.match_info["method"]
        try:
            body = json.loads((await request.read()).decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            body = None
        answer = self.sim.handle(method, body)
        # getImg's sample answer has no "data" wrapper; the others do
        document = answer if method == "getImg" else {"data": answer}
        return web.Response(body=json.dumps(document, ensure_ascii=False).encode(self.encoding),
                            headers={"Content-Type": "application/json; charset=%s" % self.encoding,
                                     "Date": email.utils.formatdate(self.sim.clock(), usegmt=True)})

    async def _expire_auth(self, request: web.Request) -> web.Response:
        return web.json_response({"expired": self.sim.expire_auth()})
