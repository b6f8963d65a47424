"""toy/plot.py: colours, ticks and the data-to-pixel mapping, checked by hand on small figures."""

import math

import pytest

from toy import plot


def test_colour_map_and_ticks_by_hand():
    assert plot.colour_of(0.0) == (68, 1, 84) and plot.colour_of(1.0) == (253, 231, 37)
    # 1/3 of the way: 4/3 of the 4 segments, a third of the way from anchor 1 to anchor 2
    assert plot.colour_of(1 / 3) == (round(59 - 26 / 3), round(82 + 63 / 3), round(139 + 1 / 3))
    assert plot.unit(100.0, 1.0, 1000.0, log=True) == 2 / 3 and plot.unit(5.0, 0.0, 10.0, log=False) == 0.5
    assert plot.ticks(2, 14, log=False) == [2, 4, 6, 8, 10, 12, 14]
    assert plot.ticks(1, 3000, log=True) == [1, 10, 100, 1000]
    assert plot.ticks(0.05, 0.5, log=True) == [0.05, 0.1, 0.2, 0.5]  # fewer than 3 decades: 1-2-5
    assert plot.ticks(0.3, 0.35, log=True) == [0.3, 0.35]  # nothing round inside: the ends


def test_heatmap_cells_take_their_values_colours():
    # values 1, 10 (row 0, drawn at the bottom) and 100, 1000 (row 1) on a log scale over [1, 1000]:
    # fractions 0, 1/3, 2/3, 1 of the colour map; a NaN cell is grey
    cell = (30, 20)
    panel = plot.heatmap_panel([[1.0, 10.0], [100.0, math.nan]], [0, 1], [0.2, 0.8], "t", "w", "t",
                               1.0, 1000.0, log=True, cell=cell)
    x0, bottom = plot.MARGIN["left"], panel.height - plot.MARGIN["bottom"]

    def centre(r, c):
        return panel.getpixel((x0 + c * cell[0] + cell[0] // 2, bottom - r * cell[1] - cell[1] // 2))
    assert centre(0, 0) == plot.colour_of(0.0)
    assert centre(0, 1) == plot.colour_of(1 / 3)
    assert centre(1, 0) == plot.colour_of(2 / 3)
    assert centre(1, 1) == plot.NOT_FINITE


def test_line_lands_where_its_data_says():
    # one line from (0, 0) to (10, 10), with x and y on equal ranges: it runs along the plot box's
    # diagonal from the lower left (small y at the bottom) to the upper right, through the centre
    panel = plot.line_panel({"a": ([0, 10], [0, 10])}, "title", "x", "y")
    x0, y0 = plot.MARGIN["left"], plot.MARGIN["top"]
    x1 = panel.width - plot.MARGIN["right"]
    y1 = panel.height - plot.MARGIN["bottom"] - (plot.LEGEND_LINE + 4)  # one legend entry below

    def line_near(fx, fy):  # the line's colour within a pixel above or below the point (fx, fy) of the box
        x, y = round(x0 + fx * (x1 - x0)), round(y1 - fy * (y1 - y0))
        return any(panel.getpixel((x, y + dy)) == plot.LINE_COLOURS[0] for dy in (-1, 0, 1))
    assert line_near(0.5, 0.5) and line_near(0.25, 0.25) and line_near(0.75, 0.75)
    assert not line_near(0.25, 0.75) and not line_near(0.75, 0.25)  # not the other diagonal (y upside down)


def test_panels_are_laid_out_row_by_row(tmp_path):
    from PIL import Image
    panels = [Image.new("RGB", (10, 20), (255, 0, 0)), Image.new("RGB", (30, 5), (0, 255, 0)),
              Image.new("RGB", (7, 7), (0, 0, 255))]
    plot.save_panels(panels, tmp_path / "p.png", columns=2)
    image = Image.open(tmp_path / "p.png")
    assert image.size == (40, 27)  # rows of widths 40 and 7, heights 20 and 7
    assert image.getpixel((5, 5)) == (255, 0, 0) and image.getpixel((15, 2)) == (0, 255, 0)
    assert image.getpixel((3, 23)) == (0, 0, 255) and image.getpixel((20, 23)) == (255, 255, 255)


def test_scatter_points_land_where_their_data_says_on_equal_axes():
    # two points at (0, 0) (value 0: the map's first colour) and (10, 5) (value 1: its last, a
    # ring); one unit spans as many pixels along x as along y, the points' centre at the box's centre
    panel = plot.scatter_panel([0.0, 10.0], [0.0, 5.0], [0.0, 1.0], "title", "x", "y", 0.0, 1.0,
                               hollow=[False, True], size=(300, 300), radius=3)
    x0, y0 = plot.MARGIN["left"], plot.MARGIN["top"]
    x1, y1 = panel.width - plot.MARGIN["right"], panel.height - plot.MARGIN["bottom"]
    (x_lo, x_hi), (y_lo, y_hi) = plot.equal_ranges([0.0, 10.0], [0.0, 5.0], x1 - x0, y1 - y0)
    assert (x_hi - x_lo) / (x1 - x0) == pytest.approx((y_hi - y_lo) / (y1 - y0))
    assert (x_lo + x_hi) / 2 == pytest.approx(5.0) and (y_lo + y_hi) / 2 == pytest.approx(2.5)
    assert x_lo < 0.0 and x_hi > 10.0  # a margin: no point on the frame

    def at(x, y):
        return (round(x0 + (x1 - x0) * (x - x_lo) / (x_hi - x_lo)),
                round(y1 - (y1 - y0) * (y - y_lo) / (y_hi - y_lo)))
    assert panel.getpixel(at(0.0, 0.0)) == plot.colour_of(0.0)  # a filled disc
    cx, cy = at(10.0, 5.0)
    assert panel.getpixel((cx, cy)) != plot.colour_of(1.0)  # a ring: its centre is not filled
    edge = [panel.getpixel((cx + dx, cy + dy)) for dx in (-4, -3, -2, 2, 3, 4) for dy in (-1, 0, 1)]
    assert plot.colour_of(1.0) in edge  # its edge is
