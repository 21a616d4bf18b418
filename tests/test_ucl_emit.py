"""Tests for :mod:`rspamd_tx.config.ucl_emit`: trees written as UCL read back equal."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import TestCase

from rspamd_tx.config import loader, ucl
from rspamd_tx.config.tree import UclObject
from rspamd_tx.config.ucl_emit import dumps

SEEDS = Path(__file__).parent / "data" / "seeds"


def typed(value: Any) -> Any:
    """A form of ``value`` whose equality also compares types (1, 1.0 and True differ)."""
    if isinstance(value, dict):
        return ("object", tuple((key, typed(item)) for key, item in value.items()))
    if isinstance(value, list):
        return ("array", tuple(typed(item) for item in value))
    if isinstance(value, float) and math.isnan(value):
        return ("float", "nan")
    return (type(value).__name__, value)


def _tree_from(members: dict[str, Any]) -> UclObject:
    return UclObject(members)


_floats = st.floats(allow_nan=True, allow_infinity=False, allow_subnormal=False) | st.just(math.inf)
_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63) + 1, max_value=2**63 - 1)
    | _floats
    | st.text()
)
_keys = st.text(min_size=1)
_values = st.recursive(
    _scalars,
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(_keys, children, max_size=4).map(_tree_from),
    max_leaves=20,
)
_trees = st.dictionaries(_keys, _values, max_size=6).map(_tree_from)


class RoundTripTests(TestCase):
    """``loads(dumps(tree)) == tree``."""

    def assertRoundTrip(self, tree: Any, variables: dict[str, str] | None = None) -> None:
        text = dumps(tree)
        self.assertEqual(typed(ucl.loads(text, variables=variables)), typed(tree), text)

    @settings(max_examples=300, deadline=None)
    @given(_trees)
    def test_generated_trees(self, tree: UclObject) -> None:
        """Random trees of every value type read back equal, types included."""
        self.assertRoundTrip(tree)

    @settings(max_examples=100, deadline=None)
    @given(st.text(alphabet=st.sampled_from(list("$ab{}\\'\"\n")), max_size=20))
    def test_dollar_strings_survive_variables(self, text: str) -> None:
        """Strings with ``$`` read back unchanged even when variables are defined, if single-quotable."""
        if "$" in text and any(text[i] == "\\" and text[i + 1:i + 2] in ("", "'", "\n", "\r")
                               for i in range(len(text))):
            return
        self.assertRoundTrip(UclObject(k=text), variables={"a": "X", "b": "Y"})

    def test_special_values(self) -> None:
        """null, booleans, inf, nan, integral floats and empty containers keep their types."""
        tree = UclObject(a=None, b=True, c=False, d=math.inf, e=120.0, f=-0.5, g=UclObject(), h=[],
                         i=2**63 - 1, j="", k="a\x00b\x1f\u00e9\U0001f600")
        self.assertRoundTrip(tree)
        self.assertTrue(math.isnan(ucl.loads(dumps(UclObject(n=math.nan)))["n"]))

    def test_shipped_configuration(self) -> None:
        """The whole shipped configuration round-trips."""
        self.assertRoundTrip(loader.load_config())

    def test_seeds(self) -> None:
        """Every seed's tree round-trips (heredocs and implicit arrays included)."""
        for seed in sorted(SEEDS.iterdir()):
            self.assertRoundTrip(ucl.load(str(seed)))

    def test_style(self) -> None:
        """Output is Rspamd-style ``key = value;`` lines and indented blocks."""
        text = dumps(UclObject(a=1, b=UclObject(c=[1, "x"])))
        self.assertEqual(text, '"a" = 1;\n"b" {\n    "c" = [\n        1,\n        "x",\n    ];\n}\n')


class UnrepresentableTests(TestCase):
    """Values UCL cannot express are refused with ValueError."""

    def test_refused_values(self) -> None:
        """Empty and non-string keys, huge ints, -inf, subnormals and foreign types."""
        refused = (UclObject({"": 1}), {1: 1}, UclObject(a=2**64), UclObject(a=-(2**63)),
                   UclObject(a=-math.inf), UclObject(a=5e-324), UclObject(a=object()), UclObject(a=b"x"))
        for tree in refused:
            self.assertRaises(ValueError, dumps, tree)

    def test_top_level_must_be_object(self) -> None:
        """A list at the top level is refused."""
        self.assertRaises(ValueError, dumps, [1])
