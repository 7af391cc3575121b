"""Report folder of a realism evaluation: report.json, report.md and PNG figures (drawn with Pillow).

Figures: ``grid_<domain>.png`` (HR | true LR | each generator, LR shown ×scale nearest),
``bars_<metric>.png`` (one bar per generator per domain), ``hist_<domain>.png`` (τ, content error
and degradation error of the kept best-of-k candidates, from the realdgen shards' json).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

__all__ = ["write_report", "bar_chart", "histogram"]

COLOURS = {
    "realdgen": (214, 39, 40),
    "realesrgan": (31, 119, 180),
    "bsrgan": (44, 160, 44),
    "bicubic": (127, 127, 127),
}
# metrics where 0.5 is the ideal (chance): ranked by |value - 0.5|, drawn with a line at 0.5
CHANCE_METRICS = ("classifier_accuracy", "classifier_paired_accuracy")

METRIC_TITLES = {
    "psnr": "PSNR to true LR (dB, higher is better)",
    "ssim": "SSIM to true LR (higher is better)",
    "noise_gap": "noise-level relative gap (lower is better)",
    "laplacian_gap": "Laplacian-energy relative gap (lower is better)",
    "blockiness_gap": "8x8 blockiness relative gap (lower is better)",
    "classifier_accuracy": "classifier accuracy (0.5 = indistinguishable)",
    "classifier_paired_accuracy": "classifier paired (2AFC) accuracy (0.5 = indistinguishable)",
    "classifier_paired_fold_distance": "classifier paired, mean per-fold |accuracy - 0.5| (lower is better)",
    "sr_psnr": "SR proxy PSNR on real pairs (dB, higher is better)",
    "sr_ssim": "SR proxy SSIM on real pairs (higher is better)",
}


def _font():
    try:
        return ImageFont.load_default(size=12)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def bar_chart(
    title: str, groups: dict[str, dict[str, float]], path: Path, ref_line: float | None = None
) -> None:
    """Grouped bars: ``groups[group][series] = value``; one colour per series (generator)."""
    font = _font()
    series = sorted(
        {s for g in groups.values() for s in g}, key=lambda s: list(COLOURS).index(s) if s in COLOURS else 99
    )
    vals = [v for g in groups.values() for v in g.values() if v is not None and math.isfinite(v)]
    if not vals:
        return
    lo = min(0.0, min(vals))
    hi = max(vals + ([ref_line] if ref_line is not None else []))
    hi = hi if hi > lo else lo + 1
    bw, gap, left, top, height = 22, 26, 60, 36, 220
    width = left + len(groups) * (len(series) * bw + gap) + 20
    img = Image.new("RGB", (max(width, 420), top + height + 60), "white")
    dr = ImageDraw.Draw(img)
    dr.text((10, 8), title, fill="black", font=font)
    y0 = top + height

    def ypos(v: float) -> float:
        return y0 - (v - lo) / (hi - lo) * height

    dr.line([(left - 4, top), (left - 4, y0)], fill="black")
    for i in range(5):
        v = lo + (hi - lo) * i / 4
        dr.line([(left - 8, ypos(v)), (left - 4, ypos(v))], fill="black")
        dr.text((4, ypos(v) - 6), f"{v:.3g}", fill="black", font=font)
    if ref_line is not None:
        dr.line([(left - 4, ypos(ref_line)), (img.width - 10, ypos(ref_line))], fill=(200, 120, 0))
    x = left
    for gname, g in groups.items():
        for s in series:
            v = g.get(s)
            if v is not None and math.isfinite(v):
                dr.rectangle([x, ypos(v), x + bw - 3, ypos(lo)], fill=COLOURS.get(s, (100, 100, 200)))
            x += bw
        dr.text((x - len(series) * bw, y0 + 4), gname[:18], fill="black", font=font)
        x += gap
    lx = left
    for s in series:
        dr.rectangle([lx, y0 + 24, lx + 10, y0 + 34], fill=COLOURS.get(s, (100, 100, 200)))
        dr.text((lx + 14, y0 + 22), s, fill="black", font=font)
        lx += 14 + 8 * len(s) + 16
    img.save(path)


def histogram(title: str, values: list[float], bins: int = 12) -> Image.Image:
    """A small histogram panel (Pillow image)."""
    font = _font()
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    img = Image.new("RGB", (300, 190), "white")
    dr = ImageDraw.Draw(img)
    dr.text((8, 6), f"{title} (n={len(vals)})", fill="black", font=font)
    if not vals:
        dr.text((8, 80), "no values", fill="black", font=font)
        return img
    counts, edges = np.histogram(vals, bins=bins)
    top, h, left, w = 26, 120, 30, 250
    peak = max(int(counts.max()), 1)
    bw = w / bins
    for i, c in enumerate(counts):
        x0 = left + i * bw
        dr.rectangle([x0, top + h - c / peak * h, x0 + bw - 2, top + h], fill=(214, 39, 40))
    dr.line([(left, top + h), (left + w, top + h)], fill="black")
    dr.text((left, top + h + 4), f"{edges[0]:.3g}", fill="black", font=font)
    dr.text((left + w - 40, top + h + 4), f"{edges[-1]:.3g}", fill="black", font=font)
    dr.text((4, top), str(peak), fill="black", font=font)
    return img


def _grid(tiles, generated: dict[str, dict[str, np.ndarray]], rows: int, scale: int) -> Image.Image:
    font = _font()
    pick = sorted(tiles, key=lambda t: t.name)
    if len(pick) > rows:  # spread over the photos: evenly spaced in name order
        idx = np.linspace(0, len(pick) - 1, rows).round().astype(int)
        pick = [pick[i] for i in idx]
    cols = ["HR", "true LR", *generated]
    side = pick[0].hr.shape[0]
    pad, head = 4, 18
    img = Image.new("RGB", (len(cols) * (side + pad), head + len(pick) * (side + pad)), "white")
    dr = ImageDraw.Draw(img)
    for c, name in enumerate(cols):
        dr.text((c * (side + pad) + 4, 3), name, fill="black", font=font)
    for r, t in enumerate(pick):
        panels = [t.hr, t.lr, *[generated[g][t.name] for g in generated]]
        for c, a in enumerate(panels):
            im = Image.fromarray(a)
            if im.size[0] != side:
                im = im.resize((side, side), Image.Resampling.NEAREST)
            img.paste(im, (c * (side + pad), head + r * (side + pad)))
    return img


def _fmt(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 100 else f"{v:.1f}"
    return str(v)


def write_report(result: dict, images: dict, out: Path, *, grid_rows: int = 6, scale: int = 4) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(result, indent=1, default=float) + "\n")
    domains = result["domains"]
    gens = list(result["manifest"]["generation"]["generators"])
    figures: list[str] = []
    for key, title in METRIC_TITLES.items():
        groups = {
            d: {g: sec["generators"][g]["metrics"].get(key) for g in gens if g in sec["generators"]}
            for d, sec in domains.items()
        }
        if not any(v is not None for g in groups.values() for v in g.values()):
            continue
        name = f"bars_{key}.png"
        bar_chart(title, groups, out / name, ref_line=0.5 if key in CHANCE_METRICS else None)
        figures.append(name)
    for d, sec in domains.items():
        img = _grid(images[d]["tiles"], images[d]["generated"], grid_rows, scale)
        img.save(out / f"grid_{d}.png")
        sv = sec["generators"].get("realdgen", {}).get("shard_values")
        if sv:
            panels = [
                histogram("tau", sv["tau"]),
                histogram("content error", sv["content_error"]),
                histogram("degradation error", sv["degradation_error"]),
            ]
            canvas = Image.new("RGB", (sum(p.width for p in panels), panels[0].height), "white")
            x = 0
            for p in panels:
                canvas.paste(p, (x, 0))
                x += p.width
            canvas.save(out / f"hist_{d}.png")
    (out / "report.md").write_text(_markdown(result, figures, gens))


def _adaptation_line(result: dict) -> str:
    """What adaptation the report's domains had: on, off, or on for some (a domain without
    refs_train/ is evaluated with the unadapted checkpoint)."""
    m = result["manifest"]
    if not m["adapt"]["enabled"]:
        return "adaptation off"
    doms = result.get("domains", {})
    adapted = [name for name, d in doms.items() if d.get("adapted")]
    steps = f"{m['adapt']['steps']} steps"
    if len(adapted) == len(doms):
        return f"adaptation on ({steps})"
    if not adapted:
        return "adaptation on, but no domain has refs_train/: every domain used the unadapted checkpoint"
    return f"adaptation on ({steps}) for {', '.join(adapted)} only (the others have no refs_train/)"


def _markdown(result: dict, figures: list[str], gens: list[str]) -> str:
    m = result["manifest"]
    lines = [
        "# Realism evaluation",
        "",
        f"Checkpoint `{result['checkpoint']}`; seed {m['seed']}; scale x{m['scale']}; "
        f"{_adaptation_line(result)}; "
        f"{result['seconds']:.0f} s; finished {result['finished_at']}.",
        "",
    ]
    for n in result.get("notices", []):
        lines.append(f"- notice: {n}")
    lines += [
        "",
        "## Summary (mean over tiles; margin = realdgen vs the best baseline, > 0 = realdgen better)",
        "",
    ]
    for key, per in result["summary"].items():
        lines.append(f"### {METRIC_TITLES.get(key, key)}")
        lines.append("")
        lines.append("| domain | " + " | ".join(gens) + " | best | realdgen margin |")
        lines.append("|---" * (len(gens) + 3) + "|")
        for d, row in per.items():
            vals = " | ".join(_fmt(row["values"].get(g)) for g in gens)
            lines.append(f"| {d} | {vals} | {row['best']} | {_fmt(row.get('realdgen_margin'))} |")
        lines.append("")
    lines += ["## Per domain", ""]
    for d, sec in result["domains"].items():
        lines.append(f"### {d}")
        lines.append("")
        lines.append(
            f"{sec['tiles']} tiles, photo groups {sec['groups']}, layout {sec['layout']}; checkpoint "
            f"`{sec.get('checkpoint')}` (digest {str(sec.get('model_digest'))[:12]}, "
            f"adapted: {sec['adapted']}). "
            f"True LR statistics: " + ", ".join(f"{k} {_fmt(v)}" for k, v in sec["truth"].items()) + "."
        )
        for n in sec.get("notes", []):
            lines.append(f"- note: {n}")
        if "sr_proxy" in sec:
            b = sec["sr_proxy"]["bicubic_upsampling"]
            lines.append(
                f"- SR proxy floor (bicubic upsampling of the true LR): {b['psnr']:.2f} dB / {b['ssim']:.4f}"
            )
            for g, n in sec["sr_proxy"].get("inputs_failed", {}).items():
                lines.append(f"- SR proxy: {n} training HR inputs failed for {g} (see its _index.json)")
        clf = {g: v["classifier"] for g, v in sec["generators"].items() if "classifier" in v}
        if clf:
            lines.append(
                "- classifier accuracy (95% CI over test crops): "
                + "; ".join(
                    f"{g} {c['accuracy']:.3f} [{c['accuracy_ci95'][0]:.2f}, {c['accuracy_ci95'][1]:.2f}]"
                    for g, c in clf.items()
                )
            )
            lines.append(
                "- classifier paired (2AFC) accuracy (95% CI over test pairs): "
                + "; ".join(
                    f"{g} {c['paired_accuracy']:.3f} [{c['paired_ci95'][0]:.2f}, {c['paired_ci95'][1]:.2f}]"
                    f" (per fold {', '.join(format(f['paired_accuracy'], '.2f') for f in c['folds'])})"
                    for g, c in clf.items()
                )
            )
        lines.append(f"- timings (s): {sec['timings']}")
        lines.append("")
        lines.append(f"![grid](grid_{d}.png)")
        if (sec["generators"].get("realdgen") or {}).get("shard_values"):
            lines.append(f"![histograms](hist_{d}.png)")
        lines.append("")
    lines += ["## Figures", ""] + [f"![{f}]({f})" for f in figures] + ["", "## Definitions", ""]
    for k, v in result["definitions"].items():
        lines.append(f"- **{k}**: {v}")
    return "\n".join(lines) + "\n"
