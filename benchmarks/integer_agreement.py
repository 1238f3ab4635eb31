"""How far the integer model is from the simulation, and where the difference comes from.

    python benchmarks/integer_agreement.py                      # the 24 cases of the logits test
    python benchmarks/integer_agreement.py --cases swin_tiny-minmax-random --points

The networks, weights and images of tests/quant/integer/test_integer_models.py (reduced random
networks, 32 images). For each case it prints:

- ``ratio``: ``||integer - simulated|| / ||simulated - float||`` of the logits (the bar is 5%);
- ``--points``: per quantization point, the fraction of codes where the integer operation, fed the
  simulation's codes of its inputs, differs from the simulation's codes (the local mismatch rate),
  and the largest difference;
- ``--sensitivity``: the noise floor: the *simulation's* logits ratio when 1 or 4 random codes of
  its first qkv point move by one step (what a single rounding-boundary difference costs);
- ``--simulation-lis-sum`` (experiment): the integer Log-Int-Softmax sums its exponentials as the
  simulation does (float32, rounded) instead of exactly (pure path: the fused kernel is off);
- ``--attribute``: the logits ratio of *hybrid* runs: the simulation with only one kind of
  operation (``qkv``, ``score``, ``context``, ...) replaced by the integer one (fed the hybrid's
  own codes), everything else simulated. A kind whose hybrid ratio is near the full ratio carries
  the difference; ``all`` replaces every kind (it reproduces the integer model's ratio).
"""

from __future__ import annotations

import argparse
import importlib.util
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fqvit_pl.quant import disable_quantization, enable_quantization, to_integer
from fqvit_pl.quant.integer import kernels
from fqvit_pl.quant.integer.layers import IntegerAttention
from fqvit_pl.quant.integer.models import _residual


