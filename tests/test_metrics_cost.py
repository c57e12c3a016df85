"""Per-stage compute cost: wall and device seconds, peak host memory, parameters, reused stages."""

import json
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from torch import nn

from privbench.metrics import CostRecorder
from privbench.metrics.cost import COST_FIELDS

MB = 1 << 20


def busy(seconds: float) -> None:
    """Spin until this process has used `seconds` of CPU time: however loaded the machine, the stage
    then holds that much CPU time (a wall-clock spin on a busy machine gets only its share)."""
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass


def test_sleeping_stage_takes_wall_time_but_little_cpu():
    costs = CostRecorder()
    with costs.stage("sleep"):
        time.sleep(0.3)
    (record,) = costs.records()
    assert record["wall_s"] >= 0.3 and record["device_s"] < 0.1
    assert record["name"] == "sleep" and record["device"] == "cpu" and record["device_name"]
    assert record["peak_device_bytes"] is None and record["reused"] is False


def test_busy_stage_takes_cpu_time():
    costs = CostRecorder()
    with costs.stage("spin"):
        busy(0.3)
    assert costs.records()[0]["device_s"] > 0.2


ALLOCATION_SCRIPT = """
import json, time
import numpy as np
from privbench.metrics import CostRecorder
from privbench.metrics.cost import SAMPLE_INTERVAL_S
costs = CostRecorder()
with costs.stage("idle"):
    time.sleep(0.1)
with costs.stage("allocate"):
    block = np.ones(300 << 20, dtype=np.uint8)  # np.ones writes every page, so all of it is resident
    time.sleep(4 * SAMPLE_INTERVAL_S)
    del block
print(json.dumps([r["peak_host_bytes"] for r in costs.records()]))
"""


def test_large_allocation_raises_peak_host_memory():
    # A fresh interpreter: in a process whose allocator already holds hundreds of freed, still
    # resident megabytes (as the test session's does after earlier tests), a new block can reuse
    # those pages and leave the RSS where it was, which is true but says nothing about the recorder.
    out = subprocess.run([sys.executable, "-c", ALLOCATION_SCRIPT], capture_output=True, text=True, check=True)
    idle, allocate = json.loads(out.stdout.strip().splitlines()[-1])
    assert 250 * MB < allocate - idle < 450 * MB


def test_parameters_from_the_block_or_afterwards():
    costs = CostRecorder()
    with costs.stage("fit") as stage:
        stage.params = nn.Linear(10, 5)
    with costs.stage("sample"):
        pass
    costs.parameters("sample", 7)
    assert [r["params"] for r in costs.records()] == [55, 7]
    with pytest.raises(KeyError):
        costs.parameters("missing", 1)


def test_duplicate_and_nested_stages_are_refused():
    costs = CostRecorder()
    with costs.stage("fit"):
        with pytest.raises(ValueError, match="recorded twice"):
            with costs.stage("fit"):
                pass
        with pytest.raises(ValueError, match="do not nest"):
            with costs.stage("inner"):
                pass
    with pytest.raises(ValueError, match="recorded twice"):
        with costs.stage("fit"):
            pass
    assert [r["name"] for r in costs.records()] == ["fit"]


def test_failed_stage_is_not_recorded_and_frees_the_recorder():
    costs = CostRecorder()
    with pytest.raises(RuntimeError):
        with costs.stage("fit"):
            raise RuntimeError("boom")
    with costs.stage("fit"):
        pass
    assert [r["name"] for r in costs.records()] == ["fit"]


def test_reused_stage_keeps_the_original_cost_and_round_trips():
    first = CostRecorder()
    with first.stage("pretrain") as stage:
        busy(0.05)
        stage.params = 1234
    original = first.records()[0]
    second = CostRecorder()
    second.reused("pretrain", original)
    (record,) = second.records()
    assert record["reused"] is True
    assert {k: record[k] for k in COST_FIELDS} == {k: original[k] for k in COST_FIELDS}
    with pytest.raises(ValueError, match="recorded twice"):
        second.reused("pretrain", original)
    with pytest.raises(ValueError, match="lacks wall_s"):
        second.reused("other", {k: v for k, v in original.items() if k != "wall_s"})
    data = json.loads(json.dumps(second.to_dict()))
    assert CostRecorder.from_dict(data).records() == second.records()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_stage_records_device_time_and_memory():
    costs = CostRecorder()
    with costs.stage("gpu", "cuda") as stage:
        x = torch.ones(64 * MB, device="cuda")  # 256 MB of float32
        stage.params = int(x.sum().item())
        del x
    (record,) = costs.records()
    assert record["peak_device_bytes"] >= 256 * MB and record["device_s"] > 0
    assert record["device_name"] == torch.cuda.get_device_name()
