#!/usr/bin/env python3
"""PyTorch's scaled_dot_product_attention in fp16 as a dense decode-attention peer of bench_cuda.

Same shapes as bench_cuda's default set (Llama-3-8B heads: 32 query heads, 8 KV heads, head_dim
128; 4K and 32K context; batch 1 and 32) and the same method:
  - CUDA events around N operations (N chosen so that one sample lasts >= 2 ms), up to 7 samples
    (at least 3; no more once 1.5 s have been measured), median and minimum per operation;
  - operation i reads replica i % R of K/V, R chosen so that a cycle through the replicas reads at
    least max(512 MiB, 8 x L2) (the L2 cannot hold what the next use needs), under a 40 GB cap;
  - GB/s = dense fp16 bytes of K and V read / median time; %copy against a 1 GiB device-to-device
    copy measured the same way (read + write counted);
  - every variant's output is compared with a float64 reference first (relative error printed;
    above 1e-2 the variant is reported FAILED).
The N operations of a sample are replayed from a CUDA graph of one rotation cycle when capture
works (no Python launch overhead, which a C++ caller would not pay either); the eager time is
printed beside it.

Variants: "sdpa" puts the 4 query heads of a KV head as 4 query rows (q [B, 8, 4, 128] against
K/V [B, 8, L, 128]: plain multi-head attention, any backend) with PyTorch's own backend choice;
"sdpa-flash", "sdpa-efficient", "sdpa-cudnn" force one backend; "sdpa-gqa" passes q
[B, 32, 1, 128] with enable_gqa=True.

Usage: python3 bench/cuda/sdpa_peer.py [--json OUT.json] [--shapes 4096x1,32768x32]
Prints a section starting with the line "== torch sdpa peer". Exits 2 when PyTorch cannot be
imported and 3 when it has no CUDA device. Not yet run on a GPU.
"""

import argparse
import json
import math
import sys
import time

Q_HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128
GROUP = Q_HEADS // KV_HEADS
MIB = 1 << 20
SAMPLE_SECONDS = 2e-3
MAX_SAMPLES, MIN_SAMPLES, CASE_SECONDS = 7, 3, 1.5
MAX_OPS_PER_SAMPLE = 100000
MIN_ROTATION_BYTES = 512 * MIB
MEMORY_CAP_BYTES = 40e9
TOLERANCE = 1e-2
DEFAULT_SHAPES = "4096x1,4096x32,32768x1,32768x32"


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", help="write the results to this file")
    p.add_argument("--shapes", default=DEFAULT_SHAPES, help="CONTEXTxBATCH list (default: %(default)s)")
    args = p.parse_args(argv)
    shapes = []
    for item in args.shapes.split(","):
        ctx, batch = item.lower().split("x")
        shapes.append((int(ctx), int(batch)))
    return args, shapes


def load_torch():
    try:
        import torch  # noqa: PLC0415
    except Exception as e:  # ImportError, or a broken install
        print(f"sdpa_peer: PyTorch is not importable ({type(e).__name__}: {e}); nothing measured", file=sys.stderr)
        sys.exit(2)
    if not torch.cuda.is_available():
        print(f"sdpa_peer: PyTorch {torch.__version__} sees no CUDA device; nothing measured", file=sys.stderr)
        sys.exit(3)
    return torch


class Timer:
    """Times enqueue(n) (which enqueues n operations) between two CUDA events."""

    def __init__(self, torch):
        self.torch = torch
        self.start = torch.cuda.Event(enable_timing=True)
        self.stop = torch.cuda.Event(enable_timing=True)

    def seconds(self, enqueue, n):
        self.start.record()
        enqueue(n)
        self.stop.record()
        self.stop.synchronize()
        return self.start.elapsed_time(self.stop) * 1e-3


