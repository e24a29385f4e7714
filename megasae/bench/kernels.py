"""`megasae bench kernels`: one SAE training step, five ways, side by side in one process.

For every shape (N tokens, width d, M latents, k) it times, interleaved repeat by repeat so that
machine noise hits them alike, and reports the median after warm-up:

- floor:    the dense encoder GEMM alone, (x - b_dec) [N, d] @ W_enc^T [d, M], into a preallocated
            output: what exact TopK cannot avoid;
- naive:    a dense PyTorch step: dense pre-activations, topk, dense decode, FVU, backward;
- sparsify: EleutherAI sparsify's fused path (its fused encoder, its decoder, FVU, backward),
            when `eai-sparsify` is importable;
- megasae:  megasae.ops.topk_encode + sparse_decode + FVU + backward;
- batchtopk: megasae's BatchTopK step: the batch's k N largest codes from 4k candidates per row
            (megasae.sae.batchtopk) + sparse_decode + FVU + backward.

Every step starts with the gradients set to None, as after `zero_grad()`. Peak memory is each
step's growth above what was resident before it: on a GPU the caching allocator's peak; on the CPU
the peak RSS (VmHWM, reset through /proc/self/clear_refs), measured in a pass of its own after all
the timings, with glibc told to map every allocation of 64 KiB or more afresh (mallopt
M_MMAP_THRESHOLD) so that freed memory kept by malloc cannot hide an allocation. The table prints
the median seconds, the ratio to the floor and the peak memory; --json writes every timing.
--dtype tf32 is fp32 data with TensorFloat-32 GEMMs allowed (every path alike). On a GPU, sparsify's
forward always runs under bf16 autocast, so its fp32 row is a mixed-precision step; compare it with
megasae's tf32 or bf16 rows. --profile prints where megasae's step spends its time, op by op.

Only torch, megasae.ops and megasae.sae are imported, so the benchmark runs wherever the extension is
built.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

DEFAULT_SHAPES = [f"4096x576x{M}x{k}" for M in (4608, 18432, 73728) for k in (32, 128)]
PATHS = ("floor", "naive", "sparsify", "megasae", "batchtopk")
DTYPES = {"fp32": torch.float32, "tf32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Shape:
    N: int
    d: int
    M: int
    k: int

    @classmethod
    def parse(cls, text: str) -> Shape:
        parts = text.lower().split("x")
        if len(parts) != 4 or not all(p.isdigit() for p in parts):
            raise argparse.ArgumentTypeError(f"shape {text!r} must be NxDxMxK, e.g. 4096x576x18432x32")
        N, d, M, k = map(int, parts)
        if not 0 < k <= M:
            raise argparse.ArgumentTypeError(f"shape {text!r}: k must be in [1, M]")
        return cls(N, d, M, k)

    def __str__(self) -> str:
        return f"N={self.N} d={self.d} M={self.M} k={self.k}"


# --- the steps -------------------------------------------------------------------------------


def make_params(shape: Shape, dtype: torch.dtype, device: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """sparsify's and megasae's init: unit decoder rows, encoder = decoder, b_dec = the batch mean."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(shape.N, shape.d, generator=g)
    W_dec = torch.randn(shape.M, shape.d, generator=g)
    W_dec /= W_dec.norm(dim=1, keepdim=True)
    tensors = {
        "x": x,
        "W_enc": W_dec.clone(),
        "b_enc": torch.zeros(shape.M),
        "b_dec": x.mean(0),
        "W_dec": W_dec,
    }
    return {name: t.to(device=device, dtype=dtype) for name, t in tensors.items()}


