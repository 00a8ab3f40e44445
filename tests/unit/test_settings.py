import dataclasses

import pytest

from fastdeploy.cli import build_parser
from fastdeploy.errors import SettingsError
from fastdeploy.settings import OPTIONS, Settings, load_settings


def test_defaults(tmp_path):
    s = load_settings(tmp_path, environ={})
    assert (s.port, s.timeout, s.batch_size, s.max_per_client_batch, s.only_async) == (8080, 480.0, 0, 0, False)
    assert s.state_path == tmp_path.resolve() / ".fastdeploy"


def test_original_environment_names_keep_working(tmp_path):
    env = {"TIMEOUT": "5", "MAX_PER_CLIENT_BATCH": "7", "ONLY_ASYNC": "true", "BATCH_SIZE": "4",
           "MAX_WAIT": "0.25", "WORKERS": "2", "PORT": "9000"}
    s = load_settings(tmp_path, environ=env)
    assert (s.timeout, s.max_per_client_batch, s.only_async, s.batch_size, s.max_wait, s.http_processes, s.port) == (
        5.0, 7, True, 4, 0.25, 2, 9000)


def test_spin_and_proxy_names_as_users_write_them(tmp_path):
    s = load_settings(tmp_path, environ={"SPIN_US": "0", "FORWARDED_ALLOW_IPS": "10.0.0.5"})
    assert (s.spin_us, s.spin_seconds, s.forwarded_allow_ips) == (0.0, 0.0, "10.0.0.5")
    assert load_settings(tmp_path, environ={}).trusted_proxies == "127.0.0.1,::1"
    for given, trusted in (("none", None), ("*", "*"), ("10.0.0.5,10.0.0.6", "10.0.0.5,10.0.0.6")):
        parent = load_settings(tmp_path, {"forwarded_allow_ips": given}, environ={})
        child = load_settings(tmp_path, environ=parent.to_env())  # as the API server processes read it
        assert parent.trusted_proxies == child.trusted_proxies == trusted
    with pytest.raises(SettingsError, match="forwarded-allow-ips"):
        load_settings(tmp_path, {"forwarded_allow_ips": " "}, environ={})


def test_flag_beats_new_name_beats_original_name(tmp_path):
    env = {"TIMEOUT": "5", "FASTDEPLOY_TIMEOUT": "6"}
    assert load_settings(tmp_path, environ=env).timeout == 6.0
    assert load_settings(tmp_path, {"timeout": "7"}, environ=env).timeout == 7.0


@pytest.mark.parametrize("env, word", [({"PORT": "http"}, "PORT"), ({"FASTDEPLOY_TIMEOUT": "-1"}, "FASTDEPLOY_TIMEOUT"),
                                       ({"ONLY_ASYNC": "maybe"}, "ONLY_ASYNC"), ({"FASTDEPLOY_LOG_LEVEL": "loud"}, "log level")])
def test_invalid_values_name_the_setting(tmp_path, env, word):
    with pytest.raises(SettingsError) as info:
        load_settings(tmp_path, environ=env)
    assert word in info.value.reason


def test_unknown_flag_is_an_error(tmp_path):
    with pytest.raises(SettingsError, match="unknown"):
        load_settings(tmp_path, {"nope": 1}, environ={})


def test_child_environment_round_trips(tmp_path):
    s = load_settings(tmp_path, {"timeout": "3", "only_async": "yes", "webhook_hosts": "a.example"}, environ={})
    assert load_settings(tmp_path, environ=s.to_env()) == s


def test_every_option_is_a_settings_field():
    fields = set(Settings.__dataclass_fields__)
    assert {o.name for o in OPTIONS} == fields - {"recipe_dir"}


def test_every_field_is_an_option_with_the_same_default(tmp_path):
    """Defaults are written once, on the dataclass: nothing resolved from an empty environment may differ."""
    fields = {f.name: f for f in dataclasses.fields(Settings)}
    assert [o.name for o in OPTIONS] == [name for name in fields if name != "recipe_dir"]
    for option in OPTIONS:
        assert option.default == fields[option.name].default, option.name
        assert option.help and option.help == fields[option.name].metadata["help"], option.name
        # the parser named for the annotation reads its own default back, with the same type
        text = str(option.default).lower() if isinstance(option.default, bool) else str(option.default)
        parsed = option.type(text)
        assert (parsed, type(parsed)) == (option.default, type(option.default)), option.name
    assert load_settings(tmp_path, environ={}) == Settings(recipe_dir=tmp_path.resolve())
    defaults = Settings(recipe_dir=tmp_path.resolve())
    assert load_settings(tmp_path, environ=defaults.to_env()) == defaults


@pytest.mark.parametrize("env", [{"WORKERS": "3"}, {"FASTDEPLOY_WORKERS": "3"}, {"FASTDEPLOY_HTTP_PROCESSES": "3"}])
def test_old_and_new_names_set_http_processes(tmp_path, env):
    s = load_settings(tmp_path, environ=env)
    assert s.http_processes == 3 and s.api_processes == 3


def test_http_processes_precedence(tmp_path):
    env = {"WORKERS": "1", "FASTDEPLOY_WORKERS": "2", "FASTDEPLOY_HTTP_PROCESSES": "3"}
    assert load_settings(tmp_path, environ=env).http_processes == 3
    assert load_settings(tmp_path, environ={"WORKERS": "1", "FASTDEPLOY_HTTP_PROCESSES": "3"}).http_processes == 3
    assert load_settings(tmp_path, environ={"WORKERS": "1", "FASTDEPLOY_WORKERS": "2"}).http_processes == 2
    assert load_settings(tmp_path, {"http_processes": "4"}, environ=env).http_processes == 4


@pytest.mark.parametrize("flag", ["--workers", "--http-processes"])
def test_cli_accepts_old_and_new_flag(tmp_path, flag):
    args = build_parser().parse_args(["run", str(tmp_path), flag, "3"])
    flags = {o.name: getattr(args, o.name) for o in OPTIONS}
    assert load_settings(args.recipe, flags, environ={"FASTDEPLOY_HTTP_PROCESSES": "2"}).http_processes == 3
