"""The one benchmark harness (bench/README.md): scripts only build inputs, this times and reports.

A ``bench_<op>.py`` script only builds inputs: for each ``Provider`` a setup function returns a
``Bench`` (a zero-arg callable to time, returning the tensor to check, and the bytes it must move) or
raises ``Skip(reason)`` (an ``ImportError`` counts as a skip too). ``run`` checks every output against
the script's expected tensor *before* timing (a wrong kernel is not timed), then times all providers in
interleaved rounds (so that a noisy machine's drift hits every row alike; CPU: repeated ``perf_counter``;
CUDA: ``triton.testing.do_bench``, else CUDA events; medians), measures the machine's copy bandwidth in
the same run, prints an aligned table and appends JSON lines to ``<out>/<device-slug>-<op>.jsonl``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import fnmatch
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}  # max|out-ref| / max|ref|
RESULTS = Path(__file__).resolve().parent / "results"


class Skip(Exception):
    """Raised by a provider's setup when it cannot run here; the message is the reason."""


@dataclass
class Bench:
    """What a provider's setup returns: ``fn()`` is timed and returns the tensor to check (or None)."""

    fn: Callable[[], Any]
    nbytes: int                             # bytes one step must move (reads + writes), for GB/s
    expected: torch.Tensor | None = None    # overrides the script's expected output (other coordinates)
    compile_s: float | None = None          # first call (compilation) time, reported apart
    note: str = ""
    steps: int = 1                          # steps per fn() call (a whole trajectory): times are per step
    tol: float | None = None                # max rel err allowed (default: TOL of the dtype, for one step)
    baseline: str | tuple[str, ...] | None = None  # the row this one's speed-up is against (several: the
                                                   # fastest of them; default: the run's)


@dataclass
class Provider:
    name: str
    setup: Callable[[], Bench]


def add_args(p: argparse.ArgumentParser, shape: Sequence[int]) -> argparse.ArgumentParser:
    """The flags every script takes."""
    p.add_argument("--shape", default="x".join(map(str, shape)), help="e.g. 16x4x256x256 (default %(default)s)")
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    p.add_argument("--device", default="cpu", help="cpu or cuda[:i] (default %(default)s)")
    p.add_argument("--providers", default="*", help="comma-separated names or globs (default: all)")
    p.add_argument("--repeats", type=int, default=50, help="timed samples per provider (default %(default)s)")
    p.add_argument("--quick", action="store_true", help="few repeats, small copy-bandwidth probe (smoke run)")
    p.add_argument("--baseline", default="diffusers", help="row the speed-up is against (default %(default)s)")
    p.add_argument("--out", default=str(RESULTS), help="results folder (default bench/results)")
    return p


