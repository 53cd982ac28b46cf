"""The GPU path on one machine, in minutes (issue 14): what benchmarks/gpu_check.sh runs after
installing. Prints each figure and writes ``<out>/summary.json`` and ``<out>/summary.txt``.

    python benchmarks/gpu_check.py --out gpu-check            # one CUDA GPU
    python benchmarks/gpu_check.py --out gpu-check --cpu      # the same steps, tiny, on the CPU

1. Throughput: ResNet-50 (shortcut B), bf16 autocast, channels_last, batch 256, synthetic
   ImageNet-shaped data (``data.synthetic_size: 224``) through ``resnet-cluster submit``
   (1 worker, a local Ray cluster), against a bare PyTorch loop of the same model, batch,
   dtype, memory format and optimizer on a batch already on the GPU. Ratio submit / bare,
   target >= 0.95. submit's figure is the median ``images_per_sec`` of its training_loss.csv
   windows after the first epoch (cudnn autotuning, warm-up); the bare loop's is timed after
   warm-up steps, with the GPU synchronised at both ends.
2. Solver: one optimizer step of the Caffe-convention SGD (the job default for the paper's
   ImageNet recipes; multi-tensor on a GPU) against torch.optim.SGD(foreach=True), ResNet-50.
3. Refusals: 2 ranks on one GPU (gpus_per_worker 0.5: refused by the job check) and 2 whole
   GPUs on a machine with one (refused by the local cluster check); exit code 2, one
   paragraph, no traceback.
4. The run's GPU-written checkpoint evaluated on the CPU (``resnet-cluster eval --device cpu``).

``--cpu`` runs every step with use_gpu false and tiny sizes (batch 8, 64x64 images) so the
script's logic can be checked on a machine without a GPU; its figures mean nothing for a GPU.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

# Published anchor (README "GPU check"): NVIDIA DeepLearningExamples, ResNet-50 v1.5 AMP
# training, 2,470 img/s on one A100 80GB at batch 256.
ANCHOR_A100_AMP = 2470


def log(msg: str) -> None:
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def cli(*args: str, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "resnet_cluster", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)


def settings(cpu: bool) -> dict:
    if cpu:
        return dict(device="cpu", batch=8, size=64, iters_per_epoch=4, epochs=3, log_every=2,
                    warmup=2, timed=6, cpus=max(1, min(2, os.cpu_count() or 1)), solver_steps=3)
    return dict(device="cuda", batch=256, size=224, iters_per_epoch=20, epochs=3, log_every=10,
                warmup=15, timed=40, cpus=max(1, min(8, (os.cpu_count() or 2) - 2)), solver_steps=20)


def job(s: dict, store: Path) -> dict:
    return {
        "name": "gpu-check",
        "seed": 0,
        "model": {"arch": "resnet50", "shortcut": "B"},
        "data": {"dataset": "synthetic", "augment": "none", "synthetic_size": s["size"],
                 "synthetic_train": s["batch"] * s["iters_per_epoch"], "synthetic_test": s["batch"]},
        "train": {"batch_size": s["batch"], "epochs": s["epochs"], "eval_every_epochs": s["epochs"],
                  "log_every_iterations": s["log_every"]},
        "optim": {"solver": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 1.0e-4},
        "schedule": {"policy": "constant"},
        "scaling": {"workers": 1, "use_gpu": s["device"] == "cuda", "gpus_per_worker": 1,
                    "cpus_per_worker": s["cpus"]},
        "checkpoint": {"every_epochs": 1000, "keep": 1},  # one checkpoint, at the end
        "precision": {"amp": "bf16", "channels_last": True},
        "artifacts": {"store": str(store)},
    }


def environment() -> dict:
    import torch

    from resnet_cluster.engine.device import driver_version

    env = {"python": platform.python_version(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
           "cuda_available": torch.cuda.is_available(), "driver": driver_version(), "cpus": os.cpu_count()}
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
        env["gpus"] = torch.cuda.device_count()
    return env


def bare_loop(job_path: Path, s: dict) -> dict:
    """The job's model, batch, dtype, memory format and optimizer in a plain loop."""
    import torch
    import torch.nn.functional as F

    from resnet_cluster.models import jobs
    from resnet_cluster.engine.loop import build_model
    from resnet_cluster.optim import build_optimizer

    cfg = jobs.load(job_path)
    dev = torch.device(s["device"])
    torch.set_num_threads(s["cpus"])
    torch.manual_seed(0)
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as the worker sets it (engine/device.py)
    model = build_model(cfg).to(dev).to(memory_format=torch.channels_last)
    opt = build_optimizer(cfg.optim, model)
    b, size = s["batch"], s["size"]
    x = torch.randn(b, 3, size, size, device=dev).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (b,), device=dev)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device_type=dev.type, dtype=torch.bfloat16):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()

    model.train()
    for _ in range(s["warmup"]):
        step()
    sync()
    t = time.perf_counter()
    for _ in range(s["timed"]):
        step()
    sync()
    seconds = time.perf_counter() - t
    return {"images_per_sec": round(b * s["timed"] / seconds, 1), "steps": s["timed"], "seconds": round(seconds, 3)}


