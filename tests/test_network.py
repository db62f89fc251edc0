"""Whether the box is on a network: a default route, read from /proc the way the kernel writes it."""

from __future__ import annotations

from agent.daemon import network_up

V4_HEADER = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n"


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_an_ipv4_default_route_that_is_up(tmp_path):
    route = write(tmp_path, "route", V4_HEADER + "eth0\t00000000\t0101A8C0\t0003\t0\t0\t0\t00000000\t0\t0\t0\n")
    assert network_up((route,)) is True


def test_only_a_local_subnet_or_a_route_that_is_down_is_no_network(tmp_path):
    subnet = write(tmp_path, "route", V4_HEADER + "eth0\t0001A8C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n")
    down = write(tmp_path, "route2", V4_HEADER + "eth0\t00000000\t0101A8C0\t0002\t0\t0\t0\t00000000\t0\t0\t0\n")
    assert network_up((subnet,)) is False
    assert network_up((down,)) is False


def test_an_ipv6_default_route_counts_but_not_on_loopback(tmp_path):
    # destination, prefix, source, prefix, next hop, metric, refcnt, use, flags, device
    line = " ".join(["0" * 32, "00", "0" * 32, "00", "fe80" + "0" * 27 + "1", "00000400", "00000001",
                     "00000000", "00000003", "%s"]) + "\n"
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    assert network_up((write(tmp_path / "a", "ipv6_route", line % "wlan0"),)) is True
    assert network_up((write(tmp_path / "b", "ipv6_route", line % "lo"),)) is False


def test_unreadable_route_files_mean_no_network(tmp_path):
    assert network_up((str(tmp_path / "missing"),)) is False


async def test_the_network_state_outlives_outbox_events(box):
    """The box's network state is only ever changed by the network watch (an outbox event used
    to reset it to unknown until the next check, 10 s later)."""
    from tests.conftest import until

    await box.start()
    await until(lambda: box.daemon.network_up is not None)
    known = box.daemon.network_up
    box.daemon._outbox_changed()
    await box.events.wait("status", lambda d: "outbox" in d)
    assert box.daemon.network_up is known
    assert (await box.daemon.status())["network"]["up"] is known
