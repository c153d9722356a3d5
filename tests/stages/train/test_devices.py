"""The GPU path's choices, exercised without a GPU: which device a Horovod rank pins and which precision
policy it trains in (:func:`cxr_spark.stages.train.worker.device_plan`)."""
from __future__ import annotations

import pytest

from cxr_spark.stages.train.worker import device_plan


def test_without_gpus_nothing_is_pinned_and_auto_trains_in_float32():
    assert device_plan([], 0, "auto") == (None, "float32")
    assert device_plan([], 1, "off") == (None, "float32")
    assert device_plan([], 0, "on") == (None, "mixed_float16")  # asked for: float16 compute on the CPU too


def test_each_local_rank_pins_its_own_gpu_and_auto_turns_float16_on():
    gpus = ["GPU:0", "GPU:1", "GPU:2", "GPU:3"]
    plans = [device_plan(gpus, rank, "auto") for rank in range(4)]
    assert [gpu for gpu, _ in plans] == gpus  # four ranks on a 4-GPU node: one GPU each, none shared
    assert {policy for _, policy in plans} == {"mixed_float16"}
    assert device_plan(gpus, 5, "off") == ("GPU:1", "float32")  # more ranks than GPUs: they wrap round


def test_an_unknown_precision_setting_is_refused_by_name():
    with pytest.raises(ValueError, match=r"^mixed_precision 'fp16': expected one of auto, on, off$"):
        device_plan([], 0, "fp16")
