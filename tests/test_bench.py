"""Tests of experiments/bench.py's issue-16 parts on the CPU: the GPU check (--suite gpu) runs end to
end on a tiny model and writes the figures it promises, and the operator-count proxy sees the
base-dtype path's savings. Timings here mean nothing; the code paths are what is checked."""

import json

import pytest
import torch
import torch.nn as nn

import idlora
from experiments import bench

KEYS = {"idlora_step_vs_lora16", "idlora_forward_vs_base", "lora16_forward_vs_base", "idlora_peak_gb",
        "device", "command", "rounds"}


def test_gpu_suite_writes_its_figures(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setattr(torch, "compile", lambda m: m)      # compiling costs minutes on a CPU; the GPU run does it
    out = tmp_path / "bench"
    res = bench.main(["--suite", "gpu", "--device", "cpu", "--dtype", "fp32", "--model-config", "",
                      "--model", tiny_model_dir, "--cluster-cache", "", "--batch", "1", "--seq-len", "16",
                      "--repeats", "2", "--warmup", "0", "--threads", "1", "--out", str(out)])
    saved = json.loads((out / "gpu.json").read_text())
    assert KEYS <= saved.keys() and saved["rounds"] == 2 and saved["command"].startswith("python experiments/bench.py")
    for key in KEYS - {"device", "command", "rounds"}:
        assert saved[key] == res[key] and 0 < saved[key] < 100, (key, saved[key])
    assert set(saved["step_seconds"]) == {"lora:16", "lora:16 fp32", "idlora:128:4:2", "idlora:128:4:2 fp32"}
    # torch.compile of one layer at the largest and the smallest target shape (the tiny model's 128 x 64
    # up/gate, 32 x 64 k/v), each with its forward against the frozen layer's
    compiled = saved["compiled_layer"]
    assert [(c["layer"], c["config"]) for c in compiled] == [
        ("128 x 64", "lora:16"), ("128 x 64", "idlora:128:4:2"), ("32 x 64", "lora:16"), ("32 x 64", "idlora:128:4:2")]
    for c in compiled:
        for key in ("eager_ms", "compiled_ms", "base_forward_ms", "eager_forward_ms", "compiled_forward_ms",
                    "eager_forward_vs_base", "compiled_forward_vs_base"):
            assert 0 < c[key] < 1e4, (c, key)
    md = (out / "gpu.md").read_text()
    assert md.count("\n| ") == 2 + 6 + 4 and "lora:16 merged" in md   # 2 headers, 6 variants, 4 compiled


def test_gpu_suite_on_a_4bit_base(tmp_path, tiny_model_dir, monkeypatch):
    """--quantize nf4: the suite's model in 4 bits, its files gpu-nf4.*, no merged row (a 4-bit W0 cannot
    take a merge)."""
    monkeypatch.setattr(torch, "compile", lambda m: m)
    out = tmp_path / "bench"
    bench.main(["--suite", "gpu", "--device", "cpu", "--dtype", "fp32", "--model-config", "", "--quantize", "nf4",
                "--model", tiny_model_dir, "--cluster-cache", "", "--batch", "1", "--seq-len", "16",
                "--repeats", "1", "--warmup", "0", "--threads", "1", "--out", str(out)])
    saved = json.loads((out / "gpu-nf4.json").read_text())
    assert saved["quantize"] == "nf4" and saved["lora16_merged_forward_vs_base"] is None
    assert 0 < saved["idlora_peak_gb"] < 100 and not (out / "gpu.json").exists()
    md = (out / "gpu-nf4.md").read_text()
    assert md.count("\n| ") == 2 + 5 + 4 and "merged" not in md and "target layers in nf4" in md


def test_memory_and_params_sections_on_a_4bit_base(tiny_model_dir, capsys):
    """The params section counts the 4-bit base's buffers and no merge; the memory section gives the
    step's seconds and the peak while loading."""
    bench.main(["--only", "params,memory", "--model", tiny_model_dir, "--dtype", "fp32", "--device", "cpu",
                "--quantize", "nf4", "--configs", "base,lora:4,dora:4", "--cluster-cache", "", "--batch", "1",
                "--seq-len", "8", "--memory-repeats", "1", "--memory-steps", "1", "--threads", "1"])
    text = capsys.readouterr().out
    rows = {l.split(" | ")[0]: l.split(" | ") for l in text.splitlines() if l.startswith("| ")}
    assert rows["| dora:4"][8] == rows["| dora:4"][4] != "0" and rows["| dora:4"][7] == "yes"   # not merged: kept at inference
    assert "| peak while loading and patching | s per step |" in text and "target layers in nf4" in text


def test_op_proxy_sees_fewer_ops_and_bytes_in_the_base_dtype_path():
    torch.manual_seed(0)
    base = nn.Linear(256, 512, bias=False).to(torch.bfloat16).requires_grad_(False)
    layer = idlora.IDLoRALinear(base, idlora.cluster_rows(base.weight, 4, 32, "random"), 64, 2, 0.05)
    nn.init.normal_(layer.B)
    x = torch.randn(2, 64, 256).to(torch.bfloat16).requires_grad_()
    bf16, fp32 = bench.layer_ops(layer, x, False), bench.layer_ops(layer, x, True)
    for phase in ("forward", "backward"):
        calls, compute, allocated = bf16[phase]
        assert compute <= fp32[phase][1] and allocated < fp32[phase][2] / 1.4, (phase, bf16, fp32)
        assert 0 < compute < calls


def test_train_section_times_each_config_at_each_dropout(tiny_model_dir, capsys):
    """--train-dropouts 0.05,0: every configuration at both rates in the same rounds, each row's
    'vs p=0' the paired ratio to its own configuration at p=0 (1 for the p=0 rows themselves)."""
    bench.main(["--only", "train", "--model", tiny_model_dir, "--dtype", "fp32", "--device", "cpu",
                "--configs", "base,lora:4,hydralora:4:3", "--train-dropouts", "0.05,0", "--cluster-cache", "",
                "--batch", "1", "--seq-len", "8", "--repeats", "1", "--warmup", "0", "--threads", "1"])
    rows = [l.split(" | ") for l in capsys.readouterr().out.splitlines() if l.startswith("| ")]
    assert rows[0][:4] == ["| config", "step s (median)", "vs lora:4 p=0.05", "vs p=0"]
    assert [r[0] for r in rows[1:]] == ["| lora:4 p=0.05", "| lora:4 p=0", "| hydralora:4:3 p=0.05", "| hydralora:4:3 p=0"]
    assert [r[3] for r in rows[1:] if r[0].endswith("p=0")] == ["1.000", "1.000"] and rows[1][2] == "1.000"
    with pytest.raises(SystemExit):
        bench.parse_args(["--train-dropouts", "0.05,none"])


def test_layer_section_times_every_config_and_names_its_operators(capsys):
    """--only layer: one row per (shape, tokens, dtype, configuration), 'base' first with ratio 1; and
    the per-operator table shows the adapters' own operators: ID-LoRA's gather and the update added
    into y in place (addmm_), with no index_select and no copy of y."""
    bench.main(["--only", "layer", "--device", "cpu", "--configs", "lora:4,idlora:8:2:2,hydralora:4:2",
                "--layer-shapes", "64x32,16x32", "--layer-tokens", "8", "--layer-dtypes", "bf16,fp32",
                "--repeats", "1", "--warmup", "0", "--threads", "1"])
    out = capsys.readouterr().out
    rows = [l.split(" | ") for l in out.splitlines() if l.startswith("| ")]
    timed = [r for r in rows if len(r) == 9 and r[0] != "| layer (d_out x d_in)"]
    assert [(r[0], r[2], r[3]) for r in timed][:4] == [("| 64 x 32", "bf16", "base"), ("| 64 x 32", "bf16", "lora:4"),
                                                       ("| 64 x 32", "bf16", "idlora:8:2:2"), ("| 64 x 32", "bf16", "hydralora:4:2")]
    assert len(timed) == 2 * 2 * 4 and all(r[5] == "1.000" for r in timed if r[3] == "base")
    assert all(float(r[4]) > 0 and float(r[6]) > 0 for r in timed)
    ops = {(r[0], r[1], r[2]): r[3] for r in rows if len(r) == 5}
    idl = ops["| 64 x 32", "bf16", "idlora:8:2:2"]
    assert "gather" in idl and "addmm_" in idl and "index_select" not in idl, idl
    assert "addmm_" in ops["| 64 x 32", "fp32", "lora:4"]
    assert "this thread's CPU time" in out
