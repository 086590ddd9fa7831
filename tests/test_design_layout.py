"""DESIGN.md's layout is the tree as it is: every path its layout blocks name exists, and every module of the four
packages is named in one, so a moved or added module that the design does not mention fails here."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("kernels", "model_adapters", "nsa_eval", "tasks")
PATH = re.compile(r"^(?:[A-Za-z0-9_.-]+/)+(?:[A-Za-z0-9_.-]+\.(?:py|json|toml|css|js|j2|html))?$")


def layout_paths(text: str, section: str) -> set[str]:
    """The paths that start the lines of the fenced blocks in DESIGN.md's section `## <section>` and its subsections
    (the first word of a line, when it is a path)."""
    body = text.split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```\n(.*?)```", body, flags=re.S)
    return {word for block in blocks for line in block.splitlines() if line.strip()
            for word in [line.split()[0]] if PATH.match(word) and not line.startswith(" ")}


def test_every_path_in_the_layout_exists_and_every_module_is_in_it():
    text = (ROOT / "DESIGN.md").read_text(encoding="utf-8")
    named = layout_paths(text, "Layout and the direction of imports")
    assert named, "DESIGN.md's layout section has no tree"
    missing = sorted(p for p in named if not (ROOT / p).exists())
    assert not missing, f"DESIGN.md's layout names paths that do not exist: {missing}"
    modules = {str(p.relative_to(ROOT)) for package in PACKAGES for p in (ROOT / package).rglob("*.py")
               if p.name not in ("__init__.py", "__main__.py")}
    unnamed = sorted(m for m in modules if m not in named)
    assert not unnamed, f"modules DESIGN.md's layout does not name: {unnamed}"
