"""
ID-LoRA: low-rank adaptation whose down-projections are rows of the frozen weight itself.

Paper: "ID-LoRA: Efficient Low-Rank Adaptation Inspired by Matrix Interpolative
Decomposition" (arXiv 2602.20727). One frozen linear layer y = W0 x, W0 of shape
(d_out, d_in), becomes

    z_i = A_i x                    (r,)     A_i = W0[J_i], r rows of W0, frozen, i = 1..k
    w   = softmax(W_g x)           (k,)     the router, trainable
    u   = sum_i w_i z_i            (r,)
    u   = [u_1 | ... | u_m]                 m = `boost` equal divisions of r/m each
    y   = W0 x + (alpha/r) [B u_1 | ... | B u_m]   B: (d_out/m, r/m), trainable, starts at 0

The index sets J_i come from Parameter Matrix Row Clustering (PMRC): cluster the rows of W0
with size-constrained k-means and keep the r rows nearest each centre. Because A_i x is
just a slice of W0 x, which the layer computes anyway, the frozen path costs a gather, not a
matmul, and only the (k, r) indices are stored. Trainable numbers per layer:
(d_out/m)(r/m) + k d_in.

Choices the paper leaves open, made here: the router is a linear map of x to k scores with
a softmax (as in HydraLoRA; the paper's parameter table needs exactly k*d_in router weights),
with nn.Linear's default init; every cluster has at least r rows (the only size that lets
each give r rows); alpha = 2r (the paper's "rank 128 / 256"); dropout acts on the gathered
z, since x is never multiplied by A separately.

This file has everything: clustering, the ID-LoRA layer, a plain LoRA baseline, patching a
Hugging Face model, and adapter save/load. It imports nothing else from this project. The frozen
layer may be an nn.Linear, GPT-2's Conv1D, or a 4-bit layer (nf4.py's NF4Linear, or bitsandbytes'
Linear4bit): section 2 reads each through two small functions, weight_shape and dense_weight.
baselines.py adds the paper's other baselines (DoRA, HydraLoRA, MoELoRA) through this file's
patching and save/load, and the table of methods the scripts read.

    python idlora.py          # prints the trainable-parameter table for LLaMA-3-8B (paper Table 6)
"""

import hashlib
import json
import math
import os
import sys

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file
from tqdm import tqdm

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SELECTIONS = ("cluster", "serial", "random")

# -----------------------------------------------------------------------------
# 1. PMRC: which rows of W0 form the frozen bases A_i


def constrained_kmeans(X, k, size_min, n_init=1, max_iter=20, seed=0, tol=1e-4):
    """Size-constrained k-means (Bradley, Bennett & Demiriz, 2000) on the rows of X (n, d).
    Returns (labels (n,), centres (k, d)) with every cluster holding >= size_min rows.

    The same algorithm as k-means-constrained's KMeansConstrained: when nearest-centre labels
    leave a cluster too small, the assignment is the min-cost flow that library builds and
    solves. Distances and means are computed here in torch, on X's device, because the
    library spends most of its time re-validating and copying X in every iteration: this
    loop is about 7x faster on a CPU (results/bench.md: LLaMA-3-8B's 224 matrices in 3 min, not 22+)
    and puts the heavy part on the GPU when there is one.
    Init: k-means++ (each new centre drawn with probability ~ squared distance)."""
    from k_means_constrained.k_means_constrained_ import (minimum_cost_flow_problem_graph,
                                                          solve_min_cost_flow_graph)

    def dist(C):                 # (n, k) Euclidean distances in one pass over X (cdist is slower)
        return (xx[:, None] - 2 * (X @ C.T) + (C * C).sum(1)).clamp_min_(0).sqrt_()

    def assign(C):                                   # the E-step: (labels (n,), distances (n, k))
        D = dist(C)
        labels = D.argmin(1)
        if torch.bincount(labels, minlength=k).min() < size_min:   # the constraint binds: flow
            cost = D.cpu().double().numpy()
            graph = minimum_cost_flow_problem_graph(cost, C, cost, size_min, n)   # uses X, C for sizes
            labels = torch.from_numpy(solve_min_cost_flow_graph(*graph)).to(X.device)
        return labels, D

    n = X.shape[0]
    mean = X.mean(0)
    X = X - mean                                   # centred, as the library does, for precision
    xx = torch.linalg.vector_norm(X, dim=1) ** 2                   # (n,) squared row norms
    tol = xx.sum().item() / X.numel() * tol        # as the library: relative to the mean variance
    g = torch.Generator().manual_seed(seed)
    best = None
    for _ in range(n_init):
        C = X[torch.randint(n, (1,), generator=g)]                 # (1, d) -> (k, d)
        for _ in range(1, k):
            d2 = dist(C).min(1).values.square().cpu()
            C = torch.cat([C, X[torch.multinomial(d2.double(), 1, generator=g).to(X.device)]])
        for _ in range(max_iter):
            labels, _ = assign(C)
            sizes = torch.bincount(labels, minlength=k).to(X.dtype)   # all >= size_min >= 1
            new = torch.zeros_like(C).index_add_(0, labels, X) / sizes[:, None]   # the M-step
            shift = (new - C).square().sum().item()
            C = new
            if shift <= tol:
                break
        labels, D = assign(C)                                      # labels that match the centres
        inertia = D.gather(1, labels[:, None]).square().sum().item()
        if best is None or inertia < best[0]:
            best = (inertia, labels, C)
    return best[1], best[2] + mean


