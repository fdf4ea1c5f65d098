"""runner.testing's reaper: only containers of dead test processes it can judge."""

from __future__ import annotations

import os
import subprocess
import sys

from runner.sandbox.labels import process_identity
from runner.testing.session import (
    LABEL_TESTING,
    LABEL_TESTING_NAMESPACE,
    LABEL_TESTING_PROCESS,
    _is_orphan,
    _process_namespace,
    session_labels,
)


def dead_identity() -> str:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    identity = process_identity(child.pid)
    child.wait()
    assert identity is not None
    return identity


def test_a_dead_test_process_of_this_namespace_is_an_orphan() -> None:
    labels = {**session_labels(), LABEL_TESTING_PROCESS: dead_identity()}
    assert _is_orphan(labels)


def test_a_live_test_process_is_not_an_orphan() -> None:
    labels = session_labels()
    assert labels[LABEL_TESTING_PROCESS] == process_identity(os.getpid())
    assert not _is_orphan(labels)


def test_a_process_of_another_host_or_pid_namespace_is_never_judged_dead() -> None:
    # Its pid means nothing here (another CI job, container or host on the same daemon).
    labels = {
        LABEL_TESTING: "true",
        LABEL_TESTING_PROCESS: dead_identity(),
        LABEL_TESTING_NAMESPACE: "another-boot/4026531836",
    }
    assert labels[LABEL_TESTING_NAMESPACE] != _process_namespace()
    assert not _is_orphan(labels)
    del labels[LABEL_TESTING_NAMESPACE]  # made before namespaces were recorded
    assert not _is_orphan(labels)
