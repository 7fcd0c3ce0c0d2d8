"""The README: its python blocks run as written and print what their comments say; its commands and links hold."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
BLOCKS = re.findall(r"```(\w+)\n(.*?)```", README, flags=re.S)
PYTHON = [code for lang, code in BLOCKS if lang == "python"]
#: pages other engineers write; a link to them is checked once they exist
WRITTEN_ELSEWHERE = {"docs/training-stack.md", "docs/diffmoe.md"}


def expected_prints(code: str) -> list[str]:
    """``print(...)  # -> text`` lines: the text each print must produce, in order."""
    return [m.group(1).strip() for m in re.finditer(r"^\s*print\(.*\)\s*#\s*->\s*(.*)$", code, flags=re.M)]


def test_readme_fits_on_a_few_screens_and_has_the_python_blocks():
    assert len(README.splitlines()) <= 210
    assert len(PYTHON) == 2
    assert "import treadfx" in PYTHON[0] and "from treadfx.models.dit import DiT" in PYTHON[0]
    assert "from diffusers import FluxTransformer2DModel" in PYTHON[1]
    assert all(expected_prints(code) for code in PYTHON)


@pytest.mark.parametrize("index", range(len(PYTHON)))
def test_python_block_runs_as_written_and_prints_what_it_says(index):
    code = PYTHON[index]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, f"README.md python block {index}", "exec"), {"__name__": "__readme__"})
    assert out.getvalue().splitlines() == expected_prints(code)


def test_the_test_command_is_the_one_ci_runs():
    bash = [code for lang, code in BLOCKS if lang == "bash"][0]
    commands = [line for line in bash.splitlines() if line and not line.startswith("#")]
    assert len(commands) == 2
    assert commands[0].endswith("python -m treadfx demo") and 'pip install -e ".[demo]"' in commands[0]
    assert commands[1].endswith("&& python -m pytest -q") and 'pip install -e ".[test]"' in commands[1]
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert ci[-1] == "python -m pytest -q"
    assert 'python -m pip install -q -e ".[test]"' in ci


def test_relative_links_point_at_files():
    links = sorted(set(re.findall(r"\]\(([^)#\s]+)\)", README)))
    assert {"benchmarks/RESULTS.md", "docs/how-it-works.md", "docs/api.md", "docs/choosing-routes.md",
            "docs/cuda-graphs.md", "docs/backbones.md", "docs/training-stack.md", "docs/diffmoe.md"} <= set(links)
    missing = [link for link in links if not link.startswith("http") and not (ROOT / link).exists()]
    pending = [link for link in missing if link in WRITTEN_ELSEWHERE]
    assert sorted(set(missing) - set(pending)) == []
    if pending:
        pytest.skip(f"not written yet by their owners: {pending}")


def test_docs_link_only_files_inside_the_repository():
    """The repository stands on its own: no page links a file outside it."""
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for link in re.findall(r"\]\(([^)#\s]+)\)", path.read_text()):
            if link.startswith("http"):
                continue
            assert (path.parent / link).resolve().is_relative_to(ROOT), (path, link)


def test_links_between_doc_pages_point_at_files():
    broken = []
    for page in sorted((ROOT / "docs").glob("*.md")):
        for link in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            target = (page.parent / link).resolve()
            rel = target.relative_to(ROOT).as_posix() if target.is_relative_to(ROOT) else str(target)
            if not link.startswith("http") and not target.exists() and rel not in WRITTEN_ELSEWHERE:
                broken.append(f"{page.name}: {link}")
    assert broken == []
