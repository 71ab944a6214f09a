"""benchmarks/bench_cuda_ops.py: its pure helpers (no GPU needed), its CPU dry
run (every section's code path with tiny shapes), its clean exit without a
GPU, and, where there is one, a --quick run on the GPU."""
import importlib.util
import itertools
import json
import math
import os
import subprocess
import sys

import pytest
import torch

import dnateq

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "bench_cuda_ops.py")

_spec = importlib.util.spec_from_file_location("bench_cuda_ops", SCRIPT)
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)

MiB = 1 << 20


def _env(**extra):
    env = dict(os.environ)
    py = os.path.join(ROOT, "python")
    env["PYTHONPATH"] = py + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.update(extra)
    return env


# --- pure helpers -------------------------------------------------------------

def test_slug_and_default_path():
    assert bench.slugify("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    assert bench.slugify("NVIDIA A100-SXM4-80GB") == "nvidia-a100-sxm4-80gb"
    assert bench.slugify("  H200 (NVL) ") == "h200-nvl"
    assert bench.slugify("") == "unknown-device"
    p = bench.default_json_path("NVIDIA H100 80GB HBM3")
    assert p.endswith(os.path.join("benchmarks", "results", "cuda_ops.nvidia-h100-80gb-hbm3.json"))
    assert bench.default_json_path("NVIDIA H100 80GB HBM3", quick=True).endswith(
        "cuda_ops.nvidia-h100-80gb-hbm3.quick.json")


@pytest.mark.parametrize("name, bw", [
    ("NVIDIA H100 80GB HBM3", 3.35e12),
    ("NVIDIA H100 PCIe", 2.0e12),
    ("NVIDIA H100 NVL", 3.9e12),
    ("NVIDIA H200", 4.8e12),
    ("NVIDIA A100-SXM4-80GB", 2.0e12),
    ("NVIDIA A100 80GB PCIe", 2.0e12),
    ("NVIDIA A100-SXM4-40GB", 1.555e12),
    ("NVIDIA L40S", 0.864e12),
    ("NVIDIA L4", 0.3e12),
    ("NVIDIA GH200 480GB", None),   # not an H200: not guessed
    ("Tesla T4", None),
])
def test_peak_bw_table(name, bw):
    assert bench.peak_bw_from_table(name) == bw


def test_peak_bw_from_properties():
    # H100 SXM5: HBM3 at 2619 MHz on a 5120-bit bus -> 3.35 TB/s.
    assert bench.peak_bw_from_properties(2_619_000, 5120) == pytest.approx(3.352e12, rel=1e-3)
    assert bench.peak_bw_from_properties(1_593_000, 5120) == pytest.approx(2.04e12, rel=1e-2)
    assert bench.peak_bw_from_properties(0, 5120) is None
    assert bench.peak_bw_from_properties(None, None) is None
    assert bench.peak_bw_from_properties(1, 8) is None        # implausible -> ignored


def test_resolve_peak_bw_precedence():
    name = "NVIDIA H100 80GB HBM3"
    v, src, d = bench.resolve_peak_bw(3.0e12, name, 2_619_000, 5120)
    assert (v, src) == (3.0e12, "--peak-bw")
    assert d["table"] == 3.35e12 and d["properties"] == pytest.approx(3.352e12, rel=1e-3)
    v, src, _ = bench.resolve_peak_bw(None, name, 2_619_000, 5120)
    assert v == pytest.approx(3.352e12, rel=1e-3) and src.startswith("device properties")
    v, src, _ = bench.resolve_peak_bw(None, name, 0, 0)      # properties unusable
    assert v == 3.35e12 and src.startswith("spec table")
    v, src, _ = bench.resolve_peak_bw(None, "Mystery GPU")
    assert v is None and "--peak-bw" in src
    with pytest.raises(ValueError):
        bench.resolve_peak_bw(-1.0, name)


@pytest.mark.parametrize("bits", range(2, 8))
@pytest.mark.parametrize("signed", [True, False])
def test_packed_bytes_match_exp_pack(bits, signed):
    g = torch.Generator().manual_seed(bits)
    N = 3
    for K in (1, 31, 32, 33, 1000, 8192):
        x = torch.randn(N, K, generator=g)
        if not signed:
            x = x.abs()
        codes = dnateq.exp_quantize(x, 1.5, 0.5, 0.0, bits)
        wp = dnateq.exp_pack(codes, bits, signed)
        assert wp.shape[1] == bench.packed_row_bytes(K, bits, signed)
        assert bench.gemv_bytes(1, K, N, bits, signed, 2, 2) == wp.numel() + 2 * K + 2 * N
        assert bench.gemv_bytes(4, K, N, bits, signed, 4, 2) == wp.numel() + 16 * K + 8 * N


def test_gemv_bytes_target_shape():
    # n = 3 signed -> 4 stored bits: 8192 x 8192 weights are 32 MiB.
    assert bench.packed_row_bytes(8192, 3, True) == 4096
    assert bench.gemv_bytes(1, 8192, 8192, 3) == 32 * MiB + 2 * 8192 + 2 * 8192
    assert bench.gemv_bytes(1, 8192, 8192, 5) == 48 * MiB + 4 * 8192
    assert bench.dense_gemv_bytes(1, 8192, 8192, 2) == 128 * MiB + 4 * 8192
    assert bench.quantize_bytes(1 << 26, 4) == 5 * (1 << 26)
    assert bench.quantize_bytes(1 << 26, 2) == 3 * (1 << 26)


def test_rotation_sets():
    l2 = 50 * MiB
    assert bench.rotation_sets(32 * MiB, l2) == 5          # 160 MiB >= 150 MiB
    assert bench.rotation_sets(128 * MiB, l2) == 2
    assert bench.rotation_sets(1 << 30, l2) == 1
    assert bench.rotation_sets(1, l2) == 32                # capped
    assert bench.rotation_sets(32 * MiB, 0) == 1
    assert bench.rotation_sets(0, l2) == 1


def _brute_updates(a, w, use_terms):
    """Counter updates by the definition, one (row, weight row, input) at a time."""
    M, K = a.shape
    N = w.shape[0]
    a = a.tolist()
    w = w.tolist()
    total = pairs_total = 0
    for m in range(M):
        nz = [(c & 0x7F) != 0 for c in a[m]]
        neg = any(((c & 0xFF) & 0x80) and n for c, n in zip(a[m], nz))
        zeros = nz.count(False)
        terms = use_terms and not neg and zeros < K - zeros
        pairs = sum(1 for n, k in itertools.product(range(N), range(K))
                    if nz[k] and (w[n][k] & 0x7F) != 0)
        pairs_total += pairs
        total += 2 * pairs + zeros * N if terms else 3 * pairs
    return pairs_total, total


def test_count_updates_definition():
    g = torch.Generator().manual_seed(7)
    M, K, N = 6, 40, 5
    x = torch.relu(torch.randn(M, K, generator=g) + 0.3)
    x[1] = torch.relu(torch.randn(K, generator=g) - 1.0)   # mostly zeros: counts directly
    x[2, 3] = -0.7                                          # a negative code: counts directly
    w = torch.randn(N, K, generator=g)
    w[:, ::7] = 0                                           # some zero weights
    a = dnateq.exp_quantize(x, 1.7, 0.1, 0.0, 4)
    wc = dnateq.exp_quantize(w, 1.7, 0.1, 0.0, 4)
    for use_terms in (False, True):
        info = bench.count_updates(a, wc, use_terms)
        pairs, updates = _brute_updates(a, wc, use_terms)
        assert info["pairs"] == pairs and info["updates"] == updates
        assert info["rows"] == M
    assert bench.count_updates(a, wc, False)["updates"] == 3 * pairs
    assert bench.count_updates(a, wc, True)["rows_with_terms"] == M - 2
    # When every row takes the terms, this is bench_cpu_ops.py's formula.
    keep = [0, 3, 4, 5]
    info = bench.count_updates(a[keep], wc, True)
    zeros = int((a[keep] == 0).sum())
    assert info["updates"] == 2 * info["pairs"] + zeros * N


def test_evaluate_targets():
    names = [t[0] for t in bench.TARGETS]
    assert "gemv_speedup_vs_cublas_fp16" in names
    figs = {"gemv_speedup_vs_cublas_fp16": 3.0, "gemv_speedup_vs_cublas_fp16_graph": 2.0,
            "lut_gemm_vs_cublas_fp16": 0.5, "gemv_bw_pct_peak_n3": 70.0}
    res = {t["name"]: t for t in bench.evaluate_targets(figs)}
    assert set(res) == set(names)
    g = res["gemv_speedup_vs_cublas_fp16"]
    assert (g["value"], g["met"], g["value_graph"], g["met_graph"]) == (3.0, True, 2.0, False)
    assert g["threshold"] == 2.5
    assert res["lut_gemm_vs_cublas_fp16"]["met"] is False
    assert res["gemv_bw_pct_peak_n3"]["met"] is True          # >= is inclusive
    assert res["count_linear_updates_per_s"]["met"] is None   # not measured
    assert res["count_linear_updates_per_s"]["threshold"] == 5e11
    assert all(t.get("note") == "x" for t in bench.evaluate_targets({}, "x"))


def test_clean_json():
    out = bench._clean({"a": float("nan"), "b": (1, float("inf")), "c": {"d": True}})
    assert out == {"a": None, "b": [1, None], "c": {"d": True}}
    json.dumps(out, allow_nan=False)


def test_parse_args():
    a = bench.parse_args(["--quick"])
    assert a.quick and a.sections == list(bench.SECTIONS) and a.repeat <= 3
    assert bench.parse_args(["--sections", "gemv, count"]).sections == ["gemv", "count"]
    with pytest.raises(SystemExit):
        bench.parse_args(["--sections", "gemv,nope"])


# --- the script itself, without a GPU ------------------------------------------

def test_cpu_dry_run(tmp_path, capsys):
    """Every section runs (on the CPU, tiny shapes) and the JSON has every
    figure the targets name."""
    path = tmp_path / "dry.json"
    rc = bench.main(["--cpu-dry-run", "--peak-bw", "1e11", "--no-graph", "--json", str(path)])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "gemv_speedup_vs_cublas_fp16" in out
    d = json.loads(path.read_text())
    assert set(d) >= {"meta", "figures", "targets", "peers", "checks", "rows", "errors"}
    assert d["errors"] == {}
    m = d["meta"]
    for k in ("device", "compute_capability", "torch", "cuda", "driver", "dnateq", "date",
              "peak_bw_Bps", "peak_bw_source", "measured_copy_bw_Bps"):
        assert k in m
    assert m["peak_bw_Bps"] == 1e11 and m["peak_bw_source"] == "--peak-bw"
    figs = d["figures"]
    for t in d["targets"]:
        assert isinstance(figs.get(t["figure"]), float), t["figure"]
        assert t["met"] in (True, False)
    for k in ("gemv_speedup_vs_cublas_fp16", "gemv_bw_pct_copy_n3", "cublas_fp16_gemv_ms",
              "gemv_ms_n3_kernel", "copy_bw_kernel_Bps", "gemv_speedup_vs_cublas_fp16_kernel",
              "lut_gemm_vs_fp32_matmul", "lut_gemm_split_public_ms_fp16",
              "gemv_fused_vs_split_speedup_n3", "count_linear_pairs_per_s_n4",
              "exp_quantize_fp32_nocheck_pct_peak", "copy_bw_Bps", "read_bw_Bps"):
        assert k in figs, k
    # Correctness checks of the benched ops all passed.
    assert all(v is not False for v in d["checks"].values()), d["checks"]
    # Optional peers: recorded as a status, never an error.
    for name in ("bitsandbytes_nf4", "torchao_int4_weight_only"):
        st = d["peers"][name]["status"]
        assert st == "ok" or st.startswith("unavailable: ")


class _Range:
    def __init__(self, us):
        self.us = us

    def elapsed_us(self):
        return self.us


class _Ev:
    def __init__(self, kind, us, parent=None):
        self.device_type = type("D", (), {"name": kind.upper()})()
        self.time_range = _Range(us)
        self.cpu_parent = parent


def test_kernel_seconds():
    evs = [_Ev("cuda", 10.0), _Ev("cuda", 5.0), _Ev("cpu", 100.0), _Ev("cpu", 7.0, parent=1)]
    assert bench.kernel_seconds(evs, 3) == pytest.approx(5e-6)       # (10 + 5) us / 3
    assert bench.kernel_seconds(evs, 1, "cpu") == pytest.approx(100e-6)  # nested one skipped
    assert bench.kernel_seconds([_Ev("cpu", 1.0)], 2) is None        # no device activity
    assert bench.kernel_seconds(evs, 0) is None


def test_merge_results():
    a = dict(meta=dict(device="X", argv=["--sections", "bandwidth,gemv"], sections=["bandwidth", "gemv"],
                       shapes={"gemv": 1}, measured_copy_bw_Bps=2.0),
             figures={"copy_bw_Bps": 2.0, "gemv_bw_pct_copy_n3": 75.0, "gemv_ms_n3": 1.0},
             checks={"a": True}, rows=[{"op": "r1"}], errors={}, peers={}, targets=[])
    b = dict(meta=dict(device="X", argv=["--sections", "bandwidth,gemm"], sections=["bandwidth", "gemm"],
                       shapes={"gemm": 2}, measured_copy_bw_Bps=3.0),
             figures={"copy_bw_Bps": 3.0, "lut_gemm_vs_cublas_fp16": 0.5, "gemv_ms_n3": 9.0},
             checks={"b": False}, rows=[{"op": "r2"}], errors={"gemm": "boom"}, peers={"p": {}},
             targets=[])
    m = bench.merge_results([a, b])
    f = m["figures"]
    assert f["copy_bw_Bps"] == 2.0 and f["copy_bw_Bps_run2"] == 3.0   # first copy bw kept
    assert f["gemv_ms_n3"] == 9.0                                      # later file wins
    assert m["checks"] == {"a": True, "b": False} and [r["op"] for r in m["rows"]] == ["r1", "r2"]
    assert m["errors"] == {"gemm": "boom"} and m["peers"] == {"p": {}}
    assert m["meta"]["sections"] == ["bandwidth", "gemv", "gemm"]
    assert m["meta"]["shapes"] == {"gemv": 1, "gemm": 2}
    assert m["meta"]["measured_copy_bw_Bps"] == 2.0
    t = {x["name"]: x for x in m["targets"]}
    assert t["gemv_bw_pct_copy_n3"]["met"] is True
    assert t["lut_gemm_vs_cublas_fp16"]["met"] is False
    with pytest.raises(ValueError):
        bench.merge_results([])


def test_cpu_dry_run_two_halves_and_merge(tmp_path, capsys):
    """What scripts/gpu_check.sh does on the GPU: two halves, each with the
    bandwidth section, then --merge; every target is measured in the merge,
    and kernel-time figures are present (CPU profiler plumbing)."""
    p1, p2, pm = tmp_path / "p1.json", tmp_path / "p2.json", tmp_path / "m.json"
    common = ["--cpu-dry-run", "--peak-bw", "1e11", "--no-graph"]
    assert bench.main(common + ["--sections", "bandwidth,quantize,gemv", "--json", str(p1)]) == 0
    assert bench.main(common + ["--sections", "bandwidth,gemm,count,peers", "--json", str(p2)]) == 0
    assert bench.main(["--merge", str(p1), str(p2), "--json", str(pm)]) == 0
    out = capsys.readouterr().out
    assert "merged 2 files" in out
    d = json.loads(pm.read_text())
    for t in d["targets"]:
        assert t["met"] in (True, False), t["name"]
        assert "value_kernel" in t
    figs = d["figures"]
    for k in ("gemv_ms_n3_kernel", "gemv_bw_pct_copy_n3_kernel", "copy_bw_kernel_Bps",
              "gemv_speedup_vs_cublas_fp16_kernel", "lut_gemm_vs_cublas_fp16_kernel",
              "cublas_fp16_gemv_ms_kernel", "copy_bw_Bps_run2"):
        assert isinstance(figs.get(k), float) and figs[k] > 0, k
    assert d["meta"]["sections"] == ["bandwidth", "quantize", "gemv", "gemm", "count", "peers"]


def test_exits_2_without_cuda(tmp_path):
    """No GPU visible: a one-line reason and exit status 2, no traceback, no JSON."""
    path = tmp_path / "x.json"
    r = subprocess.run([sys.executable, SCRIPT, "--quick", "--json", str(path)],
                       capture_output=True, text=True, timeout=120, cwd=ROOT,
                       env=_env(CUDA_VISIBLE_DEVICES=""))
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "no CUDA device:" in r.stderr
    assert "Traceback" not in r.stderr
    assert not path.exists()


# --- on a GPU ------------------------------------------------------------------

def _cuda_kernels_present():
    if not torch.cuda.is_available():
        return False
    try:
        dnateq.exp_quantize(torch.ones(1, device="cuda"), 2.0, 1.0, 0.0, 3)
        return True
    except (RuntimeError, NotImplementedError):
        return False


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="no CUDA GPU on this machine: the CUDA benchmark runs only on a GPU")
@pytest.mark.skipif(torch.cuda.is_available() and not _cuda_kernels_present(),
                    reason="dnateq was built without CUDA kernels (DNATEQ_CUDA=0 or no nvcc)")
def test_quick_run_on_gpu(tmp_path):
    path = tmp_path / "quick.json"
    r = subprocess.run([sys.executable, SCRIPT, "--quick", "--json", str(path)],
                       capture_output=True, text=True, timeout=900, cwd=ROOT, env=_env())
    assert r.returncode == 0, (r.stdout[-4000:], r.stderr[-4000:])
    d = json.loads(path.read_text())
    assert d["errors"] == {}
    assert d["meta"]["device"] == torch.cuda.get_device_name()
    assert d["meta"]["cuda"] == torch.version.cuda
    assert math.isfinite(d["figures"]["gemv_speedup_vs_cublas_fp16"])
    assert d["figures"]["copy_bw_Bps"] > 0
    assert all(v is not False for v in d["checks"].values()), d["checks"]
