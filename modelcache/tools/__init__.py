"""Tools built on the library: the command line (``cli.py``: one function per command), the demo,
the stress harness (``stress/``), the status display and model generators. The library never
imports this package."""
