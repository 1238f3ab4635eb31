"""Speed and memory of fully quantized fqvit_pl models, side by side with the float model.

For each model, in one process: images/s of the float model (timm's own model and ours with
quantization off) and of the quantized model for each calibration method (ptf + lis on), eager and
with ``torch.compile``; the calibration time of each method on the same batches; and the peak memory
of each phase. Float and quantized runs alternate within every repetition, so that load on the
machine affects them alike; every figure is the median over the repetitions. Ratios (quantized ÷
float) are the headline.

Weights are random (timm's initialization) and images random normal: speed does not depend on the
values. A calibrated model of this script is therefore no accurate model.

    python benchmarks/quant_speed.py                        # deit_tiny + swin_tiny, CPU (6-8 min, 2 cores)
    python benchmarks/quant_speed.py --quick                # smoke run, no compile (~2 min)
    python benchmarks/quant_speed.py --device cuda --models deit_base swin_base --batch-size 64

Memory on CPU is the growth of the resident set of a separate process during each phase (Linux
``VmHWM``, reset before the phase, minus ``VmRSS`` before it; the model is loaded first); on CUDA it
is ``torch.cuda.max_memory_allocated`` above the allocation before the phase.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fqvit_pl.models import create_model  # noqa: E402
from fqvit_pl.quant import calibrate  # noqa: E402

FLOAT_TIMM = "float (timm)"
FLOAT_OURS = "float (fqvit, quant off)"
PTF_OFF = "minmax, ptf off"


# ----------------------------------------------------------------------------------------------
# arguments


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument(
        "--models", nargs="+", default=None, help="short model names (default: deit_tiny swin_tiny)"
    )
    parser.add_argument(
        "--methods",
        nargs="+",
        default=["minmax", "ema", "percentile", "omse"],
        help="calibration methods (ptf + lis on)",
    )
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument(
        "--img-size", type=int, default=None, help="input resolution (default: the model's, 224)"
    )
    parser.add_argument(
        "--reps",
        type=int,
        default=5,
        help="repetitions of every throughput figure (median reported)",
    )
    parser.add_argument(
        "--iters", type=int, default=1, help="forward passes timed together in one repetition"
    )
    parser.add_argument(
        "--calib-batches",
        type=int,
        default=10,
        help="calibration batches, the same for every method (the published protocol uses 10)",
    )
    parser.add_argument(
        "--calib-reps",
        type=int,
        default=2,
        help="repetitions of every calibration time (median reported)",
    )
    parser.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also time torch.compile'd models",
    )
    parser.add_argument(
        "--freezing",
        action="store_true",
        help="also time torch.compile with inductor's freezing (weights and calibration folded into "
        "the graph as constants, for inference; every method compiled on its own)",
    )
    parser.add_argument(
        "--compile-fqvit-float",
        action="store_true",
        help="also compile our float model (by default only timm's float model is compiled as the reference)",
    )
    parser.add_argument(
        "--memory",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="measure peak memory per phase",
    )
    parser.add_argument(
        "--ptf-reference",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also time calibration with minmax and ptf off (what the PTF search costs)",
    )
    parser.add_argument(
        "--device", default=None, choices=["cpu", "cuda"], help="default: cuda if available"
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's default)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: batch 4, 2 reps, 2 calibration batches, 1 calibration rep, no compile",
    )
    parser.add_argument("--json", default=None, help="also write the raw results to this file")
    parser.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.models is None:
        args.models = ["deit_tiny", "swin_tiny"]
    if args.quick:
        args.batch_size, args.reps, args.calib_batches, args.calib_reps, args.compile = (
            4,
            2,
            2,
            1,
            False,
        )
    return args


# ----------------------------------------------------------------------------------------------
# models and data


def model_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return {"img_size": args.img_size} if args.img_size else {}


def build_models(name: str, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Float models (timm's and ours) and one quantized model per method, all with the same random weights."""
    torch.manual_seed(args.seed)
    ours = create_model(name, model_kwargs=model_kwargs(args))
    weights = dict(ours.named_parameters())
    models: dict[str, torch.nn.Module] = {}
    timm_model = make_timm_model(ours, args)
    if timm_model is not None:
        models[FLOAT_TIMM] = timm_model
    models[FLOAT_OURS] = ours
    for method in args.methods:
        models[method] = with_weights(
            create_model(name, method=method, ptf=True, lis=True, model_kwargs=model_kwargs(args)),
            weights,
        )
    if args.ptf_reference:
        models[PTF_OFF] = with_weights(
            create_model(
                name, method="minmax", ptf=False, lis=True, model_kwargs=model_kwargs(args)
            ),
            weights,
        )
    for m in models.values():
        m.to(device).eval()
    return models


