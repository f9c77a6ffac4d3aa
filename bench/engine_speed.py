"""Engine throughput on a GPU, beside the unmodified native model, in one process.

    python -m bench.engine_speed --out bench/gpu-h100.json             # full-size random checkpoint, GPU
    python -m bench.engine_speed --size mid --device cpu --out bench/cpu.json   # `make bench`: CPU, mid-size
    python -m bench.engine_speed --size small --device cpu             # smoke run of this script

Shapes are N texts × L tokens, half of the texts L/2 long, tasks round-robin over the five adapters.
Throughput counts real (non-padding) tokens. Baselines, same weights, same process:
- ``native padded``: JinaEmbeddingsV3Model with SDPA, one merged task, padded batch + mask;
- ``native uniform``: the same model on N×L texts all of length L with no mask (the ceiling that
  perfect length bucketing gives the unmodified model).
Ours: ``engine mixed`` (five tasks in the batch) and ``engine single`` (one task).
Also: peak GPU memory beyond the weights at the largest shape, and cold start (a fresh process:
``Engine.load`` to the first vector) with its peak host memory.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench.checkpoints import FULL, MID, make_released_checkpoint
from inference.engine import Engine, Sequence
from inference.settings import TASKS, Settings

SHAPES = [(256, 128), (64, 512), (16, 2048), (2, 8192)]
SMALL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256, vocab_size=1000)


def workload(n: int, length: int, vocab: int, *, mixed_lengths: bool, tasks, seed: int = 0) -> list[Sequence]:
    rng = np.random.default_rng(seed)
    seqs = []
    for i in range(n):
        size = length // 2 if (mixed_lengths and i % 2) else length
        ids = [0, *rng.integers(5, vocab, size - 2).tolist(), 2]
        seqs.append(Sequence(tasks[i % len(tasks)], ids, np.full(size, i, dtype=np.int64)))
    return seqs


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, reps: int) -> float:
    for _ in range(2):
        fn()
    sync(device)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def native_padded(engine: Engine, seqs: list[Sequence], task: str, *, mask: bool):
    model = engine.model
    device = model.device
    longest = max(len(s.ids) for s in seqs)
    ids = torch.full((len(seqs), longest), 1, dtype=torch.long)
    attn = torch.zeros((len(seqs), longest), dtype=torch.long)
    for row, s in enumerate(seqs):
        ids[row, : len(s.ids)] = torch.tensor(s.ids)
        attn[row, : len(s.ids)] = 1
    ids, attn = ids.to(device), attn.to(device)

    @torch.inference_mode()
    def run():
        model.config._attn_implementation = "sdpa"
        try:
            model.segments[:] = [(model.variants[task], 0, ids.numel())]  # one task for the whole batch
            out = model.model(input_ids=ids, attention_mask=attn if mask else None).last_hidden_state
            m = attn[..., None].float()
            return (out.float() * m).sum(1) / m.sum(1)
        finally:
            model.config._attn_implementation = "jv3_packed"

    return run


def engine_run(engine: Engine, seqs: list[Sequence]):
    def run():
        return engine._run(seqs, len(seqs))

    return run


def agreement(engine: Engine, vocab: int, shape) -> dict:
    """Our packed forward against the native padded SDPA model, same weights (no adapter): cosine."""
    seqs = workload(shape[0], shape[1], vocab, mixed_lengths=True, tasks=[None])
    ours, counts = engine._run(seqs, len(seqs))
    ours = ours / counts[:, None]
    ref = native_padded(engine, seqs, None, mask=True)()
    cos = torch.nn.functional.cosine_similarity(ours.float(), ref.float(), dim=-1)
    return {"min_cosine": float(cos.min()), "mean_cosine": float(cos.mean())}


def cold_start(model_dir: Path, device: str) -> dict:
    code = (
        "import time, resource, sys; t0=time.perf_counter();"
        "from inference.engine import Engine; from inference.request import EmbedRequest; from inference.settings import Settings;"
        f"e=Engine.load({str(model_dir)!r}, Settings.resolve(device={device!r}));"
        "t1=time.perf_counter(); r=e.embed(EmbedRequest(texts=['hello world']));"
        "import torch; torch.cuda.synchronize() if torch.cuda.is_available() else None; t2=time.perf_counter();"
        "print('COLD', t1-t0, t2-t0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss/1024)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).parent.parent)
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("COLD")]
    if not line:
        return {"error": out.stderr[-2000:]}
    _, load_s, first_s, rss_mb = line[0].split()
    size = sum(f.stat().st_size for f in model_dir.iterdir()) / 2**20
    return {"load_s": float(load_s), "first_vector_s": float(first_s), "peak_host_mb": float(rss_mb), "checkpoint_mb": size}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=("full", "mid", "small"), default="full", help="checkpoint size (mid: hidden 384, 6 layers)")
    ap.add_argument("--shapes", default=None, help="e.g. 64x128,16x512 (default: the issue's four shapes; smaller for mid/small)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default=None, help="write the figures as JSON here")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    sizes = {"full": FULL, "mid": MID, "small": SMALL}[args.size]
    shapes = {"full": SHAPES, "mid": [(64, 128), (16, 512), (4, 2048)], "small": [(16, 64), (4, 256)]}[args.size]
    if args.shapes:
        shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")]
    report = {"torch": torch.__version__, "size": args.size, "threads": torch.get_num_threads(), "shapes": [],
              "device": torch.cuda.get_device_name() if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)"}
    import transformers

    report["transformers"] = transformers.__version__
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        ckpt = make_released_checkpoint(Path(tmp) / "ckpt", sizes=sizes, dtype=torch.bfloat16, device=str(device))
        print(f"checkpoint written in {time.perf_counter() - t0:.1f}s", flush=True)
        report["cold_start"] = cold_start(ckpt, args.device)
        print("cold start", report["cold_start"], flush=True)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        engine = Engine.load(ckpt, Settings.resolve(device=args.device))
        weights_bytes = torch.cuda.memory_allocated() if device.type == "cuda" else 0
        report["weights_gib"] = weights_bytes / 2**30
        vocab = sizes["vocab_size"]
        report["agreement"] = agreement(engine, vocab, shapes[1])
        print("agreement with the native model", report["agreement"], flush=True)
        for n, length in shapes:
            mixed = workload(n, length, vocab, mixed_lengths=True, tasks=TASKS)
            single = [Sequence("text-matching", s.ids, s.slots) for s in mixed]
            uniform = workload(n, length, vocab, mixed_lengths=False, tasks=["text-matching"])
            real = sum(len(s.ids) for s in mixed)
            row = {"shape": f"{n}x{length}", "real_tokens": real}
            row["native_padded"] = real / timed(native_padded(engine, mixed, "text-matching", mask=True), device, args.reps)
            row["native_uniform_nomask"] = sum(len(s.ids) for s in uniform) / timed(
                native_padded(engine, uniform, "text-matching", mask=False), device, args.reps
            )
            row["engine_single"] = real / timed(engine_run(engine, single), device, args.reps)
            row["engine_mixed"] = real / timed(engine_run(engine, mixed), device, args.reps)
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                engine_run(engine, mixed)()
                torch.cuda.synchronize()
                row["engine_peak_gib_beyond_weights"] = (torch.cuda.max_memory_allocated() - weights_bytes) / 2**30
                torch.cuda.reset_peak_memory_stats()
                native_padded(engine, mixed, "text-matching", mask=True)()
                torch.cuda.synchronize()
                row["native_peak_gib_beyond_weights"] = (torch.cuda.max_memory_allocated() - weights_bytes) / 2**30
            report["shapes"].append(row)
            print(json.dumps(row), flush=True)
    print(f"\n{'shape':>9} {'native padded':>14} {'native uniform':>15} {'engine 1 task':>14} {'engine mixed':>13} {'speed-up':>9}")
    for r in report["shapes"]:
        print(
            f"{r['shape']:>9} {r['native_padded'] / 1e3:>13.0f}k {r['native_uniform_nomask'] / 1e3:>14.0f}k "
            f"{r['engine_single'] / 1e3:>13.0f}k {r['engine_mixed'] / 1e3:>12.0f}k {r['engine_mixed'] / r['native_padded']:>8.2f}x"
        )
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    main()
