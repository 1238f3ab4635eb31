"""``export_onnx``: ONNX Runtime runs the integer model's arithmetic on integer kernels.

The reference is our integer model. Accuracy tests export ``gemm="u8u8"``, exact on every x86
CPU (``u8s8`` is exact only with VNNI: checked against it where the CPU has VNNI). Two facts of
this machine's arithmetic are pinned down so the comparison can be bit for bit: the GEMMs use the exact ``int_mm`` backend (oneDNN's fused
requantization rounds in its own order), and float32 ``sqrt`` is IEEE's correctly rounded one, as in
ONNX Runtime (PyTorch's vectorized float32 ``sqrt`` on AVX-512 CPUs is off by one ulp for ~15% of
inputs, which moves the integer LayerNorm's multiplier in rare tokens).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from export_helpers import ARCHS, calibrated, ieee_sqrt, images, simulated_and_float

from fqvit_pl.quant import to_integer

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from fqvit_pl.export import export_onnx  # noqa: E402


def _session(proto, optimized_path=None):
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    if optimized_path is not None:
        options.optimized_model_filepath = str(optimized_path)
    return ort.InferenceSession(
        proto.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )


def _run(session, x: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(session.run(["logits"], {"images": x.numpy()})[0])


CASES = {
    "deit_tiny": ("deit_tiny", {}),
    "swin_tiny": ("swin_tiny", {}),
    "vit_base": ("vit_base", {}),  # no input point: the patch conv in float
    "deit_tiny-ptf_off": ("deit_tiny", {"ptf": False}),
    "deit_tiny-lis_off": ("deit_tiny", {"lis": False}),
    "deit_tiny-uint6": ("deit_tiny", {"activation": {"bit_type": "uint6"}}),
}


@pytest.mark.parametrize("case", list(CASES))
@torch.no_grad()
def test_onnx_runtime_computes_the_integer_model_bit_for_bit_per_image(case, monkeypatch):
    """Integer ops (GEMMs, LayerNorm, Log-Int-Softmax, requantization) are exact on both sides, so
    an image's logits are equal bit for bit unless a float op of the method (GELU's erf, softmax
    without LIS) rounds differently in the two runtimes' math libraries and moves one code at a
    rounding boundary: rare, and then the image differs by a few code steps."""
    name, kwargs = CASES[case]
    monkeypatch.setattr(torch, "sqrt", ieee_sqrt)
    integer = to_integer(calibrated(name, **kwargs)).set_backend("int_mm")
    session = _session(export_onnx(integer, exact=True, gemm="u8u8"))
    size = ARCHS[name]["img_size"]
    x = images(40, size, 100)
    ort_logits = _run(session, x)
    int_logits = integer(x)
    same = (ort_logits == int_logits).all(dim=1)
    assert same.float().mean() >= 0.95
    assert (ort_logits.argmax(1) == int_logits.argmax(1)).all()
    for batch in (1, 3):  # dynamic batch size: the same per-image results in any batch
        assert torch.equal(_run(session, x[:batch]), ort_logits[:batch])


@pytest.mark.parametrize("name", ["deit_tiny", "swin_tiny"])
@torch.no_grad()
def test_int64_log_int_softmax_path_equals_the_integer_model(name, monkeypatch):
    """Where the row sum may pass 2**53 (large score tables, long rows) both sides divide in int64."""
    monkeypatch.setattr(torch, "sqrt", ieee_sqrt)
    integer = to_integer(calibrated(name)).set_backend("int_mm")
    for module in integer.modules():
        if getattr(module, "lis", False):
            module.exact_float64 = False
    x = images(40, ARCHS[name]["img_size"], 100)
    proto = export_onnx(integer, exact=True, gemm="u8u8")
    to_int64 = [n for n in proto.graph.node if n.op_type == "Cast" and n.attribute[0].i == 7]
    assert len(to_int64) == len(
        [m for m in integer.modules() if getattr(m, "lis", False)]
    )  # every attention layer divides in int64
    ort_logits, int_logits = _run(_session(proto), x), integer(x)
    assert (ort_logits == int_logits).all(dim=1).float().mean() >= 0.95
    assert (ort_logits.argmax(1) == int_logits.argmax(1)).all()


@pytest.mark.parametrize("name", ["deit_tiny", "swin_tiny"])
@torch.no_grad()
def test_onnx_runtime_agrees_with_the_integer_model_within_the_issue_bars(name, monkeypatch):
    """Top-1 agreement >= 99% with the integer model as users run it (default backend, PyTorch's
    sqrt), and logits within 5% of the quantization error of the exactly computed integer model."""
    model = calibrated(name)
    x = images(64, ARCHS[name]["img_size"], 100)
    simulated, full = simulated_and_float(model, x)
    ort_logits = _run(_session(export_onnx(model, exact=True, gemm="u8u8")), x)
    as_run = to_integer(model)(x)
    assert (ort_logits.argmax(1) == as_run.argmax(1)).float().mean() >= 0.99
    monkeypatch.setattr(torch, "sqrt", ieee_sqrt)
    exact = to_integer(model).set_backend("int_mm")(x)
    assert (ort_logits - exact).norm() <= 0.05 * (simulated - full).norm()


@pytest.mark.parametrize("name", ["deit_tiny", "swin_tiny"])
@torch.no_grad()
def test_fast_form_is_the_same_quantized_network_rounded_differently(name):
    """``exact=False`` rounds some steps differently (QuantizeLinear, QGemm's requantization, float
    LayerNorm, LIS from LogSoftmax): a code moved by one propagates, so its distance to the integer
    model is of the order of the quantization error itself (not the exact form's 5%), far below
    the distance of an unrelated network (a wrong graph gives logits of another size altogether)."""
    model = calibrated(name)
    x = images(64, ARCHS[name]["img_size"], 100)
    simulated, full = simulated_and_float(model, x)
    integer = to_integer(model)(x)
    fast = _run(_session(export_onnx(model, exact=False, gemm="u8u8")), x)
    assert (fast - integer).norm() <= 2 * (simulated - full).norm()
    assert (fast.argmax(1) == integer.argmax(1)).float().mean() >= 0.8


def _op_inputs(model):
    types = {}
    for vi in list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output):
        types[vi.name] = vi.type.tensor_type.elem_type
    for init in model.graph.initializer:
        types[init.name] = init.data_type
    return types


INTEGER_GEMMS = {"MatMulInteger", "MatMulIntegerToFloat", "QGemm", "QLinearMatMul"}


@pytest.mark.parametrize("exact", [True, False])
@torch.no_grad()
def test_onnx_runtime_picks_integer_gemm_kernels(exact, tmp_path):
    """Every Linear and q @ k^T stay integer GEMMs in the graph ONNX Runtime optimizes and runs
    (fast form: fused QGemm / QLinearMatMul, no float64 or int64 tensor); the only float MatMul is
    LIS's attn @ V (powers of two times V's values)."""
    model = to_integer(calibrated("deit_tiny"))
    optimized = tmp_path / "optimized.onnx"
    _session(export_onnx(model, exact=exact), optimized)
    graph = onnx.load(str(optimized)).graph
    ops = [node.op_type for node in graph.node]
    depth = ARCHS["deit_tiny"]["depth"]
    linears = 1 + 4 * depth + 1  # patch conv, qkv/proj/fc1/fc2 per block, head
    assert sum(op in INTEGER_GEMMS for op in ops) == linears + depth  # + q @ k^T per block
    if not exact:
        assert ops.count("QGemm") == linears and ops.count("QLinearMatMul") == depth
        wide = {onnx.TensorProto.DOUBLE, onnx.TensorProto.INT64}
        assert not any(n.op_type == "Cast" and n.attribute[0].i in wide for n in graph.node)
    weights = {init.name: init.data_type for init in graph.initializer}
    for node in graph.node:
        if node.op_type == "MatMulInteger":  # the default gemm="u8s8": int8 weights
            assert weights.get(node.input[1], onnx.TensorProto.INT8) == onnx.TensorProto.INT8
    float_matmuls = [op for op in ops if op in ("MatMul", "FusedMatMul", "Gemm")]
    assert len(float_matmuls) == depth  # attn @ V: powers of two times V's integers, exact in fp32
    assert not any(node.domain not in ("", "ai.onnx", "com.microsoft") for node in graph.node)


def test_unknown_gemm_option_is_a_named_error():
    from fqvit_pl.export.onnx_graph import OnnxExportError

    with pytest.raises(OnnxExportError, match="gemm='s8s8'"):
        export_onnx(torch.nn.Identity(), gemm="s8s8")


@pytest.mark.skipif(
    "vnni" not in open("/proc/cpuinfo").read() if __import__("os").path.exists("/proc/cpuinfo")
    else True, reason="uint8 x int8 GEMMs are exact only on CPUs with VNNI",
)  # fmt: skip
@torch.no_grad()
def test_u8s8_gemms_equal_u8u8_gemms_on_vnni_cpus():
    """With VNNI, uint8 x int8 accumulates exactly in int32: the same logits as uint8 x uint8."""
    model = to_integer(calibrated("deit_tiny"))
    x = images(8, ARCHS["deit_tiny"]["img_size"], 3)
    u8s8 = _run(_session(export_onnx(model, exact=True, gemm="u8s8")), x)
    assert torch.equal(u8s8, _run(_session(export_onnx(model, exact=True, gemm="u8u8")), x))


@torch.no_grad()
def test_exported_file_runs_without_custom_ops_and_carries_its_metadata(tmp_path):
    model = calibrated("swin_tiny")
    path = tmp_path / "swin.onnx"
    export_onnx(model, path)
    proto = onnx.load(str(path))
    assert {op.domain for op in proto.opset_import} == {""}
    assert all(node.domain == "" for node in proto.graph.node)
    read = {name for node in proto.graph.node for name in node.input}
    assert {t.name for t in proto.graph.initializer} <= read  # none ONNX Runtime would warn about
    meta = {p.key: p.value for p in proto.metadata_props}
    assert '"family": "swin"' in meta["integer_config"] and "mean" in meta["data_config"]
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = images(2, 64, 0).numpy()
    assert session.run(None, {"images": x})[0].shape == (2, 10)
    assert np.isfinite(session.run(None, {"images": x})[0]).all()
