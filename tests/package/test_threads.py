"""vicl_fast._threads.thread_map: the serial loop's results, in order, on several threads."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from scipy import ndimage

from vicl_fast._threads import thread_map


def test_thread_map_equals_the_serial_loop_in_order():
    vols = [np.random.default_rng(i).random((20, 20, 20)) for i in range(5)]
    fn = lambda v: ndimage.gaussian_filter(v, 1.0)  # noqa: E731 - releases the GIL
    got = thread_map(fn, vols, workers=3)
    for g, v in zip(got, vols):
        np.testing.assert_array_equal(g, fn(v))
    names = thread_map(lambda _: threading.current_thread().name, range(4), workers=1)
    assert set(names) == {threading.current_thread().name}  # one worker: no pool at all
    assert thread_map(fn, [], workers=4) == []


def test_thread_map_reraises_the_first_error():
    def boom(i):
        if i == 2:
            raise ValueError("item 2")
        return i

    with pytest.raises(ValueError, match="item 2"):
        thread_map(boom, range(4), workers=2)
