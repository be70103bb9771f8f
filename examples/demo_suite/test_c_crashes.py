import ctypes


def test_before_the_crash():
    pass


def test_segfaults():
    # A bug in a C extension: without isolation this ends the whole run.
    ctypes.string_at(0)


def test_after_the_crash():
    pass
