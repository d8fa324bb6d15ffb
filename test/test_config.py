# -*- test-case-name: test.test_config -*-
"""
Tests for L{imageio.config}.

The expected C{--show-config} texts were produced by running ovirt-imageio
2.5.1 (C{ovirt-imageio --conf-dir DIR --show-config}) on the same conf
dirs; the tests do not need ovirt-imageio installed.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path

import pytest

from imageio import config
from imageio.config import Config, ConfigError

ROOT = Path(__file__).resolve().parent.parent
CONTRIB = ROOT / "contrib"


# What ovirt-imageio 2.5.1 prints for a conf dir with no options set, and
# the lines we add for our own options.
REFERENCE_DEFAULTS_JSON = r"""{
    "backend_file": {
        "buffer_size": 8388608
    },
    "backend_http": {
        "buffer_size": 8388608,
        "ca_file": ""
    },
    "backend_nbd": {
        "buffer_size": 8388608
    },
    "control": {
        "enable": true,
        "port": -1,
        "prefer_ipv4": true,
        "remove_timeout": 60,
        "socket": "/run/ovirt-imageio/sock",
        "transport": "unix"
    },
    "daemon": {
        "drop_privileges": true,
        "group_name": "ovirtimg",
        "inactivity_timeout": 60,
        "max_connections": 8,
        "poll_interval": 1.0,
        "run_dir": "/run/ovirt-imageio",
        "systemd_enable": true,
        "user_name": "ovirtimg"
    },
    "formatter_long": {
        "format": "%(asctime)s %(levelname)-7s (%(threadName)s) [%(name)s] %(message)s"
    },
    "formatters": {
        "keys": "long"
    },
    "handler_logfile": {
        "args": "(\"/var/log/ovirt-imageio/daemon.log\",)",
        "formatter": "long",
        "class": "logging.handlers.RotatingFileHandler",
        "kwargs": "{\"maxBytes\": 20971520, \"backupCount\": 10}",
        "level": "DEBUG"
    },
    "handler_stderr": {
        "args": "()",
        "formatter": "long",
        "class": "logging.StreamHandler",
        "level": "DEBUG"
    },
    "handlers": {
        "keys": "logfile"
    },
    "local": {
        "enable": true,
        "socket": "\u0000/org/ovirt/imageio"
    },
    "logger_root": {
        "handlers": "logfile",
        "level": "INFO",
        "propagate": 0
    },
    "loggers": {
        "keys": "root"
    },
    "profile": {
        "filename": "/run/ovirt-imageio/profile"
    },
    "remote": {
        "host": "::",
        "port": 54322
    },
    "tls": {
        "ca_file": "",
        "cert_file": "",
        "enable": true,
        "enable_tls1_1": false,
        "key_file": ""
    }
}"""

OUR_ADDITIONS = {
    "daemon": {"workers": 1},
}


def _withAdditions(referenceJSON: str) -> str:
    """
    Our expected C{--show-config} text: the reference's, with our options
    inserted where sorting puts them.
    """
    d = json.loads(referenceJSON)
    for section, options in OUR_ADDITIONS.items():
        merged = dict(d[section], **options)
        d[section] = {k: merged[k] for k in sorted(merged)}
    return json.dumps(d, indent=4)


def _changed(**sections: dict) -> str:
    """
    The reference's defaults JSON with some values changed, keeping the
    reference's key order.
    """
    d = json.loads(REFERENCE_DEFAULTS_JSON)
    for section, options in sections.items():
        for name, value in options.items():
            assert name in d[section]
            d[section][name] = value
    return json.dumps(d, indent=4)


def _confDir(tmp_path: Path, files: dict[str, str],
             name: str = "etc") -> Path:
    """
    Create C{<tmp_path>/<name>/conf.d/} holding C{files}.
    """
    confd = tmp_path / name / "conf.d"
    confd.mkdir(parents=True, exist_ok=True)
    for filename, text in files.items():
        (confd / filename).write_text(text, encoding="utf-8")
    return tmp_path / name


def _load(tmp_path: Path, text: str, filename: str = "50-test.conf",
          vendor: dict[str, str] | None = None) -> Config:
    confDir = _confDir(tmp_path, {filename: text})
    vendorDir = _confDir(tmp_path, vendor or {}, name="vendor")
    return config.load(str(confDir), str(vendorDir))


NO_VENDOR = "/nonexistent/vendor"


# Real configurations.

# What vdsm installs on hypervisors (SPEC C §2).
VDSM_CONF = """\
[tls]
key_file = /etc/pki/vdsm/keys/vdsmkey.pem
cert_file = /etc/pki/vdsm/certs/vdsmcert.pem
ca_file = /etc/pki/vdsm/certs/cacert.pem

