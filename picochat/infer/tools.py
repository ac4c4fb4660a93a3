"""Calculator sandbox for the model's python tool calls.

The model writes `<|python_start|>expr<|python_end|>`; the engine (and the synthetic SFT data, so
that training and inference see identical outputs) calls `run_python_tool(expr)` and injects the
returned text between `<|output_start|>` and `<|output_end|>`.

Safety model: the expression is parsed with `ast` and *interpreted by our own tree walker*; Python's
`eval` is never called. Only these nodes exist for us:
  - literals: int, float, str, bool (and None, for completeness of constants);
  - arithmetic `+ - * / // % **`, unary `+ - not`, `and`/`or`, comparisons, `x if c else y`;
  - string indexing and slicing;
  - calls of a few whitelisted functions (`len abs round min max int float str`) and of whitelisted
    str methods on values that really are `str` (`.count`, `.upper`, ...). No other names, no
    attribute access, no imports, no keyword arguments, no comprehensions, no lambdas, no dunders.

Time limit, and why a thread rather than SIGALRM or a subprocess: SIGALRM only works on the main
thread (the server runs the engine off it) and a subprocess costs milliseconds per call (the
synthetic data generator calls the tool thousands of times). Instead every operation is bounded
*before* it runs (integer sizes, string lengths, power exponents, node count), so no single step can
take long, and the walker checks a deadline at every node. On top of that the evaluation runs in a
daemon worker thread joined with the timeout, so the caller gets "Error: timed out" back on time even
if some step we did not foresee were slow. (A thread cannot be killed, and a long C-level operation
would hold the GIL: that is exactly why the size guards are the real defence and the join the backstop.)

Failures never raise: they come back as text starting with "Error:".
"""

from __future__ import annotations

import ast
import math
import operator
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

MAX_EXPR_CHARS = 1000  # longer "calculator" inputs are not calculations; also bounds parse depth
MAX_NODES = 256  # AST nodes per expression
MAX_INT_BITS = 4096  # ~1230 decimal digits, well under Python's int->str conversion limit
MAX_STR_LEN = 10_000  # characters in any intermediate or final string
MAX_OUTPUT_CHARS = 500  # what we hand back to the model; longer results are cut with a note


class ToolError(Exception):
    """A refused or failed evaluation; its message becomes the tool output."""


@dataclass(frozen=True)
class ToolResult:
    """Outcome of one tool call: `ok` is False when `output` is an error text."""

    ok: bool
    output: str


# --------------------------------------------------------------------------------------------------
# operation guards: each refuses *before* computing something too large


def _check_int(x: Any) -> None:
    if isinstance(x, int) and not isinstance(x, bool) and x.bit_length() > MAX_INT_BITS:
        raise ToolError("number too large")


def _check_str(s: Any) -> None:
    if isinstance(s, str) and len(s) > MAX_STR_LEN:
        raise ToolError("string too long")


def _is_int(x: Any) -> bool:
    return isinstance(x, int)  # bool counts as int, as in Python


def _num_or_str(x: Any) -> bool:
    return isinstance(x, (int, float, str))


def _add(a: Any, b: Any) -> Any:
    if isinstance(a, str) and isinstance(b, str) and len(a) + len(b) > MAX_STR_LEN:
        raise ToolError("string too long")
    return a + b


def _mul(a: Any, b: Any) -> Any:
    if isinstance(a, str) or isinstance(b, str):
        s, n = (a, b) if isinstance(a, str) else (b, a)
        if not _is_int(n) or not isinstance(s, str):
            raise ToolError("unsupported operand types for *")
        if len(s) * max(0, n) > MAX_STR_LEN:
            raise ToolError("string too long")
        return s * n
    if _is_int(a) and _is_int(b) and a.bit_length() + b.bit_length() > MAX_INT_BITS:
        raise ToolError("number too large")
    return a * b


