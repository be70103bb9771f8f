import registry


def test_registers_a_plugin():
    registry.PLUGINS.append("cache")
    assert registry.PLUGINS == ["cache"]
