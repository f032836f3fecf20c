"""What pytest does around every test of this folder: a test that leaves child processes running fails, and they are
killed. Left running, they would hang the suite at its end, after its summary: multiprocessing's exit handler waits
for its children, and the DataLoader workers of train_kto.py ignore the SIGTERM it sends them first."""

import multiprocessing

import pytest


@pytest.fixture(autouse=True)
def no_child_processes_left():
    yield
    left = multiprocessing.active_children()
    for process in left:
        process.kill()
        process.join()
    assert not left, f"the test left child processes running (killed now): {left}"
