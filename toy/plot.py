"""PNG figures for the toy report, drawn with Pillow (which comes with torchvision), so the toy needs
no plotting library: line curves (loss curves, statistics across w), heat maps with a colour bar and
scatter plots coloured by a value (an embedding projected to 2-D).

Every figure is built from panels (PIL images) that `save_panels` lays out on a grid.
"""

import math

from PIL import Image, ImageDraw, ImageFont

# viridis at 0, 1/4, 1/2, 3/4 and 1: perceptually ordered, and still ordered when printed in grey
VIRIDIS = [(68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37)]
# distinguishable line colours (matplotlib's "tab10"), used in turn
LINE_COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
                (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]
NOT_FINITE = (160, 160, 160)  # cells whose value is NaN or infinite (a diverged run)
INK, GRID, WHITE = (0, 0, 0), (225, 225, 225), (255, 255, 255)
MARGIN = dict(left=64, right=12, top=34, bottom=40)  # room for the title, tick labels, axis labels
LEGEND_LINE = 13  # px per legend entry


def font():
    """Pillow's built-in font: nothing to install, readable at these sizes."""
    return ImageFont.load_default()


def colour_of(v):
    """A value v in [0, 1] -> an RGB tuple of the viridis map, linear between its anchors."""
    v = min(max(v, 0.0), 1.0) * (len(VIRIDIS) - 1)
    i = min(int(v), len(VIRIDIS) - 2)
    a, b, f = VIRIDIS[i], VIRIDIS[i + 1], v - i
    return tuple(round(p + (q - p) * f) for p, q in zip(a, b))


def unit(value, lo, hi, log):
    """Where value lies between lo and hi, as a fraction in [0, 1] (clamped), on a log or linear scale."""
    if log:
        value, lo, hi = (math.log10(max(v, 1e-30)) for v in (value, lo, hi))
    return 0.5 if hi == lo else min(max((value - lo) / (hi - lo), 0.0), 1.0)


def label(v):
    """A tick label: three significant digits, no trailing zeros."""
    return f"{v:.3g}"


def ticks(lo, hi, log, n=5):
    """Tick values covering [lo, hi]. On a log scale: the powers of ten inside, or 1, 2 and 5 times
    them when fewer than three fit (the ends if even those are fewer than two). On a linear scale:
    about n round steps of 1, 2 or 5 times a power of ten."""
    if log:
        decades = range(math.floor(math.log10(lo)), math.floor(math.log10(hi)) + 1)
        for mantissas in ((1,), (1, 2, 5)):
            inside = [m * 10.0 ** k for k in decades for m in mantissas if lo <= m * 10.0 ** k <= hi]
            if len(inside) >= 3:
                return inside
        return inside if len(inside) >= 2 else [lo, hi]
    if hi == lo:
        return [lo]
    raw = (hi - lo) / n
    step = min((m * 10 ** math.floor(math.log10(raw)) for m in (1, 2, 5, 10)), key=lambda s: abs(s - raw))
    first = math.ceil(lo / step)
    return [k * step for k in range(first, math.floor(hi / step) + 1)]


def finite_range(values, log):
    """(lo, hi) of the finite values (positive ones on a log scale), widened when they are equal."""
    vals = [v for v in values if math.isfinite(v) and (v > 0 or not log)]
    if not vals:
        return (1.0, 10.0) if log else (0.0, 1.0)
    lo, hi = min(vals), max(vals)
    if lo == hi:
        return (lo / 2, hi * 2) if log else (lo - 1, hi + 1)
    return lo, hi


def wrap(text, width):
    """Split text at spaces into lines no wider than `width` px (a longer word keeps its own line)."""
    lines = [""]
    for word in text.split(" "):
        joined = f"{lines[-1]} {word}".strip()
        if lines[-1] and font().getlength(joined) > width:
            lines.append(word)
        else:
            lines[-1] = joined
    return lines