[backend_http]
ca_file = /etc/pki/vdsm/certs/cacert.pem

[logger_root]
level = INFO
"""

# What engine-setup installs on the engine host (SPEC C §2.2).
ENGINE_CONF = """\
# engine proxy
[tls]
enable = true
key_file = /etc/pki/ovirt-engine/keys/apache.key.nopass
cert_file = /etc/pki/ovirt-engine/certs/apache.cer
ca_file = /etc/pki/ovirt-engine/apache-ca.pem

[backend_http]
ca_file = /etc/pki/ovirt-engine/ca.pem

[remote]
port = 54323

[local]
enable = false

[control]
transport = tcp
port = 54324
"""

VDSM_JSON = _changed(
    tls={
        "key_file": "/etc/pki/vdsm/keys/vdsmkey.pem",
        "cert_file": "/etc/pki/vdsm/certs/vdsmcert.pem",
        "ca_file": "/etc/pki/vdsm/certs/cacert.pem",
    },
    backend_http={"ca_file": "/etc/pki/vdsm/certs/cacert.pem"},
)

ENGINE_JSON = _changed(
    tls={
        "key_file": "/etc/pki/ovirt-engine/keys/apache.key.nopass",
        "cert_file": "/etc/pki/ovirt-engine/certs/apache.cer",
        "ca_file": "/etc/pki/ovirt-engine/apache-ca.pem",
    },
    backend_http={"ca_file": "/etc/pki/ovirt-engine/ca.pem"},
    remote={"port": 54323},
    local={"enable": False},
    control={"transport": "tcp", "port": 54324},
)


def test_defaults_show_config():
    assert config.dumps(Config()) == _withAdditions(REFERENCE_DEFAULTS_JSON)


def test_comment_only_file_gives_defaults(tmp_path):
    cfg = _load(tmp_path, "# nothing\n")
    assert cfg == Config()


def test_vdsm_host(tmp_path):
    cfg = _load(tmp_path, VDSM_CONF, "50-vdsm.conf")
    assert cfg.tls.enable is True
    assert cfg.tls.key_file == "/etc/pki/vdsm/keys/vdsmkey.pem"
    assert cfg.local.socket == "\0/org/ovirt/imageio"
    assert cfg.control.transport == "unix"
    assert config.dumps(cfg) == _withAdditions(VDSM_JSON)


def test_engine_proxy(tmp_path):
    cfg = _load(tmp_path, ENGINE_CONF, "50-engine.conf")
    assert cfg.remote.port == 54323
    assert cfg.local.enable is False
    assert (cfg.control.transport, cfg.control.port) == ("tcp", 54324)
    assert config.dumps(cfg) == _withAdditions(ENGINE_JSON)


def test_contrib_daemon_conf_changes_nothing(tmp_path):
    text = (CONTRIB / "daemon.conf").read_text()
    cfg = _load(tmp_path, text, "daemon.conf")
    assert cfg == Config()


# "# name = value" lines of contrib/daemon.conf (value may be empty).
_OPTION_LINE = re.compile(r"^# ([a-z_0-9]+) =(?: (.*))?$")


def _exampleOptions() -> dict[tuple[str, str], str]:
    text = (CONTRIB / "daemon.conf").read_text()
    options = {}
    section = None
    for line in text.splitlines():
        if line.startswith("["):
            section = line.strip("[]")
            continue
        m = _OPTION_LINE.match(line)
        if m and section:
            options[(section, m.group(1))] = m.group(2) or ""
    return options


def test_contrib_daemon_conf_documents_every_option():
    """
    Every option appears in its section, commented out, with its default.
    """
    documented = _exampleOptions()
    expected = {}
    for section, options in config.toDict(Config()).items():
        for name, value in options.items():
            if name == "socket" and value.startswith("\0"):
                value = "@" + value[1:]
            if isinstance(value, bool):
                value = str(value).lower()
            expected[(section, name)] = str(value)
    assert documented == expected


def test_contrib_daemon_conf_uncommented_loads_defaults(tmp_path):
    """
    Uncommenting every option line of the example gives the defaults, so
    the values shown are the values the daemon uses.
    """
    text = (CONTRIB / "daemon.conf").read_text()
    uncommented = "\n".join(
        line[2:] if _OPTION_LINE.match(line) else line
        for line in text.splitlines())
    assert uncommented != text
    cfg = _load(tmp_path, uncommented, "daemon.conf")
    assert cfg == Config()


def test_contrib_proxy_conf(tmp_path):
    text = (CONTRIB / "proxy.conf").read_text()
    cfg = _load(tmp_path, text, "50-engine.conf")
    assert config.dumps(cfg) == _withAdditions(ENGINE_JSON)


# Type conversion of every option.

def _allOptions():
    for section, options in config.toDict(Config()).items():
        for name, default in options.items():
            yield section, name, default


ALL_OPTIONS = list(_allOptions())

GOOD_VALUES = {
    bool: [("true", True), ("yes", True), ("1", True), ("on", True),
           ("TRUE", True), ("Yes", True), ("On", True),
           ("false", False), ("no", False), ("0", False), ("off", False),
           ("FALSE", False), ("No", False), ("OFF", False)],
    int: [("0", 0), ("7", 7), ("1234", 1234), ("+5", 5), ("1_000", 1000)],
    float: [("0.5", 0.5), ("2", 2.0), ("1e-3", 0.001), ("10.0", 10.0)],
    str: [("value", "value"), ('"quoted"', '"quoted"'), ("", ""),
          ("a = b", "a = b"), ("  spaced  ", "spaced")],
}

BAD_VALUES = {
    bool: ["", "2", "y", "enabled", "truth"],
    int: ["", "abc", "1.5", "0x10", "8 MiB"],
    float: ["", "abc", "1,5"],
}

# Values that would pass conversion but fail the semantic checks.
SEMANTIC = {
    ("remote", "port"), ("control", "transport"), ("daemon", "workers"),
}


def _ids(params):
    return [f"{p[0]}.{p[1]}={p[2]!r}" for p in params]


def _goodCases():
    for section, name, default in ALL_OPTIONS:
        for raw, expected in GOOD_VALUES[type(default)]:
            if (section, name) in SEMANTIC:
                continue
            if name == "socket" and raw == "":
                continue  # Tested with the abstract socket forms.
            yield section, name, raw, expected


GOOD_CASES = list(_goodCases())


@pytest.mark.parametrize("section,name,raw,expected", GOOD_CASES,
                         ids=_ids(GOOD_CASES))
def test_convert_good(tmp_path, section, name, raw, expected):
    cfg = _load(tmp_path, f"[{section}]\n{name} = {raw}\n")
    value = config.toDict(cfg)[section][name]
    assert value == expected
    assert type(value) is type(expected)


def _badCases():
    for section, name, default in ALL_OPTIONS:
        for raw in BAD_VALUES.get(type(default), []):
            yield section, name, raw, type(default).__name__


BAD_CASES = list(_badCases())


@pytest.mark.parametrize("section,name,raw,typeName", BAD_CASES,
                         ids=_ids(BAD_CASES))
def test_convert_bad(tmp_path, section, name, raw, typeName):
    with pytest.raises(ConfigError) as e:
        _load(tmp_path, f"[{section}]\n{name} = {raw}\n")
    path = tmp_path / "etc" / "conf.d" / "50-test.conf"
    assert str(e.value) == (
        f"{path}: [{section}] {name}: invalid {typeName} value {raw!r}")


def test_every_option_is_typed():
    types = {type(default) for _, _, default in ALL_OPTIONS}
    assert types == {bool, int, float, str}


def test_bad_value_names_file_of_final_value(tmp_path):
    confDir = _confDir(tmp_path, {
        "10-a.conf": "[remote]\nport = 1\n",
        "50-a.conf": "[remote]\nport = abc\n",
    })
    with pytest.raises(ConfigError) as e:
        config.load(str(confDir), NO_VENDOR)
    assert str(e.value) == (
        f"{confDir}/conf.d/50-a.conf: [remote] port: invalid int value 'abc'")
    assert isinstance(e.value, ValueError)


def test_bad_value_overridden_is_fine(tmp_path):
    """
    Only the final value is converted, as in the reference.
    """
    confDir = _confDir(tmp_path, {
        "10-a.conf": "[remote]\nport = abc\n",
        "50-a.conf": "[remote]\nport = 1\n",
    })
    assert config.load(str(confDir), NO_VENDOR).remote.port == 1


def test_inline_comment_is_part_of_value(tmp_path):
    with pytest.raises(ConfigError, match="invalid int value '54323 # x'"):
        _load(tmp_path, "[remote]\nport = 54323 # x\n")


def test_quotes_are_literal(tmp_path):
    cfg = _load(tmp_path, '[tls]\nkey_file = "/k.pem"\n')
    assert cfg.tls.key_file == '"/k.pem"'


def test_multiline_value(tmp_path):
    cfg = _load(tmp_path, "[formatter_long]\nformat = a\n  b\n")
    assert cfg.formatter_long.format == "a\nb"


# Conf dir discovery and merge order.

def test_missing_conf_dir(tmp_path):
    pattern = os.path.join(str(tmp_path / "nope"), "conf.d", "*.conf")
    with pytest.raises(ConfigError) as e:
        config.load(str(tmp_path / "nope"), NO_VENDOR)
    assert str(e.value) == f"Could not find {pattern}"


def test_empty_conf_d(tmp_path):
    confDir = _confDir(tmp_path, {"README": "x", "a.conf.orig": "[x]\n"})
    with pytest.raises(ConfigError, match=r"Could not find .*\*\.conf"):
        config.load(str(confDir), NO_VENDOR)


def test_vendor_files_alone_are_not_enough(tmp_path):
    confDir = _confDir(tmp_path, {})
    vendorDir = _confDir(tmp_path, {"50-v.conf": "[remote]\nport = 1\n"},
                         name="vendor")
    with pytest.raises(ConfigError):
        config.load(str(confDir), str(vendorDir))


def test_merge_by_basename(tmp_path):
    confDir = _confDir(tmp_path, {
        "50-vdsm.conf": "[remote]\nport = 1\nhost = a\n[tls]\nenable = no\n",
        "99-user.conf": "[remote]\nport = 3\n",
    })
    vendorDir = _confDir(tmp_path, {
        "75-vendor.conf": "[remote]\nport = 2\nhost = b\n",
        "10-early.conf": "[tls]\nenable = yes\nca_file = v\n",
    }, name="vendor")
    cfg = config.load(str(confDir), str(vendorDir))
    assert cfg.remote.port == 3
    assert cfg.remote.host == "b"
    assert cfg.tls.enable is False
    assert cfg.tls.ca_file == "v"


def test_same_basename_vendor_wins(tmp_path):
    confDir = _confDir(tmp_path, {"50-x.conf": "[remote]\nport = 1\n"})
    vendorDir = _confDir(tmp_path, {"50-x.conf": "[remote]\nport = 2\n"},
                         name="vendor")
    assert config.load(str(confDir), str(vendorDir)).remote.port == 2


def test_load_files_order(tmp_path):
    a = tmp_path / "a.conf"
    b = tmp_path / "b.conf"
    a.write_text("[remote]\nport = 1\n")
    b.write_text("[remote]\nport = 2\n")
    assert config.loadFiles([str(a), str(b)]).remote.port == 2
    assert config.loadFiles([str(b), str(a)]).remote.port == 1


def test_unreadable_file(tmp_path):
    confDir = _confDir(tmp_path, {})
    (confDir / "conf.d" / "50-x.conf").symlink_to(tmp_path / "missing")
    with pytest.raises(ConfigError, match="50-x.conf: cannot read"):
        config.load(str(confDir), NO_VENDOR)


@pytest.mark.parametrize("text", [
    "port = 1\n",
    "[remote]\nport\n",
    "[remote]\nport = 1\n[remote]\nhost = x\n",
    "[remote]\nport = 1\nPort = 2\n",
])
def test_syntax_error_names_file(tmp_path, text):
    with pytest.raises(ConfigError) as e:
        _load(tmp_path, text)
    assert str(e.value).startswith(
        f"{tmp_path}/etc/conf.d/50-test.conf: invalid INI syntax: ")


def test_same_section_in_two_files(tmp_path):
    confDir = _confDir(tmp_path, {
        "10-a.conf": "[remote]\nport = 1\n",
        "20-b.conf": "[remote]\nhost = x\n",
    })
    cfg = config.load(str(confDir), NO_VENDOR)
    assert (cfg.remote.host, cfg.remote.port) == ("x", 1)


def test_not_utf8(tmp_path):
    confd = _confDir(tmp_path, {}) / "conf.d"
    (confd / "50-x.conf").write_bytes(b"[remote]\nhost = \xff\n")
    with pytest.raises(ConfigError, match="50-x.conf: not UTF-8"):
        config.load(str(confd.parent), NO_VENDOR)


# Names.

def test_unknown_sections_and_options_ignored(tmp_path):
    cfg = _load(tmp_path, (
        "[nosuch]\nport = abc\n"
        "[remote]\nnosuch = abc\nport = 7\n"
        "[Remote]\nport = 8\n"))
    assert cfg.remote.port == 7
    assert cfg == Config().replace("remote", port=7)


def test_uppercase_option_names(tmp_path):
    cfg = _load(tmp_path, "[remote]\nPORT = 7\nHost = h\n")
    assert (cfg.remote.host, cfg.remote.port) == ("h", 7)


def test_default_section_applies_to_present_sections(tmp_path):
    # As RawConfigParser in the reference: [DEFAULT] values fill options
    # of the sections that appear in the files.
    cfg = _load(tmp_path, "[DEFAULT]\nenable = false\n[local]\n[control]\n")
    assert cfg.local.enable is False
    assert cfg.control.enable is False
    assert cfg.tls.enable is True


def test_keyword_option_class(tmp_path):
    cfg = _load(tmp_path, (
        "[handler_logfile]\nclass = my.Handler\n"
        "[handler_stderr]\nCLASS = other.Handler\n"))
    assert cfg.handler_logfile.class_ == "my.Handler"
    assert cfg.handler_stderr.class_ == "other.Handler"
    d = json.loads(config.dumps(cfg))
    assert d["handler_logfile"]["class"] == "my.Handler"
    assert d["handler_stderr"]["class"] == "other.Handler"
    assert "class_" not in d["handler_logfile"]


# Abstract unix sockets.

@pytest.mark.parametrize("raw,expected", [
    ("\0/org/x", "\0/org/x"),
    ("@/org/x", "\0/org/x"),
    ("\\u0000/org/x", "\0/org/x"),
    ("\\0/org/x", "\0/org/x"),
    ("@", "\0"),
    ("", ""),
    ("/run/x.sock", "/run/x.sock"),
    ("relative/sock", "relative/sock"),
    ("/run/a@b", "/run/a@b"),
])
@pytest.mark.parametrize("section", ["local", "control"])
def test_socket_forms(tmp_path, section, raw, expected):
    cfg = _load(tmp_path, f"[{section}]\nsocket = {raw}\n")
    assert getattr(cfg, section).socket == expected


def test_abstract_socket_json(tmp_path):
    cfg = _load(tmp_path, "[local]\nsocket = @/x\n")
    assert '"socket": "\\u0000/x"' in config.dumps(cfg)


# Semantic checks.

@pytest.mark.parametrize("port", [0, 1, 54322, 65534])
def test_remote_port_ok(tmp_path, port):
    assert _load(tmp_path, f"[remote]\nport = {port}\n").remote.port == port


@pytest.mark.parametrize("port", [-1, 65535, 65536])
def test_remote_port_bad(tmp_path, port):
    with pytest.raises(ConfigError) as e:
        _load(tmp_path, f"[remote]\nport = {port}\n")
    assert str(e.value).startswith(
        f"{tmp_path}/etc/conf.d/50-test.conf: [remote] port: ")
    assert str(e.value).endswith(f": {port}")


@pytest.mark.parametrize("port", [0, 54324, 65534])
def test_control_tcp_port_ok(tmp_path, port):
    cfg = _load(tmp_path, f"[control]\ntransport = tcp\nport = {port}\n")
    assert cfg.control.port == port


@pytest.mark.parametrize("port", [None, -1, 65535, 70000])
def test_control_tcp_port_bad(tmp_path, port):
    text = "[control]\ntransport = tcp\n"
    if port is not None:
        text += f"port = {port}\n"
    with pytest.raises(ConfigError, match=r"\[control\] port: "):
        _load(tmp_path, text)


def test_control_unix_ignores_port(tmp_path):
    cfg = _load(tmp_path, "[control]\ntransport = unix\nport = 70000\n")
    assert cfg.control.port == 70000


@pytest.mark.parametrize("raw,expected", [
    ("unix", "unix"), ("tcp", "tcp"), ("TCP", "tcp"), ("Unix", "unix"),
])
def test_transport_ok(tmp_path, raw, expected):
    cfg = _load(tmp_path, f"[control]\ntransport = {raw}\nport = 1\n")
    assert cfg.control.transport == expected


@pytest.mark.parametrize("raw", ["udp", '"unix"', "", "unix,tcp"])
def test_transport_bad(tmp_path, raw):
    with pytest.raises(ConfigError, match=r"\[control\] transport: "):
        _load(tmp_path, f"[control]\ntransport = {raw}\nport = 1\n")


def test_disabled_control_is_not_checked(tmp_path):
    # A configuration the reference starts with must start here too.
    cfg = _load(tmp_path, "[control]\nenable = no\ntransport = udp\n")
    assert cfg.control.enable is False


@pytest.mark.parametrize("workers", [0, -1])
def test_workers_bad(tmp_path, workers):
    with pytest.raises(ConfigError, match=r"\[daemon\] workers: "):
        _load(tmp_path, f"[daemon]\nworkers = {workers}\n")


def test_workers(tmp_path):
    assert _load(tmp_path, "[daemon]\nworkers = 4\n").daemon.workers == 4


# The Config object.

def test_immutable():
    cfg = Config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.remote.port = 1  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.remote = None  # type: ignore[misc,assignment]


def test_replace():
    cfg = Config()
    new = cfg.replace("remote", port=4242)
    assert new.remote.port == 4242
    assert cfg.remote.port == 54322
    assert new.local is cfg.local
    assert new == dataclasses.replace(
        cfg, remote=dataclasses.replace(cfg.remote, port=4242))


def test_replace_keyword_option():
    cfg = Config().replace("handler_stderr", class_="x.Y")
    assert config.toDict(cfg)["handler_stderr"]["class"] == "x.Y"


@pytest.mark.parametrize("section,changes", [
    ("nosuch", {"port": 1}),
    ("remote", {"nosuch": 1}),
])
def test_replace_unknown(section, changes):
    with pytest.raises(TypeError):
        Config().replace(section, **changes)


def test_validate_direct():
    config.validate(Config())
    with pytest.raises(ConfigError) as e:
        config.validate(Config().replace("remote", port=65535))
    assert str(e.value) == "[remote] port: port must be 0 to 65534: 65535"
