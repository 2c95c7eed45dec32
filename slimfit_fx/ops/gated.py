"""Freeze-gated Linear and Conv: the input is kept only while the weight trains.

Takes the op's arguments and, under autocast, the compute ``dtype``; gives the op's result.  The
gate is ``weight.requires_grad`` when the op runs, so the frozen set may change every step: a
frozen weight keeps no input and gets no gradient, while the input's gradient still flows.  A
Linear may keep its input quantized while it trains.  With ``dtype`` the op takes the parameter
itself and casts it in forward and again in backward: never keeps autocast's low-precision copy.
(Embedding, and a plain Linear outside autocast, need no gate: tests/test_op_table.py.)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import saved
from .saved import cast as _cast


class _Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, fmt_args, dtype):
        ctx.has_bias, ctx.dtype = bias is not None, dtype
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        keep_x = saved.keep(x, saved.fmt_from_args(fmt_args)) if weight.requires_grad else None
        saved.save(ctx, keep_x, weight if x.requires_grad else None)
        return F.linear(x, _cast(weight, dtype), _cast(bias, dtype))

    @staticmethod
    def backward(ctx, grad):
        x, weight = saved.load(ctx)
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = grad @ _cast(weight, ctx.dtype)
        if ctx.needs_input_grad[1]:
            gw = grad.reshape(-1, grad.shape[-1]).t() @ x.reshape(-1, x.shape[-1]).to(grad.dtype)
            gw = _cast(gw, ctx.dtypes[0])
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = _cast(grad.reshape(-1, grad.shape[-1]).sum(0), ctx.dtypes[1])
        return gx, gw, gb, None, None


def gated_linear(x, weight, bias=None, fmt_args=None, dtype=None):
    """``aten.linear`` whose input is kept (optionally quantized) only while ``weight`` trains;
    with ``dtype``, weight and bias are cast to it inside (autocast's copy is not kept)."""
    if not torch.is_grad_enabled() or not any(t is not None and t.requires_grad for t in (x, weight, bias)):
        return F.linear(x, _cast(weight, dtype), _cast(bias, dtype))
    return _Linear.apply(x, weight, bias, fmt_args, dtype)


_CONV_GRADS = {
    1: (torch.nn.grad.conv1d_input, torch.nn.grad.conv1d_weight),
    2: (torch.nn.grad.conv2d_input, torch.nn.grad.conv2d_weight),
    3: (torch.nn.grad.conv3d_input, torch.nn.grad.conv3d_weight),
}


class _Conv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups, dtype):
        ctx.conf = (stride, padding, dilation, groups)
        ctx.has_bias, ctx.dtype = bias is not None, dtype
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        ctx.x_shape, ctx.w_shape = x.shape, weight.shape
        saved.save(ctx, x if weight.requires_grad else None, weight if x.requires_grad else None)
        return _CONV[weight.dim() - 2](x, _cast(weight, dtype), _cast(bias, dtype), stride, padding, dilation,
                                       groups)

    @staticmethod
    def backward(ctx, grad):
        x, weight = saved.load(ctx)
        stride, padding, dilation, groups = ctx.conf
        grad_input, grad_weight = _CONV_GRADS[len(ctx.w_shape) - 2]
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = grad_input(ctx.x_shape, _cast(weight, ctx.dtype), grad, stride, padding, dilation, groups)
        if ctx.needs_input_grad[1]:
            gw = _cast(grad_weight(x, ctx.w_shape, grad, stride, padding, dilation, groups), ctx.dtypes[0])
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = _cast(grad.sum(dim=[0] + list(range(2, grad.dim()))), ctx.dtypes[1])
        return gx, gw, gb, None, None, None, None, None


_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def gated_conv(x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, dtype=None):
    """Convolution that keeps its input only while ``weight`` trains (eager keeps it always);
    with ``dtype``, weight and bias are cast to it inside (autocast's copy is not kept)."""
    conv = _CONV[weight.dim() - 2]
    if isinstance(padding, str) or not torch.is_grad_enabled() or not any(
            t is not None and t.requires_grad for t in (x, weight, bias)):
        return conv(x, _cast(weight, dtype), _cast(bias, dtype), stride, padding, dilation, groups)
    return _Conv.apply(x, weight, bias, stride, padding, dilation, groups, dtype)
