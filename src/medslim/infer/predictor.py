"""medslim's fast nnU-Net inference: nnU-Net's preprocessing and export around a network
runtime of choice and the streamed sliding window.

What stays nnU-Net's: ``preprocessor.run_case`` (crop to nonzero, normalisation, resampling
to the plans' spacing), the tiles and Gaussian, resampling of the logits back to the cropped
input grid (``resampling_fn_probabilities``, one class channel at a time), reverting the crop
and transpose, and the plans' image writer (so ``NibabelIOWithReorient`` reorients back).
What changes: the network runs on the chosen backend, tiles accumulate in float32, and when
the plans' spacing equals the image's (TotalSegmentator resamples to 3 mm itself) the argmax
is taken slab by slab, so the full ``K``-class logits volume is never held.

Region-based models (sigmoid outputs) and cascades are left to nnU-Net's own predictor.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from medslim.errors import MedslimError
from medslim.infer.backends import PatchRunner, RuntimeOptions, resolve_backend
from medslim.infer.head import class_logits, head_from_state_dict, trunk
from medslim.infer.sliding_window import Timer, argmax_volume, mirrored, output_volume


@dataclass
class Predictor:
    """A loaded model ready to segment: nnU-Net's plans objects + a patch runner."""

    model: Any  # medslim.load.NnUNetModel
    backend: str
    run: PatchRunner
    plans_manager: Any
    configuration: Any
    label_manager: Any
    head: tuple[np.ndarray, np.ndarray] | None = None
    onnx_path: Path | None = None
    step: float = 0.5
    setup_seconds: dict[str, float] = field(default_factory=dict)

    @property
    def patch(self) -> list[int]:
        return list(self.configuration.patch_size)

    @property
    def channels(self) -> int:
        """Channels the runner outputs: the head's input features, or the class logits."""
        return self.label_manager.num_segmentation_heads if self.head is None else self.head[0].shape[1]


def load_predictor(model_dir: str | Path, fold: str = "0", checkpoint_name: str = "checkpoint_final.pth",
                   backend: str = "auto", device: str = "cpu", mirroring: bool = True,
                   options: RuntimeOptions | None = None, model=None) -> Predictor:
    """Load a results folder (original or compressed) for ``segment_files``.

    ``mirroring`` uses the checkpoint's test-time mirroring axes (as ``nnUNetv2_predict``);
    ``model`` is an already loaded ``NnUNetModel`` of that folder (saves reading it twice).

    Raises:
        MedslimError: see ``load_results_folder`` and ``resolve_backend``; a region-based or
            cascaded model (use nnU-Net's predictor: ``--backend nnunet``).
    """
    from medslim.load import load_results_folder

    options = options or RuntimeOptions()
    timer = Timer()
    with timer("plans"):
        model = model or load_results_folder(model_dir, fold, checkpoint_name)
        plans_manager, configuration, label_manager = nnunet_plans(model)
    if label_manager.has_regions:
        raise MedslimError(f"{model.folder} is a region-based model; run it with --backend nnunet")
    if configuration.previous_stage_name is not None:
        raise MedslimError(f"{model.folder} is a cascade stage; run it with --backend nnunet")
    name = resolve_backend(backend, device)
    head = head_from_state_dict(model.checkpoint["network_weights"])
    network = (lambda: trunk(model.build_network())) if head is not None else model.build_network
    onnx_path = None
    if name != "torch":
        with timer("onnx_export"):
            onnx_path = onnx_file(model, network, trunk_only=head is not None)
    channels = model.num_classes if head is None else head[0].shape[1]
    with timer("compile"):
        try:
            run = _runner(model, network, name, device, options, onnx_path, channels)
        except Exception:  # a damaged cache file (e.g. a killed export on an old version): export again, once
            if onnx_path is None:
                raise
            onnx_path.unlink(missing_ok=True)
            onnx_path = onnx_file(model, network, trunk_only=head is not None)
            run = _runner(model, network, name, device, options, onnx_path, channels)
    axes = model.checkpoint.get("inference_allowed_mirroring_axes") if mirroring else None
    return Predictor(model, name, mirrored(run, axes), plans_manager, configuration, label_manager, head=head,
                     onnx_path=onnx_path, setup_seconds=timer.seconds)


