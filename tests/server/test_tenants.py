"""Tenants file parsing and reloading, keys, rate limits and weighted fair queuing (no HTTP)."""

from __future__ import annotations

import asyncio
import os
import time

import pytest
import torch

from server.ratelimit import RateLimiter
from server.scheduler.fair import FairQueues
from server.scheduler.types import Request
from server.tenants import (
    TenantRegistry,
    TenantsFileError,
    generate_key,
    hash_key,
    keygen_line,
    parse_tenants,
)

KEY = generate_key()
GOOD = f"""
[[tenant]]
name = "acme"
keys = ["{hash_key(KEY)}"]
max_tasks = 3
weight = 2.5

[[tenant]]
name = "root"
role = "admin"
keys = ["{hash_key(generate_key())}"]
"""


def test_parse_and_authenticate():
    tenants = parse_tenants(GOOD)
    assert (
        tenants["acme"].role == "tenant" and tenants["acme"].max_tasks == 3 and tenants["acme"].weight == 2.5
    )
    assert tenants["root"].role == "admin" and tenants["root"].max_queued_images == 512  # default
    reg = TenantRegistry(path=None, tenants=tenants)
    assert reg.authenticate(KEY).name == "acme"
    assert reg.authenticate(KEY + "x") is None and reg.authenticate("") is None


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("[[tenant]\n", "invalid TOML"),
        ('[[tenant]]\nname = "a"\nkeys = ["sha256:' + "0" * 64 + '"]\nflavour = 1\n', "unknown fields"),
        ('[[tenant]]\nname = "a"\nrole = "root"\nkeys = ["sha256:' + "0" * 64 + '"]\n', "role"),
        ('[[tenant]]\nname = "a"\nkeys = ["vpt_plaintextkey"]\n', "plaintext"),
        ('[[tenant]]\nname = "a"\nkeys = []\n', "non-empty"),
        ('[[tenant]]\nname = "../a"\nkeys = ["sha256:' + "0" * 64 + '"]\n', "name"),
        (
            '[[tenant]]\nname = "a"\nkeys = ["sha256:'
            + "0" * 64
            + '"]\n[[tenant]]\nname = "a"\nkeys = ["sha256:'
            + "1" * 64
            + '"]\n',
            "twice",
        ),
        (
            '[[tenant]]\nname = "a"\nkeys = ["sha256:'
            + "0" * 64
            + '"]\n[[tenant]]\nname = "b"\nkeys = ["sha256:'
            + "0" * 64
            + '"]\n',
            "also listed",
        ),
        ('[[tenant]]\nname = "a"\nkeys = ["sha256:' + "0" * 64 + '"]\nrate_per_s = 0\n', "rate_per_s"),
        ('[[tenant]]\nname = "a"\nkeys = ["sha256:' + "0" * 64 + '"]\nmax_tasks = 1.5\n', "max_tasks"),
        ("tenants = 1\n", "unknown top-level"),
    ],
)
def test_invalid_files_name_the_problem(text, words):
    with pytest.raises(TenantsFileError, match=words):
        parse_tenants(text)


def test_keygen_line_is_a_valid_entry():
    key, toml = keygen_line("newco")
    assert key.startswith("vpt_") and key not in toml  # only the hash is written
    reg = TenantRegistry(path=None, tenants=parse_tenants(toml))
    assert reg.authenticate(key).name == "newco"


def test_reload_on_change_keeps_old_tenants_when_new_file_is_invalid(tmp_path):
    path = tmp_path / "tenants.toml"
    path.write_text(GOOD)
    reg = TenantRegistry.from_file(path)
    key2, toml2 = keygen_line("other")
    path.write_text(GOOD + toml2)
    os.utime(path, (time.time() + 5, time.time() + 5))  # mtime change even on coarse clocks
    reg.maybe_reload(interval_s=0)
    assert reg.authenticate(key2).name == "other"
    path.write_text("this is not toml [[[")
    os.utime(path, (time.time() + 10, time.time() + 10))
    reg.maybe_reload(interval_s=0)
    assert reg.authenticate(key2).name == "other" and reg.authenticate(KEY).name == "acme"


def test_rate_limiter_bursts_then_limits():
    rl = RateLimiter()
    assert [rl.acquire("a", 10.0, 3.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    wait = rl.acquire("a", 10.0, 3.0)
    assert 0 < wait <= 0.1
    assert rl.acquire("b", 10.0, 3.0) == 0.0  # buckets are per tenant


def _req(tenant: str, n: int = 1) -> Request:
    loop = asyncio.new_event_loop()
    try:
        fut = loop.create_future()
    finally:
        loop.close()
    return Request(tenant, "t", torch.zeros(n, 3, 1, 1, dtype=torch.uint8), "classify", 1, 1e18, fut)


def test_fair_queues_share_by_weight_and_bank_no_credit():
    fq = FairQueues()
    for _ in range(300):
        fq.push(_req("heavy"), weight=1.0)
        fq.push(_req("light"), weight=2.0)
    served = {"heavy": 0, "light": 0}
    for _ in range(150):
        t = fq.tenants_by_priority()[0]
        r = next(fq.requests(t))
        fq.take(r)
        served[t] += 1
    assert served["light"] == pytest.approx(2 * served["heavy"], abs=2)
    # A tenant idle while others were served starts at the system virtual time (the start tag of the
    # request served last), not ahead by its idle time — and not behind the backlogged tenants.
    fq.push(_req("late"), weight=1.0)
    assert 0 < fq.start_tag("late") == fq.clock <= min(fq.start_tag("heavy"), fq.start_tag("light"))


def test_a_newly_backlogged_tenant_ranks_before_the_heavy_tenants_next_request():
    """SFQ: the heavy tenant's next request starts after its last one ends (tag + 8), a newcomer's
    at the last start tag, so the newcomer goes first (and may overtake a running batch)."""
    fq = FairQueues()
    for _ in range(3):
        fq.push(_req("heavy", 8))
    fq.take(next(fq.requests("heavy")))
    running = fq.clock  # the tag of the batch now computing
    fq.push(_req("light"))
    assert fq.start_tag("light") <= running < fq.start_tag("heavy")
    assert fq.tenants_by_priority() == ["light", "heavy"]
