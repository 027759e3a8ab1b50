"""
The paper's other baselines, DoRA, HydraLoRA and MoELoRA, beside ID-LoRA and LoRA (idlora.py), and
METHODS: the one table of every method that train.py, eval.py, experiments/bench.py and
experiments/reproduce.py read.

One frozen linear layer y = W0 x + b, W0 of shape (d_out, d_in), s = alpha / r:

    DoRA       y = m * ((W0 + s B A) / n) x + b        n = ||W0 + s B A|| per output row, m (d_out,)
    HydraLoRA  y = W0 x + b + s sum_i w_i B_i A x      one A (r, d_in), k heads B_i (d_out, r)
    MoELoRA    y = W0 x + b + s sum_i w_i B_i A_i x    k experts A_i (r, d_in), B_i (d_out, r)
               w = softmax(W_g x), W_g (k, d_in): a dense per-token router (every head/expert, no top-k)

DoRA (Liu et al., 2024) is LoRA with the update's magnitude and direction trained apart; it can be
merged into W0. HydraLoRA (Tian et al., 2024) is ID-LoRA's mirror image: ID-LoRA has k frozen A's
taken from W0 and one trained B; HydraLoRA one trained A and k trained B's. MoELoRA (after Liu et
al., 2023) mixes k whole LoRAs. The router makes both input-dependent, so neither can be merged.
Trainable numbers per layer (spec section 3): DoRA r(d_in + d_out) + d_out; HydraLoRA
r d_in + k r d_out + k d_in; MoELoRA k r (d_in + d_out) + k d_in.

Every layer here follows idlora.py's conventions, so idlora.py patches, freezes, saves and loads
it: it wraps the frozen base layer as `self.base` (nn.Linear, GPT-2's Conv1D or a 4-bit layer, read
through idlora's weight_shape and dense_weight); its own tensors are direct parameters named as
they are saved (A, B, m, router); B starts at zero, so the patched model is the base model
exactly. Trainable tensors are float32 master weights (float64 on a float64 layer: never less
precise than the base); the forward computes the update in x's dtype (a bf16 model computes its
adapter in bf16), or in float32 when the layer's `fp32` is True. On a float32 model the two are
one computation.

Dropout acts on the adapter's input x. HydraLoRA and MoELoRA draw one mask per head or expert in
training, as their authors' code does (it calls dropout once per head or expert); without dropout
(eval, or p = 0) every head sees the same x, and x goes through the A's in one matmul.

    python baselines.py     # Table 6: trainable parameters of all five methods on LLaMA-3-8B (meta device)
"""

import inspect
import math
from typing import Callable, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

import idlora
import nf4
from idlora import TARGETS, find_targets, patch

# -----------------------------------------------------------------------------
# 1. The layers


def compute_dtype(layer, x):
    """The dtype a layer computes its update in: x's, or float32 with layer.fp32."""
    return torch.float32 if layer.fp32 else x.dtype


def master_dtype(base):
    """The dtype of a layer's trainable tensors: float32, or the base's when that is wider (float64)."""
    return torch.promote_types(torch.float32, idlora.weight_dtype(base))


def frozen_product(base, h):
    """W0 h, without the bias, in h's dtype. A 4-bit base runs its own forward, which dequantizes W0
    in the forward and again in the backward and keeps no dense copy in between, minus its bias."""
    if idlora.quantization(base):
        y = base(h)
        return y if base.bias is None else y - base.bias.to(y.dtype)
    return F.linear(h, idlora.dense_weight(base).to(h.dtype))


def dropped_copies(dropout, h, k):
    """k independent dropout draws of h: (..., d_in) -> (k, ..., d_in). The expanded view costs
    nothing, and dropout's output has a value, and so a mask entry, for every element of the k
    copies: copy i is dropout_i(x)."""
    return dropout(h.expand(k, *h.shape))


def head_matrix(B, scaling, dtype):
    """The k matrices B_i (k, d_out, r) side by side, [B_1 | ... | B_k] (d_out, k*r), times the
    scale: sum_i w_i B_i z_i is then one matmul with [w_1 z_1 | ... | w_k z_k], and the scale
    costs a pass over this small matrix, not over the (tokens, d_out) output."""
    k, d_out, r = B.shape
    return (scaling * B).transpose(0, 1).reshape(d_out, k * r).to(dtype)


