# Copyright: contributors to pitr.postgresql
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""``NamedTuple`` and ``Protocol`` for the modules the host command imports, without ``typing``.

``pitr-wal push`` starts one interpreter per WAL segment. Importing ``typing`` (and the ``re``,
``enum``, ``collections`` and ``functools`` it pulls in) cost that interpreter more CPU than the
rest of its start-up, so the modules on the push path import no ``typing`` at run time:
annotations are strings (``from __future__ import annotations``), names used only in them are
imported under ``if TYPE_CHECKING:``, and their record classes are written as usual,

    from ansible_collections.pitr.postgresql.plugins.module_utils.lean_types import NamedTuple

    class ObjectInfo(NamedTuple):
        key: str
        size: int

mypy sees ``typing.NamedTuple`` and ``typing.Protocol`` here and checks such classes as it
always did. At run time ``NamedTuple`` builds what ``typing.NamedTuple`` builds (the class
``collections.namedtuple`` would make: a tuple subclass with the same fields, defaults,
``_fields``, ``_field_defaults``, ``_make``, ``_replace``, ``_asdict``, repr, pickling and the
class body's own methods), and ``Protocol`` is a plain base class: a protocol only describes
what a backend offers, nothing checks it at run time.
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    import typing as t

try:  # the C accessor collections.namedtuple uses
    from _collections import _tuplegetter  # type: ignore[import-not-found]
except ImportError:  # pragma: no cover - other interpreters
    from operator import itemgetter

    def _tuplegetter(index: int, doc: str) -> t.Any:
        return property(itemgetter(index), doc=doc)


# As typing.NamedTuple: a class body may not define these, and these are not copied from it.
_PROHIBITED = frozenset(
    {
        "__new__",
        "__init__",
        "__slots__",
        "__getnewargs__",
        "_fields",
        "_field_defaults",
        "_make",
        "_replace",
        "_asdict",
        "_source",
    }
)
_SPECIAL = frozenset({"__module__", "__name__", "__annotations__"})


def _namedtuple(
    typename: str, fields: tuple[str, ...], defaults: dict[str, t.Any], module: str
) -> type:
    """The class ``collections.namedtuple(typename, fields, defaults=...)`` returns."""
    for name in (typename, *fields):
        if not name.isidentifier() or (name != typename and name.startswith("_")):
            raise ValueError(f"invalid name for a named tuple or its field: {name!r}")
    arg_list = ", ".join(fields)
    code: dict[str, t.Any] = {"_tuple_new": tuple.__new__}
    # The same generated constructor as collections.namedtuple: positional and keyword
    # arguments bind exactly as they would for a plain function.
    items = arg_list + ("," if fields else "")
    exec(f"def __new__(_cls, {arg_list}): return _tuple_new(_cls, ({items}))", code)
    new = code["__new__"]
    new.__defaults__ = tuple(defaults.values()) or None
    new.__qualname__ = f"{typename}.__new__"
    new.__doc__ = f"Create new instance of {typename}({arg_list})"
    size = len(fields)
    repr_fmt = "(" + ", ".join(f"{name}=%r" for name in fields) + ")"

    def _make(cls: type[tuple[t.Any, ...]], iterable: t.Iterable[t.Any]) -> tuple[t.Any, ...]:
        result = tuple.__new__(cls, iterable)
        if len(result) != size:
            raise TypeError(f"Expected {size} arguments, got {len(result)}")
        return result

    def _replace(self: tuple[t.Any, ...], **kwds: t.Any) -> tuple[t.Any, ...]:
        result: tuple[t.Any, ...] = self._make(map(kwds.pop, fields, self))  # type: ignore[attr-defined]
        if kwds:
            raise ValueError(f"Got unexpected field names: {list(kwds)!r}")
        return result

    def __repr__(self: tuple[t.Any, ...]) -> str:
        return self.__class__.__name__ + repr_fmt % self

    def _asdict(self: tuple[t.Any, ...]) -> dict[str, t.Any]:
        return dict(zip(fields, self, strict=True))

    def __getnewargs__(self: tuple[t.Any, ...]) -> tuple[t.Any, ...]:
        return tuple(self)

    for func in (_make, _replace, __repr__, _asdict, __getnewargs__):
        func.__qualname__ = f"{typename}.{func.__name__}"
    namespace: dict[str, t.Any] = {
        "__doc__": f"{typename}({arg_list})",
        "__slots__": (),
        "_fields": fields,
        "_field_defaults": dict(defaults),
        "__new__": new,
        "_make": classmethod(_make),
        "_replace": _replace,
        "__repr__": __repr__,
        "_asdict": _asdict,
        "__getnewargs__": __getnewargs__,
        "__match_args__": fields,
    }
    for index, name in enumerate(fields):
        namespace[name] = _tuplegetter(index, f"Alias for field number {index}")
    cls = type(typename, (tuple,), namespace)
    cls.__module__ = module
    return cls


class _NamedTupleMeta(type):
    """Turns ``class X(NamedTuple): ...`` into a named tuple class, as typing's does."""

    def __new__(mcs, typename: str, bases: tuple[type, ...], ns: dict[str, t.Any]) -> type:
        if bases != (_NamedTuple,):
            raise TypeError("a NamedTuple class can only inherit from NamedTuple")
        annotations: dict[str, t.Any] = ns.get("__annotations__", {})
        fields = tuple(annotations)
        defaults: dict[str, t.Any] = {}
        for name in fields:
            if name in ns:
                defaults[name] = ns[name]
            elif defaults:
                raise TypeError(
                    f"Non-default namedtuple field {name} cannot follow default field"
                    f"{'s' if len(defaults) > 1 else ''} {', '.join(defaults)}"
                )
        cls = _namedtuple(typename, fields, defaults, ns["__module__"])
        cls.__annotations__ = dict(annotations)
        for key, value in ns.items():
            if key in _PROHIBITED:
                raise AttributeError("Cannot overwrite NamedTuple attribute " + key)
            if key not in _SPECIAL and key not in fields:
                setattr(cls, key, value)
        return cls


# The base a class statement names; _NamedTupleMeta never makes a class that inherits from it.
_NamedTuple = type.__new__(_NamedTupleMeta, "NamedTuple", (), {"__module__": __name__})


class _Protocol:
    """A protocol's run-time base: a plain class."""

    __slots__ = ()


if TYPE_CHECKING:
    from typing import NamedTuple, Protocol
else:
    NamedTuple = _NamedTuple
    Protocol = _Protocol
