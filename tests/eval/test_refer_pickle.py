"""The restricted unpickler: plain REFER data loads; any reference to a callable is refused unexecuted."""
from __future__ import annotations

import os
import pickle

import pytest

from dig_jax.eval import refer_pickle


class _Runs:
    """Pickles as a call of `fn(*args)`: what a malicious pickle does with os.system."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def test_plain_data_loads_with_python2_strings_as_str():
    refs = [{"ref_id": 0, "ann_id": 5, "image_id": 1, "split": "val", "sentences": [{"sent_id": 0, "sent": "a b"}],
             "box": (1.5, 2.0), "ok": True, "none": None}]
    assert refer_pickle.loads_plain(pickle.dumps(refs, protocol=2)) == refs
    # Python 2's cPickle writes str as SHORT_BINSTRING (opcode U), read back as latin-1 text.
    py2 = b"\x80\x02]q\x00}q\x01U\x04sentq\x02U\x05caf\xe9!q\x03sa."
    assert refer_pickle.loads_plain(py2, "py2") == [{"sent": "caf\xe9!"}]


@pytest.mark.parametrize("protocol", [0, 2, 5])
def test_a_callable_is_refused_before_it_runs(tmp_path, protocol):
    marker = tmp_path / "ran"
    payload = pickle.dumps([{"ref_id": 0}, _Runs(os.mkdir, str(marker))], protocol=protocol)
    with pytest.raises(refer_pickle.UnsafePickleError, match=r"evil\.p: the pickle references (posix|os)\.mkdir"):
        refer_pickle.loads_plain(payload, "evil.p")
    assert not marker.exists()
    pickle.loads(payload)  # the same bytes through the plain unpickler do run the call
    assert marker.exists()


class _Object:
    pass


@pytest.mark.parametrize("obj", [set([1]), _Runs(dict, [("a", 1)]), _Object()])
def test_any_global_is_refused(obj):
    """Even harmless callables (a set, dict(), a class instance's copyreg._reconstructor) are refused:
    REFER files never need one."""
    with pytest.raises(refer_pickle.UnsafePickleError, match="references"):
        refer_pickle.loads_plain(pickle.dumps(obj, protocol=2))


def test_persistent_ids_are_refused():
    class WithPid(pickle.Pickler):
        def persistent_id(self, obj):
            return "file" if obj == "x" else None

    import io
    buf = io.BytesIO()
    WithPid(buf, protocol=2).dump(["x"])
    with pytest.raises(refer_pickle.UnsafePickleError, match="persistent object 'file'"):
        refer_pickle.loads_plain(buf.getvalue(), "pid.p")


def test_malformed_and_missing_files_are_named(tmp_path):
    bad = tmp_path / "refs(unc).p"
    bad.write_bytes(b"\x80\x02]q\x00(K\x01")  # truncated
    with pytest.raises(pickle.UnpicklingError, match=r"refs\(unc\)\.p: not a readable pickle"):
        refer_pickle.load_refs(str(bad))
    bad.write_bytes(pickle.dumps({"not": "a list"}, protocol=2))
    with pytest.raises(ValueError, match="expected a list of dicts"):
        refer_pickle.load_refs(str(bad))
    bad.write_bytes(pickle.dumps([{"ref_id": 1}], protocol=2))
    with pytest.raises(ValueError, match=r"ref #0 lacks \['ann_id', 'image_id', 'split', 'sentences'\]"):
        refer_pickle.load_refs(str(bad))
    with pytest.raises(FileNotFoundError, match="do not exist"):
        refer_pickle.load_refs(str(tmp_path / "missing.p"))
