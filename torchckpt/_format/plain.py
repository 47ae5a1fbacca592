"""Values the typed JSON tree has no tag for: stored as the nearest type it has, or refused by name.

Users' state holds more than ints and strings: a ``pathlib.Path`` in a config, a NumPy scalar from
a metric, an ``argparse.Namespace`` of hyperparameters, Lightning's ``AttributeDict``. Each is
turned, when it is saved, into the nearest type the tree already stores, so that loading still
builds only the tree's own types and never imports anything a file names:

==============================================  ==============================================
saved                                           loaded
==============================================  ==============================================
``pathlib.PurePath`` (``Path``, ...)            ``str(path)``
NumPy ``bool_``, integer or floating scalar     ``bool``, ``int`` or ``float`` (``x.item()``)
NumPy array (bool, int, uint, float, complex)   a CPU tensor of the same dtype and shape
NumPy ``dtype`` (``np.dtype("float32")``)       ``str(dtype)`` (``"float32"``)
``argparse.Namespace``                          a ``dict`` of ``vars(ns)``
a subclass of ``dict`` (``defaultdict``, ...)   a ``dict``, keys in the same order
a subclass of ``str`` (not an ``Enum``)         a ``str``
==============================================  ==============================================

What would need its code to come back (an ``Enum`` member, a dataclass instance, a named tuple,
a class, a function, a module, any other object) is refused with its key path, its type's
qualified name and what to store instead. An ``Enum`` member is refused even when it is also a
``str`` or an ``int``: whether ``.value`` or ``.name`` is the one to keep is the user's choice.

NumPy and argparse are looked up in ``sys.modules``, never imported: a value of one of their
types exists only once its module is imported.
"""

from __future__ import annotations

import dataclasses
import enum
import pathlib
import sys
import types
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from torchckpt.errors import UnsupportedStateError, a_or_an, short_repr

if TYPE_CHECKING:
    import torch

STORED = ("torchckpt stores tensors, objects with state_dict()/load_state_dict(), and plain values: int, float, "
          "bool, str, None, paths, NumPy scalars and arrays, and lists, tuples and dicts of them")

_NUMPY_NUMBER_KINDS = "biufc"  # bool, int, uint, float, complex: the array kinds with a tensor dtype


def nearest(value: Any, path: str) -> Any:
    """``value`` as the nearest type the typed JSON tree stores (see the module's table).

    Args:
        value: a value of a type the tree has no tag for.
        path: its key path (``/``-joined), for the error.

    Raises:
        UnsupportedStateError: ``value`` would need code to be loaded (``.key`` is ``path``).
    """
    if isinstance(value, enum.Enum):
        raise refusal(value, path)
    if isinstance(value, str):
        return str.__str__(value)  # the characters, as an exact str
    if isinstance(value, pathlib.PurePath):
        return str(value)
    if isinstance(value, dict):
        return dict(value)
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        if isinstance(value, numpy.ndarray):
            return _array_tensor(value, path, numpy)
        if isinstance(value, (numpy.bool_, numpy.integer, numpy.floating)):
            item = value.item()
            if type(item) in (bool, int, float):  # not a longdouble, which has no Python type
                return item
        if isinstance(value, numpy.dtype):  # a hyperparameter's dtype: np.dtype(name) makes it again
            return str(value)
    argparse = sys.modules.get("argparse")
    if argparse is not None and isinstance(value, argparse.Namespace):
        return dict(vars(value))
    raise refusal(value, path)


def _array_tensor(array: Any, path: str, numpy: Any) -> torch.Tensor:
    """A NumPy array as a CPU tensor of its dtype; it shares the array's memory unless the array is
    read-only, byte-swapped or has negative strides, which ``torch.from_numpy`` cannot view."""
    import torch

    kind = type(array)
    if kind is not numpy.ndarray and kind is not numpy.memmap:
        raise _refused(array, path, f"{a_or_an(_qualname(kind))} (a NumPy array subclass) would lose what the "
                       "subclass adds (a masked array's mask, a matrix's rules)",
                       "Store numpy.asarray(x), and a masked array's x.mask as a second array.")
    if array.dtype.kind not in _NUMPY_NUMBER_KINDS:
        raise _refused(array, path, f"a NumPy array of dtype {array.dtype} (object, string, bytes, record or "
                       "datetime) has no tensor form",
                       "Store x.tolist() (a list), or x.astype() of a number dtype (datetimes: x.astype('int64')).")
    if not array.dtype.isnative or not array.flags.writeable or any(s < 0 for s in array.strides):
        array = array.astype(array.dtype.newbyteorder("="), order="C")  # a copy torch can view
    try:
        return torch.from_numpy(array)
    except TypeError:  # longdouble / clongdouble: no torch dtype
        raise _refused(array, path, f"a NumPy array of dtype {array.dtype} has no tensor dtype",
                       "Store x.astype(numpy.float64) (or numpy.complex128).") from None


