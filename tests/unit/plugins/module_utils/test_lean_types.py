# Copyright: contributors to pitr.postgresql
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""lean_types.NamedTuple builds what typing.NamedTuple builds."""

from __future__ import annotations

import pickle
import typing as t

import pytest

from ansible_collections.pitr.postgresql.plugins.module_utils import lean_types
from ansible_collections.pitr.postgresql.plugins.module_utils.storage import ObjectInfo
from ansible_collections.pitr.postgresql.plugins.module_utils.walfile import WalFileName

Lean: t.Any = lean_types.NamedTuple  # the run-time class, whatever mypy sees


class LeanPoint(Lean):  # type: ignore[misc]
    """A point."""

    x: int
    y: int
    label: str = "origin"

    def norm1(self) -> int:
        return abs(self.x) + abs(self.y)


class TypingPoint(t.NamedTuple):
    """A point."""

    x: int
    y: int
    label: str = "origin"

    def norm1(self) -> int:
        return abs(self.x) + abs(self.y)


@pytest.mark.parametrize("cls", [LeanPoint, TypingPoint])
def test_same_behaviour_as_typing(cls: t.Any) -> None:
    p = cls(1, y=-2)
    assert p == (1, -2, "origin") and isinstance(p, tuple) and len(p) == 3
    x, y, label = p
    assert (x, y, label, p[1], p.y, p.label) == (1, -2, "origin", -2, -2, "origin")
    assert repr(p) == f"{cls.__name__}(x=1, y=-2, label='origin')"
    assert p.norm1() == 3
    assert cls._fields == ("x", "y", "label")
    assert cls._field_defaults == {"label": "origin"}
    assert p._asdict() == {"x": 1, "y": -2, "label": "origin"}
    assert p._replace(label="b") == cls(1, -2, "b")
    assert cls._make([3, 4, "c"]) == cls(3, 4, "c")
    assert cls.__doc__ == "A point."
    assert cls.__match_args__ == ("x", "y", "label")
    copied = pickle.loads(pickle.dumps(p))
    assert copied == p and copied.__class__ is cls
    assert sorted([cls(2, 0), cls(1, 5)]) == [cls(1, 5), cls(2, 0)]
    assert hash(p) == hash((1, -2, "origin"))
    with pytest.raises(AttributeError):
        p.x = 5
    with pytest.raises(AttributeError):
        p.other = 5
    with pytest.raises(TypeError):
        cls(1)
    with pytest.raises(TypeError):
        cls(1, 2, "a", 4)
    with pytest.raises(TypeError, match="Expected 3 arguments, got 2"):
        cls._make([1, 2])
    with pytest.raises(ValueError, match="unexpected field names"):
        p._replace(z=1)


def test_the_collections_classes_are_named_tuples() -> None:
    w = WalFileName.parse("000000010000000000000002")
    assert w == (1, 0, 2, "segment", "000000010000000000000002", 0)
    assert w._replace(seg=3)[:3] == (1, 0, 3)
    assert ObjectInfo("k", 1, 2.0)._asdict() == {"key": "k", "size": 1, "mtime": 2.0}
    assert (
        ObjectInfo.__module__ == "ansible_collections.pitr.postgresql.plugins.module_utils.storage"
    )


def test_class_bodies_are_checked_as_typing_checks_them() -> None:
    with pytest.raises(TypeError, match="Non-default namedtuple field y cannot follow"):

        class _BadOrder(Lean):  # type: ignore[misc]
            x: int = 0
            y: int

    with pytest.raises(AttributeError, match="Cannot overwrite NamedTuple attribute _asdict"):

        class _Overwrites(Lean):  # type: ignore[misc]
            x: int

            def _asdict(self) -> dict[str, t.Any]:
                return {}
