"""Types as a user's type checker sees them: mypy --strict on the snippets in ``snippets/``
(expectations in comments: ``# R: T``, ``# R^: T``, ``# E: code``; see ``snippet_leases.py``), and
the installed package found by mypy from outside the checkout."""
import gc
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Tuple

import pytest

ROOT = Path(__file__).resolve().parents[2]
SNIPPETS = Path(__file__).resolve().parent / "snippets"
NEEDS = {"snippet_onnx.py": "onnx"}           # snippets that need an optional package

_EXPECT = re.compile(r"#\s*(R\^?|E):\s*(.+?)\s*$")
_MYPY_LINE = re.compile(r"^(?P<file>.+?):(?P<line>\d+): (?P<kind>error|note): (?P<message>.*)$")
_CODE = re.compile(r"\[([a-z-]+)\]$")

Found = Dict[Tuple[str, int], List[Tuple[str, str]]]


def _snippets() -> List[Path]:
    files = sorted(SNIPPETS.glob("snippet_*.py"))
    return [f for f in files if importlib.util.find_spec(NEEDS.get(f.name, "modelcache")) is not None]


def _plain(type_text: str) -> str:
    """A revealed type without ``builtins.`` (older mypy versions print it)."""
    return type_text.replace("builtins.", "")


@pytest.fixture(scope="module")
def mypy_found(tmp_path_factory: pytest.TempPathFactory) -> Found:
    """mypy --strict on every snippet in one run: ``(file name, line) -> [(kind, message)]``."""
    api = pytest.importorskip("mypy.api")
    folder = tmp_path_factory.mktemp("mypy")
    config = folder / "mypy.ini"
    # the checkout's modelcache (not an installed one); errors inside modelcache are its own
    # test's business (`mypy --strict modelcache` in CI), here only the snippets count
    config.write_text(f"[mypy]\nstrict = True\nfollow_imports = silent\nmypy_path = {ROOT}\n"
                      f"cache_dir = {folder / 'cache'}\n")
    threshold, recursion = gc.get_threshold(), sys.getrecursionlimit()
    try:      # mypy tunes the process's garbage collector and recursion limit: give them back
        stdout, stderr, _ = api.run(["--config-file", str(config), "--no-error-summary",
                                     *(str(f) for f in _snippets())])
    finally:
        gc.set_threshold(*threshold)
        sys.setrecursionlimit(recursion)
    assert not stderr.strip(), stderr
    found: Found = {}
    for line in stdout.splitlines():
        m = _MYPY_LINE.match(line)
        assert m is not None or not line.strip(), f"unexpected mypy output: {line}"
        if m is not None:
            key = (Path(m["file"]).name, int(m["line"]))
            found.setdefault(key, []).append((m["kind"], m["message"]))
    return found


@pytest.mark.parametrize("snippet", [f.name for f in _snippets()])
def test_snippet_types(snippet: str, mypy_found: Found) -> None:
    expected: Dict[int, Tuple[str, str]] = {}
    for number, text in enumerate((SNIPPETS / snippet).read_text().splitlines(), 1):
        m = _EXPECT.search(text)
        if m is not None:
            expected[number] = (m[1], m[2])
    assert expected, f"{snippet} states no expectations"
    problems = []
    for (name, number), messages in sorted(mypy_found.items()):
        if name != snippet:
            continue
        kind, want = expected.get(number, ("", ""))
        revealed = [_plain(msg[len('Revealed type is "'):-1]) for k, msg in messages
                    if k == "note" and msg.startswith("Revealed type is ")]
        codes = [c[1] for k, msg in messages if k == "error" for c in [_CODE.search(msg)] if c is not None]
        errors = [msg for k, msg in messages if k == "error"]
        if kind == "R" and revealed != [want]:
            problems.append(f"{snippet}:{number}: expected {want!r}, revealed {revealed}")
        elif kind == "R^" and not (len(revealed) == 1 and revealed[0].startswith(want)):
            problems.append(f"{snippet}:{number}: expected {want!r}..., revealed {revealed}")
        elif kind == "E" and want not in codes:
            problems.append(f"{snippet}:{number}: expected an error [{want}], got {errors}")
        if kind != "E" and errors:
            problems.append(f"{snippet}:{number}: unexpected errors {errors}")
    for number, (kind, want) in expected.items():       # expected, but mypy said nothing there
        if (snippet, number) not in mypy_found:
            problems.append(f"{snippet}:{number}: expected {kind} {want!r}, mypy said nothing")
    assert not problems, "\n".join(problems)


