"""Memory of the node table, measured in-process with tracemalloc over a real layer directory."""
from __future__ import annotations

import gc
import tracemalloc
from pathlib import Path

from unionfs.fs.inodes import ROOT_ID
from unionfs.fs.layers import LayerStack
from unionfs.fs.union import Union

FILES = 20_000


def test_forgotten_nodes_give_their_memory_back(tmp_path: Path):
    """After the kernel forgets a big listing's nodes, the daemon holds (nearly) nothing more
    than before it: the node tables too are given back, not only the nodes."""
    lower = tmp_path / "lower"
    lower.mkdir()
    for i in range(FILES):
        (lower / f"file-{i:05d}").touch()
    union = Union(LayerStack([str(lower)]))
    root = union.inodes.get(ROOT_ID)
    tracemalloc.start()
    try:
        gc.collect()
        before = tracemalloc.get_traced_memory()[0]
        node_ids = [union.inodes.remember(union.inodes.current(node)).id for _, node in union.listdir(root)[2:]]
        gc.collect()
        held = tracemalloc.get_traced_memory()[0] - before
        for node_id in node_ids:
            union.inodes.forget(node_id, 1)
        del node_ids
        gc.collect()
        kept = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert len(union.inodes) == 1
    assert held > FILES * 300  # the nodes were made: the measurement sees them
    assert kept < held * 0.03, f"{kept} of {held} bytes still held after every node was forgotten"
