"""The house's floors (docs/structure.md): nothing in `core/`, `live/` or `serve/` loads simpy,
`core/` loads no torch, `sim/` no torch, and no module imports a floor above its own."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "dlora"

# package -> packages it must never import (statically, at any depth: lazy imports count)
FORBIDDEN: dict[str, tuple[str, ...]] = {
    "core": ("sim", "live", "serve", "studies", "cli", "exec", "kernels", "profiling"),
    "sim": ("live", "serve", "studies", "cli", "exec", "kernels"),
    "live": ("sim", "serve", "studies", "cli"),
    "serve": ("sim", "studies", "cli"),
    "exec": ("sim", "live", "serve", "studies", "cli"),
    "kernels": ("sim", "live", "serve", "studies", "cli", "exec"),
    "profiling": ("sim", "live", "serve", "studies", "cli"),
    "studies": ("cli",),
}


def _imports(path: Path) -> set[str]:
    """Every dlora package a module imports (first name under `dlora.`)."""
    rel = path.relative_to(PACKAGE.parent).with_suffix("").parts
    here = list(rel[:-1])  # the package the module is in
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[: len(here) - node.level + 1]
                names = [".".join([*base, node.module or ""]).rstrip(".")]
            else:
                names = [node.module or ""]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "dlora" and len(parts) > 1:
                out.add(parts[1])
    return out


@pytest.mark.parametrize("floor", sorted(FORBIDDEN))
def test_no_floor_imports_one_it_must_not(floor: str) -> None:
    bad = [f"{p.relative_to(PACKAGE.parent)} imports dlora.{pkg}"
           for p in sorted((PACKAGE / floor).rglob("*.py"))
           for pkg in sorted(_imports(p) & set(FORBIDDEN[floor]))]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize(("modules", "absent"), [
    (("dlora.serve.app", "dlora.serve", "dlora.live.engine", "dlora.live.driver", "dlora.live.worker"),
     ("simpy",)),
    (("dlora.core.cluster", "dlora.core.registries", "dlora.build"), ("simpy", "torch")),
    (("dlora.sim.driver", "dlora.studies.run"), ("torch",)),
])
def test_what_importing_loads(modules: tuple[str, ...], absent: tuple[str, ...]) -> None:
    code = (f"import sys\nimport {', '.join(modules)}\n"
            f"print(','.join(m for m in {absent!r} if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=PACKAGE.parent, check=True)
    assert done.stdout.strip() == "", f"importing {modules} loaded {done.stdout.strip()}"
