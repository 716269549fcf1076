import pytest

from rccs.config import ConfigError, Settings, load_settings


def test_defaults():
    settings = load_settings(environ={})
    assert settings == Settings()
    assert (settings.host, settings.port, settings.http_port) == ("127.0.0.1", 8765, 8766)


def test_precedence_flags_over_env_over_file(tmp_path):
    config = tmp_path / "rccs.toml"
    config.write_text('[server]\nport = 9001\nhttp_port = 9002\nheartbeat = 12.5\nlog_level = "DEBUG"\n')
    environ = {"RCCS_PORT": "9101", "RCCS_HEARTBEAT": "7"}
    settings = load_settings(flags={"port": 9201, "host": None}, environ=environ, config_file=str(config))
    assert settings.port == 9201  # flag
    assert settings.heartbeat == 7.0  # env beats file
    assert settings.http_port == 9002  # file beats default
    assert settings.log_level == "DEBUG"
    assert settings.host == "127.0.0.1"  # unset flag keeps lower layers


def test_config_file_from_environment_and_top_level_keys(tmp_path):
    config = tmp_path / "rccs.toml"
    config.write_text("max_connections = 5\n")
    assert load_settings(environ={"RCCS_CONFIG": str(config)}).max_connections == 5


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("port = 'x'\n", "not a valid int"),
        ("colour = 1\n", "unknown setting"),
        ("port = \n", "not valid TOML"),
        ("heartbeat = -1\n", "must not be negative"),
        ("max_message_bytes = 10\n", "at least 1024"),
    ],
)
def test_bad_config_files_name_the_problem(tmp_path, content, message):
    config = tmp_path / "rccs.toml"
    config.write_text(content)
    with pytest.raises(ConfigError, match=message):
        load_settings(environ={}, config_file=str(config))


def test_missing_config_file():
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_settings(environ={}, config_file="/nonexistent/rccs.toml")


def test_bad_environment_value():
    with pytest.raises(ConfigError, match=r"RCCS|port"):
        load_settings(environ={"RCCS_PORT": "eighty"})
