"""The segmentation network: MONAI's DynUNet (nnU-Net's U-Net) or SegResNet, one sigmoid output per organ."""

from __future__ import annotations

import torch

from medlsam.learn.options import LearnError, LearnOptions

LEVELS = 5  # four down-samplings: a patch side must be a multiple of 16


def build_network(options: LearnOptions, in_channels: int, organs: int) -> torch.nn.Module:
    """The network the options name, ``in_channels`` in (CT + prior channels), one logit per organ out."""
    from monai.networks.nets import DynUNet, SegResNet

    f = options.filters
    if options.network == "dynunet":
        return DynUNet(
            spatial_dims=3,
            in_channels=in_channels,
            out_channels=organs,
            kernel_size=[3] * LEVELS,
            strides=[1] + [2] * (LEVELS - 1),
            upsample_kernel_size=[2] * (LEVELS - 1),
            filters=[f * min(2**i, 8) for i in range(LEVELS)],
            norm_name="instance",
            res_block=True,
        )
    if options.network == "segresnet":
        return SegResNet(
            spatial_dims=3, init_filters=f, in_channels=in_channels, out_channels=organs, blocks_down=(1, 2, 2, 4)
        )
    raise LearnError(f"unknown network {options.network!r}")
