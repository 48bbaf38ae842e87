"""Prefect flow `lmforge-promote`: move the `champion` alias by hand, recorded as tags and an artifact.

action="promote" points the alias at `version`; action="rollback" returns it to `version` if given,
else to the version that held it before the current one (see lmforge.registry.aliases).
Same as `lmforge promote --version N` / `lmforge rollback [--to N]`.
"""

from __future__ import annotations

from typing import Literal

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from lmforge.registry import MODEL_NAME, aliases


@flow(name="lmforge-promote", log_prints=True)
def lmforge_promote(
    action: Literal["promote", "rollback"] = "promote",
    version: int | None = None,
    model_name: str = MODEL_NAME,
    alias: str = aliases.CHAMPION,
    reason: str = "",
) -> dict:
    """Promote `version` to `alias`, or roll `alias` back (to `version`, or to its previous holder)."""
    log = get_run_logger()
    if action == "promote":
        if version is None:
            raise ValueError("promote needs a version")
        moved = aliases.promote(model_name, version, alias=alias, reason=reason)
    else:
        moved = aliases.rollback(model_name, to_version=version, alias=alias, reason=reason)
    previous = moved["previous"]
    log.info("%s: %s@%s now version %s (was %s)", action, model_name, alias, moved["version"], previous)
    create_markdown_artifact(
        key="lmforge-promote",
        markdown="\n".join(
            [
                f"## {action}: `{model_name}@{alias}` -> version {moved['version']}",
                "",
                f"- previous holder: {previous if previous is not None else 'none'}",
                f"- at: {moved['at']}",
                f"- reason: {reason or '-'}",
                f"- URI: `{moved['model_uri']}`",
                f"- recorded as model-version tags `lmforge.{alias}.*`",
            ]
        ),
        description=f"{model_name}@{alias}: {previous} -> {moved['version']} ({action})",
    )
    return moved


if __name__ == "__main__":
    lmforge_promote()
