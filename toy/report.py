"""What the toy run shows a reader: PNG grids of samples and report.md with the paper's tables in
small (Tables 1/3/4: cost, prompt accuracy, Fréchet distance; Fig. 5a: a sweep over w; Fig. 4: a
grid of samples, rows w, columns methods)."""

import os

import torch
from torchvision.utils import make_grid, save_image

from .data import to_uint8


def save_grid(images, path, nrow=8):
    """Write images (N, C, H, W) in [-1, 1] as one PNG grid."""
    save_image(to_uint8(images.cpu()).float() / 255, path, nrow=nrow, padding=1, pad_value=0.5)


def save_w_grid(rows, path):
    """Fig. 4 in small: rows {w: {method: images (k, C, H, W)}} -> one PNG, a row per w, the
    methods side by side (k images each, the same prompts and noise everywhere)."""
    lines = []
    for by_method in rows.values():
        blocks = [make_grid(to_uint8(x.cpu()).float() / 255, nrow=len(x), padding=1, pad_value=0.5)
                  for x in by_method.values()]
        gap = torch.ones(blocks[0].shape[0], blocks[0].shape[1], 4)  # white gap between methods
        lines.append(torch.cat([b if i == 0 else torch.cat([gap, b], dim=2) for i, b in enumerate(blocks)], dim=2))
    save_image(torch.cat(lines, dim=1), path)  # (C, H', W') in [0, 1]


def _fmt(v, spec):
    return "—" if v is None else format(v, spec)


def write_report(out, info, table, sweep, grid_methods, grid_ws):
    """report.md in `out`: run facts, the main table, the w sweep, and links to the grids."""
    lines = [f"# Toy run: {info['data']}, preset {info['preset']}", ""]
    lines += [f"- {k}: {v}" for k, v in info["facts"].items()]
    lines += ["", f"## Samplers and students at w = {info['w']} (paper's convention)", "",
              "| method | forward passes / step (made) | nominal | ms / image | prompt accuracy | "
              "Fréchet distance | RMS to its teacher's sample |", "|---|---|---|---|---|---|---|"]
    for name, r in table.items():
        lines.append(f"| {name} | {r['passes']:.3g} | {r['nominal']:.3g} | {r['ms']:.3f} | "
                     f"{100 * r['accuracy']:.1f}% | {r['fd']:.3f} | {_fmt(r.get('rms'), '.3f')} |")
    lines += ["", info["speed_line"], "",
              "Prompt accuracy: the evaluator's prediction matches every attribute of the prompt. "
              "Fréchet distance: between the evaluator's features of the samples and of the held-out "
              "real images. RMS to its teacher's sample: per-pixel distance (images in [-1, 1]) between "
              "a student's sample and its teacher sampler's sample from the same noise and prompt.", "",
              "## Sweep over w (Fig. 5a in small)", "",
              "| w | " + " | ".join(f"{m} accuracy | {m} FD" for m in sweep["methods"]) + " |",
              "|---|" + "---|---|" * len(sweep["methods"])]
    for w, row in sweep["rows"].items():
        lines.append(f"| {w:g} | " + " | ".join(f"{100 * row[m]['accuracy']:.1f}% | {row[m]['fd']:.3f}"
                                                 for m in sweep["methods"]) + " |")
    lines += ["", "## Samples", "",
              f"Rows w = {', '.join(f'{w:g}' for w in grid_ws)}; columns, left to right: "
              f"{', '.join(grid_methods)} (same prompts and noise in every block).", "",
              "![w grid](grid_w.png)", ""]
    lines += [f"- {name}: ![{name}]({r['grid']})" for name, r in table.items()]
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
