"""The wheel as a box installs it (image/build.sh: `pip wheel --no-deps`, then installed alone).

Built from a clean copy of the tree, installed with no extras into a fresh virtualenv that holds
no test tool, from bootstrap's wheelhouse (.venv/wheelhouse) with no package index: what is
tested here is what ships, and a runtime dependency that only a test tool brought into the
development venv fails here (zeep's AsyncTransport, when the adapters used it, needed `packaging`,
which only pytest installed: every verification of a box raised). The pip steps run in a
network namespace of their own where the system allows one (root or user namespaces), so
nothing here can fetch from the index.

Then that install's own `scanbox run`, as a process, against the rhc and wondersgroup simulators
(run here, from the development venv): a scan on a serial pty verified online and answered to a
`read_card` caller on the Unix socket; the platform failing, the same code answered from the
cache; the platform back, the outbox drained and the record at the platform once.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any, Callable

import pytest

from agent.simulator.soap import Fault, SimServer
from agent.simulator.wondersgroup import WondersgroupServer, WondersgroupSimulator
from tests.conftest import PtyScanner, RpcClient, config_dict, start_sim, write_config
from tests.platforms.test_wondersgroup import ORG
from tests.test_daemon_process import NotifyListener

ROOT = Path(__file__).resolve().parents[2]
DATA = ("*.wsdl", "*.toml")
# bootstrap.sh leaves the runtime dependencies' wheels (and the build backend's) beside the venv
WHEELHOUSE = Path(sys.prefix) / "wheelhouse"
# building, installing and starting what was built take longer than a test of one part
pytestmark = pytest.mark.timeout(300)
TEST_TOOLS = ("pytest", "pytest-asyncio", "pytest-timeout", "ruff", "segno", "hypothesis", "selenium")


def no_network() -> list[str]:
    """A command prefix that runs a command with no network at all, where the system allows."""
    for prefix in (["unshare", "-n"], ["unshare", "-rn"]):
        if shutil.which("unshare") and subprocess.run(prefix + ["true"], capture_output=True).returncode == 0:
            return prefix
    return []


def pip_env() -> dict[str, str]:
    """No pip configuration from this machine (an index, find-links), and any proxy unreachable."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("PIP_") and k.lower() not in ("http_proxy", "https_proxy", "all_proxy", "no_proxy")}
    unreachable = "http://127.0.0.1:9"
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_DISABLE_PIP_VERSION_CHECK="1", http_proxy=unreachable,
               https_proxy=unreachable, HTTP_PROXY=unreachable, HTTPS_PROXY=unreachable)
    return env


def _offline_pip(python: Path | str, *args: str) -> None:
    if not any(WHEELHOUSE.glob("setuptools-*.whl")):
        pytest.fail("no wheelhouse at %s: run ./bootstrap.sh (it makes one when there is none)" % WHEELHOUSE)
    command = no_network() + [str(python), "-m", "pip", *args, "--no-index", "--find-links", str(WHEELHOUSE)]
    proc = subprocess.run(command, env=pip_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, "%s failed:\n%s%s" % (" ".join(command), proc.stdout, proc.stderr)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    # from a copy without build/ and *.egg-info: files left there by an earlier build would be
    # packed again and hide what pyproject.toml leaves out
    work = tmp_path_factory.mktemp("wheel")
    source = work / "src"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
        "build", "*.egg-info", ".venv", ".git", "__pycache__", ".pytest_cache", "dist"))
    # with build isolation, as image/build.sh builds it: setuptools comes from the wheelhouse
    _offline_pip(sys.executable, "wheel", "-q", "--no-deps", "-w", str(work), str(source))
    (built,) = work.glob("scanbox-*.whl")
    return built


@pytest.fixture(scope="module")
def installed(wheel: Path, tmp_path_factory) -> Path:
    """A fresh virtualenv with the wheel and its declared dependencies, nothing else."""
    venv = tmp_path_factory.mktemp("fresh") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    _offline_pip(venv / "bin" / "python", "install", "-q", str(wheel))
    return venv