def cluster_rows(weight, k, r, selection="cluster", seed=0, n_init=1, max_iter=20):
    """Return a (k, r) LongTensor of row indices into `weight` (d_out, d_in): the sets J_i.

    selection="cluster" is the paper's PMRC: k-means on the rows with every cluster holding at
    least r rows (otherwise some cluster could not give r rows; on real weights plain k-means
    gives sizes like [1, 1, 1, 573]), then the r rows nearest each centre, nearest first.
    "serial" (rows i*r .. i*r+r-1) and "random" (a seeded permutation cut into k sets) are the
    paper's Table 3 ablations.

    n_init=1, max_iter=20: the paper gives no k-means settings. Only the r rows nearest each
    centre are used, so the fit need not converge fully: on real SmolLM2 weights 100
    iterations instead of 20 changed no selected row on 7 of 9 matrices (results/bench.md), while
    a second init only picks another start, which moves rows as much as a new seed does.
    """
    d_out = weight.shape[0]
    if selection not in SELECTIONS:
        raise ValueError(f"selection must be one of {SELECTIONS}, got {selection!r}")
    if k * r > d_out:
        raise ValueError(f"k*r = {k}*{r} = {k * r} rows asked from a matrix of {d_out} rows")
    if selection == "serial":
        return torch.arange(k * r).view(k, r)
    if selection == "random":
        g = torch.Generator().manual_seed(seed)
        return torch.randperm(d_out, generator=g)[: k * r].view(k, r)
    if weight.device.type == "meta":
        raise ValueError("cannot cluster a weight on the meta device (it has no values); "
                         "load real weights or use selection='serial'/'random' for shape checks")
    rows = weight.detach().float()                                 # (d_out, d_in) points
    labels, centres = constrained_kmeans(rows, k, r, n_init, max_iter, seed)
    J = []
    for i in range(k):
        members = torch.nonzero(labels == i).squeeze(1)            # (n_i,) with n_i >= r
        dist = torch.linalg.vector_norm(rows[members] - centres[i], dim=1)
        J.append(members[torch.argsort(dist, stable=True)[:r]])    # r nearest, nearest first
    return torch.stack(J).cpu()                                    # (k, r)


# -----------------------------------------------------------------------------
# 2. The layers.
#
# The frozen base layer, y = W0 x + b, is read only through the functions below, so every method
# adapts any layer of these kinds (duck-typed: this file imports none of their modules):
#   nn.Linear                 weight (d_out, d_in)
#   GPT-2's Conv1D            weight (d_in, d_out), transposed (transformers.pytorch_utils.Conv1D)
#   a 4-bit layer with dequantize(), e.g. nf4.NF4Linear (train.py --quantize nf4)
#   bitsandbytes' Linear4bit  what transformers loads with BitsAndBytesConfig(load_in_4bit=True)
# ID-LoRA needs only the layer's output (A_i x is a gather from it). PMRC, DoRA's row norm and
# merging need W0's rows: a 4-bit layer gives them by dequantizing.


def _kind(layer):
    """"linear", "conv1d", "dequantize", "bnb4", or None for a layer this file cannot adapt."""
    bnb = sys.modules.get("bitsandbytes")                   # loaded if the model holds its layers
    if bnb is not None and isinstance(layer, bnb.nn.Linear4bit):
        return "bnb4"
    if callable(getattr(layer, "dequantize", None)) and hasattr(layer, "out_features"):
        return "dequantize"
    pytorch_utils = sys.modules.get("transformers.pytorch_utils")
    if pytorch_utils is not None and isinstance(layer, pytorch_utils.Conv1D):
        return "conv1d"
    if isinstance(layer, nn.Linear) and layer.weight.is_floating_point():
        return "linear"                                     # an int8 nn.Linear subclass is not
    return None


def weight_shape(layer):
    """(d_out, d_in) of a base layer."""
    if _kind(layer) in ("dequantize", "bnb4"):
        return layer.out_features, layer.in_features
    return tuple(dense_weight(layer).shape)                 # a view: costs nothing


def dense_weight(layer):
    """W0, (d_out, d_in), row i making output i: nn.Linear's weight itself; Conv1D's transposed (a view:
    the rows PMRC clusters are its columns); a 4-bit layer's dequantized, a new tensor in the dtype
    the layer computes in."""
    kind = _kind(layer)
    if kind == "dequantize":
        return layer.dequantize()
    if kind == "bnb4":
        from bitsandbytes.functional import dequantize_4bit
        _bnb_unpack(layer)
        return dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    if kind == "conv1d":
        return layer.weight.T
    return layer.weight


