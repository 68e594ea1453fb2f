"""Channel attention modules: SE, ECA and FCA (multi-spectral DCT attention).

All three produce per-channel weights in (0, 1) that rescale the block's residual branch
(``x * att``), placed after the branch's last BN and before the residual add (paper Sec. 3.3).
SE and FCA share one excitation head (``fc``: C -> C/r -> C, ``bias=False``, ReLU, sigmoid, Eq. 8);
they differ only in how a channel is squeezed to a scalar: SE by global average pooling, FCA by
projecting each channel onto a 2D DCT basis image (Eq. 7). ECA replaces the head by a 1D convolution
across channels.

State-dict keys follow the authors' release: ``att.fc.0.weight`` (C/r x C), ``att.fc.2.weight``
(C x C/r) and the DCT filter buffer ``att.dct_layer.weight`` of shape (C, dct_h, dct_w).
"""
from __future__ import annotations

import math
from typing import Literal, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .dct import GRID, Frequency, dct_filters, scale_frequencies


def excitation_head(channels: int, reduction: int = 16) -> nn.Sequential:
    """The shared excitation MLP of SE and FCA: (N, C) -> (N, C) weights in (0, 1).

    Indices 0 and 2 hold the two ``Linear(bias=False)`` layers, matching the key layout of the
    authors' checkpoints. The hidden width is ``max(1, C // reduction)`` so tiny demo models work.
    """
    if reduction < 1:
        raise ValueError(f"attention reduction must be >= 1, got {reduction}")
    hidden = max(1, channels // reduction)
    return nn.Sequential(nn.Linear(channels, hidden, bias=False), nn.ReLU(inplace=True),
                         nn.Linear(hidden, channels, bias=False), nn.Sigmoid())


class ChannelAttention(nn.Module):
    """Base of SE, ECA and FCA: per-channel weights ``scale(x)`` (N, C, 1, 1) in (0, 1) that rescale ``x``.

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

    Channel attention takes the shortcut as ``residual`` and returns ``out * scale + identity`` from one
    ``addcmul`` (one pass over the (N, C, H, W) map instead of a product and a sum); any other module
    (``nn.Identity`` for plain ResNets) is applied and added.
    """
    if isinstance(att, ChannelAttention):
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

    Three formulations of the same numbers, picked per call:

    * **CPU, eager, fixed DCT bases** (``_GroupDCTProject``): a matrix product that reads x once instead of
      the paper's Fig. 3 ``sum(x * weight)``, which materialises an N x C x H x W temporary:

      - contiguous NCHW: x viewed as (N, k, C/k, HW) times the k basis vectors (k, HW, 1);
      - channels_last: x viewed as (N, HW, C); all k bases are applied to every channel with one
        batched GEMM (N, k, HW) @ (N, HW, C) and each channel keeps its own group's row (the block
        diagonal). k <= 49, so the extra work is tiny and no copy of x is made.

      Learnable or randomly initialised filters no longer share a basis within a group; on CPU they use a
      per-channel batched dot product instead.
    * **CUDA, eager**: Fig. 3's ``sum(x * weight, (2, 3))`` in the input dtype. The GEMV/GEMM shapes above
      are skinny (an output of k or C/k columns) and ran at 0.46-0.90x the speed of Fig. 3 on an H200 in
      bf16; the elementwise product + reduction are bandwidth-bound kernels that read x once from HBM.
    * **under torch.compile** (any device): the same plain Fig. 3 expression, which the compiler fuses into
      one reduction over x (no temporary) and, in backward, into ``grad_y * weight``. The custom autograd
      function is kept out of traced graphs.

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
