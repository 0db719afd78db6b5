"""Every ```python block of README.md and docs/**/*.md runs as written, and every relative link
of those pages leads to a file that exists.

Each block runs on its own in a fresh Python process, with a temporary directory as its working
directory, TMPDIR and TFDS data directory, so that whatever it writes lands there. A block passes
when it exits with status 0 and prints something. ```bash blocks are not run.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from xla_flags import with_device_count

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("**/*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")
PYTHON_BLOCK = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.DOTALL | re.MULTILINE)
TIMEOUT_SECONDS = 120


def python_blocks():
    """pytest params (code, id "page:line") for every ```python block of the pages."""
    params = []
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        for match in PYTHON_BLOCK.finditer(text):
            line = text.count("\n", 0, match.start()) + 2  # the block's first line of code
            params.append(pytest.param(match.group(1), id=f"{page.relative_to(ROOT)}:{line}"))
    return params


BLOCKS = python_blocks()


def test_pages_have_snippets():
    assert (ROOT / "docs").is_dir()
    assert len(BLOCKS) >= len(PAGES) // 2, [page.name for page in PAGES]


def _environment(tmp_path):
    """A user's environment, but for the suite's compile flags (conftest.py): one CPU device,
    output under tmp_path."""
    env = {k: v for k, v in os.environ.items() if k != "JAX_NUM_CPU_DEVICES"}
    env.update(
        XLA_FLAGS=with_device_count(None),  # the suite's compile flags, one device
        JAX_PLATFORMS="cpu",
        TMPDIR=str(tmp_path),
        TFDS_DATA_DIR=str(tmp_path / "tensorflow_datasets"),
        MPLBACKEND="Agg",
    )
    return env


@pytest.mark.parametrize("code", BLOCKS)
def test_snippet_runs(code, tmp_path):
    script = tmp_path / "snippet.py"
    script.write_text(code, encoding="utf-8")
    try:
        result = subprocess.run(
            [sys.executable, str(script)],
            cwd=tmp_path,
            env=_environment(tmp_path),
            capture_output=True,
            text=True,
            timeout=TIMEOUT_SECONDS,
        )
    except subprocess.TimeoutExpired as error:
        pytest.fail(f"the snippet ran longer than {TIMEOUT_SECONDS} s:\n{code}\n{error.stderr}")
    assert result.returncode == 0, (
        f"the snippet exited with {result.returncode}:\n{code}\n--- stderr ---\n{result.stderr}"
    )
    assert result.stdout.strip(), f"the snippet printed nothing:\n{code}"


def test_readme_test_command_is_the_one_ci_runs():
    """CI (.ci/run) runs the README's test command word for word."""
    ci_lines = (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    commands = [line for line in ci_lines if line.startswith("apt-get ") and "pytest" in line]
    assert len(commands) == 1, commands
    assert f"```bash\n{commands[0]}\n```" in readme


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(ROOT)))
def test_relative_links_lead_to_files(page):
    """A link or image path of a page, other than a web address or an anchor on the page
    itself, names a file or folder of the repository (any #anchor dropped)."""
    text = page.read_text(encoding="utf-8")
    targets = [t for t in LINK.findall(text) if not t.startswith(("http://", "https://", "#"))]
    missing = [t for t in targets if not (page.parent / t.split("#")[0]).exists()]
    assert not missing, f"{page.relative_to(ROOT)} links to missing files: {missing}"