def weight_dtype(layer):
    """The dtype of dense_weight(layer), without dequantizing."""
    kind = _kind(layer)
    if kind == "dequantize":
        return layer.dtype
    if kind == "bnb4":
        return layer.weight.quant_state.dtype
    return layer.weight.dtype


def layer_device(layer):
    return next(t for t in (*layer.parameters(), *layer.buffers())).device


def quantization(layer):
    """None for a full-precision base layer, else its 4-bit format: "nf4" (nf4.NF4Linear) or
    "bitsandbytes-nf4" / "bitsandbytes-fp4". Adapter files record it."""
    kind = _kind(layer)
    if kind == "dequantize":
        return getattr(layer, "quantization", type(layer).__name__)
    if kind == "bnb4":
        return f"bitsandbytes-{layer.weight.quant_state.quant_type}"
    return None


def _bnb_unpack(layer):
    """bitsandbytes on an AVX512-BF16 CPU repacks a Linear4bit's weight in place at its first eval-mode
    forward without grad (a validation pass, say). After that dequantize_4bit reads it wrong, and its
    forward has no backward: gradients stop reaching the layers below, with only a warning
    (docs/training.md, "A 4-bit base"). So the repacking is turned off, and one already done is undone
    (as bitsandbytes itself does before saving or moving the layer)."""
    layer.support_avx512bf16_for_cpu = False
    if getattr(layer.weight.quant_state, "packing_format_for_cpu", False):
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse
        layer.weight.data, layer.weight.quant_state = _convert_weight_packed_for_cpu_inverse(
            layer.weight.data, layer.weight.quant_state)
        layer.quant_state = layer.weight.quant_state


MERGE_4BIT = ("cannot merge into a 4-bit base: the merged weight would be rounded to 4 bits, and the update "
              "with it; load the adapter on a full-precision base (eval.py --quantize none, or "
              "baselines.load_adapter(..., quantize=False)) and merge there")


@torch.no_grad()
def write_weight(layer, W):
    """W0 <- W (d_out, d_in), in the layer's own layout (for merging); a 4-bit layer refuses."""
    kind = _kind(layer)
    if kind not in ("linear", "conv1d"):
        raise ValueError(MERGE_4BIT)
    dense_weight(layer).copy_(W)                            # Conv1D: through its transposed view


# Both adapter layers below wrap the frozen base layer (composition, like litgpt/peft) and keep their
# trainable tensors in float32: those are the master weights, and AdamW's state is float32 too.
#
# The arithmetic of the update runs, by default, in the base layer's dtype: each forward uses the
# float32 tensors cast to it (a few MB), so a bf16 model never makes a float32 copy of x or a
# float32 (tokens, d_out) tensor (torchtune computes LoRA in bf16 too). On a GPU those full-size
# passes, not the adapter's FLOPs, are most of its cost (results/bench.md). fp32=True keeps the
# update in float32 and casts it back (peft's convention): a few more bits, more memory traffic.
# On a float32 model the two are the same computation.
#
# The update is added into y in place, inside its last GEMM: y.addmm_(h, B.T, alpha=alpha/r) scales
# and adds in the GEMM's epilogue, so the layer makes no (tokens, d_out) tensor beyond the frozen
# layer's own y: no copy of y, no separate update (add_update). Autograd allows it because nothing
# saves y for the backward (the frozen matmul saves x; ID-LoRA's gather saves only its indices,
# gather_columns).


def add_update(y, h, B, scaling):
    """y += scaling * [h_1 B^T | ... | h_m B^T] in place; returns y. h: (T*m, r/m), B: (d_out/m, r/m), y:
    (..., d_out) read as (T*m, d_out/m). In y's dtype the GEMM adds into y itself (addmm_); in float32
    on a bf16 y (fp32=True) the update is computed in float32 and rounded into y once. With autograd
    on, through AddUpdate; without (inference), directly: a custom Function costs ~10 us a call, a
    tenth of a small layer's decoding step."""
    if torch.is_grad_enabled():
        return AddUpdate.apply(y, h, B, scaling)
    return _add_into(y, h, B, scaling)


def _add_into(y, h, B, scaling):
    y2 = y.view(h.shape[0], -1)        # a view, never a copy: the update must land in y itself
    if h.dtype == y.dtype:
        y2.addmm_(h, B.T, alpha=scaling)
    else:
        y2.add_(h @ B.T, alpha=scaling)
    return y


class AddUpdate(torch.autograd.Function):
    """add_update under autograd. Written out because autograd's own in-place addmm_ on a view of y
    would, in the backward, copy the whole gradient three times (its CopySlices); here y's gradient
    passes through untouched, and h's and B's are those of the addmm."""

    @staticmethod
    def forward(ctx, y, h, B, scaling):
        ctx.save_for_backward(h, B)
        ctx.scaling = scaling
        ctx.mark_dirty(y)
        return _add_into(y, h, B, scaling)

    @staticmethod
    def backward(ctx, grad):
        h, B = ctx.saved_tensors
        g = grad.reshape(h.shape[0], -1).to(h.dtype)                      # (T*m, d_out/m)
        return grad, (g @ B) * ctx.scaling, (g.T @ h) * ctx.scaling, None


