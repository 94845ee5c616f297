"""Read a settings file (JSON or YAML) that must hold one mapping; every failure is one
``MedslimError`` line naming the file."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def read_mapping(path: str | Path, what: str, fmt: str = "json") -> dict[str, Any]:
    """The mapping in ``path`` (``fmt`` ``json`` or ``yaml``); ``what`` names the file in errors
    (e.g. ``"MEDSLIM_CONFIG file"``).

    Raises:
        MedslimError: missing file, invalid syntax, or not a mapping.
    """
    from medslim.errors import MedslimError

    path = Path(path)
    if not path.is_file():
        raise MedslimError(f"{what} {path} does not exist")
    if fmt == "yaml":
        import yaml

        parse, errors = yaml.safe_load, (yaml.YAMLError,)
    else:
        parse, errors = json.loads, (json.JSONDecodeError,)
    try:
        data = parse(path.read_text())
    except errors as e:
        raise MedslimError(f"{what} {path} is not valid {fmt.upper()}: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise MedslimError(f"{what} {path} must hold a {'JSON object' if fmt == 'json' else 'mapping'}")
    return data