def test_the_wheel_carries_every_module_and_data_file(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    wanted = set()
    for package in ("agent", "drivers"):
        for pattern in ("*.py",) + DATA:
            wanted |= {str(p.relative_to(ROOT)) for p in (ROOT / package).rglob(pattern)
                       if "__pycache__" not in p.parts}
    assert wanted - names == set()
    assert {"agent/platforms/wsdl/rhc.wsdl", "drivers/card_profiles/health_card.toml"} <= names
    entry_points = zipfile.ZipFile(wheel).read(
        next(n for n in names if n.endswith(".dist-info/entry_points.txt"))).decode()
    assert "scanbox = agent.cli:main" in entry_points


IMPORT_ALL = """
import contextlib, importlib, io, json, pkgutil, re, sys
import agent, drivers
from agent import cli
failed = {}
for package in (agent, drivers):
    for module in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
        if module.name.endswith("__main__"):
            continue
        try:
            importlib.import_module(module.name)
        except Exception as exc:
            failed[module.name] = "%s: %s" % (type(exc).__name__, exc)
# every subcommand's --help, found from the help texts themselves (the choices of a COMMAND,
# ACTION or PLATFORM are the lines indented by four spaces)
helps, queue = {}, [[]]
while queue:
    words = queue.pop(0)
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
        cli.main(words + ["--help"])
    helps[" ".join(words)] = out.getvalue()
    queue += [words + [name] for name in re.findall(r"^    ([a-z][a-z-]*)(?:  |$)", out.getvalue(), re.M)]
print(json.dumps({"failed": failed, "agent": agent.__file__, "helps": helps}))
"""


def test_the_wheel_alone_installs_clean_and_every_module_imports(installed):
    python = installed / "bin" / "python"
    check = subprocess.run([str(python), "-m", "pip", "check"], env=pip_env(), capture_output=True, text=True,
                           timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    listed = subprocess.run([str(python), "-m", "pip", "list", "--format=freeze"], env=pip_env(),
                            capture_output=True, text=True, check=True, timeout=60).stdout
    names = {line.split("==")[0].lower() for line in listed.split()}
    assert "scanbox" in names and names.isdisjoint(TEST_TOOLS)

    proc = subprocess.run([str(python), "-c", IMPORT_ALL], capture_output=True, text=True, timeout=120,
                          cwd=installed, env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["failed"] == {}
    assert Path(report["agent"]).is_relative_to(installed)  # the installed copy, not this tree
    helps = report["helps"]
    assert {"run", "demo", "config check", "simulate rhc", "simulate wondersgroup", "outbox list",
            "provision", "doctor", "api"} <= set(helps)
    assert all(text.startswith("usage: scanbox") for text in helps.values()), helps
    script = subprocess.run([str(installed / "bin" / "scanbox"), "--help"], capture_output=True, text=True,
                            timeout=60)
    assert script.returncode == 0 and script.stdout == helps[""]


# --- the installed daemon, end to end --------------------------------------------------------


async def _rhc() -> tuple[SimServer, dict[str, Any], str, Callable[[SimServer], list[Any]]]:
    server = await start_sim()
    resident = list(server.sim.residents.values())[0]
    platform = {"kind": "rhc", "endpoint": server.endpoint, "wsdl": server.wsdl_url, "timeout_s": 2,
                "rhc": {"org_id": "QH0001", "user_name": "scanbox", "user_pwd": "scanbox-secret"}}
    return server, platform, resident.static_qr, lambda s: [e for e in s.sim.journal if e.ok]


async def _wondersgroup() -> tuple[SimServer, dict[str, Any], str, Callable[[SimServer], list[Any]]]:
    server = WondersgroupServer(WondersgroupSimulator(org_code=ORG))
    await server.start("127.0.0.1", 0)
    person = next(iter(server.sim.people.values()))
    platform = {"kind": "wondersgroup", "endpoint": server.endpoint, "wsdl": server.wsdl_url, "timeout_s": 2,
                "wondersgroup": {"org_code": ORG, "user_name": "scanbox", "pass_word": "scanbox-secret"}}
    return server, platform, person.static_qr, lambda _: server.sim.journal_for("virIdCardVerify")


async def _read_card(client: RpcClient, scanner: PtyScanner, qr: str, **params: Any) -> dict[str, Any]:
    """A HIS waiting in read_card, then the code scanned on the serial scanner."""
    pending = asyncio.get_running_loop().create_task(
        client.request("read_card", {"timeout_s": 15, **params}, timeout=20))
    # the read_card is registered once the daemon has answered a later request on the connection
    await client.call("outbox.stats")
    scanner.scan(qr)
    response = await pending
    assert "result" in response, response
    return response["result"]


async def _status_until(client: RpcClient, part: str, predicate: Callable[[dict[str, Any]], bool],
                        timeout: float = 15) -> dict[str, Any]:
    """Until a `status` event (subscribed before) shows `part` as `predicate` wants."""
    async with asyncio.timeout(timeout):
        while True:
            event = await client.event("status", timeout=timeout)
            data = event["data"].get(part)
            if data is not None and predicate(data):
                return data


@pytest.mark.parametrize("kind", ["rhc", "wondersgroup"])
async def test_the_installed_scanbox_verifies_answers_offline_and_drains(installed, kind, tmp_path):
    server, platform, qr, verify_records = await (_rhc() if kind == "rhc" else _wondersgroup())
    scanner = PtyScanner(tmp_path)
    notify = NotifyListener(tmp_path / "notify.sock")
    config, secrets = write_config(tmp_path, config_dict(
        None, tmp_path, device={"id": "fresh-%s" % kind}, platform=platform,
        sources={"counter": {"driver": "serial_scanner", "port": str(scanner.path), "reconnect_max_s": 0.2}},
        outbox={"backoff_initial": "50ms", "backoff_max": "200ms"}))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["NOTIFY_SOCKET"] = str(notify.path)
    log_path = tmp_path / "daemon.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([str(installed / "bin" / "scanbox"), "run", "--config", str(config),
                                 "--secrets", str(secrets)], stderr=log, env=env, cwd=tmp_path)
    client: RpcClient | None = None
    try:
        await asyncio.to_thread(notify.wait_for, "READY=1", 30)
        client = await RpcClient.unix(tmp_path / "api.sock")
        await client.call("subscribe", {"events": ["status"]})
        if not all(s["connected"] for s in (await client.call("status"))["sources"]):
            await _status_until(client, "source", lambda s: s["connected"])

        online = await _read_card(client, scanner, qr)
        assert online["verification"]["ok"] is True, online["verification"]
        assert online["verification"]["offline"] is False and online["identity"]["source"] == "platform"
        assert online["scan"]["source"] == "serial:counter" and online["scan"]["payload"] == qr

        server.faults.add(Fault("http500", count=None))  # the platform fails
        offline = await _read_card(client, scanner, qr, step="010105")
        assert offline["verification"]["ok"] is True and offline["verification"]["offline"] is True
        assert offline["identity"]["source"] == "cache"
        assert offline["identity"]["id_number"] == online["identity"]["id_number"]
        status = await client.call("status")
        assert status["outbox"]["pending"] == 1 and status["platform"]["reachable"] is False
        assert "PLATFORM_UNREACHABLE" in {a["code"] for a in status["alarms"]}

        server.faults.clear()  # the platform is back; nobody touches the box
        await _status_until(client, "outbox", lambda o: o["pending"] == 0 and o.get("sent") == 1)
        records = verify_records(server)
        assert len(records) == 2  # the online verification and the deferred one, once
        if kind == "rhc":
            assert [r.msg_guid for r in records] == [online["verification"]["msg_guid"],
                                                     offline["verification"]["msg_guid"]]
            assert records[1].values["medstep_code"] == "010105"
        else:
            assert records[1].result_code == "10000"
            assert records[1].values["useCardInfo"]["medStepcode"] == "010105"
        # the WSDL was fetched once, at start: not again for each call, retry or drain
        assert server.documents_served == ["wsdl"]
        status = await client.call("status")
        assert status["platform"]["reachable"] is True and status["outbox"]["pending"] == 0
        assert "PLATFORM_UNREACHABLE" not in {a["code"] for a in status["alarms"]}

        await client.close()
        client = None
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait, 15) == 0
    finally:
        if client is not None:
            await client.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        notify.close()
        scanner.close()
        await server.close()
    log = log_path.read_text(encoding="utf-8")
    assert "Traceback" not in log, log