def nnunet_plans(model) -> tuple[Any, Any, Any]:
    """nnU-Net's ``(PlansManager, ConfigurationManager, LabelManager)`` of a loaded results folder."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    plans_manager = PlansManager(model.plans)
    return (plans_manager, plans_manager.get_configuration(model.configuration_name),
            plans_manager.get_label_manager(model.dataset_json))


def preprocess_case(image_files: Sequence[str], plans_manager, configuration,
                    dataset_json: dict) -> tuple[np.ndarray, dict]:
    """nnU-Net's preprocessing of one case (``preprocessor.run_case``: crop to nonzero,
    normalisation, resampling to the plans' spacing): float32 ``[C, *shape]`` and its properties.

    Raises:
        MedslimError: a file nnU-Net's reader cannot read.
    """
    preprocessor = configuration.preprocessor_class(verbose=False)
    try:
        data, _, props = preprocessor.run_case(list(image_files), None, plans_manager, configuration, dataset_json)
    except Exception as e:  # the readers raise many types for truncated or foreign files
        raise MedslimError(f"cannot read {', '.join(map(str, image_files))}: {type(e).__name__}: "
                           f"{str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}") from e
    return np.ascontiguousarray(data, np.float32), props


def onnx_file(model, network=None, trunk_only: bool = False) -> Path:
    """The ONNX export of ``network()`` (default: the whole model), from the cache or
    exported now (``medslim.infer.onnx_export``)."""
    from medslim.infer.onnx_export import cached_onnx, model_key

    key = model_key(model.checkpoint_path, {"architecture": model.architecture, "trunk_only": trunk_only},
                    model.num_input_channels)
    return cached_onnx(network or model.build_network, lambda: _export_example(model), key)[0]


def _runner(model, network, backend: str, device: str, options: RuntimeOptions, onnx_path: Path | None,
            channels: int) -> PatchRunner:
    from medslim.infer import backends

    patch_shape = [1, model.num_input_channels, *model.patch_size]
    if backend == "torch":
        import torch

        if options.threads:
            torch.set_num_threads(options.threads)
        return backends.torch_runner(network(), device)
    return backends.exported_runner(backend, onnx_path, patch_shape, channels, options)


def _export_example(model):
    from medslim.prune import example_input

    net = model.build_network(load_weights=False)
    return example_input(net, model.num_input_channels, patch_size=model.patch_size)


def segment_files(predictor: Predictor, image_files: Sequence[str], output_file: str | Path,
                  timer: Timer | None = None) -> Path:
    """Segment one case (its channel files, ``<case>_0000.nii.gz`` …) into ``output_file``
    (with the dataset's file ending), as ``nnUNetv2_predict`` would write it."""
    from acvl_utils.cropping_and_padding.bounding_boxes import insert_crop_into_image

    timer = timer or Timer()
    p = predictor
    with timer("preprocess"):
        data, props = preprocess_case(image_files, p.plans_manager, p.configuration, p.model.dataset_json)
    target = [int(s) for s in props["shape_after_cropping_and_before_resampling"]]
    if list(data.shape[1:]) == target:
        seg = argmax_volume(data, p.run, p.patch, p.channels, p.step, timer, p.head)
    else:
        outputs = output_volume(data, p.run, p.patch, p.channels, p.step, timer)
        with timer("resample"):
            seg = _resample_argmax(outputs, target, p, props)
        del outputs
    with timer("export"):
        dtype = np.uint8 if len(p.label_manager.foreground_labels) < 255 else np.uint16
        full = np.zeros(props["shape_before_cropping"], dtype)
        full = insert_crop_into_image(full, seg.astype(dtype, copy=False), props["bbox_used_for_cropping"])
        full = full.transpose(p.plans_manager.transpose_backward)
        out = Path(output_file)
        writer = p.plans_manager.image_reader_writer_class()
        writer.write_seg(full, str(out), props)
    return out


def _resample_argmax(outputs: np.ndarray, target: Sequence[int], p: Predictor, props: dict) -> np.ndarray:
    """nnU-Net's ``resampling_fn_probabilities`` applied one class at a time (its logits from
    the averaged features when the head is split off) with a running argmax: the same labels
    as resampling all channels at once, without the ``K``-channel float64 copy that needs."""
    pm, cfg = p.plans_manager, p.configuration
    spacing = [props["spacing"][i] for i in pm.transpose_forward]
    current = cfg.spacing if len(cfg.spacing) == len(target) else [spacing[0], *cfg.spacing]
    best = np.full(target, -np.inf, np.float32)
    seg = np.zeros(target, np.uint16)
    for k in range(p.label_manager.num_segmentation_heads):
        logits = class_logits(outputs, p.head, k)[None]
        channel = np.asarray(cfg.resampling_fn_probabilities(logits, target, current, spacing)[0], np.float32)
        better = channel > best
        best[better] = channel[better]
        seg[better] = k
    return seg


def case_files(images: str | Path, n_channels: int, file_ending: str = ".nii.gz") -> dict[str, list[str]]:
    """``{case: [channel files]}`` for an nnU-Net image folder (``<case>_XXXX<ending>``).

    Raises:
        MedslimError: a case without every channel.
    """
    images = Path(images)
    cases = sorted({f.name[: -len(file_ending) - 5] for f in images.glob(f"*_0000{file_ending}")})
    out: dict[str, list[str]] = {}
    for case in cases:
        files = [images / f"{case}_{c:04d}{file_ending}" for c in range(n_channels)]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise MedslimError(f"case {case} in {images} lacks channel file(s) {', '.join(missing)}")
        out[case] = [os.fspath(f) for f in files]
    return out