def _pow(a: Any, b: Any) -> Any:
    if _is_int(a) and _is_int(b) and b > 0 and abs(a) > 1:
        # |a|**b has about b*log2|a| bits: refuse before Python spends seconds computing it
        if b * math.log2(abs(a)) > MAX_INT_BITS:
            raise ToolError("power too large")
    if isinstance(a, float) or isinstance(b, float):
        try:  # float powers are fast; only overflow and complex results need care
            r = float(a) ** float(b)
        except (OverflowError, ZeroDivisionError) as e:
            raise ToolError("result too large" if isinstance(e, OverflowError) else "division by zero") from e
        if isinstance(r, complex):
            raise ToolError("complex result")
        return r
    return a ** b


def _mod(a: Any, b: Any) -> Any:
    if isinstance(a, str):  # printf-style formatting could build huge strings from tiny input
        raise ToolError("string formatting is not supported")
    return a % b


_BINOPS: dict[type, Callable[[Any, Any], Any]] = {
    ast.Add: _add, ast.Sub: operator.sub, ast.Mult: _mul, ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv, ast.Mod: _mod, ast.Pow: _pow,
}
_UNARYOPS: dict[type, Callable[[Any], Any]] = {ast.UAdd: operator.pos, ast.USub: operator.neg, ast.Not: operator.not_}
_CMPOPS: dict[type, Callable[[Any, Any], Any]] = {
    ast.Eq: operator.eq, ast.NotEq: operator.ne, ast.Lt: operator.lt, ast.LtE: operator.le,
    ast.Gt: operator.gt, ast.GtE: operator.ge,
    ast.In: lambda a, b: operator.contains(b, a), ast.NotIn: lambda a, b: not operator.contains(b, a),
}


def _safe_int(x: Any) -> int:
    if isinstance(x, str) and len(x.strip()) > 400:  # str->int is quadratic in the digit count
        raise ToolError("number too large")
    if isinstance(x, float) and not math.isfinite(x):
        raise ToolError("cannot convert non-finite float to int")
    return int(x)


def _safe_round(x: Any, nd: Any = None) -> Any:
    if nd is not None and (not _is_int(nd) or abs(nd) > 100):
        raise ToolError("round() digits must be a small integer")
    return round(x) if nd is None else round(x, nd)


def _safe_str(x: Any) -> str:
    return x if isinstance(x, str) else _format_value(x)


def _minmax(fn: Callable) -> Callable:
    def call(*args: Any) -> Any:
        if len(args) == 1 and isinstance(args[0], str):
            return fn(args[0])
        if len(args) < 2 or not all(isinstance(a, (int, float)) for a in args):
            raise ToolError(f"{fn.__name__}() takes two or more numbers (or one string)")
        return fn(args)
    return call


_FUNCTIONS: dict[str, Callable[..., Any]] = {
    "len": len, "abs": abs, "round": _safe_round, "min": _minmax(min), "max": _minmax(max),
    "int": _safe_int, "float": float, "str": _safe_str,
}


def _replace(s: str, old: Any, new: Any, count: Any = -1) -> str:
    if not isinstance(old, str) or not isinstance(new, str) or not _is_int(count):
        raise ToolError("replace() takes two strings and an optional count")
    n = (len(s) + 1 if old == "" else s.count(old))
    if count >= 0:
        n = min(n, count)
    if len(s) + n * (len(new) - len(old)) > MAX_STR_LEN:  # bound the result before building it
        raise ToolError("string too long")
    return s.replace(old, new, count)


# str methods callable on a str receiver; none of them can grow a string except replace (guarded)
_STR_METHODS: dict[str, Callable[..., Any]] = {
    name: getattr(str, name) for name in (
        "count", "upper", "lower", "startswith", "endswith", "find", "rfind", "index", "strip",
        "lstrip", "rstrip", "capitalize", "title", "swapcase", "isdigit", "isalpha", "isalnum",
        "isupper", "islower", "isspace")
}
_STR_METHODS["replace"] = _replace


# --------------------------------------------------------------------------------------------------
# the tree walker


