"""Training throughput and peak memory of SaShiMi on CPU: forward + backward + clip + AdamW step.

    python benchmarks/bench_train.py                  # sc09 at batch 1 and 8, sc09-2layer at batch 1 and 8
    python benchmarks/bench_train.py --steps 5 --cases sc09:1 sc09-2layer:1

Each case runs in its own subprocess (so ru_maxrss is that case's peak RSS) with
torch.set_num_threads(2), on random 8-bit tokens of 16000 samples (1 s at 16 kHz). The step time
is the median over --steps timed steps after --warmup untimed ones ("cpu s": the process's
CPU seconds per step, all threads together). A batch written 8/1 runs in micro-batches of 1
whose gradients add up (`sashimi train --micro-batch 1`): the batch-8 update in batch-1 memory.
The last columns compare with state-spaces/s4's SaShiMi measured on this machine the same way
(batch 1, 2 threads):
2 layers 16.8 s/step and 6.9 GB; 8 layers (sc09) 83.6 s/step and 11.0 GB. "speedup" is our
samples/s over the reference's; "RSS ratio" our peak RSS over the reference's (at its batch 1).
"load" is the machine's 1-minute load average when the case ended: above the core count, other
processes compete for the cores, and with 2 threads PyTorch's OpenMP barriers then wait on
descheduled threads (seen here: 30-70x slower steps at load 3 on 2 cores). On a shared machine
use --threads 1, or set OMP_WAIT_POLICY=PASSIVE, and read the load column.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import warnings

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# reference SaShiMi (state-spaces/s4), batch 1, one 16000-sample clip, AdamW step, 2 threads
REFERENCE = {"sc09": {"s_per_step": 83.6, "rss_gb": 11.0}, "sc09-2layer": {"s_per_step": 16.8, "rss_gb": 6.9}}


def run_case(preset: str, batch_size: int, steps: int, warmup: int, sample_len: int, threads: int,
             micro_batch: int | None = None, checkpointing: bool = False) -> dict:
    """One case in this process: returns step times (wall and CPU) and peak RSS.

    micro_batch: run the batch in chunks of this many clips, adding up their gradients (as
    `sashimi train --micro-batch` does): the same update with the memory of a smaller batch.
    checkpointing: gradient checkpointing per (S4, FF) layer (`sashimi train --checkpointing on`).
    """
    import resource

    import torch

    sys.path.insert(0, REPO)
    from s4lib import param_groups
    from sashimi.models.autoregressive import build_model, count_parameters
    from sashimi.objectives.autoregressive import LN2

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = build_model(preset, sample_len=sample_len)
    model.set_gradient_checkpointing(checkpointing)
    optimizer = torch.optim.AdamW(param_groups(model, weight_decay=0.0, lr=4e-3), lr=4e-3)
    n_classes = model.config.n_classes
    x = torch.randint(0, n_classes, (batch_size, sample_len))
    y = torch.randint(0, n_classes, (batch_size, sample_len))
    mask = torch.ones(batch_size, sample_len, dtype=torch.bool)
    micro = micro_batch or batch_size
    times, cpu_times = [], []
    with warnings.catch_warnings(record=True) as caught:  # kernel-backend fallbacks would explain slow cases
        warnings.simplefilter("always")
        for i in range(warmup + steps):
            start, cpu_start = time.perf_counter(), time.process_time()
            for chunk in range(0, batch_size, micro):
                part = slice(chunk, chunk + micro)
                bits, count = model(x[part], y[part], mask[part])  # the loss as sashimi train computes it
                (bits * LN2 / mask.sum()).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if i >= warmup:
                times.append(time.perf_counter() - start)
                cpu_times.append(time.process_time() - cpu_start)
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kilobytes on Linux
    from s4lib.ops.dispatch import available_backends

    return {"preset": preset, "batch_size": batch_size, "micro_batch": micro, "checkpointing": checkpointing, "params": count_parameters(model),
            "step_times": times, "median_s": statistics.median(times), "median_cpu_s": statistics.median(cpu_times),
            "peak_rss_gb": rss_kb / 1e6, "load_average": os.getloadavg()[0],
            "backends": available_backends(),
            "fallbacks": sorted({str(w.message) for w in caught if "kernel backend" in str(w.message)})}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+",
                        default=["sc09:1", "sc09:8", "sc09:8:1", "sc09-2layer:1", "sc09-2layer:8"],
                        help="PRESET:BATCH[:MICRO_BATCH][:ckpt], e.g. sc09:8:4:ckpt (ckpt: gradient checkpointing)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per case (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--sample-len", type=int, default=16000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: run one case, print JSON
    args = parser.parse_args()

    if args.one:
        preset, batch, *rest = args.one.split(":")
        ckpt = "ckpt" in rest
        micro = [r for r in rest if r != "ckpt"]
        print(json.dumps(run_case(preset, int(batch), args.steps, args.warmup, args.sample_len, args.threads,
                                  int(micro[0]) if micro else None, ckpt)))
        return

    header = (f"{'preset':<12} {'batch':>7} {'params':>10} {'s/step':>8} {'cpu s':>7} {'samples/s':>10} {'peak RSS':>9}"
              f" | {'ref s/step':>10} {'ref RSS':>8} {'speedup':>8} {'RSS ratio':>9} | {'load':>5}")
    print(f"training step on CPU ({args.threads} threads), {args.sample_len}-sample clips, "
          f"median of {args.steps} steps after {args.warmup} warmup")
    print(header)
    print("-" * len(header))
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONWARNINGS="ignore")
    notes = []
    for case in args.cases:
        cmd = [sys.executable, os.path.abspath(__file__), "--one", case, "--steps", str(args.steps),
               "--warmup", str(args.warmup), "--sample-len", str(args.sample_len), "--threads", str(args.threads)]
        done = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if done.returncode != 0:
            print(f"{case}: failed\n{done.stderr[-2000:]}")
            continue
        r = json.loads(done.stdout.strip().splitlines()[-1])
        throughput = r["batch_size"] / r["median_s"]
        batch = f"{r['batch_size']}" + (f"/{r['micro_batch']}" if r["micro_batch"] != r["batch_size"] else "")
        batch += "c" if r["checkpointing"] else ""
        line = (f"{r['preset']:<12} {batch:>7} {r['params']:>10,} {r['median_s']:>8.2f} {r['median_cpu_s']:>7.1f}"
                f" {throughput:>10.3f}"
                f" {r['peak_rss_gb']:>7.2f}GB")
        ref = REFERENCE.get(r["preset"])
        if ref and args.sample_len == 16000:
            speedup = throughput * ref["s_per_step"]  # our samples/s over the reference's (batch 1) samples/s
            line += (f" | {ref['s_per_step']:>10.1f} {ref['rss_gb']:>6.1f}GB {speedup:>7.1f}x"
                     f" {r['peak_rss_gb'] / ref['rss_gb']:>9.2f}")
        else:
            line += " |" + " " * 39
        line += f" | {r['load_average']:>5.1f}"  # 1-min load average: other work on the machine slows the case
        print(line, flush=True)
        notes += [f"  {case}: {message}" for message in r["fallbacks"]]
    print("(a batch written 8/4c: micro-batches of 4, c: gradient checkpointing)")
    print(f"kernel backends available: {', '.join(r['backends'])}" if done.returncode == 0 else "")
    if notes:
        print("kernel backend fallbacks during the runs (slower paths):\n" + "\n".join(notes))


if __name__ == "__main__":
    main()
