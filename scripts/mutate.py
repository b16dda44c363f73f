"""Mutation testing of the bounded-state core: `make mutation` (or `python scripts/mutate.py`).

For each module listed in scripts/mutation.toml, every mutant (one small AST change:
a flipped comparison, a numeric constant shifted by one, `and`/`or` swapped, a condition
negated, a statement dropped, a `return` of None) is run against that module's fast unit
tests (`pytest -x -q`). A mutant the tests pass is a survivor. Mutants judged to change no
behaviour are listed in the config with the reason and counted as caught.

How a mutant is loaded: the parent imports the project and its libraries once, then forks one
child per mutant; the child swaps the `__code__` of each function of the module for the
mutated one and runs pytest in-process. The mutator only touches function bodies, so this is
exact, and every reference taken at import time (`from ... import TTLMap`) sees the mutant.
Why not files in a temp tree: the package is installed in editable mode from src/, which
shadows a copied tree; and forking saves each mutant the import time of the whole stack.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import importlib
import json
import os
import signal
import subprocess
import sys
import time
import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FunctionType
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "scripts" / "mutation.toml"

# Imported once in the parent so each forked child skips their import time. Never the project's own.
PREIMPORT = (
    "pytest",
    "_pytest.python",
    "hypothesis",
    "msgspec",
    "structlog",
    "pydantic",
    "pydantic_settings",
    "websockets",
    "starlette",
    "uvicorn",
    "redis.asyncio",
    "httpx",
    "openai",
    "click",
    "rich",
    "prometheus_client",
    "psutil",
    "cryptography",
)  # pytest plugins stay out: pytest warns (an error here) when a plugin was imported before it

_CMP_SWAP: dict[type[ast.cmpop], type[ast.cmpop]] = {
    ast.Lt: ast.LtE,
    ast.LtE: ast.Lt,
    ast.Gt: ast.GtE,
    ast.GtE: ast.Gt,
    ast.Eq: ast.NotEq,
    ast.NotEq: ast.Eq,
    ast.Is: ast.IsNot,
    ast.IsNot: ast.Is,
    ast.In: ast.NotIn,
    ast.NotIn: ast.In,
}
_CMP_TEXT: dict[type[ast.cmpop], str] = {
    ast.Lt: "<",
    ast.LtE: "<=",
    ast.Gt: ">",
    ast.GtE: ">=",
    ast.Eq: "==",
    ast.NotEq: "!=",
    ast.Is: "is",
    ast.IsNot: "is not",
    ast.In: "in",
    ast.NotIn: "not in",
}
_DROPPABLE = (
    ast.Expr,
    ast.Assign,
    ast.AugAssign,
    ast.AnnAssign,
    ast.Raise,
    ast.Continue,
    ast.Break,
    ast.Delete,
    ast.Assert,
    ast.If,
)


@dataclass
class Mutant:
    module: str  # repo-relative path
    index: int  # position in traversal order: stable for a given source text
    line: int
    qualname: str
    kind: str
    description: str
    snippet: str
    key: str = ""  # `qualname: description: snippet`, independent of line numbers
    status: str = "pending"  # killed | survived | timeout | equivalent
    exit_code: int | None = None
    seconds: float = 0.0


def _snippet(node: ast.AST) -> str:
    text = ast.unparse(node).splitlines()[0]
    return text if len(text) <= 80 else text[:77] + "..."


class Mutator(ast.NodeTransformer):
    """Walks function bodies in a fixed order, numbering each mutation point.

    With `target=None` it only records the points; with `target=i` it applies point i.
    Everything outside functions (imports, class attributes, annotations, defaults) is left alone.
    """

    def __init__(self, module: str, target: int | None = None) -> None:
        self.module = module
        self.target = target
        self.points: list[Mutant] = []
        self.applied = False
        self._scope: list[str] = []
        self._in_function = 0
        self._negated_tests: set[int] = set()

    # -- bookkeeping -----------------------------------------------------------------------------
    def _point(self, node: ast.AST, kind: str, description: str, snippet_of: ast.AST | None = None) -> bool:
        index = len(self.points)
        self.points.append(
            Mutant(
                module=self.module,
                index=index,
                line=getattr(node, "lineno", 0),
                qualname=".".join(self._scope) or "<module>",
                kind=kind,
                description=description,
                snippet=_snippet(snippet_of or node),
            )
        )
        if index == self.target:
            self.applied = True
            return True
        return False

    def _walk(self, node: ast.AST) -> ast.AST:
        for name, value in ast.iter_fields(node):
            if isinstance(value, list):
                if value and all(isinstance(v, ast.stmt) for v in value):
                    setattr(node, name, self._body(value))
                else:
                    setattr(node, name, [self.visit(v) if isinstance(v, ast.AST) else v for v in value])
            elif isinstance(value, ast.AST):
                setattr(node, name, self.visit(value))
        return node

    def _body(self, stmts: list[ast.stmt]) -> list[ast.stmt]:
        out: list[ast.stmt] = []
        for stmt in stmts:
            # A docstring or a protocol's `...` body: dropping it changes nothing.
            if isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant):
                out.append(stmt)
                continue
            if (
                self._in_function
                and isinstance(stmt, _DROPPABLE)
                and self._point(stmt, "drop", "drop statement", stmt)
            ):
                out.append(ast.copy_location(ast.Pass(), stmt))
                continue
            out.append(self.visit(stmt))
        return out

    def generic_visit(self, node: ast.AST) -> ast.AST:
        return self._walk(node)

    # -- scopes ------------------------------------------------------------------------------------
    def visit_ClassDef(self, node: ast.ClassDef) -> ast.AST:
        self._scope.append(node.name)
        node.body = self._body(node.body)
        self._scope.pop()
        return node

    def _function(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> ast.AST:
        # Arguments, defaults, decorators and annotations are not mutated: only the body.
        self._scope.append(node.name)
        self._in_function += 1
        node.body = self._body(node.body)
        self._in_function -= 1
        self._scope.pop()
        return node

    visit_FunctionDef = _function
    visit_AsyncFunctionDef = _function

    def visit_Lambda(self, node: ast.Lambda) -> ast.AST:
        node.body = self.visit(node.body)
        return node

    # -- mutation points ---------------------------------------------------------------------------
    def visit_Compare(self, node: ast.Compare) -> ast.AST:
        if self._in_function:
            for i, op in enumerate(node.ops):
                swapped = _CMP_SWAP.get(type(op))
                if swapped is None:
                    continue
                desc = f"`{_CMP_TEXT[type(op)]}` -> `{_CMP_TEXT[swapped]}`"
                if self._point(node, "compare", desc):
                    node.ops = [*node.ops[:i], swapped(), *node.ops[i + 1 :]]
        return self._walk(node)

    def visit_BoolOp(self, node: ast.BoolOp) -> ast.AST:
        if self._in_function:
            is_and = isinstance(node.op, ast.And)
            desc = "`and` -> `or`" if is_and else "`or` -> `and`"
            if self._point(node, "boolop", desc):
                node.op = ast.Or() if is_and else ast.And()
        return self._walk(node)

    def _negate_test(self, node: ast.If | ast.While | ast.IfExp, what: str) -> None:
        self._negated_tests.add(id(node.test))
        if self._in_function and self._point(node.test, "negate", f"negate `{what}` condition"):
            node.test = ast.copy_location(ast.UnaryOp(op=ast.Not(), operand=node.test), node.test)

    def visit_If(self, node: ast.If) -> ast.AST:
        self._negate_test(node, "if")
        return self._walk(node)

    def visit_While(self, node: ast.While) -> ast.AST:
        self._negate_test(node, "while")
        return self._walk(node)

    def visit_IfExp(self, node: ast.IfExp) -> ast.AST:
        self._negate_test(node, "if-else")
        return self._walk(node)

    def visit_UnaryOp(self, node: ast.UnaryOp) -> ast.AST:
        # `if not x` negated is already `if x`: only count `not` elsewhere (returns, assignments).
        if (
            self._in_function
            and isinstance(node.op, ast.Not)
            and id(node) not in self._negated_tests
            and self._point(node, "negate", "drop `not`")
        ):
            operand: ast.AST = self.visit(node.operand)
            return operand
        return self._walk(node)

    def visit_Constant(self, node: ast.Constant) -> ast.AST:
        value = node.value
        if not self._in_function:
            return node
        if isinstance(value, bool):
            if self._point(node, "constant", f"`{value}` -> `{not value}`"):
                return ast.copy_location(ast.Constant(not value), node)
        elif isinstance(value, int | float):
            for delta in (1, -1):
                new = value + delta
                if self._point(node, "constant", f"`{value!r}` -> `{new!r}`"):
                    return ast.copy_location(ast.Constant(new), node)
        return node

    def visit_JoinedStr(self, node: ast.JoinedStr) -> ast.AST:
        return node  # f-string text (log and error messages) is not behaviour under test

    def visit_Return(self, node: ast.Return) -> ast.AST:
        value = node.value
        is_none = value is None or (isinstance(value, ast.Constant) and value.value is None)
        if self._in_function and not is_none and self._point(node, "return", "return None", node):
            return ast.copy_location(ast.Return(value=ast.Constant(None)), node)
        return self._walk(node)


def enumerate_mutants(path: str, source: str) -> list[Mutant]:
    mutator = Mutator(path)
    mutator.visit(ast.parse(source))
    seen: dict[str, int] = {}
    for m in mutator.points:
        base = f"{m.qualname}: {m.description}: {m.snippet}"
        seen[base] = seen.get(base, 0) + 1
        m.key = base if seen[base] == 1 else f"{base} #{seen[base]}"
    return mutator.points


def mutated_source(path: str, source: str, index: int) -> str:
    mutator = Mutator(path, target=index)
    tree = mutator.visit(ast.parse(source))
    if not mutator.applied:
        raise RuntimeError(f"{path}: mutant {index} was not applied")
    return ast.unparse(ast.fix_missing_locations(tree))


# -- running ---------------------------------------------------------------------------------------
def _patch_function(orig: object, new: object, where: str) -> None:
    if isinstance(orig, staticmethod | classmethod) and isinstance(new, staticmethod | classmethod):
        orig, new = orig.__func__, new.__func__
        if orig is new:
            return  # wraps the same object (a builtin such as time.time): no code of ours to move
    if isinstance(orig, property) and isinstance(new, property):
        for part in ("fget", "fset", "fdel"):
            if getattr(orig, part) is not None:
                _patch_function(getattr(orig, part), getattr(new, part), f"{where}.{part}")
        return
    if isinstance(orig, FunctionType) and isinstance(new, FunctionType):
        # Same function object, new body: every reference taken at import time sees the mutant.
        orig.__code__ = new.__code__
        return
    if isinstance(orig, type) and isinstance(new, type):
        for name, value in vars(new).items():
            patchable = isinstance(value, FunctionType | staticmethod | classmethod | property | type)
            if patchable and name in vars(orig) and vars(orig)[name] is not value:
                _patch_function(vars(orig)[name], value, f"{where}.{name}")
        return
    raise TypeError(f"cannot move the mutant's code into {where}")


def patch_module(name: str, path: str, source: str) -> None:
    """Swap the code of every function of the loaded module `name` for the mutated source's.

    The mutator only changes function bodies, so the mutated module has the same functions and
    classes: executing it in a scratch namespace and moving the code objects over is exact.
    """
    module = sys.modules[name]
    scratch: dict[str, Any] = {"__name__": name, "__file__": path}
    exec(compile(source, path, "exec"), scratch)
    for attr, value in scratch.items():
        orig = getattr(module, attr, None)
        if orig is None or orig is value:
            continue
        if isinstance(value, FunctionType | type) and value.__module__ == name:
            _patch_function(orig, value, attr)


def module_name(path: str) -> str:
    rel = Path(path).with_suffix("")
    parts = rel.parts[1:] if rel.parts[0] == "src" else rel.parts
    return ".".join(parts)


def _child(
    pytest_args: list[str], module: str | None, source: str | None, log: Path | None, test_timeout_s: float
) -> None:
    """Runs in the forked child: never returns."""
    code = 3
    patched = module is None
    try:
        target = os.open(log if log else os.devnull, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(target, 1)
        os.dup2(target, 2)
        if module is not None and source is not None:
            patch_module(module_name(module), str(ROOT / module), source)
        patched = True
        import pytest

        # Third-party packages imported before pytest (see PREIMPORT) cannot be assertion-rewritten: fine.
        quiet = ["-W", "ignore::pytest.PytestAssertRewriteWarning"]
        # A per-test timeout turns a mutant that hangs (a loop that never ends, a stop() that never
        # returns) into a failed test in seconds rather than a killed run after the whole budget.
        limit = ["--timeout", str(test_timeout_s)]
        code = int(pytest.main([*pytest_args, "-x", "-q", "-p", "no:cacheprovider", *quiet, *limit]))
    except BaseException:
        import traceback

        traceback.print_exc()
        if not patched:
            code = PATCH_FAILED
    finally:
        # os._exit skips interpreter shutdown, so flush what pytest printed first.
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


PATCH_FAILED = 99  # the child's exit code when the mutant could not be loaded (reported, not counted)


@dataclass
class Job:
    module: str
    pytest_args: list[str]
    timeout_s: float
    test_timeout_s: float
    mutant: Mutant | None = None  # None: the baseline run of the unmutated module
    source: str | None = None
    log: Path | None = None
    pid: int = 0
    started: float = 0.0
    result: int | None = field(default=None)
    timed_out: bool = False


def run_jobs(jobs: list[Job], workers: int, progress: bool) -> None:
    pending = list(reversed(jobs))
    running: dict[int, Job] = {}
    done = 0
    while pending or running:
        while pending and len(running) < workers:
            job = pending.pop()
            job.started = time.monotonic()
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                _child(
                    job.pytest_args,
                    job.module if job.mutant else None,
                    job.source,
                    job.log,
                    job.test_timeout_s,
                )
            job.pid = pid
            running[pid] = job
        pid, status = os.waitpid(-1, os.WNOHANG)
        if pid == 0:
            now = time.monotonic()
            for job in running.values():
                if now - job.started > job.timeout_s and not job.timed_out:
                    job.timed_out = True
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(job.pid, signal.SIGKILL)
            time.sleep(0.01)
            continue
        job = running.pop(pid)
        job.result = os.waitstatus_to_exitcode(status)
        if job.mutant is not None:
            job.mutant.seconds = round(time.monotonic() - job.started, 2)
            job.mutant.exit_code = job.result
            if job.timed_out:
                job.mutant.status = "timeout"
            elif job.result == PATCH_FAILED:
                job.mutant.status = "error"
            else:
                job.mutant.status = "survived" if job.result == 0 else "killed"
        done += 1
        if progress and sys.stderr.isatty():
            print(f"\r  {done}/{len(jobs)}", end="", file=sys.stderr, flush=True)
        elif progress and (done % 50 == 0 or done == len(jobs)):
            print(f"  {done}/{len(jobs)}", file=sys.stderr, flush=True)
    if progress and sys.stderr.isatty():
        print(file=sys.stderr)


def preimport(project_modules: list[str]) -> None:
    for name in PREIMPORT:
        with contextlib.suppress(ImportError):
            importlib.import_module(name)
    for name in project_modules:
        importlib.import_module(name)


def changed_files(rev: str) -> set[str] | None:
    """Repo-relative paths that differ between `rev` and HEAD; None when `rev` is unknown."""
    try:
        out = subprocess.run(
            ["git", "diff", "--name-only", rev, "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        )
    except (OSError, subprocess.CalledProcessError):
        return None
    return set(out.stdout.split())


def load_config(path: Path) -> dict[str, Any]:
    with path.open("rb") as f:
        return tomllib.load(f)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--config", type=Path, default=CONFIG)
    parser.add_argument("--module", action="append", default=[], help="only modules whose path contains this")
    parser.add_argument("--jobs", type=int, default=None, help="parallel test runs (default from config)")
    parser.add_argument("--json", type=Path, default=ROOT / ".mutation" / "results.json")
    parser.add_argument("--list", action="store_true", help="list the mutants, run nothing")
    parser.add_argument("--show", metavar="KEY_OR_INDEX", help="print the mutated source of one mutant")
    parser.add_argument("--logs", action="store_true", help="keep each mutant's pytest output in .mutation/")
    parser.add_argument(
        "--changed-since",
        metavar="REV",
        help="only modules whose source or mapped test files differ between REV and HEAD (for CI)",
    )
    args = parser.parse_args(argv)

    config = load_config(args.config)
    settings = config.get("settings", {})
    workers = max(1, args.jobs or int(settings.get("jobs", 2)))
    threshold = float(settings.get("threshold", 90))
    test_timeout = float(settings.get("test_timeout_s", 15))
    modules = [m for m in config["module"] if not args.module or any(s in m["path"] for s in args.module)]
    if not modules:
        print("no module matches", file=sys.stderr)
        return 2
    if args.changed_since:
        changed = changed_files(args.changed_since)
        if changed is None:
            print(f"mutation: cannot diff against {args.changed_since}: skipped", file=sys.stderr)
            return 0
        modules = [m for m in modules if {m["path"], *m["tests"]} & changed]
        if not modules:
            print(f"mutation: no core module or its tests changed since {args.changed_since}: skipped")
            return 0

    sources = {m["path"]: (ROOT / m["path"]).read_text() for m in modules}
    mutants = {m["path"]: enumerate_mutants(m["path"], sources[m["path"]]) for m in modules}

    if args.list or args.show:
        for path, items in mutants.items():
            for mu in items:
                if args.show is None:
                    print(f"{path}:{mu.line}: [{mu.index}] {mu.key}")
                elif args.show in (str(mu.index), mu.key):
                    print(mutated_source(path, sources[path], mu.index))
        return 0

    os.chdir(ROOT)
    os.environ.setdefault("PYTHONASYNCIODEBUG", "0")
    preimport([*settings.get("preimport", []), *(module_name(m["path"]) for m in modules)])
    started = time.monotonic()

    # Baselines: the unmutated module must pass its tests, and their time sets the mutants' timeout.
    log_dir = args.json.parent
    log_dir.mkdir(parents=True, exist_ok=True)
    baselines = [
        Job(
            m["path"],
            list(m["tests"]),
            timeout_s=600,
            test_timeout_s=test_timeout,
            log=log_dir / f"{Path(m['path']).stem}-baseline.log",
        )
        for m in modules
    ]
    run_jobs(baselines, workers, progress=False)
    timeouts: dict[str, float] = {}
    for job in baselines:
        if job.result != 0:
            print(
                f"{job.module}: its tests fail without any mutant (exit {job.result}, see {job.log})",
                file=sys.stderr,
            )
            return 2
        elapsed = time.monotonic() - job.started
        timeouts[job.module] = max(float(settings.get("min_timeout_s", 30)), 10 * elapsed)

    jobs: list[Job] = []
    for m in modules:
        for mu in mutants[m["path"]]:
            log = log_dir / f"{Path(m['path']).stem}-{mu.index}.log" if args.logs else None
            source = mutated_source(m["path"], sources[m["path"]], mu.index)
            jobs.append(Job(m["path"], list(m["tests"]), timeouts[m["path"]], test_timeout, mu, source, log))
    print(f"{len(jobs)} mutants over {len(modules)} modules, {workers} at a time", file=sys.stderr)
    run_jobs(jobs, workers, progress=True)

    report: dict[str, Any] = {"modules": {}, "seconds": 0.0}
    failed = False
    for m in modules:
        path = m["path"]
        equivalent = {e["mutant"]: e["why"] for e in m.get("equivalent", [])}
        items = mutants[path]
        keys = {mu.key for mu in items}
        for mu in items:
            if mu.status == "survived" and mu.key in equivalent:
                mu.status = "equivalent"
        counts = {
            s: sum(1 for mu in items if mu.status == s)
            for s in ("killed", "timeout", "equivalent", "survived", "error")
        }
        caught = counts["killed"] + counts["timeout"] + counts["equivalent"]
        score = 100.0 * caught / len(items) if items else 100.0
        stale = sorted(k for k in equivalent if k not in keys)
        wrongly_listed = sorted(mu.key for mu in items if mu.key in equivalent and mu.status != "equivalent")
        survivors = [mu for mu in items if mu.status in ("survived", "error")]
        failed = failed or score < threshold
        print(
            f"{path}: {score:5.1f}%  {len(items)} mutants, {counts['killed']} killed, "
            f"{counts['timeout']} timed out, {counts['equivalent']} equivalent, {counts['survived']} survived"
        )
        for mu in survivors:
            label = "SURVIVED" if mu.status == "survived" else "NOT LOADED"
            print(f"  {label} {path}:{mu.line}: {mu.description}: {mu.snippet}   [{mu.key}]")
        for key in stale:
            print(f"  note: listed as equivalent but no such mutant (source changed?): {key}")
        for key in wrongly_listed:
            print(f"  note: listed as equivalent but the tests catch it: {key}")
        report["modules"][path] = {
            "score": round(score, 1),
            "mutants": len(items),
            **counts,
            "tests": m["tests"],
            "survivors": [asdict(mu) for mu in survivors],
            "equivalent_mutants": [
                asdict(mu) | {"why": equivalent[mu.key]} for mu in items if mu.status == "equivalent"
            ],
            "stale_equivalents": stale,
            "all": [asdict(mu) for mu in items],
        }
    report["seconds"] = round(time.monotonic() - started, 1)
    report["threshold"] = threshold
    args.json.write_text(json.dumps(report, indent=2))
    print(
        f"{report['seconds']} s; results in {args.json.relative_to(ROOT) if args.json.is_relative_to(ROOT) else args.json}"
    )
    if failed:
        print(f"some module scores below {threshold:.0f}%", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
