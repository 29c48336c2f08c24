"""Every fenced code block of README.md and docs/**/*.md runs as written (issue #13, item 9).

One test per block; its id is ``FILE:LINE`` (the line of the opening fence). Two more tests at
the end check these rules themselves on a sample (marks, labels, and that a failing block fails).
Python blocks that share names: mark the first ``setup`` or the later ones ``continues`` (below);
nothing else carries over from one block to the next.

What a block's label means
--------------------------
- ``python`` (``py``): the block runs in a fresh subprocess of the current Python, in a fresh
  temporary directory, with a timeout. It must exit 0.
- ``bash``, ``sh``, ``shell`` and unlabelled blocks: the block runs with ``bash`` (``set -eo
  pipefail`` first: every command must succeed) in a fresh temporary directory.
  ``console``: the lines starting with ``$ `` are run that way (a line ending in ``\\`` goes on
  on the next); the other lines are sample output, not checked.
- ``json`` and ``toml``: parsed (must be valid). ``text``, ``output`` and the other labels in
  ``TEXT`` are not code: never run. Any other label fails: add it to a kind here.

Marks: HTML comments on the lines right above the opening fence (several may stack), invisible
on the rendered page; an unknown mark fails.
- ``<!-- setup -->``: the block also runs at the start of every later block of its language
  family (python, or shell) in the same file. Its code is on the page, for readers to see.
- ``<!-- continues -->``: the block runs after the previous block of its family in the same
  file, in one process (and so after what that one ran after).
- ``<!-- gpu -->``: needs an NVIDIA GPU: marked ``gpu`` (skipped cleanly without one, see
  tests/conftest.py); ``bash benchmarks/gpu_suite.sh docs OUT`` runs these on the GPU machine.
- ``<!-- slow: REASON -->``: too long for CI; skipped unless ``MODELCACHE_DOCS_SLOW=1``, which
  ``gpu_suite.sh docs`` sets (marked ``slow``).
- ``<!-- not-run: REASON -->``: never run; only its syntax is checked (``compile``, ``bash -n``).
- ``<!-- record: REASON -->``: the same, for the commands of a dated past run (docs/gpu-results-*).
  A reason is required for ``slow``, ``not-run`` and ``record``.

What the test adds around a block (environment only; what runs is what the reader sees):
the working directory (an empty temporary one), ``PYTHONPATH`` starting with this checkout, and a
folder of shims first on ``PATH``: ``python``/``python3`` are the Python running the tests;
``modelcache`` is ``python -m modelcache`` (what the console script runs: setup.cfg maps it to
``modelcache.tools.cli:main``; in CI the editable install provides it too); ``pip`` checks
instead of installing: ``pip install [-e] .[EXTRAS]`` (``.`` meaning this checkout) or
``pip install 'modelcache[EXTRAS]'`` succeeds when every extra named exists in setup.cfg and every
requirement of the package and of those extras is installed at a version it allows
(tests/docs/pip_check.py); any other ``pip`` command fails.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import stat
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional

import pytest

try:
    import tomllib
except ImportError:                 # Python < 3.11
    tomllib = None

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent

PYTHON = {"python", "py", "python3"}
SHELL = {"bash", "sh", "shell", ""}
CONSOLE = {"console"}
DATA = {"json": json.loads, "toml": tomllib.loads if tomllib else (lambda text: None)}
TEXT = {"text", "txt", "output", "plain", "ini", "cfg", "yaml", "yml", "csv", "diff", "markdown", "md", "mermaid"}
MARKS = {"setup", "continues", "gpu", "slow", "not-run", "record"}
NEEDS_REASON = {"slow", "not-run", "record"}
TIMEOUT = {"python": 180, "shell": 300}
SLOW_TIMEOUT = 570

FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})(?P<info>[^`]*)$")
COMMENT = re.compile(r"^\s*<!--.*-->\s*$")
MARK = re.compile(r"^\s*<!--\s*(?P<name>[a-z][a-z-]*)\s*(?::\s*(?P<reason>.*?))?\s*-->\s*$")


@dataclasses.dataclass
class Block:
    path: str                       # relative to the checkout
    line: int                       # 1-based line of the opening fence
    label: str
    code: str
    marks: Dict[str, str]
    errors: List[str]

    @property
    def id(self) -> str:
        return f"{self.path}:{self.line}"

    @property
    def family(self) -> Optional[str]:
        if self.label in PYTHON:
            return "python"
        if self.label in SHELL or self.label in CONSOLE:
            return "shell"
        return None

    def source(self) -> str:
        """The code to run: a console block's commands; otherwise the block as written."""
        if self.label not in CONSOLE:
            return self.code
        lines, going_on = [], False
        for text in self.code.splitlines():
            if going_on or text.startswith("$ "):
                lines.append(text if going_on else text[2:])
                going_on = text.rstrip().endswith("\\")
        return "\n".join(lines) + "\n"