def frame(size, title, x_label, y_label, below=0):
    """A white panel with its title (on up to two lines) and axis labels, and `below` px free under
    the x label; returns (image, draw, plot box (x0, y0, x1, y1))."""
    image = Image.new("RGB", size, WHITE)
    draw = ImageDraw.Draw(image)
    box = (MARGIN["left"], MARGIN["top"], size[0] - MARGIN["right"], size[1] - MARGIN["bottom"] - below)
    for k, line in enumerate(wrap(title, size[0] - 8)[:2]):
        draw.text((size[0] // 2, 3 + 13 * k), line, fill=INK, font=font(), anchor="ma")
    draw.text(((box[0] + box[2]) // 2, box[3] + MARGIN["bottom"] - 4), x_label, fill=INK, font=font(), anchor="md")
    side = Image.new("RGB", (box[3] - box[1], 14), WHITE)  # the y label, drawn flat then turned
    ImageDraw.Draw(side).text((side.width // 2, 1), y_label, fill=INK, font=font(), anchor="ma")
    image.paste(side.rotate(90, expand=True), (2, box[1]))
    return image, draw, box


def axes(draw, box, x_range, y_range, log_y, x_grid=False):
    """Tick labels on both axes of the plot box, grid lines across it at the y ticks (and at the x
    ticks with x_grid, else short tick marks). Returns (px, py): data coordinates -> pixels."""
    (x0, y0, x1, y1), (x_lo, x_hi), (y_lo, y_hi) = box, x_range, y_range
    px = lambda x: x0 + (x1 - x0) * unit(x, x_lo, x_hi, False)
    py = lambda y: y1 - (y1 - y0) * unit(y, y_lo, y_hi, log_y)
    for t in ticks(y_lo, y_hi, log_y):
        draw.line([(x0, py(t)), (x1, py(t))], fill=GRID)
        draw.text((x0 - 4, py(t)), label(t), fill=INK, font=font(), anchor="rm")
    for t in ticks(x_lo, x_hi, False):
        draw.line([(px(t), y0 if x_grid else y1), (px(t), y1 if x_grid else y1 + 3)], fill=GRID if x_grid else INK)
        draw.text((px(t), y1 + 5), label(t), fill=INK, font=font(), anchor="ma")
    return px, py


def line_panel(series, title, x_label, y_label, log_y=False, size=(440, 280), hlines=None):
    """Curves on shared axes: series {name: (xs, ys)}; hlines {name: y} draws dashed reference lines
    (e.g. the real data's value). A legend under the axes lists every name. Returns a PIL image."""
    hlines = hlines or {}
    names = list(series) + list(hlines)
    below = LEGEND_LINE * len(names) + 4
    image, draw, (x0, y0, x1, y1) = frame((size[0], size[1] + below), title, x_label, y_label, below)
    xs_all = [x for xs, _ in series.values() for x in xs]
    x_lo, x_hi = finite_range(xs_all, False)
    y_lo, y_hi = finite_range([y for _, ys in series.values() for y in ys] + list(hlines.values()), log_y)
    px, py = axes(draw, (x0, y0, x1, y1), (x_lo, x_hi), (y_lo, y_hi), log_y)
    colours = {n: LINE_COLOURS[i % len(LINE_COLOURS)] for i, n in enumerate(names)}
    for name, y in hlines.items():
        for a in range(int(x0), int(x1), 8):  # dashes of 4 px
            draw.line([(a, py(y)), (min(a + 4, x1), py(y))], fill=colours[name], width=2)
    for name, (xs, ys) in series.items():
        points = [(px(x), py(y)) for x, y in zip(xs, ys) if math.isfinite(y) and (y > 0 or not log_y)]
        if len(points) > 1:
            draw.line(points, fill=colours[name], width=2)
        elif points:
            draw.ellipse([points[0][0] - 2, points[0][1] - 2, points[0][0] + 2, points[0][1] + 2],
                         fill=colours[name])
    draw.rectangle([x0, y0, x1, y1], outline=INK)
    for i, name in enumerate(names):  # the legend, under the x label
        y = y1 + MARGIN["bottom"] + 4 + LEGEND_LINE * i
        draw.line([(x0, y), (x0 + 16, y)], fill=colours[name], width=2)
        draw.text((x0 + 22, y), name, fill=INK, font=font(), anchor="lm")
    return image


def heatmap_panel(values, xs, ys, title, x_label, y_label, lo, hi, log=True, outline=None, cell=(34, 24)):
    """A heat map: values[r][c] at x = xs[c], y = ys[r] (ys[0] at the bottom), coloured on [lo, hi]
    (log scale if `log`); non-finite cells grey. outline = (c0, c1) draws a white box around the
    columns c0..c1 (e.g. the w range a student was trained on). Returns a PIL image."""
    w, h = len(xs) * cell[0], len(ys) * cell[1]
    size = (MARGIN["left"] + w + MARGIN["right"], MARGIN["top"] + h + MARGIN["bottom"])
    image, draw, (x0, y0, _, y1) = frame(size, title, x_label, y_label)
    for r, row in enumerate(values):
        top = y1 - (r + 1) * cell[1]
        draw.text((x0 - 4, top + cell[1] // 2), label(ys[r]), fill=INK, font=font(), anchor="rm")
        for c, v in enumerate(row):
            fill = colour_of(unit(v, lo, hi, log)) if math.isfinite(v) else NOT_FINITE
            draw.rectangle([x0 + c * cell[0], top, x0 + (c + 1) * cell[0] - 1, top + cell[1] - 1], fill=fill)
    for c, x in enumerate(xs):
        draw.text((x0 + c * cell[0] + cell[0] // 2, y1 + 4), label(x), fill=INK, font=font(), anchor="ma")
    if outline is not None:
        draw.rectangle([x0 + outline[0] * cell[0], y0, x0 + (outline[1] + 1) * cell[0] - 1, y1 - 1],
                       outline=WHITE, width=2)
    return image


def equal_ranges(xs, ys, width, height):
    """(x_lo, x_hi), (y_lo, y_hi) covering the points, widened about their centres so that one
    unit spans as many pixels along x (box `width` px) as along y (`height` px): distances in the
    plot are the data's (a projection keeps its shape)."""
    (x_lo, x_hi), (y_lo, y_hi) = finite_range(xs, False), finite_range(ys, False)
    per_px = max((x_hi - x_lo) / width, (y_hi - y_lo) / height) * 1.08  # a margin so no point touches the box
    xc, yc = (x_lo + x_hi) / 2, (y_lo + y_hi) / 2
    return (xc - per_px * width / 2, xc + per_px * width / 2), (yc - per_px * height / 2, yc + per_px * height / 2)


def scatter_panel(xs, ys, values, title, x_label, y_label, lo, hi, hollow=None, size=(300, 280), radius=3):
    """Points (xs[i], ys[i]) on equal axes (equal_ranges), each a disc coloured by values[i] on
    [lo, hi] (linear viridis; pair it with colour_bar); hollow[i] True draws a ring instead (e.g.
    a w outside a student's trained range). Drawn in the given order. Returns a PIL image."""
    image, draw, (x0, y0, x1, y1) = frame(size, title, x_label, y_label)
    (x_lo, x_hi), (y_lo, y_hi) = equal_ranges(xs, ys, x1 - x0, y1 - y0)
    px, py = axes(draw, (x0, y0, x1, y1), (x_lo, x_hi), (y_lo, y_hi), False, x_grid=True)
    hollow = hollow or [False] * len(xs)
    for x, y, v, ring in zip(xs, ys, values, hollow):
        if not (math.isfinite(x) and math.isfinite(y)):
            continue
        disc = [px(x) - radius, py(y) - radius, px(x) + radius, py(y) + radius]
        colour = colour_of(unit(v, lo, hi, False))
        if ring:
            draw.ellipse(disc, outline=colour, width=1)
        else:
            draw.ellipse(disc, fill=colour)
    draw.rectangle([x0, y0, x1, y1], outline=INK)
    return image


def colour_bar(lo, hi, log, title, height=220):
    """The scale of heat maps coloured on [lo, hi]: a vertical gradient with tick labels."""
    size = (110, height)
    image = Image.new("RGB", size, WHITE)
    draw = ImageDraw.Draw(image)
    top, bottom, left = MARGIN["top"], height - MARGIN["bottom"], 12
    draw.text((4, 4), title, fill=INK, font=font())
    for y in range(top, bottom + 1):
        draw.line([(left, y), (left + 16, y)], fill=colour_of((bottom - y) / (bottom - top)))
    for t in ticks(lo, hi, log):
        y = bottom - (bottom - top) * unit(t, lo, hi, log)
        draw.line([(left + 16, y), (left + 20, y)], fill=INK)
        draw.text((left + 23, y), label(t), fill=INK, font=font(), anchor="lm")
    return image


def save_panels(panels, path, columns=2):
    """Lay panels out row by row, `columns` per row, on a white canvas, and write one PNG."""
    rows = [panels[i:i + columns] for i in range(0, len(panels), columns)]
    width = max(sum(p.width for p in row) for row in rows)
    heights = [max(p.height for p in row) for row in rows]
    canvas = Image.new("RGB", (width, sum(heights)), WHITE)
    y = 0
    for row, h in zip(rows, heights):
        x = 0
        for p in row:
            canvas.paste(p, (x, y))
            x += p.width
        y += h
    canvas.save(path)
