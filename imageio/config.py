# -*- test-case-name: test.test_config -*-
"""
Daemon configuration: INI files in C{conf.d} directories, loaded into an
immutable L{Config}.

The file format, the sections, the options, their defaults and the merge
order are those of ovirt-imageio (SPEC A2, B §6), so a C{conf.d} written for
ovirt-imageio works here unchanged:

  - C{<confDir>/conf.d/*.conf} must match at least one file; the files of
    C{<vendorDir>/conf.d/*.conf} are added; all files are read in the order
    of their base names, a later file overriding the options an earlier one
    set. For equal base names the vendor file is read last.
  - The files are parsed by L{configparser.RawConfigParser}: no
    interpolation, option names are case-insensitive, section names are not,
    C{[DEFAULT]} values apply to every section present, comments only on
    lines of their own, values are taken literally (quotes are kept).
  - Unknown sections and options are ignored.
  - Each value is converted to the type of its default: C{str}, C{int},
    C{float} or C{bool} (C{true/yes/1/on}, C{false/no/0/off}, any case).

Our additions and differences (documented in C{docs/configuration.md}):

  - C{[daemon] workers}: number of worker processes (default 1).
  - A unix socket name (C{local.socket}, C{control.socket}) starting with
    C{@}, or with the texts C{\\0} or C{\\u0000}, names an abstract socket,
    exactly as a leading NUL character does; all forms are stored with a
    leading C{"\\0"}.
  - C{control.transport} is stored lower-cased.
  - Semantic errors (port ranges, transport) are found at load time and
    raised as L{ConfigError}, not when the services start.
  - An unreadable or undecodable configuration file is an error; the
    reference skips it silently.

Loading has no side effects other than reading the files.
"""

from __future__ import annotations

import configparser
import dataclasses
import glob
import json
import keyword
import os
from dataclasses import dataclass, field
from typing import Any, Iterable

__all__ = [
    "ConfigError", "Config", "load", "loadFiles", "validate", "toDict",
    "dumps", "VENDOR_DIR", "MiB",
    "Daemon", "TLS", "BackendFile", "BackendHTTP", "BackendNBD", "Remote",
    "Local", "Control", "Profile", "Loggers", "Handlers", "Formatters",
    "LoggerRoot", "HandlerLogfile", "HandlerStderr", "FormatterLong",
]

VENDOR_DIR = "/usr/lib/ovirt-imageio"

MiB = 1024 ** 2


class ConfigError(ValueError):
    """
    The configuration cannot be used: no configuration file, a file that
    cannot be read or parsed, a value of the wrong type or out of range.

    The message names the file, section, option and value when they are
    known, for example
    C{/etc/ovirt-imageio/conf.d/50-a.conf: [remote] port: invalid int value
    'abc'}.
    """


# Sections. Field names are the INI option names, except Python keywords,
# which get a trailing underscore (C{class} is C{class_}); L{_iniName} maps
# them back. Field order does not matter: L{toDict} sorts options as the
# reference prints them.

@dataclass(frozen=True)
class Daemon:
    """
    C{[daemon]}: process-wide settings.

    @ivar poll_interval: seconds between checks of termination conditions
        (kept for compatibility; the reactor does not poll).
    @ivar max_connections: connections a client should open per ticket,
        reported as C{max_readers}/C{max_writers} (advisory).
    @ivar inactivity_timeout: default seconds before an idle connection
        bound to a ticket is closed, for tickets that do not set one.
    @ivar run_dir: runtime directory (sockets, profile data).
    @ivar drop_privileges: when started as root, switch to C{user_name} and
        C{group_name} after binding.
    @ivar user_name: user to run as after dropping privileges.
    @ivar group_name: group to run as after dropping privileges.
    @ivar systemd_enable: notify systemd (C{READY=1}) once serving.
    @ivar workers: number of worker processes (our addition; 1 = a single
        process).
    """
    poll_interval: float = 1.0
    max_connections: int = 8
    inactivity_timeout: int = 60
    run_dir: str = "/run/ovirt-imageio"
    drop_privileges: bool = True
    user_name: str = "ovirtimg"
    group_name: str = "ovirtimg"
    systemd_enable: bool = True
    workers: int = 1


