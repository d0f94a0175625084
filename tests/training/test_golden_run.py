"""A fixed tiny training run reproduces its recorded per-step losses and final weights.

Bit-identical only where the arithmetic is the same: the same torch build on a CPU of the same vendor and
vector capability (torch's kernels and its math libraries pick their code by CPU, and round differently
on an AVX2 and an AVX-512 path). Record it anew with `python tests/training/test_golden_run.py --record`.
"""

import hashlib
import json
import os
import sys

import pytest
import torch

from sashimi.training.loop import TrainConfig, train
from sashimi.training.runtime import read_metrics

FIXTURE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "fixtures", "golden_tiny_run.json")


def weights_digest(state: dict) -> str:
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().contiguous().cpu()
        digest.update(name.encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()


def cpu_identity() -> dict:
    """What decides which float32 code paths run here: the CPU's vendor and torch's vector capability."""
    vendor = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            vendor = next((line.split(":", 1)[1].strip() for line in f if line.startswith("vendor_id")), vendor)
    except OSError:
        pass
    return {"cpu_vendor": vendor, "cpu_capability": torch.backends.cpu.get_cpu_capability()}


def run_golden(out: str, golden: dict) -> tuple[list, dict]:
    """(per-step records, final weights) of the fixture's run, trained into `out`."""
    threads = torch.get_num_threads()
    try:
        train(TrainConfig(out=out, progress=False, **golden["config"]))
    finally:
        torch.set_num_threads(threads)
    records = [{k: v for k, v in r.items() if k in ("step", "train_bits", "val_bits", "lr")}
               for r in read_metrics(os.path.join(out, "metrics.jsonl"))]
    return records, torch.load(os.path.join(out, "last.pt"), weights_only=True)["model"]


def test_golden_tiny_run(tmp_path, monkeypatch):
    """Bit-identical with the torch build and the kind of CPU it was recorded on; within float32 rounding
    elsewhere."""
    golden = json.load(open(FIXTURE))
    recorded = golden["recorded_with"]
    monkeypatch.setenv("S4LIB_BACKEND", recorded["backend"])
    records, weights = run_golden(str(tmp_path / "run"), golden)
    assert [r["step"] for r in records] == [r["step"] for r in golden["metrics"]]
    same = torch.__version__ == recorded["torch"] and all(recorded.get(k) == v for k, v in cpu_identity().items())
    if same:
        assert records == golden["metrics"]
        assert weights_digest(weights) == golden["weights_sha256"]
    else:  # another torch build or CPU may round differently; the losses must still follow the recorded run
        for got, want in zip(records, golden["metrics"]):
            for key in want:
                assert got[key] == pytest.approx(want[key], rel=2e-3, abs=2e-3), (got, want)


if __name__ == "__main__" and sys.argv[1:] == ["--record"]:
    import tempfile

    golden = json.load(open(FIXTURE))
    os.environ["S4LIB_BACKEND"] = golden["recorded_with"]["backend"]
    with tempfile.TemporaryDirectory() as tmp:
        records, weights = run_golden(os.path.join(tmp, "run"), golden)
    golden["recorded_with"] = {**golden["recorded_with"], "torch": torch.__version__, **cpu_identity()}
    golden["metrics"], golden["weights_sha256"] = records, weights_digest(weights)
    with open(FIXTURE, "w") as f:
        json.dump(golden, f, indent=1)
        f.write("\n")
    print(f"recorded {FIXTURE}: {golden['recorded_with']}")
