"""The Hugging Face Trainer recipe of docs/training.md, run as written there on a tiny random LLaMA
(CPU, offline) with four substitutions: the model, 16 records, 2 steps of 4 examples. Only the
adapter's tensors change, and eval.py loads the saved adapter to the same logits.

    pytest tests/test_trainer.py
"""

import os
import re

import pytest
import torch

import eval as evaluate
import idlora

DOC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "training.md")


def recipe():
    """The python block of docs/training.md's Trainer section."""
    text = open(DOC).read()
    section = text[text.index("## Inside Hugging Face's `Trainer`"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def substituted(code, subs):
    for old, new in subs.items():
        assert old in code, f"docs/training.md's recipe no longer contains {old!r}: update this test"
        code = code.replace(old, new)
    return code


@pytest.mark.parametrize("method", ["idlora", "hydralora"])
def test_trainer_recipe_trains_only_the_adapter_and_eval_loads_it(method, tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)                                  # the recipe writes runs/trainer-gsm8k
    subs = {'"meta-llama/Meta-Llama-3-8B", "bf16", "cuda"': f'{tiny_model_dir!r}, "fp32", "cpu"',
            'data.load("gsm8k", "train")': 'data.load("gsm8k", "train")[:16]',
            "num_train_epochs=3": "max_steps=2", "gradient_accumulation_steps=8": "gradient_accumulation_steps=1"}
    if method == "hydralora":            # the recipe's other line; dropout 0.05, so one mask per head
        subs["idlora.apply_idlora(model, r=128, k=4, alpha=256)"] = 'baselines.apply(model, "hydralora")'
    before, after = substituted(recipe(), subs).split("trainer.train()\n")
    env = {}
    torch.manual_seed(0)
    exec(before, env)
    model = env["model"]
    assert model.adapter_config["method"] == method
    start = {k: v.clone() for k, v in model.state_dict().items()}
    exec("trainer.train()\n" + after, env)
    assert env["trainer"].state.global_step == 2 and model.is_activation_checkpointing

    trained = {f"{name}.{t}" for name in model.adapter_config["ranks"]
               for t, v in idlora.adapter_tensors(model.get_submodule(name)).items() if v.is_floating_point()}
    end = model.state_dict()
    assert {k for k in start if not torch.equal(start[k], end[k])} == trained   # all of them moved, nothing else

    args = evaluate.parse_args(["--task", "gsm8k", "--adapter", "runs/trainer-gsm8k", "--dtype", "fp32", "--device", "cpu"])
    assert args.model == tiny_model_dir                          # read from the adapter
    loaded, _ = evaluate.load(args)
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():                                        # eval mode: eval.run_task sets it too
        assert torch.equal(loaded.eval()(ids).logits, model.eval()(ids).logits)
