"""The quarantine's reason vocabulary: the one the README documents, checked on write."""
from __future__ import annotations

import re

import pytest
from conftest import ROOT

from cxr_spark.datasets.quarantine import REASONS, check_reasons


def test_the_quarantine_vocabulary_is_the_one_the_readme_documents_and_nothing_else_is_written():
    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("| reason | meaning |"):].split("\n\n")[0]
    assert tuple(re.findall(r"^\| `(\w+)` \|", table, re.M)) == REASONS
    check_reasons({"corrupt_image": 3, "no_metadata": 1}, "raw")
    with pytest.raises(RuntimeError, match="raw quarantine has rows with reasons outside .*: None, bad_pixels"):
        check_reasons({"bad_pixels": 1, None: 2, "empty_file": 1}, "raw")
