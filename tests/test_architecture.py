"""The house reads in one direction: every picochat module imports only rooms below its own.

Parses every module's imports with `ast` (function-level imports included: a lazy import is still a
dependency) and checks them against the room order documented in docs/ARCHITECTURE.md. A new module
outside every room fails here with a message saying where to add it.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "picochat"

# Rooms, bottom first. A module may import its own room and any room of a lower level; never up,
# never sideways. Keep in step with docs/ARCHITECTURE.md.
LEVELS: list[tuple[str, ...]] = [
    ("picochat", "picochat.config"),
    ("picochat.common", "picochat.options"),
    # infer.tools is the calculator: pure Python, imports nothing; data renders tool outputs with it
    ("picochat.recipes", "picochat.tokenizer", "picochat.model", "picochat.infer.tools"),
    ("picochat.runs",),
    ("picochat.data",),
    ("picochat.tokenizer_cli",),
    ("picochat.infer",),
    ("picochat.eval",),
    ("picochat.train",),
    ("picochat.export", "picochat.report"),
    ("picochat.pipeline", "picochat.demo", "picochat.serve", "picochat.bench"),
    ("picochat.cli",),
    ("picochat.__main__",),
]
# Named exceptions to "any lower room"; each says why.
FORBIDDEN: dict[str, tuple[str, ...]] = {
    # FastAPI/uvicorn are an optional extra: only the server (and its benchmark) may need them
    "*": ("picochat.serve",),
}
ALLOWED_SERVE = ("picochat.serve", "picochat.bench", "picochat.cli")


def room_of(module: str) -> tuple[int, str]:
    best: tuple[int, str] | None = None
    for level, rooms in enumerate(LEVELS):
        for room in rooms:
            if (module == room or module.startswith(room + ".")) and (best is None or len(room) > len(best[1])):
                best = (level, room)
    if best is None or (best[1] == "picochat" and module != "picochat"):
        raise LookupError(module)
    return best


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module) for every picochat import in the file."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "picochat"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "picochat":
                continue
            if node.module is None or target in ("picochat",):
                # `from . import x` / `from picochat import x`: each name may be a submodule
                found += [(node.lineno, f"{target}.{a.name}") for a in node.names]
            else:
                found.append((node.lineno, target))
    return found


def modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def test_every_module_is_in_a_room():
    homeless = []
    for path in modules():
        try:
            room_of(module_name(path))
        except LookupError:
            homeless.append(module_name(path))
    assert not homeless, (f"modules outside every room: {homeless}; add them to LEVELS in "
                          "tests/test_architecture.py and to docs/ARCHITECTURE.md")


def test_imports_point_down():
    wrong = []
    for path in modules():
        me = module_name(path)
        my_level, my_room = room_of(me)
        for line, target in imports_of(path):
            try:
                level, room = room_of(target)
            except LookupError:
                try:  # `from .pkg import name` where name is not a module: judge by the package
                    level, room = room_of(target.rpartition(".")[0])
                except LookupError:
                    continue
            if room == my_room:
                continue
            if room.startswith("picochat.serve") and not my_room.startswith(ALLOWED_SERVE):
                wrong.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports {target} (only serve may)")
            elif level >= my_level:
                wrong.append(f"{path.relative_to(PACKAGE.parent)}:{line} ({my_room}) imports {target} "
                             f"({room}, not below it)")
    assert not wrong, "imports that point up or sideways:\n" + "\n".join(wrong)


def test_infer_eval_data_never_import_train():
    for path in modules():
        me = module_name(path)
        if me.startswith(("picochat.infer", "picochat.eval", "picochat.data")):
            bad = [t for _, t in imports_of(path) if t.startswith("picochat.train")]
            assert not bad, f"{me} imports {bad}"


def test_no_import_cycles():
    """No module reaches itself through its imports (e.g. data.download <-> data.sources once did)."""
    names = {module_name(p) for p in modules()}
    graph = {module_name(p): sorted({t for _, t in imports_of(p)} & names - {module_name(p)}) for p in modules()}
    cycles, state = [], {}

    def visit(m: str, stack: list[str]) -> None:
        state[m] = "open"
        for t in graph[m]:
            if state.get(t) == "open":
                cycles.append(" -> ".join(stack[stack.index(t):] + [t]))
            elif t not in state:
                visit(t, stack + [t])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)
