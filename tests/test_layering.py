"""Imports go one way: api -> cluster -> workers. workers/ never imports Ray Serve or
FastAPI; api/ never touches torch.distributed or shards directly."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {
    "workers": ("api", "cluster", "ray.serve", "fastapi", "starlette", "uvicorn"),
    "cluster": ("api", "fastapi", "starlette", "uvicorn"),
    "api": ("torch.distributed", "workers.shard_worker", "workers.step_loop", "workers.model_runner"),
}


def _imports(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_imports_go_one_way(package):
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, f"no python files under {package}/"
    bad = [
        f"{path.relative_to(ROOT)} imports {name}"
        for path in files
        for name in _imports(path)
        for banned in FORBIDDEN[package]
        if name == banned or name.startswith(banned + ".")
    ]
    assert not bad, "\n".join(bad)
