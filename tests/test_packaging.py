"""`pip install .` must give the same import packages the source tree maps (pitstop.<folder>)."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_wheel_has_every_package_and_works(tmp_path: Path) -> None:
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", str(REPO), "-w", str(wheels)],
                   check=True, capture_output=True)
    (whl,) = wheels.glob("pitstop-*.whl")
    names = set(zipfile.ZipFile(whl).namelist())
    for pkg in ("pitstop", "pitstop/ota", "pitstop/inference", "pitstop/daemon", "pitstop/image", "pitstop/hil"):
        assert f"{pkg}/__init__.py" in names, pkg
        assert f"{pkg}/py.typed" in names, pkg
    assert "pitstop/ota/bundle_reader.py" in names
    assert any(n.endswith("entry_points.txt") for n in names)
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(whl)],
                   check=True, capture_output=True)
    env = {**os.environ, "PYTHONPATH": str(site)}
    out = subprocess.run(
        [sys.executable, "-c", "import pitstop.ota.cli, pitstop; print(pitstop.__file__)"],
        check=True, capture_output=True, text=True, env=env, cwd=tmp_path,
    ).stdout
    assert out.strip().startswith(str(site)), out
    r = subprocess.run([sys.executable, "-m", "pitstop.cli", "--version"], capture_output=True, text=True, env=env,
                       cwd=tmp_path, check=False)
    assert r.returncode == 0 and r.stdout.startswith("pitstop "), r
