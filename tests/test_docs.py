"""Every command the docs show runs as written: README.md, docs/*.md and results/**/*.md.

A command is a line of a ```bash block, or an inline `python ...`, `torchrun ...` or `bash ...`
span, with any env settings in front (OMP_NUM_THREADS=1 python ...) and any $VAR that its block
defines (CMD="..." on a line of its own). Each is checked in seconds, loading no model, training
nothing:
- experiments/reproduce.py runs with --plan instead of --table: its own checks of methods, flags and
  --lrs-around, then the list of runs (read from the result files; it trains nothing). Its
  --results folder must exist.
- train.py and experiments/bench.py go through their own parse_args, which checks every flag, its
  choices and the rules after (a flag the method does not use, batch sizes, a torchrun world size).
- eval.py goes through its parser only (its parse_args then opens the adapter and checks CUDA,
  which a doc's example need not have here).
- every flag must be spelled in full: argparse would accept `--max-step` for `--max-steps`, a doc
  should not. `--help` stops argparse before later flags, so with it only the names are checked.
- torchrun's own flags go through torchrun's parser; a script that takes no flags (idlora.py,
  baselines.py) gets none; `bash X.sh` names a file that exists.

    pytest -q tests/test_docs.py
"""

import argparse
import contextlib
import io
import os
import re
import shlex
from pathlib import Path
from unittest import mock

import pytest
from torch.distributed.run import get_args_parser as torchrun_parser

import eval as evaluate
import train
from experiments import bench, reproduce

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted(ROOT.glob("docs/*.md")), *sorted(ROOT.glob("results/**/*.md"))]
PROGRAMS = ("python", "python3", "torchrun", "bash")
ENV = re.compile(r"[A-Za-z_]\w*=\S*$")                  # OMP_NUM_THREADS=1 in front of a command
NO_FLAGS = {"idlora.py", "baselines.py"}                 # scripts that print a report and take no flags
# A script a doc prints in full rather than ships: the name its commands run it by -> the doc that
# prints it, and how it calls a script of ours: its own positional words first, then the flags it
# passes ahead of the command's (compare.py: FORMAT, then eval.parse_args(["--task", ...] + argv)).
IN_DOCS = {"compare.py": ("results/humaneval-format.md", "eval.py", 1,
                          ["--task", "humaneval", "--limit", "20", "--n-samples", "5"])}


# -----------------------------------------------------------------------------
# Finding the commands


def fenced_blocks(text):
    """([(language, line number of the first line of code, code)], prose): the fenced code blocks,
    and the text with them blanked out, line numbers kept."""
    lines, prose, blocks, i = text.split("\n"), [], [], 0
    while i < len(lines):
        m = re.match(r"\s*(`{3,}|~{3,})\s*([\w-]*)", lines[i])
        if not m:
            prose.append(lines[i])
            i += 1
            continue
        end = i + 1
        while end < len(lines) and not re.fullmatch(r"\s*" + re.escape(m[1]) + r"[`~]*\s*", lines[end]):
            end += 1
        blocks.append((m[2].lower(), i + 2, "\n".join(lines[i + 1:end])))
        prose += [""] * (end + 1 - i)
        i = end + 1
    return blocks, "\n".join(prose)


def code_spans(prose):
    """(line number, content) of each inline code span: a run of n backticks up to the next run of
    exactly n, within one paragraph (CommonMark's rule, so ```` ```python ```` is one span)."""
    i = 0
    while m := re.compile(r"`+").search(prose, i):
        close = re.compile(r"(?<!`)`{%d}(?!`)" % len(m[0])).search(prose, m.end())
        if close is None or "\n\n" in prose[m.end():close.start()]:
            i = m.end()
            continue
        yield prose.count("\n", 0, m.start()) + 1, prose[m.end():close.start()].replace("\n", " ").strip()
        i = close.end()


