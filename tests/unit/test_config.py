"""Loading and validating the configuration."""

from __future__ import annotations

from pathlib import Path

import pytest

from notifyrelay.config import load_config, redact_dsn, resolve_dsn, to_toml
from notifyrelay.exceptions import ConfigError

MINIMAL = '[[channels]]\nname = "activity_progress"\n'


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "relay.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("[server]\nmax_connections = 0\n" + MINIMAL, "server.max_connections"),
        ("[server]\nmax_conections = 5\n" + MINIMAL, "server.max_conections"),
        ("[coalesce]\nwindow_ms = -1\n" + MINIMAL, "coalesce.window_ms"),
        ("[coalesce]\nwindow_ms = \"fast\"\n" + MINIMAL, "coalesce.window_ms"),
        ("[server]\nlisten = \"nowhere\"\n" + MINIMAL, "server.listen"),
        ("[[channels]]\nname = \"a\"\nkey = \"jsn:id\"\n", "channels[0].key"),
        ("[[channels]]\nname = \"" + "x" * 64 + "\"\n", "channels[0].name"),
        (MINIMAL + MINIMAL, "channels[1].name"),
        ("dsn = \"x\"\n", "channels"),
        ("[auth]\nmode = \"jwt\"\n" + MINIMAL, "auth.mode"),
    ],
)
def test_errors_name_the_key_and_the_file(tmp_path: Path, text: str, key: str) -> None:
    """Each invalid setting is reported with its dotted key and the file it came from."""
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_config(path, environ={})
    assert caught.value.key == key
    assert str(path) in str(caught.value)


def test_invalid_toml_and_missing_file_name_the_file(tmp_path: Path) -> None:
    """A syntax error or an absent file is blamed on the file."""
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_config(write(tmp_path, "[server\n"), environ={})
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "absent.toml", environ={})


def test_precedence_flag_over_environment_over_file(tmp_path: Path) -> None:
    """A flag beats NOTIFYRELAY_* which beats the file, which beats the default."""
    path = write(tmp_path, "[coalesce]\nwindow_ms = 100\n[server]\nlisten = \"127.0.0.1:1\"\n" + MINIMAL)
    environ = {"NOTIFYRELAY_COALESCE__WINDOW_MS": "50", "NOTIFYRELAY_LISTEN": "127.0.0.1:2"}
    config = load_config(path, environ=environ, overrides={"server.listen": "127.0.0.1:3"})
    assert config.coalesce.window_ms == 50
    assert config.server.listen == "127.0.0.1:3"
    assert load_config(path, environ={}).coalesce.window_ms == 100


def test_environment_errors_name_the_variable(tmp_path: Path) -> None:
    """A bad or unknown NOTIFYRELAY_* variable is named in the error."""
    path = write(tmp_path, MINIMAL)
    with pytest.raises(ConfigError, match="NOTIFYRELAY_SERVER__MAX_CONNECTIONS"):
        load_config(path, environ={"NOTIFYRELAY_SERVER__MAX_CONNECTIONS": "lots"})
    with pytest.raises(ConfigError, match="NOTIFYRELAY_WINDOW"):
        load_config(path, environ={"NOTIFYRELAY_WINDOW": "5"})


def test_dsn_file_and_redaction(tmp_path: Path) -> None:
    """dsn_file supplies the DSN, and the password never shows in the printed configuration."""
    secret = tmp_path / "dsn"
    secret.write_text("postgresql://relay:hunter2@db/app\n")
    config = load_config(write(tmp_path, f'dsn_file = "{secret}"\n' + MINIMAL), environ={})
    assert resolve_dsn(config) == "postgresql://relay:hunter2@db/app"
    config = load_config(write(tmp_path, MINIMAL), environ={"NOTIFYRELAY_DSN": "postgresql://u:hunter2@h/d"})
    assert "hunter2" not in to_toml(config)
    assert redact_dsn("host=db password='a b' user=x") == "host=db password=*** user=x"
    assert redact_dsn("postgresql://u@h/d?password=pw") == "postgresql://u@h/d?password=***"


def test_printed_configuration_loads_back(tmp_path: Path) -> None:
    """check-config's TOML output is itself a valid configuration with the same values."""
    config = load_config(write(tmp_path, '[[channels]]\nname = "a.b C"\nkey = "json:id"\ninclude_payload = true\n'),
                         environ={})
    again = load_config(write(tmp_path, to_toml(config)), environ={})
    assert again == config


