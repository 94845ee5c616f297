"""An nnU-Net results folder (``plans.json``, ``dataset.json``, ``fold_N/checkpoint_*.pth``)."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from medslim.errors import MedslimError


@dataclass
class NnUNetModel:
    """A trained nnU-Net: its folder, plans, dataset.json and one fold's checkpoint."""

    folder: Path
    plans: dict[str, Any]
    dataset_json: dict[str, Any]
    fold: str
    checkpoint_path: Path
    checkpoint: dict[str, Any]

    @property
    def configuration_name(self) -> str:
        return self.checkpoint["init_args"]["configuration"]

    @property
    def configuration(self) -> dict[str, Any]:
        from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

        return PlansManager(self.plans).get_configuration(self.configuration_name).configuration

    @property
    def architecture(self) -> dict[str, Any]:
        return self.configuration["architecture"]

    @property
    def patch_size(self) -> list[int]:
        return list(self.configuration["patch_size"])

    @property
    def num_input_channels(self) -> int:
        from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
        from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

        pm = PlansManager(self.plans)
        return determine_num_input_channels(pm, pm.get_configuration(self.configuration_name), self.dataset_json)

    @property
    def num_classes(self) -> int:
        from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

        return PlansManager(self.plans).get_label_manager(self.dataset_json).num_segmentation_heads

    def build_network(self, deep_supervision: bool = False, load_weights: bool = True) -> nn.Module:
        """The network as nnU-Net builds it from the plans, with this fold's weights.
        Returns a module mapping ``[B, C_in, *patch]`` → ``[B, num_classes, *patch]``."""
        from medslim.network import build_base_network

        arch = self.architecture
        net = build_base_network(arch["network_class_name"], arch["arch_kwargs"], arch.get("_kw_requires_import", []),
                                 self.num_input_channels, self.num_classes, deep_supervision)
        if load_weights:
            try:
                net.load_state_dict(self.checkpoint["network_weights"])
            except RuntimeError as e:
                first = str(e).strip().splitlines()[1].strip() if len(str(e).splitlines()) > 1 else str(e)
                raise MedslimError(f"checkpoint {self.checkpoint_path} does not match the plans' architecture: {first}") from e
        return net.eval()


def check_finite_weights(weights: Any, source: str | Path) -> None:
    """Refuse a state dict with NaN or infinite values (they would flow into SVD and scoring).

    Raises:
        MedslimError: ``weights`` is not a mapping, or naming the first tensor with NaN/Inf
            values and how many of its values are bad.
    """
    if not isinstance(weights, Mapping):
        raise MedslimError(f"{source} is not an nnU-Net checkpoint ('network_weights' is a "
                           f"{type(weights).__name__}, not a state dict)")
    for name, t in weights.items():
        if isinstance(t, torch.Tensor) and (t.is_floating_point() or t.is_complex()) and not bool(torch.isfinite(t).all()):
            nan = int(torch.isnan(t).sum())
            inf = int((~torch.isfinite(t)).sum()) - nan
            kinds = " and ".join(k for k, n in (("NaN", nan), ("infinite", inf)) if n)
            raise MedslimError(f"checkpoint {source} has {kinds} values in '{name}' ({nan + inf} of {t.numel()}); "
                               f"the weights are corrupt or training diverged: use another checkpoint")


def _read_json(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        raise MedslimError(f"{path.parent} is not an nnU-Net results folder: {what} is missing")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MedslimError(f"{path} is not valid JSON ({e})") from e


def load_results_folder(folder: str | Path, fold: int | str = 0,
                        checkpoint_name: str = "checkpoint_final.pth") -> NnUNetModel:
    """Read an nnU-Net results folder (``Dataset.../Trainer__Plans__config``).

    Raises:
        MedslimError: missing folder / plans / dataset.json / fold / checkpoint, a checkpoint
            nnU-Net did not write, or plans without an ``architecture`` entry.
    """
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise MedslimError(f"model folder {folder} does not exist")
    plans = _read_json(folder / "plans.json", "plans.json")
    dataset_json = _read_json(folder / "dataset.json", "dataset.json")
    fold_dir = folder / f"fold_{fold}"
    ckpt_path = fold_dir / checkpoint_name
    if not ckpt_path.is_file():
        available = sorted(p.relative_to(folder).as_posix() for p in folder.glob("fold_*/checkpoint_*.pth"))
        hint = f"available: {', '.join(available)}" if available else "the folder has no fold_*/checkpoint_*.pth"
        raise MedslimError(f"no checkpoint {ckpt_path.relative_to(folder)} in {folder} ({hint})")
    try:
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    except Exception as e:  # torch raises many types for truncated/foreign files
        raise MedslimError(f"cannot read checkpoint {ckpt_path}: {type(e).__name__}: {str(e).splitlines()[0][:200]}") from e
    if not isinstance(ckpt, dict) or "network_weights" not in ckpt or "init_args" not in ckpt:
        raise MedslimError(f"{ckpt_path} is not an nnU-Net checkpoint (no 'network_weights'/'init_args')")
    check_finite_weights(ckpt["network_weights"], ckpt_path)
    model = NnUNetModel(folder, plans, dataset_json, str(fold), ckpt_path, ckpt)
    name = model.configuration_name
    if name not in plans.get("configurations", {}):
        raise MedslimError(f"plans.json of {folder} has no configuration '{name}' (the checkpoint's)")
    no_arch = (f"plans.json of {folder} has no 'architecture' (network_class_name + arch_kwargs) for "
               f"configuration '{name}'; re-plan with nnU-Net ≥ 2.4")
    try:
        arch = model.configuration.get("architecture")  # nnU-Net converts pre-2.4 plans (UNet_class_name)
    except (KeyError, RuntimeError) as e:
        raise MedslimError(no_arch) from e
    if not isinstance(arch, dict) or "network_class_name" not in arch or "arch_kwargs" not in arch:
        raise MedslimError(no_arch)
    return model


def load_model(model: str | Path, fold: int | str = 0, checkpoint_name: str = "checkpoint_final.pth") -> NnUNetModel:
    """A results folder path, or a TotalSegmentator task name such as ``total_fast``."""
    from medslim.load.totalseg import TOTALSEG_TASKS, resolve_totalseg_task

    if isinstance(model, str) and model in TOTALSEG_TASKS and not Path(model).exists():
        folder, ts_fold = resolve_totalseg_task(model)
        return load_results_folder(folder, ts_fold if fold in (0, "0") else fold, checkpoint_name)
    return load_results_folder(model, fold, checkpoint_name)
