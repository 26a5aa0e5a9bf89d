"""ruff and mypy --strict, run as tests (DESIGN.md "Testing").

mypy cannot type-check the source tree as it is: pyproject.toml maps folders to packages
(``ota/`` is ``pitstop.ota``, ...) and mypy knows nothing of setuptools' package-dir, nor of
the import hook an editable install uses for it. So the test builds a *shadow tree* in a
temporary directory that has the installed layout, made of symlinks into the repository:

    <tmp>/pitstop/            a real directory
        __init__.py -> <repo>/pitstop/__init__.py    (one link per entry of pitstop/)
        ...
        ota -> <repo>/ota                              (one link per package-dir entry)
        inference -> <repo>/inference

and runs ``mypy --strict -p pitstop`` there with the repository's configuration. Paths in
mypy's messages are mapped back to repository paths (``pitstop/ota/x.py`` -> ``ota/x.py``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PYPROJECT = REPO / "pyproject.toml"
SKIP_NAMES = {"__pycache__", ".mypy_cache", ".ruff_cache", ".pytest_cache"}


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, NO_COLOR="1")
    env.pop("FORCE_COLOR", None)
    env.pop("MYPY_FORCE_COLOR", None)
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, check=False)


def package_dirs() -> dict[str, str]:
    """setuptools' package-dir mapping from pyproject.toml: import package -> repo folder."""
    with PYPROJECT.open("rb") as f:
        data = tomllib.load(f)
    mapping: dict[str, str] = data["tool"]["setuptools"]["package-dir"]
    return mapping


def build_shadow_tree(dest: Path, mapping: dict[str, str]) -> dict[str, str]:
    """Lay out the installed package tree under `dest` with symlinks into the repository.

    Returns {shadow path prefix: repo path prefix} for mapping messages back, longest first.
    """
    prefixes: dict[str, str] = {}
    # Parents before children: "pitstop" must exist before "pitstop.ota" is linked into it.
    for package in sorted(mapping, key=lambda p: p.count(".")):
        src = (REPO / mapping[package]).resolve()
        target = dest.joinpath(*package.split("."))
        if not src.is_dir():
            raise AssertionError(f"pyproject.toml maps {package} to missing folder {mapping[package]}/")
        if target.exists() or target.is_symlink():
            raise AssertionError(f"{package}: {target.relative_to(dest)} is already taken in the shadow tree")
        if package.count(".") == 0:
            # A top-level package: a real directory, so that sub-packages can be linked into it.
            target.mkdir(parents=True)
            for entry in sorted(src.iterdir()):
                if entry.name not in SKIP_NAMES:
                    (target / entry.name).symlink_to(entry)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to(src, target_is_directory=True)
        prefixes[target.relative_to(dest).as_posix() + "/"] = (
            src.relative_to(REPO).as_posix() + "/" if src != REPO else ""
        )
    return dict(sorted(prefixes.items(), key=lambda kv: -len(kv[0])))


def to_repo_paths(output: str, prefixes: dict[str, str]) -> str:
    lines = []
    for line in output.splitlines():
        for shadow, real in prefixes.items():
            if line.startswith(shadow):
                line = real + line[len(shadow) :]
                break
        lines.append(line)
    return "\n".join(lines)


def test_ruff() -> None:
    res = _run([sys.executable, "-m", "ruff", "check", "--no-fix", "--output-format=concise", "."], REPO)
    if res.returncode != 0:
        pytest.fail(f"ruff check . found problems:\n{res.stdout}{res.stderr}", pytrace=False)


def test_mypy_strict() -> None:
    mapping = package_dirs()
    top_level = sorted({p.split(".")[0] for p in mapping})
    # A fixed location keeps the paths mypy caches under stable; a per-run temporary directory made
    # its incremental cache report stale errors.
    shadow = REPO / ".mypy_cache" / "shadow-tree"
    shutil.rmtree(shadow, ignore_errors=True)
    shadow.mkdir(parents=True)
    prefixes = build_shadow_tree(shadow, mapping)
    cmd = [
        sys.executable,
        "-m",
        "mypy",
        "--strict",
        "--config-file",
        str(PYPROJECT),
        # Keep the cache in the repository: the stdlib and third-party parts stay warm between runs.
        "--cache-dir",
        str(REPO / ".mypy_cache" / "shadow"),
        "--no-color-output",
        "--show-error-codes",
    ]
    for package in top_level:
        cmd += ["-p", package]
    res = _run(cmd, shadow)
    if res.returncode != 0:
        out = to_repo_paths(res.stdout + res.stderr, prefixes)
        pytest.fail(f"mypy --strict found problems:\n{out}", pytrace=False)
