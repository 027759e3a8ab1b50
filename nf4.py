"""
NF4, QLoRA's 4-bit NormalFloat (Dettmers et al. 2023, arXiv 2305.14314), in plain PyTorch: the frozen
base layers of a 4-bit base model (`train.py --quantize nf4`).

The format. The flattened weight is cut into blocks of 64 values. Each block is divided by its absmax,
and each value becomes the index (0..15) of the nearest of 16 levels: quantiles of N(0, 1) scaled to
[-1, 1], with an exact 0 (normally distributed weights then fill the 16 bins about equally). Two
indices share a byte, high nibble first: the codes are bitsandbytes' bit for bit. One float32 absmax
per 64 weights would cost 0.5 bit per weight, so the absmaxes are quantized too ("double
quantization"): minus their mean, in blocks of 256, to int8 with one float32 scale per block. In all
4 + 8/64 + 32/(64*256) = 4.127 bits per weight, against 16 for bf16.

    W ~= NF4[code] * absmax,   absmax ~= absmax_q * scale + mean

bitsandbytes codes the absmaxes with its own dynamic 8-bit map instead of a linear int8; otherwise the
format is QLoRA's: on a 4096 x 4096 bf16 weight of std 0.02 the dequantized values differ from
bitsandbytes' by at most 7.3e-4, and both are 9.2% off the original (relative Frobenius norm).

The layer. NF4Linear keeps only the codes and scales. Its forward dequantizes the whole weight, runs
F.linear and drops it; its backward dequantizes again rather than keeping the dense weight between the
two (that would undo the saving). So at any time one layer's dense weight exists, briefly.

    quantize(model, targets)    every target nn.Linear (or GPT-2 Conv1D) -> NF4Linear, in place

Why this and not a library (requirements.txt has the measurements): torchao's NF4 is 7-10x slower than
F.linear on a CPU, holds 7x the weight in temporaries, and cannot quantize SmolLM2's attention shapes
at QLoRA's block sizes; bitsandbytes needs its native library and ~200 MB, and on AVX512-BF16 CPUs an
eval-mode forward repacks its weight in place, after which gradients stop flowing through it. A model
loaded in 4-bit by transformers with bitsandbytes still patches (idlora.py reads its layers).
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

import idlora

# QLoRA's 16 NF4 levels: the same float32 values as bitsandbytes' get_4bit_type("nf4"). They come from
# QLoRA's create_normal_map(offset=0.9677083): 8 positive and 7 negative quantiles of N(0, 1), 0,
# divided by the largest (tests/test_nf4.py rebuilds them that way).
NF4 = torch.tensor([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
                    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
                    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
                    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0])
BLOCK, SCALE_BLOCK = 64, 256       # weights per absmax, absmaxes per int8 scale (QLoRA's sizes)
CHUNK = 2048                       # blocks dequantized at a time on a CPU (128K values: they stay in cache)
# byte -> its two levels (high nibble first): dequantizing is one table lookup per byte
BYTE_LEVELS = torch.stack([NF4[torch.arange(256) >> 4], NF4[torch.arange(256) & 15]], 1)   # (256, 2)
_levels_on = {}                    # BYTE_LEVELS per device, copied there once


def quantize_weight(weight):
    """(codes (n/64, 32) uint8, absmax_q (n/64 padded to 256s,) int8, scale (n/64/256,) fp32, mean () fp32)
    of a weight with n values, n a multiple of 64. Computed in float32 whatever the weight's dtype, CHUNK
    blocks at a time, so that the float32 temporaries stay small (a whole 14336 x 4096 layer's would
    take 1 GB)."""
    flat = weight.detach().contiguous().view(-1)
    n_blocks = flat.numel() // BLOCK
    midpoints = ((NF4[1:] + NF4[:-1]) / 2).to(flat.device)                   # nearest level = bucket of midpoints
    codes = torch.empty(n_blocks, BLOCK // 2, dtype=torch.uint8, device=flat.device)
    absmax = torch.empty(n_blocks, device=flat.device)
    step = 16 * CHUNK
    for s in range(0, n_blocks, step):
        blocks = flat[s * BLOCK:(s + step) * BLOCK].float().view(-1, BLOCK)  # (chunk, 64)
        torch.amax(blocks.abs(), 1, out=absmax[s:s + step])
        scaled = blocks / absmax[s:s + step].clamp_min(1e-12)[:, None]        # in [-1, 1]
        idx = torch.bucketize(scaled, midpoints, out_int32=True).to(torch.uint8)
        codes[s:s + step] = idx[:, 0::2] << 4 | idx[:, 1::2]                  # two codes a byte
    # double quantization: absmax - mean, in blocks of 256 (the last one padded with zeros), to int8
    mean = absmax.mean()
    c = F.pad(absmax - mean, (0, -n_blocks % SCALE_BLOCK)).view(-1, SCALE_BLOCK)
    scale = c.abs().amax(1).clamp_min(1e-12) / 127                            # (n_blocks/256,)
    absmax_q = torch.round(c / scale[:, None]).to(torch.int8).flatten()
    return codes, absmax_q, scale, mean


class NF4Linear(nn.Module):
    """A frozen linear layer y = x W^T + b whose weight W (d_out, d_in) is stored in NF4. It has no
    trainable tensor (the bias is kept as it was, frozen). `dequantize(dtype)` gives W back (d_out, d_in):
    the forward computes exactly F.linear(x, self.dequantize(x.dtype), b)."""

    quantization = "nf4"       # what idlora.quantization reports, and adapter files record

    def __init__(self, weight, bias=None):
        super().__init__()
        if weight.numel() % BLOCK:
            raise ValueError(f"NF4 needs a weight with a multiple of {BLOCK} values, got {tuple(weight.shape)}")
        self.out_features, self.in_features = weight.shape
        self.dtype = weight.dtype              # what dequantize() returns by default
        codes, absmax_q, scale, mean = quantize_weight(weight)
        self.register_buffer("codes", codes)
        self.register_buffer("absmax_q", absmax_q)
        # the two float32 constants are kept as their int32 bits, so that model.to(bfloat16) cannot round them
        self.register_buffer("absmax_scale", scale.view(torch.int32))
        self.register_buffer("absmax_mean", mean.view(torch.int32))
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, nf4"

    def absmax(self):
        """(n_blocks,) float32: each block's absmax, from its int8 code."""
        scale, mean = self.absmax_scale.view(torch.float32), self.absmax_mean.view(torch.float32)
        return ((self.absmax_q.view(-1, SCALE_BLOCK).float() * scale[:, None]).flatten() + mean)[:len(self.codes)]

    def dequantize(self, dtype=None):
        """W (d_out, d_in) in `dtype` (default: the original weight's), computed in float32 and rounded once."""
        dtype, n_blocks, dev = dtype or self.dtype, len(self.codes), self.codes.device
        absmax = self.absmax()
        if dev not in _levels_on:
            _levels_on[dev] = BYTE_LEVELS.to(dev)
        levels = _levels_on[dev]
        out = torch.empty(n_blocks, BLOCK, dtype=dtype, device=dev)
        # Eager on a CPU: in chunks of 128K values, so that the float32 temporaries stay in cache (3x
        # faster); on a GPU, or under torch.compile (which fuses the pass into one loop): in one pass.
        step = CHUNK if dev.type == "cpu" and not torch.compiler.is_compiling() else n_blocks
        for s in range(0, n_blocks, step):
            codes = self.codes[s:s + step].view(-1).int()
            torch.mul(levels.index_select(0, codes).view(-1, BLOCK), absmax[s:s + step, None], out=out[s:s + step])
        return out.view(self.out_features, self.in_features)

    def forward(self, x):
        return _NF4Linear.apply(x, self)


