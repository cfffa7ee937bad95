"""Regenerate assets/states_outlines.json, the STATES outlines, from the US Census boundary file.

Source: US Census Bureau, 2016 cartographic boundary file cb_2016_us_state_500k (1:500,000),
as shipped inside the PyPI package plotly-geo. Each state's outline is read with pyshp, its
small islands dropped (Michigan keeps both peninsulas), and simplified with Douglas-Peucker
until it has 100-200 vertices. Only this tool needs plotly-geo and pyshp:

    pip install plotly-geo pyshp && python tools/make_states_outlines.py
"""
import json
import os

import numpy as np
import shapefile  # pyshp
import _plotly_geo

STATES = ["Michigan", "Idaho", "Ohio", "Oklahoma", "Wisconsin"]  # label order 0..4
PARTS_KEPT = {"Michigan": 2}  # the Upper and Lower Peninsula; every other state keeps its mainland
TARGET_VERTICES = (120, 180)
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "assets", "states_outlines.json")


def polygon_area(p):
    x, y = p[:, 0], p[:, 1]
    return 0.5 * abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))


def douglas_peucker(p, eps):
    """Keep the end points; recursively keep the farthest point from the chord if it is > eps away."""
    keep = np.zeros(len(p), dtype=bool)
    keep[0] = keep[-1] = True
    stack = [(0, len(p) - 1)]
    while stack:
        i, j = stack.pop()
        if j <= i + 1:
            continue
        a, b, mid = p[i], p[j], p[i + 1:j]
        ab = b - a
        norm = np.hypot(*ab)
        if norm == 0:
            d = np.hypot(*(mid - a).T)
        else:
            d = np.abs(ab[0] * (mid[:, 1] - a[1]) - ab[1] * (mid[:, 0] - a[0])) / norm
        k = int(np.argmax(d))
        if d[k] > eps:
            keep[i + 1 + k] = True
            stack += [(i, i + 1 + k), (i + 1 + k, j)]
    return p[keep]


def simplify(rings, lo, hi):
    """Bisect the tolerance until the total vertex count of all rings lies in [lo, hi]."""
    a, b = 0.0, 1.0
    for _ in range(60):
        eps = 0.5 * (a + b)
        out = [douglas_peucker(r, eps) for r in rings]
        n = sum(len(r) - 1 for r in out)  # rings are closed: first point == last point
        if n > hi:
            a = eps
        elif n < lo:
            b = eps
        else:
            return out
    return out


def main():
    path = os.path.join(os.path.dirname(_plotly_geo.__file__), "package_data", "cb_2016_us_state_500k")
    reader = shapefile.Reader(path)
    fields = [f[0] for f in reader.fields[1:]]
    result = {"source": "US Census Bureau cb_2016_us_state_500k (via the plotly-geo package), "
                        "simplified with Douglas-Peucker by tools/make_states_outlines.py",
              "units": "degrees (longitude, latitude)", "states": {}}
    for rec, shp in zip(reader.records(), reader.shapes()):
        name = rec[fields.index("NAME")]
        if name not in STATES:
            continue
        pts = np.asarray(shp.points, dtype=np.float64)
        bounds = list(shp.parts) + [len(pts)]
        rings = [pts[bounds[k]:bounds[k + 1]] for k in range(len(shp.parts))]
        rings.sort(key=polygon_area, reverse=True)
        rings = rings[:PARTS_KEPT.get(name, 1)]
        rings = simplify(rings, *TARGET_VERTICES)
        result["states"][name] = [np.round(r, 4).tolist() for r in rings]
        print(f"{name}: {len(rings)} ring(s), {sum(len(r) - 1 for r in rings)} vertices")
    result["states"] = {s: result["states"][s] for s in STATES}
    with open(OUT, "w") as f:
        json.dump(result, f, separators=(",", ":"))
    print(f"wrote {os.path.normpath(OUT)} ({os.path.getsize(OUT) / 1024:.1f} KB)")


if __name__ == "__main__":
    main()
