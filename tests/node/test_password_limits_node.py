"""Password attempts at a running node: a flooding key holder is refused (429), others are not."""
from __future__ import annotations

import asyncio
import collections

import pytest

from protocol.errors import StatusError, Unauthorized
from utesla_node import auth
from utesla_node.config import ConfigError, load_config

from helpers import user_key


async def test_a_flooding_user_is_refused_and_another_user_still_gets_a_token(make_node):
    h = await make_node(max_password_failures=5, max_password_failures_per_ip=20,
                        password_backoff=600.0, password_backoff_max=600.0)
    await h.add_user("bob", password="bob-pw", key=user_key(tag="bob"), token=False)
    alice = h.client("alice", token=None)
    results = await asyncio.gather(*(alice.generate_token(f"wrong-{i}") for i in range(32)),
                                   return_exceptions=True)
    statuses = collections.Counter(getattr(r, "status", r) for r in results)
    assert statuses == {401: 5, 429: 27}
    # Alice's right password is refused too while the backoff lasts, with a hint.
    with pytest.raises(StatusError) as refused:
        await alice.generate_token("pw")
    assert refused.value.status == 429
    assert "too many failed password attempts for this user" in str(refused.value)
    assert "try again in" in str(refused.value)
    # Bob, from the same address (loopback), still gets his token at once.
    bob = h.client("bob", token=None)
    token = await bob.generate_token("bob-pw")
    assert (await bob.get("/echo", token=token)).json()["user"] == "bob"
    assert h.node.authority.limiter.refused == {"user": 28}
    # A wrong password from bob is still the ordinary 401.
    with pytest.raises(Unauthorized):
        await bob.generate_token("nope")


async def test_an_address_over_its_limit_is_refused_for_every_user(make_node):
    h = await make_node(max_password_failures=5, max_password_failures_per_ip=3)
    await h.add_user("bob", password="bob-pw", key=user_key(tag="bob"), token=False)
    alice = h.client("alice", token=None)
    for _ in range(3):
        with pytest.raises(Unauthorized):
            await alice.generate_token("wrong")
    with pytest.raises(StatusError) as refused:
        await h.client("bob", token=None).generate_token("bob-pw")
    assert refused.value.status == 429
    assert "from this address" in str(refused.value)
    assert h.node.authority.limiter.refused == {"address": 1}


def test_the_limits_come_from_node_ini(tmp_path):
    (tmp_path / "node.ini").write_text(
        "[server]\nmax_password_failures = 3\nmax_password_failures_per_ip = 9\n"
        "password_failure_window = 120\npassword_backoff = 5\npassword_backoff_max = 50\n")
    cfg = load_config(tmp_path / "node.ini")
    limiter = auth.password_limiter(cfg)
    assert (limiter.users.limit, limiter.addresses.limit) == (3, 9)
    for table in (limiter.users, limiter.addresses):
        assert (table.window, table.backoff, table.backoff_max) == (120.0, 5.0, 50.0)
    defaults = auth.password_limiter()
    assert (defaults.users.limit, defaults.addresses.limit) == (5, 20)
    assert (defaults.users.window, defaults.users.backoff, defaults.users.backoff_max) == (
        300.0, 30.0, 900.0)


@pytest.mark.parametrize("text,key", [
    ("max_password_failures = 0", "max_password_failures"),
    ("max_password_failures = many", "max_password_failures"),
    ("max_password_failures_per_ip = -1", "max_password_failures_per_ip"),
    ("password_failure_window = 0", "password_failure_window"),
    ("password_backoff = inf", "password_backoff"),
    ("password_backoff_max = nan", "password_backoff_max"),
    ("password_backoff = 100\npassword_backoff_max = 50", "password_backoff_max"),
    ("password_backoff = 1000", "password_backoff_max"),    # over the default maximum
])
def test_bad_limits_are_refused_naming_the_key(tmp_path, text, key):
    (tmp_path / "node.ini").write_text(f"[server]\n{text}\n")
    with pytest.raises(ConfigError) as ei:
        load_config(tmp_path / "node.ini")
    assert "[server]" in str(ei.value) and key in str(ei.value)