def parse(text: str, rel: str) -> List[Block]:
    """The fenced code blocks of a Markdown text (from file ``rel``), with their marks and what
    is wrong with them (see the module docstring)."""
    lines = text.splitlines()
    blocks: List[Block] = []
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, fence, info = len(m["indent"]), m["fence"], m["info"].strip()
        label = info.split()[0].lower() if info else ""
        start, body, errors = i, [], []
        closing = re.compile(rf"^\s*{re.escape(fence[0])}{{{len(fence)},}}\s*$")
        i += 1
        while i < len(lines) and not closing.match(lines[i]):
            body.append(lines[i][indent:] if lines[i][:indent].strip() == "" else lines[i].lstrip())
            i += 1
        if i == len(lines):
            errors.append("the block is never closed")
        i += 1
        marks: Dict[str, str] = {}
        j = start - 1
        while j >= 0 and COMMENT.match(lines[j]):
            mark = MARK.match(lines[j])
            if not mark or mark["name"] not in MARKS:
                errors.append(f"line {j + 1}: {lines[j].strip()!r} is not a mark; use one of {sorted(MARKS)}")
            else:
                marks[mark["name"]] = (mark["reason"] or "").strip()
            j -= 1
        blocks.append(Block(rel, start + 1, label, "\n".join(body) + "\n", marks, errors))
    for n, block in enumerate(blocks):
        if not (block.family or block.label in DATA or block.label in TEXT):
            block.errors.append(f"unknown label {block.label!r}: use python, bash, console, json, toml or text "
                                f"(or add it to a kind in tests/docs/test_code_blocks.py)")
        for name in sorted(NEEDS_REASON & set(block.marks)):
            if not block.marks[name]:
                block.errors.append(f"<!-- {name} --> needs a reason: <!-- {name}: why -->")
        if block.family is None and block.marks:
            block.errors.append(f"marks {sorted(block.marks)} on a {block.label!r} block, which never runs")
        if "setup" in block.marks and {"not-run", "record", "gpu", "slow"} & set(block.marks):
            block.errors.append("a setup block runs before the file's other blocks: it cannot be gpu, slow or not run")
        if "continues" in block.marks and not any(b.family == block.family for b in blocks[:n]):
            block.errors.append("<!-- continues --> but no earlier block of its family in this file")
    return blocks


def program(block: Block, blocks: List[Block]) -> List[Block]:
    """The blocks that run, in order, when ``block`` (one of ``blocks``, its file's) is tested:
    the earlier setup blocks of its family, or what it continues; then itself."""
    if block.family is None:
        return [block]
    earlier = [b for b in blocks[:blocks.index(block)] if b.family == block.family]
    if "continues" in block.marks and earlier:
        return program(earlier[-1], blocks) + [block]
    return [b for b in earlier if "setup" in b.marks] + [block]


def doc_files() -> List[Path]:
    return [ROOT / "README.md"] + sorted((ROOT / "docs").rglob("*.md"))


FILES = {path.relative_to(ROOT).as_posix(): parse(path.read_text(encoding="utf-8"), path.relative_to(ROOT).as_posix())
         for path in doc_files()}


def params():
    slow_on = os.environ.get("MODELCACHE_DOCS_SLOW") == "1"
    for blocks in FILES.values():
        for block in blocks:
            chain, marks = program(block, blocks), []
            if any("gpu" in b.marks for b in chain):
                marks.append(pytest.mark.gpu)
            slow = [b.marks["slow"] for b in chain if "slow" in b.marks]
            if slow:
                marks.append(pytest.mark.slow)
                if not slow_on:
                    reason = f"{block.id}: slow: {slow[0]} (MODELCACHE_DOCS_SLOW=1 runs it)"
                    marks.append(pytest.mark.skip(reason=reason))
            yield pytest.param(block, chain, marks=marks, id=block.id)


