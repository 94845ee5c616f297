"""Editing a raw MONAI bundle config as data: set or delete ConfigParser ids
(``a#b#0``; :func:`apply_overrides`) and edit lists of ``_target_`` components (transforms,
handlers) by class name (:func:`edit_components`). Every change carries its reason
(``id → (value, why)``) so a bundle's docs can list them."""
from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from medslim.errors import MedslimError


class _Removed:
    def __repr__(self) -> str:
        return "(removed)"

    def __deepcopy__(self, memo: dict) -> _Removed:
        return self


REMOVED = _Removed()
"""An override value that deletes the id (or, as an edit, the component)."""

Overrides = Mapping[str, tuple[Any, str]]
Edits = Mapping[str, Mapping[str, tuple[Any, str]]]


def _resolve(config: dict[str, Any], id_: str, overlay: bool) -> tuple[Any, Any]:
    """``(container, key)`` of a ConfigParser id (``a#b#0``) in a raw config. A key that holds
    ``#`` itself (an overlay's flat id such as ``validate#postprocessing``) matches first; a new
    id needs an existing parent, except in an overlay, where it becomes a flat key."""
    node, parts = config, id_.split("#")
    while True:
        if isinstance(node, list):
            index = int(parts[0]) if parts[0].isdigit() else len(node)
            if index >= len(node):
                raise MedslimError(f"config id '{id_}': no item {parts[0]} in a list of {len(node)}")
            if len(parts) == 1:
                return node, index
            node, parts = node[index], parts[1:]
            continue
        if not isinstance(node, dict):
            raise MedslimError(f"config id '{id_}' goes below a value ({node!r})")
        whole = "#".join(parts)
        if whole in node or len(parts) == 1:
            return node, whole
        prefix = next((n for n in range(len(parts) - 1, 0, -1) if "#".join(parts[:n]) in node), None)
        if prefix is None:
            if overlay and node is config:
                return node, whole
            raise MedslimError(f"config id '{id_}': '{parts[0]}' is not in the source config")
        node, parts = node["#".join(parts[:prefix])], parts[prefix:]


def apply_overrides(config: dict[str, Any], overrides: Overrides, overlay: bool = False) -> dict[str, Any]:
    """A copy of ``config`` with each id set to its value (:data:`REMOVED` deletes it)."""
    out = copy.deepcopy(config)
    for id_, (value, _why) in overrides.items():
        node, key = _resolve(out, id_, overlay)
        if value is REMOVED:
            del node[key]
        else:
            node[key] = copy.deepcopy(value)
    return out


def edit_components(components: list[dict[str, Any]], edits: Mapping[str, tuple[Any, str]]) -> list[dict[str, Any]]:
    """Edit a list of ``_target_`` components (transforms, handlers) by class name:
    :data:`REMOVED` drops it; a dict with a ``_target_`` replaces it keeping its ``keys``; a
    dict without updates its arguments; a list replaces it by those components.

    Raises:
        MedslimError: an edited class is not in the list (the source config changed).
    """
    present = [c.get("_target_") for c in components]
    missing = sorted(set(edits) - set(present))
    if missing:
        raise MedslimError(f"no {', '.join(missing)} in the source list {present}; the source config changed")
    out: list[dict[str, Any]] = []
    for comp in components:
        if comp.get("_target_") not in edits:
            out.append(copy.deepcopy(comp))
            continue
        edit = copy.deepcopy(edits[comp["_target_"]][0])
        if edit is REMOVED:
            continue
        if isinstance(edit, list):
            out += edit
        elif "_target_" in edit:
            out.append({"_target_": edit.pop("_target_"), "keys": comp["keys"], **edit})
        else:
            out.append({**copy.deepcopy(comp), **edit})
    return out


def adapt(config: dict[str, Any], overrides: Overrides, edits: Edits, overlay: bool = False) -> dict[str, Any]:
    """``config`` with ``overrides`` applied, then the lists at the ids of ``edits`` edited."""
    out = apply_overrides(config, overrides, overlay)
    for list_id, list_edits in edits.items():
        node, key = _resolve(out, list_id, overlay)
        node[key] = edit_components(node[key], list_edits)
    return out
