"""The params a project's dvc.yaml names and its params file lacks.

DVC stops at the first stage whose param is missing, after the stages before it ran (and
deleted that stage's outputs), so `datm repro` refuses such a profile before DVC starts. The
project's own dvc.yaml decides: one that `datm init` wrote before a setting existed does not
name it, and its params need not have it.
"""

from __future__ import annotations

from pathlib import Path

import yaml


def lookup(raw: object, dotted: str) -> tuple[bool, object]:
    """(found, value) of `a.b.1` in nested mappings; a digit part also matches an int key."""
    node = raw
    for part in dotted.split("."):
        keys = [part, int(part)] if part.isdigit() else [part]
        hit = next((k for k in keys if isinstance(node, dict) and k in node), None)
        if hit is None:
            return False, None
        node = node[hit]
    return True, node


def missing(dvc_yaml: Path, raw: dict) -> list[str]:
    """The params the stages of `dvc_yaml` name (foreach items resolved from `raw`) that `raw`
    lacks, sorted."""
    lacking = []
    for stage in (yaml.safe_load(Path(dvc_yaml).read_text()) or {}).get("stages", {}).values():
        items: object = stage.get("foreach", [None])
        if isinstance(items, str):  # foreach: ${a.param}
            found, items = lookup(raw, items.strip("${}"))
            if not found:  # DVC cannot even list the stage
                lacking.append(stage["foreach"].strip("${}"))
                continue
        for name in stage.get("do", stage).get("params") or []:
            if not isinstance(name, str):
                continue  # a params file of its own: DVC reads it, not this one
            for item in items if isinstance(items, list) else [None]:
                if not lookup(raw, name.replace("${item}", str(item)))[0]:
                    lacking.append(name.replace("${item}", str(item)))
    return sorted(set(lacking))
