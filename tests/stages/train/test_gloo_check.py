"""Horovod's "built with Gloo?" check when every child it forks dies: asked in a spawned process, and the answer
given to Horovod's own cache, which horovod.spark.run reads instead of forking again."""
from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor


def test_a_spawned_process_answers_the_gloo_check_and_horovod_keeps_the_answer_it_is_given():
    from horovod.common.util import gloo_built

    from cxr_spark.stages.train.job import _gloo_built, remember_gloo_built

    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        assert pool.submit(_gloo_built).result() is True  # scripts/install.sh builds Horovod with Gloo
    cache = gloo_built.__closure__[gloo_built.__code__.co_freevars.index("cache")].cell_contents
    key = ((), frozenset({("verbose", False)}))
    before = cache.get(key, "absent")
    try:
        remember_gloo_built("given here")  # not a real answer: only this cache can return it
        assert gloo_built(verbose=False) == "given here"
    finally:
        if before == "absent":
            cache.pop(key, None)
        else:
            cache[key] = before


def test_when_no_forked_check_answers_the_spawned_answer_is_what_horovod_spark_run_will_read():
    from horovod.common.util import gloo_built

    from cxr_spark.stages.train.job import _check_gloo

    cache = gloo_built.__closure__[gloo_built.__code__.co_freevars.index("cache")].cell_contents
    key = ((), frozenset({("verbose", False)}))
    before = cache.pop(key, "absent")
    try:
        _check_gloo(attempts=0)  # as if every forked child had died: straight to the spawned process
        assert cache[key] is True
    finally:
        if before != "absent":
            cache[key] = before
