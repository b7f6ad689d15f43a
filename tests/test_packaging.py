"""The wheel a user gets from ``pip install .``: setup.py maps the top-level ``kernels/`` folder
to ``ssbsn.kernels`` and ships ``csrc/`` inside the package, which an editable install (what
the rest of the suite runs on) never exercises. Built here without the CUDA extension."""
import os
import re
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
    expected.add("ssbsn/py.typed")  # PEP 561 marker: type checkers read the package's hints
    assert expected <= names, sorted(expected - names)
    assert not [n for n in names if n.startswith(("tests/", "benchmarks/", "kernels/", "csrc/"))]
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    entry = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "ssbsn = ssbsn.cli:main" in zipfile.ZipFile(wheel).read(entry).decode()
    # the version is said once, in ssbsn/__init__.py, and the wheel carries it
    import ssbsn
    meta = next(n for n in names if n.endswith(".dist-info/METADATA"))
    assert f"\nVersion: {ssbsn.__version__}\n" in zipfile.ZipFile(wheel).read(meta).decode()
    assert wheel.name.startswith(f"ssbsn-{ssbsn.__version__}-")


def test_lazy_names_are_visible_to_type_checkers():
    """Every name ``ssbsn`` imports on first use is also imported under TYPE_CHECKING, from the
    module it is loaded from at run time, so type checkers and IDEs resolve it."""
    import ast

    import ssbsn
    tree = ast.parse((ROOT / "ssbsn" / "__init__.py").read_text())
    block = next(n for n in tree.body if isinstance(n, ast.If)
                 and getattr(n.test, "id", None) == "TYPE_CHECKING")
    static = {a.name: "." + node.module for node in block.body
              for a in node.names if isinstance(node, ast.ImportFrom)}
    assert static == ssbsn._WHERE
    assert set(static) == set(ssbsn.__all__)


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


# A licence is acceptable when its SPDX expression, its trove classifiers or its License field
# name a permissive or weak-copyleft licence, and nothing in them restricts commercial use or
# redistribution (bm3d's "Free for non-commercial use", a proprietary licence).
_RESTRICTED = re.compile(r"non[- ]?commercial|proprietary|not for commercial|"
                         r"commercial use (is )?(not|prohibited|forbidden)|CC-BY-NC", re.I)
_PERMISSIVE = re.compile(r"\b(MIT|BSD|Apache|PSF|Python Software Foundation|MPL|ISC|Zlib|"
                         r"0BSD|CC0|Unlicense|HPND|MIT-CMU|BSL-1\.0|LGPL)\b", re.I)


def licence_verdict(meta) -> tuple[bool, str]:
    """(acceptable, what was read) for one distribution's metadata (an email.Message): its
    SPDX expression, its licence classifiers and the opening lines of its License field (a
    full licence text there may quote others', e.g. the GPL's words on proprietary programs
    in scipy's bundled runtime notices)."""
    named = [meta.get("License-Expression") or "",
             *(c for c in meta.get_all("Classifier") or [] if c.startswith("License ::")),
             *(meta.get("License") or "").strip().splitlines()[:3]]
    named = [f.strip() for f in named if f.strip()]
    said = " | ".join(named)
    if any(_RESTRICTED.search(f) for f in named):
        return False, said
    return any(_PERMISSIVE.search(f) for f in named), said


# What a CUDA build of torch brings with it (cuda-toolkit, nvidia-cudnn-cu13, ...): NVIDIA's
# runtime libraries under NVIDIA's licence, which allows their use and redistribution with
# applications. Which torch build is installed is the user's choice (the README installs torch
# first, CPU or CUDA); the CPU build pulls none of them.
_TORCH_CUDA_RUNTIME = re.compile(r"^(nvidia|cuda)-")


def _runtime_requirements(name: str) -> tuple[dict[str, object], list[str]]:
    """(the installed distributions that ``pip install name`` pulls, no extras, transitively;
    the CUDA runtime requirements of the installed torch build, left out)."""
    from importlib import metadata

    from packaging.requirements import Requirement
    found, todo, cuda_runtime = {}, [name], []
    while todo:
        n = todo.pop()
        key = re.sub(r"[-_.]+", "-", n).lower()
        if key in found:
            continue
        try:
            dist = metadata.distribution(n)
        except metadata.PackageNotFoundError:
            found[key] = None
            continue
        found[key] = dist
        for r in dist.requires or []:
            req = Requirement(r)
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue
            if key == "torch" and _TORCH_CUDA_RUNTIME.match(req.name.lower()):
                cuda_runtime.append(req.name)
            else:
                todo.append(req.name)
    return found, cuda_runtime


def test_installed_requirements_allow_commercial_use_and_redistribution():
    """Every distribution ``pip install .`` pulls, read from the installed metadata, carries a
    permissive licence; the install is the checkout's (its requirements are pyproject's)."""
    import tomllib

    from packaging.requirements import Requirement
    from importlib import metadata
    declared = {Requirement(r).name.lower() for r in
                tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]}
    installed = {Requirement(r).name.lower() for r in metadata.requires("ssbsn") or []
                 if Requirement(r).marker is None}
    assert installed == declared, "the installed ssbsn is not this checkout's: pip install -e ."
    assert "bm3d" not in declared and "bm4d" not in declared
    dists, cuda_runtime = _runtime_requirements("ssbsn")
    import torch
    assert not cuda_runtime or torch.version.cuda, f"a CPU torch pulls {cuda_runtime}"
    missing = sorted(k for k, d in dists.items() if d is None)
    assert not missing, f"requirements not installed, licence unknown: {missing}"
    bad = {k: said for k, d in dists.items() if k != "ssbsn"
           for ok, said in [licence_verdict(d.metadata)] if not ok}
    assert not bad, bad


def test_licence_verdict_refuses_non_commercial_and_unknown():
    """The check itself: bm3d's licence metadata (non-commercial use only), a proprietary
    classifier and a distribution that says nothing are refused; MIT and BSD pass."""
    from email.message import Message

    def meta(**fields):
        m = Message()
        for k, v in fields.items():
            for item in (v if isinstance(v, list) else [v]):
                m[k.replace("_", "-")] = item
        return m
    assert not licence_verdict(meta(Classifier=["License :: Free for non-commercial use"]))[0]
    assert not licence_verdict(meta(License="Free for non-commercial use; see LICENSE"))[0]
    assert not licence_verdict(meta(Classifier=["License :: Other/Proprietary License"]))[0]
    assert not licence_verdict(meta(Summary="no licence field"))[0]
    assert licence_verdict(meta(License_Expression="MIT"))[0]
    assert licence_verdict(meta(Classifier=["License :: OSI Approved :: BSD License"]))[0]