def gather_columns(y, J):
    """z = y[..., J], (..., len(J)), by torch.gather (on a CPU the bf16 kernels of index_select and
    y[..., J] over the last dimension are 2.5-4x slower: SmolLM2's q_proj, 256 tokens, 150 us against
    559 us for index_select; results/bench.md). With autograd on, through GatherColumns."""
    if torch.is_grad_enabled():
        return GatherColumns.apply(y, J)
    return _gather(y, J)


def _gather(y, J):
    """torch.gather of J's columns. A gather only copies bits, so a 2-byte y (bf16, fp16) is gathered
    as int16: on a CPU that kernel is about 1.4x faster than bf16's (576 x 576, 256 tokens, 512
    columns: 57 against 84 us; results/bench.md). float32's own kernel is as fast as int32's."""
    idx = J.expand(*y.shape[:-1], -1)
    if y.element_size() == 2:
        return torch.gather(y.view(torch.int16), -1, idx).view(y.dtype)
    return torch.gather(y, -1, idx)


class GatherColumns(torch.autograd.Function):
    """gather_columns under autograd. Written out because autograd's own gather saves all of y for
    its backward, and y must then stay unchanged: this one saves only J, so the update can be added
    into y in place afterwards. Its backward writes the gradient into J's columns of zeros: J's rows
    are distinct (IDLoRALinear checks), so a copy is the sum, and on a CPU index_copy_ is 2-7x faster
    than index_add_ in bf16 (4096 columns, 2048 tokens: 3.4 ms against 25 ms)."""

    @staticmethod
    def forward(ctx, y, J):
        ctx.save_for_backward(J)
        ctx.d_out = y.shape[-1]
        return _gather(y, J)

    @staticmethod
    def backward(ctx, grad_z):
        (J,) = ctx.saved_tensors
        return grad_z.new_zeros(*grad_z.shape[:-1], ctx.d_out).index_copy_(-1, J, grad_z), None


def dropout_active(drop):
    """Whether the nn.Dropout `drop` changes its input: in training, with p > 0."""
    return drop.training and drop.p > 0


def maybe_dropout(drop, t):
    """drop(t), or t itself, without the call, where dropout is the identity (eval, or p = 0): a module
    call costs about 4 us on a CPU, a tenth of a LoRA layer's decoding step (576 x 576, bf16: 79
    against 89 us)."""
    return drop(t) if dropout_active(drop) else t


