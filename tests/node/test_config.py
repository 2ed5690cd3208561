"""node.ini parsing (in-process; the process-level checks are in test_node_process.py)."""
from __future__ import annotations

from pathlib import Path

import pytest

from utesla_node.config import ConfigError, NodeConfig, env_name, find_config, load_config
from utesla_node.storage import open_storage


def _load(tmp_path: Path, text: str, **overrides) -> NodeConfig:
    (tmp_path / "node.ini").write_text(text)
    return load_config(tmp_path / "node.ini", **overrides)


def test_defaults_without_a_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert find_config(None) is None
    cfg = load_config(None)
    assert (cfg.host, cfg.port, cfg.key_type) == ("127.0.0.1", 17000, "ed25519")
    assert cfg.services_dir == tmp_path / "complements"
    assert cfg.keys_dir == tmp_path / "keys" and cfg.data_dir == tmp_path / "data"
    (tmp_path / "node.ini").write_text("[server]\nport = 1\n")
    assert find_config(None) == Path("node.ini")


def test_all_documented_keys_and_relative_paths(tmp_path):
    cfg = _load(tmp_path, """
[Server]
host = 0.0.0.0
port = 17001
services = svc
keys = ~/k
data = /abs/d
max_connections = 7
idle_timeout = 1.5
token_cache_ttl = 0
[database]
url =
pool_size = 3
[Crypt Limits]
key_type = RSA
rsa_key_length = 4096
token_expire = 60
""")
    assert (cfg.host, cfg.port, cfg.max_connections, cfg.idle_timeout) == (
        "0.0.0.0", 17001, 7, 1.5)
    assert cfg.token_cache_ttl == 0
    assert cfg.services_dir == tmp_path / "svc"
    assert cfg.keys_dir == Path("~/k").expanduser()
    assert cfg.data_dir == Path("/abs/d")
    assert (cfg.database_url, cfg.database_pool_size) == ("", 3)
    assert (cfg.key_type, cfg.rsa_key_length, cfg.token_expire) == ("rsa", 4096, 60.0)
    assert cfg.source == tmp_path / "node.ini"


def test_rsa_key_length_alone_means_an_rsa_node_key(tmp_path):
    assert _load(tmp_path, "[crypt limits]\nrsa_key_length = 2048\n").key_type == "rsa"
    cfg = _load(tmp_path, "[crypt limits]\nkey_type = ed25519\nrsa_key_length = 2048\n")
    assert cfg.key_type == "ed25519"


def test_relative_sqlite_url_is_relative_to_node_ini(tmp_path, monkeypatch):
    sub = tmp_path / "etc"
    sub.mkdir()
    (sub / "node.ini").write_text("[database]\nurl = sqlite:db/node.db\n")
    monkeypatch.chdir(tmp_path)
    cfg = load_config(Path("etc/node.ini"))
    storage = open_storage(cfg.database_url, cfg.data_dir)
    assert Path(storage.path) == sub / "db" / "node.db"
    assert cfg.database_url == f"sqlite://{sub}/db/node.db"
    for url in ("sqlite:///abs/x.db", "sqlite::memory:", "mysql://u@h/db", ""):
        assert _load(tmp_path, f"[database]\nurl = {url}\n").database_url == url


