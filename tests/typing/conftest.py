# The snippets are checked by mypy (test_typing.py), never run or collected by pytest.
collect_ignore_glob = ["snippets/*"]