def _test_cases():
    """tests/quant/integer/test_integer_models.py, whose networks, weights and images this measures."""
    path = Path(__file__).resolve().parents[1] / "tests/quant/integer/test_integer_models.py"
    spec = importlib.util.spec_from_file_location("integer_model_cases", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_CASES = _test_cases()
ARCHS = _CASES.ARCHS
randomize, images, calibrated = _CASES._randomize, _CASES._images, _CASES._calibrated
METHODS = ("minmax", "ema", "percentile", "omse")

#: the kind of operation that produces each point (by the simulation's point name suffix)
KINDS = {
    "patch_embed.proj_quant": "embed",
    "patch_embed.norm_quant": "ln",
    "norm1_quant": "ln",
    "norm2_quant": "ln",
    "attn.qkv_quant": "qkv",
    "attn.score_quant": "score",
    "attn.bias_quant": "bias",
    "attn.context_quant": "context",
    "attn.proj_quant": "proj",
    "res1_quant": "residual",
    "res2_quant": "residual",
    "mlp.act_quant": "fc1_gelu",
    "mlp.fc2_quant": "fc2",
    "downsample.norm_quant": "ln",
    "downsample.reduction_quant": "merge_reduction",
    "pre_head_quant": "ln",
    "norm_quant": "ln",
    "head.pool_quant": "pool",
    "logits_quant": "head",
    "head.logits_quant": "head",
}
ALL_KINDS = sorted(set(KINDS.values()))
#: the integer GEMM backend (``--backend``; None: the converter's default)
BACKEND: str | None = None


def kind_of(name: str) -> str | None:
    for suffix, kind in KINDS.items():
        if name == suffix or name.endswith("." + suffix):
            return kind
    return None


def int_point_name(name: str) -> str:
    """The integer model's point for a simulation point name."""
    special = {
        "patch_embed.proj_quant": "proj_point",
        "patch_embed.norm_quant": "patch_norm_point",
        "input_quant": "input_point",
        "head.pool_quant": "pool_point",
        "head.logits_quant": "logits_point",
    }
    if name in special:
        return special[name]
    return (
        name.replace("_quant", "_point")
        .replace("attn.context_point", "attn.context_point")
        .replace("mlp.fc2_point", "mlp.fc2_point")
    )


class Replayer:
    """Forward hooks on the simulation's points: record each point's value, compute the integer
    operation that produces it from the recorded codes of its inputs, count mismatching codes and,
    for the kinds in ``replace``, hand the integer result on instead of the simulated one."""

    def __init__(self, sim: nn.Module, integer: nn.Module, replace: set[str]) -> None:
        self.sim, self.integer, self.replace = sim, integer, replace
        self.swin = hasattr(integer, "layers")
        self.seen: dict[str, Tensor] = {}
        #: the float images of the forward (ViT's patch embedding reads them)
        self.images: Tensor | None = None
        self.hooks_pre = sim.register_forward_pre_hook(
            lambda module, args: setattr(self, "images", args[0])
        )
        self.in_name: str | None = None  # the point that produced the current block's input
        self.block_in: dict[str, str] = {}
        self.mismatch: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0, 0.0])
        self.hooks = [
            module.register_forward_hook(self._hook(name))
            for name, module in sim.named_modules()
            if name.endswith("_quant") and not name.endswith("weight_quant")
        ]

    def remove(self) -> None:
        for hook in self.hooks:
            hook.remove()
        self.hooks_pre.remove()

    def point(self, name: str) -> nn.Module:
        return self.integer.get_submodule(int_point_name(name))

    def codes(self, name: str) -> Tensor:
        return self.point(name).quantize(self.seen[name])

    def _hook(self, name: str) -> Callable:
        def hook(module: nn.Module, inputs: tuple, output: Tensor) -> Tensor | None:
            kind = kind_of(name)
            new = None
            if kind is not None:
                got = self.compute(name, kind, output)
                if got is not None:
                    point = self.point(name)
                    if kind == "head":  # logits: compare values
                        ref, mine = output, got
                        new = got
                    else:
                        ref = point.quantize(output).to(torch.int64)
                        mine = got.to(torch.int64)
                        new = point.dequantize(got.to(torch.uint8))
                    diff = (mine - ref).abs()
                    stats = self.mismatch[name]
                    stats[0] += float((diff > 0).sum())
                    stats[1] += diff.numel()
                    stats[2] = max(stats[2], float(diff.max()))
                    if kind not in self.replace:
                        new = None
            value = output if new is None else new
            self.seen[name] = value
            if name.endswith(("res2_quant", "reduction_quant", "embed_quant")) or name in (
                "patch_embed.norm_quant",
            ):
                self.in_name = name
            return new

        return hook

    def _block(self, name: str) -> tuple[str, nn.Module]:
        for part in (".attn.", ".mlp."):
            if part in name:
                prefix = name.split(part)[0]
                break
        else:
            prefix = name.rsplit(".", 1)[0]
        return prefix, self.integer.get_submodule(prefix)

    def compute(self, name: str, kind: str, output: Tensor) -> Tensor | None:
        integer = self.integer
        if name == "input_quant" or (name == "patch_embed.proj_quant" and self.images is None):
            return None
        if kind == "embed":
            if getattr(integer, "input_point", None) is None:  # ViT: float pixels, float GEMM
                proj = integer.patch_proj
                weight = proj.weight.to(torch.float32) * proj.weight_scale[:, None]
                value = F.linear(
                    kernels.patches(self.images, integer.patch_size), weight, proj.bias
                )
                return integer.proj_point.quantize(value)
            codes = kernels.patches(self.codes("input_quant"), integer.patch_size)
            out = integer.patch_proj.codes_out(codes, integer.input_point, integer.proj_point)
            return out
        if kind in ("pool", "head") or name in ("norm_quant", "pre_head_quant"):
            return self._head(name, kind)
        if kind == "ln" and name == "patch_embed.norm_quant":
            return integer.patch_norm(
                self.codes("patch_embed.proj_quant"), integer.proj_point, integer.patch_norm_point
            )
        if name.endswith("downsample.norm_quant") or kind == "merge_reduction":
            return self._merge(name, kind)
        prefix, block = self._block(name)
        if name.endswith("norm1_quant"):
            self.block_in[prefix] = self.in_name
        in_name = self.block_in[prefix]
        in_pt = self.point(in_name)
        attn, mlp = block.attn, block.mlp
        p = prefix + "."
        if name.endswith("norm1_quant"):
            return block.norm1(self.codes(in_name), in_pt, block.norm1_point)
        if kind == "qkv":
            h = self.codes(p + "norm1_quant")
            if self.swin:
                h = block.windows(h)
            return attn.qkv.codes_out(h, block.norm1_point, attn.qkv_point)
        if kind == "score":
            acc = attn.accumulator(self.codes(p + "attn.qkv_quant"))
            pt = attn.score_point
            return kernels.quantize(
                acc.mul_(attn.score_step()), pt.scale, pt.zero_point, pt.bit_type
            )
        if kind == "bias":
            value = attn.score_point.dequantize(self.codes(p + "attn.score_quant"))
            return attn.bias_point.quantize(value + attn.relative_bias())
        if kind == "context":
            lis_name = p + ("attn.bias_quant" if self.swin else "attn.score_quant")
            mask = getattr(block, "attn_mask", None)
            context = attn.context(
                self.codes(lis_name).to(torch.float32), self.codes(p + "attn.qkv_quant"), mask
            )
            return attn.context_point.quantize(context)
        if kind == "proj":
            return attn.proj.codes_out(
                self.codes(p + "attn.context_quant"), attn.context_point, attn.proj_point
            )
        if name.endswith("res1_quant"):
            branch = self.codes(p + "attn.proj_quant")
            if self.swin:
                branch = block.unwindows(branch, self.seen[in_name].shape[0])
            return _residual(self.codes(in_name), in_pt, branch, attn.proj_point, block.res1_point)
        if name.endswith("norm2_quant"):
            return block.norm2(self.codes(p + "res1_quant"), block.res1_point, block.norm2_point)
        if kind == "fc1_gelu":
            hidden = mlp.fc1(self.codes(p + "norm2_quant"), block.norm2_point)
            return mlp.act_point.quantize(F.gelu(hidden))
        if kind == "fc2":
            return mlp.fc2.codes_out(self.codes(p + "mlp.act_quant"), mlp.act_point, mlp.fc2_point)
        if name.endswith("res2_quant"):
            return _residual(
                self.codes(p + "res1_quant"), block.res1_point,
                self.codes(p + "mlp.fc2_quant"), mlp.fc2_point, block.res2_point,
            )  # fmt: skip
        raise KeyError(name)

    def _merge(self, name: str, kind: str) -> Tensor:
        stage = name.split(".downsample.")[0]
        merge = self.integer.get_submodule(stage + ".downsample")
        if kind == "ln":
            x = self.codes(self.in_name)
            batch, _, dim = x.shape
            height, width = merge.resolution
            x = kernels.pad_codes(
                x.view(batch, height, width, dim), (0, 0, 0, width % 2, 0, height % 2),
                self.point(self.in_name).py_zero_point,
            )  # fmt: skip
            rows, cols = merge.output_resolution
            x = (
                x.reshape(batch, rows, 2, cols, 2, dim)
                .permute(0, 1, 3, 4, 2, 5)
                .reshape(batch, rows * cols, 4 * dim)
            )
            return merge.norm(x, self.point(self.in_name), merge.norm_point)
        x = self.codes(stage + ".downsample.norm_quant")
        return merge.reduction_point.quantize(merge.reduction(x, merge.norm_point))

    def _head(self, name: str, kind: str) -> Tensor:
        integer = self.integer
        if name in ("norm_quant", "pre_head_quant"):
            x = self.codes(self.in_name)
            out_pt = self.point(name)
            if name == "pre_head_quant":
                x = x[:, :1]
                return integer.norm(x, self.point(self.in_name), out_pt)[:, 0]
            return integer.norm(x, self.point(self.in_name), out_pt)
        if kind == "pool":
            x = integer.norm_point.dequantize(self.codes("norm_quant"))
            return integer.pool_point.quantize(x.mean(dim=1))
        before = "head.pool_quant" if self.swin else "pre_head_quant"
        pt = self.point(before)
        return integer.logits_point.fake_quantize(integer.head(self.codes(before), pt))


