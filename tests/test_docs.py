from dataclasses import fields
from pathlib import Path

from datasource.config import Settings

ROOT = Path(__file__).resolve().parent.parent


def test_every_setting_is_in_the_readme_table():
    readme = (ROOT / "README.md").read_text()
    for f in fields(Settings):
        assert f"`CPA_MONITOR_{f.name.upper()}`" in readme, f.name
        assert f"`--{f.name.replace('_', '-')}`" in readme, f.name


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci/run").read_text()
    assert "python3 -m pytest -q" in readme
    assert "python3 -m pytest -q" in ci