class DoRALinear(nn.Module):
    """DoRA: W' = m * (W0 + s B A) / n, n = ||W0 + s B A|| per output row, m (d_out,) trained.
    A (r, d_in) Kaiming and B (d_out, r) zero as in LoRA; m starts at the row norms of W0, so
    m / n = 1 and the layer is W0 exactly. n is treated as a constant, without gradient (DoRA
    section 4.3; peft does the same). As in the authors' code and peft, the update is added to
    the base output, with x' = dropout(x):

        y = W0 x + b + (m/n - 1) W0 x' + (m/n) s B A x'

    Without dropout (inference) that is exactly W' x + b. With dropout, W0 x' is computed again
    on the dropped input, which costs a second pass through W0 in training (peft's choice too).

    n reads W0 (dequantized, on a 4-bit base), so its W0 terms are kept between forwards until
    A or W0 changes (frozen_terms): computed once per optimizer step, not once per forward."""

    def __init__(self, base: nn.Module, r, alpha, dropout=0.0):
        super().__init__()
        d_out, d_in = idlora.weight_shape(base)
        dev = idlora.layer_device(base)
        self.base = base
        self.r, self.alpha = r, alpha
        self.scaling = alpha / r
        self.fp32 = False
        kw = dict(device=dev, dtype=master_dtype(base))
        self.A = nn.Parameter(torch.empty(r, d_in, **kw))             # (r, d_in), Kaiming
        self.B = nn.Parameter(torch.zeros(d_out, r, **kw))            # (d_out, r), 0
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        self._frozen = None                    # what frozen_terms keeps: a plain attribute, never saved
        # m: (d_out,), the norms the forward computes while B = 0, so m / n = 1 exactly at init
        self.m = nn.Parameter(self.weight_norm(idlora.weight_dtype(base)))
        self.dropout = nn.Dropout(dropout)
        self.merged = False

    @torch.no_grad()
    def weight_norm(self, dtype):
        """n = ||W0 + s B A|| per output row, (d_out,) in the master dtype (float32, or float64 on
        a float64 layer), without gradient. Expanded as
            n^2 = ||W0||^2 + 2s rowdot(B, W0 A^T) + s^2 rowdot(B A A^T, B)
        so that no (d_out, d_in) matrix is built: the one big product is W0 A^T (d_out, r), in
        `dtype`. On a 14336 x 4096 layer, 1 CPU thread: 0.21 s against 0.68 s for forming
        W0 + s B A (same norms within 4e-7)."""
        s, A, B = self.scaling, self.A, self.B
        n0, W0A = self.frozen_terms(dtype)                                   # (d_out,), (d_out, r)
        n2 = n0 + 2 * s * (B * W0A).sum(1) + s * s * ((B @ (A @ A.T)) * B).sum(1)
        return n2.clamp_min(0).sqrt()

    @torch.no_grad()
    def frozen_terms(self, dtype):
        """(||W0||^2 per row (d_out,), W0 A^T (d_out, r)) in the master dtype: the terms of n^2 that
        read W0, which a 4-bit base must dequantize for (as long as a forward, on a CPU). They change
        only when A or W0 does, so they are kept with a copy of the A they were computed from, and
        computed again only when A differs from it (an optimizer step, load_adapter) or W0 changed
        in place (merge bumps its version counter): once per optimizer step, instead of in every
        micro-batch's forward and its gradient-checkpointing recompute (docs/training.md, "A 4-bit
        base", has the times). A is compared by value, r d_in numbers: version counters would miss a
        fused AdamW step, which leaves them as they were, and FSDP2's all-gather, which keeps them.
        Kept: (r + 1) d_out + r d_in numbers per layer, in plain attributes (never saved, nor moved
        by .to(): a move changes the storage, which is part of the key). torch.compile recomputes."""
        A = self.A
        w0 = tuple((t.data_ptr(), t._version) for t in (*self.base.parameters(), *self.base.buffers()))
        compiling = torch.compiler.is_compiling()
        if self._frozen is not None and not compiling:
            then_dtype, then_w0, then_A, n0, W0A = self._frozen
            if then_dtype == dtype and then_w0 == w0 and then_A.device == A.device and torch.equal(then_A, A):
                return n0, W0A
        W0 = idlora.dense_weight(self.base)                                  # (d_out, d_in)
        W0A = (W0.to(dtype) @ A.T.to(dtype)).to(A.dtype)                     # (d_out, r)
        n0 = torch.linalg.vector_norm(W0, dim=1, dtype=A.dtype).square()     # (d_out,)
        if not compiling:
            self._frozen = (dtype, w0, A.detach().clone(), n0, W0A)
        return n0, W0A

    def forward(self, x):
        y = self.base(x)                                   # (..., d_out) = W0 x + b
        if self.merged:
            return y
        dt = compute_dtype(self, x)
        mn = self.m / self.weight_norm(dt)                 # (d_out,) m / n, master dtype
        h = x.to(dt)
        if idlora.dropout_active(self.dropout):
            h = self.dropout(h)
            y0 = frozen_product(self.base, h)              # W0 x', on the dropped input
        else:
            y0 = (y if self.base.bias is None else y - self.base.bias).to(dt)     # W0 x
        lora = (h @ self.A.T.to(dt)) @ (self.B * (self.scaling * mn)[:, None]).T.to(dt)   # (m/n) s B A x'
        dy = torch.addcmul(lora, y0, (mn - 1).to(dt))      # + (m/n - 1) W0 x'
        return y + dy.to(y.dtype)

    @torch.no_grad()
    def merge(self):
        """Fold the layer into W0 (for inference): W0 <- m (W0 + s B A) / n; the adapter is then skipped."""
        if not self.merged:
            if idlora.quantization(self.base):
                raise ValueError(idlora.MERGE_4BIT)
            W = idlora.dense_weight(self.base).to(self.A.dtype) + (self.scaling * self.B) @ self.A
            W *= (self.m / torch.linalg.vector_norm(W, dim=1))[:, None]
            idlora.write_weight(self.base, W)
            self.merged = True


