import registry


def test_starts_with_no_plugins():
    # Passes alone; fails after test_a_registers in the same process.
    assert registry.PLUGINS == []
