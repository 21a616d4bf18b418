"""Tests for rspamd_tx.config.workers: section schemas, defaults, seeds and check_config."""

from __future__ import annotations

import ipaddress
import os
from typing import Any

from twisted.trial import unittest

from rspamd_tx.config import loader, ucl
from rspamd_tx.config.schema import Diagnostic, HostRef, check_section
from rspamd_tx.config.tree import Location, UclObject
from rspamd_tx.config.workers import (
    COMMON_SCHEMA,
    CONTROLLER_SCHEMA,
    FUZZY_SCHEMA,
    GLOBAL_SCHEMA,
    LOGGING_SCHEMA,
    NORMAL_SCHEMA,
    PROXY_SCHEMA,
    ControllerOptions,
    FailurePolicy,
    FuzzyOptions,
    GlobalOptions,
    LoggingOptions,
    NormalOptions,
    ProxyOptions,
    RedisServers,
    UpstreamBlock,
    WorkerCommon,
    check_config,
)
from rspamd_tx.protocols.keypair import Keypair

SEEDS = os.path.join(os.path.dirname(__file__), "data", "seeds")
PUBKEY = "kbhx7epiyugwfuiqqkdxmz3u45g4s6anc8bc8cpewkxfd9o5sxpy"


def seed_path(name: str) -> str:
    return os.path.join(SEEDS, name)


def worker_tree(worker_type: str, text: str, filename: str = "worker.inc") -> UclObject:
    """A tree holding one worker whose body is the UCL ``text``."""
    tree = UclObject()
    worker = UclObject()
    worker[worker_type] = ucl.loads(text, filename=filename)
    worker.locations[worker_type] = Location("rspamd.conf", 10, 8)
    tree["worker"] = worker
    tree.locations["worker"] = Location("rspamd.conf", 10, 1)
    return tree


def seed_tree(name: str) -> UclObject:
    """The tree a seed gives where Rspamd includes it (options or a worker)."""
    body = ucl.load(seed_path(name))
    if name == "options.inc":
        tree = UclObject(options=body)
        tree.locations["options"] = Location("rspamd.conf", 1, 1)
        return tree
    worker_type = {
        "worker-proxy.inc": "rspamd_proxy",
        "worker-fuzzy.inc": "fuzzy",
        "worker-fuzzy-slave.inc": "fuzzy",
        "worker-normal.inc": "normal",
        "worker-controller.inc": "controller",
    }[name]
    tree = UclObject(worker=UclObject({worker_type: body}))
    return tree


def messages(diagnostics: list[Diagnostic]) -> list[str]:
    return [str(d) for d in diagnostics]


class DefaultsTests(unittest.TestCase):
    """An empty section gives Rspamd's defaults."""

    def build(self, schema: Any) -> Any:
        values, diagnostics = check_section(schema, UclObject(), "test")
        self.assertEqual(diagnostics, [])
        return schema.build(values)

    def test_global_defaults(self) -> None:
        """Upstream tunables 4/10 s/60 s/3600 s, DNS 1 s/5 retransmits, task timeout 8 s."""
        options = self.build(GLOBAL_SCHEMA)
        self.assertEqual(options, GlobalOptions())
        self.assertEqual(
            (
                options.upstream.max_errors,
                options.upstream.error_time,
                options.upstream.revive_time,
                options.upstream.lazy_resolve_time,
            ),
            (4, 10.0, 60.0, 3600.0),
        )
        self.assertEqual(
            (options.dns.timeout, options.dns.retransmits, options.dns.sockets), (1.0, 5, 16)
        )
        self.assertEqual(options.task_timeout, 8.0)
        self.assertEqual(options.max_message, 50 * 1024 * 1024)
        self.assertEqual(options.local_addrs, ())

    def test_logging_defaults(self) -> None:
        """Console logging at warning level, plain text."""
        logging = self.build(LOGGING_SCHEMA)
        self.assertEqual(logging, LoggingOptions())
        self.assertEqual((logging.type, logging.level, logging.json), ("console", "warning", False))

    def test_common_defaults(self) -> None:
        """No bind, automatic count, enabled, limits unchanged."""
        common = self.build(COMMON_SCHEMA)
        self.assertEqual(common, WorkerCommon((), None, True, 0, 0))
        self.assertTrue(common.active)

    def test_proxy_defaults(self) -> None:
        """HTTP mode, 120 s, 5 retries, X-Spam, Rspamd's milter texts, tempfail on every failure."""
        proxy = self.build(PROXY_SCHEMA)
        self.assertEqual(proxy, ProxyOptions())
        self.assertEqual((proxy.milter, proxy.timeout, proxy.max_retries), (False, 120.0, 5))
        self.assertEqual(proxy.spam_header, "X-Spam")
        self.assertEqual(
            (proxy.reject_message, proxy.quarantine_message, proxy.tempfail_message),
            ("Spam message rejected", "Spam message quarantined", "Try again later"),
        )
        self.assertEqual(
            proxy.failure_policy, FailurePolicy("tempfail", "tempfail", "tempfail", "tempfail")
        )
        self.assertEqual(proxy.log_tag_type, "session")
        self.assertIsNone(proxy.default_upstream)

    def test_fuzzy_defaults(self) -> None:
        """sqlite, sync 60 s, expire 2 days, prefix fuzzy, Redis timeout 1 s, rate limits."""
        fuzzy = self.build(FUZZY_SCHEMA)
        self.assertEqual(fuzzy, FuzzyOptions())
        self.assertEqual((fuzzy.backend, fuzzy.sync, fuzzy.expire), ("sqlite", 60.0, 172800.0))
        self.assertEqual(
            (fuzzy.prefix, fuzzy.timeout, fuzzy.keypair_cache_size), ("fuzzy", 1.0, 512)
        )
        self.assertEqual(
            (fuzzy.ratelimit_max_buckets, fuzzy.ratelimit_network_mask, fuzzy.ratelimit_bucket_ttl),
            (2000, 24, 3600.0),
        )
        self.assertEqual(fuzzy.updates_maxfail, 3)
        self.assertIsNone(fuzzy.sqlite_path)

    def test_normal_and_controller_defaults(self) -> None:
        """The accepted-only workers have Rspamd's defaults."""
        self.assertEqual(self.build(NORMAL_SCHEMA), NormalOptions())
        self.assertEqual(self.build(CONTROLLER_SCHEMA), ControllerOptions())
        self.assertTrue(NormalOptions().mime)


