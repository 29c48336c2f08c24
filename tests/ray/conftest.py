"""Ray Serve's own modules warn about pydantic deprecations when imported: not ours to fix."""


def pytest_configure(config):
    config.addinivalue_line("filterwarnings", "ignore::DeprecationWarning:ray")
