"""The front door and the docs: every relative link resolves, and the README's own-folder command runs."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from ebmad.data.synthetic import generate_category

from conftest import REPO, SMALL

README = REPO / "README.md"
PAGES = [README, *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(([^()\s]+)(?:\s+\"[^\"]*\")?\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", flags=re.M | re.S)
CODE_SPAN = re.compile(r"`[^`\n]*`")
README_MAX_LINES = 250


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = heading.strip().lower()
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = FENCE.sub("", page.read_text())
    found: set[str] = set()
    for heading in re.findall(r"^#{1,6} +(.+?) *#*$", text, flags=re.M):
        base, n = slug(heading), 0
        while (name := base if n == 0 else f"{base}-{n}") in found:
            n += 1
        found.add(name)
    return found


def links(page: Path) -> list[str]:
    text = CODE_SPAN.sub("", FENCE.sub("", page.read_text()))
    return LINK.findall(text)


def test_slug_as_github_writes_it() -> None:
    assert slug("Your own images (`data=folder`)") == "your-own-images-datafolder"
    assert slug("Fidelity study: an EBM recipe beyond the paper (CPU, 64×64)") == (
        "fidelity-study-an-ebm-recipe-beyond-the-paper-cpu-6464"
    )
    assert slug("EBM options beyond the paper, and `experiment=ebm_plus`") == (
        "ebm-options-beyond-the-paper-and-experimentebm_plus"
    )


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_resolve(page: Path) -> None:
    """Files must exist; an ``#anchor`` into a Markdown page must name one of its headings."""
    bad = []
    for target in links(page):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto: ...
            continue
        path_part, _, anchor = target.partition("#")
        path = (page.parent / path_part).resolve() if path_part else page
        if not path.exists():
            bad.append(f"{target}: no such file")
        elif anchor and path.suffix == ".md" and anchor not in anchors(path):
            bad.append(f"{target}: no heading with anchor #{anchor} in {path.name}")
    assert not bad, f"{page.relative_to(REPO)}:\n" + "\n".join(bad)


def test_readme_is_a_front_door() -> None:
    text = README.read_text()
    assert len(text.splitlines()) <= README_MAX_LINES
    assert "make demo" in text and "make test" in text
    assert re.search(r"\| Feature-space EBM .*\| \d\.\d{3} / \d\.\d{3} \|", text)  # its measured row
    linked = {Path(t.partition("#")[0]).name for t in links(README)}
    for page in sorted((REPO / "docs").glob("*.md")):  # every page is reachable from the front door
        assert page.name in linked, f"README does not link docs/{page.name}"


def readme_command(marker: str) -> list[str]:
    """The one command between ``<!-- marker -->`` and ``<!-- /marker -->`` in README.md, as argv."""
    text = README.read_text()
    block = re.search(rf"<!-- {marker} -->\s*```bash\n(.*?)```\s*<!-- /{marker} -->", text, flags=re.S)
    assert block, f"README.md has no <!-- {marker} --> command block"
    lines = [ln for ln in block.group(1).replace("\\\n", " ").splitlines() if ln.strip()]
    assert len(lines) == 1, lines
    return shlex.split(lines[0], comments=True)


def test_readme_own_folder_command_runs(tmp_path: Path) -> None:
    """The README's own-folder command, as written, on a tiny synthetic folder with tiny settings appended."""
    argv = readme_command("own-folder")
    assert argv[:3] == [".venv/bin/python", "-m", "ebmad.train"], argv
    generate_category(tmp_path / "data", "part", seed=0, layout="folder", **SMALL)
    folder = tmp_path / "data" / "part"
    places = {
        "/data/ok": folder / "normal",
        "/data/defects": folder / "abnormal",
        "/data/masks": folder / "masks",
    }
    args = []
    for arg in argv[3:]:
        key, _, value = arg.partition("=")
        args.append(f"{key}={places[value]}" if value in places else arg)
    assert any(a.startswith("data.normal_dir=") and "normal" in a for a in args)
    tiny = ["data.image_size=32", "data.batch_size=8", "data.test_batch_size=8", "trainer.max_steps=2",
            "logger=none", "eval.figures=false", "trainer.enable_progress_bar=false", f"hydra.run.dir={tmp_path / 'run'}"]  # fmt: skip
    proc = subprocess.run([sys.executable, "-m", "ebmad.train", *args, *tiny], cwd=REPO, capture_output=True,
                          text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "RESULT " in proc.stdout
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["status"] == "completed"
    assert 0.0 <= results["metrics"]["image_auroc"] <= 1.0
