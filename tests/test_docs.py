"""The documentation against what it documents: every relative link in the README and docs/
reaches a file (and, with #anchor, a heading of it), and docs/cli.md names every command and
every option that `ssbsn COMMAND --help` lists."""
from __future__ import annotations

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


def _help(*args: str) -> str:
    out = subprocess.run([sys.executable, "-m", "ssbsn", *args, "--help"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
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