class SeedTests(unittest.TestCase):
    """Every seed checks clean and gives the typed values it states."""

    def check_seed(self, name: str) -> Any:
        config, diagnostics = check_config(seed_tree(name))
        self.assertEqual(messages(diagnostics), [], name)
        return config

    def test_every_seed_is_clean(self) -> None:
        """All seeds give zero errors and zero warnings."""
        names = sorted(os.listdir(SEEDS))
        self.assertTrue(names)
        for name in names:
            self.check_seed(name)

    def test_options_seed(self) -> None:
        """Local addresses, DNS servers and neighbours are read."""
        options = self.check_seed("options.inc").options
        self.assertIn(ipaddress.ip_network("127.0.0.0/8"), options.local_addrs)
        self.assertIn(ipaddress.ip_network("fdc1:d89e:b128::/48"), options.local_networks)
        self.assertEqual(
            options.dns.nameserver, ("master-slave:172.27.88.10:53:40, 172.27.88.1:53:30",)
        )
        self.assertEqual(
            [(n.name, n.host, n.path) for n in options.neighbours],
            [("Charlotte", "https://mail.example.net:443", "/rspamd/charlotte")],
        )

    def test_proxy_seed(self) -> None:
        """Milter mode, both upstreams of sibling blocks, the mirror and the compare script."""
        worker = self.check_seed("worker-proxy.inc").workers[0]
        self.assertEqual(worker.type, "rspamd_proxy")
        self.assertEqual(worker.common.bind_socket, ("127.0.0.1:11332", "[::1]:11332"))
        proxy = worker.options
        assert isinstance(proxy, ProxyOptions)
        self.assertTrue(proxy.milter)
        self.assertTrue(proxy.discard_on_reject)
        self.assertEqual(proxy.timeout, 120.0)
        self.assertEqual([u.name for u in proxy.upstreams], ["local", "scan"])
        local, scan = proxy.upstreams
        self.assertTrue(local.self_scan)
        self.assertIsNone(local.default)
        self.assertEqual(
            scan.hosts, ("round-robin:host1:11333:10,host2:11333:10,host3:11333:5,host4:11333:5",)
        )
        self.assertEqual(scan.key, PUBKEY)
        self.assertTrue(scan.compression)
        self.assertIs(proxy.default_upstream, scan)
        self.assertTrue(proxy.self_scan)
        (mirror,) = proxy.mirrors
        self.assertEqual(
            (mirror.name, mirror.hosts, mirror.probability), ("test", ("test:11333",), 0.1)
        )
        self.assertEqual(len(proxy.scripts), 1)
        self.assertTrue(proxy.scripts[0].startswith("return function(results)"))

    def test_fuzzy_seed(self) -> None:
        """Redis servers as written, 90 days expiry, slaves as hosts, allow_update as addresses."""
        fuzzy = self.check_seed("worker-fuzzy.inc").workers[0].options
        assert isinstance(fuzzy, FuzzyOptions)
        self.assertEqual(fuzzy.backend, "redis")
        self.assertEqual(fuzzy.write_servers, ("localhost:6383",))
        self.assertEqual(
            fuzzy.read_servers, ("master-slave:localhost:6383:30,dolores.vpn.example.net:6383:20",)
        )
        self.assertEqual((fuzzy.timeout, fuzzy.expire, fuzzy.redis_db), (1.0, 90 * 86400.0, 0))
        self.assertEqual(fuzzy.password, "Phe9eiphoGh3ohNg")
        self.assertEqual(fuzzy.slaves, ("10.195.171.142", "fdc1:d89e:b128:6a04::7de4"))
        self.assertEqual(
            fuzzy.allow_update,
            (ipaddress.ip_network("127.0.0.1/32"), ipaddress.ip_network("::1/128")),
        )

    def test_replication_options(self) -> None:
        """slaves take ports; the replication port, bind line and log size are typed."""
        config, diagnostics = check_config(worker_tree("fuzzy", (
            'slaves = "10.0.0.2:11400, [fdc1::7]:11401, replica.example.net"; '
            "replication_port = 11500; replication_bind = \"127.0.0.1:11500\"; "
            "replication_log_size = 64;"
        )))
        self.assertEqual(messages(diagnostics), [])
        fuzzy = config.workers[0].options
        assert isinstance(fuzzy, FuzzyOptions)
        self.assertEqual(fuzzy.slaves, ("10.0.0.2:11400", "[fdc1::7]:11401", "replica.example.net"))
        self.assertEqual(
            (fuzzy.replication_port, fuzzy.replication_bind, fuzzy.replication_log_size),
            (11500, "127.0.0.1:11500", 64),
        )

    def test_fuzzy_slave_seed(self) -> None:
        """Empty masters and allow_update strings are empty lists."""
        worker = self.check_seed("worker-fuzzy-slave.inc").workers[0]
        assert isinstance(worker.options, FuzzyOptions)
        self.assertEqual((worker.options.masters, worker.options.allow_update), ((), ()))
        self.assertEqual(worker.common.count, 1)

    def test_normal_seed(self) -> None:
        """enabled = false makes the worker inactive."""
        worker = self.check_seed("worker-normal.inc").workers[0]
        self.assertFalse(worker.common.enabled)
        self.assertFalse(worker.common.active)

    def test_controller_seed(self) -> None:
        """Repeated secure_ip keys and the unix socket bind are kept."""
        worker = self.check_seed("worker-controller.inc").workers[0]
        controller = worker.options
        assert isinstance(controller, ControllerOptions)
        self.assertEqual(
            controller.secure_ip,
            (ipaddress.ip_network("127.0.0.1/32"), ipaddress.ip_network("::1/128")),
        )
        self.assertTrue(controller.password and controller.password.startswith("$2$"))
        self.assertEqual(
            worker.common.bind_socket, ("/tmp/rspamd-controller.sock mode=0666 owner=_rspamd",)
        )


