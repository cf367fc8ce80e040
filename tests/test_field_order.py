"""The order of the statistics fields is an interface: Python (``manu_fast.schema.FIELDS``), the C++ kernel's
``enum Field`` (csrc/act_stats.cpp) and the Triton merge's accumulator rows (kernels/common.py) must agree."""
import re
from pathlib import Path

import pytest

from manu_fast.schema import FIELD_INDEX, FIELDS, NUM_FIELDS

ROOT = Path(__file__).resolve().parents[1]


def _camel(field: str) -> str:
    return "k" + "".join(part.capitalize() for part in field.split("_"))


def test_cpp_enum_matches_fields():
    src = (ROOT / "csrc" / "act_stats.cpp").read_text()
    body = re.search(r"enum Field \{([^}]*)\}", src).group(1)
    enum = {name.strip(): int(value) for name, value in re.findall(r"(\w+)\s*=\s*(\d+)", body)}
    assert enum == {_camel(f): i for i, f in enumerate(FIELDS)}
    assert len(FIELDS) == NUM_FIELDS == len(set(FIELDS))
    assert FIELD_INDEX == {f: i for i, f in enumerate(FIELDS)}


def test_triton_merge_rows_match_fields():
    pytest.importorskip("triton")
    from manu_fast.kernels import common
    for f in FIELDS:
        assert int(getattr(common, f"A_{f.upper()}")) == FIELD_INDEX[f], f
    src = (ROOT / "kernels" / "common.py").read_text()
    merge = src[src.index("def merge_kernel"):src.index("# ---- host side ----")]
    # every accumulator row is addressed through a named constant, never a literal offset
    assert not re.search(r"\ba \+ (\d+ \* )?field\b", merge)
    assert not re.search(r"tl\.(load|store)\(a,", merge)
