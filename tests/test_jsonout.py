"""`tests.jsonout.last_json`: the report, whatever Ray logs after it."""

from __future__ import annotations

import pytest

from tests.jsonout import last_json


def test_the_last_json_object_is_read_past_a_log_line_after_it():
    output = ('progress 1/2\n{"outer_steps": 1}\n{"outer_steps": 2}\n'
              "(raylet) Task PESWorker.run failed ... will be retried\n[1, 2]\n")
    assert last_json(output) == {"outer_steps": 2}


def test_no_json_object_fails_showing_the_output_tail():
    with pytest.raises(AssertionError, match=r"(?s)its tail:.*Traceback"):
        last_json('{"cut off": \nTraceback (most recent call last): ...')