class ProxyCheckTests(unittest.TestCase):
    """Checking proxy sections written in UCL."""

    def check(self, text: str) -> tuple[ProxyOptions, list[Diagnostic]]:
        config, diagnostics = check_config(worker_tree("rspamd_proxy", text, "proxy.inc"))
        options = config.workers[0].options
        assert isinstance(options, ProxyOptions)
        return options, diagnostics

    def test_unknown_option_location(self) -> None:
        """A misspelt option is a warning at its file:line:col with a suggestion."""
        _, diagnostics = self.check("milter = yes;\n  timout = 10s;\n")
        self.assertEqual(
            messages(diagnostics),
            [
                "proxy.inc:2:3: warning: worker \"rspamd_proxy\": unknown option 'timout';"
                " did you mean 'timeout'?"
            ],
        )

    def test_unknown_option_in_upstream_location(self) -> None:
        """A misspelt key inside an upstream block is located in that block."""
        _, diagnostics = self.check('upstream "scan" {\n  hosts = "a";\n  compresion = yes;\n}\n')
        self.assertEqual(len(diagnostics), 1)
        self.assertEqual(diagnostics[0].location, Location("proxy.inc", 3, 3))
        self.assertIn("did you mean 'compression'?", diagnostics[0].message)
        self.assertIn('upstream "scan"', diagnostics[0].message)

    def test_bad_value_is_located_error(self) -> None:
        """A value that is no time is an error at its location."""
        options, diagnostics = self.check('milter = yes;\ntimeout = "soon";\n')
        self.assertEqual(options.timeout, 120.0)
        self.assertEqual([d.severity for d in diagnostics], ["error"])
        self.assertTrue(
            str(diagnostics[0]).startswith(
                "proxy.inc:2:1: worker \"rspamd_proxy\": option 'timeout': "
            )
        )

    def test_quoted_values(self) -> None:
        """Quoted times, numbers and booleans are read like unquoted ones."""
        options, diagnostics = self.check('timeout = "10s"; max_retries = "2"; milter = "yes";\n')
        self.assertEqual(diagnostics, [])
        self.assertEqual((options.timeout, options.max_retries, options.milter), (10.0, 2, True))

    def test_bad_bind_line(self) -> None:
        """A malformed bind_socket line is an error at the key's (last) location."""
        _, diagnostics = self.check(
            'bind_socket = "127.0.0.1:11332";\nbind_socket = "::1:11332";\n'
        )
        self.assertEqual([d.severity for d in diagnostics], ["error"])
        self.assertEqual(diagnostics[0].location, Location("proxy.inc", 2, 1))
        self.assertIn("brackets", diagnostics[0].message)

    def test_bad_metrics_address(self) -> None:
        """A metrics address that is no bind line is an error."""
        _, diagnostics = self.check('metrics = "127.0.0.1:notaport";\n')
        self.assertEqual([d.severity for d in diagnostics], ["error"])

    def test_upstream_needs_hosts(self) -> None:
        """An upstream without hosts and without self_scan is an error."""
        _, diagnostics = self.check('upstream "scan" { default = yes; }\n')
        self.assertEqual([d.severity for d in diagnostics], ["error"])
        self.assertIn("'hosts' is required", diagnostics[0].message)

    def test_mirror_needs_hosts(self) -> None:
        """A mirror without hosts is an error."""
        _, diagnostics = self.check('mirror "m" { probability = 0.5; }\n')
        self.assertEqual([d.severity for d in diagnostics], ["error"])

    def test_bad_upstream_hosts(self) -> None:
        """A malformed upstream line is an error in the upstream block."""
        _, diagnostics = self.check('upstream "scan" { hosts = "host:port:x"; }\n')
        self.assertEqual([d.severity for d in diagnostics], ["error"])
        self.assertIn("option 'hosts'", diagnostics[0].message)

    def test_bad_key(self) -> None:
        """An upstream key that is not a base32 public key is an error."""
        _, diagnostics = self.check('upstream "scan" { hosts = "a"; key = "not-a-key"; }\n')
        self.assertEqual([d.severity for d in diagnostics], ["error"])

    def test_upstream_object_form(self) -> None:
        """``upstream { a { } b { } }`` gives both; self_scan without default= is default."""
        options, diagnostics = self.check(
            "upstream {\n  local { self_scan = yes; }\n"
            '  remote { hosts = "r1,r2"; timeout = 5s; }\n}\n'
        )
        self.assertEqual(diagnostics, [])
        self.assertEqual([u.name for u in options.upstreams], ["local", "remote"])
        self.assertEqual(options.upstreams[1].timeout, 5.0)
        self.assertEqual(options.default_upstream, options.upstreams[0])

    def test_explicit_default_false(self) -> None:
        """A self_scan upstream with default = false is not the default."""
        options, _ = self.check('upstream "local" { self_scan = yes; default = no; }\n')
        self.assertIsNone(options.default_upstream)

    def test_last_default_wins(self) -> None:
        """With several default upstreams the last one is the default, as in Rspamd."""
        options = ProxyOptions(
            upstreams=(
                UpstreamBlock(name="a", default=True, hosts=("a",)),
                UpstreamBlock(name="b", default=True, hosts=("b",)),
            )
        )
        self.assertEqual(options.default_upstream, options.upstreams[1])

    def test_upstream_aliases_and_new_options(self) -> None:
        """compress, settings, keep_alive, log_tag and extra_headers are read."""
        options, diagnostics = self.check(
            'upstream "s" { hosts = "a"; compress = yes; settings = "x"; keep_alive = yes;'
            ' log_tag = "queue_id"; extra_headers { "X-A" = "1"; } ssl = yes; local = yes; }\n'
        )
        self.assertEqual(diagnostics, [])
        upstream = options.upstreams[0]
        self.assertEqual(
            (
                upstream.compression,
                upstream.settings_id,
                upstream.keepalive,
                upstream.log_tag_type,
                upstream.ssl,
                upstream.local,
            ),
            (True, "x", True, "queue_id", True, True),
        )
        self.assertEqual(dict(upstream.extra_headers or {}), {"X-A": "1"})

    def test_repeated_scripts(self) -> None:
        """Every script key is kept, in order."""
        options, diagnostics = self.check('script = "a.lua";\nscript = "b.lua";\n')
        self.assertEqual(diagnostics, [])
        self.assertEqual(options.scripts, ("a.lua", "b.lua"))

    def test_failure_policy(self) -> None:
        """The failure policy table maps each failure class to an action."""
        options, diagnostics = self.check(
            'failure_policy { timeout = accept; oversize = "Reject"; }\n'
        )
        self.assertEqual(diagnostics, [])
        self.assertEqual(
            options.failure_policy, FailurePolicy("tempfail", "accept", "tempfail", "reject")
        )

    def test_failure_policy_bad_action(self) -> None:
        """An unknown action is an error; an unknown failure class a warning."""
        _, diagnostics = self.check("failure_policy { timeout = bounce; no_upstreams = accept; }\n")
        self.assertEqual([d.severity for d in diagnostics], ["error", "warning"])
        self.assertIn("did you mean 'no_upstream'?", diagnostics[1].message)

    def test_own_options(self) -> None:
        """metrics, whitelist, extended_spam_headers and max_message are read."""
        options, diagnostics = self.check(
            'metrics = "127.0.0.1:9108"; whitelist = "10.0.0.0/8, localhost";'
            " extended_spam_headers = yes;"
            " max_message = 10mb;\n"
        )
        self.assertEqual(diagnostics, [])
        self.assertEqual(options.metrics, "127.0.0.1:9108")
        self.assertEqual(
            options.whitelist, (ipaddress.ip_network("10.0.0.0/8"), HostRef("localhost"))
        )
        self.assertTrue(options.extended_spam_headers)
        self.assertEqual(options.max_message, 10 * 1024 * 1024)

    def test_keypair(self) -> None:
        """A proxy keypair becomes a Keypair; a broken one is an error."""
        options, diagnostics = self.check(
            'keypair { pubkey = "as8zusgxdk9h5cd9dkogeno6y59mod59bw9iwk6qefbshj6c9z3y";'
            ' privkey = "oerrtjoniofqbcrd4agatqad9yenntcrrjjc1uyfjtksnswfq3my"; }\n'
        )
        self.assertEqual(diagnostics, [])
        self.assertIsInstance(options.keypair, Keypair)
        _, diagnostics = self.check('keypair { pubkey = "x"; }\n')
        self.assertEqual([d.severity for d in diagnostics], ["error"])

    def test_log_tag_type_choices(self) -> None:
        """An unknown log_tag_type is an error."""
        _, diagnostics = self.check('log_tag_type = "random";\n')
        self.assertEqual([d.severity for d in diagnostics], ["error"])


