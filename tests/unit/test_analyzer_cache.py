"""The analyzer's verdict cache: n8n's LRU of 500, keyed by code hash and policy."""

from __future__ import annotations

import hashlib
import threading

import pytest

from runner.analyzer import (
    ALLOWED,
    DEFAULT_CACHE_SIZE,
    Analyzer,
    CacheInfo,
    ImportPolicy,
    Verdict,
    Violation,
    cache_key,
)

NONE = ImportPolicy()
JSON = ImportPolicy(stdlib_allow=frozenset({"json"}))


def test_default_size_is_n8n_s() -> None:
    assert DEFAULT_CACHE_SIZE == 500
    assert Analyzer(NONE).cache_info() == CacheInfo(hits=0, misses=0, size=0, maxsize=500)


def test_allowed_code() -> None:
    verdict = Analyzer(NONE).check("return 1")
    assert verdict == Verdict()
    assert verdict.is_allowed
    assert verdict.description == ""


def test_violations_and_n8n_s_description() -> None:
    verdict = Analyzer(NONE).check("import os\nx = ().__class__")
    assert not verdict.is_allowed
    assert verdict.syntax_error is None
    assert verdict.violations[0] == Violation(
        1, "Import of standard library module 'os' is disallowed. Allowed stdlib modules: none"
    )
    assert verdict.description == (
        "Line 1: Import of standard library module 'os' is disallowed. Allowed stdlib modules: "
        "none\nLine 2: Access to attribute '__class__' is disallowed, because it can be used to "
        "bypass security restrictions."
    )


def test_syntax_error_text_is_str_of_the_syntax_error() -> None:
    verdict = Analyzer(NONE).check("return [")
    assert verdict == Verdict(syntax_error="'[' was never closed (<unknown>, line 1)")
    assert not verdict.is_allowed
    assert verdict.description == ""


def test_hit_returns_the_cached_verdict() -> None:
    analyzer = Analyzer(NONE)
    first = analyzer.check("import os")
    second = analyzer.check("import os")
    assert second is first
    assert analyzer.cache_info() == CacheInfo(hits=1, misses=1, size=1, maxsize=500)


def test_syntax_errors_are_cached_too() -> None:
    analyzer = Analyzer(NONE)
    analyzer.check("return [")
    analyzer.check("return [")
    assert analyzer.cache_info().hits == 1


def test_oldest_entry_is_evicted_at_maxsize() -> None:
    analyzer = Analyzer(NONE, maxsize=2)
    for code in ("a = 1", "b = 2", "c = 3"):
        analyzer.check(code)
    assert analyzer.cache_info().size == 2
    analyzer.check("a = 1")  # evicted: analyzed again
    assert analyzer.cache_info() == CacheInfo(hits=0, misses=4, size=2, maxsize=2)


def test_a_hit_moves_the_entry_to_the_end() -> None:
    analyzer = Analyzer(NONE, maxsize=2)
    analyzer.check("a = 1")
    analyzer.check("b = 2")
    analyzer.check("a = 1")  # hit: "b" is now the oldest
    analyzer.check("c = 3")  # evicts "b"
    analyzer.check("a = 1")
    assert analyzer.cache_info().hits == 2
    analyzer.check("b = 2")
    assert analyzer.cache_info().misses == 4


def test_key_is_code_hash_and_sorted_allowlists() -> None:
    code = "import json"
    policy = ImportPolicy(frozenset({"re", "json"}), frozenset({"numpy"}))
    assert cache_key(code, policy) == (
        hashlib.sha256(code.encode()).hexdigest(),
        (("json", "re"), ("numpy",)),
    )


def test_a_policy_change_is_a_different_key_and_verdict() -> None:
    code = "import json"
    assert cache_key(code, NONE) != cache_key(code, JSON)
    assert cache_key(code, JSON) == cache_key(code, ImportPolicy.from_env_strings(" json ,", ""))
    assert not Analyzer(NONE).check(code).is_allowed
    assert Analyzer(JSON).check(code).is_allowed


@pytest.mark.parametrize(
    "code",
    [pytest.param("x = '\ud800'", id="lone-surrogate"), pytest.param("x = 1\x00", id="nul")],
)
def test_code_the_parser_refuses_gets_a_syntax_error_verdict(code: str) -> None:
    verdict = Analyzer(NONE).check(code)
    assert verdict.syntax_error


def test_allow_all_is_exempt_and_not_cached() -> None:
    analyzer = Analyzer(ImportPolicy(frozenset({"*"}), frozenset({"*"})))
    assert analyzer.check("import os\nreturn [") is ALLOWED
    assert analyzer.cache_info() == CacheInfo(hits=0, misses=0, size=0, maxsize=500)


def test_maxsize_must_be_positive() -> None:
    with pytest.raises(ValueError, match="maxsize"):
        Analyzer(NONE, maxsize=0)


def test_concurrent_checks_are_consistent() -> None:
    analyzer = Analyzer(NONE, maxsize=8)
    codes = [f"x = {n}" if n % 2 else f"import os as m{n}" for n in range(16)]
    expected = {code: Analyzer(NONE).check(code) for code in codes}
    failures: list[str] = []
    start = threading.Barrier(8)

    def worker() -> None:
        start.wait()
        for _ in range(20):
            for code in codes:
                if analyzer.check(code) != expected[code]:
                    failures.append(code)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    info = analyzer.cache_info()
    assert failures == []
    assert info.hits + info.misses == 8 * 20 * len(codes)
    assert info.size <= 8