def refusal(value: Any, path: str) -> UnsupportedStateError:
    """The error for a value that has no representation without pickle, with the fix for its kind."""
    kind = type(value)
    if isinstance(value, enum.Enum):
        cls = kind.__qualname__
        return _refused(value, path, f"the Enum member {_qualname(kind)}.{value.name} would need its class "
                        "imported to be loaded",
                        f"Store its .value ({short_repr(value.value, 40)}) or its .name ({value.name!r}) and "
                        f"rebuild it with {cls}(value) or {cls}[name].")
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _refused(value, path, f"the dataclass instance of {_qualname(kind)} would need its class imported "
                        "to be loaded", f"Store dataclasses.asdict(x) (a dict) and rebuild it with "
                        f"{kind.__qualname__}(**d).")
    if isinstance(value, tuple) and hasattr(kind, "_fields"):
        return _refused(value, path, f"the named tuple {_qualname(kind)} would need its class imported to be "
                        "loaded", "Store x._asdict() (a dict) or tuple(x).")
    if isinstance(value, type):
        return _refused(value, path, f"the class {_qualname(value)} is code",
                        f"Store its name instead (for example {value.__qualname__!r}) and look it up when restoring.")
    if isinstance(value, _FUNCTIONS):
        module = getattr(value, "__module__", None)
        name = f"{module}.{value.__qualname__}" if module else value.__qualname__
        what = "a lambda is code" if value.__name__ == "<lambda>" else f"the function {name} is code"
        return _refused(value, path, what, "Store what it computes, or a name to look it up by when restoring.")
    if isinstance(value, types.ModuleType):
        return _refused(value, path, f"the module {value.__name__} is code",
                        f"Store its name ({value.__name__!r}) and import it when restoring.")
    return _refused(value, path, _what(value), _fix(value))


_FUNCTIONS = (types.FunctionType, types.BuiltinFunctionType, types.MethodType, types.MethodWrapperType,
              types.WrapperDescriptorType, types.MethodDescriptorType)


def _what(value: Any) -> str:
    """What ``value`` is, for the message: its type's qualified name, and why it is refused."""
    import torch

    kind = type(value)
    if isinstance(value, torch.utils.data.DataLoader) and hasattr(value, "base_dataloader"):
        return (f"{a_or_an(_qualname(kind))} over a plain torch.utils.data.DataLoader cannot resume mid-epoch (its "
                "state_dict() needs a StatefulDataLoader underneath)")
    if isinstance(value, torch.utils.data.DataLoader):
        return "a torch.utils.data.DataLoader cannot resume mid-epoch (it has no state_dict())"
    if isinstance(value, (set, frozenset)):
        return f"{a_or_an(_qualname(kind))} has no fixed order (nor would the checkpoint, if it were stored)"
    numpy = sys.modules.get("numpy")
    if numpy is not None and isinstance(value, numpy.generic):
        return f"the NumPy scalar {_qualname(kind)} has no Python number type it converts to exactly"
    return a_or_an(_qualname(kind))


def _fix(value: Any) -> str:
    """What to store instead of ``value``."""
    import torch

    if isinstance(value, torch.utils.data.DataLoader) and hasattr(value, "base_dataloader"):
        return ("It is Accelerate's prepared DataLoader over a plain one: prepare a StatefulDataLoader instead "
                "(Accelerator(dataloader_config=DataLoaderConfiguration(use_stateful_dataloader=True)), pip install "
                "torchdata), or leave the loader out of the Checkpoint.")
    if isinstance(value, torch.utils.data.DataLoader):
        return ("Use torchdata's drop-in StatefulDataLoader (`from torchdata.stateful_dataloader import "
                "StatefulDataLoader`, pip install torchckpt[data]) with generator=torch.Generator().manual_seed(0), "
                "or leave the loader out of the Checkpoint.")
    if isinstance(value, (set, frozenset)):
        return "Store sorted(x) (a list) and rebuild it with set(...)."
    if isinstance(value, (bytes, bytearray, memoryview)):
        return "Store x.decode() if it is text, or the bytes as a uint8 tensor: torch.frombuffer(bytearray(x), dtype=torch.uint8)."
    numpy = sys.modules.get("numpy")
    if isinstance(value, complex) or numpy is not None and isinstance(value, numpy.complexfloating):
        return "Store (z.real, z.imag), or a complex64 tensor."
    if isinstance(value, Mapping):
        return "Store dict(x)."
    if isinstance(value, tuple):
        return "Store tuple(x)."
    if isinstance(value, Sequence):
        return "Store list(x)."
    if numpy is not None and isinstance(value, numpy.generic):
        return "Store float(x) (a float64), str(x), or an array of it (numpy.asarray(x) becomes a tensor)."
    return ("Store the plain values it holds instead (for an object with attributes, a dict such as vars(x)), "
            "or give its class state_dict() and load_state_dict() so that a Checkpoint tracks it.")


def _refused(value: Any, path: str, what: str, fix: str) -> UnsupportedStateError:
    return UnsupportedStateError(
        f"Cannot save {path or '<root>'!r}: {what}, so it has no representation without pickle. {fix} ({STORED}.)",
        key=path,
        value_type=type(value),
    )


def _qualname(kind: type) -> str:
    """``module.QualName`` of a type (``builtins.set``, ``pathlib.PosixPath``)."""
    return f"{kind.__module__}.{kind.__qualname__}"
