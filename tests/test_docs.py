"""docs/ stays true: the user guide lists every job key with its default,
every command it shows exists, and the README's two commands are there."""
import re
from pathlib import Path

from hpcnn.cli import COMMANDS
from hpcnn.job import REQUIRED, SCHEMA

ROOT = Path(__file__).resolve().parents[1]


def test_user_guide_lists_every_job_key():
    text = (ROOT / "docs/user-guide.md").read_text()
    for section, keys in SCHEMA.items():
        for key, spec in keys.items():
            row = [line for line in text.splitlines() if line.startswith(f"| `{section}.{key}` |")]
            assert row, f"docs/user-guide.md does not document {section}.{key}"
            if (section, key) not in REQUIRED:
                d = repr(spec.default).replace("'", '"').replace("True", "true").replace("False", "false")
                assert f"`{d}`" in row[0], f"{section}.{key}: default {d} not in {row[0]}"
    documented = set(re.findall(r"^\| `(\w+)\.(\w+)` \|", text, re.M))
    assert documented == {(s, k) for s, ks in SCHEMA.items() for k in ks}


def test_commands_in_docs_exist():
    text = (ROOT / "docs/user-guide.md").read_text() + (ROOT / "README.md").read_text()
    for cmd in set(re.findall(r"hpcnn (\w+)", text)):
        if cmd in ("train", "data", "models", "plan", "calibrate", "bench", "ckpt"):
            assert cmd in COMMANDS


def test_readme_has_the_two_commands():
    readme = (ROOT / "README.md").read_text()
    assert "mpiexec -n 4 .venv/bin/hpcnn train jobs/digits.toml" in readme
    assert ".venv/bin/python -m pytest" in readme
    ci = (ROOT / ".ci/run").read_text()
    test_cmd = [line.strip() for line in readme.splitlines() if ".venv/bin/python -m pytest" in line][0]
    assert test_cmd in ci


def test_no_placeholder_left_in_docs():
    # a results section written before its numbers were measured once
    # shipped with a marker in place of the table
    for path in sorted((ROOT / "docs").glob("*.md")) + [ROOT / "README.md"]:
        text = path.read_text()
        for marker in ("PLACEHOLDER", "TODO", "TBD", "FIXME"):
            assert marker not in text, f"{path.relative_to(ROOT)} still contains {marker}"


def test_docs_link_images_that_exist():
    for path in sorted((ROOT / "docs").glob("*.md")):
        for target in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", path.read_text()):
            assert (path.parent / target).is_file(), f"{path.relative_to(ROOT)}: image {target} is missing"


def test_readme_links_every_document():
    readme = (ROOT / "README.md").read_text()
    for path in sorted((ROOT / "docs").glob("*.md")):
        assert f"(docs/{path.name})" in readme, f"README.md does not link docs/{path.name}"
