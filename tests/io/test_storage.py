"""Storage: where files may be read and written, and the error for a filesystem it cannot reach."""
from __future__ import annotations

import pytest


def test_model_files_on_a_remote_filesystem_get_a_clear_error(tmp_path):
    from cxr_spark.io.storage import read_bytes, write_bytes

    write_bytes(f"file://{tmp_path}/model/model.keras", b"weights")
    assert read_bytes(str(tmp_path / "model" / "model.keras")) == b"weights"
    with pytest.raises(NotImplementedError, match="hdfs://nn/m/model.keras needs a local or mounted path"):
        read_bytes("hdfs://nn/m/model.keras")