@pytest.fixture(scope="session")
def shims(tmp_path_factory) -> Path:
    """A folder of commands put first on PATH (see the module docstring)."""
    folder = tmp_path_factory.mktemp("doc-shims")
    scripts = {
        "python": f'exec "{sys.executable}" "$@"\n',
        "python3": f'exec "{sys.executable}" "$@"\n',
        "modelcache": f'exec "{sys.executable}" -m modelcache "$@"\n',
        "pip": f'exec "{sys.executable}" "{HERE / "pip_check.py"}" "$@"\n',
    }
    for name, body in scripts.items():
        script = folder / name
        script.write_text("#!/bin/sh\n" + body)
        script.chmod(script.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return folder


def environment(shims: Path) -> Dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
    env["PATH"] = os.pathsep.join([str(shims), os.path.dirname(sys.executable), env.get("PATH", "")])
    env["MODELCACHE_DOCS_ROOT"] = str(ROOT)
    return env


def numbered(text: str) -> str:
    return "\n".join(f"{n:4} {line}" for n, line in enumerate(text.splitlines(), 1))


def run(argv: List[str], cwd: Path, env: Dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    """Run ``argv`` in a session of its own; on timeout, stop that session's processes (only ours)."""
    proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"timed out after {timeout} s; output:\n{out[-4000:]}")
    return subprocess.CompletedProcess(argv, proc.returncode, out, None)


def check(block: Block, chain: List[Block], shims: Path, folder: Path) -> None:
    """Run ``chain`` (``block``'s program) in ``folder`` as the module docstring says; fail if it fails."""
    errors = [f"{b.id}: {e}" for b in chain for e in b.errors]
    assert not errors, "\n".join(errors)
    if block.label in DATA:
        DATA[block.label](block.code)
        return
    if block.family is None:           # text: not code
        return

    python = block.family == "python"
    parts = "".join(f"# --- {b.id} ---\n{b.source()}" for b in chain)
    text = parts if python else "set -eo pipefail\n" + parts
    script = folder / ("doc_block.py" if python else "doc_block.sh")
    script.write_text(text)

    skipped = [(name, b.marks[name]) for b in chain for name in ("not-run", "record") if name in b.marks]
    if skipped:                        # only the syntax is checked
        if python:
            compile(text, str(script), "exec")
        else:
            syntax = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
            assert syntax.returncode == 0, f"bash -n: {syntax.stderr}\n{numbered(text)}"
        pytest.skip(f"{block.id}: {skipped[0][0]}: {skipped[0][1]} (syntax checked)")

    cwd = folder / "cwd"
    cwd.mkdir()
    timeout = SLOW_TIMEOUT if any("slow" in b.marks for b in chain) else TIMEOUT[block.family]
    argv = [sys.executable, str(script)] if python else ["bash", str(script)]
    done = run(argv, cwd, environment(shims), timeout)
    assert done.returncode == 0, (f"{block.id} exited {done.returncode}; output:\n{done.stdout[-6000:]}\n"
                                  f"what ran ({script.name}):\n{numbered(text)}")


@pytest.mark.parametrize("block, chain", list(params()))
def test_code_block(block: Block, chain: List[Block], shims: Path, tmp_path: Path) -> None:
    check(block, chain, shims, tmp_path)


# ------------------------------------------------------------------ the rules themselves
SAMPLE = """\
<!-- setup -->
```python
x = 1
```

<!-- continues -->
```py
y = x + 1
```

```python
assert x == 1
```

<!-- gpu -->
<!-- not-run: no reason at all -->
```
echo hi
```

<!-- slow -->
```console
$ echo one \\
    two
one two
```

<!-- skip -->
```rust
fn main() {}
```

<!-- continues -->
```text
a tree
```
"""


def test_the_rules_parse_as_documented():
    blocks = parse(SAMPLE, "SAMPLE.md")
    setup, cont, plain, shell, console, rust, text = blocks
    assert [b.line for b in blocks] == [2, 7, 11, 17, 22, 29, 34]
    assert [program(b, blocks) for b in (setup, cont, plain)] == [[setup], [setup, cont], [setup, plain]]
    assert (setup.errors, cont.errors, plain.errors, shell.errors) == ([], [], [], [])
    assert shell.family == "shell" and shell.marks == {"gpu": "", "not-run": "no reason at all"}
    assert program(shell, blocks) == [shell]
    assert console.source() == "echo one \\\n    two\n"
    assert console.errors == ["<!-- slow --> needs a reason: <!-- slow: why -->"]
    assert any("'<!-- skip -->' is not a mark" in e for e in rust.errors)
    assert any("unknown label 'rust'" in e for e in rust.errors)
    assert text.errors == ["marks ['continues'] on a 'text' block, which never runs"]


def test_a_failing_block_fails(shims, tmp_path):
    """An unmarked block that fails makes its test fail (with what ran, numbered)."""
    blocks = parse("```python\nraise SystemExit(3)\n```\n\n```bash\ntrue\nfalse\necho never\n```\n", "BAD.md")
    for n, block in enumerate(blocks):
        folder = tmp_path / str(n)
        folder.mkdir()
        with pytest.raises(AssertionError, match="BAD.md:[15] exited [13]"):
            check(block, program(block, blocks), shims, folder)
