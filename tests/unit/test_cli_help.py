"""The command line as a person meets it, through the real `fastdeploy` command: --help lists what
people run, each command's options come in sections with their defaults and an example, and a
mistyped option or command is answered with the nearest one."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from fastdeploy.settings import GROUPS, OPTIONS
from tests.helpers import RECIPES

USER_COMMANDS = ("run", "serve", "worker")


def fastdeploy(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fastdeploy", *args], capture_output=True, text=True, timeout=60,
                          env={"PATH": "/usr/bin:/bin", "COLUMNS": "100"})


def test_top_level_help_lists_only_what_users_run():
    out = fastdeploy("--help")
    assert out.returncode == 0
    listed = re.findall(r"^    (\w+) {2,}", out.stdout, flags=re.M)
    assert set(USER_COMMANDS) <= set(listed) and not [c for c in listed if c.startswith("_")], out.stdout
    assert "_api" not in out.stdout and "_loop" not in out.stdout
    assert "fastdeploy run recipes/echo" in out.stdout  # an example


@pytest.mark.parametrize("command", USER_COMMANDS)
def test_each_command_groups_its_options_shows_defaults_and_ends_with_an_example(command):
    out = fastdeploy(command, "--help")
    assert out.returncode == 0, out.stderr
    text = out.stdout
    entries: dict[str, list[str]] = {}  # flag -> [its section, its help text]
    section, flag = "", ""
    for line in text.splitlines():
        if re.match(r"^\S.*:$", line):
            section, flag = line[:-1], ""
        elif match := re.match(r"^  (--[\w-]+)", line):
            flag = match.group(1)
            entries[flag] = [section, line]
        elif flag and line.startswith("   "):
            entries[flag][1] += " " + line.strip()
    taken = [option for option in OPTIONS if command in option.commands]  # those that do something here
    assert not [o.flag for o in OPTIONS if o not in taken and o.flag in entries], command
    for option in taken:  # each in its own group's section, with its default
        where, help_text = entries[option.flag]
        assert where == option.group and option.group in GROUPS, (option.name, where)
        shown = str(option.default).lower() if isinstance(option.default, bool) else str(option.default) or "none"
        assert f"(default: {shown}; env {option.env}" in " ".join(help_text.split()), (option.name, help_text)
    sections = {where for where, _ in entries.values()}
    assert {"store", "logging"} <= sections and {o.group for o in taken} == sections - {"options"}, sections
    assert " ".join(text.split()).count("(default: ") == len(taken)
    tail = text[text.rindex("\nexample") + 1:].splitlines()[1:]  # the example comes last
    assert tail and tail[0].strip().startswith(f"fastdeploy {command} ") and not any(
        line.lstrip().startswith("-") for line in tail), tail
    assert text.startswith(f"usage: fastdeploy {command} RECIPE [options]")


@pytest.mark.parametrize("argv, nearest", [
    (["run", "RECIPE", "--bach-size", "4"], "--batch-size"),
    (["run", "RECIPE", "--prot=8081"], "--port"),
    (["worker", "RECIPE", "--stag", "0"], "--stage"),
    (["serve", "RECIPE", "--log-formt", "json"], "--log-format"),
    (["runn", "RECIPE"], "run"),
])
def test_a_mistyped_option_or_command_names_the_nearest_one(argv, nearest):
    # a recipe that does not exist: were the line taken, the command would stop at once, not serve
    out = fastdeploy(*["/no-such-recipe" if a == "RECIPE" else a for a in argv])
    assert out.returncode == 2 and f"did you mean {nearest}?" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr


def test_an_option_nothing_is_near_gets_no_guess():
    out = fastdeploy("run", "/no-such-recipe", "--zzzzzz")
    assert out.returncode == 2 and "unrecognized arguments: --zzzzzz" in out.stderr and "did you mean" not in out.stderr


def test_the_removed_deny_private_flag_says_what_to_do_instead_of_pointing_to_its_opposite():
    out = fastdeploy("run", "/no-such-recipe", "--webhook-deny-private")
    assert out.returncode == 2 and "refused by default now" in out.stderr, out.stderr
    assert "did you mean" not in out.stderr and "Traceback" not in out.stderr


def test_a_log_format_other_than_text_or_json_stops_the_command():
    out = fastdeploy("run", str(RECIPES / "echo"), "--log-format", "yaml")
    assert out.returncode == 2 and "--log-format" in out.stderr and "text or json" in out.stderr