def time_ops(torch, enqueue, unit):
    """enqueue(n): n units of `unit` operations each. Returns (median, min, ops per sample) per op."""
    timer = Timer(torch)
    enqueue(1)  # warm-up
    torch.cuda.synchronize()
    n = 1
    for _ in range(3):
        t = timer.seconds(enqueue, n)
        if t >= SAMPLE_SECONDS:
            break
        n = min(MAX_OPS_PER_SAMPLE, max(n + 1, math.ceil(1.2 * SAMPLE_SECONDS / max(t / n, 1e-8))))
    per_op, measured = [], 0.0
    for s in range(MAX_SAMPLES):
        t = timer.seconds(enqueue, n)
        per_op.append(t / (n * unit))
        measured += t
        if s + 1 >= MIN_SAMPLES and measured > CASE_SECONDS:
            break
    per_op.sort()
    m = len(per_op)
    median = per_op[m // 2] if m % 2 else 0.5 * (per_op[m // 2 - 1] + per_op[m // 2])
    return median, per_op[0], n * unit


def measure_copy(torch):
    n_bytes = 1 << 30
    a = torch.ones(n_bytes, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)

    def enqueue(n):
        for _ in range(n):
            b.copy_(a)

    median, minimum, _ = time_ops(torch, enqueue, 1)
    return 2.0 * n_bytes / median / 1e9, median, minimum


def variants(torch):
    F = torch.nn.functional
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: PLC0415
    except Exception:  # older PyTorch: only the default dispatch
        SDPBackend = sdpa_kernel = None

    def rows(q, k, v, scale):  # q [B, 32, 128] -> [B, 8, 4, 128]
        b = q.shape[0]
        return F.scaled_dot_product_attention(q.view(b, KV_HEADS, GROUP, HEAD_DIM), k, v, scale=scale)

    def gqa(q, k, v, scale):  # q [B, 32, 1, 128] against K/V [B, 8, L, 128]
        b = q.shape[0]
        out = F.scaled_dot_product_attention(q.view(b, Q_HEADS, 1, HEAD_DIM), k, v, scale=scale, enable_gqa=True)
        return out.view(b, KV_HEADS, GROUP, HEAD_DIM)

    result = [("sdpa", rows, None), ("sdpa-gqa", gqa, None)]
    if sdpa_kernel is not None:
        for name, backend in (("sdpa-flash", "FLASH_ATTENTION"), ("sdpa-efficient", "EFFICIENT_ATTENTION"),
                              ("sdpa-cudnn", "CUDNN_ATTENTION")):
            if hasattr(SDPBackend, backend):
                result.append((name, rows, (sdpa_kernel, getattr(SDPBackend, backend))))
    return result


def reference(torch, q, k, v, scale, b):
    """float64 attention for sequence b: [8, 4, 128]."""
    q64 = q[b].view(KV_HEADS, GROUP, HEAD_DIM).double()
    k64, v64 = k[b].double(), v[b].double()
    s = torch.matmul(q64, k64.transpose(-1, -2)) * scale
    return torch.matmul(torch.softmax(s, dim=-1), v64)


def run_shape(torch, ctx, batch, copy_gbps, rotation_bytes, records):
    label = f"llama3-8b/ctx{ctx}/b{batch}"
    dense_bytes = 2.0 * batch * KV_HEADS * ctx * HEAD_DIM * 2
    replicas = max(1, math.ceil(rotation_bytes / dense_bytes))
    while replicas > 1 and replicas * dense_bytes > 0.5 * MEMORY_CAP_BYTES:
        replicas -= 1
    scale = 1.0 / math.sqrt(HEAD_DIM)
    try:
        gen = torch.Generator(device="cuda").manual_seed(ctx * 131 + batch)
        ks = [torch.randn(batch, KV_HEADS, ctx, HEAD_DIM, device="cuda", dtype=torch.float16, generator=gen) * 2.0
              for _ in range(replicas)]
        vs = [torch.randn(batch, KV_HEADS, ctx, HEAD_DIM, device="cuda", dtype=torch.float16, generator=gen) * 0.7
              for _ in range(replicas)]
        q = torch.randn(batch, Q_HEADS, HEAD_DIM, device="cuda", dtype=torch.float16, generator=gen)
        refs = {b: reference(torch, q, ks[0], vs[0], scale, b) for b in sorted({0, batch - 1})}
    except Exception as e:  # out of memory, most likely
        for name, _, _ in variants(torch):
            records.append({"case": f"attention/{name}/{label}", "failed": True, "message": f"set-up: {e}"})
        return

    for name, fn, forced in variants(torch):
        case = f"attention/{name}/{label}"
        rec = {"case": case, "failed": False, "dense_bytes": dense_bytes, "replicas": replicas,
               "rotation_bytes": replicas * dense_bytes}
        try:
            def call(r, fn=fn, forced=forced):
                if forced is None:
                    return fn(q, ks[r], vs[r], scale)
                context, backend = forced
                with context(backend):
                    return fn(q, ks[r], vs[r], scale)

            out = call(0)
            torch.cuda.synchronize()
            err = 0.0
            for b, ref in refs.items():
                got = out[b].double()
                if not torch.isfinite(got).all():
                    err = math.inf
                    break
                err = max(err, (torch.linalg.vector_norm(got - ref) / torch.linalg.vector_norm(ref)).item())
            rec["rel_err"] = err
            if not err <= TOLERANCE:
                raise RuntimeError(f"disagrees with the float64 reference: relative error {err:.3e}")

            def eager(n):
                for i in range(n):
                    call(i % replicas)

            eager_median, _, _ = time_ops(torch, eager, 1)
            rec["eager_s"] = eager_median
            rec["mode"] = "eager"
            median, minimum, per_sample = eager_median, None, None
            try:
                graph = torch.cuda.CUDAGraph()
                stream = torch.cuda.Stream()
                stream.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(stream):
                    for r in range(replicas):  # warm-up on the side stream, as capture requires
                        call(r)
                torch.cuda.current_stream().wait_stream(stream)
                with torch.cuda.graph(graph):
                    for r in range(replicas):  # one rotation cycle
                        call(r)

                def replay(n):
                    for _ in range(n):
                        graph.replay()

                median, minimum, per_sample = time_ops(torch, replay, replicas)
                rec["mode"] = "graph"
            except Exception as e:  # capture not supported for this backend: keep the eager time
                rec["graph_error"] = str(e).splitlines()[0] if str(e) else type(e).__name__
                median, minimum, per_sample = time_ops(torch, eager, 1)
            rec.update(median_s=median, min_s=minimum, ops_per_sample=per_sample,
                       gbps=dense_bytes / median / 1e9)
            if copy_gbps:
                rec["pct_copy"] = 100.0 * rec["gbps"] / copy_gbps
        except Exception as e:
            rec["failed"] = True
            rec["message"] = str(e).splitlines()[0] if str(e) else type(e).__name__
        records.append(rec)


def main(argv):
    args, shapes = parse_args(argv)
    torch = load_torch()
    props = torch.cuda.get_device_properties(0)
    l2 = getattr(props, "L2_cache_size", 50 * MIB) or 50 * MIB
    rotation_bytes = max(MIN_ROTATION_BYTES, 8 * l2)
    started = time.time()
    records = []
    try:
        copy_gbps, copy_median, copy_min = measure_copy(torch)
        records.append({"case": "copy/d2d/1GiB", "failed": False, "median_s": copy_median, "min_s": copy_min,
                        "gbps": copy_gbps, "dense_bytes": 2.0 * (1 << 30)})
    except Exception as e:
        copy_gbps = 0.0
        records.append({"case": "copy/d2d/1GiB", "failed": True, "message": str(e)})
    torch.cuda.empty_cache()
    for ctx, batch in shapes:
        run_shape(torch, ctx, batch, copy_gbps, rotation_bytes, records)
        torch.cuda.empty_cache()  # the shape's tensors died with run_shape

    print(f"== torch sdpa peer (torch {torch.__version__}, {props.name}, {props.multi_processor_count} SMs, "
          f"copy {copy_gbps:.0f} GB/s, rotation >= {rotation_bytes / MIB:.0f} MiB, {time.time() - started:.0f} s)")
    print(f"{'case':<46} {'median_us':>10} {'min_us':>10} {'eager_us':>10} {'GB/s':>8} {'%copy':>6} "
          f"{'rot_MiB':>8} {'rel_err':>9}  note")
    for r in records:
        if r["failed"]:
            print(f"{r['case']:<46} FAILED: {r['message']}")
            continue
        eager = f"{r['eager_s'] * 1e6:10.1f}" if "eager_s" in r else f"{'-':>10}"
        pct = f"{r['pct_copy']:6.1f}" if "pct_copy" in r else f"{'-':>6}"
        err = f"{r['rel_err']:9.2e}" if "rel_err" in r else f"{'-':>9}"
        rot = f"{r['rotation_bytes'] / MIB:8.0f}" if "rotation_bytes" in r else f"{'-':>8}"
        note = r.get("mode", "read + write counted")
        if "graph_error" in r:
            note += f" (graph capture failed: {r['graph_error']})"
        print(f"{r['case']:<46} {r['median_s'] * 1e6:10.1f} {r['min_s'] * 1e6:10.1f} {eager} {r['gbps']:8.0f} "
              f"{pct} {rot} {err}  {note}")
    print("(GB/s: dense fp16 K and V bytes / median time; median_us/min_us: graph replay of one rotation cycle when "
          "capture works, else eager; eager_us: eager launches; rel_err: against float64)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"torch": torch.__version__, "device": props.name, "copy_gbps": copy_gbps,
                       "rotation_bytes": rotation_bytes, "records": records}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