class _Evaluator:
    def __init__(self, deadline: float):
        self.deadline = deadline

    def eval(self, node: ast.AST) -> Any:
        if time.monotonic() > self.deadline:
            raise ToolError("timed out")
        method = getattr(self, "_" + type(node).__name__, None)
        if method is None:
            raise ToolError(f"{_describe(node)} is not allowed")
        result = method(node)
        _check_int(result)
        _check_str(result)
        return result

    def _Expression(self, node: ast.Expression) -> Any:
        return self.eval(node.body)

    def _Constant(self, node: ast.Constant) -> Any:
        if node.value is None or isinstance(node.value, (bool, int, float, str)):
            return node.value
        raise ToolError(f"constant of type {type(node.value).__name__} is not allowed")

    def _BinOp(self, node: ast.BinOp) -> Any:
        fn = _BINOPS.get(type(node.op))
        if fn is None:
            raise ToolError(f"operator {type(node.op).__name__} is not allowed")
        a, b = self.eval(node.left), self.eval(node.right)
        if not (_num_or_str(a) and _num_or_str(b)):
            raise ToolError("operands must be numbers or strings")
        return fn(a, b)

    def _UnaryOp(self, node: ast.UnaryOp) -> Any:
        fn = _UNARYOPS.get(type(node.op))
        if fn is None:
            raise ToolError(f"operator {type(node.op).__name__} is not allowed")
        return fn(self.eval(node.operand))

    def _BoolOp(self, node: ast.BoolOp) -> Any:
        is_and = isinstance(node.op, ast.And)
        value: Any = None
        for child in node.values:  # short-circuit like Python
            value = self.eval(child)
            if bool(value) != is_and:
                return value
        return value

    def _Compare(self, node: ast.Compare) -> Any:
        left = self.eval(node.left)
        for op, comp in zip(node.ops, node.comparators):
            fn = _CMPOPS.get(type(op))
            if fn is None:
                raise ToolError(f"comparison {type(op).__name__} is not allowed")
            right = self.eval(comp)
            if not fn(left, right):
                return False
            left = right
        return True

    def _IfExp(self, node: ast.IfExp) -> Any:
        return self.eval(node.body) if self.eval(node.test) else self.eval(node.orelse)

    def _Subscript(self, node: ast.Subscript) -> Any:
        value = self.eval(node.value)
        if not isinstance(value, str):
            raise ToolError("only strings can be indexed")
        if isinstance(node.slice, ast.Slice):
            parts = [None if p is None else self.eval(p) for p in (node.slice.lower, node.slice.upper, node.slice.step)]
            if not all(p is None or _is_int(p) for p in parts):
                raise ToolError("slice bounds must be integers")
            return value[slice(*parts)]
        index = self.eval(node.slice)
        if not _is_int(index):
            raise ToolError("string indices must be integers")
        return value[index]

    def _Call(self, node: ast.Call) -> Any:
        if node.keywords:
            raise ToolError("keyword arguments are not allowed")
        if any(isinstance(a, ast.Starred) for a in node.args):
            raise ToolError("starred arguments are not allowed")
        func = node.func
        if isinstance(func, ast.Name):
            fn = _FUNCTIONS.get(func.id)
            if fn is None:
                raise ToolError(f"function {func.id!r} is not allowed")
            return fn(*[self.eval(a) for a in node.args])
        if isinstance(func, ast.Attribute):
            method = _STR_METHODS.get(func.attr)
            if method is None:
                raise ToolError(f"method {func.attr!r} is not allowed")
            receiver = self.eval(func.value)
            if type(receiver) is not str:
                raise ToolError(f"method {func.attr!r} is only allowed on strings")
            return method(receiver, *[self.eval(a) for a in node.args])
        raise ToolError("only calls of whitelisted functions and string methods are allowed")


