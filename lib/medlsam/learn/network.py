"""The segmentation network: MONAI's DynUNet (nnU-Net's U-Net) or SegResNet, one sigmoid output per organ; with
``prior_residual`` it learns a correction of the few-shot prior's logit, so that it starts as the prior."""

from __future__ import annotations

import torch

from medlsam.learn.options import LearnError, LearnOptions

LEVELS = 5  # four down-samplings: a patch side must be a multiple of 16
PRIOR_EPS = 1e-3  # the prior is clamped to [eps, 1 - eps] before its logit


class PriorResidual(torch.nn.Module):
    """logit = network(x) + scale x logit(prior) + shift, per organ; the network's last layer starts at zero, so an
    untrained model gives the prior (uncalibrated) and every step learns only how to correct it."""

    def __init__(self, network: torch.nn.Module, organs: int):
        super().__init__()
        self.network = network
        self.scale = torch.nn.Parameter(torch.ones(organs))
        self.shift = torch.nn.Parameter(torch.zeros(organs))
        last = [m for m in network.modules() if isinstance(m, torch.nn.Conv3d)][-1]
        torch.nn.init.zeros_(last.weight)
        if last.bias is not None:
            torch.nn.init.zeros_(last.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = x[:, 1:].float().clamp(PRIOR_EPS, 1.0 - PRIOR_EPS)
        prior_logit = torch.log(p) - torch.log1p(-p)
        view = (1, -1, 1, 1, 1)
        return self.network(x) + prior_logit * self.scale.view(view) + self.shift.view(view)


def build_network(options: LearnOptions, in_channels: int, organs: int) -> torch.nn.Module:
    """The network the options name, ``in_channels`` in (CT + prior channels), one logit per organ out; wrapped in
    ``PriorResidual`` with ``options.prior_residual`` (and prior channels)."""
    network = _backbone(options, in_channels, organs)
    if options.prior_residual and options.prior_channels:
        if in_channels != organs + 1:
            raise LearnError(f"prior_residual needs one prior channel per organ: {in_channels} inputs, {organs} organs")
        return PriorResidual(network, organs)
    return network


def _backbone(options: LearnOptions, in_channels: int, organs: int) -> torch.nn.Module:
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
