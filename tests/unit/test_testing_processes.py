"""runner.testing's broker processes each get a task store of their own (loopback, no
Docker): two started side by side run at once (a shared file would refuse the second),
each on the default SQLite store in a directory made for it, removed when it stops;
a store named in ``env`` is the caller's and is kept.
"""

from __future__ import annotations

from pathlib import Path

from runner.testing import BrokerProcess

STORE_LINE = "task store: "


def _store_of(process: BrokerProcess) -> str:
    line = process.wait_for_line(STORE_LINE, 30)
    return line.removeprefix(STORE_LINE).split(" (")[0]


def test_two_broker_processes_each_get_a_store_of_their_own_and_leave_none() -> None:
    first = BrokerProcess()
    try:
        second = BrokerProcess()
        try:
            stores = [_store_of(first), _store_of(second)]
            dirs = [first.store_dir, second.store_dir]
            assert None not in dirs
            assert dirs[0] != dirs[1]
            assert stores == [str(d / "broker-tasks.sqlite3") for d in dirs if d is not None]
            assert all(Path(store).is_file() for store in stores)
        finally:
            second.stop()
    finally:
        first.stop()
    assert not any(d.exists() for d in dirs if d is not None)


def test_a_store_named_in_env_is_the_callers_and_outlives_the_process(tmp_path: Path) -> None:
    store = tmp_path / "kept.sqlite3"
    process = BrokerProcess({"SANDBOX_BROKER_STORE": f"sqlite:///{store}"})
    try:
        assert process.store_dir is None
        assert _store_of(process) == str(store)
    finally:
        process.stop()
    assert store.is_file()


def test_memory_is_there_for_the_asking() -> None:
    process = BrokerProcess({"SANDBOX_BROKER_STORE": "memory"})
    try:
        line = process.wait_for_line(STORE_LINE, 30)
        assert line == "task store: memory (tasks are lost when the broker stops)"
        assert process.store_dir is None
    finally:
        process.stop()


def test_a_sigterm_right_after_the_ready_line_drains_the_broker() -> None:
    # The signal handlers are in place before the ready line is printed: a SIGTERM at
    # once (what stop() sends) drains the broker (exit 0), never kills it (-15).
    for _ in range(3):
        process = BrokerProcess({"SANDBOX_BROKER_STORE": "memory"})
        code = process.stop()
        assert code == 0, process.output
        assert "SIGTERM: draining" in process.output
