"""The rootless launcher's id maps, without a namespace: /etc/subuid parsing and map arguments."""
from __future__ import annotations

from unionfs.runtime.userns import IdRange, id_map, subordinate_range


def test_subordinate_range_by_name_or_id(tmp_path):
    subuid = tmp_path / "subuid"
    subuid.write_text("# comment\nalice:100000:65536\n1001:200000:1000\nbroken:x:1\nzero:300000:0\n")
    assert subordinate_range(str(subuid), 1000, "alice") == IdRange(100000, 65536)
    assert subordinate_range(str(subuid), 1001, "bob") == IdRange(200000, 1000)
    assert subordinate_range(str(subuid), 1002, "broken") is None
    assert subordinate_range(str(subuid), 1003, "zero") is None
    assert subordinate_range(str(tmp_path / "missing"), 1000, "alice") is None


def test_id_map_puts_the_caller_at_zero_and_the_range_after():
    assert id_map(1000, IdRange(100000, 65536)) == [0, 1000, 1, 1, 100000, 65536]
