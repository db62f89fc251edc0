"""agent/schema.py: the one converter the config, the drivers' options and the API's params go
through. msgspec stops at the first error; these check that every problem is still found, each
under its own key path, in words a technician or an integrator reads, and that nothing but
ConfigError (config) or -32602 (API) comes out of any input."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import msgspec
import pytest

import drivers
from agent import schema
from agent.api import methods
from agent.api.jsonrpc import INVALID_PARAMS, Dispatcher, Method, Params, Session
from agent.config import Config, ConfigError, dump, validate
from tests.conftest import config_dict

ODD_VALUES: list[Any] = [None, True, 0, -1, 1.5, float("nan"), "", "x", [], [1, "a"], {}, {"k": "v"}]


def problems(data: dict[str, Any]) -> dict[str, str]:
    with pytest.raises(ConfigError) as info:
        validate(data)
    return {p.path: p.message for p in info.value.problems}


# --- the config ----------------------------------------------------------------------------------

def test_a_list_item_is_named_by_its_index_and_a_literal_lists_its_choices(tmp_path: Path) -> None:
    found = problems(config_dict(None, tmp_path, device={"log_level": "verbose"},
                                 security={"allow": ["wide_trusted", "plain"]}))
    assert found == {
        "device.log_level": "'verbose' is not one of 'debug', 'info', 'warning', 'error'",
        "security.allow.1": "'plain' is not one of 'plain_listener', 'wide_trusted', 'open_unix_socket', "
                            "'plain_platform', 'no_tls_verify', 'group_readable_secrets'",
    }


def test_a_value_that_fits_no_member_of_a_union_is_one_line_without_msgspecs_own_path(tmp_path: Path) -> None:
    found = problems(config_dict(None, tmp_path, platform={"tls_verify": 5}))
    assert found == {"platform.tls_verify": "Expected `bool | str`, got `int`"}
    # a string is the member whose check applies: a CA bundle that must be a file
    found = problems(config_dict(None, tmp_path, platform={"tls_verify": str(tmp_path / "no-ca.pem")}))
    assert list(found) == ["platform.tls_verify"] and "is not a file" in found["platform.tls_verify"]
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    assert validate(config_dict(None, tmp_path, platform={"tls_verify": str(ca)})).platform.tls_verify == str(ca)
    assert validate(config_dict(None, tmp_path, platform={"tls_verify": False})).platform.tls_verify is False


def test_problems_in_tables_of_tables_are_named_by_their_key(tmp_path: Path) -> None:
    found = problems(config_dict(None, tmp_path, api={"clients": {
        "front desk": {"token": "short", "scopes": ["read", "write"]},
        "his": {"token": "t0k-5b1e9f3a-his-0123", "scope": ["read"]},
    }}))
    assert found == {
        "api.clients.front desk.token": "too weak: at least 16 characters with 8 different ones (e.g. the output "
                                        "of `openssl rand -hex 16`)",
        "api.clients.front desk.scopes.1": "'write' is not one of 'read', 'admin', 'metrics'",
        "api.clients.his.scope": "unknown key (did you mean 'scopes'?)",
    }


def test_numbers_and_booleans_written_as_strings_read_as_before_but_a_boolean_is_no_number(tmp_path: Path) -> None:
    cfg = validate(config_dict(None, tmp_path, platform={"timeout_s": "4"}, metrics={"require_token": "false"},
                               sources={"counter": {"driver": "serial_scanner", "port": "/dev/ttyACM0",
                                                    "baud": "115200"}}))
    assert cfg.platform.timeout_s == 4.0 and cfg.metrics.require_token is False
    assert cfg.sources["counter"].baud == 115200
    found = problems(config_dict(None, tmp_path, api={"max_clients": True}, platform={"timeout_s": "soon"}))
    assert found == {"api.max_clients": "Expected `int`, got `bool`",
                     "platform.timeout_s": "Expected `float`, got `str`"}


@pytest.mark.parametrize("text, seconds", [(90, 90.0), (1.5, 1.5), ("90s", 90.0), ("10m", 600.0), ("24h", 86400.0),
                                           ("7d", 604800.0), ("250ms", 0.25), ("0", 0.0)])
def test_durations_are_seconds_or_a_number_with_a_unit(tmp_path: Path, text: Any, seconds: float) -> None:
    cfg = validate(config_dict(None, tmp_path, outbox={"retention": text}, cache={"ttl": text}))
    assert cfg.outbox.retention == seconds and cfg.cache.ttl == seconds
    assert dump(cfg)["outbox"]["retention"] == seconds and type(dump(cfg)["outbox"]["retention"]) is float


@pytest.mark.parametrize("text, message", [("7x", "a duration"), (-1, "cannot be negative"), (True, "a duration"),
                                           ("-5m", "a duration"), ([1], "a duration")])
def test_a_bad_duration_says_what_a_duration_is(tmp_path: Path, text: Any, message: str) -> None:
    found = problems(config_dict(None, tmp_path, clock={"sync_wait": text}))
    assert list(found) == ["clock.sync_wait"] and message in found["clock.sync_wait"]


def test_checks_that_normalise_keep_their_value(tmp_path: Path) -> None:
    cfg = validate(config_dict(None, tmp_path, api={"http_hosts": ["Box.Example.CN"], "tcp": ""}))
    assert cfg.api.http_hosts == ["box.example.cn"] and cfg.api.tcp is None


def test_a_config_made_by_validate_is_frozen(tmp_path: Path) -> None:
    cfg = validate(config_dict(None, tmp_path))
    with pytest.raises(AttributeError):
        cfg.platform.timeout_s = 1  # type: ignore[misc]


def _leaf_paths(struct: type[msgspec.Struct], prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    out = []
    for key, info in schema.fields(struct).items():
        out.append(prefix + (key,))
        for sub in schema.structs_in(info.type):
            out += _leaf_paths(sub, prefix + (key,))
    return out


def test_no_value_anywhere_in_the_config_raises_anything_but_config_error(tmp_path: Path) -> None:
    """Every key of the schema, nested ones included, given each of a set of odd values."""
    base = config_dict(None, tmp_path)
    tried = 0
    for path in _leaf_paths(Config):
        for value in ODD_VALUES:
            data = json.loads(json.dumps(base))
            node = data
            for key in path[:-1]:
                node = node.setdefault(key, {})
                if not isinstance(node, dict):
                    break
            else:
                node[path[-1]] = value
                try:
                    validate(data)
                except ConfigError as exc:
                    assert exc.problems and all(p.message for p in exc.problems)
                    assert not any(" - at `$" in p.message for p in exc.problems), exc
                tried += 1
    assert tried > 500


@pytest.mark.parametrize("driver", sorted(drivers.SOURCE_DRIVERS))
def test_no_value_in_a_source_section_raises_anything_but_config_error(tmp_path: Path, driver: str) -> None:
    options = drivers.source_module(driver).Options
    for key in list(schema.fields(options)) + ["driver"]:
        for value in ODD_VALUES + [["stdin"], {"driver": "stdin"}]:
            try:
                validate(config_dict(None, tmp_path, sources={"s": {"driver": driver, key: value}}))
            except ConfigError as exc:
                assert exc.problems and all(p.path.startswith("sources.s") for p in exc.problems), exc
                assert not any(" - at `$" in p.message for p in exc.problems), exc


# --- the API's params ----------------------------------------------------------------------------

async def _echo(session: Session, params: Params) -> dict[str, Any]:
    return {"params": schema.to_builtins(params)}


PARAMS: dict[str, type[Params]] = {
    "auth": methods.AuthParams, "read_card": methods.ReadCardParams, "verify_qr": methods.VerifyQrParams,
    "subscribe": methods.SubscribeParams, "platform.call": methods.PlatformCallParams,
    "display.show": methods.DisplayShowParams, "outbox.list": methods.OutboxListParams,
    "outbox.retry": methods.OutboxRetryParams, "onetrans": methods.OnetransParams,
}


def _dispatcher() -> tuple[Dispatcher, Session]:
    dispatcher = Dispatcher([Method(name, cls, _echo, scope="read") for name, cls in PARAMS.items()])
    return dispatcher, Session("test", "127.0.0.1", scopes=frozenset({"read"}))


async def call(method: str, params: Any) -> dict[str, Any]:
    dispatcher, session = _dispatcher()
    response = await dispatcher.handle(session, {"jsonrpc": "2.0", "id": 1, "method": method, "params": params})
    assert isinstance(response, dict)
    return response


async def test_api_params_are_strict_and_every_bad_one_is_named() -> None:
    bad = await call("read_card", {"timeout_s": "5", "verify": "false", "kinds": ["qr", "iris"], "colur": 1})
    assert bad["error"]["code"] == INVALID_PARAMS and bad["error"]["data"]["reason"] == "BAD_REQUEST"
    assert bad["error"]["data"]["problems"] == [
        "colur: unknown parameter",
        "timeout_s: Expected `float`, got `str`",
        "kinds.1: 'iris' is not one of 'qr', 'id_card', 'health_card', 'ssc'",
        "verify: Expected `bool`, got `str`",
    ]
    assert bad["error"]["message"] == "bad params for read_card: " + "; ".join(bad["error"]["data"]["problems"])
    typo = await call("outbox.retry", {"idd": 3})
    assert typo["error"]["data"]["problems"] == ["idd: unknown parameter (did you mean 'id'?)", "id: required"]
    assert (await call("outbox.retry", {"id": True}))["error"]["data"]["problems"] == ["id: Expected `int`, got `bool`"]


async def test_good_api_params_arrive_converted_with_defaults() -> None:
    ok = await call("read_card", {"timeout_s": 5, "kinds": ["qr"], "step": "010101"})
    assert ok["result"]["params"] == {"timeout_s": 5.0, "kinds": ["qr"], "step": "010101", "verify": True}
    ok = await call("onetrans", {"pInData": "{}"})
    assert ok["result"]["params"] == {"pInData": "{}"}


@pytest.mark.parametrize("method", sorted(PARAMS))
async def test_no_param_value_answers_anything_but_a_result_or_bad_params(method: str) -> None:
    for name in schema.fields(PARAMS[method]):
        for value in ODD_VALUES + [2 ** 64, -(2 ** 70), float("inf"), "9" * 100]:
            response = await call(method, {name: value})
            if "error" in response:
                assert response["error"]["code"] == INVALID_PARAMS, (method, name, value, response)
                assert not any(" - at `$" in p for p in response["error"]["data"]["problems"])


async def test_the_problems_docs_api_shows_are_what_the_box_says() -> None:
    doc = (Path(__file__).resolve().parent.parent / "docs" / "api.md").read_text(encoding="utf-8")
    for params in ({"timeout_s": "5"}, {"timout_s": 5}, {"kinds": ["qr", "iris"]}):
        [problem] = (await call("read_card", params))["error"]["data"]["problems"]
        assert '"%s"' % problem in " ".join(doc.split()), problem
