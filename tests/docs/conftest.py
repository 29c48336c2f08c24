def pytest_configure(config):
    config.addinivalue_line("markers", "slow: a docs code block too long for CI (MODELCACHE_DOCS_SLOW=1 runs it; "
                                       "benchmarks/gpu_suite.sh docs sets it)")
