"""The calculator sandbox: what it computes, what it refuses, and that it never hangs or raises."""

from __future__ import annotations

import threading
import time

import pytest

from picochat.infer import tools
from picochat.infer.tools import ToolResult, call_tool, run_python_tool


@pytest.mark.parametrize("expr, expected", [
    ("1 + 2", "3"), ("12345 * 6789", str(12345 * 6789)), ("7 - 10", "-3"), ("48 / 2", "24"),
    ("10 / 4", "2.5"), ("7 // 2", "3"), ("-7 // 2", "-4"), ("17 % 5", "2"), ("2 ** 10", "1024"),
    ("(3 + 4) * (5 - 2)", "21"), ("-(-3)", "3"), ("3 < 4 <= 4", "True"), ("1.5 * 2", "3"),
    ("0.1 + 0.2", "0.3"), ("2 ** -1", "0.5"), ("round(3.14159, 2)", "3.14"), ("abs(-5)", "5"),
    ("max(3, 9, 4)", "9"), ("min(3, 9)", "3"), ("int('42') + 1", "43"),
])
def test_arithmetic(expr: str, expected: str) -> None:
    assert run_python_tool(expr) == expected


@pytest.mark.parametrize("expr, expected", [
    ("'strawberry'.count('r')", "3"), ("'banana'.count('a')", "3"), ("'hello'.upper()", "HELLO"),
    ("'HeLLo'.lower()", "hello"), ("'a-b-c'.replace('-', '')", "abc"), ("'picochat'.startswith('pico')", "True"),
    ("'picochat'.endswith('x')", "False"), ("'hello'.find('l')", "2"), ("'  hi  '.strip()", "hi"),
    ("len('strawberry')", "10"), ("'hello'[1]", "e"), ("'hello'[::-1]", "olleh"), ("'hello'[1:3]", "el"),
    ("'ab' + 'cd'", "abcd"), ("'ab' * 3", "ababab"), ("'r' in 'strawberry'", "True"),
])
def test_strings(expr: str, expected: str) -> None:
    assert run_python_tool(expr) == expected


@pytest.mark.parametrize("expr", [
    "import os", "__import__('os')", "().__class__.__bases__", "'a'.__class__", "x", "os.system('ls')",
    "open('/etc/passwd').read()", "eval('1')", "exec('1')", "[1, 2, 3]", "{'a': 1}", "lambda: 1",
    "(x := 3)", "[c for c in 'abc']", "'a'.join(['b'])", "'abc'.format()", "(1).bit_length()",
    "'a'.count", "print(1)", "f'{1}'", "'x'.count(sub='x')", "getattr('a', 'upper')", "globals()",
    "2 ** 100000", "9 ** 9 ** 9", "10 ** 10 ** 10", "'a' * 10 ** 9", "('a' * 9000) + ('b' * 9000)",
    "'ab'.replace('', 'x' * 5000)", "1 / 0", "'a' - 1", "'abc'[10]", "(-8.0) ** 0.5", "10.0 ** 400",
    "2 << 10000", "'%s' % 1", "", "1 +", "1" * 2000,
])
def test_rejected_or_failing_inputs_return_error_text(expr: str) -> None:
    t0 = time.perf_counter()
    out = run_python_tool(expr)
    assert out.startswith("Error:"), (expr, out)
    assert time.perf_counter() - t0 < 0.5  # guards refuse up front: nothing slow is ever attempted


def test_non_string_input_never_raises() -> None:
    assert run_python_tool(None).startswith("Error:")  # type: ignore[arg-type]
    assert run_python_tool(123).startswith("Error:")  # type: ignore[arg-type]


def test_call_tool_result_flags() -> None:
    assert call_tool("2 + 2") == ToolResult(True, "4")
    res = call_tool("nope")
    assert not res.ok and res.output.startswith("Error:")


def test_walker_deadline() -> None:
    # a deadline already passed stops the tree walker at its first node
    with pytest.raises(tools.ToolError, match="timed out"):
        tools.evaluate("1 + 2", timeout=-1.0)
    assert run_python_tool("1 + 2", timeout=0.0).startswith("Error:")


def test_timeout_returns_without_hanging(monkeypatch: pytest.MonkeyPatch) -> None:
    # simulate an evaluation that gets stuck: the caller must still get an error back on time
    def stuck(expr: str, timeout: float) -> ToolResult:
        time.sleep(3.0)
        return ToolResult(True, "too late")

    monkeypatch.setattr(tools, "_run", stuck)
    t0 = time.perf_counter()
    out = run_python_tool("1 + 1", timeout=0.2)
    assert out.startswith("Error: timed out")
    assert time.perf_counter() - t0 < 1.0


def test_works_off_the_main_thread() -> None:
    results: list[str] = []
    threads = [threading.Thread(target=lambda i=i: results.append(run_python_tool(f"{i} * 3"))) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(5)
    assert sorted(results, key=int) == [str(i * 3) for i in range(8)]


def test_long_output_is_cut() -> None:
    out = run_python_tool("'ab' * 4000")
    assert len(out) < 600 and out.endswith("(8000 characters)")