class FuzzyCheckTests(unittest.TestCase):
    """Checking fuzzy storage sections written in UCL."""

    def check(self, text: str) -> tuple[FuzzyOptions, list[Diagnostic]]:
        config, diagnostics = check_config(worker_tree("fuzzy", text, "fuzzy.inc"))
        options = config.workers[0].options
        assert isinstance(options, FuzzyOptions)
        return options, diagnostics

    def test_sqlite_path(self) -> None:
        """hashfile (or its aliases) names the sqlite file; dbdir is the fallback directory."""
        options, diagnostics = self.check('hash_file = "/var/lib/rspamd/fuzzy.db";\n')
        self.assertEqual(diagnostics, [])
        self.assertEqual(options.sqlite_path, "/var/lib/rspamd/fuzzy.db")
        options, _ = self.check('dbdir = "/srv/db";\n')
        self.assertEqual(options.sqlite_path, "/srv/db/fuzzy.db")
        options, _ = self.check('database = "/srv/f.db";\n')
        self.assertEqual(options.sqlite_path, "/srv/f.db")

    def test_redis_database_must_be_numeric(self) -> None:
        """With backend redis, a non-numeric database is an error."""
        _, diagnostics = self.check('backend = redis; servers = "localhost"; database = "main";\n')
        self.assertEqual([d.severity for d in diagnostics], ["error"])
        options, diagnostics = self.check(
            'backend = redis; servers = "localhost"; database = "3";\n'
        )
        self.assertEqual((diagnostics, options.redis_db), ([], 3))

    def test_bad_backend(self) -> None:
        """An unknown backend is an error."""
        _, diagnostics = self.check("backend = mysql;\n")
        self.assertEqual([d.severity for d in diagnostics], ["error"])

    def test_keypairs_repeatable(self) -> None:
        """Several keypair blocks give several keypairs, last one last."""
        pair = (
            'keypair { pubkey = "as8zusgxdk9h5cd9dkogeno6y59mod59bw9iwk6qefbshj6c9z3y";'
            ' privkey = "oerrtjoniofqbcrd4agatqad9yenntcrrjjc1uyfjtksnswfq3my"; }\n'
        )
        options, diagnostics = self.check(pair + pair)
        self.assertEqual(diagnostics, [])
        self.assertEqual(len(options.keypairs), 2)

    def test_rate_limit_and_ids(self) -> None:
        """Rate limit options and flag lists are typed."""
        options, diagnostics = self.check(
            "ratelimit_rate = 10; ratelimit_burst = 100; ratelimit_network_mask = 16;"
            ' forbidden_ids = [1, 2]; weak_ids = 3; allow_update_keys = "a,b"; delay = 1h;\n'
        )
        self.assertEqual(diagnostics, [])
        self.assertEqual((options.ratelimit_rate, options.ratelimit_burst), (10.0, 100.0))
        self.assertEqual((options.forbidden_ids, options.weak_ids), ((1, 2), (3,)))
        self.assertEqual((options.allow_update_keys, options.delay), (("a", "b"), 3600.0))

    def test_dedicated_update_worker_warned(self) -> None:
        """dedicated_update_worker is accepted with a warning naming it; off, nothing is said."""
        _, diagnostics = self.check("count = 2; dedicated_update_worker = true;\n")
        self.assertEqual([(d.severity, "dedicated_update_worker has no effect" in d.message)
                          for d in diagnostics], [("warning", True)])
        _, quiet = self.check("dedicated_update_worker = false;\n")
        self.assertEqual(quiet, [])

    def test_mask_bounds(self) -> None:
        """A rate limit mask over 32 is an error."""
        _, diagnostics = self.check("ratelimit_network_mask = 33;\n")
        self.assertEqual([d.severity for d in diagnostics], ["error"])


