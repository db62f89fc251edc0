"""What the fleet tests share: a scrape of a running box, parsed by prometheus_client's own parser."""

from __future__ import annotations

from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

METRICS_TOKEN = "prom-token-5a7e33"
METRICS_CLIENT = {"prometheus": {"token": METRICS_TOKEN, "scopes": ["metrics"]}}


async def scrape(session: aiohttp.ClientSession, url: str, token: str | None = METRICS_TOKEN) -> tuple[int, str]:
    headers = {"Authorization": "Bearer %s" % token} if token else {}
    async with session.get(url, headers=headers) as response:
        return response.status, await response.text()


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """{(sample name, labels): value} of an exposition."""
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return out


def value(parsed: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float | None:
    """The one sample of `name` whose labels include `labels`; None when there is none."""
    found = [v for (n, ls), v in parsed.items() if n == name and set(labels.items()) <= ls]
    if len(found) > 1:
        raise AssertionError("%d samples of %s%r" % (len(found), name, labels))
    return found[0] if found else None


def names(text: str) -> set[str]:
    """Every sample name an exposition has (histogram _bucket/_sum/_count included)."""
    return {sample.name for family in text_string_to_metric_families(text) for sample in family.samples}


def api_with_metrics(**extra: Any) -> dict[str, Any]:
    from tests.conftest import ADMIN_TOKEN, TOKEN

    clients = {"his": {"token": TOKEN, "scopes": ["read"]},
               "admin": {"token": ADMIN_TOKEN, "scopes": ["read", "admin"]}, **METRICS_CLIENT}
    return {"http": "127.0.0.1:0", "clients": clients, **extra}
