"""The run's tiny tokenizer is built into the workdir by every host at once; no host may read it half-written.

A pod's hosts share the workdir and all start by building the tokenizer. The test stages the bad
interleaving deterministically: one host's build stalls halfway through writing `tokenizer.json` while a
second host asks for the tokenizer, builds its own and loads it.
"""
from __future__ import annotations

import filecmp
import os
import shutil
import threading

from dig_jax import assemble
from dig_jax.processing import build_tiny_tokenizer
from tests.integration import tiny_config


def _run_config(compact: bool):
    c = tiny_config.get_config()
    c.model.tokenizer_path = ""
    c.model.init_checkpoint = ""
    c.model.compact_tokenizer = compact
    return c


def test_a_host_never_reads_a_peer_s_half_written_tokenizer(tmp_path, monkeypatch):
    c = _run_config(compact=True)
    workdir = str(tmp_path / "workdir")
    halfway, peer_done = threading.Event(), threading.Event()

    def slow_first_build(path, family, compact):
        """Writes the real files into `path`; the first caller stalls mid-`tokenizer.json` until the peer is done."""
        scratch = str(tmp_path / f"scratch-{threading.get_ident()}")
        build_tiny_tokenizer(scratch, family=family, compact=compact)
        os.makedirs(path, exist_ok=True)
        for name in sorted(os.listdir(scratch), key=lambda n: n == "tokenizer.json"):
            data = open(os.path.join(scratch, name), "rb").read()
            with open(os.path.join(path, name), "wb") as f:
                if name == "tokenizer.json" and not halfway.is_set():
                    f.write(data[: len(data) // 2])
                    f.flush()
                    halfway.set()
                    assert peer_done.wait(timeout=60)
                    data = data[len(data) // 2:]
                f.write(data)
        shutil.rmtree(scratch)

    monkeypatch.setattr(assemble, "build_tiny_tokenizer", slow_first_build)
    first = threading.Thread(target=assemble.tokenizer_path, args=(c, workdir, "qwen3_vl"))
    first.start()
    assert halfway.wait(timeout=60)
    try:
        peer_path = assemble.tokenizer_path(c, workdir, "qwen3_vl")
        assemble.load_run_tokenizer(c, peer_path)  # raised "EOF while parsing" when builds wrote in place
    finally:
        peer_done.set()
        first.join(timeout=60)
    assert assemble.load_run_tokenizer(c, peer_path).get_vocab_size() > 0


def test_the_published_tokenizer_equals_a_direct_build_and_leaves_no_scratch(tmp_path):
    for compact in (False, True):
        c = _run_config(compact)
        path = assemble.tokenizer_path(c, str(tmp_path / f"workdir-{compact}"), "qwen3_vl")
        out = os.path.dirname(path)
        reference = str(tmp_path / f"reference-{compact}")
        build_tiny_tokenizer(reference, family="qwen3_vl", compact=compact)
        assert sorted(os.listdir(out)) == sorted(os.listdir(reference)), "missing files or a leftover build dir"
        _, mismatch, errors = filecmp.cmpfiles(reference, out, os.listdir(reference), shallow=False)
        assert not mismatch and not errors