def parse_shape(s: str) -> tuple[int, ...]:
    return tuple(int(v) for v in re.split(r"[x,\s]+", s.strip()) if v)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def samples(fn: Callable[[], Any], device: torch.device, repeats: int) -> list[float]:
    """``repeats`` per-call times in ms after warm-up (CPU: a sample is ``inner`` back-to-back calls lasting
    >= 1 ms, the timer's resolution; CUDA: do_bench picks its own count)."""
    if device.type == "cuda":
        try:
            from triton.testing import do_bench  # flushes L2 between calls: memory-bound ops see DRAM
            return list(do_bench(fn, warmup=25, rep=max(20, 2 * repeats), return_mode="all"))
        except ImportError:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            for _ in range(5):
                fn()
            ts = []
            for _ in range(repeats):
                start.record()
                fn()
                end.record()
                end.synchronize()
                ts.append(start.elapsed_time(end))
            return ts
    fn()
    t0 = time.perf_counter()
    fn()
    inner = max(1, int(1e-3 / max(time.perf_counter() - t0, 1e-9)))
    ts, warm = [], max(2, repeats // 5)
    for i in range(warm + repeats):  # the first `warm` samples are warm-up
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        if i >= warm:
            ts.append((time.perf_counter() - t0) * 1e3 / inner)
    return ts


def summary(ts: list[float]) -> dict[str, float]:
    """median, quartiles and min of per-call times (ms)."""
    q = statistics.quantiles(ts, n=4) if len(ts) > 1 else [ts[0]] * 3
    return {"median_ms": statistics.median(ts), "q25_ms": q[0], "q75_ms": q[2], "min_ms": min(ts), "n": len(ts)}


def measure(fn: Callable[[], Any], device: torch.device, repeats: int) -> dict[str, float]:
    """``summary`` of ``samples``: one provider timed alone."""
    return summary(samples(fn, device, repeats))


def copy_bandwidth(device: torch.device, quick: bool) -> float:
    """GB/s of ``dst.copy_(src)`` on a buffer larger than the caches: (read + write bytes) / median time."""
    nbytes = (64 if quick else 512) << 20 if device.type == "cpu" else (256 if quick else 1024) << 20
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    ms = measure(lambda: dst.copy_(src), device, 5 if quick else 20)["median_ms"]
    return 2 * nbytes / (ms * 1e-3) / 1e9


def compile_fn(fn: Callable[..., Any], args: Sequence[Any], device: torch.device) -> tuple[Callable[..., Any], float]:
    """``torch.compile`` (inductor, default mode) of `fn`, called once on `args`: (compiled, seconds)."""
    try:
        cfn = torch.compile(fn)
        t0 = time.perf_counter()
        cfn(*args)
        _sync(device)
        return cfn, time.perf_counter() - t0
    except Exception as exc:  # no C++ compiler, unsupported op, ...: a skipped row, not a crash
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise Skip(f"torch.compile failed: {first[:160]}") from None


def compile_bench(fn: Callable[..., Any], args: Sequence[Any], nbytes: int, device: torch.device) -> Bench:
    """``fn(*args)`` under ``compile_fn``; the first call's time is compile_s."""
    cfn, compile_s = compile_fn(fn, args, device)
    return Bench(lambda: cfn(*args), nbytes, compile_s=compile_s)


DRAWING = ("eager-torch (own noise)", "torch.compile (own noise)", "torch.randn + torch.compile")
DRAWING_BASELINE = DRAWING[1:]  # a fused step drawing its noise is put against the faster of these


def drawing_bench(fn: Callable[..., Any], args: Sequence[Any], noise_at: int, nbytes: int, device: torch.device,
                  way: str, returns_noise: bool = False) -> Bench:
    """``fn`` drawing its own standard normals (``torch.randn_like(args[0])``, passed as argument `noise_at`):
    a stochastic step as its user writes it, the rows to put a fused op drawing its noise in the kernel
    against. `way` (``DRAWING``): all eager; all under ``compile_fn`` (the draw too: inductor's own RNG); or
    the draw eager and the step compiled. `returns_noise`: ``(fn(...), noise)``, as a training step needs its
    target. The output cannot be compared element by element with another draw's, so it is checked here:
    a variant that also returns its noise must equal `fn` in float64 on that noise."""
    if way not in DRAWING:
        raise ValueError(f"way: expected one of {DRAWING}, got {way!r}")

    def drawing(step):  # (the step with its noise drawn before it, returning the noise too; the timed call)
        def draw(*a):
            z = torch.randn_like(a[0])
            return step(*a[:noise_at], z, *a[noise_at:]), z

        def timed(*a):
            return draw(*a) if returns_noise else draw(*a)[0]
        return draw, timed

    compile_s = None
    if way == DRAWING[0]:
        checked, run = drawing(fn)
    elif way == DRAWING[1]:  # the draw inside the compiled function
        draw, timed = drawing(fn)
        checked = compile_fn(draw, args, device)[0]
        run, compile_s = compile_fn(timed, args, device)
    else:  # the draw eager, the step compiled
        step, compile_s = compile_fn(fn, (*args[:noise_at], torch.randn_like(args[0]), *args[noise_at:]), device)
        checked, run = drawing(step)
    out, z = checked(*args)
    wide = [v.double() if torch.is_tensor(v) and v.is_floating_point() else v for v in args]
    ref = fn(*wide[:noise_at], z.double(), *wide[noise_at:])
    out, ref = (out[0], ref[0]) if isinstance(out, tuple) else (out, ref)
    err = _rel_err(out, ref)
    if not err <= TOL[out.dtype]:
        raise Skip(f"WRONG: max rel err {err:.2e} on the noise it drew, not timed")
    where = {DRAWING[0]: "inside (torch RNG)", DRAWING[1]: "inside (inductor RNG)",
             DRAWING[2]: "by torch.randn_like, then the compiled step"}[way]
    return Bench(lambda: (run(*args), None)[1], nbytes, compile_s=compile_s,
                 note=f"noise drawn {where}, checked on it: max rel err {err:.1e}")


def _git() -> dict[str, Any]:
    def git(*a: str) -> str:
        return subprocess.run(["git", *a], cwd=Path(__file__).parent, capture_output=True, text=True).stdout.strip()
    return {"commit": git("rev-parse", "--short", "HEAD") or None, "dirty": bool(git("status", "--porcelain"))}


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(mod: str) -> str | None:
    try:
        return __import__(mod).__version__
    except Exception:
        return None


def header(op: str, device: torch.device, argv: Sequence[str]) -> dict[str, Any]:
    """The run record: device, cores, load average (other work skews CPU timings), versions, git commit,
    date, command line."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"kind": "header", "run": dt.datetime.now().astimezone().isoformat(timespec="seconds"), "op": op,
            "device": _device_name(device), "device_type": device.type, "cores": cores, "loadavg": os.getloadavg(),
            "torch_threads": torch.get_num_threads(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            "versions": {"python": platform.python_version(), **{m: _version(m) for m in
                         ("torch", "triton", "diffusers", "k_diffusion", "fastdiff")}},
            "git": _git(), "argv": list(argv)}


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    if out.shape != ref.shape:
        return float("inf")
    return float((out - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


def _fmt(v: Any, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def table(rows: list[dict[str, Any]], baseline: str) -> str:
    """The rows as an aligned text table."""
    cols = ["op", "shape", "dtype", "provider", "median", "IQR", "min", "GB/s", "% copy",
            f"x vs {baseline}", "max rel err", "compile s", "note"]
    body = [[r["op"], "x".join(map(str, r["shape"])), r["dtype"], r["provider"], _time(r.get("median_ms")),
             "-" if r.get("q25_ms") is None else f"{_time(r['q25_ms'])}-{_time(r['q75_ms'])}", _time(r.get("min_ms")),
             _fmt(r.get("gbps"), ".3g"), _fmt(r.get("copy_pct"), ".0f"), _fmt(r.get("speedup"), ".2f"),
             _fmt(r.get("max_rel_err"), ".1e"), _fmt(r.get("compile_s"), ".1f"), r.get("note", "")] for r in rows]
    w = [max(len(c), *(len(b[i]) for b in body)) for i, c in enumerate(cols)]

    def line(vals):
        return "  ".join(v.ljust(w[i]) if i in (0, 3, 12) else v.rjust(w[i]) for i, v in enumerate(vals))

    return "\n".join(s.rstrip() for s in [line(cols), line(["-" * x for x in w]), *map(line, body)])


def _time(ms: float | None) -> str:
    """A time in ms as '12.3 us' or '4.56 ms'."""
    if ms is None:
        return "-"
    return f"{ms * 1e3:.3g} us" if ms < 1 else f"{ms:.4g} ms"


def run(op: str, args: argparse.Namespace, providers: Sequence[Provider], expected: torch.Tensor | None,
        argv: Sequence[str] | None = None) -> int:
    """Check, time and report every selected provider. Returns 1 if any output was wrong, else 0."""
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    repeats = min(args.repeats, 10) if args.quick else args.repeats
    pats = [p.strip() for p in args.providers.split(",") if p.strip()]
    chosen = [p for p in providers if any(fnmatch.fnmatchcase(p.name, pat) for pat in pats)]
    if not chosen:
        raise SystemExit(f"--providers {args.providers!r} matches none of {[p.name for p in providers]}")
    head = header(op, device, sys.argv if argv is None else argv)
    head["copy_gbps"] = copy_bw = copy_bandwidth(device, args.quick)
    print(f"# {op} on {head['device']} ({head['cores']} cores, torch threads {head['torch_threads']}, "
          f"load {head['loadavg'][0]:.2f}), "
          f"git {head['git']['commit']}{' dirty' if head['git']['dirty'] else ''}, copy bandwidth {copy_bw:.3g} GB/s")
    rows, benches, failed = [], {}, False
    for p in chosen:  # set up and check every provider first: a wrong one is not timed
        row: dict[str, Any] = {"kind": "row", "run": head["run"], "op": op, "shape": list(parse_shape(args.shape)),
                               "dtype": args.dtype, "device": str(device), "provider": p.name}
        try:
            b = p.setup()
            out = b.fn()
            _sync(device)
            ref = b.expected if b.expected is not None else expected
            if out is not None and ref is not None:
                row["max_rel_err"] = err = _rel_err(out, ref)
                tol = TOL[dtype] if b.tol is None else b.tol
                if not err <= tol:
                    raise Skip(f"WRONG: max rel err {err:.2e} > {tol:.0e}, not timed")
            benches[p.name] = b
        except (Skip, ImportError) as exc:  # ImportError: an optional dependency is missing
            failed |= str(exc).startswith("WRONG")
            row.update(status="wrong" if str(exc).startswith("WRONG") else "skipped", note=str(exc))
            print(f"  {p.name}: {row['status']} ({row['note'][:100]})", file=sys.stderr)
        rows.append(row)
    rounds = 1 if args.quick else 5  # interleaved: drift of a noisy machine hits every provider alike
    times: dict[str, list[float]] = {name: [] for name in benches}
    for _ in range(rounds):
        for name, b in benches.items():
            times[name] += [t / b.steps for t in samples(b.fn, device, max(2, repeats // rounds))]
    for row in rows:
        b = benches.get(row["provider"])
        if b is None:
            continue
        row.update(summary(times[row["provider"]]), nbytes=b.nbytes, steps=b.steps, compile_s=b.compile_s,
                   note=b.note, status="ok")
        row["gbps"] = b.nbytes / (row["median_ms"] * 1e-3) / 1e9
        row["copy_pct"] = 100 * row["gbps"] / copy_bw
        print(f"  {row['provider']}: {_time(row['median_ms'])}", file=sys.stderr)
    ok = {r["provider"]: r for r in rows if r["status"] == "ok"}
    for r in rows:
        name = (benches[r["provider"]].baseline or args.baseline) if r["status"] == "ok" else None
        if isinstance(name, tuple):  # the fastest of several ways to do the same work
            name = min((n for n in name if n in ok), key=lambda n: ok[n]["median_ms"], default=None)
        if name in ok:
            r["speedup"], r["baseline"] = ok[name]["median_ms"] / r["median_ms"], name
            if name != args.baseline:
                r["note"] = "; ".join(v for v in (r["note"], f"x vs {name}") if v)
    print(table(rows, args.baseline))
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    slug = re.sub(r"[^a-z0-9]+", "-", head["device"].lower()).strip("-") or device.type
    path = out_dir / f"{slug}-{op}.jsonl"
    with path.open("a") as f:  # append: every run adds a header and its rows (same "run" stamp)
        for rec in (head, *rows):
            f.write(json.dumps(rec) + "\n")
    print(f"# appended {len(rows)} rows to {path}")
    return int(failed)