def simulation_sum_lis(
    score_codes: Tensor,
    exp_table: Tensor,
    out_table: Tensor,
    mask: Tensor | None = None,
    **_: object,
) -> Tensor:
    """The integer Log-Int-Softmax with the simulation's float32 row sum (experiment).

    :func:`kernels.log_int_softmax_codes` sums the exponentials exactly; the simulation sums
    them in float32 (ATen's ``sum``, values up to ~2e12, so the sum rounds) and divides in float32,
    and ``round(S / e)`` then lands on the other side of a half-integer now and then, which flips a
    4-bit probability. Here: the same ATen ``sum`` and ``div`` on the same float32 exponentials.
    Only for the ``[65537]`` table (the converter's default)."""
    shape = score_codes.shape
    c = score_codes if score_codes.is_floating_point() else score_codes.to(torch.int32)
    if mask is not None:
        c = c.masked_fill(mask, -512)
    index = c + c.amax(dim=-1, keepdim=True).mul_(256)
    if mask is not None:
        index = index.masked_fill_(mask.expand(shape), kernels.MASKED_2D)
    flat = index.reshape(-1).to(torch.int32)
    e = torch.index_select(exp_table, 0, flat).view(shape).to(torch.float32)
    y = torch.div(e.sum(dim=-1, keepdim=True), e).round_().to(torch.float64)
    key = y.view(torch.int64).bitwise_right_shift_(51)
    return torch.index_select(out_table, 0, key.view(-1)).view(shape)