@pytest.mark.parametrize("text,needles", [
    ("[nope]\n", ["node.ini", "[nope]"]),
    ("[server]\nprot = 1\n", ["node.ini", "[server]", "prot"]),
    ("[server]\nport = x\n", ["node.ini", "[server]", "port"]),
    ("[server]\nidle_timeout = inf\n", ["[server]", "idle_timeout"]),
    ("[server]\nrequest_timeout = nan\n", ["[server]", "request_timeout"]),
    ("[server]\ntoken_cache_ttl = inf\n", ["[server]", "token_cache_ttl"]),
    ("[server]\ntoken_cache_ttl = -1\n", ["[server]", "token_cache_ttl"]),
    ("[server]\nservices =\n", ["[server]", "services"]),
    ("[crypt limits]\ntoken_expire = 0\n", ["[crypt limits]", "token_expire"]),
    ("[crypt limits]\nrsa_key_length = 9000\n", ["[crypt limits]", "rsa_key_length"]),
    ("[logging]\nlevel = LOUD\n", ["[logging]", "level"]),
    ("[metrics]\nlisten = nowhere\n", ["[metrics]", "listen"]),
    ("[metrics]\nmax_remote_services = 10001\n", ["[metrics]", "max_remote_services"]),
    ("[server]\nshare_quota = -1\n", ["[server]", "share_quota"]),
    ("[logging]\nrepeat_limit = some\n", ["[logging]", "repeat_limit"]),
    ("[logging]\nrepeat_interval = 0\n", ["[logging]", "repeat_interval"]),
    ("[server]\nport = 1\nport = 2\n", ["node.ini", "[server]", "port"]),
    ("port = 1\n", ["node.ini", "line 1"]),
])
def test_bad_files_name_file_section_and_key(tmp_path, text, needles):
    with pytest.raises(ConfigError) as ei:
        _load(tmp_path, text)
    msg = str(ei.value)
    assert "\n" not in msg
    for n in needles:
        assert n in msg, (n, msg)


def test_limit_keys_of_issue_12(tmp_path):
    cfg = load_config(None)
    assert (cfg.share_quota, cfg.log_repeat_limit, cfg.log_repeat_interval,
            cfg.metrics_max_remote_services) == (1 << 30, 20, 60.0, 100)
    cfg = _load(tmp_path, "[server]\nshare_quota = 0\n[logging]\nrepeat_limit = 0\n"
                          "repeat_interval = 0.5\n[metrics]\nmax_remote_services = 7\n")
    assert (cfg.share_quota, cfg.log_repeat_limit, cfg.log_repeat_interval,
            cfg.metrics_max_remote_services) == (0, 0, 0.5, 7)


def test_overrides(tmp_path):
    cfg = _load(tmp_path, "[server]\nport = 5\n", port=0, host=None)
    assert cfg.port == 0 and cfg.host == "127.0.0.1"
    with pytest.raises(ConfigError):
        load_config(None, no_such_setting=1)


# --------------------------------------------------------------------------- the environment

def test_precedence_flag_then_environment_then_node_ini_then_default(tmp_path):
    (tmp_path / "node.ini").write_text("[server]\nport = 17001\nhost = 10.0.0.1\n"
                                       "[network]\nmax_hops = 5\n")
    ini = tmp_path / "node.ini"
    env = {"UTESLA_SERVER_PORT": "17002", "UTESLA_NETWORK_GOSSIP_INTERVAL": "0.5"}
    assert load_config(None, environ={}).port == 17000                       # default
    assert load_config(ini, environ={}).port == 17001                        # node.ini
    cfg = load_config(ini, environ=env)
    assert (cfg.port, cfg.host, cfg.max_hops, cfg.gossip_interval) == (
        17002, "10.0.0.1", 5, 0.5)                                           # environment
    assert load_config(ini, environ=env, port=17003).port == 17003          # flag
    assert load_config(None, environ=env).port == 17002                     # no file at all
    assert cfg.warnings == []


def test_every_key_has_its_variable_and_sections_with_spaces_use_underscores(tmp_path):
    cfg = load_config(None, environ={"UTESLA_CRYPT_LIMITS_KEY_TYPE": "RSA",
                                     "UTESLA_CRYPT_LIMITS_RSA_KEY_LENGTH": "4096",
                                     "UTESLA_LOGGING_FORMAT": "json",
                                     "UTESLA_METRICS_LISTEN": "127.0.0.1:9100",
                                     "UTESLA_SERVER_WORKER_THREADS": "3"})
    assert (cfg.key_type, cfg.rsa_key_length, cfg.log_format, cfg.metrics_listen,
            cfg.worker_threads) == ("rsa", 4096, "json", "127.0.0.1:9100", 3)
    # rsa_key_length alone asks for an RSA key, from the environment as from node.ini.
    assert load_config(None, environ={"UTESLA_CRYPT_LIMITS_RSA_KEY_LENGTH": "2048"}
                       ).key_type == "rsa"
    assert env_name("crypt limits", "token_expire") == "UTESLA_CRYPT_LIMITS_TOKEN_EXPIRE"