def fvu(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    x32 = x.float()
    return (x_hat.float() - x32).pow(2).sum() / (x32 - x32.mean(0)).pow(2).sum()


class Step:
    """One path: __call__ runs a whole step; params holds the tensors it trains."""

    name = ""
    params: list[torch.Tensor] = []

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def __call__(self) -> None:
        raise NotImplementedError


class Floor(Step):
    name = "floor"

    def __init__(self, t: dict[str, torch.Tensor], shape: Shape):
        self.x_in = (t["x"] - t["b_dec"]).contiguous()
        self.W_enc = t["W_enc"]
        self.out = torch.empty(shape.N, shape.M, dtype=t["x"].dtype, device=t["x"].device)

    def __call__(self) -> None:
        torch.mm(self.x_in, self.W_enc.T, out=self.out)


class Naive(Step):
    name = "naive"

    def __init__(self, t: dict[str, torch.Tensor], shape: Shape):
        self.x = t["x"]
        self.k = shape.k
        self.params = [t[n].clone().requires_grad_() for n in ("W_enc", "b_enc", "b_dec", "W_dec")]

    def __call__(self) -> None:
        self.zero_grad()
        W_enc, b_enc, b_dec, W_dec = self.params
        pre = torch.nn.functional.linear(self.x - b_dec, W_enc, b_enc)
        values, indices = pre.topk(self.k, dim=-1)
        z = torch.zeros_like(pre).scatter(1, indices, values.relu())
        x_hat = z @ W_dec + b_dec
        fvu(self.x, x_hat).backward()


class Megasae(Step):
    name = "megasae"

    def __init__(self, t: dict[str, torch.Tensor], shape: Shape, chunk_size: int = 0):
        from megasae import ops

        self.ops = ops
        self.x = t["x"]
        self.k = shape.k
        self.chunk_size = chunk_size
        self.params = [t[n].clone().requires_grad_() for n in ("W_enc", "b_enc", "b_dec", "W_dec")]

    def __call__(self) -> None:
        self.zero_grad()
        W_enc, b_enc, b_dec, W_dec = self.params
        values, indices = self.ops.topk_encode(
            self.x, W_enc, b_enc, b_dec, self.k, chunk_size=self.chunk_size
        )
        x_hat = self.ops.sparse_decode(indices, values, W_dec, b_dec)
        fvu(self.x, x_hat).backward()


class BatchTopK(Megasae):
    name = "batchtopk"

    def __init__(self, t: dict[str, torch.Tensor], shape: Shape):
        from megasae.sae import batchtopk

        super().__init__(t, shape)
        self.batchtopk = batchtopk
        self.k_max = batchtopk.candidates_per_row(shape.k, shape.M)

    def __call__(self) -> None:
        self.zero_grad()
        W_enc, b_enc, b_dec, W_dec = self.params
        values, indices = self.batchtopk.batchtopk_encode(self.x, W_enc, b_enc, b_dec, self.k, self.k_max)
        x_hat = self.ops.sparse_decode(indices, values, W_dec, b_dec)
        fvu(self.x, x_hat).backward()


class Sparsify(Step):
    """sparsify's own module and forward: fused encoder, its decoder (Triton on a GPU, embedding_bag
    on the CPU), FVU, backward."""

    name = "sparsify"

    def __init__(self, t: dict[str, torch.Tensor], shape: Shape, sparsify):
        from sparsify import SparseCoder, SparseCoderConfig

        x = t["x"]
        cfg = SparseCoderConfig(k=shape.k, num_latents=shape.M)
        self.sae = SparseCoder(shape.d, cfg, device=x.device, dtype=x.dtype)
        with torch.no_grad():
            self.sae.encoder.weight.copy_(t["W_enc"])
            self.sae.encoder.bias.copy_(t["b_enc"])
            self.sae.W_dec.copy_(t["W_dec"])
            self.sae.b_dec.copy_(t["b_dec"])
        self.x = x
        self.params = list(self.sae.parameters())

    def __call__(self) -> None:
        self.zero_grad()
        self.sae(self.x).fvu.backward()


def import_sparsify():
    """sparsify, or None with the reason. On the CPU its Triton decoder cannot run: use its eager one."""
    if not torch.cuda.is_available():
        os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")
    try:
        import sparsify  # noqa: F401
        from sparsify import SparseCoder  # noqa: F401
    except Exception as e:  # noqa: BLE001  any import failure means: not available here
        return None, f"{type(e).__name__}: {e}"
    return sparsify, None


# --- measuring -------------------------------------------------------------------------------


def _kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(field + r":\s+(\d+)", f.read()).group(1))


def reset_peak_rss() -> bool:
    """Reset this process's peak RSS (VmHWM); False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def map_large_allocations_afresh() -> bool:
    """glibc: serve every allocation of 64 KiB or more by a fresh mmap, returned on free."""
    try:
        import ctypes

        return ctypes.CDLL("libc.so.6").mallopt(-3, 64 * 1024) == 1  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False


def peak_mib(step: Step, device: str) -> float | None:
    """How far one step's memory rises above what was resident before it, in MiB."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    step.zero_grad()  # what the step frees first does not count as headroom
    if not sys.platform.startswith("linux") or not reset_peak_rss():
        return None
    before = _kib("VmRSS")
    step()
    return (_kib("VmHWM") - before) / 1024