class CheckConfigTests(unittest.TestCase):
    """check_config on whole trees."""

    def test_ignores_other_sections(self) -> None:
        """Module sections are ignored without a warning."""
        tree = ucl.loads(
            'rbl { rbls { x { rbl = "a"; } } }\nclassifier "bayes" { backend = redis; }\n'
        )
        config, diagnostics = check_config(tree)
        self.assertEqual(diagnostics, [])
        self.assertEqual(config.workers, ())

    def test_worker_with_type_key(self) -> None:
        """``worker { type = "fuzzy"; ... }`` is a fuzzy worker."""
        tree = ucl.loads('worker {\n  type = "fuzzy";\n  count = 2;\n  expire = 1d;\n}\n')
        config, diagnostics = check_config(tree)
        self.assertEqual(diagnostics, [])
        (worker,) = config.workers
        self.assertEqual((worker.type, worker.common.count), ("fuzzy", 2))
        assert isinstance(worker.options, FuzzyOptions)
        self.assertEqual(worker.options.expire, 86400.0)

    def test_several_workers(self) -> None:
        """Sibling worker sections are all read, in order, as are those of one type."""
        tree = ucl.loads(
            'worker "rspamd_proxy" { milter = yes; }\nworker "fuzzy" { count = -1; }\n'
            'worker "rspamd_proxy" { bind_socket = "*:11400"; }\n'
        )
        config, diagnostics = check_config(tree)
        self.assertEqual(diagnostics, [])
        self.assertEqual(
            [w.type for w in config.workers], ["rspamd_proxy", "fuzzy", "rspamd_proxy"]
        )
        self.assertEqual(len(config.workers_of("rspamd_proxy")), 2)
        self.assertFalse(config.workers[1].common.active)

    def test_unknown_worker_type(self) -> None:
        """A worker type rspamd-tx does not know is a warning at its location."""
        tree = ucl.loads('worker "lua" { script = "x.lua"; }\n', filename="rspamd.conf")
        config, diagnostics = check_config(tree)
        self.assertEqual(config.workers, ())
        self.assertEqual([d.severity for d in diagnostics], ["warning"])
        self.assertEqual(diagnostics[0].location, Location("rspamd.conf", 1, 8))

    def test_worker_not_an_object(self) -> None:
        """A worker written as a scalar is an error."""
        tree = UclObject(worker=UclObject(fuzzy=5))
        _, diagnostics = check_config(tree)
        self.assertEqual([d.severity for d in diagnostics], ["error"])

    def test_logging_file_needs_filename(self) -> None:
        """type = file without filename is an error."""
        _, diagnostics = check_config(ucl.loads("logging { type = file; }\n"))
        self.assertEqual([d.severity for d in diagnostics], ["error"])

    def test_logging_options(self) -> None:
        """Logging type, level, json and aliased flags are read."""
        config, diagnostics = check_config(
            ucl.loads(
                'logging { type = syslog; facility = "LOG_MAIL"; level = "Debug";'
                " json = yes; log_color = yes; }\n"
            )
        )
        self.assertEqual(diagnostics, [])
        self.assertEqual(
            (
                config.logging.type,
                config.logging.facility,
                config.logging.level,
                config.logging.json,
                config.logging.color,
            ),
            ("syslog", "log_mail", "debug", True, True),
        )

    def test_bad_logging_level(self) -> None:
        """An unknown level is an error."""
        _, diagnostics = check_config(ucl.loads("logging { level = loud; }\n"))
        self.assertEqual([d.severity for d in diagnostics], ["error"])

    def test_global_upstream_tunables(self) -> None:
        """options { upstream { } } (or upstreams) sets the failure accounting."""
        config, diagnostics = check_config(
            ucl.loads("options { upstreams { max_errors = 10; revive_time = 2min; } }\n")
        )
        self.assertEqual(diagnostics, [])
        self.assertEqual(
            (config.options.upstream.max_errors, config.options.upstream.revive_time), (10, 120.0)
        )

    def test_unknown_global_option_warns(self) -> None:
        """A misspelt global option is a warning with its location."""
        _, diagnostics = check_config(
            ucl.loads("options {\n  hs_cache_dirr = /tmp;\n}\n", filename="o.inc")
        )
        self.assertEqual(
            messages(diagnostics),
            [
                "o.inc:2:3: warning: options: unknown option 'hs_cache_dirr';"
                " did you mean 'hs_cache_dir'?"
            ],
        )

    def test_repeated_sections_merge(self) -> None:
        """A section written twice is read as one, later keys winning."""
        tree = UclObject(options=[UclObject(task_timeout=3), UclObject(tempdir="/var/tmp")])
        config, diagnostics = check_config(tree)
        self.assertEqual(diagnostics, [])
        self.assertEqual((config.options.task_timeout, config.options.tempdir), (3.0, "/var/tmp"))

    def test_stock_rspamd_config_is_clean(self) -> None:
        """The installed Rspamd configuration checks without any finding."""
        if not os.path.exists("/etc/rspamd/rspamd.conf"):
            raise unittest.SkipTest("Rspamd's configuration is not installed")
        variables = {
            "CONFDIR": "/etc/rspamd",
            "LOCAL_CONFDIR": "/etc/rspamd",
            "RUNDIR": "/run/rspamd",
            "DBDIR": "/var/lib/rspamd",
            "LOGDIR": "/var/log/rspamd",
            "SHAREDIR": "/usr/share/rspamd",
            "PLUGINSDIR": "/usr/share/rspamd/plugins",
            "RULESDIR": "/usr/share/rspamd/rules",
            "LUALIBDIR": "/usr/share/rspamd/lualib",
            "WWWDIR": "/usr/share/rspamd/www",
        }
        config, diagnostics = check_config(ucl.load("/etc/rspamd/rspamd.conf", variables=variables))
        self.assertEqual(messages(diagnostics), [])
        self.assertEqual(
            sorted(w.type for w in config.workers),
            ["controller", "fuzzy", "normal", "rspamd_proxy"],
        )
        self.assertEqual(config.logging.type, "file")


