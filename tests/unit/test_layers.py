"""The import contract of docs/design.md: every module imports only from its own component
or from components below it, so the data flow reads bottom-up and nothing imports upward;
and only the driver side and `settings` import the job spec. Function-level (lazy) imports
count; `if TYPE_CHECKING:` imports do not (annotations only)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "smolvla_ray"

# component -> rank; a module may import its own component or any of lower rank.
RANKS = {
    "base": 0,  # keys, storage, hub, run_layout, lease, progress_line: nothing above
    "policy": 1,
    "data": 1,
    "spec": 2,  # the job spec: pydantic, torch-free; above the model and the data
    "features": 3,
    "settings": 3,  # RunSettings: what the worker side reads of the spec
    "checkpoint": 4,
    "cache.store": 4,
    "build": 4,
    "train": 5,  # the trainer and its Ray adapter
    "cache.build": 6,  # driver side: decides and builds the feature cache
    "evaluation": 6,  # offline `evaluate` and the async validation task (over train/)
    "observe": 6,
    "driver": 7,  # driver, prepare, jobs, cli, stop
}
BASE = {
    "keys", "storage", "hub", "run_layout", "lease", "shared_storage", "progress_line",
    "scratch", "waits",
    "__init__",
}  # fmt: skip
TOP = {"driver", "prepare", "jobs", "cli", "cli_common", "cli_jobs", "stop"}
# Who may import `smolvla_ray.spec`: the spec itself, the driver side (it reads, checks and
# pins the spec, and decides the feature cache; observe masks a recorded spec's storage
# options by its rule) and `settings`, which turns it into the `RunSettings` that everything
# below the driver takes instead.
SPEC_IMPORTERS = {"spec", "settings", "driver", "cache.build", "observe"}


def component(module: str) -> str:
    parts = module.split(".")[1:]
    if not parts or parts[0] in BASE:
        return "base"
    if parts[0] in TOP:
        return "driver"
    if parts[0] == "cache":
        return "cache.build" if parts[1:2] == ["build"] else "cache.store"
    return parts[0]


def imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    skip = {
        id(n)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
        for n in ast.walk(node)
    }
    found = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "smolvla_ray":
                found |= {f"smolvla_ray.{a.name}" for a in node.names}
            elif node.module.startswith("smolvla_ray."):
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("smolvla_ray.")}
    return found


def modules() -> dict[str, Path]:
    return {
        ".".join(("smolvla_ray", *p.relative_to(PACKAGE).with_suffix("").parts)): p
        for p in PACKAGE.rglob("*.py")
    }


def test_every_component_is_ranked() -> None:
    assert {component(m) for m in modules()} <= set(RANKS)


def test_nothing_imports_upward_or_sideways() -> None:
    violations = []
    for module, path in sorted(modules().items()):
        mine = component(module)
        for target in sorted(imports(path)):
            theirs = component(target)
            if theirs != mine and RANKS[theirs] >= RANKS[mine]:
                violations.append(f"{module} ({mine}) imports {target} ({theirs})")
    assert not violations, "\n".join(violations)


def spec_imports(path: Path) -> list[str]:
    """The imports of `smolvla_ray.spec` (or a module of it) in the file at `path`."""
    return sorted(
        t for t in imports(path) if t == "smolvla_ray.spec" or t.startswith("smolvla_ray.spec.")
    )


def test_only_the_driver_side_and_settings_import_the_spec() -> None:
    """Below the driver, the trainer, its Ray adapter, the checkpointer, the builders, the
    cache store and the validation task take `RunSettings`: they depend on the values they
    use, not on the spec's shape, and the spec's rules stay the driver's."""
    violations = [
        f"{module} ({component(module)}) imports {target}: take settings.RunSettings instead"
        for module, path in sorted(modules().items())
        if component(module) not in SPEC_IMPORTERS
        for target in spec_imports(path)
    ]
    assert not violations, "\n".join(violations)


def test_spec_imports_are_found_lazy_or_not_but_not_for_annotations(tmp_path: Path) -> None:
    cases = {
        "def lazy():\n    from smolvla_ray.spec import JobSpec\n": ["smolvla_ray.spec"],
        "from smolvla_ray import spec\n": ["smolvla_ray.spec"],
        "import smolvla_ray.spec.job as job\n": ["smolvla_ray.spec.job"],
        "from smolvla_ray.spec.sections import DataSpec\n": ["smolvla_ray.spec.sections"],
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
        "    from smolvla_ray.spec import JobSpec\n": [],
        "from smolvla_ray.settings import RunSettings\n": [],
    }
    source = tmp_path / "module.py"
    for text, expected in cases.items():
        source.write_text(text)
        assert spec_imports(source) == expected, text


def test_no_import_cycles_between_modules() -> None:
    known = modules()
    graph = {m: {t for t in imports(p) if t in known and t != m} for m, p in known.items()}
    graph = {m: {t for t in ts if not t.endswith("__init__")} for m, ts in graph.items()}
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join([*stack[stack.index(nxt) :], nxt]))
            elif nxt not in state:
                visit(nxt, [*stack, nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, "\n".join(cycles)


def test_the_driver_reaches_ray_without_importing_the_model() -> None:
    """Every `run` pays for what its driver imports before Ray starts: the model's stack
    (transformers, about 4 s of CPU) belongs on the workers, which build the policy."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "import smolvla_ray.cli, smolvla_ray.driver, smolvla_ray.jobs\n"
        "import smolvla_ray.build, smolvla_ray.cache.build, smolvla_ray.train.loop\n"
        "loaded = [m for m in sys.modules if m.split('.')[0] == 'transformers'\n"
        "          or m == 'smolvla_ray.policy.modeling']\n"
        "assert not loaded, loaded[-3:]\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