class _NF4Linear(torch.autograd.Function):
    """y = F.linear(x, W, b) with W dequantized in the forward and again in the backward: only the
    4-bit codes stay alive between them. The frozen W and b get no gradient."""

    @staticmethod
    def forward(ctx, x, layer):
        ctx.layer = layer
        W = layer.dequantize(x.dtype)
        if layer.bias is None:
            return F.linear(x, W)
        # F.linear's own arithmetic (one addmm), written into a fresh y: F.linear(x, W, b) on a 3-d x
        # returns a view of its 2-d result, and the adapter on top adds its update into y in place,
        # which autograd forbids on a view made inside a custom Function.
        y = x.new_empty(*x.shape[:-1], W.shape[0])
        torch.addmm(layer.bias.to(x.dtype), x.reshape(-1, x.shape[-1]), W.T, out=y.view(-1, W.shape[0]))
        return y

    @staticmethod
    def backward(ctx, grad_y):
        return grad_y @ ctx.layer.dequantize(grad_y.dtype), None


def quantize(model, targets=idlora.TARGETS, device=None):
    """Replace every target layer of `model` (the linear layers whose last name is in `targets`: nn.Linear,
    or GPT-2's Conv1D) by an NF4Linear, in place, one at a time, so that at most one dense weight more
    than the model holds exists at once; each dense weight is freed as its layer is replaced (unless
    something else holds it). Quantize before patching: the adapter then wraps the 4-bit layers.
    Embeddings, norms and the LM head are not targets and stay as they are. `device`: quantize each
    layer there and leave it there (load a model on the CPU, quantize onto a GPU that could not
    hold it in bf16); the rest of the model stays where it is. Layers already in NF4 are left as they
    are. Returns the number of layers quantized."""
    names = []
    for name, layer in idlora.find_targets(model, targets):
        q = idlora.quantization(layer)
        if q not in (None, "nf4"):
            raise ValueError(f"{name} is already a 4-bit {q} layer: load the model in full precision to quantize it to NF4")
        if q is None:
            names.append(name)
    for name in names:                       # by name: no list keeps the replaced layers alive
        layer = model.get_submodule(name)
        weight = idlora.dense_weight(layer).to(device)
        new = NF4Linear(weight, None if layer.bias is None else layer.bias.to(device))
        idlora._replace(model, name, new)
        del layer, weight, new
    return len(names)