@dataclass(frozen=True)
class TLS:
    """
    C{[tls]}: TLS for the remote service.

    @ivar enable: serve the remote service over TLS.
    @ivar key_file: PEM private key; required when C{enable} is set.
    @ivar cert_file: PEM certificate chain; required when C{enable} is set.
    @ivar ca_file: CA bundle for verifying peers; empty means the system
        trust store.
    @ivar enable_tls1_1: also accept TLS 1.1 (the minimum is otherwise TLS
        1.2; TLS 1.0 is never accepted).
    """
    enable: bool = True
    key_file: str = ""
    cert_file: str = ""
    ca_file: str = ""
    enable_tls1_1: bool = False


@dataclass(frozen=True)
class BackendFile:
    """
    C{[backend_file]}.

    @ivar buffer_size: bytes per read or write on files and block devices.
    """
    buffer_size: int = 8 * MiB


@dataclass(frozen=True)
class BackendHTTP:
    """
    C{[backend_http]}: the proxy backend.

    @ivar ca_file: CA bundle used to verify the upstream daemon; empty means
        C{tls.ca_file}.
    @ivar buffer_size: bytes per chunk relayed to or from the upstream.
    """
    ca_file: str = ""
    buffer_size: int = 8 * MiB


@dataclass(frozen=True)
class BackendNBD:
    """
    C{[backend_nbd]}.

    @ivar buffer_size: bytes per NBD read or write request.
    """
    buffer_size: int = 8 * MiB


@dataclass(frozen=True)
class Remote:
    """
    C{[remote]}: the images service on the network.

    @ivar host: address or name to bind; C{::} is dual-stack any, C{""} is
        IPv4 any.
    @ivar port: TCP port, 0 to 65534; 0 picks a free port.
    """
    host: str = "::"
    port: int = 54322


@dataclass(frozen=True)
class Local:
    """
    C{[local]}: the images service on a unix socket.

    @ivar enable: run the local service.
    @ivar socket: socket name; a leading C{"\\0"} makes it abstract, an
        empty string picks a random abstract name at bind time.
    """
    enable: bool = True
    socket: str = "\0/org/ovirt/imageio"


@dataclass(frozen=True)
class Control:
    """
    C{[control]}: the tickets service.

    @ivar enable: run the control service.
    @ivar transport: C{unix} or C{tcp}.
    @ivar socket: unix socket name (C{transport = unix}); abstract names as
        for L{Local.socket}.
    @ivar port: TCP port on localhost (C{transport = tcp}); must be set,
        0 picks a free port.
    @ivar prefer_ipv4: bind the IPv4 address of C{localhost} first.
    @ivar remove_timeout: seconds a DELETE waits for a ticket's connections
        to finish before answering 409.
    """
    enable: bool = True
    transport: str = "unix"
    socket: str = "/run/ovirt-imageio/sock"
    port: int = -1
    prefer_ipv4: bool = True
    remove_timeout: int = 60


@dataclass(frozen=True)
class Profile:
    """
    C{[profile]}.

    @ivar filename: where C{/profile/} saves profiling data.
    """
    filename: str = "/run/ovirt-imageio/profile"


# Logging sections, in the format of logging.config.fileConfig.

@dataclass(frozen=True)
class Loggers:
    """
    C{[loggers]}.

    @ivar keys: comma-separated logger names.
    """
    keys: str = "root"


@dataclass(frozen=True)
class Handlers:
    """
    C{[handlers]}.

    @ivar keys: comma-separated handler names.
    """
    keys: str = "logfile"


