"""The documentation against what it documents: every relative link in the README and docs/
reaches a file (and, with #anchor, a heading of it); docs/cli.md names every command and every
option that `ssbsn COMMAND --help` lists, and its error table gives the lines and exit statuses
that the command produces."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", ROOT / "benchmarks" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

_LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
_FENCE = re.compile(r"^```.*?^```", re.S | re.M)


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = heading.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    text = _FENCE.sub("", page.read_text(encoding="utf-8"))
    return {_slug(m.group(1)) for m in re.finditer(r"^#{1,6}\s+(.*)$", text, re.M)}


def test_slug_matches_githubs_rule():
    assert _slug("`ssbsn eval NOISY [CLEAN]` — PSNR/SSIM") == "ssbsn-eval-noisy-clean--psnrssim"
    assert _slug("The Wiener filter: the project's own") == "the-wiener-filter-the-projects-own"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    text = _FENCE.sub("", page.read_text(encoding="utf-8"))
    broken = []
    for target in _LINK.findall(text):
        if re.match(r"[a-z]+:", target):          # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            broken.append(f"{target}: no heading with that anchor in {dest.name}")
    assert not broken, f"{page.relative_to(ROOT)}: " + "; ".join(broken)


def _ssbsn(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """`python -m ssbsn ARGS` with this checkout's package."""
    return subprocess.run([sys.executable, "-m", "ssbsn", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})


def _help(*args: str) -> str:
    out = _ssbsn(*args, "--help")
    assert out.returncode == 0, out.stderr
    return out.stdout


def _commands() -> list[str]:
    text = _help()
    block = text.split("positional arguments:", 1)[1].split("options:", 1)[0]
    return re.findall(r"^ {4}([a-z][a-z-]*)\b", block, re.M)


def test_cli_reference_names_every_command_and_option():
    doc = (ROOT / "docs" / "cli.md").read_text(encoding="utf-8")
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    commands = _commands()
    assert {"demo", "train", "denoise"} <= set(commands), commands
    missing = []
    for cmd in commands:
        if f"## `ssbsn {cmd}" not in doc:
            missing.append(f"docs/cli.md has no section for 'ssbsn {cmd}'")
        if f"`ssbsn {cmd}" not in readme:
            missing.append(f"README.md's command table lacks 'ssbsn {cmd}'")
        options = set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", _help(cmd))) - {"--help"}
        for opt in sorted(options):
            plain = opt.replace("--no-", "--")
            if not re.search(re.escape(plain) + r"(?![a-z0-9-])", doc):
                missing.append(f"docs/cli.md never names {opt} of 'ssbsn {cmd}'")
    for opt in ("--threads", "--debug", "--version"):
        if opt not in doc:
            missing.append(f"docs/cli.md never names the global option {opt}")
    assert not missing, "\n".join(missing)


def _exit_table() -> dict[str, tuple[str, int]]:
    """docs/cli.md's error table: its first column → (what you see, exit status)."""
    doc = (ROOT / "docs" / "cli.md").read_text(encoding="utf-8")
    block = doc.split("**Errors.**", 1)[1].split("\n\n", 2)[1]
    rows = {}
    for line in block.splitlines()[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = (cells[1].strip("`"), int(cells[2]))
    return rows


def test_cli_reference_exit_codes_are_what_the_command_does(tmp_path):
    rows = _exit_table()
    usage = next(v for k, v in rows.items() if k.startswith("the command line"))
    bad_input = next(v for k, v in rows.items() if k.startswith("bad input"))
    # the documented line for a bad option value, exactly
    r = _ssbsn("train", "--lr", "x", cwd=tmp_path)
    assert (r.stderr.strip(), r.returncode) == usage
    # a missing checkpoint: one 'ssbsn: error:' line, the documented status, nothing written
    r = _ssbsn("denoise", str(tmp_path / "in.png"), "-o", str(tmp_path / "out.png"),
               "-w", str(tmp_path / "none.safetensors"), cwd=tmp_path)
    assert r.returncode == bad_input[1], r.stderr
    assert bad_input[0].startswith("ssbsn: error: ")
    assert r.stderr.startswith("ssbsn: error: ") and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out.png").exists()
