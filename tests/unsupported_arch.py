"""A network medslim must refuse: a ``PlainConvUNet`` with a 2D convolution inside (test helper,
importable by ``pydoc.locate('unsupported_arch.MixedDimUNet')`` from the tests folder)."""
from dynamic_network_architectures.architectures.unet import PlainConvUNet
from torch import nn


class MixedDimUNet(PlainConvUNet):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        block = self.encoder.stages[1][0].convs[1]
        conv = block.conv
        block.conv = block.all_modules[0] = nn.Conv2d(conv.in_channels, conv.out_channels, 3, padding=1)