@torch.no_grad()
def sensitivity(model: nn.Module, integer: nn.Module, x: Tensor, full: Tensor, moved: int) -> str:
    """The noise floor: the simulation's logits when ``moved`` random codes of the first qkv point
    move by one step (median and max ratio over 5 seeds)."""
    swin = hasattr(integer, "layers")
    name = "layers.0.blocks.0.attn.qkv_quant" if swin else "blocks.0.attn.qkv_quant"
    point = integer.get_submodule(int_point_name(name))
    simulated = model(x)
    ratios = []
    for seed in range(5):
        g = torch.Generator().manual_seed(seed)

        def hook(module: nn.Module, inputs: tuple, output: Tensor) -> Tensor:
            codes = point.quantize(output).to(torch.int64).reshape(-1)
            where = torch.randperm(codes.numel(), generator=g)[:moved]
            step = torch.randint(0, 2, (moved,), generator=g) * 2 - 1
            codes[where] = (codes[where] + step).clamp(0, point.bit_type.upper)
            return point.dequantize(codes.view(output.shape).to(torch.uint8))

        handle = model.get_submodule(name).register_forward_hook(hook)
        ratios.append(ratio(model(x), simulated, full))
        handle.remove()
    ratios.sort()
    return f"median {100 * ratios[2]:.1f}%, max {100 * ratios[-1]:.1f}%"


def ratio(a: Tensor, b: Tensor, full: Tensor) -> float:
    return float((a - b).norm() / (b - full).norm())