class HydraLoRALinear(nn.Module):
    """HydraLoRA: one A shared by k heads B_i, mixed per token by a softmax router:
        y = W0 x + b + s sum_i w_i B_i A dropout_i(x),   w = softmax(W_g x)   (k,)
    As the authors' code (the Linear class of Clin0212/HydraLoRA, HydraLoRA/peft/tuners/lora.py):
    A (r, d_in) and the router W_g (k, d_in), a bias-free nn.Linear(d_in, k), both with
    nn.Linear's Kaiming-uniform init; every B_i (d_out, r) zero; s = alpha/r; the router reads x
    without dropout, its softmax in float32; each head drops x with its own mask (their loop calls
    dropout once per head). Not mergeable: w depends on x.

    What still differs from their code, and why:
    - Dtype. Their fine-tuning.py casts the adapter to bf16 under --bf16 (bf16 trained weights);
      here the trained tensors stay float32 and are cast to x's dtype for the forward, as for every
      method here: the same bf16 arithmetic, without rounding every AdamW update to bf16.
    - Targets. Their fine-tuning.sh adapts gate, up and down only; here the targets are the
      run's (all seven projections by default), as the paper's Table 6 counts HydraLoRA.
    - Load balancing: none here, none in effect there. Their forward returns a balancing term
      with its output, but in their public code it is always zero (torch.zeros(1), since their
      commit d212d98 of 2024-11-07; before it, it needed a blc_weight that fine-tuning.py never
      set), so nothing is added to the loss."""

    def __init__(self, base: nn.Module, r, alpha, k=3, dropout=0.0):
        super().__init__()
        d_out, d_in = idlora.weight_shape(base)
        kw = dict(device=idlora.layer_device(base), dtype=master_dtype(base))
        self.base = base
        self.r, self.k, self.alpha = r, k, alpha
        self.scaling = alpha / r
        self.fp32 = False
        self.A = nn.Parameter(torch.empty(r, d_in, **kw))                 # (r, d_in), Kaiming
        self.B = nn.Parameter(torch.zeros(k, d_out, r, **kw))             # (k, d_out, r), 0
        self.router = nn.Parameter(torch.empty(k, d_in, **kw))            # (k, d_in), Kaiming
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        nn.init.kaiming_uniform_(self.router, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        y = self.base(x)
        dt = compute_dtype(self, x)
        h = x.to(dt)
        w = torch.softmax(h @ self.router.T.to(dt), dim=-1, dtype=torch.float32).to(dt)   # (..., k)
        A = self.A.T.to(dt)                                          # (d_in, r)
        if idlora.dropout_active(self.dropout):
            # One mask per head: k dropped copies of x, all through the shared A in one matmul.
            # Costs k times the random draws and the A-side FLOPs, and the backward keeps the k
            # copies and their masks (on a CPU the draws are most of the extra time).
            z = (dropped_copies(self.dropout, h, self.k) @ A).movedim(0, -2)    # (..., k, r) A x'_i
        else:
            z = (h @ A).unsqueeze(-2)                                # (..., 1, r) A x, the same for every head
        u = (w.unsqueeze(-1) * z).flatten(-2)        # (..., k*r) [w_1 A x'_1 | ... | w_k A x'_k]
        dy = u @ head_matrix(self.B, self.scaling, dt).T             # (..., d_out)
        return y + dy.to(y.dtype)


class MoELoRALinear(nn.Module):
    """MoELoRA: k LoRA experts (A_i, B_i) mixed per token by a dense softmax router:
        y = W0 x + b + s sum_i w_i B_i A_i dropout_i(x),   w = softmax(W_g x)   (k,)
    The paper counts 4r(d_in + d_out) + 4 d_in per layer (its Table 6): 4 experts of rank r and a
    router of 4 x d_in on x. Each A_i is Kaiming and each B_i zero, as in LoRA; the router as
    HydraLoRA's. Every expert is used for every token (no top-k), and each drops x with its own mask
    (the authors' loop calls dropout once per expert). Not mergeable.

    What differs from the authors' code (Liuqidong07/MOELoRA-peft, MMOELoraLinear in
    src/MLoRA/peft/tuners/mmoelora.py), and why:
    - Rank and scale. Their r is the total rank, split into k experts of r/k each, with scale
      alpha/r for every expert; here r is each expert's rank and the scale alpha/r. Table 6 fixes
      this reading: its 88,866,816 for r=8 on LLaMA-3-8B is 4 experts of rank 8 (split, r=8 would
      give 25,952,256).
    - Gate. Theirs is per task: softmax(W_g e_t) of a learned embedding e_t of the example's task
      id, one weight vector per example that never reads x (so they can merge per task), its
      softmax in the gate's dtype. Here it is per token on x, softmax in float32 as HydraLoRA's,
      because Table 6's 4 d_in router numbers per layer are a map from x, and a task id is not
      an input of these runs.
    - Init. Their A_i are N(0, 0.01); here Kaiming-uniform as every A here (std 1/sqrt(3 d_in):
      0.009 at LLaMA-3-8B's d_in = 4096, 0.024 at SmolLM2's 576), so that the methods differ in
      structure only. B_i = 0 in both, so the start is the base model either way.
    - Dtype. They cast x to the experts' weight dtype and compute there (float32 experts on a
      half model compute in float32, as fp32=True here); here the default computes in x's dtype,
      as for every method here."""

    def __init__(self, base: nn.Module, r, alpha, k=4, dropout=0.0):
        super().__init__()
        d_out, d_in = idlora.weight_shape(base)
        kw = dict(device=idlora.layer_device(base), dtype=master_dtype(base))
        self.base = base
        self.r, self.k, self.alpha = r, k, alpha
        self.scaling = alpha / r
        self.fp32 = False
        self.A = nn.Parameter(torch.empty(k, r, d_in, **kw))              # (k, r, d_in), Kaiming each
        self.B = nn.Parameter(torch.zeros(k, d_out, r, **kw))             # (k, d_out, r), 0
        self.router = nn.Parameter(torch.empty(k, d_in, **kw))            # (k, d_in), Kaiming
        for A_i in self.A:                        # per expert: fan-in d_in, as k separate LoRA A's
            nn.init.kaiming_uniform_(A_i, a=math.sqrt(5))
        nn.init.kaiming_uniform_(self.router, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        y = self.base(x)
        dt = compute_dtype(self, x)
        h = x.to(dt)
        w = torch.softmax(h @ self.router.T.to(dt), dim=-1, dtype=torch.float32).to(dt)   # (..., k)
        if idlora.dropout_active(self.dropout):
            # One mask per expert: k dropped copies of x (k, N, d_in), copy i through A_i, in one
            # batched matmul. The FLOPs are the shared path's; the random draws are k times as
            # many, and the backward keeps the k copies and their masks.
            X = dropped_copies(self.dropout, h, self.k).reshape(self.k, -1, h.shape[-1])
            z = X @ self.A.mT.to(dt)                                 # (k, N, r) A_i x'_i
            z = z.movedim(0, 1).reshape(*h.shape[:-1], self.k, self.r)        # (..., k, r)
        else:
            z = (h @ self.A.flatten(0, 1).T.to(dt)).unflatten(-1, (self.k, self.r))   # (..., k, r) A_i x
        u = (z * w.unsqueeze(-1)).flatten(-2)        # (..., k*r) [w_1 A_1 x'_1 | ... | w_k A_k x'_k]
        dy = u @ head_matrix(self.B, self.scaling, dt).T             # (..., d_out)
        return y + dy.to(y.dtype)


# -----------------------------------------------------------------------------
# 2. Patching: each method's apply function works out its settings and hands idlora.patch the
# function that makes one layer, (base layer, settings, rank, saved tensors) -> layer. load_adapter
# calls that same function with the settings and tensors from the file.


def dora_layer(lin, cfg, r, saved):
    return DoRALinear(lin, r, cfg["alpha"], cfg["dropout"])


def hydralora_layer(lin, cfg, r, saved):
    return HydraLoRALinear(lin, r, cfg["alpha"], cfg["k"], cfg["dropout"])


def moelora_layer(lin, cfg, r, saved):
    return MoELoRALinear(lin, r, cfg["alpha"], cfg["k"], cfg["dropout"])


def _apply(model, method, make, targets, fp32, **settings):
    """Every target layer of `model` (nn.Linear, Conv1D, 4-bit) -> make(...) at the same rank, in place; freeze the rest."""
    layers = find_targets(model, targets)
    idlora.check_rank(layers, settings["r"])
    cfg = dict(method=method, **settings, targets=list(targets), ranks={n: settings["r"] for n, _ in layers})
    return patch(model, layers, cfg, lambda name, lin: make(lin, cfg, settings["r"], {}), fp32)


def apply_dora(model, r=32, alpha=64, dropout=0.05, targets=TARGETS, fp32=False):
    """Replace every target layer by a DoRALinear, in place; freeze the rest."""
    return _apply(model, "dora", dora_layer, targets, fp32, r=r, alpha=alpha, dropout=dropout)


def apply_hydralora(model, r=16, k=3, alpha=32, dropout=0.05, targets=TARGETS, fp32=False):
    """Replace every target layer by a HydraLoRALinear with k B heads, in place; freeze the rest."""
    return _apply(model, "hydralora", hydralora_layer, targets, fp32, r=r, k=k, alpha=alpha, dropout=dropout)


def apply_moelora(model, r=8, k=4, alpha=16, dropout=0.05, targets=TARGETS, fp32=False):
    """Replace every target layer by a MoELoRALinear with k experts, in place; freeze the rest."""
    return _apply(model, "moelora", moelora_layer, targets, fp32, r=r, k=k, alpha=alpha, dropout=dropout)


# -----------------------------------------------------------------------------
# 3. The table. Adding a method is one row here (and its layer above): train.py's --method and
# its defaults, eval.py's and train.py --resume's loading, bench.py's configurations and
# reproduce.py's method names all come from it. "full" (full fine-tuning) is not an adapter
# and not in it: train.py handles it.


class Method(NamedTuple):
    layer: type           # the adapter layer class
    apply: Callable       # apply_*(model, r=..., ...) -> report: patch every target layer, freeze the rest
    make: Callable        # (base layer, settings, rank, saved tensors) -> one layer, for load_adapter
    defaults: dict        # the paper's settings (Tables 1-2); alpha = 2r always, dropout 0.05
    nbytes: Callable      # (d_out, d_in, layer) -> bytes its adapter must take (spec section 3, float32)


# alpha = 2r and dropout 0.05 are the paper's for ID-LoRA (its Table 5); the paper gives none for
# the baselines and says they "share identical hyper-parameter settings", so the same are used.
METHODS = {
    "idlora": Method(idlora.IDLoRALinear, idlora.apply_idlora, idlora.idlora_layer,
                     dict(r=128, k=4, boost=2, selection="cluster"),          # + int64 row indices
                     lambda d_out, d_in, w: 4 * ((d_out // w.boost) * (w.r // w.boost) + w.k * d_in) + 8 * w.k * w.r),
    "lora": Method(idlora.LoRALinear, idlora.apply_lora, idlora.lora_layer, dict(r=32),
                   lambda d_out, d_in, w: 4 * w.r * (d_in + d_out)),
    "dora": Method(DoRALinear, apply_dora, dora_layer, dict(r=32),
                   lambda d_out, d_in, w: 4 * (w.r * (d_in + d_out) + d_out)),
    "hydralora": Method(HydraLoRALinear, apply_hydralora, hydralora_layer, dict(r=16, k=3),
                        lambda d_out, d_in, w: 4 * (w.r * d_in + w.k * w.r * d_out + w.k * d_in)),
    "moelora": Method(MoELoRALinear, apply_moelora, moelora_layer, dict(r=8, k=4),
                      lambda d_out, d_in, w: 4 * (w.k * w.r * (d_in + d_out) + w.k * d_in)),
}


def takes(method):
    """The keyword arguments METHODS[method].apply takes (r, alpha, dropout, targets, ...)."""
    return set(inspect.signature(METHODS[method].apply).parameters) - {"model"}


def apply(model, method, **settings):
    """Patch `model` with METHODS[method]: the paper's settings (the table's; alpha = 2r), then
    every keyword that is not None. Keywords the method does not take are left out, so callers
    can pass PMRC's settings (selection, cache_dir, n_jobs, ...) whatever the method."""
    kw = METHODS[method].defaults | {k: v for k, v in settings.items() if v is not None and k in takes(method)}
    kw.setdefault("alpha", 2 * kw["r"])
    return METHODS[method].apply(model, **kw)


def mergeable(method):
    return hasattr(METHODS[method].layer, "merge")


def load_adapter(model, path, fp32=False, quantize=True):
    """idlora.load_adapter for an adapter file of any method in the table. quantize: a full-precision
    model is quantized as the adapter's base was (nf4), saying so in one line; False keeps it as it is
    (with a warning when the adapter was trained on another precision)."""
    quantizers = {"nf4": nf4.quantize} if quantize else None
    return idlora.load_adapter(model, path, {name: m.make for name, m in METHODS.items()}, fp32, quantizers)


# -----------------------------------------------------------------------------
# 4. The paper's Table 6, counted on LLaMA-3-8B's module tree (meta device: no weights)

TABLE6_ORDER = ("lora", "dora", "hydralora", "moelora", "idlora")      # the paper's column order


def parameter_table(config, ranks=(8, 16, 32, 64, 128)):
    """{rank: {method: trainable parameters}} on all seven projections, each method at the table's
    settings but the rank (HydraLoRA 3 heads, MoELoRA 4 experts, ID-LoRA k=4 and boost 2), counted
    on the real module tree rather than by formula. ID-LoRA takes serial rows: a meta weight has
    no values to cluster, and the row choice does not change the count."""
    return {r: {m: apply(idlora.meta_model(config), m, r=r, selection="serial")["trainable"] for m in TABLE6_ORDER}
            for r in ranks}


if __name__ == "__main__":
    config = idlora.llama3_8b_config()
    base = sum(p.numel() for p in idlora.meta_model(config).parameters())
    shown = {m: ", ".join(f"{k}={v}" for k, v in METHODS[m].defaults.items() if k not in ("r", "selection"))
             for m in TABLE6_ORDER}
    heads = {m: f" ({shown[m]})" if shown[m] else "" for m in TABLE6_ORDER}
    print(f"LLaMA-3-8B ({base:,} parameters), q,k,v,o,gate,up,down in all 32 layers: trainable parameters")
    print("| rank | " + " | ".join(m + heads[m] for m in TABLE6_ORDER) + " |")
    print("|---|" + "---|" * len(TABLE6_ORDER))
    for r, row in parameter_table(config).items():
        print(f"| {r} | " + " | ".join(f"{row[m]:,} ({row[m] / base:.2%})" for m in TABLE6_ORDER) + " |")