def with_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> torch.nn.Module:
    """Copy the float parameters (the quantization buffers keep their fresh, uncalibrated values)."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(weights[name])
    return model


def make_timm_model(ours: torch.nn.Module, args: argparse.Namespace) -> torch.nn.Module | None:
    """timm's float model of the same architecture, carrying our random weights (None if timm cannot build it)."""
    try:
        import timm

        kwargs = model_kwargs(args)
        reference = timm.create_model(
            ours.pretrained_cfg["architecture"],
            pretrained=False,
            num_classes=ours.num_classes,
            **kwargs,
        )
        wanted = reference.state_dict()
        reference.load_state_dict(
            {k: v for k, v in ours.state_dict().items() if k in wanted}, strict=True
        )
        return reference.eval()
    except Exception as err:  # an architecture timm builds differently: report ours only
        print(f"note: timm float model unavailable for {ours.model_name}: {err}", file=sys.stderr)
        return None


def make_data(
    name: str, args: argparse.Namespace, device: torch.device
) -> tuple[list[torch.Tensor], torch.Tensor]:
    size = args.img_size or 224
    gen = torch.Generator().manual_seed(args.seed + 1)
    shape = (args.batch_size, 3, size, size)
    batches = [torch.randn(shape, generator=gen).to(device) for _ in range(args.calib_batches)]
    return batches, torch.randn(shape, generator=gen).to(device)


# ----------------------------------------------------------------------------------------------
# timing


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def time_calibration(
    models: dict, batches: list[torch.Tensor], args: argparse.Namespace, device: torch.device
) -> dict[str, list[float]]:
    """Seconds to calibrate each quantized model on the same batches; methods alternate within each repetition."""
    names = [n for n in models if n not in (FLOAT_TIMM, FLOAT_OURS)]
    seconds: dict[str, list[float]] = {n: [] for n in names}
    for rep in range(args.calib_reps):
        for name in names:
            seconds[name].append(timed(lambda: calibrate(models[name], batches), device))
        print(
            f"  calibration rep {rep + 1}/{args.calib_reps}: "
            + ", ".join(f"{n} {seconds[n][-1]:.2f}s" for n in names),
            file=sys.stderr,
        )
    return seconds


def time_throughput(
    runners: dict[str, Callable[[], Any]],
    args: argparse.Namespace,
    device: torch.device,
    label: str,
    prepare: dict[str, Callable[[], Any]] | None = None,
) -> dict[str, list[float]]:
    """Images/s of each runner; the runners alternate within each repetition.

    ``prepare[name]``, when given, runs untimed before each of that runner's timings.
    """
    prepare = prepare or {}
    rates: dict[str, list[float]] = {n: [] for n in runners}
    with torch.inference_mode():
        for name, run in runners.items():  # warm-up (weight caches, allocator, lazy init)
            prepare.get(name, lambda: None)()
            run()
        for rep in range(args.reps):
            for name, run in runners.items():
                prepare.get(name, lambda: None)()
                t = timed(lambda: [run() for _ in range(args.iters)], device)
                rates[name].append(args.batch_size * args.iters / t)
            print(
                f"  {label} rep {rep + 1}/{args.reps}: "
                + ", ".join(f"{n} {rates[n][-1]:.1f}/s" for n in runners),
                file=sys.stderr,
            )
    return rates