def test_a_bad_value_in_the_environment_names_the_variable(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(None, environ={"UTESLA_SERVER_PORT": "seventeen"})
    assert str(info.value).startswith("environment variable UTESLA_SERVER_PORT = 'seventeen'")
    with pytest.raises(ConfigError) as info:
        load_config(None, environ={"UTESLA_NETWORK_PROXY": "ftp://u:SECRETPW@h:1"})
    assert "UTESLA_NETWORK_PROXY" in str(info.value) and "SECRETPW" not in str(info.value)


def test_unknown_variables_that_look_like_settings_are_warned_about():
    cfg = load_config(None, environ={"UTESLA_SERVER_PROT": "1",
                                     "UTESLA_DB_PASSWORD": "pw", "UTESLA_PROXY": "",
                                     "UTESLA_TEST_MYSQL_URL": "mysql://x", "HOME": "/"})
    assert cfg.warnings == [
        "environment variable UTESLA_SERVER_PROT is not a setting and is ignored "
        "(did you mean UTESLA_SERVER_PORT?)"]
    # A misspelt section looks like a setting too when it is close to one.
    cfg = load_config(None, environ={"UTESLA_DATABSE_URL": "x",
                                     "UTESLA_METRICS_XYZZY_QUUX_FROB": "1"})
    assert cfg.warnings == [
        "environment variable UTESLA_DATABSE_URL is not a setting and is ignored "
        "(did you mean UTESLA_DATABASE_URL?)",
        "environment variable UTESLA_METRICS_XYZZY_QUUX_FROB is not a setting and is "
        "ignored"]


def test_secrets_from_files(tmp_path):
    (tmp_path / "db.url").write_text("mysql://utesla:S3CRET@db:3306/utesla\n")
    (tmp_path / "proxy").write_text("socks5h://me:PXSECRET@127.0.0.1:9050")
    cfg = _load(tmp_path, "[database]\nurl_file = db.url\n[network]\nproxy_file = proxy\n")
    assert cfg.database_url == "mysql://utesla:S3CRET@db:3306/utesla"
    assert cfg.proxy == "socks5h://me:PXSECRET@127.0.0.1:9050"
    # The environment's file wins over node.ini's value, and is read relative to node.ini.
    (tmp_path / "other.url").write_text("mysql://other@db/x")
    cfg = _load(tmp_path, "[database]\nurl = mysql://ini@db/x\n")
    assert cfg.database_url == "mysql://ini@db/x"
    cfg = load_config(tmp_path / "node.ini", environ={"UTESLA_DATABASE_URL_FILE": "other.url"})
    assert cfg.database_url == "mysql://other@db/x"
    # A relative sqlite URL from the environment is relative to node.ini, as every path.
    cfg = load_config(tmp_path / "node.ini", environ={"UTESLA_DATABASE_URL": "sqlite:n.db"})
    assert cfg.database_url == f"sqlite://{tmp_path}/n.db"


@pytest.mark.parametrize("text,env,files,needles", [
    ("[database]\nurl = mysql://a@h/d\nurl_file = db.url\n", {}, {"db.url": "mysql://b@h/d"},
     ["[database] url", "given twice", "url_file"]),
    ("", {"UTESLA_DATABASE_URL": "mysql://a@h/d", "UTESLA_DATABASE_URL_FILE": "db.url"},
     {"db.url": "mysql://b@h/d"}, ["given twice", "UTESLA_DATABASE_URL"]),
    ("[database]\nurl_file = missing.url\n", {}, {}, ["url_file", "missing.url",
                                                       "No such file"]),
    ("[database]\nurl_file = two.url\n", {}, {"two.url": "a\nb\n"}, ["one line"]),
    ("[database]\nurl_file = empty.url\n", {}, {"empty.url": "\n"}, ["empty"]),
    ("[server]\nport_file = p\n", {}, {"p": "1"}, ["[server] port_file", "unknown key"]),
])
def test_bad_secret_files_are_errors(tmp_path, text, env, files, needles):
    for name, content in files.items():
        (tmp_path / name).write_text(content)
    (tmp_path / "node.ini").write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "node.ini", environ=env)
    for n in needles:
        assert n in str(info.value), (n, str(info.value))
    assert "mysql://b@h/d" not in str(info.value)