def timed(step: Step, device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    step()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def build_steps(shape: Shape, args, sparsify) -> dict[str, Step]:
    dtype = DTYPES[args.dtype]
    t = make_params(shape, dtype, args.device)
    builders: dict[str, Callable[[], Step]] = {
        "floor": lambda: Floor(t, shape),
        "naive": lambda: Naive(t, shape),
        "sparsify": lambda: Sparsify(t, shape, sparsify),
        "megasae": lambda: Megasae(t, shape, args.chunk_size),
        "batchtopk": lambda: BatchTopK(t, shape),
    }
    return {p: builders[p]() for p in args.paths if p != "sparsify" or sparsify is not None}


def measure_peaks(shape: Shape, args, sparsify) -> dict[str, float | None]:
    steps = build_steps(shape, args, sparsify)
    peaks = {}
    for p, step in steps.items():
        step()  # warm-up: the first call's one-off allocations do not count
        peaks[p] = peak_mib(step, args.device)
    return peaks


def time_shape(shape: Shape, args, sparsify) -> list[dict]:
    dtype = DTYPES[args.dtype]
    steps = build_steps(shape, args, sparsify)
    paths = list(steps)
    times: dict[str, list[float]] = {p: [] for p in paths}
    for p in paths:
        for _ in range(args.warmup):
            steps[p]()
    for _ in range(args.repeats):
        for p in paths:
            times[p].append(timed(steps[p], args.device))
    del steps
    peaks = measure_peaks(shape, args, sparsify) if args.device == "cuda" and args.memory else {}
    medians = {p: statistics.median(v) for p, v in times.items()}
    floor = medians.get("floor")
    elem = torch.finfo(dtype).bits // 8
    rows = []
    for p in paths:
        rows.append(
            {
                **vars(shape),
                "path": p,
                "median_s": medians[p],
                "times_s": times[p],
                "ratio_to_floor": medians[p] / floor if floor else None,
                "peak_mib": peaks.get(p),
                # What the step must hold whatever it does: the weights' gradients ...
                "grads_mib": (2 * shape.M * shape.d + shape.M + shape.d) * elem / 2**20,
                # ... and one dense [N, M] tensor, which megasae never forms.
                "dense_nm_mib": shape.N * shape.M * elem / 2**20,
            }
        )
    return rows


def profile_megasae(shape: Shape, args) -> str:
    """torch.profiler's per-op table of megasae's step (after one warm-up), by self time on the device."""
    from torch.profiler import ProfilerActivity, profile

    step = build_steps(shape, argparse.Namespace(**{**vars(args), "paths": ["megasae"]}), None)["megasae"]
    step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(3):
            step()
        if args.device == "cuda":
            torch.cuda.synchronize()
    sort_by = "self_cuda_time_total" if args.device == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=sort_by, row_limit=15, max_name_column_width=60)


def print_table(rows: list[dict]) -> None:
    header = f"{'N':>6} {'d':>5} {'M':>7} {'k':>4}  {'path':<9}{'median s':>10}{'x floor':>9}{'peak MiB':>10}"
    print(header)
    print("-" * len(header))
    last = None
    for r in rows:
        key = (r["N"], r["d"], r["M"], r["k"])
        shape = f"{r['N']:>6} {r['d']:>5} {r['M']:>7} {r['k']:>4}" if key != last else " " * 25
        last = key
        ratio = f"{r['ratio_to_floor']:.2f}" if r["ratio_to_floor"] else "-"
        peak = f"{r['peak_mib']:.0f}" if r["peak_mib"] is not None else "-"
        print(f"{shape}  {r['path']:<9}{r['median_s']:>10.4f}{ratio:>9}{peak:>10}")