def words(line, env):
    """The commands of one shell line, each a list of words: $VARS expanded from env, <placeholders>
    made one word, comments dropped, split at ; & && | ||."""
    def expand(m):
        if m[1] not in env:
            raise KeyError(f"${m[1]} is not defined in its block")
        return env[m[1]]
    line = re.sub(r"\$\{?(\w+)\}?", expand, line)
    line = re.sub(r"<[^<>\n]+>", "PLACEHOLDER", line)    # <tiny LLaMA>, runs/<run>/model
    lex = shlex.shlex(line, posix=True, punctuation_chars=";&|")
    lex.whitespace_split = True
    commands = [[]]
    for w in lex:
        if w in (";", "&", "&&", "|", "||"):
            commands.append([])
        else:
            commands[-1].append(w)
    return [c for c in commands if c]


def is_command(ws):
    """Does a shell line run python, torchrun or bash?"""
    while ws and ENV.match(ws[0]):
        ws = ws[1:]
    return bool(ws) and ws[0] in PROGRAMS


def shell_lines(first, code):
    """(line number, line) of a block's shell lines, a line continued with \\ joined to the next."""
    pending, start = "", None
    for i, line in enumerate(code.split("\n")):
        start = i if start is None else start
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        yield first + start, pending + line
        pending, start = "", None


def commands(path, root=ROOT):
    """[(where, words)] of every command in one markdown file (or the error that stops reading one)."""
    blocks, prose = fenced_blocks(path.read_text())
    rel = path.relative_to(root)
    found = []
    for lang, first, code in blocks:
        if lang not in ("bash", "sh", "shell", "console"):
            continue
        env = {}
        for line_no, line in shell_lines(first, code):
            where = f"{rel}:{line_no}"
            try:
                ws = shlex.split(line, comments=True)
                if len(ws) == 1 and re.match(r"[A-Za-z_]\w*=", ws[0]):      # CMD="..." on its own line
                    name, value = ws[0].split("=", 1)
                    env[name] = value
                    continue
                found += [(where, c) for c in words(line, env) if is_command(c)]
            except (KeyError, ValueError) as e:
                found.append((where, e))
    for line_no, span in code_spans(prose):
        try:
            cs = words(span, {})
        except (KeyError, ValueError):
            continue                                  # prose in backticks, not a shell line
        # a whole command names its script; `torchrun` or `torchrun --nproc_per_node 1` in a sentence is prose
        found += [(f"{rel}:{line_no}", c) for c in cs if is_command(c) and any(w.endswith((".py", ".sh")) for w in c)]
    return found


ALL = [c for path in DOCS for c in commands(path)]


# -----------------------------------------------------------------------------
# Checking one command


class Parsed(Exception):
    def __init__(self, parser):
        self.parser = parser


def parser_of(parse):
    """The argparse parser a script's parse_args builds, caught as it is about to parse: the very
    flags the script takes, with no copy to keep in step."""
    def catch(self, args=None, namespace=None):
        raise Parsed(self)
    with mock.patch.object(argparse.ArgumentParser, "parse_args", catch):
        try:
            parse([])
        except Parsed as e:
            return e.parser
    raise AssertionError(f"{parse} built no parser")


def strict(parser):
    """The parser, raising ValueError with argparse's message instead of exiting."""
    def error(message):
        raise ValueError(message)
    parser.error = error
    return parser


def one_line_errors(fn, *args):
    """fn(*args); a SystemExit (p.error, or a SystemExit('error: ...')) becomes a test failure with its message."""
    err, out = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            return fn(*args), out.getvalue()
    except SystemExit as e:
        pytest.fail(f"exits with {e.code!r}: {err.getvalue().strip() or e}", pytrace=False)


PARSERS = {"train.py": train.parse_args, "eval.py": evaluate.parse_args,
           "experiments/bench.py": bench.parse_args, "experiments/reproduce.py": reproduce.main}


def check_flags(script, argv):
    """Every flag of argv is one the script's parser has, spelled in full; without --help, argv parses
    (types, choices) with nothing left over."""
    parser = strict(parser_of(PARSERS[script]))
    for w in argv:
        if w.startswith("-") and not re.fullmatch(r"-[\d.e-]+", w):
            assert w.split("=")[0] in parser._option_string_actions, f"{script} has no flag {w.split('=')[0]}"
    if {"-h", "--help"} & set(argv):
        return False
    _, left = parser.parse_known_args(argv)
    assert not left, f"{script} does not take {left}"
    return True


