"""The segmentation head, split off the network for inference.

nnU-Net's head is a 1×…×1 convolution (``decoder.seg_layers[-1]``: ``C`` features → ``K``
class logits) with nothing after it, and the sliding window only averages (Gaussian weights,
mirroring): both are linear, so averaging the ``C`` features and applying the head once per
voxel gives the same logits as averaging the ``K`` logits of every tile. For TotalSegmentator
(``K`` = 118, ``C`` = 32, or 16 once outer channels are pruned) the runtime then writes a
4–7× smaller output per tile, the window buffers shrink alike, and the head runs once per
voxel instead of once per overlapping tile.
"""
from __future__ import annotations

import copy
import re
from typing import Mapping

import numpy as np
import torch
from torch import nn

_HEAD_KEY = re.compile(r"^decoder\.seg_layers\.(\d+)\.weight$")


def head_from_state_dict(state: Mapping[str, torch.Tensor]) -> tuple[np.ndarray, np.ndarray] | None:
    """``(W [K, C], b [K])`` of the full-resolution head of an nnU-Net U-Net state dict, or
    ``None`` when there is none that is a biased 1×…×1 convolution."""
    heads = sorted((int(m.group(1)), k) for k in state if (m := _HEAD_KEY.match(k)))
    if not heads:
        return None
    key = heads[-1][1]
    weight, bias = state[key], state.get(key[: -len("weight")] + "bias")
    if bias is None or any(s != 1 for s in weight.shape[2:]):
        return None
    return (weight.reshape(weight.shape[0], weight.shape[1]).float().numpy().copy(), bias.float().numpy().copy())


def trunk(net: nn.Module) -> nn.Module:
    """A copy of ``net`` (deep supervision off) that outputs the head's input features
    ``[B, C, *patch]`` instead of logits."""
    out = copy.deepcopy(net)
    out.decoder.seg_layers[-1] = nn.Identity()
    return out


def apply_head(features: np.ndarray, head: tuple[np.ndarray, np.ndarray] | None,
               chunk_voxels: int = 1 << 12) -> np.ndarray:
    """Argmax of the class logits of ``features`` ``[C, *S]`` (or of ``features`` themselves
    when they are logits: ``head`` None), a chunk of voxels at a time: ``int64 [*S]``.

    Logits are computed voxel-major (``[chunk, K]``), so the argmax runs along contiguous
    rows: 3.5× faster than class-major on 118 classes, and small chunks stay in cache."""
    x = torch.from_numpy(np.ascontiguousarray(features))
    if head is None:
        return x.argmax(0).numpy()
    wt, b = torch.from_numpy(head[0]).T, torch.from_numpy(head[1])
    voxels = x.reshape(x.shape[0], -1).T  # [N, C], a strided view
    out = torch.empty(voxels.shape[0], dtype=torch.int64)
    for start in range(0, voxels.shape[0], chunk_voxels):
        stop = start + chunk_voxels
        out[start:stop] = torch.addmm(b, voxels[start:stop], wt).argmax(1)
    return out.reshape(x.shape[1:]).numpy()


def class_logits(features: np.ndarray, head: tuple[np.ndarray, np.ndarray] | None, k: int) -> np.ndarray:
    """Logits of class ``k`` ``[*S]`` from ``features`` ``[C, *S]`` (or logits when ``head`` is None)."""
    if head is None:
        return features[k]
    w, b = head
    return np.tensordot(w[k], features, axes=(0, 0)) + b[k]