def test_check_config_loads_the_auth_keys_and_the_dsn_file(tmp_path: Path) -> None:
    """check-config fails (exit 2, naming the key) for a key or DSN file that run would fail to read."""
    from notifyrelay.cli import main

    missing = tmp_path / "absent"
    jwt = write(tmp_path, f'[auth]\nmode = "jwt"\njwt_secret_file = "{missing}"\n' + MINIMAL)
    assert main(["check-config", "--config", str(jwt)]) == 2
    dsn = tmp_path / "dsn.toml"
    dsn.write_text(f'dsn_file = "{missing}"\n' + MINIMAL)
    assert main(["check-config", "--config", str(dsn)]) == 2


def test_malformed_dsn_errors_and_redaction_never_show_the_password() -> None:
    """A password with unencoded / ? # is neither quoted by the DSN check nor left by redaction."""
    from notifyrelay.config import check_dsn

    for dsn in ("postgresql://relay:s3cr/etPW@db:5432/app", "postgresql://relay:pa#ssword9@db/app"):
        with pytest.raises(ConfigError) as caught:
            check_dsn(dsn)
        assert "s3cr" not in str(caught.value) and "'pa'" not in str(caught.value)
    assert redact_dsn("postgresql://relay:s3cr/et?PW@db:5432/app") == "postgresql://relay:***@db:5432/app"


def test_the_container_healthcheck_variable_is_not_configuration(tmp_path: Path) -> None:
    """NOTIFYRELAY_HEALTHCHECK_URL (read by the container's healthcheck) does not stop the daemon starting."""
    load_config(write(tmp_path, MINIMAL), environ={"NOTIFYRELAY_HEALTHCHECK_URL": "http://127.0.0.1:9/healthz"})


STATE = MINIMAL + '[channels.state]\ntable = "activities"\ncolumns = ["status", "done", "total"]\n'


@pytest.mark.parametrize(
    ("text", "key"),
    [
        (STATE + 'query = "SELECT id::text AS key FROM t WHERE id::text = ANY($1)"\n', "channels[0].state.query"),
        (MINIMAL + "[channels.state]\ntimeout_ms = 5\n", "channels[0].state.table"),
        (MINIMAL + '[channels.state]\ntable = "activities"\n', "channels[0].state.columns"),
        (MINIMAL + '[channels.state]\ntable = "activities"\ncolumns = ["key"]\n', "channels[0].state.columns[0]"),
        (MINIMAL + '[channels.state]\ntable = "activities"\ncolumns = ["a", "a"]\n', "channels[0].state.columns[1]"),
        (MINIMAL + f'[channels.state]\ntable = "{"t" * 64}"\ncolumns = ["a"]\n', "channels[0].state.table"),
        (MINIMAL + '[channels.state]\ntable = "s."\ncolumns = ["a"]\n', "channels[0].state.table"),
        (MINIMAL + '[channels.state]\ntable = "t"\nkey_column = ""\ncolumns = ["a"]\n', "channels[0].state.key_column"),
        (MINIMAL + '[channels.state]\nquery = "SELECT 1 AS key"\n', "channels[0].state.query"),
        (STATE + 'list_query = "SELECT id AS key FROM t WHERE id = $1"\n', "channels[0].state.list_query"),
        (MINIMAL + '[channels.progress]\ndone = "done"\n', "channels[0].progress"),
        (STATE + '[channels.progress]\ndone = "objects_processed"\n', "channels[0].progress.done"),
        (STATE + '[channels.progress]\nstatus = "phase"\n', "channels[0].progress.status"),
        (STATE + '[channels.progress]\ntotal = "total"\nstatus = "status"\n', "channels[0].progress.total"),
        (STATE + '[channels.progress]\nstatus = "status"\nfailed = ["broken"]\n', "channels[0].progress.failed"),
        (STATE + '[channels.state.extra]\n', "channels[0].state.extra"),
        ('[state]\ndsn = "mysql://db/app"\n' + MINIMAL, "state.dsn"),
        ('dsn = "db.example.com"\n' + MINIMAL, "dsn"),
    ],
)
def test_state_and_progress_errors_name_the_key_and_the_file(tmp_path: Path, text: str, key: str) -> None:
    """Each invalid [state], [channels.state] or [channels.progress] setting names its dotted key and the file."""
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_config(path, environ={})
    assert caught.value.key == key, caught.value
    assert str(path) in str(caught.value)


