"""isolator: run pytest tests in fresh forked worker processes with memory ceilings.

The package itself is the pytest plugin, so ``-p isolator`` (which imports
this module) and the ``pytest11`` entry point register the same object, and
``-p no:isolator`` blocks both.

PYTEST_DONT_REWRITE: ``python -m isolator`` imports this package before
pytest starts, and pytest would otherwise warn (an error under
``filterwarnings = error``) that it can no longer rewrite its asserts.
"""

from __future__ import annotations

from isolator.plugin import memory_monitor, pytest_addoption, pytest_configure

__version__ = "0.1.0"

__all__ = ["__version__", "memory_monitor", "pytest_addoption", "pytest_configure"]
