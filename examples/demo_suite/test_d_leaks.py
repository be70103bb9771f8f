import pytest

CACHE: list[bytearray] = []


@pytest.mark.parametrize("n", range(30))
def test_leaks_24mb(n):
    # A cache that only grows: 30 tests keep 720 MB alive by the end.
    CACHE.append(b"\x01" * (24 * 1024 * 1024))