class LayeredConfigTests(unittest.TestCase):
    """Seeds as local.d files, layered over the shipped defaults by the loader."""

    def test_seeds_layered_over_defaults(self) -> None:
        """The seeds load without findings and override the shipped defaults."""
        root = os.path.abspath(self.mktemp())
        os.makedirs(os.path.join(root, "local.d"))
        for name in ["options.inc", "worker-proxy.inc", "worker-fuzzy.inc", "worker-normal.inc"]:
            with open(seed_path(name), encoding="utf-8") as source, open(
                os.path.join(root, "local.d", name), "w", encoding="utf-8"
            ) as target:
                target.write(source.read())
        config, diagnostics = check_config(loader.load_config(root, variables={"DBDIR": "/srv/db"}))
        self.assertEqual(messages(diagnostics), [])
        (proxy,) = config.workers_of("rspamd_proxy")
        assert isinstance(proxy.options, ProxyOptions)
        self.assertEqual(proxy.common.bind_socket, ("127.0.0.1:11332", "[::1]:11332"))
        self.assertTrue(proxy.options.milter)
        self.assertEqual([u.name for u in proxy.options.upstreams][-1], "scan")
        default = proxy.options.default_upstream
        self.assertEqual(default.name if default else None, "scan")
        (fuzzy,) = config.workers_of("fuzzy")
        assert isinstance(fuzzy.options, FuzzyOptions)
        self.assertEqual((fuzzy.options.backend, fuzzy.options.expire), ("redis", 90 * 86400.0))
        (normal,) = config.workers_of("normal")
        self.assertFalse(normal.common.active)
        self.assertIn(ipaddress.ip_network("10.195.171.0/24"), config.options.local_addrs)


