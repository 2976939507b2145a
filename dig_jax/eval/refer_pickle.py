"""Reading the REFER annotation pickles (`refs(unc).p`, `refs(umd).p`, `refs(google).p`) without running code.

Why a restricted unpickler: a pickle is a program. `pickle.load` calls whatever callable the file names
(`os.system` included), so loading a file downloaded from the web with it runs that file's code. The REFER
pickles (written by Python 2's cPickle, protocol 2) hold only plain data: a list of dicts of str / int /
float / lists, which the pickle opcodes build directly without naming any callable. `load_refs` therefore
refuses every global reference (`find_class`) and every persistent id: a genuine REFER file loads, and a
file that names any callable fails before that callable is called, naming the callable.

Python 2 byte strings are decoded as latin-1 (`encoding="latin1"`, as every reader of these files does), so
each value comes back as a Python 3 `str`.
"""
from __future__ import annotations

import io
import os
import pickle


class UnsafePickleError(pickle.UnpicklingError):
    """A pickle that references a callable or a persistent object: not a plain-data REFER file."""


class PlainDataUnpickler(pickle.Unpickler):
    """An unpickler for plain data only: dict, list, tuple, str, bytes, int, float, bool, None.

    Those are built by opcodes; anything else (a class, a function, `copyreg._reconstructor`) goes through
    `find_class`, which refuses it.
    """

    def __init__(self, file, *, source: str):
        super().__init__(file, encoding="latin1")
        self.source = source

    def find_class(self, module, name):
        raise UnsafePickleError(f"{self.source}: the pickle references {module}.{name}; a REFER annotation "
                                "file holds plain data only (lists, dicts, strings, numbers), so it is refused "
                                "unexecuted")

    def persistent_load(self, pid):
        raise UnsafePickleError(f"{self.source}: the pickle references persistent object {pid!r}; refused")


def loads_plain(data: bytes, source: str = "<bytes>"):
    """The plain-data value pickled in `data` (see the module docstring); raises UnsafePickleError."""
    try:
        return PlainDataUnpickler(io.BytesIO(data), source=source).load()
    except UnsafePickleError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError, KeyError) as e:
        raise pickle.UnpicklingError(f"{source}: not a readable pickle ({type(e).__name__}: {e})") from None


def load_refs(path: str) -> list[dict]:
    """The referring expressions of a REFER `refs(...).p` file: one dict per referred object, each with
    `ref_id`, `ann_id`, `image_id`, `split` and `sentences` (each with `sent_id` and `sent` / `raw`)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"REFER annotations {path} do not exist")
    with open(path, "rb") as f:
        refs = loads_plain(f.read(), path)
    if not isinstance(refs, list) or not all(isinstance(r, dict) for r in refs):
        raise ValueError(f"{path}: expected a list of dicts (REFER refs), got {type(refs).__name__}")
    required = ("ref_id", "ann_id", "image_id", "split", "sentences")
    for i, ref in enumerate(refs):
        missing = [k for k in required if k not in ref]
        if missing:
            raise ValueError(f"{path}: ref #{i} lacks {missing} (has {sorted(ref)})")
    return refs
