"""The benchmark scripts run end to end (tiny shape, few repeats; no torch.compile rows, no Triton rows - the
interpreter is tested elsewhere): every provider's
output passes the harness' check against diffusers before timing (a WRONG row fails the script), and every
solver has its fused, drop-in and diffusers rows; the seed methods' scripts check their fused and eager rows
against float64 references the same way."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastdiff import backends

pytest.importorskip("diffusers")
NATIVE = backends.choose(torch.device("cpu"))
ROOT = Path(__file__).resolve().parent.parent
SOLVERS = ["dpmpp_2m", "dpmpp_3m", "sde_dpmpp_2m", "unipc", "euler", "euler_ancestral", "heun", "ddpm", "lcm",
           "flow_euler", "ddim"]


def run(script, tmp_path, *args):
    cmd = [sys.executable, str(ROOT / "bench" / script), "--quick", "--repeats", "2", "--out", str(tmp_path), *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    rows = {}
    for f in tmp_path.glob("*.jsonl"):
        for line in f.read_text().splitlines():
            r = json.loads(line)
            if r["kind"] == "row":
                assert r["status"] != "wrong", r
                rows.setdefault(r["op"], {})[r["provider"]] = r["status"]
    return rows


def test_bench_multistep_checks_every_solver(tmp_path):
    rows = run("bench_multistep.py", tmp_path, "--shapes", "1x4x8x8",
               "--providers", f"diffusers,fastdiff-{NATIVE}*,fastdiff-torch,eager-torch,k-diffusion")
    assert sorted(rows) == sorted(f"multistep_{s}" for s in SOLVERS)
    for op, got in rows.items():
        assert got["diffusers"] == got[f"fastdiff-{NATIVE} (scheduler)"] == got["eager-torch"] == "ok", (op, got)
        assert got[f"fastdiff-{NATIVE}"] == got["fastdiff-torch"] == "ok", (op, got)


def test_bench_overhead_checks_every_drop_in(tmp_path):
    rows = run("bench_overhead.py", tmp_path, "--shapes", "1x4x8x8", "--providers", f"diffusers,fastdiff-{NATIVE}*")
    assert sorted(rows) == sorted(f"overhead_{s}_20_steps" for s in SOLVERS)
    for op, got in rows.items():
        assert set(got.values()) == {"ok"} and len(got) >= 3, (op, got)


def test_bench_gmm_checks_every_provider(tmp_path):
    rows = run("bench_gmm.py", tmp_path, "--op", "all", "--shape", "3x2x5x7",
               "--providers", "fastdiff-cpu*,fastdiff-torch*,eager-torch*")
    assert sorted(rows) == ["gmm_noise_element_k8", "gmm_score_k16"]
    assert sum(list(got.values()).count("ok") for got in rows.values()) >= 7, rows


def test_bench_seed_method_steps_check_their_rows(tmp_path):
    rows = run("bench_ddm_iadb.py", tmp_path, "--shape", "1x4x8x8", "--providers", f"fastdiff-{NATIVE}*,eager-torch*")
    rows.update(run("bench_mixture.py", tmp_path, "--shapes", "1x4x8x8",
                    "--providers", f"fastdiff-{NATIVE}*,fastdiff (scheduler*,eager-torch*"))
    assert {"ddm_step", "iadb_step", "mixddpm_noising", "ddim_gmm_step"} <= set(rows), sorted(rows)
    for op, got in rows.items():
        assert got[f"fastdiff-{NATIVE}"] == got["eager-torch"] == "ok", (op, got)
    for op in ("ddm_step", "mixddpm_noising", "ddim_gmm_step"):  # the steps drawing their noise, checked on it
        assert rows[op]["eager-torch (own noise)"] == "ok", (op, rows[op])
    assert rows["mixddpm_noising"]["fastdiff (scheduler, add_seeded_noise)"] == "ok"
    assert rows["ddim_gmm_step"][f"fastdiff-{NATIVE} (seeds)"] == rows["ddm_step"][f"fastdiff-{NATIVE} (seeds)"] == "ok"


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine .ci/gpu runs for real")
def test_gpu_check_says_it_needs_a_gpu(tmp_path):
    """.ci/gpu (the lent GPU machine's check) stops at once, saying why, where there is no CUDA device."""
    env = {"PATH": "/usr/bin:/bin", "PYTHON": sys.executable, "OUT": str(tmp_path), "HOME": str(tmp_path)}
    done = subprocess.run(["bash", str(ROOT / ".ci" / "gpu"), "test"], capture_output=True, text=True, timeout=120,
                          cwd=tmp_path, env=env)
    assert done.returncode == 2 and "no CUDA device here" in done.stderr, done.stdout + done.stderr