def submit_run(job_path: Path, store: Path) -> dict:
    proc = cli("submit", str(job_path), "--json", timeout=420)
    if proc.returncode != 0:
        return {"ok": False, "rc": proc.returncode, "error": (proc.stderr or proc.stdout)[-3000:]}
    result = json.loads(proc.stdout)
    rows = list(csv.DictReader(open(store / "runs" / result["run_id"] / "training_loss.csv")))
    steady = [float(r["images_per_sec"]) for r in rows if int(r["epoch"]) >= 1 and r["images_per_sec"]]
    return {"ok": bool(steady), "run_id": result["run_id"], "seconds": result.get("seconds"),
            "images_per_sec": round(statistics.median(steady), 1) if steady else None,
            "windows": len(steady), "first_epoch_windows": [float(r["images_per_sec"]) for r in rows
                                                            if int(r["epoch"]) == 0]}


def solver_check(s: dict) -> dict:
    from bench_solvers import run

    rows = {r["solver"]: r for r in run("resnet50", s["device"], s["solver_steps"], baseline=None)}
    caffe = rows["caffe_foreach" if s["device"] == "cuda" else "caffe_per_tensor"]  # each device's default
    sgd = rows["sgd_foreach"]
    return {"caffe_step_ms": caffe["step_ms"], "caffe_operators": caffe["operators"],
            "sgd_foreach_step_ms": sgd["step_ms"], "sgd_foreach_operators": sgd["operators"],
            "ratio": round(caffe["step_ms"] / sgd["step_ms"], 3),
            "caffe_foreach_operators": rows["caffe_foreach"]["operators"]}


def refusals(job_path: Path, s: dict) -> dict:
    out = {}
    b = str(2 * s["batch"])
    for name, sets, words in [
        ("two_ranks_on_one_gpu", ["scaling.gpus_per_worker=0.5"], ["DDP ranks need whole GPUs"]),
        ("two_gpus_on_a_one_gpu_machine", ["scaling.gpus_per_worker=1"], ["too small for this job", "GPU"]),
    ]:
        args = ["submit", str(job_path), "--set", "scaling.use_gpu=true", "--set", "scaling.workers=2",
                "--set", f"train.batch_size={b}"]
        for x in sets:
            args += ["--set", x]
        proc = cli(*args, "--json", timeout=300)
        err = proc.stderr.strip()
        clean = proc.returncode == 2 and "Traceback" not in err and all(w in err for w in words)
        if name == "two_gpus_on_a_one_gpu_machine" and s["device"] == "cuda":
            import torch

            clean = clean if torch.cuda.device_count() == 1 else None  # only meaningful with 1 GPU
        out[name] = {"refused_cleanly": clean, "rc": proc.returncode, "message": err[-800:]}
    return out