def with_host_labels(host: torch.nn.Module, state: dict) -> dict:
    """``state`` (another method's calibration) with ``host``'s point-configuration labels.

    The methods' models differ only in buffer values, so the benchmark evaluates them all through
    one compiled graph; the calibration-configuration guard would (rightly, for users) refuse to
    load one method's calibration into a model built for another, so the labels are the host's.
    """
    own = host.state_dict()
    return {k: own[k] if k.endswith("point_config") else v for k, v in state.items()}


def compile_runners(
    models: dict,
    x: torch.Tensor,
    args: argparse.Namespace,
    device: torch.device,
    eager_out: dict,
    states: dict[str, dict] | None,
) -> tuple[dict, dict, dict]:
    """``torch.compile`` each float model and the quantized models.

    With ``states`` (each method's calibration), the quantized models share one compiled graph, as
    they differ only in buffer values: the first method's compiled module is evaluated with each
    method's calibration loaded into it (``load_state_dict`` copies the buffers in place, untimed: no
    recompilation), which leaves it holding the last one's. Without (inductor's freezing folds the
    buffers into the graph), every method is compiled on its own. Returns the runners, their untimed
    preparations and per-name notes (compile seconds, comparison with the eager output).
    """
    runners: dict[str, Callable[[], Any]] = {}
    prepare: dict[str, Callable[[], Any]] = {}
    notes: dict[str, dict[str, Any]] = {}
    quant_names = [n for n in args.methods if n in models]
    host = compiled_quant = None
    floats = [n for n in (FLOAT_TIMM, FLOAT_OURS) if n in models]
    if not args.compile_fqvit_float and len(floats) > 1:
        floats = floats[:1]
    for name in floats + quant_names:
        try:
            if name in quant_names and compiled_quant is not None and states is not None:
                compile_s = 0.0
                prepare[name] = lambda host=host, state=states[name]: host.load_state_dict(
                    with_host_labels(host, state)
                )
                runner = lambda compiled=compiled_quant: compiled(x)  # noqa: E731
            else:
                compiled = torch.compile(models[name])
                runner = lambda compiled=compiled: compiled(x)  # noqa: E731
                if name in quant_names and states is not None:
                    host, compiled_quant = models[name], compiled
                    prepare[name] = lambda host=host, state=states[name]: host.load_state_dict(
                        with_host_labels(host, state)
                    )
                with torch.inference_mode():
                    prepare.get(name, lambda: None)()
                    compile_s = timed(runner, device)
            with torch.inference_mode():
                prepare.get(name, lambda: None)()
                out = runner()
            runners[name] = runner
            notes[name] = {"compile_s": compile_s, **compare(out, eager_out[name])}
        except Exception as err:  # compile is best effort: report why
            notes[name] = {"error": f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"}
            print(f"  torch.compile failed for {name}: {notes[name]['error']}", file=sys.stderr)
    return runners, prepare, notes


def compare(out: torch.Tensor, ref: torch.Tensor) -> dict[str, Any]:
    out, ref = out.float().cpu(), ref.float().cpu()
    return {
        "equal": bool(torch.equal(out, ref)),
        "max_abs_diff": float((out - ref).abs().max()),
        "frac_diff": float((out != ref).float().mean()),
        "top1_agree": float((out.argmax(-1) == ref.argmax(-1)).float().mean()),
    }


# ----------------------------------------------------------------------------------------------
# memory


def _rss_kib() -> tuple[int, int]:
    """``(VmRSS, VmHWM)`` of this process in KiB."""
    values = {}
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(("VmRSS:", "VmHWM:")):
                values[line.split(":")[0]] = int(line.split()[1])
    return values["VmRSS"], values["VmHWM"]


def _release_memory() -> None:
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def cpu_phase_peak(fn: Callable[[], Any]) -> float:
    """Peak resident-set growth (MiB) while ``fn`` runs: VmHWM reset before, minus VmRSS before."""
    _release_memory()
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
    before, _ = _rss_kib()
    fn()
    _, peak = _rss_kib()
    return (peak - before) / 1024


def cuda_phase_peak(fn: Callable[[], Any], device: torch.device) -> float:
    gc.collect()
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


def memory_phases(
    name: str, args: argparse.Namespace, device: torch.device, states: dict[str, dict]
) -> dict[str, float]:
    """Peak memory of: one forward (after a warm-up one) of each float and calibrated model, the size
    of the quantized weights each calibrated model caches, and the calibration of each method."""
    models = build_models(name, args, device)
    batches, x = make_data(name, args, device)
    for n, state in states.items():
        models[n].load_state_dict(state)  # calibrated
    peak = (lambda fn: cuda_phase_peak(fn, device)) if device.type == "cuda" else cpu_phase_peak
    results: dict[str, float] = {}
    with torch.inference_mode():
        for n in models:
            models[n](x)  # warm-up: one-time allocations, and the quantized models' weight caches
            results[f"forward, {n}"] = peak(lambda: models[n](x))
            cached = sum(
                m._weight_cache[2].numel() * m._weight_cache[2].element_size()
                for m in models[n].modules()
                if getattr(m, "_weight_cache", None) is not None
            )
            if cached:
                results[f"cached quantized weights held, {n} (tensor bytes)"] = cached / 2**20
    for n in [m for m in models if m not in (FLOAT_TIMM, FLOAT_OURS)]:
        fresh = create_model(
            name,
            method="minmax" if n == PTF_OFF else n,
            ptf=n != PTF_OFF,
            lis=True,
            model_kwargs=model_kwargs(args),
        )
        with_weights(fresh, dict(models[FLOAT_OURS].named_parameters())).to(device).eval()
        results[f"calibration, {n}"] = peak(lambda: calibrate(fresh, batches))  # noqa: F821 (deleted after the call)
        del fresh
    return results


def memory_in_child(
    name: str, args: argparse.Namespace, states: dict[str, dict]
) -> dict[str, float]:
    """Run :func:`memory_phases` in a fresh process (its resident set is not inflated by this one's)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "states.pt")
        torch.save(states, path)
        spec = {"name": name, "states": path, "argv": _child_argv(args)}
        cmd = [sys.executable, os.path.abspath(__file__), "--memory-child", json.dumps(spec)]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            print(
                f"  memory measurement failed for {name}:\n{proc.stderr[-2000:]}", file=sys.stderr
            )
            return {}
        return json.loads(proc.stdout.strip().splitlines()[-1])


def _child_argv(args: argparse.Namespace) -> list[str]:
    argv = [
        "--models",
        *args.models,
        "--methods",
        *args.methods,
        "--batch-size",
        str(args.batch_size),
        "--calib-batches",
        str(args.calib_batches),
        "--device",
        args.device,
        "--seed",
        str(args.seed),
    ]
    if args.img_size:
        argv += ["--img-size", str(args.img_size)]
    if args.threads:
        argv += ["--threads", str(args.threads)]
    if not args.ptf_reference:
        argv.append("--no-ptf-reference")
    return argv


def run_memory_child(spec_json: str) -> None:
    spec = json.loads(spec_json)
    args = parse_args(spec["argv"])
    if args.threads:
        torch.set_num_threads(args.threads)
    states = torch.load(spec["states"], weights_only=True)
    print(json.dumps(memory_phases(spec["name"], args, torch.device(args.device), states)))


# ----------------------------------------------------------------------------------------------
# report


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def paired_ratio(quantized: list[float], reference: list[float]) -> float:
    """Median over repetitions of quantized ÷ reference throughput, each pair timed back to back
    (load that comes and goes hits both runs of a pair, so the ratio is steadier than the medians')."""
    return median([q / r for q, r in zip(quantized, reference)])


def spread(values: list[float]) -> str:
    return f"{min(values):.3g}–{max(values):.3g}" if values else ""


def benchmark_model(name: str, args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    print(f"[{name}] building models", file=sys.stderr)
    models = build_models(name, args, device)
    batches, x = make_data(name, args, device)
    result: dict[str, Any] = {"model": name}

    print(f"[{name}] calibration", file=sys.stderr)
    result["calibration_s"] = time_calibration(models, batches, args, device)
    quant = {n: m for n, m in models.items() if n in args.methods}

    with torch.inference_mode():
        eager_out = {n: m(x) for n, m in models.items()}
    runners = {n: (lambda m=m: m(x)) for n, m in models.items() if n != PTF_OFF}
    print(f"[{name}] eager throughput", file=sys.stderr)
    result["eager_img_s"] = time_throughput(runners, args, device, "eager")

    if args.compile:
        print(f"[{name}] torch.compile", file=sys.stderr)
        own_states = {
            n: {k: v.clone() for k, v in m.state_dict().items()} for n, m in quant.items()
        }
        compiled, prepare, notes = compile_runners(models, x, args, device, eager_out, own_states)
        result["compile_notes"] = notes
        if compiled:
            result["compiled_img_s"] = time_throughput(compiled, args, device, "compiled", prepare)
        for (
            n,
            state,
        ) in own_states.items():  # the shared graph's module holds the last method's calibration
            quant[n].load_state_dict(state)
    if args.freezing:
        print(f"[{name}] torch.compile with freezing", file=sys.stderr)
        import torch._inductor.config as inductor_config

        torch._dynamo.reset()
        with inductor_config.patch(freezing=True):
            compiled, prepare, notes = compile_runners(
                models, x, args, device, eager_out, states=None
            )
        result["frozen_notes"] = notes
        if compiled:
            result["frozen_img_s"] = time_throughput(
                compiled, args, device, "compiled, freezing", prepare
            )

    if args.memory:
        print(f"[{name}] memory", file=sys.stderr)
        states = {n: m.state_dict() for n, m in models.items() if n in quant or n == PTF_OFF}
        if device.type == "cuda":
            result["memory_mib"] = memory_phases(name, args, device, states)
        elif sys.platform.startswith("linux"):
            result["memory_mib"] = memory_in_child(name, args, states)
    del models, quant
    return result


def float_reference(rates: dict[str, list[float]]) -> str | None:
    return FLOAT_TIMM if FLOAT_TIMM in rates else (FLOAT_OURS if FLOAT_OURS in rates else None)


def throughput_table(results: list[dict], args: argparse.Namespace) -> str:
    lines = [
        "| model | mode | float, timm (img/s) | float, fqvit (img/s) | "
        + " | ".join(f"{m} (img/s)" for m in args.methods)
        + " | quantized ÷ float (timm) | quantized ÷ float (fqvit) |",
        "|---|---|---:|---:|" + "---:|" * len(args.methods) + "---:|---:|",
    ]
    for res in results:
        for mode, key in (
            ("eager", "eager_img_s"),
            ("torch.compile", "compiled_img_s"),
            ("torch.compile, freezing", "frozen_img_s"),
        ):
            rates = res.get(key)
            if not rates:
                continue
            med = {n: median(v) for n, v in rates.items()}
            cells = [
                f"{med[n]:.1f}" if n in med else "—"
                for n in (FLOAT_TIMM, FLOAT_OURS, *args.methods)
            ]
            ratios = []
            for ref in (FLOAT_TIMM, FLOAT_OURS):
                qs = [
                    paired_ratio(rates[m], rates[ref])
                    for m in args.methods
                    if m in rates and ref in rates
                ]
                ratios.append(f"{min(qs):.2f}–{max(qs):.2f}" if qs else "—")
            lines.append(
                f"| {res['model']} | {mode} | "
                + " | ".join(cells)
                + " | "
                + " | ".join(f"**{r}**" for r in ratios)
                + " |"
            )
    return "\n".join(lines)


def calibration_table(results: list[dict], args: argparse.Namespace) -> str:
    lines = [
        "| model | method | calibration (s) | range over reps (s) | ÷ minmax (ptf on) |",
        "|---|---|---:|---:|---:|",
    ]
    for res in results:
        seconds = res["calibration_s"]
        base = median(seconds["minmax"]) if "minmax" in seconds else None
        for name, values in seconds.items():
            label = f"{name}, ptf on" if name in args.methods else name
            ratio = f"**{median(values) / base:.2f}**" if base else "—"
            lines.append(
                f"| {res['model']} | {label} | {median(values):.2f} | {spread(values)} | {ratio} |"
            )
    return "\n".join(lines)


def memory_table(results: list[dict]) -> str:
    rows = [
        (res["model"], phase, mib)
        for res in results
        for phase, mib in res.get("memory_mib", {}).items()
    ]
    if not rows:
        return ""
    lines = ["| model | phase | MiB |", "|---|---|---:|"]
    lines += [f"| {model} | {phase} | {mib:.0f} |" for model, phase, mib in rows]
    return "\n".join(lines)


def compile_notes(results: list[dict]) -> str:
    lines = []
    for res in results:
        for key, label in (("compile_notes", ""), ("frozen_notes", " (freezing)")):
            for name, note in res.get(key, {}).items():
                if "error" in note:
                    lines.append(
                        f"- {res['model']}, {name}{label}: torch.compile failed ({note['error']})"
                    )
                    continue
                same = (
                    "bit-identical to eager"
                    if note["equal"]
                    else (
                        f"differs from eager in {note['frac_diff']:.1%} of logits (max |Δ| {note['max_abs_diff']:.3g}, "
                        f"top-1 agreement {note['top1_agree']:.0%})"
                    )
                )
                compile_s = (
                    f"compiled in {note['compile_s']:.0f}s"
                    if note["compile_s"]
                    else "reuses the compiled graph above"
                )
                lines.append(f"- {res['model']}, {name}{label}: {compile_s}; output {same}")
    return "\n".join(lines)


def environment(args: argparse.Namespace) -> str:
    device = torch.device(args.device)
    if device.type == "cuda":
        hw = torch.cuda.get_device_name(device)
    else:
        hw = platform.processor() or platform.machine()
        with contextlib.suppress(OSError):
            with open("/proc/cpuinfo") as info:
                names = [
                    line.split(":", 1)[1].strip() for line in info if line.startswith("model name")
                ]
            hw = f"{names[0]} ({len(names)} logical CPUs)" if names else hw
    threads = torch.get_num_threads() if device.type == "cpu" else "-"
    size = args.img_size or 224
    return (
        f"device: {device.type}, {hw}; torch {torch.__version__}, threads {threads}; batch {args.batch_size} × 3 × {size} × {size}; "
        f"throughput: median of {args.reps} reps × {args.iters} forward(s); calibration: {args.calib_batches} batches, "
        f"median of {args.calib_reps} reps; random-init weights and random normal images (speed does not depend on the values); "
        f"load average {args.load_before} before, {tuple(round(v, 2) for v in os.getloadavg())} after"
    )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.memory_child:
        run_memory_child(args.memory_child)
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory and args.device == "cpu" and not os.path.exists("/proc/self/clear_refs"):
        print(
            "note: no /proc/self/clear_refs (not Linux): skipping the memory phases",
            file=sys.stderr,
        )
        args.memory = False
    started = time.perf_counter()
    args.load_before = tuple(round(v, 2) for v in os.getloadavg())
    results = [benchmark_model(name, args) for name in args.models]
    report = [
        "### Throughput (images/s, median over reps; ptf + lis on; quantized ÷ float: median over reps of the back-to-back ratio, slowest–fastest method)",
        "",
        throughput_table(results, args),
        "",
        compile_notes(results),
        "",
        f"### Calibration time ({args.calib_batches} batches of {args.batch_size})",
        "",
        calibration_table(results, args),
    ]
    mem = memory_table(results)
    if mem:
        label = (
            "torch.cuda.max_memory_allocated above the allocation before the phase"
            if args.device == "cuda"
            else "growth of the resident set of a separate process during the phase: VmHWM after − VmRSS before; models built and warmed up by one forward"
        )
        report += ["", f"### Peak memory ({label})", "", mem]
    report += [
        "",
        environment(args),
        f"total benchmark time {time.perf_counter() - started:.0f}s",
        "",
    ]
    print("\n".join(report))
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"args": vars(args), "results": results}, out, indent=1)


if __name__ == "__main__":
    main()