def _describe(node: ast.AST) -> str:
    names = {"Name": "a name", "Attribute": "attribute access", "Import": "import", "Lambda": "lambda",
             "ListComp": "a comprehension", "GeneratorExp": "a comprehension", "List": "a list",
             "Dict": "a dict", "Tuple": "a tuple", "Set": "a set", "NamedExpr": "assignment",
             "JoinedStr": "an f-string"}
    kind = type(node).__name__
    if isinstance(node, ast.Name):
        return f"name {node.id!r}"
    return names.get(kind, kind)


def _format_value(value: Any) -> str:
    """Text the model sees. Integral floats print without '.0' (48/2 -> 24, like a calculator);
    other floats keep 12 significant digits so long binary tails do not flood the context."""
    if isinstance(value, float):
        if math.isfinite(value) and value == int(value) and abs(value) < 1e15:
            return str(int(value))
        return format(value, ".12g")
    return str(value)


def _parse(expr: str) -> ast.Expression:
    if not isinstance(expr, str):
        raise ToolError("expression must be a string")
    expr = expr.strip()
    if not expr:
        raise ToolError("empty expression")
    if len(expr) > MAX_EXPR_CHARS:
        raise ToolError(f"expression longer than {MAX_EXPR_CHARS} characters")
    if "__" in expr:  # dunders are never needed by a calculator; refuse even inside strings
        raise ToolError("double underscores are not allowed")
    try:
        tree = ast.parse(expr, mode="eval")
    except SyntaxError as e:
        raise ToolError(f"invalid syntax ({e.msg})") from e
    except (RecursionError, MemoryError, ValueError) as e:
        raise ToolError("expression too complex") from e
    n = sum(1 for _ in ast.walk(tree))
    if n > MAX_NODES:
        raise ToolError(f"expression too complex ({n} nodes > {MAX_NODES})")
    return tree


def evaluate(expr: str, timeout: float = 1.0) -> Any:
    """Evaluate in the calling thread (no worker): the Python value, or raise ToolError."""
    tree = _parse(expr)
    try:
        return _Evaluator(time.monotonic() + timeout).eval(tree)
    except ToolError:
        raise
    except RecursionError as e:
        raise ToolError("expression too complex") from e
    except Exception as e:  # ZeroDivisionError, TypeError, IndexError, ValueError, OverflowError ...
        raise ToolError(f"{type(e).__name__}: {e}") from e


def _run(expr: str, timeout: float) -> ToolResult:
    try:
        text = _format_value(evaluate(expr, timeout))
    except ToolError as e:
        return ToolResult(False, f"Error: {e}")
    except Exception as e:  # never let the tool crash the engine
        return ToolResult(False, f"Error: {type(e).__name__}: {e}")
    if len(text) > MAX_OUTPUT_CHARS:
        text = text[:MAX_OUTPUT_CHARS] + f"... ({len(text)} characters)"
    return ToolResult(True, text)


def call_tool(expr: str, timeout: float = 1.0) -> ToolResult:
    """Evaluate `expr` in a daemon worker thread, waiting at most `timeout` seconds. Never raises."""
    box: list[ToolResult] = []
    worker = threading.Thread(target=lambda: box.append(_run(expr, timeout)), daemon=True,
                              name="picochat-tool")
    try:
        worker.start()
        worker.join(max(0.0, timeout) + 0.05)  # small grace: the walker's own deadline fires first
    except Exception as e:  # e.g. cannot start a thread
        return ToolResult(False, f"Error: {type(e).__name__}: {e}")
    if not box:
        return ToolResult(False, f"Error: timed out after {timeout:g} s")
    return box[0]


def run_python_tool(expr: str, timeout: float = 1.0) -> str:
    """The text to inject as the tool's output: the value, or "Error: ..."; never raises."""
    return call_tool(expr, timeout).output


def run_python_tool_inline(expr: str, timeout: float = 1.0) -> str:
    """Same text as `run_python_tool`, evaluated in the calling thread (no worker thread, ~50x
    cheaper). Only the walker's deadline and the size guards bound it: meant for data generation
    over expressions we wrote ourselves, not for model output."""
    return _run(expr, timeout).output
