"""Sample quality of the flow stages at an equal CPU budget on the builtin data: 1-RF, 2-RF, distilled, DiffWave.

    nice -n 19 python benchmarks/quality_flows.py --out runs/quality --minutes 8 --threads 1

What it does, each step through the command line a user has:
1. `sashimi metrics train-classifier` at the models' rate and clip length (unless --classifier),
   `sashimi train` of the rectified flow (1-RF) and of the DiffWave baseline on the same backbone,
   each with the same CPU budget (`--max-time Nm --budget-clock cpu`), all three side by side.
2. `sashimi reflow`: pairs from the 1-RF model, then 2-RF trained on them (its own budget).
3. `sashimi distill`: the one-step model, from 2-RF on the same pairs (its own budget).
4. Generation from fixed seeds (labels cycled 0..9, no guidance) and the offline metrics
   (sashimi.metrics.score: classifier-feature Frechet distance, mel FD, IS) of every case against
   the builtin test split, with straightness S of every flow along its own trajectories.
Prints the table and the three goals (docs/flows.md), and writes OUT/quality.json. Re-running
with the same OUT reuses finished stages (their run directories), so a crash costs one stage.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sashimi.cli_flows import straightness_report  # noqa: E402
from sashimi.metrics import score  # noqa: E402
from sashimi.metrics.classifier import EvalClassifier  # noqa: E402
from sashimi.pipelines.flow_files import load_flow_model  # noqa: E402
from sashimi.pipelines.flow_generate import FlowPipeline  # noqa: E402


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S', time.gmtime())} UTC] {message}", flush=True)


def start(name: str, argv: list[str], out: Path) -> tuple[str, subprocess.Popen]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    logfile = open(out / f"{name}.log", "a")
    log(f"start {name}: {' '.join(argv)}")
    return name, subprocess.Popen([sys.executable, "-m", "sashimi", *argv], stdout=logfile, stderr=subprocess.STDOUT,
                                  env=env, cwd=str(ROOT))


def wait(jobs) -> dict:
    """Wait for every job; {name: CPU seconds (user + system) of its process}. Exits on a failed job."""
    cpu = {}
    for name, proc in jobs:
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        cpu[name] = usage.ru_utime + usage.ru_stime
        log(f"done {name}: exit {proc.returncode}, {cpu[name]:.0f} CPU s")
        if proc.returncode != 0:
            sys.exit(f"{name} failed; see its log")
    return cpu


def training_cpu(run: Path) -> float:
    """The CPU seconds a run trained for (its last.pt: the loop's budget clock, resumed sessions included)."""
    from sashimi.training.checkpoint import load_checkpoint

    return float(load_checkpoint(str(run / "last.pt"))["elapsed_seconds"])


def last_json_line(path: Path) -> dict:
    for line in reversed(path.read_text().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    return {}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="working folder (runs, pairs, classifier, quality.json)")
    p.add_argument("--minutes", type=float, default=8.0, help="CPU minutes of 1-RF and of DiffWave, each (default 8)")
    p.add_argument("--reflow-minutes", type=float, default=5.0, help="CPU minutes of 2-RF (default 5)")
    p.add_argument("--distill-minutes", type=float, default=4.0, help="CPU minutes of distillation (default 4)")
    p.add_argument("--rf-preset", default="rf-tiny")
    p.add_argument("--dw-preset", default="diffwave-tiny")
    p.add_argument("--pairs", type=int, default=512, help="reflow pairs (default 512)")
    p.add_argument("--n", type=int, default=192, help="clips generated and scored per case (default 192)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process (default 1)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--ema", type=float, default=0.999, help="EMA decay of every training run (default 0.999)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of every training run (initialisation, data order, timesteps) and, plus 12345, of "
                        "generation (default 0); run again with another seed and --classifier to see the spread")
    p.add_argument("--classifier", default=None, help="an evaluation classifier at the models' rate and clip length")
    p.add_argument("--classifier-clips", type=int, default=1500, help="builtin clips it trains on (default 1500)")
    args = p.parse_args()

    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    load_start = os.getloadavg()
    t0 = time.time()
    from sashimi.models.registry import get_preset

    rf_config, dw_config = get_preset(args.rf_preset), get_preset(args.dw_preset)
    rate, clip = rf_config.sample_rate, rf_config.sample_len
    if (dw_config.sample_rate, dw_config.sample_len, dw_config.d_model, dw_config.n_layers) != \
            (rate, clip, rf_config.d_model, rf_config.n_layers):
        sys.exit("the two presets must share the backbone and the clip format")
    common = ["--max-steps", "10000000", "--budget-clock", "cpu", "--threads", str(args.threads),
              "--batch-size", str(args.batch_size), "--val-every", "200", "--val-batches", "8", "--n-val-items", "64",
              "--ckpt-every", "200", "--ema", str(args.ema), "--no-progress", "--seed", str(args.seed)]
    budget = lambda m: ["--max-time", f"{m * 60:.0f}s"]  # noqa: E731
    train_cpu = {}
    state_file = out / "cpu.json"
    if state_file.exists():
        train_cpu = json.loads(state_file.read_text())

    # 1. classifier, 1-RF and DiffWave, side by side
    classifier = Path(args.classifier) if args.classifier else out / "classifier"
    jobs = []
    if not (classifier / "config.json").exists():
        jobs.append(start("classifier", ["metrics", "train-classifier", "--data", "builtin", "--out", str(classifier),
                                         "--sample-rate", str(rate), "--clip-seconds", str(clip / rate),
                                         "--n-train", str(args.classifier_clips), "--epochs", "4",
                                         "--threads", str(args.threads)], out))
    for name, preset in (("rf1", args.rf_preset), ("dw", args.dw_preset)):
        if name not in train_cpu:  # a run cut short continues (with this budget), else starts over
            again = "--resume" if (out / name / "last.pt").exists() else "--overwrite"
            jobs.append(start(name, ["train", "--preset", preset, "--data", "builtin", "--out", str(out / name),
                                     again,
                                     "--lr", str(args.lr), "--warmup-steps", "50", *common, *budget(args.minutes)],
                              out))
    wait(jobs)
    train_cpu.update({name: training_cpu(out / name) for name in ("rf1", "dw")})
    state_file.write_text(json.dumps(train_cpu))

    # 2. reflow: pairs from 1-RF, 2-RF on them
    if "rf2" not in train_cpu:
        job = start("rf2", ["reflow", "--model", str(out / "rf1"), "--pairs-out", str(out / "pairs"), "--pairs",
                            str(args.pairs), "--steps", "24", "--out", str(out / "rf2"), "--overwrite", "--lr", "1e-3",
                            "--warmup-steps", "20", *common, *budget(args.reflow_minutes)], out)
        wait([job])
        train_cpu["rf2"] = training_cpu(out / "rf2")
        state_file.write_text(json.dumps(train_cpu))
    reflow_report = last_json_line(out / "rf2.log")

    # 3. distillation
    if "distilled" not in train_cpu:
        job = start("distilled", ["distill", "--model", str(out / "rf2"), "--pairs", str(out / "pairs"),
                                  "--out", str(out / "distilled"), "--overwrite", "--lr", "1e-3",
                                  "--warmup-steps", "20", *common, *budget(args.distill_minutes)], out)
        wait([job])
        train_cpu["distilled"] = training_cpu(out / "distilled")
        state_file.write_text(json.dumps(train_cpu))
    distill_report = last_json_line(out / "distilled.log")

    # 4. generate and score
    cls = EvalClassifier.from_pretrained(str(classifier))
    models = {name: load_flow_model(str(out / name))[0] for name in ("rf1", "rf2", "distilled", "dw")}
    S = {name: straightness_report(models[name]) for name in ("rf1", "rf2", "distilled")}
    labels = [i % 10 for i in range(args.n)]
    cases = [("1-RF", "rf1", "euler", 24), ("1-RF", "rf1", "euler", 1), ("2-RF", "rf2", "euler", 4),
             ("2-RF", "rf2", "euler", 1), ("distilled", "distilled", "euler", 1), ("DiffWave", "dw", "ddpm", 200)]
    rows = []
    from sashimi.metrics.score import load_clips

    val = load_clips("builtin:val", "real", cls.config.sample_rate, cls.config.clip_samples, [], args.n)[:args.n]
    floor = score(cls, "builtin", (val, cls.config.sample_rate), n_real=512)
    rows.append({"case": "real clips (val split)", "fid": floor["fid"], "mel_fd": floor["mel_fd"], "is": floor["is"]})
    log(f"floor: real val vs real test FID {floor['fid']:.3f}")
    for stage, name, method, steps in cases:
        result = FlowPipeline(models[name])(args.n, labels=labels, steps=steps, method=method, seed=12345 + args.seed,
                                            batch_size=16)
        s = score(cls, "builtin", result, n_real=512)
        row = {"case": f"{stage}, {steps} {method} step{'s' if steps > 1 else ''}", "model": name, "steps": steps,
               "method": method, "fid": s["fid"], "mel_fd": s["mel_fd"], "is": s["is"],
               "real_time_factor": result.real_time_factor, "seconds": result.seconds,
               "train_cpu_seconds": train_cpu.get(name), "S": S.get(name, {}).get("S")}
        rows.append(row)
        log(f"{row['case']}: FID {s['fid']:.3f}, mel FD {s['mel_fd']:.3f}, IS {s['is']:.2f}, "
            f"{result.seconds:.1f} s ({result.real_time_factor:.3f}x real time)")

    by = {(r.get("model"), r.get("steps")): r for r in rows}
    fid_24, fid_one = by[("rf1", 24)]["fid"], by[("distilled", 1)]["fid"]
    fid_dw = by[("dw", 200)]["fid"]
    ratio_S = S["rf1"]["S"] / max(S["rf2"]["S"], 1e-30)
    goals = {
        "a_distilled_1step_within_15pct_of_1rf_24": {"distilled_fid": fid_one, "rf1_24_fid": fid_24,
                                                     "relative": fid_one / fid_24 - 1, "met": fid_one <= 1.15 * fid_24},
        "b_S_2rf_5x_lower": {"S_1rf": S["rf1"]["S"], "S_2rf": S["rf2"]["S"], "ratio": ratio_S, "met": ratio_S >= 5},
        "c_rf24_beats_dw200": {"rf1_24_fid": fid_24, "dw_200_fid": fid_dw, "met": fid_24 < fid_dw,
                               "train_cpu_seconds": {"rf1": train_cpu.get("rf1"), "dw": train_cpu.get("dw")}},
    }
    record = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(t0)), "load_start": load_start,
              "load_end": os.getloadavg(), "wall_minutes": (time.time() - t0) / 60, "args": vars(args),
              "classifier_test_accuracy": cls.config.evaluation.get("test_accuracy"), "train_cpu_seconds": train_cpu,
              "straightness": S, "reflow": reflow_report, "distill": distill_report, "rows": rows, "goals": goals}
    (out / "quality.json").write_text(json.dumps(record, indent=2))

    print()
    print(f"{record['date']}, load {load_start[0]:.1f} -> {record['load_end'][0]:.1f}, "
          f"{record['wall_minutes']:.0f} min; classifier held-out accuracy {record['classifier_test_accuracy']}")
    print("| case | stage CPU s | S | FID (classifier) | mel FD | IS | real-time factor |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        cpu = f"{r['train_cpu_seconds']:.0f}" if r.get("train_cpu_seconds") else ""
        s_ = f"{r['S']:.4g}" if r.get("S") is not None else ""
        rtf = f"{r['real_time_factor']:.3f}" if r.get("real_time_factor") else ""
        print(f"| {r['case']} | {cpu} | {s_} | {r['fid']:.3f} | {r['mel_fd']:.3f} | {r['is']:.2f} | {rtf} |")
    print()
    for name, g in goals.items():
        print(f"{name}: {'MET' if g['met'] else 'NOT MET'}  {json.dumps({k: v for k, v in g.items() if k != 'met'})}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
