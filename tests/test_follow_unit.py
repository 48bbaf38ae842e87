"""services/follow.AliasFollower without a server: what one poll does when the alias stays, moves to a
version that loads, or moves to one that does not (the old one keeps serving; retried later)."""

from __future__ import annotations

import sys
import threading
from dataclasses import dataclass

import pytest

from conftest import REPO

if str(REPO) not in sys.path:  # `services/` is a folder of the repo, not an installed package
    sys.path.insert(0, str(REPO))

from services.follow import AliasFollower  # noqa: E402


@dataclass
class FakeEngine:
    closed_with: float | None = None

    def close(self, grace_s: float) -> None:
        self.closed_with = grace_s


@dataclass
class FakeBackend:
    version: str
    engine: FakeEngine


def follower(alias: dict, serving: dict, broken: set, outcomes: list, **kw) -> AliasFollower:
    def load(version: str) -> FakeBackend:
        if version in broken:
            raise RuntimeError(f"version {version}: header too large")
        return FakeBackend(version, FakeEngine())

    def swap(new: FakeBackend) -> FakeBackend:
        old, serving["backend"] = serving["backend"], new
        return old

    return AliasFollower(
        current=lambda: serving["backend"].version,
        resolve=lambda: alias["version"],
        load=load,
        swap=swap,
        period_s=60,
        drain_s=7.0,
        settle_s=0.0,
        outcome=outcomes.append,
        **kw,
    )


def test_a_poll_swaps_to_the_new_version_and_retires_the_old_engine():
    alias, outcomes = {"version": "1"}, []
    first = FakeBackend("1", FakeEngine())
    serving = {"backend": first}
    f = follower(alias, serving, set(), outcomes)
    assert f.check() is None and serving["backend"] is first  # the alias did not move
    alias["version"] = "2"
    assert f.check() == "swapped" and serving["backend"].version == "2"
    for t in threading.enumerate():
        if t.name == "lmforge-retire":
            t.join(5)
    assert first.engine.closed_with == 7.0  # drained with the request timeout as its grace
    assert outcomes == ["swapped"]


def test_a_version_that_fails_to_load_keeps_the_old_one_and_is_retried_only_later(monkeypatch):
    import services.follow as follow

    now = [1000.0]
    monkeypatch.setattr(follow.time, "monotonic", lambda: now[0])
    alias, outcomes = {"version": "3"}, []
    serving = {"backend": FakeBackend("2", FakeEngine())}
    broken = {"3"}
    f = follower(alias, serving, broken, outcomes, retry_s=30)
    assert f.check() == "failed" and serving["backend"].version == "2"
    now[0] += 10
    assert f.check() is None  # not hammered every period
    now[0] += 25
    broken.clear()  # fixed in the registry (a new upload would be a new version; here the same one loads)
    assert f.check() == "swapped" and serving["backend"].version == "3"
    assert outcomes == ["failed", "swapped"]


def test_following_needs_a_positive_period():
    with pytest.raises(ValueError, match="LMFORGE_FOLLOW_ALIAS_S must be > 0"):
        AliasFollower(current=str, resolve=str, load=str, swap=str, period_s=0, drain_s=1)
