"""The wheel a user gets from ``pip install .``: setup.py maps the top-level ``kernels/`` folder
to ``ssbsn.kernels`` and ships ``csrc/`` inside the package, which an editable install (what
the rest of the suite runs on) never exercises. Built here without the CUDA extension."""
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _source_files(folder: str, suffixes: tuple[str, ...]) -> set[str]:
    base = ROOT / folder
    return {p.relative_to(base).as_posix() for p in base.rglob("*")
            if p.is_file() and p.suffix in suffixes and "__pycache__" not in p.parts}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    # from a copy of what the build reads, so that no build/ or egg-info of the checkout's own
    # (left by an earlier build) can supply a file that setup.py fails to ship
    src, out = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("wheel")
    for f in ("setup.py", "pyproject.toml", "MANIFEST.in", "README.md", "LICENSE"):
        shutil.copy2(ROOT / f, src / f)
    for d in ("ssbsn", "kernels", "csrc"):
        shutil.copytree(ROOT / d, src / d, ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    env = dict(os.environ, SSBSN_NO_CUDA_EXT="1", PIP_NO_CACHE_DIR="1")
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                        "-q", "-w", str(out), str(src)], env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    wheels = list(out.glob("ssbsn-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def test_wheel_ships_package_kernels_and_csrc(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {f"ssbsn/{f}" for f in _source_files("ssbsn", (".py",))}
    expected |= {f"ssbsn/kernels/{f}" for f in _source_files("kernels", (".py",))}
    expected |= {f"ssbsn/csrc/{f}" for f in _source_files("csrc", (".cu", ".cuh", ".cpp", ".h",
                                                                   ".py", ".sh", ".md"))}
    assert expected <= names, sorted(expected - names)
    assert not [n for n in names if n.startswith(("tests/", "benchmarks/", "kernels/", "csrc/"))]
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    entry = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "ssbsn = ssbsn.cli:main" in zipfile.ZipFile(wheel).read(entry).decode()


def test_installed_wheel_imports_its_own_copy(wheel, tmp_path):
    """Installed into a folder of its own (not the source checkout): the package, its Triton
    kernels and the CUDA sources the JIT build reads all come from that folder."""
    site = tmp_path / "site"
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target",
                        str(site), str(wheel)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    code = ("import importlib, ssbsn; "
            "k = importlib.import_module('ssbsn.kernels.ss_attention'); "
            "from ssbsn.nn import _cuda_ext as e; "
            "print(ssbsn.__file__); print(k.__file__); print(e.CSRC / 'conv_binding.cpp')")
    env = dict(os.environ, PYTHONPATH=str(site), TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    paths = [Path(p) for p in r.stdout.split()]
    assert len(paths) == 3
    for p in paths:
        assert p.is_file()
        assert p.resolve().is_relative_to(site.resolve()), p
