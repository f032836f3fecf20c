"""What pytest does around the tests of this folder, so that a hang fails the suite with the place where it waits,
instead of running into CI's time limit:
  - a test that leaves child processes running fails, and they are killed. Left running, they would hang the suite
    at its end, after its summary: multiprocessing's exit handler waits for its children, and training's DataLoader
    workers ignore the SIGTERM it sends them first (encoders.ignore_sigterm);
  - a suite that has not ended 2 minutes after its summary prints every thread's stack and exits with 1.
(A test still running after 15 minutes prints every thread's stack: pytest.ini's faulthandler_timeout.)"""

import faulthandler
import multiprocessing
import sys

import pytest

# seconds after the summary
EXIT_WITHIN = 120


@pytest.fixture(autouse=True)
def no_child_processes_left():
    yield
    left = multiprocessing.active_children()
    for process in left:
        process.kill()
        process.join()
    assert not left, f"the test left child processes running (killed now): {left}"


def pytest_unconfigure(config):
    faulthandler.dump_traceback_later(EXIT_WITHIN, exit=True, file=sys.__stderr__)
