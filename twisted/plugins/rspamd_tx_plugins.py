"""twistd plugins: ``twistd rspamd-proxy`` and ``twistd fuzzy-storage``."""

from twisted.application.service import ServiceMaker

rspamdProxy = ServiceMaker(
    "rspamd-proxy", "rspamd_tx.proxy.tap",
    "Rspamd proxy worker: milter, HTTP and legacy protocols", "rspamd-proxy")
fuzzyStorage = ServiceMaker(
    "fuzzy-storage", "rspamd_tx.fuzzy.tap",
    "Rspamd fuzzy hash storage worker (UDP and TCP)", "fuzzy-storage")
