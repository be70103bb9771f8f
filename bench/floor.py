"""The cost floor of a fresh process per test on this machine.

Collects the given directory with pytest, then, in the collected process,
forks a child per item the plainest way there is (fork, run nothing or run
the item's protocol, write one byte to a pipe, exit; the parent reads and
reaps), one after another. Prints milliseconds per fork for each variant.
"""

from __future__ import annotations

import gc
import os
import sys
import time

import pytest

ROUNDS = 300


class Floor:
    def __init__(self) -> None:
        self.results: dict[str, float] = {}

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtestloop(self, session: pytest.Session) -> bool:
        gc.freeze()
        count = min(ROUNDS, len(session.items))
        for variant in ("fork+exit", "fork+run one test+exit"):
            start = time.perf_counter()
            for index in range(count):
                read_fd, write_fd = os.pipe()
                pid = os.fork()
                if pid == 0:
                    if variant != "fork+exit":
                        item = session.items[index]
                        item.ihook.pytest_runtest_protocol(item=item, nextitem=None)
                    os.write(write_fd, b"x")
                    os._exit(0)
                os.close(write_fd)
                os.read(read_fd, 1)
                os.close(read_fd)
                os.waitpid(pid, 0)
            self.results[variant] = (time.perf_counter() - start) / count * 1000
        return True


def main() -> None:
    floor = Floor()
    with open(os.devnull, "w") as sink:
        stdout, sys.stdout = sys.stdout, sink
        try:
            pytest.main(
                ["-p", "no:cacheprovider", "-p", "no:randomly", "-p", "no:terminal", *sys.argv[1:]],
                plugins=[floor],
            )
        finally:
            sys.stdout = stdout
    for variant, ms in floor.results.items():
        print(f"{variant} {ms:.3f}")


if __name__ == "__main__":
    main()
