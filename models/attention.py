"""Attention modules for the ResNet attention slot: SE, ECA, FCA (multi-spectral DCT attention), CBAM, the
GC block and GSoP.

SE, ECA, FCA and GSoP produce per-channel weights in (0, 1) that rescale the block's residual branch
(``x * att``), placed after the branch's last BN and before the residual add (FcaNet paper Sec. 3.3).
SE and FCA share one excitation head (``fc``: C -> C/r -> C, ``bias=False``, ReLU, sigmoid, Eq. 8);
they differ only in how a channel is squeezed to a scalar: SE by global average pooling, FCA by
projecting each channel onto a 2D DCT basis image (Eq. 7). ECA replaces the head by a 1D convolution
across channels; GSoP squeezes by a covariance matrix (second-order pooling). CBAM adds a spatial gate after
its channel gate, and the GC block adds a context vector to the features instead of rescaling them.

State-dict keys of SE/FCA follow the authors' release: ``att.fc.0.weight`` (C/r x C), ``att.fc.2.weight``
(C x C/r) and the DCT filter buffer ``att.dct_layer.weight`` of shape (C, dct_h, dct_w). The GC block uses the
key names of the official GCNet ``ContextBlock``; other releases' layouts are mapped in ``models.weights``.
"""
from __future__ import annotations

import math
from typing import Literal
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .dct import GRID, Frequency, dct_filters, scale_frequencies


