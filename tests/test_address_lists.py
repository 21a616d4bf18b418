"""Address lists: map files, their watch, network sets."""

from __future__ import annotations

import ipaddress
import os

from twisted.internet.task import Clock
from twisted.trial import unittest

from rspamd_tx.address_lists import MapFilesWatch, map_files, networks, read_map_lines
from rspamd_tx.config.schema import parse_network_entry

INTERVAL = 6.0


class MapFilesTests(unittest.TestCase):
    def test_local_files_picked(self) -> None:
        """Paths and file:// URLs are local map files; HTTP maps, addresses and other
        strings are not."""
        entries = [parse_network_entry(text) for text in
                   ("/etc/allow.map", "file:///etc/other.map", "https://maps.example.net/x",
                    "10.0.0.0/8", "mail.example.net")]
        strings = ["./keys.map", "00ff" * 32, "../up.map"]
        self.assertEqual(map_files(entries, strings),
                         {"/etc/allow.map", "/etc/other.map", "./keys.map", "../up.map"})

    def test_read_lines(self) -> None:
        """First word of each line; comments and blank lines skipped; a missing file is
        empty."""
        path = os.path.abspath(self.mktemp())
        with open(path, "w", encoding="utf-8") as handle:
            handle.write("# list\n10.0.0.0/8 office\n\n  192.0.2.1 # relay\n")
        self.assertEqual((read_map_lines(path), read_map_lines(path + ".missing")),
                         (["10.0.0.0/8", "192.0.2.1"], []))

    def test_networks_of_names_not_resolved_yet(self) -> None:
        """A host name not resolved yet matches nothing; resolved, it matches its addresses."""
        entries = [parse_network_entry("mail.example.net")]
        address = ipaddress.ip_address("192.0.2.7")
        self.assertEqual(
            (address in networks(entries, None), address in networks(entries, {}),
             address in networks(entries, {"mail.example.net": [address]})),
            (False, False, True))


class MapFilesWatchTests(unittest.TestCase):
    """The watch on a Clock."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.path = os.path.abspath(self.mktemp())
        self.write("10.0.0.0/8\n")
        self.calls = 0
        self.watch = MapFilesWatch(self.changed, self.clock, INTERVAL)
        self.watch.watch([self.path])
        self.watch.startService()
        self.addCleanup(self.watch.stopService)

    def changed(self) -> None:
        self.calls += 1

    def write(self, text: str) -> None:
        with open(self.path, "w", encoding="utf-8") as handle:
            handle.write(text)

    def test_change_noticed_once(self) -> None:
        """Nothing happens while the file stays; a rewrite calls once, at the next check."""
        self.clock.advance(INTERVAL)
        unchanged = self.calls
        self.write("10.0.0.0/8\n192.0.2.0/24\n")
        self.clock.advance(INTERVAL)
        self.clock.advance(INTERVAL)
        self.assertEqual((unchanged, self.calls), (0, 1))

    def test_removed_and_created(self) -> None:
        """Removing the file and creating it again are changes too."""
        os.unlink(self.path)
        self.clock.advance(INTERVAL)
        self.write("192.0.2.1\n")
        self.clock.advance(INTERVAL)
        self.assertEqual(self.calls, 2)

    def test_failing_reload_keeps_watching(self) -> None:
        """An error of the reload is logged; later changes are still noticed."""
        def broken() -> None:
            self.calls += 1
            raise RuntimeError("reload failed")

        self.watch.changed = broken
        self.write("192.0.2.1\n")
        self.clock.advance(INTERVAL)
        self.write("192.0.2.1\n192.0.2.2\n")
        self.clock.advance(INTERVAL)
        self.assertEqual(self.calls, 2)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 2)

    def test_new_paths_are_the_baseline(self) -> None:
        """watch() with other files starts from their current state: no call."""
        other = os.path.abspath(self.mktemp())
        with open(other, "w", encoding="utf-8") as handle:
            handle.write("192.0.2.9\n")
        self.watch.watch([other])
        self.clock.advance(INTERVAL)
        self.write("changed, but no longer watched\n")
        self.clock.advance(INTERVAL)
        self.assertEqual(self.calls, 0)
