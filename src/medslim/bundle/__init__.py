"""Compress MONAI bundles: ``compress_bundle`` reads a bundle whose ``network_def`` is one of
MONAI's ``UNet``, ``SegResNet``, ``DynUNet`` or ``BasicUNet`` and writes a new bundle whose
configs name ``CompressedNetwork`` (the original ``network_def`` + a compression spec).
(``medslim.export.bundle`` is the other direction: an nnU-Net results folder as a bundle.)
``workflows``: bundle configs that run medslim in ``monai.bundle run``; ``hippocampus`` and
``hippocampus_run``: the reference bundle (``scripts/train_reference_bundle.py``); ``bench``: the
compressed bundle against its control fine-tune (``scripts/bench_bundle.py``)."""
from medslim._lazy import lazy_exports

__getattr__, __dir__ = lazy_exports(__name__, {
    "CompressedNetwork": "network",
    "compress_bundle": "compress",
    "read_bundle": "source",
})
__all__ = ["CompressedNetwork", "compress_bundle", "read_bundle"]