@torch.no_grad()
def run_case(
    name: str,
    method: str,
    outliers: bool,
    points: bool = False,
    attribute: bool = False,
    noise: bool = False,
    simulation_sum: bool = False,
) -> float:
    model = calibrated(name, method, outliers)
    x = images(32, ARCHS[name]["img_size"], 100)
    simulated = model(x)
    integer = to_integer(model)
    if BACKEND is not None:
        integer.set_backend(BACKEND)
    if simulation_sum:
        for module in integer.modules():
            if isinstance(module, IntegerAttention):
                module.native_lis = False  # the fused kernel sums exactly
    int_logits = integer(x)
    disable_quantization(model)
    full = model(x)
    enable_quantization(model)
    case = f"{name}-{method}-{'outliers' if outliers else 'random'}"
    r = ratio(int_logits, simulated, full)
    # the logits are a point's values: they differ by whole steps of its scale
    step = integer.logits_point.scale.reshape(-1)[0]
    moved = integer.logits_point.quantize(int_logits) != integer.logits_point.quantize(simulated)
    codes, rows = int(moved.sum()), int(moved.any(dim=1).sum())
    unit = float(step / (simulated - full).norm())
    print(
        f"{case:34s} ratio {100 * r:6.2f}%  ({codes} of {simulated.numel()} logit codes differ,"
        f" in {rows} of {len(x)} images; one logit step = {100 * unit:.2f}%)",
        flush=True,
    )
    if points:
        replay = Replayer(model, integer, set())
        model(x)
        replay.remove()
        by_kind: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
        for point, (bad, total, worst) in replay.mismatch.items():
            by_kind[kind_of(point)][0] += bad
            by_kind[kind_of(point)][1] += total
            if bad:
                print(
                    f"    {point:40s} {bad / total:9.2e} ({int(bad)}/{int(total)}, max {worst:g})"
                )
        summary = ", ".join(f"{k} {b / t:.1e}" for k, (b, t) in sorted(by_kind.items()))
        print(f"    local mismatch by kind: {summary}")
    if attribute:
        results = []
        for kinds in [{k} for k in ALL_KINDS] + [set(ALL_KINDS)]:
            replay = Replayer(model, integer, kinds)
            hybrid = model(x)
            replay.remove()
            label = "all" if len(kinds) > 1 else next(iter(kinds))
            results.append(f"{label} {100 * ratio(hybrid, simulated, full):.1f}%")
        print("    hybrid ratio (one kind integer): " + ", ".join(results))
    if noise:
        floor = ", ".join(
            f"{k} code{'s' if k > 1 else ''}: {sensitivity(model, integer, x, full, k)}"
            for k in (1, 4)
        )
        print(f"    simulation with first-qkv codes moved by one step: {floor}")
    return r


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", nargs="*", help="name-method-random|outliers (default: all 24)")
    parser.add_argument("--points", action="store_true", help="local mismatch rate per point")
    parser.add_argument("--attribute", action="store_true", help="hybrid runs per kind of op")
    parser.add_argument(
        "--sensitivity", action="store_true", help="the simulation with 1 or 4 qkv codes moved"
    )
    parser.add_argument(
        "--simulation-lis-sum",
        action="store_true",
        help="experiment: the integer Log-Int-Softmax with the simulation's float32 row sum",
    )
    parser.add_argument(
        "--backend", choices=("onednn", "int_mm"), help="integer GEMM backend (default: onednn)"
    )
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    global BACKEND
    BACKEND = args.backend
    torch.set_num_threads(args.threads)
    if args.simulation_lis_sum:
        kernels.log_int_softmax_codes = simulation_sum_lis
    cases = [(n, m, o) for n in ARCHS for m in METHODS for o in (False, True)]
    if args.cases:
        wanted = set(args.cases)
        cases = [c for c in cases if f"{c[0]}-{c[1]}-{'outliers' if c[2] else 'random'}" in wanted]
    above = 0
    for case in cases:
        above += (
            run_case(*case, args.points, args.attribute, args.sensitivity, args.simulation_lis_sum)
            > 0.05
        )
    print(f"{above} of {len(cases)} cases above the 5% bar")


if __name__ == "__main__":
    main()