class RedisFallbackTests(unittest.TestCase):
    """Where the fuzzy storage finds its Redis servers."""

    def fuzzy_redis(self, text: str) -> tuple[RedisServers | None, list[Diagnostic]]:
        config, diagnostics = check_config(ucl.loads(text, filename="rspamd.conf"))
        (worker,) = config.workers
        assert isinstance(worker.options, FuzzyOptions)
        return config.fuzzy_redis(worker.options), diagnostics

    def test_worker_servers_first(self) -> None:
        """Servers in the worker section win over the global redis section."""
        redis, diagnostics = self.fuzzy_redis(
            'redis { servers = "global:6379"; }\n'
            'worker "fuzzy" { backend = redis; servers = "own:6380"; db = 2; password = "p"; }\n'
        )
        self.assertEqual(diagnostics, [])
        self.assertEqual(
            redis, RedisServers(servers=("own:6380",), db=2, password="p", timeout=1.0)
        )

    def test_fuzzy_block_then_fuzzy_storage_then_global(self) -> None:
        """redis { fuzzy { } } is preferred to fuzzy_storage, which is preferred to redis { }."""
        redis, diagnostics = self.fuzzy_redis(
            'redis { servers = "g"; fuzzy { servers = "f"; } fuzzy_storage { servers = "s"; } }\n'
            'worker "fuzzy" { backend = redis; }\n'
        )
        self.assertEqual(diagnostics, [])
        self.assertEqual(redis.servers if redis else None, ("f",))
        redis, _ = self.fuzzy_redis(
            'redis { servers = "g"; fuzzy_storage { write_servers = "s"; } }\n'
            'worker "fuzzy" { backend = redis; }\n'
        )
        self.assertEqual(redis.write_servers if redis else None, ("s",))
        redis, _ = self.fuzzy_redis(
            'redis { servers = "g"; timeout = 2s; }\nworker "fuzzy" { backend = redis; }\n'
        )
        self.assertEqual((redis.servers, redis.timeout) if redis else None, (("g",), 2.0))

    def test_no_servers(self) -> None:
        """Without servers anywhere there are no Redis settings."""
        redis, _ = self.fuzzy_redis('worker "fuzzy" { backend = redis; }\n')
        self.assertIsNone(redis)

    def test_other_redis_keys_ignored(self) -> None:
        """Other modules' blocks and tunables in redis { } give no warning."""
        _, diagnostics = self.fuzzy_redis(
            'redis { servers = "g"; expand_keys = true; bayes { servers = "b"; } }\n'
            'worker "fuzzy" { }\n'
        )
        self.assertEqual(diagnostics, [])

    def test_bad_redis_value(self) -> None:
        """A bad value of a known redis key is an error at its location."""
        _, diagnostics = self.fuzzy_redis('redis {\n  timeout = "later";\n}\nworker "fuzzy" { }\n')
        self.assertEqual([d.severity for d in diagnostics], ["error"])
        self.assertEqual(diagnostics[0].location, Location("rspamd.conf", 2, 3))