@dataclass(frozen=True)
class Formatters:
    """
    C{[formatters]}.

    @ivar keys: comma-separated formatter names.
    """
    keys: str = "long"


@dataclass(frozen=True)
class LoggerRoot:
    """
    C{[logger_root]}.

    @ivar level: level name of the root logger.
    @ivar handlers: comma-separated handler names.
    @ivar propagate: kept for fileConfig compatibility.
    """
    level: str = "INFO"
    handlers: str = "logfile"
    propagate: int = 0


@dataclass(frozen=True)
class HandlerLogfile:
    """
    C{[handler_logfile]}.

    @ivar class_: handler class (INI name C{class}).
    @ivar args: Python expression, positional arguments of the class.
    @ivar kwargs: Python expression, keyword arguments of the class.
    @ivar level: level name.
    @ivar formatter: formatter name.
    """
    class_: str = "logging.handlers.RotatingFileHandler"
    args: str = '("/var/log/ovirt-imageio/daemon.log",)'
    kwargs: str = '{"maxBytes": 20971520, "backupCount": 10}'
    level: str = "DEBUG"
    formatter: str = "long"


@dataclass(frozen=True)
class HandlerStderr:
    """
    C{[handler_stderr]}.

    @ivar class_: handler class (INI name C{class}).
    @ivar args: Python expression, positional arguments of the class.
    @ivar level: level name.
    @ivar formatter: formatter name.
    """
    class_: str = "logging.StreamHandler"
    args: str = "()"
    level: str = "DEBUG"
    formatter: str = "long"


@dataclass(frozen=True)
class FormatterLong:
    """
    C{[formatter_long]}.

    @ivar format: C{%}-style record format.
    """
    format: str = (
        "%(asctime)s %(levelname)-7s (%(threadName)s) [%(name)s] %(message)s")


@dataclass(frozen=True)
class Config:
    """
    The whole configuration: one attribute per INI section, each holding one
    attribute per option (C{cfg.remote.port}, C{cfg.local.socket}).

    Instances are immutable; use L{replace} to get a changed copy.
    """
    daemon: Daemon = field(default_factory=Daemon)
    tls: TLS = field(default_factory=TLS)
    backend_file: BackendFile = field(default_factory=BackendFile)
    backend_http: BackendHTTP = field(default_factory=BackendHTTP)
    backend_nbd: BackendNBD = field(default_factory=BackendNBD)
    remote: Remote = field(default_factory=Remote)
    local: Local = field(default_factory=Local)
    control: Control = field(default_factory=Control)
    profile: Profile = field(default_factory=Profile)
    loggers: Loggers = field(default_factory=Loggers)
    handlers: Handlers = field(default_factory=Handlers)
    formatters: Formatters = field(default_factory=Formatters)
    logger_root: LoggerRoot = field(default_factory=LoggerRoot)
    handler_logfile: HandlerLogfile = field(default_factory=HandlerLogfile)
    handler_stderr: HandlerStderr = field(default_factory=HandlerStderr)
    formatter_long: FormatterLong = field(default_factory=FormatterLong)

    def replace(self, section: str, **changes: Any) -> Config:
        """
        Return a copy with some options of one section changed, for
        example C{cfg.replace("remote", port=server.port)}.

        Values are stored as given: no conversion or validation.

        @param section: section name, as in the INI files.
        @param changes: option values by attribute name (C{class_} for
            C{class}).
        @raise TypeError: for an unknown section or option.
        """
        if section not in _SECTION_NAMES:
            raise TypeError(f"unknown section {section!r}")
        old = getattr(self, section)
        return dataclasses.replace(
            self, **{section: dataclasses.replace(old, **changes)})


_SECTION_NAMES = tuple(f.name for f in dataclasses.fields(Config))


def _iniName(attr: str) -> str:
    """
    INI option name of a section attribute: C{class_} is C{class}.
    """
    if attr.endswith("_") and keyword.iskeyword(attr[:-1]):
        return attr[:-1]
    return attr


