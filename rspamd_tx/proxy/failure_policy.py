"""What the proxy answers when a scan produces no verdict: the failure policy table.

Rspamd's proxy has one answer for every failure: HTTP clients get the HTTP
layer's error status (``404 Backend not found``, ``408 IO timeout``, ``500 IO
write error: ...``) and milter clients a temporary failure.  rspamd-tx keeps that
as the default and lets ``failure_policy { }`` (see
:class:`rspamd_tx.config.workers.FailurePolicy`) choose, per
:class:`~rspamd_tx.proxy.scanning.FailureClass`, one of the
:class:`~rspamd_tx.proxy.scanning.FailureAction` values.

:class:`FailurePolicyTable` is the table; front ends ask it
:meth:`~FailurePolicyTable.action_for` a failure.  The HTTP front end answers
``tempfail`` with Rspamd's error reply and the other actions with the verdict
:func:`synthetic_result` builds (a ``/checkv2``-shaped result, so legacy
clients get it converted like any scan); the milter front end maps the action
to its own replies.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from rspamd_tx.config.workers import FailurePolicy
from rspamd_tx.proxy.scanning import FailureAction, FailureClass, ScanFailure

__all__ = [
    "FailurePolicyTable",
    "SYNTHETIC_SYMBOL",
    "VERDICT_ACTIONS",
    "synthetic_result",
]

#: The scan action a synthetic verdict carries for each non-tempfail action.
VERDICT_ACTIONS: Mapping[FailureAction, str] = MappingProxyType(
    {
        FailureAction.ACCEPT: "no action",
        FailureAction.REJECT: "reject",
        FailureAction.DISCARD: "discard",
    }
)

#: The symbol a synthetic verdict carries; its option names the failure class.
SYNTHETIC_SYMBOL = "PROXY_SCAN_FAILED"


class FailurePolicyTable:
    """A mapping from failure class to action; every class has an action.

    Args:
        actions: the actions of some classes; the others get ``default``.
        default: the action of classes not in ``actions`` (Rspamd's: tempfail).
    """

    def __init__(
        self,
        actions: Mapping[FailureClass, FailureAction] | None = None,
        default: FailureAction = FailureAction.TEMPFAIL,
    ) -> None:
        given = dict(actions or {})
        self._actions: Mapping[FailureClass, FailureAction] = MappingProxyType(
            {kind: given.get(kind, default) for kind in FailureClass}
        )

    @classmethod
    def from_options(cls, options: FailurePolicy) -> FailurePolicyTable:
        """The table of a checked ``failure_policy { }`` block.

        Raises:
            ValueError: an action name that is not a :class:`FailureAction`
                (the configuration checker refuses those before).
        """
        return cls({kind: FailureAction(getattr(options, kind.value)) for kind in FailureClass})

    @property
    def actions(self) -> Mapping[FailureClass, FailureAction]:
        """The whole table (read-only)."""
        return self._actions

    def action_for(self, failure: ScanFailure | FailureClass) -> FailureAction:
        """The action for a failure or a failure class."""
        kind = failure.kind if isinstance(failure, ScanFailure) else failure
        return self._actions[kind]

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, FailurePolicyTable):
            return NotImplemented
        return dict(self._actions) == dict(other._actions)

    def __hash__(self) -> int:
        return hash(tuple(sorted((k.value, v.value) for k, v in self._actions.items())))

    def __repr__(self) -> str:
        pairs = ", ".join(f"{k.value}={v.value}" for k, v in self._actions.items())
        return f"FailurePolicyTable({pairs})"


def synthetic_result(action: FailureAction, failure: ScanFailure) -> dict[str, Any]:
    """A ``/checkv2``-shaped result standing in for a failed scan.

    ``action`` must not be ``TEMPFAIL`` (that one has no verdict).  The result
    has score 0, the :data:`VERDICT_ACTIONS` action, one symbol
    :data:`SYNTHETIC_SYMBOL` whose option is the failure class, and for
    ``reject`` an ``smtp_message`` naming the failure.

    Raises:
        ValueError: ``action`` is ``TEMPFAIL``.
    """
    if action is FailureAction.TEMPFAIL:
        raise ValueError("tempfail has no verdict")
    result: dict[str, Any] = {
        "is_skipped": False,
        "score": 0.0,
        "required_score": 0.0,
        "action": VERDICT_ACTIONS[action],
        "symbols": {
            SYNTHETIC_SYMBOL: {
                "name": SYNTHETIC_SYMBOL,
                "score": 0.0,
                "metric_score": 0.0,
                "options": [failure.kind.value],
            }
        },
        "messages": {},
        "message-id": "undef",
    }
    if action is FailureAction.REJECT:
        result["messages"] = {"smtp_message": f"Message not scanned: {failure.reason}"}
    return result