class ActionsTests(unittest.TestCase):
    """Rspamd's ``actions { }`` section registers the action names replies may use."""

    def test_standard_actions_without_section(self) -> None:
        """Without an actions section only Rspamd's standard actions exist."""
        config, _ = check_config(ucl.loads(""))
        self.assertEqual(
            config.actions,
            {"reject", "soft reject", "rewrite subject", "add header", "greylist", "no action"},
        )

    def test_declared_actions_registered(self) -> None:
        """Declared actions are added with underscores read as spaces; settings are not actions."""
        config, diagnostics = check_config(
            ucl.loads(
                "actions { reject = 15; add_header = 6; discard { flags = [\"no_threshold\"]; }\n"
                " quarantine = null; my_custom { score = 30; } subject = \"***SPAM*** %s\";\n"
                " grow_factor = 1.1; }\n"
            )
        )
        self.assertEqual(messages(diagnostics), [])
        self.assertIn("discard", config.actions)
        self.assertIn("quarantine", config.actions)
        self.assertIn("my custom", config.actions)
        self.assertIn("add header", config.actions)
        self.assertNotIn("subject", config.actions)
        self.assertNotIn("grow factor", config.actions)


class ReplicationCountTests(unittest.TestCase):
    """Replication runs in one process: writes other processes received would not be streamed."""

    def test_slaves_with_count_two_refused(self) -> None:
        """A master with count = 2 is an error located at count."""
        _, diagnostics = check_config(
            worker_tree("fuzzy", 'count = 2;\nslaves = "10.0.0.2";\n', filename="fuzzy.inc")
        )
        errors = [d for d in diagnostics if d.severity == "error"]
        self.assertEqual(len(errors), 1)
        self.assertIn("set count = 1", errors[0].message)
        self.assertEqual(str(errors[0].location), "fuzzy.inc:1:1")

    def test_replication_with_one_process_accepted(self) -> None:
        """count = 1 with slaves, and count = 2 without replication, are fine."""
        for text in ('count = 1; slaves = "10.0.0.2";', "count = 2;"):
            _, diagnostics = check_config(worker_tree("fuzzy", text))
            self.assertEqual(messages(diagnostics), [], text)
