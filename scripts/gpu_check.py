"""The driver behind scripts/gpu-check.sh (see docs/gpu-check.md): runs the checks of tests/gpu
through pytest, then `minideep bench -s train -s moe -s decode` on the rtx3060 and a100 presets,
and writes OUT/gpu-check.json (every check: name, status, seconds, key figures) and
OUT/summary.txt. Exit status: 0 all passed (skips allowed), 1 a check failed, 2 it cannot run
here: no CUDA GPU and no --cpu, or no pytest (one line says which).

--cpu is the dry run: the same checks on the CPU at tiny shapes (MINIDEEP_GPU_CHECK_CPU=1), so
that the default test run keeps them working on machines without a GPU."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PRESETS = ("rtx3060", "a100")
# ceilings that keep the whole run within 8 minutes on one H100/H200-class GPU
PYTEST_TIMEOUT = int(os.environ.get("GPU_CHECK_PYTEST_TIMEOUT", "240"))
BENCH_TIMEOUT = int(os.environ.get("GPU_CHECK_BENCH_TIMEOUT", "110"))


def run(cmd: list[str], log: Path, env: dict, timeout: int) -> tuple[int, float]:
    """Run cmd with its output in log; (exit status, seconds); 124 when it ran past timeout. Past
    it, cmd gets Ctrl-C first (pytest then still writes its report of the checks done so far)."""
    start = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            f.flush()
            f.write(f"\ngpu-check: stopped after {timeout} s\n")
            rc = 124
    return rc, time.perf_counter() - start


def figure(text: str):
    """A recorded property back to a number, bool or None where it reads as one."""
    try:
        return json.loads(text)
    except ValueError:
        return {"True": True, "False": False, "None": None}.get(text, text)


def pytest_checks(xml: Path) -> list[dict]:
    """One check per test case of the JUnit XML, with the figures the test recorded."""
    checks = []
    for case in ET.parse(xml).getroot().iter("testcase"):
        if not case.get("name"):  # pytest's entry for an interrupted session: reported below
            continue
        module = case.get("classname", "").rsplit(".", 1)[-1]
        check = {"name": f"{module}::{case.get('name')}", "status": "passed", "seconds": round(float(case.get("time", 0)), 2),
                 "figures": {p.get("name"): figure(p.get("value", "")) for p in case.iter("property")}}
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                check["status"] = "skipped" if tag == "skipped" else "failed"
                check["reason"] = (node.get("message") or node.text or "").strip().splitlines()[0][:300] if (
                    node.get("message") or node.text) else tag
                break
        checks.append(check)
    return checks


def bench_figures(result: dict) -> dict:
    t, moe, dec = result.get("train") or {}, result.get("moe") or {}, result.get("decode") or {}
    figs = {"device": t.get("device"), "dtype": t.get("dtype"), "tokens_per_sec": t.get("tokens_per_sec"),
            "step_ms": t.get("step_ms"), "mfu": t.get("mfu"), "achieved_tflops": t.get("achieved_tflops")}
    if moe.get("rows"):
        figs["moe_vs_loop"] = moe["rows"][0]["moe_vs_loop"]
        figs["moe_vs_dense"] = moe["rows"][0]["moe_vs_dense"]
    if result.get("products"):  # how near the step could come to the matmul rate (bench -s products)
        figs["products_of_step"] = result["products"]["alone_of_step"]
        figs["products_ceiling_share"] = result["products"]["ceiling_share"]
    for row in dec.get("speed", []):  # the longest context timed, per attention variant
        figs[f"decode_{row['attention']}_tokens_per_sec"] = row["cached_tokens_per_sec"]
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in figs.items()}


def bench_check(preset: str, out: Path, env: dict, cpu: bool, py: str) -> dict:
    path = out / f"bench-{preset}.json"
    # the dry run times decoding once (rtx3060): its fixed contexts of 128 and 512 tokens are most
    # of a CPU bench's time, and the a100 preset runs the same code
    sections = ("train", "products", "moe") if cpu and preset != PRESETS[0] else ("train", "products", "moe", "decode")
    cmd = [py, "-m", "minideep_cli", "bench", "--preset", preset, "--quick", "--json", str(path)]
    for s in sections:
        cmd += ["-s", s]
    if cpu:  # tiny shapes, fp32, eager: the command and its JSON, in seconds
        sys.path.insert(0, str(ROOT / "tests" / "gpu"))
        from gpu_env import tiny_overrides

        for o in [*tiny_overrides("moe", vocab=512), "train.device=cpu", "train.dtype=float32", "train.compile=false"]:
            cmd += ["-o", o]
    if path.exists():
        path.unlink()
    rc, sec = run(cmd, out / f"bench-{preset}.log", env, BENCH_TIMEOUT)
    check = {"name": f"bench {preset} ({', '.join(sections)})", "status": "failed", "seconds": round(sec, 2), "figures": {}}
    if rc == 0 and path.is_file():
        check["figures"] = bench_figures(json.loads(path.read_text()))
        if (check["figures"].get("tokens_per_sec") or 0) > 0:
            check["status"] = "passed"
        else:
            check["reason"] = "no training tokens/s in the JSON"
    else:
        check["reason"] = f"exit status {rc}" + (" (timed out)" if rc == 124 else "") + f"; see bench-{preset}.log"
    return check


def summary(report: dict) -> str:
    lines = [f"minideep gpu-check ({report['mode']}): {'PASSED' if report['passed'] else 'FAILED'} in "
             f"{report['seconds']:.0f} s on {report['device']}"]
    for c in report["checks"]:
        figs = ", ".join(f"{k}={v}" for k, v in c["figures"].items() if v is not None)
        why = f" - {c['reason']}" if c.get("reason") and c["status"] != "passed" else ""
        lines.append(f"{c['status'].upper():7} {c['name']} ({c['seconds']:.1f} s){': ' + figs if figs else ''}{why}")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="scripts/gpu-check.sh", description="Check minideep's CUDA paths in one run.")
    ap.add_argument("out", type=Path, help="folder for gpu-check.json, summary.txt and the logs")
    ap.add_argument("--cpu", action="store_true", help="dry run on the CPU at tiny shapes (no GPU needed)")
    args = ap.parse_args(argv)
    import importlib.util

    if importlib.util.find_spec("pytest") is None:  # the checks are tests/gpu, run by pytest
        print("gpu-check: needs pytest, which the test extra installs: pip install -e '.[test]' "
              "(or only: pip install pytest)")
        return 2
    import torch

    if not args.cpu and not torch.cuda.is_available():
        print("gpu-check: no CUDA GPU here (torch.cuda.is_available() is False); --cpu runs the dry run instead")
        return 2
    start = time.perf_counter()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    env = dict(os.environ, MINIDEEP_GPU_CHECK_CPU="1" if args.cpu else "0", CUBLAS_WORKSPACE_CONFIG=":4096:8",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    if args.cpu:
        env.setdefault("OMP_NUM_THREADS", "1")  # tiny shapes: threads only contend
    device = "cpu" if args.cpu else f"{torch.cuda.get_device_name(0)} (x{torch.cuda.device_count()})"

    xml = out / "pytest.xml"
    if xml.exists():
        xml.unlink()
    print(f"gpu-check: tests/gpu on {device} ...", flush=True)
    rc, sec = run([py, "-m", "pytest", str(ROOT / "tests" / "gpu"), "-m", "gpu", "-o", "addopts=", "-o",
                   "junit_family=xunit1", "-p", "no:cacheprovider", "-q", "-rs", f"--junitxml={xml}"],
                  out / "pytest.log", env, PYTEST_TIMEOUT)
    checks = pytest_checks(xml) if xml.is_file() else []
    if rc not in (0, 1) or not checks or (rc == 1 and all(c["status"] != "failed" for c in checks)):
        checks.append({"name": "pytest tests/gpu", "status": "failed", "seconds": round(sec, 2), "figures": {},
                       "reason": f"exit status {rc}" + (" (timed out)" if rc == 124 else "") + "; see pytest.log"})
    for preset in PRESETS:
        print(f"gpu-check: bench --preset {preset} ...", flush=True)
        checks.append(bench_check(preset, out, env, args.cpu, py))

    report = {"mode": "cpu" if args.cpu else "cuda", "device": device, "torch": torch.__version__,
              "passed": all(c["status"] != "failed" for c in checks), "seconds": round(time.perf_counter() - start, 1),
              "checks": checks}
    (out / "gpu-check.json").write_text(json.dumps(report, indent=1) + "\n")
    text = summary(report)
    (out / "summary.txt").write_text(text)
    print(text, end="")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
