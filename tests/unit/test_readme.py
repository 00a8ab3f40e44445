"""The README's settings table lists exactly the settings the code has."""

import re
from pathlib import Path

from fastdeploy.settings import OPTIONS

README = Path(__file__).resolve().parents[2] / "README.md"


def test_settings_table_matches_the_code():
    rows = re.findall(r"^\| `(--[a-z-]+)` \| ([^|]+) \| ([^|]+) \|", README.read_text(), flags=re.M)
    table = {flag: (envs.strip(), default.strip()) for flag, envs, default in rows}
    assert set(table) == {o.flag for o in OPTIONS}
    for option in OPTIONS:
        envs, default = table[option.flag]
        assert envs == ", ".join(f"`{e}`" for e in (option.env, *option.legacy_env)), option.name
        expected = str(option.default).lower() if isinstance(option.default, bool) else str(option.default)
        assert default == (f"`{expected}`" if expected else "(empty)"), option.name


def test_readme_names_the_test_command_that_ci_runs():
    ci = (README.parent / ".ci" / "run").read_text()
    assert "./run_tests.sh" in README.read_text() and "./run_tests.sh" in ci
