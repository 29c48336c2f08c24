import pytest

import modelcache as mc


@pytest.mark.parametrize("text, expected", [
    (0, 0), (123, 123), ("512MiB", 512 * 2**20), ("6GiB", 6 * 2**30), ("1.5GB", 1_500_000_000),
    ("10 kb", 10_000), ("7", 7), ("2k", 2048), ("64B", 64),
])
def test_parse_size(text, expected):
    assert mc.parse_size(text) == expected


def test_percent_needs_total():
    assert mc.parse_size("80%", total=1000) == 800
    with pytest.raises(mc.ConfigError, match="no total"):
        mc.parse_size("80%")


@pytest.mark.parametrize("bad", ["lots", "-5MiB", "5 parsecs", -1, None, True, "120%", [1]])
def test_bad_sizes_name_value(bad):
    with pytest.raises(mc.ConfigError) as err:
        mc.parse_size(bad, total=100, what="device_budget")
    assert "device_budget" in str(err.value) and type(err.value).__mro__[1:] == (mc.ModelCacheError, Exception,
                                                                                 BaseException, object)


def test_format_bytes():
    assert mc.format_bytes(512) == "512 B"
    assert mc.format_bytes(1536) == "1.5 KiB"
    assert mc.format_bytes(3 * 2**30) == "3.0 GiB"