def _sortKey(attr: str) -> str:
    """
    Position of an option in the C{--show-config} output. The reference
    prints options sorted by its attribute names, where C{class} is spelled
    C{keyword__class}; we sort the same way so the output is identical.
    """
    name = _iniName(attr)
    if name != attr:
        return "keyword__" + name
    return attr


def _options(sectionClass: type) -> list[tuple[str, str, Any]]:
    """
    @return: C{(attribute, INI name, default)} of every option of a section
        class.
    """
    return [(f.name, _iniName(f.name), f.default)
            for f in dataclasses.fields(sectionClass)]


_SECTIONS: dict[str, type] = {
    f.name: f.default_factory  # type: ignore[misc]
    for f in dataclasses.fields(Config)
}


# Conversion of raw values, by the type of the option's default.

_TRUE = frozenset(["true", "yes", "1", "on"])
_FALSE = frozenset(["false", "no", "0", "off"])


def _toBool(raw: str) -> bool:
    lowered = raw.lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ValueError(raw)


def _convert(default: Any, raw: str) -> Any:
    """
    Convert C{raw} to the type of C{default}.

    C{int} and C{float} accept what Python's constructors accept (so
    C{1_000}, C{+5} and C{nan} load, as in the reference).

    @raise ValueError: the text is not a value of that type.
    """
    # bool first: it is a subclass of int.
    if isinstance(default, bool):
        return _toBool(raw)
    if isinstance(default, int):
        return int(raw)
    if isinstance(default, float):
        return float(raw)
    return raw


def _typeName(default: Any) -> str:
    return type(default).__name__


_ABSTRACT_PREFIXES = ("\0", "@", "\\u0000", "\\0")


def _normaliseSocket(name: str) -> str:
    """
    Turn every spelling of an abstract unix socket name into one with a
    leading NUL; other names are returned unchanged.

    Checked in order: a literal NUL, C{@}, the 6-character text C{\\u0000},
    the 2-character text C{\\0}.
    """
    for prefix in _ABSTRACT_PREFIXES:
        if name.startswith(prefix):
            return "\0" + name[len(prefix):]
    return name


# Loading.

def load(confDir: str, vendorDir: str = VENDOR_DIR) -> Config:
    """
    Load the configuration of a daemon.

    @param confDir: configuration directory (C{/etc/ovirt-imageio}); its
        C{conf.d/*.conf} must match at least one file.
    @param vendorDir: vendor directory whose C{conf.d/*.conf} files are
        merged in (none is fine).
    @return: a validated L{Config}.
    @raise ConfigError: no configuration file, unreadable or malformed
        file, invalid value.
    """
    pattern = os.path.join(confDir, "conf.d", "*.conf")
    files = glob.glob(pattern)
    # Fail fast: a wrong directory is a user or installation error
    # (ovirt-imageio issue #33).
    if not files:
        raise ConfigError(f"Could not find {pattern}")
    vendorFiles = glob.glob(os.path.join(vendorDir, "conf.d", "*.conf"))
    # sorted() is stable: with equal base names the vendor file, listed
    # last, is read last and wins, as in the reference. Within one
    # directory, sort by full name so the order does not depend on the
    # file system.
    ordered = sorted(sorted(files) + sorted(vendorFiles),
                     key=os.path.basename)
    return loadFiles(ordered)


