"""Batch norm over the whole batch of a data-parallel run, on any device.

Under DistributedDataParallel each process sees its share of the batch; plain ``BatchNorm2d`` would normalise
with that share's statistics, so 2 processes x 1 image would train another model than 1 process x 2 images (and
MaSSFormer's BatchNorms after global pooling cannot train on one value per channel). torch's
``nn.SyncBatchNorm`` shares the statistics over the processes but runs on GPUs only; `AllReduceBatchNorm2d`
does the same with a differentiable all-reduce of the per-channel sums, so it also runs on the CPU (gloo).
`sync_batch_norm` converts a model: ``nn.SyncBatchNorm`` on CUDA, `AllReduceBatchNorm2d` elsewhere. The state
dict keys and values are those of ``BatchNorm2d``: checkpoints load into either.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class _AllReduceSum(torch.autograd.Function):
    """Sum over the processes; the gradient of every process's input is the sum of the gradients of the output
    over the processes (each process's loss depends on every process's input through the sum)."""

    @staticmethod
    def forward(ctx: Any, tensor: Tensor) -> Tensor:  # noqa: ARG004
        out = tensor.clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:  # noqa: ARG004
        out = grad.contiguous().clone()
        dist.all_reduce(out)
        return out


def all_reduce(tensor: Tensor) -> Tensor:
    """Differentiable sum of ``tensor`` over the processes of the default group."""
    return _AllReduceSum.apply(tensor)  # type: ignore[no-any-return]


class AllReduceBatchNorm2d(nn.BatchNorm2d):
    """``BatchNorm2d`` whose training statistics are those of the batch over all processes (one process: the
    plain layer). Eval mode uses the running statistics, as ``BatchNorm2d``."""

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or not self.track_running_stats or _world_size() == 1:
            return super().forward(x)
        c = x.shape[1]
        # two passes in float64, as torch's CPU batch norm: E[x^2] - E[x]^2 loses the small variances of
        # BatchNorms after global pooling (2 values per channel in a batch of 2)
        xd = x.double()
        first = all_reduce(torch.cat([
            xd.sum(dim=(0, 2, 3)),  # C
            torch.full((1,), x.numel() / c, dtype=torch.float64, device=x.device),  # 1: values per channel here
        ]))  # C + 1, summed over the processes (the backward sums the gradients back)
        count = first[-1]
        if float(count.detach()) <= 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got input size "
                             f"{list(x.shape)} on each of {_world_size()} processes.")
        mean = first[:c] / count  # C
        centred = xd - mean.view(1, c, 1, 1)  # B x C x H x W
        var = all_reduce((centred * centred).sum(dim=(0, 2, 3))) / count  # C, biased
        with torch.no_grad():
            assert self.running_mean is not None and self.running_var is not None
            assert self.num_batches_tracked is not None
            self.num_batches_tracked.add_(1)
            momentum = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
            unbiased = var * (count / (count - 1))
            self.running_mean.lerp_(mean.to(self.running_mean.dtype), momentum)
            self.running_var.lerp_(unbiased.to(self.running_var.dtype), momentum)
        shape = (1, c, 1, 1)
        y = (centred * torch.rsqrt(var + self.eps).view(shape)).to(x.dtype)  # B x C x H x W
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y


def sync_batch_norm(model: nn.Module, *, device: torch.device) -> nn.Module:
    """Replaces every ``BatchNorm2d`` of ``model`` (in place, parameters and buffers kept) by one that shares its
    statistics over the processes: ``nn.SyncBatchNorm`` on CUDA, `AllReduceBatchNorm2d` elsewhere (new layers
    on the CPU: convert before moving the model)."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for name, child in model.named_children():
        if type(child) is nn.BatchNorm2d:
            synced = AllReduceBatchNorm2d(child.num_features, eps=child.eps, momentum=child.momentum,
                                          affine=child.affine, track_running_stats=child.track_running_stats)
            synced.load_state_dict(child.state_dict())
            if child.affine:
                synced.weight.requires_grad_(child.weight.requires_grad)
                synced.bias.requires_grad_(child.bias.requires_grad)
            synced.train(child.training)
            setattr(model, name, synced)
        else:
            sync_batch_norm(child, device=device)
    return model
