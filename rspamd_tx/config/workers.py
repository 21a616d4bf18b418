"""Option schemas of the sections rspamd-tx reads, and :func:`check_config`.

Each section is a frozen dataclass whose fields are declared with
:func:`~rspamd_tx.config.schema.option`; the same declaration gives the typed
result, the checker and ``confighelp``.  Option names, types and defaults
follow Rspamd 3.4 (``src/libserver/cfg_rcl.c``, ``src/rspamd_proxy.c``,
``src/fuzzy_storage.c``, ``src/worker.c``, ``src/controller.c``); options that
exist only in rspamd-tx say so in their doc.

Sections read: ``options`` (:class:`GlobalOptions`), ``logging``
(:class:`LoggingOptions`), the server settings of ``redis``
(:class:`RedisOptions`, for the fuzzy storage) and ``worker`` (:class:`WorkerConfig` per worker:
``rspamd_proxy`` and ``fuzzy`` are run; ``normal`` and ``controller`` are
accepted so that an Rspamd configuration loads cleanly).  Every other
top-level section (modules, ``classifier``, ``actions``, ...) is ignored.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from rspamd_tx.config.schema import (
    BindLinesType,
    BlockType,
    BoolType,
    Diagnostic,
    FloatType,
    HeaderMapType,
    IntListType,
    IntType,
    KeypairType,
    NamedBlocksType,
    NetworkEntry,
    NetworkListType,
    OptionType,
    PublicKeyType,
    RepeatedStringType,
    Schema,
    SizeType,
    StringListType,
    StringType,
    TimeType,
    UpstreamHostsType,
    check_section,
    option,
    schema_from_dataclass,
)
from rspamd_tx.config.tree import Location, UclObject
from rspamd_tx.protocols.keypair import Keypair

__all__ = [
    "COMMON_SCHEMA",
    "Config",
    "ControllerOptions",
    "DnsOptions",
    "FailurePolicy",
    "FuzzyOptions",
    "GLOBAL_SCHEMA",
    "GlobalOptions",
    "LOGGING_SCHEMA",
    "LoggingOptions",
    "MirrorBlock",
    "Neighbour",
    "NormalOptions",
    "ProxyOptions",
    "RedisOptions",
    "RedisServers",
    "SECTION_SCHEMAS",
    "UpstreamBlock",
    "UpstreamTunables",
    "WORKER_SCHEMAS",
    "WorkerCommon",
    "WorkerConfig",
    "check_config",
]

DEFAULT_SCAN_PORT = 11333
DEFAULT_REDIS_PORT = 6379
DEFAULT_DNS_PORT = 53
DEFAULT_SENTINEL_PORT = 26379
DEFAULT_MAX_MESSAGE = 50 * 1024 * 1024

_TIME = TimeType()
_SIZE = SizeType()
_BOOL = BoolType()
_INT = IntType()
_UINT = IntType(minimum=0)
_STRING = StringType()
_STRINGS = StringListType()
_NETWORKS = NetworkListType()
_PUBKEY = PublicKeyType()
_KEYPAIR = KeypairType()
_FAILURE_ACTION = StringType(choices=("tempfail", "accept", "reject", "discard"))
_LOG_TAG_TYPE = StringType(
    choices=("session", "session_tag", "queue_id", "queue-id", "none", "skip")
)


# ---------------------------------------------------------------------------
# options { ... }


@dataclass(frozen=True)
class UpstreamTunables:
    """``options { upstream { ... } }``: failure accounting of every upstream list."""

    max_errors: int = option(
        _UINT, 4, "errors allowed per error_time before an upstream is marked down"
    )
    error_time: float = option(_TIME, 10.0, "error-rate window")
    revive_time: float = option(
        _TIME, 60.0, "time a failed upstream stays out (plus up to 40 % jitter)"
    )
    lazy_resolve_time: float = option(
        _TIME, 3600.0, "period of DNS re-resolution of upstream names"
    )
    resolve_min_interval: float = option(
        _TIME, 60.0, "minimum gap between re-resolutions of one name (Rspamd 3.9+)"
    )


UPSTREAM_TUNABLES_SCHEMA = schema_from_dataclass(
    UpstreamTunables, "upstream", "Upstream failure accounting (options { upstream { } })"
)


@dataclass(frozen=True)
class DnsOptions:
    """``options { dns { ... } }``: the resolver."""

    nameserver: tuple[str, ...] = option(
        UpstreamHostsType(DEFAULT_DNS_PORT),
        (),
        "DNS servers as an upstream list",
        aliases=("server",),
    )
    timeout: float = option(_TIME, 1.0, "DNS request timeout")
    retransmits: int = option(_UINT, 5, "DNS request retransmits")
    sockets: int = option(_UINT, 16, "sockets per DNS server", aliases=("connections",))
    enable_dnssec: bool = option(_BOOL, False, "enable DNSSEC")


DNS_SCHEMA = schema_from_dataclass(DnsOptions, "dns", "DNS resolver (options { dns { } })")


@dataclass(frozen=True)
class Neighbour:
    """``options { neighbours { NAME { host; path; } } }``: a cluster member for the web UI."""

    name: str = option(_STRING, "", "neighbour name (the block key)")
    host: str = option(_STRING, "", "URL of the neighbour's controller", required=True)
    path: str = option(_STRING, "/", "path prefix on the neighbour")


NEIGHBOUR_SCHEMA = schema_from_dataclass(Neighbour, "neighbour", "A cluster member")


@dataclass(frozen=True)
class GlobalOptions:
    """The global ``options { ... }`` section.

    Local addresses are the union of ``local_addrs`` and ``local_networks``
    (Rspamd treats the two keys as one option).
    """

    upstream: UpstreamTunables = option(
        BlockType(UPSTREAM_TUNABLES_SCHEMA),
        UpstreamTunables(),
        "upstream failure accounting",
        aliases=("upstreams",),
    )
    dns: DnsOptions = option(BlockType(DNS_SCHEMA), DnsOptions(), "DNS resolver")
    neighbours: tuple[Neighbour, ...] = option(
        NamedBlocksType(NEIGHBOUR_SCHEMA, "neighbour"), (), "members of the Rspamd cluster"
    )
    local_addrs: tuple[NetworkEntry, ...] = option(
        _NETWORKS, (), "addresses and networks treated as local"
    )
    local_networks: tuple[NetworkEntry, ...] = option(
        _NETWORKS, (), "addresses and networks treated as local (same as local_addrs)"
    )
    hs_cache_dir: str | None = option(
        _STRING, None, "directory of the hyperscan cache (default $DBDIR/)"
    )
    task_timeout: float = option(
        _TIME, 8.0, "maximum time to scan a message", aliases=("check_timeout",)
    )
    soft_reject_on_timeout: bool = option(_BOOL, False, "soft reject when the task times out")
    max_message: int = option(_SIZE, DEFAULT_MAX_MESSAGE, "largest message scanned")
    sessions_cache: bool = option(_BOOL, False, "keep a cache of sessions to debug dangling ones")
    max_sessions_cache: int = option(_UINT, 100, "sessions in the cache before warning")
    ssl_ca_path: str | None = option(_STRING, None, "CA bundle for TLS to upstreams")
    ssl_ciphers: str = option(_STRING, "HIGH:!aNULL:!kRSA:!PSK:!SRP:!MD5:!RC4", "TLS cipher list")
    tempdir: str = option(_STRING, "/tmp", "directory for temporary files")
    pidfile: str | None = option(_STRING, None, "path of the pid file")
    control_socket: str | None = option(_STRING, None, "path of the control socket (with mode=...)")
    dns_nameserver: tuple[str, ...] = option(
        UpstreamHostsType(DEFAULT_DNS_PORT), (), "legacy: DNS servers (use dns { nameserver })"
    )
    dns_timeout: float | None = option(_TIME, None, "legacy: DNS request timeout")
    dns_retransmits: int | None = option(_INT, None, "legacy: DNS retransmits")
    dns_sockets: int | None = option(_INT, None, "legacy: DNS sockets per server")
    dns_max_requests: int = option(_INT, 64, "DNS requests per task")
    cache_file: str | None = option(_STRING, None, "path of the symbols cache file")
    cache_reload: float = option(_TIME, 30.0, "how often the symbols cache is reloaded")
    explicit_modules: tuple[str, ...] = option(_STRINGS, (), "modules always loaded")
    allow_raw_input: bool = option(_BOOL, True, "allow non-MIME input")
    one_shot: bool = option(_BOOL, False, "add every symbol only once per message")
    check_attachements: bool = option(_BOOL, True, "treat text attachments as text parts")
    filters: tuple[str, ...] = option(_STRINGS, (), "internal filters enabled")
    map_watch_interval: float = option(_TIME, 60.0, "interval of map checks")
    map_file_watch_multiplier: float = option(
        FloatType(), 0.1, "map watch multiplier for file maps"
    )
    maps_cache_dir: str | None = option(
        _STRING, None, "directory of cached map data (default $DBDIR)"
    )
    monitoring_watch_interval: float = option(_TIME, 60.0, "interval of monitored checks")
    disable_monitoring: bool = option(_BOOL, False, "disable monitoring")
    fips_mode: bool = option(_BOOL, False, "FIPS 140-2 mode in OpenSSL")
    dynamic_conf: str | None = option(_STRING, None, "path of the dynamic configuration")
    rrd: str | None = option(_STRING, None, "path of the RRD file")
    stats_file: str | None = option(_STRING, None, "path of the statistics file")
    history_file: str | None = option(_STRING, None, "path of the history file")
    history_rows: int = option(_UINT, 200, "rows in the history")
    check_all_filters: bool = option(_BOOL, False, "always check all filters")
    public_groups_only: bool = option(_BOOL, False, "output public groups only")
    enable_test_patterns: bool = option(_BOOL, False, "enable GTUBE-like test patterns")
    enable_css_parser: bool = option(_BOOL, True, "enable the CSS parser")
    enable_experimental: bool = option(_BOOL, False, "enable experimental plugins")
    disable_pcre_jit: bool = option(_BOOL, False, "disable PCRE JIT")
    min_word_len: int = option(
        _UINT, 0, "shortest word used in statistics/fuzzy (0: Rspamd default)"
    )
    max_word_len: int = option(
        _UINT, 0, "longest word used in statistics/fuzzy (0: Rspamd default)"
    )
    words_decay: int = option(_UINT, 600, "start skipping words at this count")
    url_tld: str | None = option(_STRING, None, "path of the TLD list", aliases=("tld",))
    disable_hyperscan: bool = option(_BOOL, False, "disable hyperscan")
    vectorized_hyperscan: bool = option(_BOOL, False, "obsolete")
    cores_dir: str | None = option(_STRING, None, "directory for core files")
    max_cores_size: int | None = option(_SIZE, None, "limit of the size of cores_dir")
    max_cores_count: int | None = option(_UINT, None, "limit of files in cores_dir")
    trusted_keys: tuple[str, ...] = option(_STRINGS, (), "trusted public keys for signatures")
    enable_shutdown_workaround: bool = option(_BOOL, True, "workaround for legacy clients")
    ignore_received: bool = option(_BOOL, False, "ignore the first Received header")
    max_pic: int = option(_SIZE, 1024 * 1024, "largest picture normalised")
    images_cache: int = option(_UINT, 256, "size of the images DCT cache")
    zstd_input_dictionary: str | None = option(
        _STRING, None, "zstd dictionary for inbound compression"
    )
    zstd_output_dictionary: str | None = option(
        _STRING, None, "zstd dictionary for outbound compression"
    )
    compat_messages: bool = option(_BOOL, False, "pre-1.4 protocol messages")
    max_shots: int = option(_INT, 100, "hits per symbol")
    lua_gc_step: int = option(_UINT, 200, "Lua GC step")
    lua_gc_pause: int = option(_UINT, 200, "Lua GC pause")
    full_gc_iters: int = option(_UINT, 0, "tasks between full GCs (0: off)")
    heartbeat_interval: float = option(_TIME, 10.0, "time between worker heartbeats")
    heartbeats_loss_max: int = option(
        _INT, 0, "lost heartbeats before a worker is restarted (0: never)"
    )
    max_lua_urls: int = option(_INT, 1024, "URLs passed to Lua")
    max_urls: int = option(_INT, 10240, "URLs processed per message")
    max_recipients: int = option(_INT, 1024, "recipients processed per message")
    max_blas_threads: int = option(_INT, 1, "BLAS threads for neural networks")
    max_opts_len: int = option(_INT, 4096, "size of all options of a symbol")
    events_backend: str = option(_STRING, "auto", "event loop backend")
    classify_headers: tuple[str, ...] = option(
        _STRINGS, (), "headers used by the classifier (read by Lua)"
    )


GLOBAL_SCHEMA = schema_from_dataclass(GlobalOptions, "options", "Global options (options { })")


# ---------------------------------------------------------------------------
# logging { ... }


def _validate_logging(values: Mapping[str, Any]) -> list[str]:
    if values["type"] == "file" and not values["filename"]:
        return ["option 'filename' is required for type = file"]
    return []


@dataclass(frozen=True)
class LoggingOptions:
    """The ``logging { ... }`` section."""

    type: str = option(
        StringType(choices=("console", "stderr", "file", "syslog")),
        "console",
        "where logs go: console (standard output), stderr, file or syslog",
    )
    filename: str | None = option(_STRING, None, "log file for type = file")
    facility: str = option(
        StringType(
            choices=(
                "auth",
                "cron",
                "daemon",
                "mail",
                "user",
                "local0",
                "local1",
                "local2",
                "local3",
                "local4",
                "local5",
                "local6",
                "local7",
                "log_auth",
                "log_cron",
                "log_daemon",
                "log_mail",
                "log_user",
                "log_local0",
                "log_local1",
                "log_local2",
                "log_local3",
                "log_local4",
                "log_local5",
                "log_local6",
                "log_local7",
            )
        ),
        "daemon",
        "syslog facility for type = syslog",
    )
    level: str = option(
        StringType(choices=("error", "warning", "notice", "message", "info", "silent", "debug")),
        "warning",
        "lowest severity logged",
    )
    json: bool = option(_BOOL, False, "write one JSON object per line (rspamd-tx)")
    color: bool = option(_BOOL, False, "coloured console output", aliases=("log_color",))
    severity: bool = option(
        _BOOL, False, "print the severity of each line", aliases=("log_severity",)
    )
    systemd: bool = option(_BOOL, False, "systemd-compatible output", aliases=("log_systemd",))
    usec: bool = option(_BOOL, False, "microsecond timestamps", aliases=("log_usec",))
    log_re_cache: bool = option(_BOOL, False, "log regexp statistics")
    log_buffer: int = option(_SIZE, 0, "size of the log buffer for file logging")
    log_urls: bool = option(_BOOL, False, "log every URL found in a message")
    debug_ip: tuple[NetworkEntry, ...] = option(
        _NETWORKS, (), "clients whose requests are logged at debug level"
    )
    debug_modules: tuple[str, ...] = option(_STRINGS, (), "modules logged at debug level")
    log_format: str | None = option(_STRING, None, "format of the per-task log line")
    encryption_key: str | None = option(_PUBKEY, None, "public key to encrypt sensitive log data")
    error_elts: int = option(_UINT, 10, "size of the ring of last errors")
    error_maxlen: int = option(_UINT, 1000, "length of each remembered error")


LOGGING_SCHEMA = schema_from_dataclass(
    LoggingOptions, "logging", "Logging (logging { })", validate=_validate_logging
)


# ---------------------------------------------------------------------------
# redis { ... } (the module section; read for the fuzzy storage's fallback)

#: The connection options ``redis { }`` and ``worker "fuzzy"`` declare alike:
#: key -> (type, default, help, aliases).
_REDIS_OPTIONS: dict[str, tuple[OptionType, Any, str, tuple[str, ...]]] = {
    "servers": (UpstreamHostsType(DEFAULT_REDIS_PORT), (),
                "Redis servers for reads and writes", ("server",)),
    "read_servers": (UpstreamHostsType(DEFAULT_REDIS_PORT), (),
                     "Redis servers for reads", ()),
    "write_servers": (UpstreamHostsType(DEFAULT_REDIS_PORT), (),
                      "Redis servers for writes", ()),
    "username": (_STRING, None, "Redis ACL user", ()),
    "password": (_STRING, None, "Redis password", ()),
    "timeout": (_TIME, 1.0, "Redis request timeout", ()),
    "sentinels": (UpstreamHostsType(DEFAULT_SENTINEL_PORT), (),
                  "Redis Sentinel servers", ()),
}


def _redis_option(key: str) -> Any:
    """A new dataclass field for the Redis connection option ``key``
    (one of :data:`_REDIS_OPTIONS`)."""
    type_, default, doc, aliases = _REDIS_OPTIONS[key]
    return option(type_, default, doc, aliases=aliases)


@dataclass(frozen=True)
class RedisServers:
    """Redis connection settings as Rspamd's ``lua_redis`` reads them.

    ``servers`` serve reads and writes unless ``read_servers`` /
    ``write_servers`` are given.
    """

    servers: tuple[str, ...] = _redis_option("servers")
    read_servers: tuple[str, ...] = _redis_option("read_servers")
    write_servers: tuple[str, ...] = _redis_option("write_servers")
    username: str | None = _redis_option("username")
    password: str | None = _redis_option("password")
    db: int | None = option(_UINT, None, "Redis database number", aliases=("dbname", "database"))
    timeout: float = _redis_option("timeout")
    sentinels: tuple[str, ...] = _redis_option("sentinels")

    @property
    def configured(self) -> bool:
        """Whether any server is named."""
        return bool(self.servers or self.read_servers or self.write_servers)


REDIS_SERVERS_SCHEMA = schema_from_dataclass(
    RedisServers, "redis", "Redis connection settings", strict=False
)


@dataclass(frozen=True)
class RedisOptions(RedisServers):
    """The global ``redis { ... }`` section, as far as the fuzzy storage uses it.

    It is a module section: keys other than these (other modules' blocks,
    ``lua_redis`` tunables) are ignored without a warning.
    """

    fuzzy: RedisServers | None = option(
        BlockType(REDIS_SERVERS_SCHEMA), None, "Redis settings of the fuzzy storage"
    )
    fuzzy_storage: RedisServers | None = option(
        BlockType(REDIS_SERVERS_SCHEMA), None, "Redis settings of the fuzzy storage (alternative)"
    )


REDIS_SCHEMA = schema_from_dataclass(
    RedisOptions, "redis", "Global Redis settings (redis { }; other keys ignored)", strict=False
)


# ---------------------------------------------------------------------------
# worker common options


@dataclass(frozen=True)
class WorkerCommon:
    """Options every worker has.

    ``bind_socket`` keeps the listen specifications as written; ``count`` is
    ``None`` when unset (Rspamd then runs min(4, max(1, CPUs - 2))
    processes).
    """

    bind_socket: tuple[str, ...] = option(
        BindLinesType(),
        (),
        "listen specifications (host:port, *:port, /path mode=0666, systemd:N)",
        aliases=("listen", "bind"),
    )
    count: int | None = option(_INT, None, "processes; 0 or less disables the worker")
    enabled: bool = option(_BOOL, True, "false: the worker is not started")
    max_files: int = option(_UINT, 0, "RLIMIT_NOFILE (0: unchanged)")
    max_core: int = option(_SIZE, 0, "RLIMIT_CORE (0: unchanged)")

    @property
    def active(self) -> bool:
        """Whether the worker is to be started (enabled and a positive or default count)."""
        return self.enabled and (self.count is None or self.count > 0)


COMMON_SCHEMA = schema_from_dataclass(WorkerCommon, "worker", "Options of every worker")


# ---------------------------------------------------------------------------
# worker "rspamd_proxy"


def _validate_upstream(values: Mapping[str, Any]) -> list[str]:
    if not values["hosts"] and not values["self_scan"]:
        return ["option 'hosts' is required unless self_scan = true"]
    return []


@dataclass(frozen=True)
class UpstreamBlock:
    """``upstream "name" { ... }`` of the proxy: one backend.

    ``default`` is ``None`` when not written: a ``self_scan`` upstream without
    an explicit ``default`` is then the default (see
    :attr:`ProxyOptions.default_upstream`).  ``timeout`` is ``None`` when the
    worker ``timeout`` applies.  ``hosts`` are the upstream lines as written.
    """

    name: str = option(
        _STRING, "", "upstream name: the Host value routed to it (default: block key)"
    )
    default: bool | None = option(_BOOL, None, "the default backend")
    hosts: tuple[str, ...] = option(
        UpstreamHostsType(DEFAULT_SCAN_PORT),
        (),
        "backend list (default port 11333); required unless self_scan",
    )
    key: str | None = option(
        _PUBKEY, None, "backend public key: requests are encrypted (HTTPCrypt)"
    )
    compression: bool = option(_BOOL, False, "zstd-compress request bodies", aliases=("compress",))
    self_scan: bool = option(_BOOL, False, "scan in-process instead of forwarding")
    timeout: float | None = option(
        _TIME, None, "I/O timeout for this backend (default: worker timeout)"
    )
    local: bool = option(_BOOL, False, "treat the backend as local (GET, File header)")
    settings_id: str | None = option(_STRING, None, "force this Settings-ID", aliases=("settings",))
    parser: str | None = option(_STRING, None, "Lua chunk returning a reply parser")
    ssl: bool = option(_BOOL, False, "TLS to the backend (Rspamd 3.12+)")
    keepalive: bool = option(
        _BOOL, False, "keep-alive connections (Rspamd 3.12+)", aliases=("keep_alive",)
    )
    extra_headers: Mapping[str, str] | None = option(
        HeaderMapType(), None, "headers set on every request (Rspamd 3.12+)"
    )
    log_tag_type: str | None = option(
        _LOG_TAG_TYPE,
        None,
        "log tag mode for this backend (default: worker value)",
        aliases=("log_tag",),
    )
    enabled: bool = option(_BOOL, True, "false: the block is skipped")
    disabled: bool = option(_BOOL, False, "true: the block is skipped")


UPSTREAM_SCHEMA = schema_from_dataclass(
    UpstreamBlock, "upstream", "A proxy backend", validate=_validate_upstream
)


@dataclass(frozen=True)
class MirrorBlock:
    """``mirror "name" { ... }`` of the proxy: a backend that gets copies of requests."""

    name: str = option(_STRING, "", "mirror name (default: block key)")
    hosts: tuple[str, ...] = option(
        UpstreamHostsType(DEFAULT_SCAN_PORT), (), "mirror list (default port 11333)", required=True
    )
    probability: float = option(
        FloatType(minimum=0.0), 1.0, "share of sessions copied to the mirror", aliases=("prob",)
    )
    key: str | None = option(_PUBKEY, None, "mirror public key: requests are encrypted")
    compression: bool = option(_BOOL, False, "zstd-compress request bodies", aliases=("compress",))
    timeout: float | None = option(_TIME, None, "I/O timeout (default: worker timeout)")
    local: bool = option(_BOOL, False, "treat the mirror as local")
    settings_id: str | None = option(_STRING, None, "force this Settings-ID", aliases=("settings",))
    parser: str | None = option(_STRING, None, "Lua chunk returning a reply parser")
    log_tag_type: str | None = option(
        _LOG_TAG_TYPE, None, "log tag mode (default: worker value)", aliases=("log_tag",)
    )
    enabled: bool = option(_BOOL, True, "false: the block is skipped")
    disabled: bool = option(_BOOL, False, "true: the block is skipped")


MIRROR_SCHEMA = schema_from_dataclass(MirrorBlock, "mirror", "A proxy mirror")


@dataclass(frozen=True)
class FailurePolicy:
    """``failure_policy { ... }`` (rspamd-tx): what the proxy answers when scanning fails.

    Each class of failure maps to ``tempfail``, ``accept``, ``reject`` or
    ``discard``.
    """

    no_upstream: str = option(_FAILURE_ACTION, "tempfail", "no backend configured or selectable")
    timeout: str = option(_FAILURE_ACTION, "tempfail", "every attempt timed out")
    bad_reply: str = option(
        _FAILURE_ACTION, "tempfail", "refused, reset, bad HTTP or unusable result"
    )
    oversize: str = option(_FAILURE_ACTION, "tempfail", "message larger than max_message")


FAILURE_POLICY_SCHEMA = schema_from_dataclass(
    FailurePolicy, "failure_policy", "Answers to scan failures (rspamd-tx)"
)


@dataclass(frozen=True)
class ProxyOptions:
    """Options of ``worker "rspamd_proxy"`` (Rspamd's plus rspamd-tx's own)."""

    milter: bool = option(_BOOL, False, "speak milter instead of HTTP on the sockets")
    timeout: float = option(_TIME, 120.0, "client I/O timeout and default backend timeout")
    max_retries: int = option(_UINT, 5, "backend attempts per request (0: no limit)")
    upstreams: tuple[UpstreamBlock, ...] = option(
        NamedBlocksType(UPSTREAM_SCHEMA, "upstream"), (), "backends", name="upstream"
    )
    mirrors: tuple[MirrorBlock, ...] = option(
        NamedBlocksType(MIRROR_SCHEMA, "mirror"), (), "mirrors", name="mirror"
    )
    scripts: tuple[str, ...] = option(
        RepeatedStringType(), (), "compare scripts: Lua chunks or paths (repeatable)", name="script"
    )
    keypair: Keypair | None = option(
        _KEYPAIR, None, "keypair that lets HTTP clients encrypt to the proxy"
    )
    encrypted_only: bool = option(_BOOL, False, "non-local HTTP clients must encrypt")
    discard_on_reject: bool = option(_BOOL, False, "milter: discard instead of rejecting")
    quarantine_on_reject: bool = option(_BOOL, False, "milter: quarantine instead of rejecting")
    spam_header: str = option(_STRING, "X-Spam", "milter: header set by the add header action")
    reject_message: str = option(_STRING, "Spam message rejected", "milter: text of 554 5.7.1")
    quarantine_message: str = option(
        _STRING, "Spam message quarantined", "milter: quarantine reason"
    )
    tempfail_message: str = option(_STRING, "Try again later", "milter: text of 451 4.7.1")
    client_ca_name: str | None = option(
        _STRING, None, "milter: trust cert_subject as user when issued by this CA"
    )
    log_tag_type: str = option(_LOG_TAG_TYPE, "session", "log tag sent to backends")
    max_message: int = option(
        _SIZE,
        DEFAULT_MAX_MESSAGE,
        "largest message accepted; larger ones hit failure_policy.oversize (rspamd-tx)",
    )
    failure_policy: FailurePolicy = option(
        BlockType(FAILURE_POLICY_SCHEMA), FailurePolicy(), "answers to scan failures (rspamd-tx)"
    )
    metrics: str | None = option(
        BindLinesType(repeatable=False),
        None,
        "listen address of the Prometheus metrics endpoint, in bind_socket syntax (rspamd-tx)",
    )
    whitelist: tuple[NetworkEntry, ...] = option(
        _NETWORKS, (), "milter clients accepted without scanning: networks, host names, map files"
        " (rmilter)"
    )
    extended_spam_headers: bool = option(
        _BOOL, False, "milter: add X-Spamd-Result and X-Rspamd-Server headers (rspamd-tx)"
    )
    send_client_ip: bool = option(
        _BOOL,
        False,
        "HTTP mode: add IP with the client's address when a request has none, as Rspamd 3.14+"
        " does; Rspamd 3.4 adds nothing (rspamd-tx)",
    )

    @property
    def default_upstream(self) -> UpstreamBlock | None:
        """The default backend: the last with ``default = true``, else the last
        ``self_scan`` one without an explicit ``default``; ``None`` if neither."""
        chosen: UpstreamBlock | None = None
        for upstream in self.upstreams:
            if upstream.default or (upstream.default is None and upstream.self_scan):
                chosen = upstream
        return chosen

    @property
    def self_scan(self) -> bool:
        """Whether any backend scans in-process."""
        return any(upstream.self_scan for upstream in self.upstreams)


PROXY_SCHEMA = schema_from_dataclass(ProxyOptions, "rspamd_proxy", "Proxy worker options")


# ---------------------------------------------------------------------------
# worker "fuzzy"


def _validate_fuzzy(values: Mapping[str, Any]) -> list[str]:
    database = values["database"]
    if values["backend"] == "redis" and database is not None and not database.strip().isdigit():
        return [
            f"option 'database' must be a Redis database number with backend redis,"
            f" got {database!r}"
        ]
    return []


@dataclass(frozen=True)
class FuzzyOptions:
    """Options of ``worker "fuzzy"`` (fuzzy storage), Rspamd's plus rspamd-tx's own.

    The storage writes to Redis when ``backend = redis``, else to sqlite at
    :attr:`sqlite_path`.  With Redis and no ``servers``/``read_servers``/
    ``write_servers`` here, Rspamd takes the servers from the global
    ``redis { fuzzy { } }`` or ``redis { }`` section (not part of this
    schema).  ``keypairs`` are the server keypairs; the last one is the
    default key.
    """

    backend: str = option(
        StringType(choices=("sqlite", "redis", "noop")), "sqlite", "storage backend"
    )
    hashfile: str | None = option(
        _STRING, None, "sqlite database file", aliases=("hash_file", "file")
    )
    database: str | None = option(
        _STRING, None, "sqlite: database file; redis: database number (same as db)"
    )
    dbdir: str | None = option(
        _STRING, None, "directory of fuzzy.db when no hashfile is given (rspamd-tx)"
    )
    servers: tuple[str, ...] = _redis_option("servers")
    read_servers: tuple[str, ...] = _redis_option("read_servers")
    write_servers: tuple[str, ...] = _redis_option("write_servers")
    prefix: str = option(_STRING, "fuzzy", "Redis key prefix")
    db: int | None = option(_UINT, None, "Redis database number", aliases=("dbname",))
    username: str | None = _redis_option("username")
    password: str | None = _redis_option("password")
    timeout: float = _redis_option("timeout")
    sentinels: tuple[str, ...] = _redis_option("sentinels")
    sentinel_watch_time: float | None = option(_TIME, None, "Sentinel polling period")
    sentinel_masters_pattern: str | None = option(_STRING, None, "Sentinel masters name pattern")
    sentinel_master_maxerrors: int | None = option(
        _UINT, None, "Sentinel master errors before switching"
    )
    sync: float = option(_TIME, 60.0, "flush period of the update queue (jittered by up to 50 %)")
    expire: float = option(_TIME, 172800.0, "lifetime of hashes")
    delay: float | None = option(_TIME, None, "hide hashes younger than this from CHECK")
    delay_whitelist: tuple[NetworkEntry, ...] = option(_NETWORKS, (), "sources exempt from delay")
    allow_update: tuple[NetworkEntry, ...] = option(
        _NETWORKS, (), "sources allowed to write and delete"
    )
    allow_update_keys: tuple[str, ...] = option(
        _STRINGS, (), "key ids whose users may write and delete"
    )
    keypairs: tuple[Keypair, ...] = option(
        KeypairType(repeatable=True),
        (),
        "server keypairs (repeatable; the last is the default)",
        name="keypair",
    )
    keypair_cache_size: int = option(_UINT, 512, "cached shared keys")
    encrypted_only: bool = option(_BOOL, False, "refuse plaintext commands")
    read_only: bool = option(_BOOL, False, "refuse every write")
    dedicated_update_worker: bool = option(
        _BOOL, False, "Rspamd: process 0 only writes; no effect here (warned)"
    )
    blocked: tuple[NetworkEntry, ...] = option(_NETWORKS, (), "sources ignored entirely")
    updates_maxfail: int = option(_UINT, 3, "failed flushes before a batch is dropped")
    skip_hashes: tuple[str, ...] = option(
        _STRINGS, (), "digests (hex) refused on write, or map paths"
    )
    ratelimit_whitelist: tuple[NetworkEntry, ...] = option(
        _NETWORKS, (), "sources exempt from rate limits"
    )
    ratelimit_max_buckets: int = option(_UINT, 2000, "rate buckets kept")
    ratelimit_network_mask: int = option(IntType(0, 32), 24, "IPv4 prefix length of a rate bucket")
    ratelimit_bucket_ttl: float = option(_TIME, 3600.0, "lifetime of a rate bucket")
    ratelimit_rate: float | None = option(
        FloatType(minimum=0.0), None, "leak rate (requests per second)"
    )
    ratelimit_burst: float | None = option(FloatType(minimum=0.0), None, "bucket capacity")
    ratelimit_log_only: bool = option(_BOOL, False, "only log rate limit hits")
    forbidden_ids: tuple[int, ...] = option(
        IntListType(), (), "flags whose hits are hidden (Rspamd 3.6+)"
    )
    weak_ids: tuple[int, ...] = option(
        IntListType(), (), "flags that never overwrite another (Rspamd 3.6+)"
    )
    dynamic_keys_map: str | None = option(_STRING, None, "map of extra keypairs (Rspamd 3.8.2+)")
    tcp_timeout: float = option(_TIME, 5.0, "idle timeout of TCP connections (Rspamd 3.14+)")
    slaves: tuple[str, ...] = option(
        _STRINGS,
        (),
        "storages this master replicates to: host, host:port or [v6]:port (rspamd-tx)",
    )
    masters: tuple[NetworkEntry, ...] = option(
        _NETWORKS, (), "sources allowed to push replication (rspamd-tx)"
    )
    master_key: str | None = option(
        _PUBKEY, None, "public key replication pushes must come from (rspamd-tx)"
    )
    master_timeout: float = option(_TIME, 10.0, "timeout of replication pushes (rspamd-tx)")
    sync_keypair: Keypair | None = option(
        _KEYPAIR, None, "keypair a master replicates with; default: the last keypair (rspamd-tx)"
    )
    replication_port: int = option(
        IntType(1, 65535), 11336, "port of slaves named without one (rspamd-tx)"
    )
    replication_bind: str | None = option(
        BindLinesType(repeatable=False),
        None,
        "where a slave listens for its masters; default *:replication_port (rspamd-tx)",
    )
    replication_log_size: int = option(
        IntType(minimum=1), 4096, "batches a master keeps for slaves to catch up from (rspamd-tx)"
    )
    metrics: str | None = option(
        BindLinesType(repeatable=False),
        None,
        "listen address of the Prometheus metrics endpoint, in bind_socket syntax (rspamd-tx)",
    )

    @property
    def sqlite_path(self) -> str | None:
        """The sqlite file: ``hashfile``, else ``database``, else ``dbdir/fuzzy.db``."""
        if self.hashfile:
            return self.hashfile
        if self.database:
            return self.database
        if self.dbdir:
            return os.path.join(self.dbdir, "fuzzy.db")
        return None

    @property
    def redis_db(self) -> int | None:
        """The Redis database number: ``db``, else a numeric ``database``."""
        if self.db is not None:
            return self.db
        if self.database is not None and self.database.strip().isdigit():
            return int(self.database)
        return None


FUZZY_SCHEMA = schema_from_dataclass(
    FuzzyOptions, "fuzzy", "Fuzzy storage worker options", validate=_validate_fuzzy
)


# ---------------------------------------------------------------------------
# worker "normal" and "controller": accepted, not run


@dataclass(frozen=True)
class NormalOptions:
    """Options of ``worker "normal"`` (the scanner); rspamd-tx checks but does not run it."""

    mime: bool = option(_BOOL, True, "false: messages are not MIME")
    encrypted_only: bool = option(_BOOL, False, "accept encrypted requests only")
    timeout: float = option(_TIME, 60.0, "protocol I/O timeout")
    task_timeout: float | None = option(
        _TIME, None, "scan time limit (default: options.task_timeout)"
    )
    max_tasks: int | None = option(_INT, None, "parallel tasks per process")
    keypair: Keypair | None = option(_KEYPAIR, None, "encryption keypair")


NORMAL_SCHEMA = schema_from_dataclass(NormalOptions, "normal", "Scanner worker options (not run)")


@dataclass(frozen=True)
class ControllerOptions:
    """Options of ``worker "controller"``; rspamd-tx checks but does not run it."""

    password: str | None = option(
        _STRING, None, "password for read-only commands (plain or $2$ hash)"
    )
    enable_password: str | None = option(_STRING, None, "password for all commands")
    secure_ip: tuple[NetworkEntry, ...] = option(
        _NETWORKS, (), "sources allowed without password", aliases=("trusted_ips",)
    )
    static_dir: str | None = option(_STRING, None, "directory of the web UI")
    timeout: float = option(_TIME, 60.0, "protocol I/O timeout")
    task_timeout: float | None = option(_TIME, None, "scan time limit")
    keypair: Keypair | None = option(_KEYPAIR, None, "encryption keypair")
    ssl: bool = option(_BOOL, False, "unimplemented in Rspamd")
    ssl_cert: str | None = option(_STRING, None, "unimplemented in Rspamd")
    ssl_key: str | None = option(_STRING, None, "unimplemented in Rspamd")


CONTROLLER_SCHEMA = schema_from_dataclass(
    ControllerOptions, "controller", "Controller worker options (not run)"
)


# ---------------------------------------------------------------------------
# The whole configuration

WorkerOptions = ProxyOptions | FuzzyOptions | NormalOptions | ControllerOptions

WORKER_SCHEMAS: Mapping[str, Schema] = {
    "rspamd_proxy": PROXY_SCHEMA,
    "fuzzy": FUZZY_SCHEMA,
    "normal": NORMAL_SCHEMA,
    "controller": CONTROLLER_SCHEMA,
}
"""Worker-specific schemas by worker type (each worker also takes :data:`COMMON_SCHEMA`)."""

SECTION_SCHEMAS: Mapping[str, Schema] = {
    "options": GLOBAL_SCHEMA,
    "logging": LOGGING_SCHEMA,
    "redis": REDIS_SCHEMA,
}
"""Schemas of the top-level sections read, by section name."""


@dataclass(frozen=True)
class WorkerConfig:
    """One ``worker`` section: its type, common options and type-specific options."""

    type: str
    common: WorkerCommon
    options: WorkerOptions


#: The actions every Rspamd configuration has; others exist once ``actions { }`` declares them.
STANDARD_ACTIONS = frozenset(
    {"reject", "soft reject", "rewrite subject", "add header", "greylist", "no action"}
)


@dataclass(frozen=True)
class Config:
    """The checked configuration."""

    options: GlobalOptions
    logging: LoggingOptions
    workers: tuple[WorkerConfig, ...]
    redis: RedisOptions = RedisOptions()
    actions: frozenset[str] = STANDARD_ACTIONS

    def fuzzy_redis(self, fuzzy: FuzzyOptions) -> RedisServers | None:
        """The Redis settings a fuzzy storage uses, as Rspamd chooses them.

        The worker's own when it names servers; else ``redis { fuzzy { } }``,
        then ``redis { fuzzy_storage { } }``, then ``redis { }`` itself;
        ``None`` when none names a server.
        """
        if fuzzy.servers or fuzzy.read_servers or fuzzy.write_servers:
            return RedisServers(
                servers=fuzzy.servers,
                read_servers=fuzzy.read_servers,
                write_servers=fuzzy.write_servers,
                username=fuzzy.username,
                password=fuzzy.password,
                db=fuzzy.redis_db,
                timeout=fuzzy.timeout,
                sentinels=fuzzy.sentinels,
            )
        for candidate in (self.redis.fuzzy, self.redis.fuzzy_storage, self.redis):
            if candidate is not None and candidate.configured:
                return candidate
        return None

    def workers_of(self, worker_type: str) -> list[WorkerConfig]:
        """The workers of ``worker_type``, in configuration order."""
        return [worker for worker in self.workers if worker.type == worker_type]


def _merge_sections(value: Any) -> Any:
    """One object from a section written several times (later keys win)."""
    if not isinstance(value, list):
        return value
    merged = UclObject()
    for part in value:
        if not isinstance(part, Mapping):
            return part
        merged.update(part)
        merged.locations.update(getattr(part, "locations", {}))
    return merged


def _worker_entries(
    tree: UclObject, diagnostics: list[Diagnostic]
) -> list[tuple[str, UclObject, Location | None]]:
    """``(type, section, location)`` of every worker, in order.

    Accepts ``worker "type" { }`` (an object keyed by type, or a list of
    those) and ``worker { type = "type"; ... }``.
    """
    value = tree.get("worker")
    top_location = tree.location("worker")
    if value is None:
        return []
    elements = value if isinstance(value, list) else [value]
    entries: list[tuple[str, UclObject, Location | None]] = []
    for element in elements:
        if not isinstance(element, Mapping):
            diagnostics.append(
                Diagnostic("error", "worker: expected a block { ... }", top_location)
            )
            continue
        locations: Mapping[str, Location] = getattr(element, "locations", {})
        if isinstance(element.get("type"), str):
            body = UclObject({k: v for k, v in element.items() if k != "type"})
            body.locations.update({k: v for k, v in locations.items() if k != "type"})
            entries.append((element["type"], body, locations.get("type", top_location)))
            continue
        for worker_type, body in element.items():
            location = locations.get(worker_type, top_location)
            for part in body if isinstance(body, list) else [body]:
                if not isinstance(part, Mapping):
                    diagnostics.append(
                        Diagnostic(
                            "error", f'worker "{worker_type}": expected a block {{ ... }}', location
                        )
                    )
                    continue
                entries.append(
                    (
                        worker_type,
                        part if isinstance(part, UclObject) else UclObject(part),
                        location,
                    )
                )
    return entries


def _check_worker(
    worker_type: str, section: UclObject, location: Location | None, diagnostics: list[Diagnostic]
) -> WorkerConfig | None:
    specific = WORKER_SCHEMAS.get(worker_type)
    where = f'worker "{worker_type}"'
    if specific is None:
        diagnostics.append(
            Diagnostic(
                "warning",
                f"{where}: worker type '{worker_type}' is not run by rspamd-tx; section ignored",
                location,
            )
        )
        return None
    combined = COMMON_SCHEMA.merged(specific, worker_type, specific.doc)
    values, found = check_section(combined, section, where, location=location)
    diagnostics.extend(found)
    common_names = {opt.name for opt in COMMON_SCHEMA.options}
    common = COMMON_SCHEMA.build({k: v for k, v in values.items() if k in common_names})
    options = specific.build({k: v for k, v in values.items() if k not in common_names})
    if specific.validate is not None and not any(d.severity == "error" for d in found):
        for message in specific.validate(
            {k: v for k, v in values.items() if k not in common_names}
        ):
            diagnostics.append(Diagnostic("error", f"{where}: {message}", location))
    if (
        isinstance(options, FuzzyOptions)
        and (options.slaves or options.masters)
        and common.count is not None
        and common.count > 1
    ):
        diagnostics.append(
            Diagnostic(
                "error",
                f"{where}: replication (slaves or masters) runs in one process: set count = 1",
                section.location("count") or location,
            )
        )
    if isinstance(options, FuzzyOptions) and options.dedicated_update_worker:
        diagnostics.append(
            Diagnostic(
                "warning",
                f"{where}: dedicated_update_worker has no effect: every rspamd-tx process"
                " stores its own updates, off the request path; ignored",
                section.location("dedicated_update_worker") or location,
            )
        )
    return WorkerConfig(worker_type, common, options)


#: Keys of Rspamd's ``actions { }`` section that are settings, not actions.
_ACTION_SETTINGS = frozenset({"unknown_weight", "grow_factor", "subject"})


def _registered_actions(section: Any) -> frozenset[str]:
    """The action names Rspamd registers from an ``actions { }`` section.

    Keys are written with underscores (``add_header``, ``soft_reject``) and name actions with
    spaces, as ``rspamd_action_from_str`` reads them; ``unknown_weight``, ``grow_factor``
    and ``subject`` are settings. A section that is not an object registers nothing new.
    """
    declared = set(STANDARD_ACTIONS)
    if isinstance(section, dict):
        for key in section:
            if key not in _ACTION_SETTINGS:
                declared.add(key.replace("_", " "))
    return frozenset(declared)


def check_config(tree: UclObject) -> tuple[Config, list[Diagnostic]]:
    """Check a whole parsed configuration.

    Returns the typed :class:`Config` (defaults where values are missing or
    bad) and every diagnostic.  The configuration is usable only when no
    diagnostic is an error.  Never raises for bad input.
    """
    diagnostics: list[Diagnostic] = []
    built: dict[str, Any] = {}
    for name, schema in SECTION_SCHEMAS.items():
        section = _merge_sections(tree.get(name, UclObject()))
        values, found = check_section(schema, section, name, location=tree.location(name))
        diagnostics.extend(found)
        built[name] = schema.build(values)
    workers: list[WorkerConfig] = []
    for worker_type, section, location in _worker_entries(tree, diagnostics):
        worker = _check_worker(worker_type, section, location, diagnostics)
        if worker is not None:
            workers.append(worker)
    config = Config(
        built["options"],
        built["logging"],
        tuple(workers),
        built["redis"],
        _registered_actions(_merge_sections(tree.get("actions"))),
    )
    return config, diagnostics