def loadFiles(files: Iterable[str]) -> Config:
    """
    Load and validate configuration files, read in the given order.

    @param files: paths of INI files; later files override earlier ones.
    @return: a validated L{Config}.
    @raise ConfigError: unreadable or malformed file, invalid value.
    """
    parser = configparser.RawConfigParser()
    # RawConfigParser already lower-cases option names; be explicit since
    # our lookups depend on it.
    parser.optionxform = str.lower  # type: ignore[assignment,method-assign]

    # For error messages: which file gave each option its final value.
    sources: dict[tuple[str, str], str] = {}
    current: dict[tuple[str, str], str] = {}

    for path in files:
        _readFile(parser, path)
        for section, cls in _SECTIONS.items():
            if not parser.has_section(section):
                continue
            for _, name, _ in _options(cls):
                if parser.has_option(section, name):
                    raw = parser.get(section, name)
                    if current.get((section, name)) != raw:
                        current[(section, name)] = raw
                        sources[(section, name)] = path

    sectionValues: dict[str, Any] = {}
    for section, cls in _SECTIONS.items():
        values = {}
        for attr, name, default in _options(cls):
            key = (section, name)
            if key not in current:
                continue
            raw = current[key]
            try:
                values[attr] = _convert(default, raw)
            except ValueError:
                raise ConfigError(
                    f"{sources[key]}: [{section}] {name}: invalid "
                    f"{_typeName(default)} value {raw!r}") from None
        instance = cls(**values)
        sectionValues[section] = instance

    cfg = Config(**sectionValues)
    cfg = cfg.replace(
        "local", socket=_normaliseSocket(cfg.local.socket))
    cfg = cfg.replace(
        "control",
        socket=_normaliseSocket(cfg.control.socket),
        transport=cfg.control.transport.lower())
    validate(cfg, sources)
    return cfg


def _readFile(parser: configparser.RawConfigParser, path: str) -> None:
    """
    Read one file into C{parser}.

    @raise ConfigError: the file cannot be read, is not UTF-8, or is not
        valid INI (including a section or option repeated in one file).
    """
    try:
        with open(path, encoding="utf-8") as f:
            parser.read_file(f, source=path)
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8: {e.reason}") from None
    except configparser.Error as e:
        message = str(e).replace("\n", " ")
        raise ConfigError(f"{path}: invalid INI syntax: {message}") from None


def validate(cfg: Config,
             sources: dict[tuple[str, str], str] | None = None) -> None:
    """
    Check the values whose type is right but whose meaning is not.

    Checks only what the daemon would use, as the reference does: the
    control options are checked only when the control service is enabled.

    @param sources: file that set each C{(section, option)}, to name it in
        the message.
    @raise ConfigError: a value is out of range.
    """
    def fail(section: str, option: str, value: Any, why: str) -> None:
        where = (sources or {}).get((section, option))
        prefix = f"{where}: " if where else ""
        raise ConfigError(
            f"{prefix}[{section}] {option}: {why}: {value!r}")

    if not 0 <= cfg.remote.port < 65535:
        fail("remote", "port", cfg.remote.port, "port must be 0 to 65534")

    if cfg.control.enable:
        transport = cfg.control.transport
        if transport not in ("unix", "tcp"):
            fail("control", "transport", transport,
                 "transport must be 'unix' or 'tcp'")
        if transport == "tcp" and not 0 <= cfg.control.port < 65535:
            fail("control", "port", cfg.control.port,
                 "port must be set to 0 to 65534 when transport is tcp")

    if cfg.daemon.workers < 1:
        fail("daemon", "workers", cfg.daemon.workers,
             "must be 1 or more")


# Output.

def toDict(cfg: Config) -> dict[str, dict[str, Any]]:
    """
    The configuration as nested dicts keyed by INI names, sections and
    options in the order C{ovirt-imageio --show-config} prints them.
    """
    result: dict[str, dict[str, Any]] = {}
    for section in sorted(_SECTION_NAMES):
        obj = getattr(cfg, section)
        attrs = sorted((f.name for f in dataclasses.fields(obj)),
                       key=_sortKey)
        result[section] = {_iniName(a): getattr(obj, a) for a in attrs}
    return result


def dumps(cfg: Config) -> str:
    """
    The C{--show-config} text: L{toDict} as JSON indented by 4 spaces, with
    non-ASCII characters (the NUL of abstract sockets) escaped as
    C{\\uXXXX}. No trailing newline.
    """
    return json.dumps(toDict(cfg), indent=4)