def check_script(script, argv, world=None):
    if script in IN_DOCS:
        doc, script, positional, ahead = IN_DOCS[script]
        assert "ev.parse_args(" in (ROOT / doc).read_text(), f"{doc} no longer prints the script"
        argv = ahead + argv[positional:]
    assert (ROOT / script).is_file(), f"no file {script}"
    if script in NO_FLAGS:
        assert not argv, f"{script} takes no flags"
        return
    assert script in PARSERS, f"no check for {script}: add it to PARSERS"
    if not check_flags(script, argv):
        return
    if script == "train.py":
        env = {"RANK": "0", "WORLD_SIZE": str(world)} if world else {}
        with mock.patch.dict(os.environ, env), mock.patch.object(train, "WORLD", world or 1):
            one_line_errors(train.parse_args, argv)
    elif script == "experiments/bench.py":
        one_line_errors(bench.parse_args, argv)
    elif script == "experiments/reproduce.py":
        ns, _ = strict(parser_of(reproduce.main)).parse_known_args(argv)
        assert os.path.isdir(ROOT / ns.results), f"--results {ns.results}: no such folder"
        _, out = one_line_errors(reproduce.main, [w for w in argv if w != "--table"] + ["--plan"])
        assert re.match(r"(done|todo)  base\n", out), out       # the plan lists its runs, base first


def check(ws):
    while ENV.match(ws[0]):
        ws = ws[1:]
    program, argv = ws[0], ws[1:]
    if program == "bash":
        assert argv and (ROOT / argv[0]).is_file(), f"bash: no file {argv[:1]}"
    elif program == "torchrun":
        ns = strict(torchrun_parser()).parse_args(argv)
        nodes = int(str(ns.nnodes).split(":")[-1])
        per_node = int(ns.nproc_per_node) if str(ns.nproc_per_node).isdigit() else 1    # or "gpu", "auto"
        check_script(ns.training_script, ns.training_script_args, nodes * per_node)
    elif argv[0] not in ("-m", "-c"):
        check_script(argv[0], argv[1:])


@pytest.mark.parametrize("where,ws", ALL, ids=[w for w, _ in ALL])
def test_doc_command_runs_as_written(where, ws, monkeypatch):
    monkeypatch.chdir(ROOT)                # the docs' paths are from the repository root
    if isinstance(ws, Exception):
        pytest.fail(f"{where}: {ws}", pytrace=False)
    try:
        check(ws)
    except (AssertionError, ValueError) as e:
        pytest.fail(f"{where}: {shlex.join(ws)}\n  {e}", pytrace=False)


def test_the_docs_have_commands_of_each_kind():
    """The extraction finds what the docs hold: block lines, inline spans, $VARs, env prefixes, torchrun."""
    found = {(w.split(":")[0], shlex.join(ws)) for w, ws in ALL if not isinstance(ws, Exception)}
    texts = [t for _, t in found]
    assert ("README.md", "python train.py --help") in found
    assert any(t.startswith("OMP_NUM_THREADS=1 python experiments/reproduce.py --study multitask") for t in texts)
    assert any(t.startswith("torchrun --nnodes 2") and "--parallel fsdp" in t for t in texts)
    assert any(f.startswith("docs/") and t.startswith("python eval.py") for f, t in found)
    assert sum(t.startswith("python experiments/bench.py") for t in texts) >= 5


def fails(ws):
    with pytest.raises((AssertionError, ValueError, pytest.fail.Exception)):
        check(ws)


