"""``pip`` as the docs' code blocks see it (tests/docs/test_code_blocks.py): checks, installs nothing.

``pip install [-q] [-e|--editable] TARGET...`` where TARGET is ``.`` or ``.[EXTRAS]`` (this checkout)
or ``modelcache[EXTRAS]`` succeeds when every extra named is declared in setup.cfg and every
requirement of the package (``install_requires``) and of those extras is installed at a version it
allows: then the real command would have nothing to add to the environment the docs run in. Any
other pip command fails, saying so.
"""
from __future__ import annotations

import configparser
import os
import re
import sys
from importlib import metadata
from pathlib import Path
from typing import List

from packaging.requirements import Requirement

ROOT = Path(os.environ.get("MODELCACHE_DOCS_ROOT") or Path(__file__).resolve().parents[2])
TARGET = re.compile(r"^(?P<what>\.|modelcache)(?:\[(?P<extras>[A-Za-z0-9_,.\- ]*)\])?$")


def fail(message: str) -> None:
    print(f"pip (docs check): {message}", file=sys.stderr)
    sys.exit(1)


def lines(value: str) -> List[str]:
    return [line.strip() for line in value.splitlines() if line.strip() and not line.strip().startswith("#")]


def main(argv: List[str]) -> None:
    if not argv or argv[0] != "install":
        fail(f"only `pip install` of this package is checked here, not `pip {' '.join(argv)}`")
    targets = [a for a in argv[1:] if a not in ("-q", "--quiet", "-e", "--editable")]
    if not targets:
        fail("`pip install` names nothing to install")
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    declared = {name: lines(value) for name, value in config["options.extras_require"].items()}
    wanted = lines(config["options"]["install_requires"])
    named = []
    for target in targets:
        m = TARGET.match(target)
        if not m:
            fail(f"{target!r}: only `.`, `.[EXTRAS]` (this checkout) or `modelcache[EXTRAS]` are checked here")
        for extra in filter(None, (e.strip() for e in (m["extras"] or "").split(","))):
            if extra not in declared:
                fail(f"{target}: setup.cfg declares no extra {extra!r} (it has {', '.join(sorted(declared))})")
            named.append(extra)
            wanted += declared[extra]
    missing = []
    for line in wanted:
        req = Requirement(line)
        if req.marker is not None and not req.marker.evaluate():
            continue
        try:
            version = metadata.version(req.name)
        except metadata.PackageNotFoundError:
            missing.append(f"{line} (not installed)")
            continue
        if not req.specifier.contains(version, prereleases=True):
            missing.append(f"{line} (installed: {version})")
    if missing:
        fail("these requirements are not met, so the install would change the environment: " + "; ".join(missing))
    print(f"pip (docs check): extras {named or 'none'} declared in setup.cfg; all {len(wanted)} requirements "
          f"of modelcache{'[' + ','.join(named) + ']' if named else ''} installed")


if __name__ == "__main__":
    main(sys.argv[1:])