def test_a_state_channel_with_progress_loads(tmp_path: Path) -> None:
    """The table form with progress over its columns, and the query form with list_query, are accepted."""
    config = load_config(write(tmp_path, STATE + '[channels.progress]\ndone = "done"\ntotal = "total"\n'
                               'status = "status"\n' + '[[channels]]\nname = "b"\n[channels.state]\n'
                               'query = "SELECT id::text AS key FROM t WHERE id::text = ANY($1::text[])"\n'
                               'list_query = "SELECT id::text AS key FROM t WHERE NOT done"\n'), environ={})
    first, second = config.channels
    assert first.state is not None and first.state.columns == ["status", "done", "total"]
    assert first.progress is not None and first.progress.terminal == ["complete", "failed", "cancelled"]
    assert second.state is not None and second.state.list_query and second.progress is None


def test_a_dsn_error_names_where_the_dsn_came_from(tmp_path: Path) -> None:
    """A malformed DSN is blamed on its file, its environment variable, or the dsn_file holding it."""
    path = write(tmp_path, 'dsn = "localhost:5432"\n' + MINIMAL)
    with pytest.raises(ConfigError, match=f"dsn: expected a URL.*\\(in {path}\\)"):
        load_config(path, environ={})
    with pytest.raises(ConfigError, match="environment variable NOTIFYRELAY_DSN"):
        load_config(write(tmp_path, MINIMAL), environ={"NOTIFYRELAY_DSN": "host=db"})
    secret = tmp_path / "dsn.secret"
    secret.write_text("db:5432\n")
    config = load_config(write(tmp_path, f'dsn_file = "{secret}"\n' + MINIMAL), environ={})
    with pytest.raises(ConfigError, match=f"dsn_file: expected a URL.*\\(in {secret}\\)"):
        resolve_dsn(config)


def test_an_invalid_choice_lists_the_valid_ones(tmp_path: Path) -> None:
    """A value outside an enum (log.level, auth.mode) is answered with every value the key accepts."""
    path = write(tmp_path, '[log]\nlevel = "loud"\n' + MINIMAL)
    with pytest.raises(ConfigError) as caught:
        load_config(path, environ={})
    assert str(caught.value) == (
        f'log.level: invalid value \'loud\': expected one of "debug", "info", "warning", "error" (in {path})'
    )
    with pytest.raises(ConfigError, match='expected one of "none", "jwt"'):
        load_config(write(tmp_path, MINIMAL), environ={"NOTIFYRELAY_AUTH__MODE": "oauth"})


def test_no_configuration_file_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    """Without --config or NOTIFYRELAY_CONFIG, the error says that no file was given (exit 2), not what it lacks."""
    from notifyrelay.cli import main

    with pytest.raises(ConfigError, match="no configuration file was given"):
        load_config(None, environ={})
    monkeypatch.delenv("NOTIFYRELAY_CONFIG", raising=False)
    assert main(["check-config"]) == 2
    assert "no configuration file was given: pass --config PATH" in capsys.readouterr().err


def test_printed_configuration_has_nested_state_tables_and_no_passwords(tmp_path: Path) -> None:
    """check-config prints [channels.state] and [channels.progress] as tables, redacts [state] dsn, and loads back."""
    text = ('dsn = "postgresql://relay:hunter2@db/app"\n[state]\ndsn = "postgresql://reader:s3cret@replica/app"\n'
            + STATE + '[channels.progress]\ndone = "done"\n' + '[[channels]]\nname = "plain"\n')
    config = load_config(write(tmp_path, text), environ={})
    printed = to_toml(config)
    assert "hunter2" not in printed and "s3cret" not in printed
    assert "\n[channels.state]\n" in printed and "\n[channels.progress]\n" in printed
    again = load_config(write(tmp_path, printed), environ={})
    assert again.channels == config.channels
    assert again.state.dsn == "postgresql://reader:***@replica/app"


def test_toml_value_writes_one_line_values_that_read_back() -> None:
    """toml_value (bench/ writes relay configs with it) gives one-line TOML for scalars, arrays and inline tables."""
    import tomllib

    from notifyrelay.config import toml_value

    value = {"table": "a \"b\"", "columns": ["x", "y"], "timeout_ms": 50, "on": True, "ratio": 0.5, "odd key": []}
    line = toml_value(value)
    assert "\n" not in line
    assert tomllib.loads(f"v = {line}")["v"] == value
    assert toml_value("postgresql://u@h/d") == '"postgresql://u@h/d"'