def test_a_wrong_command_fails(monkeypatch):
    """The checks can fail: a flag no script has, a shortened one, a bad choice, a flag the method
    does not use, a method reproduce.py does not know, a missing results folder, a batch that
    torchrun's processes cannot share, a missing script."""
    monkeypatch.chdir(ROOT)
    fails(["python", "train.py", "--no-such-flag", "1"])
    fails(["python", "train.py", "--max-step", "4"])                          # argparse alone would take it
    fails(["python", "train.py", "--method", "lora", "--k", "4"])             # train.py's p.error after parsing
    fails(["python", "train.py", "--help", "--no-such-flag"])
    fails(["python", "eval.py", "--task", "gsm8", "--limit", "2"])
    fails(["python", "experiments/bench.py", "--only", "params,trian"])
    fails(["python", "idlora.py", "--rank", "8"])
    fails(["python", "no/such/script.py"])
    fails(["bash", "experiments/no_such.sh"])
    fails(["python", "experiments/reproduce.py", "--study", "gsm8k", "--methods", "idlora-r128-k5x"])
    fails(["python", "experiments/reproduce.py", "--study", "gsm8k", "--results", "results/no-such-folder"])
    fails(["python", "experiments/reproduce.py", "--study", "gsm8k", "--lrs-around", "results/no-such-folder"])
    fails(["torchrun", "--nproc_per_node", "3", "train.py", "--micro-batch-size", "4"])   # 32 % (3 x 4)
    fails(["torchrun", "--nproc-per-node", "2", "train.py", "--parallel", "fsdp", "--method", "full"])
    check(["torchrun", "--nproc-per-node", "2", "train.py", "--parallel", "fsdp", "--micro-batch-size", "4"])
    check(["OMP_NUM_THREADS=1", "python", "experiments/reproduce.py", "--study", "gsm8k", "--results",
           "results/cpu", "--methods", "idlora-r128-k4", "--table"])       # --plan instead: nothing rebuilt


def test_extraction_expands_variables_and_joins_lines(tmp_path):
    md = tmp_path / "x.md"
    md.write_text("Run `OMP_NUM_THREADS=1 python train.py --lr 1e-3` or\n`python eval.py\n--task gsm8k`,\n"
                  "not `--lr` or ```` ```python ````.\n\n"
                  "```bash\nA=\"--study gsm8k \\\n    --plan\"\npython experiments/reproduce.py $A &  "
                  "python experiments/reproduce.py $A   # two\npip install x\ntorchrun --standalone \\\n"
                  "  train.py --model <tiny LLaMA>\npython train.py $B\n```\n"
                  "```python\npython train.py --nope\n```\n")
    got = commands(md, root=tmp_path)
    assert [(w, ws) for w, ws in got if not isinstance(ws, Exception)] == [
        ("x.md:9", ["python", "experiments/reproduce.py", "--study", "gsm8k", "--plan"]),
        ("x.md:9", ["python", "experiments/reproduce.py", "--study", "gsm8k", "--plan"]),
        ("x.md:11", ["torchrun", "--standalone", "train.py", "--model", "PLACEHOLDER"]),
        ("x.md:1", ["OMP_NUM_THREADS=1", "python", "train.py", "--lr", "1e-3"]),
        ("x.md:2", ["python", "eval.py", "--task", "gsm8k"])]
    (where, error), = [(w, ws) for w, ws in got if isinstance(ws, Exception)]
    assert where == "x.md:13" and "$B" in str(error)


def slug(heading):
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_links_resolve():
    """Every relative link of the docs names a file that exists, and an anchor that one of its headings makes."""
    dead = []
    for path in DOCS:
        for m in re.finditer(r"\]\(([^)\s]+)\)", fenced_blocks(path.read_text())[1]):
            target, _, anchor = m[1].partition("#")
            if re.match(r"\w+:", target):
                continue                                   # https://...
            full = (path.parent / target).resolve() if target else path
            if not full.exists():
                dead.append(f"{path.relative_to(ROOT)}: {m[1]}")
            elif anchor and full.suffix == ".md":
                heads = {slug(h) for h in re.findall(r"^#+\s+(.*)$", full.read_text(), re.M)}
                if anchor not in heads:
                    dead.append(f"{path.relative_to(ROOT)}: {m[1]} (no such heading)")
    assert not dead, "\n".join(dead)