class IDLoRALinear(nn.Module):
    """y = W0 x + (alpha/r) [B u_1 | ... | B u_m], u = sum_i softmax(W_g x)_i (W0 x)[J_i].
    `idx` holds J, (k, r) row indices into W0 (dense_weight(base)); the scale is alpha / r, with r = idx.shape[1]."""

    def __init__(self, base: nn.Module, idx, alpha, boost=2, dropout=0.0, fp32=False):
        super().__init__()
        k, r = idx.shape
        d_out, d_in = weight_shape(base)
        if r % boost or d_out % boost:
            raise ValueError(f"boost={boost} must divide r={r} and d_out={d_out}")
        if idx.unique().numel() != idx.numel():
            raise ValueError("the row indices must be distinct (the k sets J_i are disjoint, r rows each)")
        self.base = base
        self.k, self.r, self.boost, self.alpha = k, r, boost, alpha
        self.scaling = alpha / r
        self.fp32 = fp32                                   # update in float32 instead of the base dtype
        dev = layer_device(base)
        self.register_buffer("idx", idx.to(device=dev, dtype=torch.long))   # (k, r) row indices into W0
        # The router W_g: (k, d_in), with nn.Linear's default (Kaiming-uniform) init, as in HydraLoRA.
        self.router = nn.Parameter(torch.empty(k, d_in, device=dev))
        nn.init.kaiming_uniform_(self.router, a=math.sqrt(5))
        self.B = nn.Parameter(torch.zeros(d_out // boost, r // boost, device=dev))  # (d_out/m, r/m), 0
        # The input x is never multiplied by A separately (A x is gathered from W0 x), so the
        # paper's LoRA dropout is applied to the gathered z instead of to x.
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        y = self.base(x)                                   # (..., d_out) = W0 x + b
        dt = torch.float32 if self.fp32 else y.dtype
        J = self.idx.flatten()                             # (k*r,)
        z = gather_columns(y, J)                           # (..., k*r)   z_i = A_i x = (W0 x)[J_i]
        if self.base.bias is not None:
            z = z - self.base.bias[J]                      # A_i x has no bias
        z = maybe_dropout(self.dropout, z.to(dt)).unflatten(-1, (self.k, self.r))   # (..., k, r)
        w = torch.softmax(x.to(dt) @ self.router.to(dt).T, dim=-1)         # (..., k)
        u = w.unsqueeze(-2) @ z                            # (..., 1, r)   sum_i w_i z_i
        # Rank boosting: B times each of the m pieces of u is ONE GEMM, (T*m, r/m) x (r/m, d_out/m),
        # and its output read as (T, d_out) is exactly [B u_1 | ... | B u_m], the layout of y.
        return add_update(y, u.reshape(-1, self.r // self.boost), self.B.to(dt), self.scaling)


class LoRALinear(nn.Module):
    """Plain LoRA, the paper's baseline: y = W0 x + (alpha/r) B A dropout(x)."""

    def __init__(self, base: nn.Module, r, alpha, dropout=0.0, fp32=False):
        super().__init__()
        d_out, d_in = weight_shape(base)
        dev = layer_device(base)
        self.base = base
        self.r, self.alpha = r, alpha
        self.scaling = alpha / r
        self.fp32 = fp32                                   # update in float32 instead of the base dtype
        self.A = nn.Parameter(torch.empty(r, d_in, device=dev))       # (r, d_in), Kaiming
        self.B = nn.Parameter(torch.zeros(d_out, r, device=dev))      # (d_out, r), 0
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout)
        self.merged = False

    def forward(self, x):
        y = self.base(x)                                   # (..., d_out)
        if self.merged:
            return y
        dt = torch.float32 if self.fp32 else y.dtype
        h = maybe_dropout(self.dropout, x.to(dt)) @ self.A.to(dt).T   # (..., r)
        return add_update(y, h.reshape(-1, self.r), self.B.to(dt), self.scaling)   # y + (alpha/r) B h

    @torch.no_grad()
    def merge(self):
        """Fold the update into W0 (for inference); the adapter is then skipped."""
        if not self.merged:
            delta = self.scaling * (self.B @ self.A)                  # (d_out, d_in)
            write_weight(self.base, dense_weight(self.base) + delta.to(weight_dtype(self.base)))
            self.merged = True


# -----------------------------------------------------------------------------
# 3. Patching a model


def find_targets(model, targets):
    """The (name, layer) pairs whose last name part is in `targets`, each a linear layer of a kind
    section 2 reads (nn.Linear, Conv1D, 4-bit); an error if a target matches nothing, so a typo never
    silently trains an unpatched model, and one naming the class of a target this file cannot read
    (an 8-bit or GPTQ layer, say)."""
    linears = [(n, m) for n, m in model.named_modules() if _kind(m)]
    for n, m in model.named_modules():
        if n.rsplit(".", 1)[-1] in targets and not _kind(m) and not any(m.children()):
            raise ValueError(f"{n} is a {type(m).__module__}.{type(m).__name__}, which cannot be adapted here: load the "
                             f"model in full precision (pass --quantize nf4 for a 4-bit base), or in 4-bit with "
                             f"bitsandbytes (BitsAndBytesConfig(load_in_4bit=True))")
    found = [(n, m) for n, m in linears if n.rsplit(".", 1)[-1] in targets]
    missing = [t for t in targets if not any(n.rsplit(".", 1)[-1] == t for n, _ in found)]
    if missing:
        names = sorted({n.rsplit(".", 1)[-1] for n, _ in linears})
        raise ValueError(f"target module(s) {missing} match no linear layer in the model; "
                         f"its linear layers are named {names}")
    return found


def check_rank(layers, r):
    """A rank-r factor needs 1 <= r <= min(d_out, d_in) in every layer: a larger r adds no rank,
    only memory (and a typo like 100000 would ask for gigabytes)."""
    for name, lin in layers:
        shape = weight_shape(lin)
        if not 1 <= r <= min(shape):
            raise ValueError(f"rank {r} does not fit {name} of shape {shape}: it needs 1 <= r <= {min(shape)}")


def fit_rank(name, d_out, r, k, boost):
    """The rank a layer gets: r, or the largest multiple of boost with k*r <= d_out."""
    if d_out % boost:
        raise ValueError(f"{name}: d_out={d_out} is not divisible by boost={boost}")
    r_fit = min(r, d_out // k // boost * boost)
    if r_fit < boost:
        raise ValueError(f"{name}: no rank fits: k={k} clusters of >= {boost} rows need "
                         f"{k * boost} rows, the layer has d_out={d_out}")
    return r_fit


def _replace(model, name, new):
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def _freeze(model):
    """Freeze everything (the adapter layers built afterwards are trainable). With
    reentrant gradient checkpointing a frozen embedding output makes every checkpointed
    block look constant ("element 0 of tensors does not require grad"); making the
    embedding output require grad, as peft does, keeps the graph alive."""
    model.requires_grad_(False)
    if hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()


def base_quantization(layers):
    """The quantization of the base layers of `layers` ((name, layer) pairs), one value: None (full
    precision), "nf4", ...; "+"-joined when they differ."""
    found = sorted({str(quantization(lin)) for _, lin in layers})
    return None if found == ["None"] else "+".join(found)


def patch(model, layers, config, make, fp32=False):
    """Replace every (name, base layer) of `layers` by make(name, layer), in place; freeze the
    rest; record `config` (the settings save_adapter writes, with each layer's rank in
    config["ranks"], and the base's quantization in config["quantize"]). The one patching routine
    of every method, here and in baselines.py: an apply_* function works out its settings and
    hands over how to make one layer. fp32: every layer computes its update in float32 instead of
    the base dtype (section 2), a choice made at run time, not saved."""
    _freeze(model)
    quantize = base_quantization(layers)
    for name, lin in layers:
        if _kind(lin) == "bnb4":
            _bnb_unpack(lin)                                # trainable, whatever ran before (section 2)
        layer = make(name, lin)
        layer.fp32 = fp32
        _replace(model, name, layer)
    model.adapter_config = dict(config, quantize=quantize)
    return report(model)


PMRC_VERSION = 2   # part of the cache key: bump it when the clustering code changes its output


def _cache_path(cache_dir, name, weight, k, r, selection, seed, n_init, max_iter, quantize=None):
    """One file per layer, keyed by everything that determines its indices. The weight (the rows
    PMRC clusters: a 4-bit layer's dequantized) is fingerprinted from ~64k of its values (exact would
    mean hashing GBs): a different model, or a fine-tuned copy, gets a different key. A quantized
    base's rows are keyed by its format too (full precision adds nothing, so older entries stay valid)."""
    w = weight.detach().flatten()
    sample = w[:: max(1, w.numel() // 65536)].float().cpu().numpy().tobytes()
    key = json.dumps([PMRC_VERSION, name, list(weight.shape), k, r, selection, seed, n_init, max_iter]
                     + ([quantize] if quantize else []))
    digest = hashlib.sha256(key.encode() + sample).hexdigest()[:20]
    return os.path.join(cache_dir, f"{name}.{digest}.pt")


def _cluster(job):
    return cluster_rows(*job)


def _map_in_processes(fn, jobs, n_jobs):
    """fn over an iterator of jobs, results in order, in n_jobs spawned processes. At most
    2*n_jobs jobs are in flight, because each carries a float32 copy of a weight matrix
    (all of LLaMA-3-8B's at once would be 28 GB). Spawn, not fork: forking a process whose
    OpenMP/BLAS threads are running can hang."""
    import multiprocessing
    from collections import deque
    from concurrent.futures import ProcessPoolExecutor
    # Each worker gets its share of the cores: n_jobs processes each running a full set of
    # BLAS threads oversubscribe the CPU and run slower than one process.
    threads = max(1, (os.cpu_count() or 1) // n_jobs)
    with ProcessPoolExecutor(n_jobs, mp_context=multiprocessing.get_context("spawn"),
                             initializer=torch.set_num_threads, initargs=(threads,)) as pool:
        pending = deque()
        for job in jobs:
            pending.append(pool.submit(fn, job))
            if len(pending) >= 2 * n_jobs:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def row_indices(layers, ranks, k, selection, seed, n_init, max_iter, cache_dir, n_jobs=1):
    """{name: (k, r) row indices} for every (name, base layer) in `layers`: from the cache where
    present, else computed; with n_jobs > 1, one matrix per process, each on its share of the
    cores (results/bench.md: 224 LLaMA-3-8B matrices in 2.5 min with 2 processes on 2 cores, 3.2 with 1).
    PMRC clusters the rows the forward uses: a 4-bit layer's dequantized rows (dense_weight), made
    one layer at a time."""
    clustering = selection == "cluster"          # serial/random cost nothing: never cached
    idx, todo = {}, []
    for name, lin in layers:
        path = None
        if cache_dir is not None and clustering:
            path = _cache_path(cache_dir, name, dense_weight(lin), k, ranks[name], selection, seed, n_init, max_iter,
                               quantization(lin))
            if os.path.exists(path):
                idx[name] = torch.load(path)
                continue
        todo.append((name, lin, path))
    parallel = clustering and n_jobs > 1 and len(todo) > 1
    # In one process the weight is clustered where it lives (a GPU makes the distances cheap);
    # a worker process gets a float32 CPU copy, made one at a time as the pool asks for it.
    jobs = ((dense_weight(lin).detach().float().cpu() if parallel else dense_weight(lin),
             k, ranks[name], selection, seed, n_init, max_iter) for name, lin, _ in todo)
    results = _map_in_processes(_cluster, jobs, n_jobs) if parallel else map(_cluster, jobs)
    desc = f"PMRC (k={k}, {n_jobs if parallel else 1} process{'es' if parallel else ''})"
    for (name, _, path), J in zip(todo, tqdm(results, total=len(todo), desc=desc, disable=not clustering)):
        idx[name] = J
        if path is not None:
            os.makedirs(cache_dir, exist_ok=True)
            tmp = f"{path}.{os.getpid()}.tmp"            # own name: processes may share the cache
            torch.save(J, tmp)
            os.replace(tmp, path)                          # never leave a half-written entry
    return idx


def idlora_layer(lin, cfg, r, saved):
    """One IDLoRALinear from the run's settings `cfg`, its rank r and its row indices saved["idx"]
    (from PMRC, or from an adapter file: no clustering). alpha * r / cfg["r"] keeps the run's
    scale alpha/r on a layer clamped to a smaller rank."""
    return IDLoRALinear(lin, saved["idx"], cfg["alpha"] * r / cfg["r"], cfg["boost"], cfg["dropout"])


def apply_idlora(model, r=128, k=4, alpha=256, boost=2, dropout=0.05, targets=TARGETS,
                 selection="cluster", seed=0, cache_dir=None, n_init=1, max_iter=20, n_jobs=1, fp32=False):
    """Replace every target layer of `model` (nn.Linear, Conv1D, 4-bit) by an IDLoRALinear, in place; freeze the rest.
    Returns a report: modules patched, the rank each layer got, trainable parameters.
    cache_dir stores the clustered row indices; n_jobs clusters that many matrices at once;
    fp32 computes the update in float32 rather than the base dtype (section 2)."""
    if r % boost:
        raise ValueError(f"r={r} is not divisible by boost={boost}")
    layers = find_targets(model, targets)
    ranks = {name: fit_rank(name, weight_shape(lin)[0], r, k, boost) for name, lin in layers}
    clamped = {weight_shape(lin): ranks[n] for n, lin in layers if ranks[n] < r}
    for shape, r_l in clamped.items():   # the rank depends on d_out only: one line per shape
        print(f"idlora: layers of shape {shape} have {shape[0]} rows < k*r = {k * r}: rank {r_l} used")
    idx = row_indices(layers, ranks, k, selection, seed, n_init, max_iter, cache_dir, n_jobs)
    cfg = dict(method="idlora", r=r, k=k, alpha=alpha, boost=boost, dropout=dropout,
               targets=list(targets), selection=selection, seed=seed, ranks=ranks)
    return patch(model, layers, cfg, lambda name, lin: idlora_layer(lin, cfg, ranks[name], {"idx": idx[name]}), fp32)


def lora_layer(lin, cfg, r, saved):
    """One LoRALinear from the run's settings (A and B are new: load_adapter copies saved ones in)."""
    return LoRALinear(lin, r, cfg["alpha"], cfg["dropout"])


def apply_lora(model, r=32, alpha=64, dropout=0.05, targets=TARGETS, fp32=False):
    """Replace every target layer by a LoRALinear, in place; freeze the rest. The defaults
    are the paper's LoRA baseline (r=32, its Tables 1-2)."""
    layers = find_targets(model, targets)
    check_rank(layers, r)
    cfg = dict(method="lora", r=r, alpha=alpha, dropout=dropout, targets=list(targets),
               ranks={n: r for n, _ in layers})
    return patch(model, layers, cfg, lambda name, lin: lora_layer(lin, cfg, r, {}), fp32)


def count_trainable(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def report(model):
    cfg = model.adapter_config
    return dict(method=cfg["method"], modules=len(cfg["ranks"]),
                ranks=sorted(set(cfg["ranks"].values())), trainable=count_trainable(model))


@torch.no_grad()
def for_inference(model):
    """Cast each ID-LoRA and LoRA layer's float32 tensors once to its base's dtype, where its forward
    computes in that dtype (a full-precision base, fp32=False): the outputs are bit for bit the same,
    the adapter takes half the memory in bf16, and the forward's casts of B, the router and A become
    no-ops (5 to 15 us a layer on a CPU, too little to show in a whole SmolLM2 forward;
    results/logs/bench-adapter-speed-3.md). For inference only: the float32 copies are gone, and
    training needs them (and LoRA's merge() would read B and A rounded)."""
    for layer in model.modules():
        if isinstance(layer, (IDLoRALinear, LoRALinear)) and not layer.fp32 and _kind(layer.base) == "linear":
            layer.to(layer.base.weight.dtype)          # the frozen base and the int64 idx are unchanged
    return model


# -----------------------------------------------------------------------------
# 4. Saving and loading, for every adapter layer, in one safetensors file: each layer's own
# tensors (ID-LoRA: idx, router, B; LoRA: A, B) under "<layer name>.<tensor name>", and the
# settings that rebuild the layers as JSON metadata. An adapter layer wraps its frozen
# base layer as `self.base` and keeps its own tensors as direct parameters and buffers, so
# "the adapter" is exactly those, for any method.


def adapter_tensors(layer):
    """{name: tensor}: the adapter layer's own parameters and buffers (not its base layer's)."""
    return dict(layer.named_parameters(recurse=False)) | dict(layer.named_buffers(recurse=False))


def adapter_state_dict(model):
    return {f"{name}.{t}": v.detach().contiguous().cpu() for name in model.adapter_config["ranks"]
            for t, v in adapter_tensors(model.get_submodule(name)).items()}


def save_adapter(model, path):
    """Write the adapter to `path` (a .safetensors file), atomically (write, then rename)."""
    base_model = getattr(getattr(model, "config", None), "_name_or_path", "")
    cfg = dict(model.adapter_config, base_model=base_model)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    save_file(adapter_state_dict(model), tmp, metadata={"adapter_config": json.dumps(cfg)})
    os.replace(tmp, path)


def read_adapter_config(path):
    from safetensors import safe_open
    with safe_open(path, "pt") as f:
        return json.loads(f.metadata()["adapter_config"])


def load_adapter(model, path, makers=None, fp32=False, quantizers=None):
    """Rebuild the adapter layers saved in `path` on a fresh base model (no clustering) and
    load their tensors. `makers` maps a method to the function that makes one of its layers,
    (base layer, saved settings, rank, saved tensors) -> layer; by default this file's two
    (baselines.load_adapter passes every method's). Each saved tensor must have the shape of
    the rebuilt layer's: a model whose shapes differ from the saved adapter is an error.
    fp32: compute the update in float32 rather than the base dtype (section 2).

    The file records the base's quantization (config["quantize"]; files from before it was
    recorded hold full-precision adapters). A full-precision `model` is quantized the same way
    when `quantizers`, {format: quantize(model, targets)}, has that format (baselines.load_adapter
    passes nf4.quantize), with one line saying so; any other difference prints a warning: the
    adapter then runs on other weights than it was trained on."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"no adapter file at {path}")
    makers = makers or {"idlora": idlora_layer, "lora": lora_layer}
    cfg = read_adapter_config(path)
    if cfg["method"] not in makers:
        raise ValueError(f"{path} holds a {cfg['method']!r} adapter; this loader knows {sorted(makers)}")
    saved = {}                                         # {layer name: {tensor name: tensor}}
    for key, t in load_file(path).items():
        name, _, t_name = key.rpartition(".")
        saved.setdefault(name, {})[t_name] = t
    modules = dict(model.named_modules())
    for name in cfg["ranks"]:
        if not _kind(modules.get(name)):
            raise ValueError(f"adapter layer {name} is not a linear layer in this model "
                             f"(was it saved from a different architecture?)")
    trained_on = cfg.get("quantize")
    given = base_quantization([(name, modules[name]) for name in cfg["ranks"]])
    if trained_on != given and given is None and trained_on in (quantizers or {}):
        quantizers[trained_on](model, cfg["targets"])
        modules = dict(model.named_modules())
        print(f"{path} was trained on a {trained_on} base: this base's {len(cfg['ranks'])} adapted layers "
              f"are quantized to {trained_on} too")
    elif trained_on != given:
        print(f"warning: {path} was trained on a {trained_on or 'full-precision'} base and is loaded on a "
              f"{given or 'full-precision'} one: its outputs are not those of the model it trained")

    def make(name, lin):
        new = makers[cfg["method"]](lin, cfg, cfg["ranks"][name], saved.get(name, {}))
        own = adapter_tensors(new)
        want = {t: tuple(v.shape) for t, v in own.items()}
        got = {t: tuple(v.shape) for t, v in saved.get(name, {}).items()}
        if got != want:
            raise ValueError(f"{name}: adapter shapes {got} do not fit this model's layer of shape "
                             f"{weight_shape(lin)}, which needs {want}")
        with torch.no_grad():
            for t, v in own.items():
                v.copy_(saved[name][t])
        return new

    config = {k: v for k, v in cfg.items() if k != "base_model"}
    return patch(model, [(name, modules[name]) for name in cfg["ranks"]], config, make, fp32)


# -----------------------------------------------------------------------------
# 5. LLaMA-3-8B shapes, built on the meta device (no weights), and the paper's Table 6


def llama3_8b_config():
    """Meta-Llama-3-8B's architecture (from its config.json), so no download is needed."""
    from transformers import LlamaConfig
    return LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                       max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=500000.0,
                       bos_token_id=128000, eos_token_id=128001, tie_word_embeddings=False)


def meta_model(config):
    from transformers import AutoModelForCausalLM
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def parameter_table(config, ranks=(8, 16, 32, 64, 128), k=4, boost=2):
    """Trainable parameters of LoRA and ID-LoRA on all seven projections, counted on the real
    module tree (meta device) rather than by formula."""
    base = sum(p.numel() for p in meta_model(config).parameters())
    rows = []
    for r in ranks:
        lora = apply_lora(meta_model(config), r=r, alpha=2 * r)["trainable"]
        idl = apply_idlora(meta_model(config), r=r, k=k, alpha=2 * r, boost=boost,
                           selection="serial")["trainable"]
        rows.append((r, lora, idl, base))
    return rows


if __name__ == "__main__":
    print("LLaMA-3-8B, q,k,v,o,gate,up,down in all 32 layers: trainable parameters")
    print("| rank | LoRA | ID-LoRA (k=4, boost=2) | ID-LoRA / LoRA | ID-LoRA % of base |")
    print("|---|---|---|---|---|")
    for r, lora, idl, base in parameter_table(llama3_8b_config()):
        print(f"| {r} | {lora:,} | {idl:,} | {idl / lora:.1%} | {idl / base:.2%} |")
