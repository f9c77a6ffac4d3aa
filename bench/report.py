"""Write bench/RESULTS.md (and bench/throughput.png) from the engine benchmark JSON files.

    python -m bench.report      # reads bench/gpu-h100.json, bench/cpu.json and bench/cpu-paths.json, whichever exist
"""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
COLUMNS = [
    ("native_padded", "native SDPA, padded, 1 task"),
    ("native_uniform_nomask", "native, uniform lengths, no mask"),
    ("engine_single", "engine, 1 task"),
    ("engine_mixed", "engine, 5 tasks mixed"),
]


def table(report: dict) -> list[str]:
    lines = [
        f"Device: **{report['device']}**, torch {report['torch']}, transformers {report.get('transformers', '?')}, "
        f"checkpoint size `{report.get('size', 'full')}`. Real (non-padding) tokens/s, median of timed repeats after warm-up, "
        "every column measured in the same process on the same weights.",
        "",
        "| shape | " + " | ".join(label for _, label in COLUMNS) + " | engine mixed ÷ native padded | mixed ÷ single |",
        "|---|" + "---|" * (len(COLUMNS) + 2),
    ]
    for row in report["shapes"]:
        cells = [f"{row[key] / 1e3:,.1f}k" for key, _ in COLUMNS]
        lines.append(
            f"| {row['shape']} | " + " | ".join(cells)
            + f" | {row['engine_mixed'] / row['native_padded']:.2f}× | {row['engine_mixed'] / row['engine_single']:.2f} |"
        )
    if any("engine_peak_gib_beyond_weights" in r for r in report["shapes"]):
        lines += ["", "Peak GPU memory beyond the weights (GiB): " + ", ".join(
            f"{r['shape']}: engine {r['engine_peak_gib_beyond_weights']:.2f}, native {r['native_peak_gib_beyond_weights']:.2f}"
            for r in report["shapes"]) + f". Weights of the five merged tasks: {report.get('weights_gib', 0):.2f} GiB."]
    cold = report.get("cold_start", {})
    if "load_s" in cold:
        lines += ["", f"Cold start (fresh process, `Engine.load` to the first vector): **{cold['first_vector_s']:.1f} s**; "
                  f"peak host memory {cold['peak_host_mb'] / 1024:.2f} GiB for a {cold['checkpoint_mb'] / 1024:.2f} GiB checkpoint "
                  f"({cold['peak_host_mb'] / cold['checkpoint_mb']:.2f}×, the Python/torch/CUDA runtime included)."]
    if "agreement" in report:
        lines += ["", f"Packed forward vs the native padded model, same weights: min cosine {report['agreement']['min_cosine']:.7f}."]
    return lines


def plot(reports: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(reports), figsize=(6 * len(reports), 4), squeeze=False)
    for ax, (name, report) in zip(axes[0], reports.items(), strict=True):
        shapes = [r["shape"] for r in report["shapes"]]
        width = 0.8 / len(COLUMNS)
        for i, (key, label) in enumerate(COLUMNS):
            ax.bar([x + i * width for x in range(len(shapes))], [r[key] / 1e3 for r in report["shapes"]], width, label=label)
        ax.set_xticks([x + 0.4 - width / 2 for x in range(len(shapes))], shapes)
        ax.set_ylabel("real tokens/s (thousands)")
        ax.set_title(f"{name}: {report['device']}")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    sources = {"GPU": HERE / "gpu-h100.json", "CPU": HERE / "cpu.json"}
    reports = {name: json.loads(p.read_text()) for name, p in sources.items() if p.is_file()}
    out = ["# Engine benchmark results", "", "Written by `python -m bench.report` from the JSON files beside it; "
           "produced by `python -m bench.engine_speed` (`make bench` runs the CPU one). Shapes are N texts × L tokens, "
           "half of the texts L/2 long, tasks round-robin over the five adapters; random weights in the released layout.", ""]
    notes = {
        "CPU": "Measured on an idle machine. An earlier run of the same script on the same machine shared its 2 cores "
        "with test suites (`bench/cpu-contended.json`): figures several times lower and ratios of 0.54-1.13x, i.e. "
        "CPU ratios are only meaningful on an idle machine.",
    }
    for name, report in reports.items():
        out += [f"## {name}", ""] + table(report) + [""]
        if name in notes:
            out += [notes[name], ""]
    if reports:
        plot(reports, HERE / "throughput.png")
        out += ["![throughput](throughput.png)", ""]
    paths = HERE / "cpu-paths.json"
    if paths.is_file():  # python -m bench.cpu_paths
        from bench.cpu_paths import section

        out += ["## CPU paths: threads, attention calls, allocator (`python -m bench.cpu_paths`)", ""]
        out += section(json.loads(paths.read_text())) + [""]
    (HERE / "RESULTS.md").write_text("\n".join(out))
    print((HERE / "RESULTS.md").read_text())


if __name__ == "__main__":
    main()
