"""What `fastdino bench` writes: a table (rich where installed, plain text otherwise), JSON with the
machine and every figure, and a chart (matplotlib): latency per variant with the breakdown stacked."""

import json
import os
import shutil
import subprocess
import sys

import torch

from ..info import build_info


def machine_info() -> dict:
    """GPU, driver, torch, triton, CUDA, the fastdino build and the commit the figures belong to."""
    info = {**build_info(), "torch": torch.__version__, "cuda_runtime": torch.version.cuda}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        if shutil.which("nvidia-smi"):
            smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True)
            lines = smi.stdout.strip().splitlines() if smi.returncode == 0 else []
            info["driver"] = lines[0] if lines else None
    commit = os.environ.get("FASTDINO_COMMIT")
    if not commit:
        git = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True)
        commit = git.stdout.strip() if git.returncode == 0 else "unknown"
    info["commit"] = commit
    return info


def _fmt(value, spec=".2f", none="-"):
    return none if value is None else format(value, spec)


def rows_of(result) -> list[list[str]]:
    """One list of cells per variant: the columns of `HEADER`."""
    base = result.row("original")
    out = []
    for r in result.rows:
        if r.error:
            out.append([r.variant, "-", "-", "-", "-", "-", "-", "-", "-", f"did not run: {r.error}"])
            continue
        speed = f"{base.median_ms / r.median_ms:.2f}x" if base and base.median_ms and r.median_ms else "-"
        parts = ", ".join(f"{k} {v:.2f}" for k, v in (r.breakdown_ms or {}).items())
        agreement = "-" if r.min_agreement is None else f"{100 * r.min_agreement:.2f}%"
        out.append([r.variant, _fmt(r.median_ms, ".3f"), _fmt(r.p90_ms, ".3f"), _fmt(r.images_per_s, ".1f"),
                    _fmt(r.peak_mib, ".0f"), speed, parts or "-", _fmt(r.max_rel_err, ".1e"), agreement,
                    "; ".join(r.flags + ([f"tuned: {r.tuned}"] if r.tuned else [])) or "ok"])
    return out


HEADER = ["variant", "median ms", "p90 ms", "img/s", "peak MiB", "vs original", "breakdown (ms)",
          "max rel. err", "argmax agreement", "flags"]
TEXT_COLUMNS = (0, 6, 9)  # left-aligned; the others are numbers


def title_of(result) -> str:
    res = f"{result.resolution}px, " if result.resolution else ""
    return f"{result.model}: {res}batch {result.batch}, {result.device}"


def print_table(result, about: str = "", console=None):
    """The result as a rich table (plain text without rich), with what is timed and the notes."""
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print(f"\n{title_of(result)}" + (f" ({about})" if about else ""))
        print(markdown([result]))
        for note in [f"timed: {result.timed}"] + result.notes:
            print(f"  {note}")
        return
    console = console or Console(width=None if sys.stdout.isatty() else 200)
    table = Table(title=title_of(result), caption="\n".join([about, f"timed: {result.timed}", *result.notes]))
    for i, name in enumerate(HEADER):
        table.add_column(name, justify="left" if i in TEXT_COLUMNS else "right")
    for cells in rows_of(result):
        style = "red" if cells[-1] != "ok" else None
        table.add_row(*cells, style=style)
    console.print(table)


def markdown(results) -> str:
    rule = "|".join("---" if i in TEXT_COLUMNS else "---:" for i in range(len(HEADER)))
    lines = ["| model | res | batch | " + " | ".join(HEADER) + " |", "|---|---:|---:|" + rule + "|"]
    for result in results:
        for cells in rows_of(result):
            row = [result.model, str(result.resolution or "-"), str(result.batch), *cells]
            lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def write_json(path: str, results, variants: dict):
    with open(path, "w") as f:
        figures = [r.as_dict() for r in results]
        json.dump({"machine": machine_info(), "variants": variants, "results": figures}, f, indent=1)


def write_chart(path: str, results) -> str:
    """A PNG: per model, one horizontal bar per variant, its breakdown stacked (the total where a
    variant has none). Returns '' or why no chart was written."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "no chart: matplotlib is not installed (pip install 'fastdino[bench]')"
    results = [r for r in results if any(row.median_ms for row in r.rows)]
    if not results:
        return "no chart: no variant ran"
    fig, axes = plt.subplots(len(results), 1, figsize=(10, 1.2 + 0.45 * sum(len(r.rows) for r in results)),
                             squeeze=False)
    colors = {}
    for ax, result in zip(axes[:, 0], results):
        rows = [r for r in result.rows if r.median_ms]
        for y, row in enumerate(rows):
            parts = row.breakdown_ms or {"total": row.median_ms}
            left = 0.0
            for part, ms in parts.items():
                color = colors.setdefault(part, f"C{len(colors) % 10}")
                ax.barh(y, ms, left=left, color=color, label=part)
                left += ms
            ax.text(row.median_ms, y, f" {row.median_ms:.2f} ms", va="center", fontsize=8)
        ax.set_yticks(range(len(rows)), [r.variant for r in rows])
        ax.invert_yaxis()
        ax.set_title(title_of(result), fontsize=10)
        ax.set_xlabel("ms per call (median)")
        handles, labels = ax.get_legend_handles_labels()
        unique = dict(zip(labels, handles))
        ax.legend(unique.values(), unique.keys(), fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return ""