# ------------------------------------------------------------------ the installed package
#: the README's editable install (`pip install -e ".[dev]"`), without the extras; compat mode
#: installs a plain path (.pth) that type checkers follow, where setuptools' default for this
#: layout is an import hook that they cannot see
EDITABLE_INSTALL = ["-e", str(ROOT), "--config-settings", "editable_mode=compat"]

_USER_CODE = """import modelcache
cache = modelcache.ModelCache(monitor=modelcache.SimulatedDevice("1GiB"))
reveal_type(cache.use("bert"))
"""


def _clean_env() -> Dict[str, str]:
    env = dict(os.environ)
    for name in ("PYTHONPATH", "MYPYPATH"):
        env.pop(name, None)
    return env


def _mypy_outside_the_checkout(folder: Path, python: str) -> str:
    """mypy --strict, run in ``folder`` for ``python``'s environment, on code importing modelcache."""
    (folder / "user_code.py").write_text(_USER_CODE)
    result = subprocess.run([sys.executable, "-m", "mypy", "--strict", "--python-executable", python,
                             "--cache-dir", str(folder / ".mypy_cache"), "user_code.py"],
                            cwd=folder, env=_clean_env(), capture_output=True, text=True, timeout=300)
    output = result.stdout + result.stderr
    assert "Cannot find implementation or library stub" not in output, output
    assert "missing library stubs or py.typed marker" not in output, output
    assert 'Revealed type is "modelcache.lease.Lease[Any]"' in output, output
    assert result.returncode == 0, output
    return output


def test_the_installed_package_is_visible_to_mypy(tmp_path: Path) -> None:
    """This environment's modelcache, installed from this checkout, is found by mypy elsewhere."""
    pytest.importorskip("mypy")
    where = subprocess.run([sys.executable, "-c", "import modelcache; print(modelcache.__file__)"],
                           cwd=tmp_path, env=_clean_env(), capture_output=True, text=True, timeout=120)
    mine = ROOT / "modelcache" / "__init__.py"
    if where.returncode != 0 or not Path(where.stdout.strip()).resolve() == mine.resolve():
        seen = ((where.stdout + where.stderr).strip().splitlines() or ["?"])[-1]
        pytest.skip(f"this environment's modelcache is not this checkout's ({seen}): pip install -e .")
    _mypy_outside_the_checkout(tmp_path, sys.executable)


_OFFLINE = ("Could not find a version", "No matching distribution", "NewConnectionError", "Network is unreachable",
            "Temporary failure in name resolution", "no such option: --python")


def test_an_editable_install_is_visible_to_mypy(tmp_path: Path) -> None:
    """The README's editable install, into a new environment, is found by mypy outside the checkout."""
    pytest.importorskip("mypy")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)],
                   check=True, timeout=120)
    python = str(venv / "bin" / "python")
    install = subprocess.run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "-q",
                              "--disable-pip-version-check", *EDITABLE_INSTALL],
                             cwd=tmp_path, env=_clean_env(), capture_output=True, text=True, timeout=600)
    output = install.stdout + install.stderr
    if install.returncode != 0 and any(sign in output for sign in _OFFLINE):
        pytest.skip(f"pip could not install here (no index, or an old pip): {output.strip()[-300:]}")
    assert install.returncode == 0, output
    code = tmp_path / "elsewhere"
    code.mkdir()
    _mypy_outside_the_checkout(code, python)
