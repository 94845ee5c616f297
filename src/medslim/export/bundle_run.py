"""The loop a medslim bundle's ``run`` calls. MONAI's ``SupervisedEvaluator`` needs
pytorch-ignite, which is not a MONAI core dependency; this keeps bundles runnable with only
``medslim`` and ``monai`` installed."""
from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from monai.data import MetaTensor


def case_name(metadict: Mapping[str, Any], saver: Any = None) -> dict[str, Any]:
    """``SaveImaged`` name: ``<case>_0000.nii.gz`` → ``<case>`` (nnU-Net's convention)."""
    name = Path(str(metadict.get("filename_or_obj", "case"))).name
    for ext in (".nii.gz", ".nii"):
        name = name.removesuffix(ext)
    if len(name) > 5 and name[-5] == "_" and name[-4:].isdigit():
        name = name[:-5]
    return {"subject": name, "idx": None}


def run_inference(dataset: Iterable[dict[str, Any]], network: torch.nn.Module,
                  inferer: Callable[..., torch.Tensor], postprocessing: Callable[[dict[str, Any]], Any],
                  device: torch.device, backend: str = "auto") -> int:
    """Segment every item: image ``[C, *S]`` → logits ``[K, *S]`` → ``postprocessing`` (argmax,
    invert, save). ``backend``: the network's runtime (``medslim.infer.compiled``; ``auto`` =
    OpenVINO or ONNX Runtime on CPU when installed, PyTorch otherwise). Returns the number of
    cases."""
    from medslim.infer.compiled import compile_network

    network.eval()
    # SliceInferer (2D networks) turns its roi_size 3D when called; orig_roi_size is the patch
    roi = getattr(inferer, "orig_roi_size", getattr(inferer, "roi_size", None))
    n = 0
    with torch.no_grad():
        for item in dataset:
            image = item["image"][None].to(device)
            if n == 0 and roi is not None:
                network = compile_network(network, [1, image.shape[1], *roi], backend, device)
            logits = inferer(image, network)[0].cpu()
            postprocessing(dict(item, pred=MetaTensor(logits)))  # Invertd keeps meta only on MetaTensors
            n += 1
    return n