def eval_on_cpu(run_id: str, store: Path) -> dict:
    """The run's last checkpoint (train_state.pt, written by the GPU worker) and its model.pt,
    each evaluated on the CPU."""
    ckpts = sorted((store / "runs" / run_id / "checkpoints").glob("epoch_*"))
    out: dict = {"ok": bool(ckpts)}
    for name, target in [("checkpoint", str(ckpts[-1]) if ckpts else None), ("model_pt", run_id)]:
        if target is None:
            out[name] = {"ok": False, "error": "no checkpoint folder"}
            continue
        proc = cli("eval", target, "--store", str(store), "--device", "cpu", "--no-record", "--json", timeout=300)
        if proc.returncode != 0:
            out[name] = {"ok": False, "rc": proc.returncode, "error": proc.stderr[-1500:]}
        else:
            r = json.loads(proc.stdout)
            out[name] = {"ok": r.get("top1_err") is not None and r.get("device") == "cpu",
                         "weights": r.get("weights"), "top1_err": r.get("top1_err"),
                         "test_images": r.get("test_images")}
        out["ok"] = out["ok"] and out[name]["ok"]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="gpu-check")
    ap.add_argument("--cpu", action="store_true", help="check the script's logic on the CPU, tiny sizes")
    args = ap.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    store = out / "store"
    s = settings(args.cpu)
    t0 = time.time()
    summary: dict = {"mode": "cpu" if args.cpu else "gpu", "settings": s, "environment": environment()}
    log(f"environment: {summary['environment']}")
    if not args.cpu and not summary["environment"]["cuda_available"]:
        from resnet_cluster.engine.device import cuda_problem

        summary["error"] = cuda_problem()
        log(summary["error"])
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        return 1
    job_path = out / "job.yaml"
    job_path.write_text(yaml.safe_dump(job(s, store), sort_keys=False))

    log("1/4 bare loop")
    summary["bare"] = bare_loop(job_path, s)
    if s["device"] == "cuda":
        import torch

        torch.cuda.empty_cache()  # the bare loop's blocks back to the driver before submit runs
    log(f"    bare: {summary['bare']['images_per_sec']} img/s")
    log("1/4 submit (local Ray, 1 worker)")
    summary["submit"] = submit_run(job_path, store)
    if summary["submit"].get("images_per_sec"):
        summary["throughput_ratio"] = round(summary["submit"]["images_per_sec"] / summary["bare"]["images_per_sec"], 3)
    log(f"    submit: {summary['submit']}")
    log("2/4 solver step")
    summary["solver"] = solver_check(s)
    log(f"    {summary['solver']}")
    log("3/4 refusals")
    summary["refusals"] = refusals(job_path, s)
    log(f"    {json.dumps({k: v['refused_cleanly'] for k, v in summary['refusals'].items()})}")
    log("4/4 the checkpoint evaluated on the CPU")
    summary["eval_on_cpu"] = eval_on_cpu(summary["submit"]["run_id"], store) if summary["submit"].get("run_id") \
        else {"ok": False, "error": "no run"}
    log(f"    {summary['eval_on_cpu']}")
    summary["seconds"] = round(time.time() - t0, 1)
    checks = {
        "throughput_ratio_ge_0.95": (summary.get("throughput_ratio") or 0) >= 0.95,
        "solver_operators_le_4x_foreach_sgd":
            summary["solver"]["caffe_foreach_operators"] <= 4 * summary["solver"]["sgd_foreach_operators"],
        **{f"refused_{k}": v["refused_cleanly"] for k, v in summary["refusals"].items()},
        "checkpoint_evaluates_on_cpu": summary["eval_on_cpu"]["ok"],
    }
    summary["checks"] = checks
    lines = [
        f"gpu_check ({summary['mode']}) {time.strftime('%Y-%m-%d %H:%M:%S')}, {summary['seconds']} s",
        f"machine: {summary['environment'].get('gpu', 'no GPU')}, torch {summary['environment']['torch']} "
        f"(CUDA {summary['environment']['torch_cuda']}), driver {summary['environment']['driver']}",
        f"ResNet-50 bf16 channels_last batch {s['batch']} @ {s['size']}px: submit "
        f"{summary['submit'].get('images_per_sec')} img/s, bare loop {summary['bare']['images_per_sec']} img/s, "
        f"ratio {summary.get('throughput_ratio')} (target >= 0.95; DeepLearningExamples ResNet-50 AMP: "
        f"{ANCHOR_A100_AMP} img/s per A100)",
        f"solver step, ResNet-50: Caffe SGD {summary['solver']['caffe_step_ms']} ms "
        f"({summary['solver']['caffe_operators']} operators) vs foreach SGD "
        f"{summary['solver']['sgd_foreach_step_ms']} ms ({summary['solver']['sgd_foreach_operators']}), "
        f"ratio {summary['solver']['ratio']}",
        *(f"refusal {k}: {v['refused_cleanly']} (exit {v['rc']})" for k, v in summary["refusals"].items()),
        f"checkpoint evaluated on the CPU: {summary['eval_on_cpu']}",
        "checks: " + ", ".join(f"{k}={v}" for k, v in checks.items()),
    ]
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    (out / "summary.txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)
    return 0 if all(v is not False for v in checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