def summarize(rows: list[dict]) -> list[str]:
    """megasae against each other path, shape by shape."""
    lines = []
    by_shape: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        by_shape.setdefault((r["N"], r["d"], r["M"], r["k"]), {})[r["path"]] = r
    for (N, d, M, k), paths in by_shape.items():
        if "megasae" not in paths:
            continue
        me = paths["megasae"]["median_s"]
        parts = [f"N={N} d={d} M={M} k={k}: megasae"]
        if "floor" in paths:
            parts.append(f"{me / paths['floor']['median_s']:.2f}x the floor")
        for other in ("naive", "sparsify"):
            if other in paths:
                parts.append(f"{paths[other]['median_s'] / me:.2f}x faster than {other}")
        if "batchtopk" in paths:
            parts.append(f"BatchTopK {paths['batchtopk']['median_s'] / me:.2f}x its TopK step")
        lines.append(", ".join(parts))
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="megasae bench kernels",
        description="Time one SAE training step: the encoder GEMM floor, a naive dense step, sparsify's "
        "fused path (when installed) and megasae's kernels, side by side in one process.",
    )
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda if available")
    parser.add_argument("--threads", type=int, default=2, help="torch threads on the CPU (default 2)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of each path per shape (median)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs of each path first")
    parser.add_argument(
        "--shapes", nargs="+", type=Shape.parse, default=None, metavar="NxDxMxK",
        help=f"default: {' '.join(DEFAULT_SHAPES)}",
    )  # fmt: skip
    parser.add_argument("--paths", nargs="+", choices=PATHS, default=list(PATHS))
    parser.add_argument(
        "--chunk-size", type=int, default=0, help="megasae latents per tile (0: the kernel picks)"
    )
    parser.add_argument(
        "--no-memory",
        dest="memory",
        action="store_false",
        help="skip the peak-memory pass (one more step per path)",
    )
    parser.add_argument(
        "--profile", action="store_true", help="print megasae's step op by op (torch.profiler)"
    )
    parser.add_argument("--json", default=None, metavar="OUT", help="write every timing to this JSON file")
    args = parser.parse_args(argv)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    if args.threads < 1 or args.repeats < 1 or args.warmup < 0:
        parser.error("--threads and --repeats must be >= 1, --warmup >= 0")
    shapes = args.shapes or [Shape.parse(s) for s in DEFAULT_SHAPES]
    torch.set_num_threads(args.threads)
    torch.backends.cuda.matmul.allow_tf32 = args.dtype == "tf32"

    from megasae import ops

    sparsify, why_not = (None, "not asked for")
    if "sparsify" in args.paths:
        sparsify, why_not = import_sparsify()
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu"
    print(
        f"megasae bench kernels: {args.device} ({device_name}), {args.dtype}, "
        f"{args.threads if args.device == 'cpu' else '-'} threads, median of {args.repeats} after "
        f"{args.warmup} warm-up; megasae backend {ops.backend()}; sparsify "
        + (f"{getattr(sparsify, '__version__', 'installed')}" if sparsify else f"unavailable ({why_not})")
    )
    rows = []
    for shape in shapes:
        shape_rows = time_shape(shape, args, sparsify)
        rows += shape_rows
        print_table(shape_rows)
        if args.profile:
            table = profile_megasae(shape, args)
            print(f"megasae's step at {shape}, 3 steps:\n{table}")
            for r in shape_rows:
                r["profile"] = table
        sys.stdout.flush()
    if args.device == "cpu" and args.memory:
        # After every timing: the malloc setting below would change what the steps pay for memory.
        afresh = map_large_allocations_afresh()
        print(f"peak memory pass (glibc maps allocations >= 64 KiB afresh: {afresh})")
        for shape in shapes:
            peaks = measure_peaks(shape, args, sparsify)
            for r in rows:
                if (r["N"], r["d"], r["M"], r["k"]) == (shape.N, shape.d, shape.M, shape.k):
                    r["peak_mib"] = peaks.get(r["path"])
    print()
    print_table(rows)
    for line in summarize(rows):
        print(line)
    if args.json:
        meta = {
            "command": "megasae bench kernels " + " ".join(sys.argv[1:] if argv is None else argv),
            "device": args.device,
            "device_name": device_name,
            "dtype": args.dtype,
            "threads": args.threads,
            "repeats": args.repeats,
            "warmup": args.warmup,
            "torch": torch.__version__,
            "megasae_backend": ops.backend(),
            "sparsify": None if sparsify is None else getattr(sparsify, "__version__", "installed"),
            "cpu_count": os.cpu_count(),
            "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
        }
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "results": rows, "summary": summarize(rows)}, f, indent=1)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
