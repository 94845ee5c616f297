"""Installed package versions for bundle metadata (light: no nnU-Net or MONAI import)."""
from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version


def package_versions(packages: tuple[str, ...]) -> dict[str, str]:
    """``{package: installed version}`` (``"unknown"`` if not installed)."""
    def installed(package: str) -> str:
        try:
            return version(package)
        except PackageNotFoundError:
            return "unknown"

    return {p: installed(p) for p in packages}
