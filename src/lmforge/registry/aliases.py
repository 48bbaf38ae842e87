"""Move the `champion` alias by hand: promote a version, or roll back to the one that held it before.

Pure MLflow client code (no Prefect): used by `lmforge promote/rollback` and the `lmforge-promote`
flow. Every move is recorded as model-version tags:

- on the new holder: `lmforge.<alias>.promoted_at`, `lmforge.<alias>.previous` (the version it
  replaced; a rollback does not overwrite it), `lmforge.<alias>.action` (promote | rollback);
- on the old holder: `lmforge.<alias>.replaced_at`, `lmforge.<alias>.replaced_by`, and for a
  rollback `lmforge.<alias>.rolled_back_at`, so a later rollback never returns to it by default.

Rollback target, when not given: the old holder's `lmforge.<alias>.previous` tag, else the newest
lower version that once held the alias (promoted by hand, or registered with all gates passed,
which is when the register stage gives it `champion`) and was not rolled back.
"""

from __future__ import annotations

import time
from typing import Any

from lmforge.registry import CHAMPION


class AliasError(ValueError):
    """The move cannot be made (unknown version, nothing to roll back to); the message says why."""


def _client(client: Any = None) -> Any:
    if client is not None:
        return client
    from mlflow import MlflowClient

    from lmforge import tracking

    uri = tracking.tracking_uri()
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def current_version(model_name: str, alias: str = CHAMPION, client: Any = None) -> int | None:
    """The version holding `alias`, or None."""
    from mlflow.exceptions import MlflowException

    try:
        return int(_client(client).get_model_version_by_alias(model_name, alias).version)
    except MlflowException:
        return None


def _versions(model_name: str, client: Any) -> dict[int, Any]:
    found = client.search_model_versions(f"name = '{model_name}'")
    return {int(v.version): v for v in found}


def _move(model_name: str, version: int, alias: str, action: str, reason: str, client: Any) -> dict:
    versions = _versions(model_name, client)
    if not versions:
        raise AliasError(f"model {model_name!r} has no registered versions")
    if version not in versions:
        known = ", ".join(str(v) for v in sorted(versions))
        raise AliasError(f"model {model_name!r} has no version {version} (known: {known})")
    previous = current_version(model_name, alias, client)
    when = _now()
    client.set_registered_model_alias(model_name, alias, str(version))
    tag = f"lmforge.{alias}"
    new_tags = {f"{tag}.promoted_at": when, f"{tag}.action": action}
    if reason:
        new_tags[f"{tag}.reason"] = reason[:4000]
    if previous is not None and previous != version and action == "promote":
        new_tags[f"{tag}.previous"] = str(previous)
    for key, value in new_tags.items():
        client.set_model_version_tag(model_name, str(version), key, value)
    if previous is not None and previous != version:
        old_tags = {f"{tag}.replaced_at": when, f"{tag}.replaced_by": str(version)}
        if action == "rollback":
            old_tags[f"{tag}.rolled_back_at"] = when
        for key, value in old_tags.items():
            client.set_model_version_tag(model_name, str(previous), key, value)
    return {
        "model_name": model_name,
        "alias": alias,
        "version": version,
        "previous": previous,
        "action": action,
        "at": when,
        "reason": reason,
        "model_uri": f"models:/{model_name}@{alias}",
    }


def promote(
    model_name: str, version: int | str, alias: str = CHAMPION, reason: str = "", client: Any = None
) -> dict:
    """Point `alias` at `version`; returns what moved (version, previous holder, time)."""
    return _move(model_name, int(version), alias, "promote", reason, _client(client))


def rollback_target(model_name: str, alias: str = CHAMPION, client: Any = None) -> int:
    """The version a rollback of `alias` would return to (see the module docstring)."""
    client = _client(client)
    current = current_version(model_name, alias, client)
    if current is None:
        raise AliasError(f"no version of {model_name!r} holds the alias {alias!r}: nothing to roll back")
    versions = _versions(model_name, client)
    tag = f"lmforge.{alias}"
    previous = versions[current].tags.get(f"{tag}.previous") if current in versions else None
    if previous and int(previous) in versions and int(previous) != current:
        return int(previous)
    for number in sorted((v for v in versions if v < current), reverse=True):
        tags = versions[number].tags
        if f"{tag}.rolled_back_at" in tags:
            continue
        held = f"{tag}.promoted_at" in tags or (alias == CHAMPION and tags.get("lmforge.gates") == "passed")
        if held:
            return number
    raise AliasError(
        f"no earlier version of {model_name!r} held {alias!r} before version {current}: "
        "give the version to roll back to"
    )


def rollback(
    model_name: str,
    to_version: int | str | None = None,
    alias: str = CHAMPION,
    reason: str = "",
    client: Any = None,
) -> dict:
    """Move `alias` back to `to_version`, or to the version that held it before the current one."""
    client = _client(client)
    target = int(to_version) if to_version is not None else rollback_target(model_name, alias, client)
    return _move(model_name, target, alias, "rollback", reason, client)