def bottleneck_mlp(channels: int, reduction: int = 16, bias: bool = False) -> nn.Sequential:
    """C -> C/r -> C: ``Linear``, ReLU, ``Linear`` (indices 0 and 2 hold the weights), (N, C) -> (N, C) logits.

    The hidden width is ``max(1, C // reduction)`` so tiny demo models work.
    """
    if isinstance(reduction, bool) or not isinstance(reduction, int) or reduction < 1:
        raise ValueError(f"attention reduction must be an integer >= 1, got {reduction!r}")
    hidden = max(1, channels // reduction)
    return nn.Sequential(nn.Linear(channels, hidden, bias=bias), nn.ReLU(inplace=True),
                         nn.Linear(hidden, channels, bias=bias))


def excitation_head(channels: int, reduction: int = 16) -> nn.Sequential:
    """The shared excitation MLP of SE and FCA: (N, C) -> (N, C) weights in (0, 1).

    Indices 0 and 2 hold the two ``Linear(bias=False)`` layers, matching the key layout of the
    authors' checkpoints.
    """
    return nn.Sequential(*bottleneck_mlp(channels, reduction), nn.Sigmoid())


class ResidualAttention(nn.Module):
    """An attention module that can fuse the block's residual add: ``forward(x, residual)`` returns
    ``att(x) + residual`` (the block's sum before its ReLU) and ``forward(x)`` returns ``att(x)``."""

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError  # pragma: no cover - abstract

    def init_weights(self) -> None:
        """Module-specific initialisation, applied by ``ResNet`` after its generic one (Kaiming convs, BN 1/0).
        Default: none."""


class ChannelAttention(ResidualAttention):
    """Base of SE, ECA, FCA and GSoP: per-channel weights ``scale(x)`` (N, C, 1, 1) in (0, 1) that rescale ``x``.

    ``forward(x)`` returns ``x * scale(x)``. Blocks pass their shortcut as ``residual`` to get
    ``x * scale(x) + residual`` from one ``addcmul``: the rescaling rides on the residual add (paper Sec. 3.3
    places attention right before it), so eager mode makes no separate pass over the (N, C, H, W) map for
    it, and the block's in-place ReLU follows on the same buffer.
    """

    def scale(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        s = self.scale(x)  # (N, C, 1, 1), x.dtype
        return x * s if residual is None else torch.addcmul(residual, x, s)


def attend_add(att: nn.Module, out: torch.Tensor, identity: torch.Tensor) -> torch.Tensor:
    """``att(out) + identity``, the block's residual sum before its ReLU (paper Sec. 3.3).

    Attention modules take the shortcut as ``residual`` and fuse the add (channel attention returns
    ``out * scale + identity`` from one ``addcmul``: one pass over the (N, C, H, W) map instead of a product and
    a sum); any other module (``nn.Identity`` for plain ResNets) is applied and added.
    """
    if isinstance(att, ResidualAttention):
        return att(out, identity)
    return att(out) + identity


class _SqueezeExcite(ChannelAttention):
    """``scale(x) = fc(squeeze(x))``; subclasses define ``squeeze`` (N, C, H, W) -> (N, C)."""

    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        self.channels = channels
        self.fc = excitation_head(channels, reduction)

    def squeeze(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def scale(self, x: torch.Tensor) -> torch.Tensor:
        n, c = x.shape[:2]
        return self.fc(self.squeeze(x)).view(n, c, 1, 1).to(x.dtype)


class SE(_SqueezeExcite):
    """Squeeze-and-Excitation (Hu et al., CVPR 2018) with bias-free FCs, as in the FcaNet paper's Table 2.

    Args:
        channels: number of input channels C.
        reduction: excitation bottleneck ratio r (hidden width C // r).
    """

    def squeeze(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3))


class DCTPooling(nn.Module):
    """Multi-spectral pooling (paper Eq. 7): channel c is projected on the DCT basis of its group.

    The C channels are split into k equal consecutive groups; group i uses frequency ``freqs[i]``.
    ``weight`` (C, dct_h, dct_w) holds the per-channel filters exactly as in the authors' checkpoints.

    Three formulations of the same numbers, picked per call (why: docs/design.md, "DCT pooling"): on CPU in
    eager mode with fixed bases, a matrix product that reads x once (:class:`_GroupDCTProject`); on CUDA in
    eager mode, Fig. 3's ``sum(x * weight, (2, 3))``; under ``torch.compile``, the same Fig. 3 expression,
    which the compiler fuses into one reduction over x.

    Args:
        channels: number of channels C (must be divisible by ``len(freqs)``).
        dct_h, dct_w: DCT size; inputs of another spatial size are adaptively average-pooled to it.
        freqs: frequencies (u, v) in the ``grid x grid`` selection space; scaled by ``dct_h // grid`` and
            ``dct_w // grid``.
        weights: ``fixed`` (a buffer, as in the paper) or ``learnable`` (an ``nn.Parameter``).
        init: ``dct`` (the DCT basis) or ``random`` (the authors' FAQ ablation; N(0, 1/(HW)) filters).
        grid: size S of the frequency selection grid (7 in the paper).
    """

    def __init__(self, channels: int, dct_h: int, dct_w: int, freqs: Sequence[Frequency],
                 weights: Literal["fixed", "learnable"] = "fixed", init: Literal["dct", "random"] = "dct",
                 grid: int = GRID):
        super().__init__()
        k = len(freqs)
        if k < 1:
            raise ValueError("FCA needs at least one frequency")
        if channels % k:
            raise ValueError(f"FCA: {channels} channels cannot be split into k={k} equal frequency groups "
                             f"(k must divide the channel count)")
        if weights not in ("fixed", "learnable"):
            raise ValueError(f"unknown dct_weights {weights!r}; expected 'fixed' or 'learnable'")
        if init not in ("dct", "random"):
            raise ValueError(f"unknown dct_init {init!r}; expected 'dct' or 'random'")
        self.dct_h, self.dct_w, self.k = dct_h, dct_w, k
        self.freqs = [tuple(f) for f in freqs]
        scaled = scale_frequencies(self.freqs, dct_h, dct_w, grid)
        try:
            basis = dct_filters(dct_h, dct_w, scaled).float()  # (k, H, W)
        except ValueError as e:
            raise ValueError(f"FCA with a {dct_h}x{dct_w} DCT: {e}") from None
        if init == "dct":
            filt = basis.repeat_interleave(channels // k, dim=0)  # (C, H, W), group i -> freqs[i]
        else:
            gen = torch.Generator().manual_seed(0)
            filt = torch.randn(channels, dct_h, dct_w, generator=gen) / math.sqrt(dct_h * dct_w)
        # Group-shared bases allow the fast path; random/learnable filters are per-channel.
        self.shared = weights == "fixed" and init == "dct"
        if weights == "learnable":
            self.weight = nn.Parameter(filt)
        else:
            self.register_buffer("weight", filt)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, C)."""
        n, c, h, w = x.shape
        if (h, w) != (self.dct_h, self.dct_w):
            x = F.adaptive_avg_pool2d(x, (self.dct_h, self.dct_w))
            h, w = self.dct_h, self.dct_w
        if x.device.type != "cpu" or torch.compiler.is_compiling():
            # Fig. 3 (Eq. 7 verbatim): (N, C, H, W) * (C, H, W) summed over H, W. The weight is cast to x's
            # dtype: under autocast x is bf16/fp16 while the buffer is fp32, and a promoted fp32 product would
            # double the bytes moved. The reduction accumulates in fp32 on CUDA and in inductor's kernels.
            return torch.sum(x * self.weight.to(x.dtype), dim=(2, 3))
        hw, k = h * w, self.k
        weight = self.weight.to(x.dtype) if not torch.is_autocast_enabled(x.device.type) else self.weight
        if not self.shared:
            # y[n, c] = <x[n, c], w[c]>: batch over channels, (C, N, HW) @ (C, HW, 1).
            y = torch.bmm(x.reshape(n, c, hw).transpose(0, 1), weight.reshape(c, hw, 1))
            return y.reshape(c, n).t()
        basis = weight[:: c // k].reshape(k, hw)  # one row per group (a strided view)
        return _GroupDCTProject.apply(x, basis)


class _GroupDCTProject(torch.autograd.Function):
    """y[n, g*C/k + j] = <x[n, g*C/k + j], basis[g]> for fixed (non-trainable) bases.

    Forward is a matrix product that reads x once. Backward writes the input gradient with one broadcast
    product, ``grad_y[n, c] * basis[group(c)]``, in x's memory layout. Only x (saved by the caller's
    ``x * weights`` anyway, so no extra memory) and the (k, HW) bases are kept for backward: letting
    autograd differentiate ``torch.matmul`` would also save the per-sample copy of the bases that the
    broadcasting matmul makes, which would cost more activation memory than the Fig. 3 formulation.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        k, hw = basis.shape
        basis = basis.to(x.dtype)
        ctx.save_for_backward(basis)
        ctx.shape = (n, c, h, w)
        ctx.channels_last = not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
        if ctx.channels_last:
            xs = x.permute(0, 2, 3, 1).reshape(n, hw, c)  # a view for channels_last
            z = torch.bmm(basis.unsqueeze(0).expand(n, k, hw), xs)  # (N, k, C): every basis x every channel
            # z (N, k, C) -> (N, k_basis, k_group, C/k); keep basis == group: diagonal -> (N, C/k, k)
            # -> (N, k, C/k) -> (N, C), channel g*C/k + j projected on basis g.
            return z.view(n, k, k, c // k).diagonal(dim1=1, dim2=2).transpose(1, 2).reshape(n, c)
        # (N, k, C/k, HW) @ (k, HW, 1): one GEMV per (sample, group); a view of x when contiguous.
        return torch.matmul(x.reshape(n, k, c // k, hw), basis.view(k, hw, 1)).reshape(n, c)

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        (basis,) = ctx.saved_tensors
        n, c, h, w = ctx.shape
        k, hw = basis.shape
        grad_y = grad_y.to(basis.dtype)
        if ctx.channels_last:  # build the gradient directly in NHWC memory order
            g = grad_y.new_empty(n, hw, k, c // k)
            torch.mul(grad_y.reshape(n, 1, k, c // k), basis.t().reshape(1, hw, k, 1), out=g)
            return g.reshape(n, h, w, c).permute(0, 3, 1, 2), None
        g = grad_y.new_empty(n, k, c // k, hw)
        torch.mul(grad_y.reshape(n, k, c // k, 1), basis.view(1, k, 1, hw), out=g)
        return g.reshape(n, c, h, w), None


class FCA(_SqueezeExcite):
    """Multi-spectral channel attention (FcaNet, Eq. 7-8): DCT pooling followed by the excitation head.

    Args:
        channels: number of channels C.
        dct_h, dct_w: DCT size (56/28/14/7 for the four ResNet stages at 224x224 input).
        freqs: frequencies in the ``grid x grid`` space; k = len(freqs) must divide C.
        reduction: excitation bottleneck ratio r.
        dct_weights: ``fixed`` (paper) or ``learnable``.
        dct_init: ``dct`` (paper) or ``random``.
        grid: size S of the frequency selection grid (7 in the paper).
    """

    def __init__(self, channels: int, dct_h: int, dct_w: int, freqs: Sequence[Frequency], reduction: int = 16,
                 dct_weights: Literal["fixed", "learnable"] = "fixed", dct_init: Literal["dct", "random"] = "dct",
                 grid: int = GRID):
        super().__init__(channels, reduction)
        self.dct_layer = DCTPooling(channels, dct_h, dct_w, freqs, dct_weights, dct_init, grid)

    def squeeze(self, x: torch.Tensor) -> torch.Tensor:
        return self.dct_layer(x)


def eca_kernel_size(channels: int, gamma: int = 2, b: int = 1) -> int:
    """ECA-Net's adaptive kernel size: the odd number nearest above |(log2 C + b) / gamma|."""
    t = int(abs((math.log2(channels) + b) / gamma))
    return t if t % 2 else t + 1


class ECA(ChannelAttention):
    """Efficient Channel Attention (Wang et al., CVPR 2020): GAP, a 1D conv across channels, sigmoid.

    Args:
        channels: number of channels C (only used for the adaptive kernel size).
        kernel_size: odd 1D kernel size; ``None`` uses the adaptive formula of the ECA paper.
    """

    def __init__(self, channels: int, kernel_size: int | None = None):
        super().__init__()
        k = eca_kernel_size(channels) if kernel_size is None else int(kernel_size)
        if k < 1 or k % 2 == 0:
            raise ValueError(f"ECA kernel size must be a positive odd number, got {k}")
        self.conv = nn.Conv1d(1, 1, kernel_size=k, padding=(k - 1) // 2, bias=False)

    def scale(self, x: torch.Tensor) -> torch.Tensor:
        n, c = x.shape[:2]
        y = self.conv(x.mean(dim=(2, 3)).view(n, 1, c))  # (N, 1, C): neighbouring channels interact
        return torch.sigmoid(y).view(n, c, 1, 1).to(x.dtype)


# ------------------------------------------------------------------------------------------------ CBAM
class CBAMChannelGate(nn.Module):
    """CBAM's channel gate (Woo et al., ECCV 2018, Eq. 2): ``sigmoid(MLP(avgpool(x)) + MLP(maxpool(x)))``.

    ``fc`` is one C -> C/r -> C MLP shared by both pooled vectors. ``bias=False`` gives the parameter count the
    FcaNet paper's Table 2 prints for CBAM (28.07M at ResNet-50); the official release has biases (28.09M).
    """

    def __init__(self, channels: int, reduction: int = 16, bias: bool = False):
        super().__init__()
        self.fc = bottleneck_mlp(channels, reduction, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> channel weights (N, C, 1, 1) in (0, 1)."""
        n, c = x.shape[:2]
        pooled = torch.stack((x.mean(dim=(2, 3)), x.amax(dim=(2, 3))))  # (2, N, C): one MLP call for both
        return torch.sigmoid(self.fc(pooled).sum(0)).view(n, c, 1, 1).to(x.dtype)


class CBAMSpatialGate(nn.Module):
    """CBAM's spatial gate (Eq. 3): ``sigmoid(BN(conv_kxk([max_c(x); mean_c(x)])))``.

    The channel-wise max and mean maps are stacked in that order (max first), as the official code does (the
    paper writes the mean first); the BN has the official momentum 0.01.
    """

    def __init__(self, kernel_size: int = 7):
        super().__init__()
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"CBAM spatial kernel size must be a positive odd number, got {kernel_size}")
        self.conv = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2, bias=False)
        self.bn = nn.BatchNorm2d(1, momentum=0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> spatial weights (N, 1, H, W) in (0, 1)."""
        pooled = torch.cat((x.amax(dim=1, keepdim=True), x.mean(dim=1, keepdim=True)), dim=1)  # (N, 2, H, W)
        return torch.sigmoid(self.bn(self.conv(pooled)))


class CBAM(ResidualAttention):
    """Convolutional Block Attention Module (Woo et al., ECCV 2018): channel gate, then spatial gate.

    ``y = x * channel(x)``; ``out = y * spatial(y)``, placed like SE after the block's last BN, before the
    residual add (as in the official ResNet).

    Args:
        channels: number of channels C.
        reduction: MLP bottleneck ratio r (hidden width C // r).
        mlp_bias: biases in the channel MLP (official code: yes; FcaNet Table 2's parameter count: no).
        kernel_size: spatial gate's convolution size (7 in the paper).
    """

    def __init__(self, channels: int, reduction: int = 16, mlp_bias: bool = False, kernel_size: int = 7):
        super().__init__()
        self.channel = CBAMChannelGate(channels, reduction, mlp_bias)
        self.spatial = CBAMSpatialGate(kernel_size)

    def init_weights(self) -> None:
        # The official ResNet zero-initialises the spatial gate's BN scale: the gate starts at sigmoid(0) = 0.5
        # everywhere and learns its spatial pattern from there.
        nn.init.zeros_(self.spatial.bn.weight)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        y = x * self.channel(x)
        s = self.spatial(y).to(x.dtype)  # (N, 1, H, W)
        return y * s if residual is None else torch.addcmul(residual, y, s)


# --------------------------------------------------------------------------------------------- GC block
def spatial_weighted_sum(x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``sum_p x[n, :, p] * weights[n, p]``: (N, C, H, W), (N, H*W) -> (N, C), as one batched matrix product on
    a view of ``x`` in either memory layout (no N x C x H x W temporary)."""
    n, c, h, w = x.shape
    weights = weights.to(x.dtype)
    if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        xs = x.permute(0, 2, 3, 1).reshape(n, h * w, c)  # a view for channels_last
        return torch.bmm(weights.view(n, 1, h * w), xs).view(n, c)
    return torch.bmm(x.reshape(n, c, h * w), weights.view(n, h * w, 1)).view(n, c)


class PointwiseConv(nn.Conv2d):
    """A 1x1, stride-1, ungrouped ``nn.Conv2d`` (same parameters, keys and initialisation) computed as a matrix
    product over the channels on a view of the input, in either memory layout.

    Used for GC's C -> 1 attention mask, where oneDNN's convolution is slow on CPU in forward + backward (one
    output channel; times in docs/models.md). Same numbers as ``nn.Conv2d`` up to float rounding.
    """

    def __init__(self, in_channels: int, out_channels: int, bias: bool = True):
        super().__init__(in_channels, out_channels, 1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        weight = self.weight.view(self.out_channels, c).to(x.dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
            y = F.linear(x.permute(0, 2, 3, 1), weight, bias)  # (N, H, W, O) from the NHWC view
            return y.permute(0, 3, 1, 2)  # (N, O, H, W), channels_last strides
        y = torch.matmul(weight, x.reshape(n, c, h * w))  # (N, O, HW)
        if bias is not None:
            y = y + bias.view(1, -1, 1)
        return y.view(n, self.out_channels, h, w)


class GlobalContext(ResidualAttention):
    """Global context (GC) block (Cao et al., GCNet, ICCVW 2019) with attention pooling and "add" fusion, the
    form of GCNet's ImageNet ResNet-50.

    ``context = sum_p softmax_p(conv_mask(x)) x_p`` (N, C); ``out = x + channel_add_conv(context)``:
    1x1 conv C -> C/r, LayerNorm, ReLU, 1x1 conv C/r -> C, broadcast over the map. Key names follow the
    official ``ContextBlock`` (``conv_mask``, ``channel_add_conv.{0,1,3}``).

    Args:
        channels: number of channels C.
        reduction: bottleneck ratio r (GCNet's ratio 1/16 is r = 16).
    """

    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        if isinstance(reduction, bool) or not isinstance(reduction, int) or reduction < 1:
            raise ValueError(f"attention reduction must be an integer >= 1, got {reduction!r}")
        planes = max(1, channels // reduction)
        self.conv_mask = PointwiseConv(channels, 1)
        self.channel_add_conv = nn.Sequential(nn.Conv2d(channels, planes, 1), nn.LayerNorm([planes, 1, 1]),
                                              nn.ReLU(inplace=True), nn.Conv2d(planes, channels, 1))

    def init_weights(self) -> None:
        # As the official ContextBlock: Kaiming (fan_in) attention mask, zero biases, and a zero last conv, so
        # each block starts as the identity (its residual branch unchanged).
        nn.init.kaiming_normal_(self.conv_mask.weight, mode="fan_in", nonlinearity="relu")
        nn.init.zeros_(self.conv_mask.bias)
        nn.init.zeros_(self.channel_add_conv[0].bias)
        nn.init.zeros_(self.channel_add_conv[3].weight)
        nn.init.zeros_(self.channel_add_conv[3].bias)

    def context(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, C, 1, 1): the map pooled with a softmax attention over its H*W positions."""
        n, c, h, w = x.shape
        mask = torch.softmax(self.conv_mask(x).reshape(n, h * w).float(), dim=1)  # (N, HW), in fp32
        return spatial_weighted_sum(x, mask).view(n, c, 1, 1)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        term = self.channel_add_conv(self.context(x)).to(x.dtype)  # (N, C, 1, 1)
        return x + term if residual is None else (x + residual).add_(term)


# ------------------------------------------------------------------------------------------------- GSoP
def covariance(z: torch.Tensor) -> torch.Tensor:
    """Covariance of the channels over positions: (N, d, H, W) -> (N, d, d), ``Zc Zc^T / M`` with M = H*W and
    ``Zc`` centred per channel (the official ``X I_hat X^T``, I_hat = (I - 11^T / M) / M, without the M x M
    matrix). Computed in fp32 even under autocast: a sum of M products per entry."""
    n, d = z.shape[:2]
    with torch.autocast(z.device.type, enabled=False):
        zf = z.reshape(n, d, -1).float()
        zc = zf - zf.mean(dim=2, keepdim=True)
        return torch.bmm(zc, zc.transpose(1, 2)) / zf.shape[2]


class GSoP(ChannelAttention):
    """Global second-order pooling block, channel mode (GSoP-Net1; Gao et al., CVPR 2019).

    ReLU, 1x1 conv C -> d (+ BN, ReLU), the d x d covariance over positions, BN, a row-wise convolution (each
    row of the covariance -> 4 values: a grouped conv with a d x 1 kernel, (N, d, d, 1) -> (N, 4d, 1, 1)),
    a 1x1 conv 4d -> C and a sigmoid: per-channel weights that rescale ``x``.

    Args:
        channels: number of channels C.
        dim: d, the width the covariance is computed at (128 in the paper).
        reduce_stride: stride of the 1x1 reduction (the official code uses 2 in the first stage, whose map is
            56x56 at 224 px, and 1 elsewhere).
    """

    def __init__(self, channels: int, dim: int = 128, reduce_stride: int = 1):
        super().__init__()
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"GSoP dim must be a positive integer, got {dim!r}")
        self.relu_in = nn.ReLU()  # not in place: x itself is rescaled
        self.reduce = nn.Conv2d(channels, dim, 1, stride=reduce_stride)
        self.reduce_bn = nn.BatchNorm2d(dim)
        self.relu = nn.ReLU(inplace=True)
        self.row_bn = nn.BatchNorm2d(dim)
        self.row_conv = nn.Conv2d(dim, 4 * dim, (dim, 1), groups=dim)
        self.fc = nn.Conv2d(4 * dim, channels, 1)

    def scale(self, x: torch.Tensor) -> torch.Tensor:
        z = self.relu(self.reduce_bn(self.reduce(self.relu_in(x))))  # (N, d, H', W')
        cov = covariance(z).unsqueeze(3)  # (N, d, d, 1): channel i of the BN/conv = row i
        y = self.row_conv(self.row_bn(cov))  # (N, 4d, 1, 1)
        return torch.sigmoid(self.fc(y)).to(x.dtype)  # (N, C, 1, 1)
