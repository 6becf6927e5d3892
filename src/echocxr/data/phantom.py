"""Synthetic chest radiograph phantoms drawn from a study's structured findings.

Real images are not available here, so every model stage trains and is judged on phantoms whose
content is decided by the study's findings (IU: the human-coded MeSH terms; other sources: the
labeler's positive labels). Phantoms are synthetic drawings for validating methods; they carry
no clinical meaning.

How a phantom is made: a patient (habitus, inspiration, heart size, rib pitch, ...) and the
findings' unstated attributes (side, zone, severity) are drawn from `seed`, so the frontal and the
lateral view of one seed show the same patient. Each view draws its own positioning, rotation,
exposure and noise. Anatomy lives in patient coordinates: frontal `u` across the chest (negative =
patient's right = image left, the cage's lateral wall at |u| ~ 0.9) and `v` down the chest (0 = lung
apices, ~1 = costophrenic angles); lateral `w` front to back (negative = anterior = image left).
Everything is an attenuation map `A` built from soft-edged masks computed with whole-array numpy on
one coordinate grid per render (no per-pixel Python, no convolutions), then one exposure curve.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import math
import os
import re
import tempfile
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image

from echocxr.data.mesh import mesh_to_findings
from echocxr.data.observations import (
    LATERALITIES,
    OBSERVATIONS,
    SEVERITIES,
    STATUSES,
    SUBTYPES,
    ZONES,
    Finding,
    Findings,
)
from echocxr.errors import UserError

VIEWS: tuple[str, ...] = ("frontal", "lateral")
MIN_SIZE, MAX_SIZE = 112, 512

# What each view cannot show; the findings stay in the truth but nothing is drawn for them there.
NOT_SHOWN_ON_LATERAL: frozenset[str] = frozenset({"scoliosis"})


class PhantomWarning(UserWarning):
    """A finding (or one of its attributes) that the renderer does not understand and skips."""


# --------------------------------------------------------------------------------------------
# Findings: validation and the attributes a render fills in
# --------------------------------------------------------------------------------------------


def _coerce(key: str, value: object) -> Finding | None:
    """One entry of a findings mapping -> a valid Finding, warning about what is ignored."""
    if isinstance(value, Finding):
        obs, attrs = value.observation, value.to_dict()
    elif isinstance(value, Mapping):
        attrs = dict(value)
        obs = attrs.get("observation", key)
    else:
        warnings.warn(f"finding {key!r}: {type(value).__name__} is not a Finding; ignored", PhantomWarning, 3)
        return None
    if obs not in OBSERVATIONS:
        warnings.warn(f"unknown observation {obs!r}; not drawn", PhantomWarning, 3)
        return None
    allowed = {"laterality": LATERALITIES, "severity": SEVERITIES, "zone": ZONES, "status": STATUSES}
    clean: dict[str, object] = {"observation": obs}
    for name, val in attrs.items():
        if name == "observation" or val is None:
            continue
        if name in allowed and val not in allowed[name]:
            warnings.warn(f"{obs}: unknown {name} {val!r}; ignored", PhantomWarning, 3)
        elif name == "subtype" and val not in SUBTYPES.get(obs, ()):
            warnings.warn(f"{obs}: unknown subtype {val!r}; ignored", PhantomWarning, 3)
        elif name not in allowed and name != "subtype":
            warnings.warn(f"{obs}: unknown attribute {name!r}; ignored", PhantomWarning, 3)
        else:
            clean[name] = val
    return Finding.from_dict(clean)


def _valid_positive(findings: Mapping[str, object]) -> dict[str, Finding]:
    out: dict[str, Finding] = {}
    for key, value in findings.items():
        f = _coerce(key, value)
        if f is not None and f.status == "positive":
            out[f.observation] = f
    return out


# Attributes a finding needs to be drawn; unstated ones are drawn from the seed.
_DEFAULT_SEVERITY = {"cardiomegaly": ("mild", "moderate", "moderate", "severe")}
_SIDED = {
    "pleural_effusion": ("left", "right", "bilateral", "bilateral"),
    "pneumothorax": ("left", "right"),
    "consolidation": ("left", "right", "right"),
    "pneumonia": ("left", "right", "right", "bilateral"),
    "lung_opacity": ("left", "right", "bilateral"),
    "atelectasis": ("left", "right", "bilateral"),
    "lung_lesion": ("left", "right"),
    "calcified_granuloma": ("left", "right", "right"),
    "pleural_other": ("left", "right", "bilateral"),
    "fracture": ("left", "right"),
}
_ZONED = {
    "consolidation": ("lower", "lower", "middle", "upper"),
    "pneumonia": ("lower", "lower", "middle"),
    "lung_opacity": ("lower", "lower", "middle", "upper"),
    "atelectasis": ("lower", "lower", "lower", "middle"),
    "lung_lesion": ("upper", "middle", "lower"),
    "calcified_granuloma": ("upper", "middle", "lower"),
    "pleural_other": ("upper", "middle", "lower"),
}
_DEFAULT_SUBTYPE = {
    "lung_lesion": ("nodule", "nodule", "nodule", "mass"),
    "atelectasis": ("linear",),
    "support_devices": ("pacemaker", "central_line", "central_line"),
    "fracture": ("rib",),
    "edema": ("edema", "vascular_congestion"),
    "aortic_abnormality": ("tortuous", "calcified"),
}
_SEVERITY_FOR = {
    "pleural_effusion": ("mild", "mild", "moderate", "severe"),
    "pneumothorax": ("mild", "moderate", "moderate", "severe"),
    "scoliosis": ("mild", "moderate", "moderate", "severe"),
    "hyperinflation": ("mild", "moderate", "moderate", "severe"),
    "edema": ("mild", "moderate", "moderate", "severe"),
    "enlarged_cardiomediastinum": ("mild", "moderate", "severe"),
    "lung_opacity": ("mild", "moderate", "moderate"),
}


def _choose(rng: np.random.Generator, options: tuple[str, ...]) -> str:
    """rng.choice(options) (the same draw from the stream) without building an array."""
    return options[int(rng.integers(len(options)))]


def _resolve(findings: dict[str, Finding], rng: np.random.Generator) -> dict[str, Finding]:
    """Fill in the side, zone, severity and subtype that a finding leaves open."""
    out: dict[str, Finding] = {}
    for obs in OBSERVATIONS:  # fixed order: the draws do not depend on dict order
        f = findings.get(obs)
        if f is None:
            continue
        lat, zone, sev, sub = f.laterality, f.zone, f.severity, f.subtype
        if obs in _SIDED and lat is None:
            lat = _choose(rng, _SIDED[obs])
        if obs in _ZONED and zone is None:
            zone = _choose(rng, _ZONED[obs])
        if sev is None:
            options = _DEFAULT_SEVERITY.get(obs) or _SEVERITY_FOR.get(obs)
            if options:
                sev = _choose(rng, options)
        if obs in _DEFAULT_SUBTYPE and sub is None:
            sub = _choose(rng, _DEFAULT_SUBTYPE[obs])
        if obs == "fracture" and sub in ("rib", "clavicle") and lat == "bilateral":
            lat = _choose(rng, ("left", "right"))
        out[obs] = Finding(obs, "positive", lat, sev, zone, sub)
    if len(out) > 1:
        out.pop("no_finding", None)
    return out


def _sides(f: Finding) -> tuple[int, ...]:
    """Image-side signs of a finding: -1 the patient's right (image left), +1 the left."""
    return {"right": (-1,), "left": (1,), "bilateral": (-1, 1)}.get(f.laterality or "right", (-1,))


_SEV = {"mild": 0, "moderate": 1, "severe": 2, None: 1}


def _pick(f: Finding, values: tuple[float, float, float]) -> float:
    return values[_SEV[f.severity]]


# --------------------------------------------------------------------------------------------
# Patient and pose: the nuisance variation
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Anatomy:
    """One patient's anatomy in patient coordinates (see the module docstring)."""

    cage: float = 0.88  # lateral lung edge at the bases
    med: float = 0.09  # medial lung edge at the apex
    v_full: float = 0.95  # depth at which the lungs reach full width
    dome_r: float = 0.88  # top of the right hemidiaphragm dome
    dome_l: float = 0.93
    dome_k: float = 1.0  # dome curvature (hyperinflation flattens it)
    heart_l: float = 0.48  # left heart border (left ventricle), distance from the midline
    heart_r: float = 0.27  # right heart border (right atrium)
    heart_top: float = 0.42  # where the heart's silhouette starts below the hila
    med_w: float = 0.10  # superior mediastinum half-width
    knob_u: float = 0.19  # aortic knob
    knob_v: float = 0.20
    knob_r: float = 0.06
    spine_amp: float = 0.0  # scoliosis: lateral deviation of the spine
    spine_phase: float = 0.0
    rib_v0: float = 0.0
    rib_pitch: float = 0.105
    air: float = 0.72  # how much darker aerated lung is than soft tissue
    body_w: float = 1.14
    breast: float = 0.0
    bubble: float = 0.10  # gastric bubble radius
    vessel_gain: float = 0.13
    upper_vessels: float = 1.0  # > 1: upper-zone redistribution (vascular congestion)
    hilum: float = 1.0  # hilar size factor
    vessel_var: int = 0
    vessel_du: float = 0.0
    vessel_dv: float = 0.0
    ap_depth: float = 1.0  # lateral view: antero-posterior diameter factor (barrel chest)
    sex_female: bool = False

    def lateral_edge(self, v, side: int | None = None):
        x = np.clip(v * (1.0 / self.v_full), 0.0, 1.0)
        # ~sqrt near the apex (a rounded top), still widening toward the costophrenic angles.
        return self.med + (self.cage - self.med) * np.sqrt(x) * (1.3 - 0.3 * x)

    def medial_edge(self, v):
        return self.med + 0.06 * np.clip(v, 0.0, 1.0)

    def dome(self, a, side: int):
        top = self.dome_r if side < 0 else self.dome_l
        return top + self.dome_k * (a - 0.42) ** 2

    @property
    def ctr(self) -> float:
        """Cardiothoracic ratio: heart width over the thorax's inner width."""
        return (self.heart_l + self.heart_r) / (2.0 * self.cage)

    @property
    def heart_v(self) -> float:
        return 0.5 * (self.heart_top + self.dome_l)

    def mediastinum_edges(self, v):
        """(right, left) distances of the mediastinal silhouette from the midline at depth v."""
        x = np.clip((v - self.heart_top) * (1.0 / (self.dome_l + 0.05 - self.heart_top)), 0.0, 1.0)
        left = (
            self.med_w + (self.heart_l - self.med_w) * np.sin(np.minimum(x * 1.3, 1.0) * (np.pi / 2)) ** 0.8
        )
        xr = np.clip((v - self.heart_top - 0.08) * (1.0 / 0.35), 0.0, 1.0)
        right = self.med_w + (self.heart_r - self.med_w) * np.sin(xr * (np.pi / 2)) ** 0.7
        c = np.clip(1.0 - ((v - self.knob_v) * (1.0 / (1.3 * self.knob_r))) ** 2, 0.0, 1.0)
        knob = (self.knob_u + self.knob_r * np.sqrt(c)) * (c > 0)
        return right, np.maximum(left, knob)

    def lung_point(self, side: int, t: float, v: float) -> tuple[float, float]:
        """(u, v) of the point at lateral fraction t and depth v of one lung."""
        m, lat = float(self.medial_edge(v)), float(self.lateral_edge(v))
        return side * (m + t * (lat - m)), v


def _draw_anatomy(rng: np.random.Generator) -> Anatomy:
    female = bool(rng.random() < 0.45)
    inspiration = rng.normal(0.0, 0.035)
    cage = float(rng.uniform(0.84, 0.92))
    # Normal cardiothoracic ratio ~0.38-0.47.
    ctr = float(np.clip(rng.normal(0.425, 0.02), 0.38, 0.47))
    right_share = float(rng.uniform(0.33, 0.40))
    return Anatomy(
        cage=cage,
        med=float(rng.uniform(0.07, 0.11)),
        v_full=float(rng.uniform(0.85, 1.05)),
        dome_r=0.88 + inspiration + float(rng.normal(0, 0.015)),
        dome_l=0.93 + inspiration + float(rng.normal(0, 0.015)),
        dome_k=float(rng.uniform(0.6, 0.9)),
        heart_l=2 * cage * ctr * (1 - right_share),
        heart_r=2 * cage * ctr * right_share,
        heart_top=float(rng.uniform(0.38, 0.46)),
        med_w=float(rng.uniform(0.09, 0.12)),
        knob_u=float(rng.uniform(0.17, 0.21)),
        knob_v=float(rng.uniform(0.17, 0.23)),
        knob_r=float(rng.uniform(0.05, 0.07)),
        rib_v0=float(rng.uniform(0.0, 1.0)),
        rib_pitch=float(rng.uniform(0.095, 0.115)),
        air=float(rng.uniform(0.50, 0.60)),
        body_w=float(rng.uniform(1.05, 1.30)),
        breast=float(rng.uniform(0.08, 0.2)) if female else 0.0,
        bubble=float(rng.uniform(0.04, 0.13)),
        vessel_gain=float(rng.uniform(0.18, 0.26)),
        vessel_var=int(rng.integers(0, _VESSEL_VARIANTS)),
        vessel_du=float(rng.uniform(-0.05, 0.05)),
        vessel_dv=float(rng.uniform(-0.04, 0.04)),
        sex_female=female,
    )


@dataclass(frozen=True)
class Pose:
    """Per-view positioning and acquisition: where the chest lies in the image and how it is exposed."""

    cx: float  # image x of the midline
    cy: float  # image y of v = 0
    su: float  # image widths per unit of u
    sv: float  # image heights per unit of v
    rot: float  # in-plane rotation, radians
    lo: float  # exposure window on the attenuation map
    hi: float
    gamma: float
    noise: float  # quantum noise, grey levels
    grain: tuple[int, int]  # offset into the shared noise tile
    tilt: float  # heel effect: brightness gradient top to bottom


def _draw_pose(rng: np.random.Generator, view: str) -> Pose:
    # A PA film shows the apices ~10% and the costophrenic angles ~75-80% down the image; the
    # lateral centres the chest (w ~ 0.1) with the spine on the image right.
    if view == "frontal":
        cx, cy = rng.normal(0.5, 0.015), rng.normal(0.10, 0.02)
        su, sv = rng.uniform(0.40, 0.46), rng.uniform(0.62, 0.68)
    else:
        su, sv = rng.uniform(0.50, 0.56), rng.uniform(0.60, 0.66)
        cx, cy = rng.normal(0.5 - 0.1 * su, 0.015), rng.normal(0.10, 0.02)
    return Pose(
        cx=float(cx),
        cy=float(cy),
        su=float(su),
        sv=float(sv),
        rot=float(rng.normal(0.0, 0.03)),
        lo=float(rng.uniform(-0.10, 0.05)),
        hi=float(rng.uniform(1.85, 2.15)),
        gamma=float(rng.uniform(0.75, 1.05)),
        noise=float(rng.uniform(1.5, 5.0)),
        grain=(int(rng.integers(0, 1 << 16)), int(rng.integers(0, 1 << 16))),
        tilt=float(rng.normal(0.0, 0.04)),
    )


# --------------------------------------------------------------------------------------------
# Drawing primitives
# --------------------------------------------------------------------------------------------


class _Canvas:
    """Patient coordinates of every pixel of one view and the attenuation map being built."""

    def __init__(self, size: int, pose: Pose):
        self.size, self.pose = size, pose
        c = (np.arange(size, dtype=np.float32) + 0.5) / size
        dx, dy = (c - pose.cx)[None, :], (c - pose.cy)[:, None]
        self.cos, self.sin = math.cos(pose.rot), math.sin(pose.rot)
        self.U = (self.cos * dx + self.sin * dy) * (1.0 / pose.su)  # [S, S]
        self.V = (self.cos * dy - self.sin * dx) * (1.0 / pose.sv)  # [S, S]
        self.pu = pose.su * size  # pixels per unit of u
        self.pv = pose.sv * size
        self.A = np.zeros((size, size), np.float32)
        # Profiles that depend on depth alone are evaluated on a fine 1-D grid of v and gathered
        # (~0.15 px steps): far cheaper than sin/sqrt/pow over every pixel.
        v_lo, v_hi = float(self.V.min()), float(self.V.max())
        n = 8 * size
        self._v_grid = np.linspace(v_lo, v_hi, n, dtype=np.float32)
        self._v_idx = ((self.V - v_lo) * ((n - 1) / max(v_hi - v_lo, 1e-6)) + 0.5).astype(np.intp)
        self.metal = np.zeros((size, size), np.float32)  # wires and devices, drawn on top

    def of_v(self, fn: Callable):
        """fn(V) for a function of depth alone (elementwise), via the 1-D grid."""
        out = fn(self._v_grid)
        if isinstance(out, tuple):
            return tuple(np.take(np.asarray(o, np.float32), self._v_idx) for o in out)
        return np.take(np.asarray(out, np.float32), self._v_idx)

    def to_px(self, u: float, v: float) -> tuple[float, float]:
        p = self.pose
        dx = self.cos * u * p.su - self.sin * v * p.sv
        dy = self.sin * u * p.su + self.cos * v * p.sv
        return (p.cx + dx) * self.size, (p.cy + dy) * self.size

    def window(self, u0: float, u1: float, v0: float, v1: float, pad: float = 2.0):
        """Slices of the image covering the patient-coordinate box, or None when off-image."""
        xs, ys = zip(*(self.to_px(u, v) for u in (u0, u1) for v in (v0, v1)))
        c0, c1 = max(int(min(xs) - pad), 0), min(int(max(xs) + pad) + 1, self.size)
        r0, r1 = max(int(min(ys) - pad), 0), min(int(max(ys) + pad) + 1, self.size)
        if c0 >= c1 or r0 >= r1:
            return None
        return slice(r0, r1), slice(c0, c1)

    def ellipse(self, u0, v0, ru, rv, *, soft: float = 0.0, angle: float = 0.0):
        """Soft-edged ellipse: (window, mask in [0, 1]) or (None, None).

        `soft` is the edge width as a fraction of the radius; 0 gives a ~1 pixel antialiased edge.
        """
        r = max(ru, rv)
        win = self.window(u0 - r, u0 + r, v0 - r, v0 + r)
        if win is None:
            return None, None
        du, dv = self.U[win] - u0, self.V[win] - v0
        if angle:
            ca, sa = math.cos(angle), math.sin(angle)
            du, dv = ca * du + sa * dv, ca * dv - sa * du
        # In place on the window's temporaries: 1 - sqrt((du / ru)^2 + (dv / rv)^2), scaled, clipped.
        du *= 1.0 / ru
        du *= du
        dv *= 1.0 / rv
        dv *= dv
        du += dv
        m = np.subtract(1.0, np.sqrt(du, out=du), out=du)
        if soft > 0:
            m *= 1.0 / soft
        else:
            m *= min(ru * self.pu, rv * self.pv)  # ~1 pixel edge
            m += 0.5
        return win, m.clip(0.0, 1.0, out=m)

    def add_ellipse(self, amp, u0, v0, ru, rv, *, soft=0.0, angle=0.0, target=None):
        win, m = self.ellipse(u0, v0, ru, rv, soft=soft, angle=angle)
        if win is not None:
            m *= amp
            (self.A if target is None else target)[win] += m

    def stroke(self, pts: list[tuple[float, float]], width_px: float, layer=None, amp: float = 1.0):
        """A polyline of the given pixel width (patient-coordinate vertices), max-blended into a layer."""
        layer = self.metal if layer is None else layer
        P = [self.to_px(u, v) for u, v in pts]
        half = width_px / 2.0
        for (x0, y0), (x1, y1) in zip(P[:-1], P[1:]):
            c0 = max(int(min(x0, x1) - half - 2), 0)
            c1 = min(int(max(x0, x1) + half + 2) + 1, self.size)
            r0 = max(int(min(y0, y1) - half - 2), 0)
            r1 = min(int(max(y0, y1) + half + 2) + 1, self.size)
            if c0 >= c1 or r0 >= r1:
                continue
            X = np.arange(c0, c1, dtype=np.float32)[None, :] + 0.5 - x0
            Y = np.arange(r0, r1, dtype=np.float32)[:, None] + 0.5 - y0
            ex, ey = x1 - x0, y1 - y0
            t = ((X * ex + Y * ey) * (1.0 / max(ex * ex + ey * ey, 1e-6))).clip(0.0, 1.0)
            d = np.sqrt((X - t * ex) ** 2 + (Y - t * ey) ** 2)
            m = (half - d + 0.5).clip(0.0, 1.0) * amp
            np.maximum(layer[r0:r1, c0:c1], m, out=layer[r0:r1, c0:c1])


def _curve(points: list[tuple[float, float]], n: int = 10) -> list[tuple[float, float]]:
    """A smooth curve through control points (Catmull-Rom), as a polyline."""
    p = np.asarray(points, np.float64)
    if len(p) < 3:
        return [tuple(x) for x in p]
    p = np.vstack([2 * p[0] - p[1], p, 2 * p[-1] - p[-2]])
    out = []
    s = np.linspace(0, 1, n, endpoint=False)[:, None]
    for i in range(1, len(p) - 2):
        p0, p1, p2, p3 = p[i - 1], p[i], p[i + 1], p[i + 2]
        out.extend(
            0.5
            * (
                2 * p1
                + (p2 - p0) * s
                + (2 * p0 - 5 * p1 + 4 * p2 - p3) * s**2
                + (3 * p1 - p0 - 3 * p2 + p3) * s**3
            )
        )
    out.append(p[-2])
    return [(float(a), float(b)) for a, b in out]


def _soft_band(x, half_width_px):
    """1 inside |x| < half width (x in pixels), linear 1-pixel edges."""
    t = np.abs(x)
    np.subtract(half_width_px, t, out=t)
    t += 0.5
    return t.clip(0.0, 1.0, out=t)


# --------------------------------------------------------------------------------------------
# Shared textures: built once per process from fixed seeds, sampled at random offsets per render
# --------------------------------------------------------------------------------------------

_VESSEL_VARIANTS = 6
_VESSEL_RES = 320
_VESSEL_BOX = (-1.1, 1.1, -0.15, 1.25)  # u0, u1, v0, v1 covered by the vessel map


@functools.lru_cache(maxsize=1)
def _vessel_maps() -> np.ndarray:
    """Branching pulmonary vessel trees radiating from both hila: [variants, R, R] float32 in [0, 1]."""
    R = _VESSEL_RES
    u0, u1, v0, v1 = _VESSEL_BOX
    out = np.zeros((_VESSEL_VARIANTS, R, R), np.float32)
    yy = np.arange(R, dtype=np.float32)[:, None] + 0.5
    xx = np.arange(R, dtype=np.float32)[None, :] + 0.5
    for k in range(_VESSEL_VARIANTS):
        rng = np.random.default_rng(9100 + k)
        canvas = out[k]

        def to_px(u, v):
            return (u - u0) / (u1 - u0) * R, (v - v0) / (v1 - v0) * R

        def segment(p, q, w, amp, canvas=canvas):
            (x0, y0), (x1, y1) = to_px(*p), to_px(*q)
            c0, c1 = max(int(min(x0, x1) - w - 2), 0), min(int(max(x0, x1) + w + 2), R)
            r0, r1 = max(int(min(y0, y1) - w - 2), 0), min(int(max(y0, y1) + w + 2), R)
            if c0 >= c1 or r0 >= r1:
                return
            X, Y = xx[:, c0:c1] - x0, yy[r0:r1] - y0
            ex, ey = x1 - x0, y1 - y0
            t = ((X * ex + Y * ey) / max(ex * ex + ey * ey, 1e-6)).clip(0, 1)
            d = np.sqrt((X - t * ex) ** 2 + (Y - t * ey) ** 2)
            # A tube seen in projection: brightest along its axis.
            m = amp * (1.0 - (d / (w + 0.5)) ** 2).clip(0, 1)
            np.maximum(canvas[r0:r1, c0:c1], m, out=canvas[r0:r1, c0:c1])

        for side in (-1, 1):
            hilum = (side * 0.24, 0.42)
            stack = []
            for ang in np.linspace(-2.4, 2.4, 9):
                # Angles measured from straight lateral; up and down lobes fan out from the hilum.
                stack.append((hilum, ang + rng.normal(0, 0.12), 0.11, 3.2, 0))
            while stack:
                p, ang, length, w, depth = stack.pop()
                q = (p[0] + side * math.cos(ang) * length * 0.9, p[1] + math.sin(ang) * length)
                segment(p, q, w, min(1.0, 0.45 + 0.2 * w))
                if depth < 5 and w > 0.6:
                    for _ in range(2 if rng.random() < 0.8 else 1):
                        stack.append(
                            (
                                q,
                                ang + rng.normal(0, 0.45),
                                length * rng.uniform(0.7, 0.9),
                                w * 0.72,
                                depth + 1,
                            )
                        )
    return out


@functools.lru_cache(maxsize=1)
def _vessel_images() -> tuple[Image.Image, ...]:
    """The vessel maps as 32-bit float PIL images (for PIL's affine resampling)."""
    return tuple(Image.fromarray(m) for m in _vessel_maps())


def _vessel_texel(
    cv: _Canvas, anat: Anatomy
) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """Affine maps from a pixel centre (x, y) to the vessel map's (column, row): a, b, c with
    column = a x + b y + c, and the same for the row. (u, v) are affine in (x, y) (see _Canvas)."""
    p, S = cv.pose, cv.size
    u0, u1, v0, v1 = _VESSEL_BOX
    ku, kv = _VESSEL_RES / (u1 - u0), _VESSEL_RES / (v1 - v0)
    gu, gv = ku / p.su, kv / p.sv
    col = (
        gu * cv.cos / S,
        gu * cv.sin / S,
        -gu * (cv.cos * p.cx + cv.sin * p.cy) - ku * (anat.vessel_du + u0),
    )
    row = (
        -gv * cv.sin / S,
        gv * cv.cos / S,
        gv * (cv.sin * p.cx - cv.cos * p.cy) - kv * (anat.vessel_dv + v0),
    )
    return col, row


def _sample_vessels(cv: _Canvas, anat: Anatomy) -> np.ndarray:
    """The vessel map under each pixel (nearest texel; 0 off the map, whose border is empty).

    One affine resample in PIL: ~5x faster than gathering with per-pixel indices
    (`_sample_vessels_reference`, which the tests compare with).
    """
    col, row = _vessel_texel(cv, anat)
    img = _vessel_images()[anat.vessel_var]
    out = img.transform(
        (cv.size, cv.size), Image.Transform.AFFINE, col + row, resample=Image.Resampling.NEAREST
    )
    return np.asarray(out)


def _sample_vessels_reference(cv: _Canvas, anat: Anatomy) -> np.ndarray:
    """Slow reference for `_sample_vessels`: per-pixel texel indices from U, V and a gather."""
    u0, u1, v0, v1 = _VESSEL_BOX
    R = _VESSEL_RES
    fu = (cv.U - anat.vessel_du - u0) * (R / (u1 - u0))
    fv = (cv.V - anat.vessel_dv - v0) * (R / (v1 - v0))
    inside = (fu >= 0) & (fu < R) & (fv >= 0) & (fv < R)
    iu = np.floor(fu).clip(0, R - 1).astype(np.intp)
    iv = np.floor(fv).clip(0, R - 1).astype(np.intp)
    return np.where(inside, _vessel_maps()[anat.vessel_var][iv, iu], 0.0).astype(np.float32)


@functools.lru_cache(maxsize=8)
def _noise_tiles(size: int) -> tuple[np.ndarray, np.ndarray]:
    """(white noise, smooth blotchy noise), each [2S, 2S] float32 with unit scale."""
    rng = np.random.default_rng(77 + size)
    white = rng.standard_normal((2 * size, 2 * size), dtype=np.float32)
    coarse = rng.random((2 * size // 8 + 2, 2 * size // 8 + 2), dtype=np.float32)
    smooth = np.kron(coarse, np.ones((8, 8), np.float32))[: 2 * size, : 2 * size]
    for axis in (0, 1):  # three 9-pixel box passes ~ a Gaussian of sigma ~ 4.5 px, no block edges
        for _ in range(3):
            smooth = _box_blur(smooth, 4, axis)
    smooth = (smooth - smooth.mean()) / (smooth.std() + 1e-6)
    return white, smooth.astype(np.float32)


def _box_blur(a: np.ndarray, r: int, axis: int) -> np.ndarray:
    """Mean over a (2r + 1)-wide window along one axis, wrapping around (the tile is periodic)."""
    n = a.shape[axis]
    padded = np.concatenate([a.take(range(n - r - 1, n), axis), a, a.take(range(r), axis)], axis)
    c = np.cumsum(padded, axis=axis, dtype=np.float64)
    hi = c.take(range(2 * r + 1, n + 2 * r + 1), axis)
    lo = c.take(range(0, n), axis)
    return ((hi - lo) / (2 * r + 1)).astype(np.float32)


def _tile_crop(tile: np.ndarray, size: int, offset: tuple[int, int]) -> np.ndarray:
    r, c = offset[0] % size, offset[1] % size
    return tile[r : r + size, c : c + size]


# --------------------------------------------------------------------------------------------
# Frontal view
# --------------------------------------------------------------------------------------------


class _Lung:
    """One lung: its mask, and (computed when a finding first asks) lung-local coordinates."""

    def __init__(
        self, side: int, mask: np.ndarray, from_medial: np.ndarray, medial: np.ndarray, lateral: np.ndarray
    ):
        self.side, self.mask = side, mask  # mask: [S, S] in [0, 1]
        self._from_medial, self._medial, self._lateral = from_medial, medial, lateral

    @functools.cached_property
    def width(self) -> np.ndarray:
        """Lung width in u at each pixel's v."""
        return np.maximum(self._lateral - self._medial, 1e-3)

    @functools.cached_property
    def t(self) -> np.ndarray:
        """Lateral fraction across the lung (0 medial, 1 lateral)."""
        return self._from_medial / self.width


class _Frontal:
    """State of one frontal render: canvas, lungs and the fields findings modify."""

    def __init__(self, anat: Anatomy, pose: Pose, size: int, seed: int):
        self.anat, self.cv, self.seed = anat, _Canvas(size, pose), seed
        cv = self.cv
        U, V = cv.U, cv.V
        a = np.abs(U)
        self.lungs: dict[int, _Lung] = {}
        m = cv.of_v(anat.medial_edge)
        lat = cv.of_v(anat.lateral_edge)
        # Each dome where its own lung lies (the other lung's pixels are outside `au - m > 0`).
        self.dome_field = np.where(U < 0, np.float32(anat.dome_r), np.float32(anat.dome_l))
        self.dome_field += anat.dome_k * (a - 0.42) ** 2
        v_room = np.minimum(self.dome_field - V, V) * cv.pv
        for side in (-1, 1):
            au = side * U
            from_medial = au - m
            d = np.minimum(np.minimum(from_medial, lat - au) * cv.pu, v_room)
            mask = (d + 0.5).clip(0.0, 1.0)
            self.lungs[side] = _Lung(side, mask, from_medial, m, lat)
        self.lung = self.lungs[-1].mask + self.lungs[1].mask
        # Fields findings set, [S, S] in [0, 1]; None until a finding touches them (most studies
        # have none of them, and skipping the untouched ones saves whole-image passes).
        self.fill: np.ndarray | None = None  # fraction of lung air replaced by fluid or tissue
        self.markings: np.ndarray | None = None  # where lung markings are visible (None: everywhere)
        self.extra_air: np.ndarray | None = None  # air outside the lung (pneumothorax)
        self.fluid: np.ndarray | None = None  # pleural fluid
        self.bronchograms: np.ndarray | None = None  # airways kept dark inside consolidation
        self.a = a

    def raise_to(self, field: str, value: np.ndarray) -> None:
        """field = max(field, value) for a field of non-negative values (None counts as 0)."""
        old = getattr(self, field)
        setattr(self, field, value if old is None else np.maximum(old, value))

    def rng(self, obs: str) -> np.random.Generator:
        # Per-finding draws shared by both views of one seed.
        return np.random.default_rng([self.seed, OBSERVATIONS.index(obs), 17])


def _masked(a: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """a * mask, or a itself when there is no mask."""
    return a if mask is None else a * mask


def _spine_center(anat: Anatomy, v):
    if anat.spine_amp == 0.0:
        return 0.0
    return anat.spine_amp * np.sin(np.pi * (np.clip(v, -0.4, 1.5) + 0.4) / 1.3 + anat.spine_phase)


def _render_frontal(anat: Anatomy, pose: Pose, size: int, seed: int, found: dict[str, Finding]):
    fr = _Frontal(anat, pose, size, seed)
    cv, U, V, a = fr.cv, fr.cv.U, fr.cv.V, fr.a

    # Body: torso, shoulders and neck; thicker in the middle.
    sh = ((V + 0.30) * 5.0).clip(0.0, 1.0)
    neck = 0.32 + (anat.body_w - 0.32) * sh * (2.0 - sh)
    body = ((neck - a) * cv.pu + 0.5).clip(0.0, 1.0)
    rel = a * (1.0 / anat.body_w)
    cv.A += body * (0.95 - 0.4 * rel * rel)

    # Abdomen under the domes; the mediastinum's silhouette (vessels, aortic knob, heart).
    abdomen = ((V - fr.dome_field) * cv.pv + 0.5).clip(0.0, 1.0) * body
    right, left = cv.of_v(anat.mediastinum_edges)
    mediastinum = ((left - U) * cv.pu + 0.5).clip(0.0, 1.0) * ((U + right) * cv.pu + 0.5).clip(0.0, 1.0)
    # Denser in the middle (thicker), so the heart borders read as curved edges.
    core = (1.0 - np.abs(U - 0.5 * (left - right)) / (0.5 * (left + right) + 0.05)).clip(0.0, 1.0)
    mediastinum *= 0.75 + 0.25 * core
    cv.A += np.maximum(0.42 * abdomen, 0.5 * mediastinum)
    fr.mediastinum = mediastinum
    # Trachea: an air column down the upper mediastinum to the carina.
    # Local structures are computed in their own window only (rendering speed).
    win = cv.window(-0.1, 0.12, -0.7, 0.34)
    if win is not None:
        Uw, Vw = U[win], V[win]
        trachea = _soft_band((Uw - 0.01) * cv.pu, 0.045 * cv.pu) * ((0.30 - Vw) * cv.pv).clip(0.0, 1.0)
        cv.A[win] -= 0.38 * trachea

    _draw_frontal_findings(fr, found, stage="fields")

    # Lung air, minus what the heart, mediastinum and any fluid or tissue cover.
    behind = fr.lung * (1.0 - 0.9 * mediastinum)
    air = behind if fr.fill is None else behind * (1.0 - fr.fill)
    lost = anat.air * air
    if fr.extra_air is not None:
        lost += 0.12 * fr.extra_air
    cv.A -= lost
    if fr.fluid is not None:
        # Fluid is as dense as the abdomen, so a dome's outline disappears into an effusion.
        cv.A += 0.42 * fr.fluid * behind
    # Parenchyma: faint density that a pneumothorax removes.
    cv.A += _masked(0.05 * fr.lung, fr.markings)

    # Lung markings: vessel trees sampled in patient coordinates, stronger toward the hila.
    vessels = _sample_vessels(cv, anat)
    gain = anat.vessel_gain * (1.0 + (anat.upper_vessels - 1.0) * (0.5 - V).clip(0.0, 0.5) * 2.0)
    cv.A += _masked(gain * vessels * fr.lung, fr.markings)
    if fr.bronchograms is not None:
        # Air bronchograms: airways stay dark inside consolidated lung.
        cv.A -= 0.35 * fr.bronchograms * vessels
    for side in (-1, 1):
        cv.add_ellipse(0.16 * anat.hilum, side * 0.2, 0.42, 0.07 * anat.hilum, 0.11 * anat.hilum, soft=0.6)

    # Bones: posterior ribs (arcs from the spine), fainter anterior ribs, clavicles, spine, humeri.
    cage_edge = cv.of_v(lambda v: anat.lateral_edge(v + 0.06) + 0.05)
    in_cage = ((cage_edge - a) * cv.pu + 0.5).clip(0.0, 1.0) * ((V + 0.08) * cv.pv).clip(0.0, 1.0)
    in_cage *= ((a - 0.06) * cv.pu).clip(0.0, 1.0)
    fr.rib_phase = (V - (-0.12 * a + 0.62 * a * a) - anat.rib_v0 * anat.rib_pitch) * (1.0 / anat.rib_pitch)
    ribs = _rib_profile(fr.rib_phase, anat.rib_pitch * cv.pv)
    _draw_frontal_findings(fr, found, stage="ribs", ribs=ribs)
    ant_phase = (V + 0.32 * (a - 0.9) - 0.1) * (1.0 / (anat.rib_pitch * 1.25))
    ant = _rib_profile(ant_phase, anat.rib_pitch * 1.25 * cv.pv, width=0.35)
    see_through = (1.0 - 0.75 * mediastinum) * (1.0 - 0.85 * abdomen)
    cv.A += in_cage * see_through * (0.16 * ribs + 0.06 * ant * fr.lung)

    win = cv.window(-0.95, 0.95, -0.14, 0.24)
    for side in (-1, 1):
        if win is not None:
            au, Vw = side * U[win], V[win]
            clav_v = _clavicle_v(au)
            clav = _soft_band((Vw - clav_v) * cv.pv, 0.03 * cv.pv) * ((0.85 - au) * cv.pu).clip(0, 1)
            clav *= ((au - 0.06) * cv.pu).clip(0.0, 1.0)
            cv.A[win] += 0.30 * clav
        cv.add_ellipse(0.30, side * 1.12, -0.10, 0.16, 0.17)  # humeral head
        cv.add_ellipse(0.10, side * 0.95, 0.05, 0.15, 0.28, soft=0.3)  # scapula

    win = cv.window(-0.32, 0.32, -0.7, 1.7)
    if win is not None:
        sc = cv.of_v(lambda v: _spine_center(anat, v) + 0.0 * v)[win]
        col = _soft_band((U[win] - sc) * cv.pu, 0.065 * cv.pu)
        bodies = _rib_profile((V[win] + 0.5) * (1.0 / 0.085), 0.085 * cv.pv, width=0.8)
        cv.A[win] += col * (0.07 + 0.09 * bodies) * (1.0 - 0.3 * mediastinum[win])
    _draw_frontal_findings(fr, found, stage="overlay")

    # Soft tissue extras and the gastric bubble.
    if anat.breast > 0:
        for side in (-1, 1):
            cv.add_ellipse(anat.breast, side * 0.62, 1.02, 0.42, 0.32, soft=0.5)
    if "hiatal_hernia" not in found:
        cv.add_ellipse(-0.35, 0.42, anat.dome_l + 0.11, anat.bubble * 1.3, anat.bubble * 0.7, soft=0.25)

    cv.A *= body
    cv.A += 1.3 * cv.metal
    return cv


def _clavicle_v(a):
    """Depth of the clavicle at distance `a` from the midline: medial ends over the apices,
    sloping up toward the shoulders."""
    x = a - 0.08
    return 0.12 - 0.24 * x + 0.06 * x * x


def _rib_profile(phase, pitch_px, width: float = 0.42):
    """Periodic bands: 1 over the first `width` of each period, 1-pixel edges, brighter cortices."""
    q = np.floor(phase)
    np.subtract(phase, q, out=q)  # position within the period, in [0, 1)
    np.minimum(q, width - q, out=q)
    q *= pitch_px
    q += 0.5
    return q.clip(0.0, 1.0, out=q)


# --------------------------------------------------------------------------------------------
# Frontal findings. "fields" run before the lung air is subtracted (fill, markings, anatomy
# already applied), "ribs" may edit the rib bands, "overlay" draws on top.
# --------------------------------------------------------------------------------------------


def _zone_v(fr: _Frontal, side: int, zone: str | None, rng) -> float:
    dome = fr.anat.dome_r if side < 0 else fr.anat.dome_l
    lo, hi = {"upper": (0.12, 0.32), "middle": (0.38, 0.55), "lower": (0.62, dome - 0.02)}.get(
        zone or "lower", (0.62, dome - 0.02)
    )
    return float(rng.uniform(lo, max(lo, hi)))


def _lung_region(fr: _Frontal, side: int, t0, v0, rt, rv, soft):
    """Soft ellipse in lung-local coordinates (t across, v down), confined to the lung."""
    lung = fr.lungs[side]
    rho2 = ((lung.t - t0) * (1.0 / rt)) ** 2 + ((fr.cv.V - v0) * (1.0 / rv)) ** 2
    return ((1.0 - rho2) * (1.0 / soft)).clip(0.0, 1.0) * lung.mask


def _effusion(fr: _Frontal, f: Finding):
    cv, anat = fr.cv, fr.anat
    for side in _sides(f):
        lung = fr.lungs[side]
        dome_top = anat.dome_r if side < 0 else anat.dome_l
        level = dome_top + _pick(f, (0.05, -0.22, -0.45))
        # Meniscus: the fluid climbs the lateral chest wall.
        surface = level - 0.16 * lung.t.clip(0.0, 1.2) ** 2
        fluid = ((cv.V - surface) * cv.pv * 0.12).clip(0.0, 1.0) * lung.mask
        fr.raise_to("fill", fluid)
        fr.raise_to("fluid", fluid)


def _pneumothorax(fr: _Frontal, f: Finding):
    cv = fr.cv
    frac = _pick(f, (0.14, 0.25, 0.42))
    for side in _sides(f):
        lung = fr.lungs[side]
        apex = frac * 0.5
        d_lat = (1.0 - frac - lung.t) * lung.width * cv.pu
        d_top = (cv.V - apex) * cv.pv
        d_in = np.minimum(d_lat, d_top)
        inner = (d_in + 0.5).clip(0.0, 1.0)
        space = lung.mask * (1.0 - inner)
        fr.markings = _masked(1.0 - space, fr.markings)
        fr.raise_to("extra_air", space)
        line = (1.0 - np.abs(d_in) * 0.9).clip(0.0, 1.0) * lung.mask
        cv.A += 0.22 * line + 0.06 * inner * lung.mask


def _airspace(fr: _Frontal, f: Finding, kind: str):
    """Consolidation (dense, confluent, air bronchograms), pneumonia (patchy, multifocal) or
    lung opacity (hazy ground glass through which vessels stay visible)."""
    cv = fr.cv
    rng = fr.rng(f.observation)
    white, smooth = _noise_tiles(cv.size)
    tex = _tile_crop(smooth, cv.size, (int(rng.integers(0, 1 << 16)), int(rng.integers(0, 1 << 16))))
    for side in _sides(f):
        v0 = _zone_v(fr, side, f.zone, rng)
        if kind == "consolidation":
            region = _lung_region(fr, side, rng.uniform(0.35, 0.65), v0, rng.uniform(0.4, 0.55), 0.15, 0.35)
            dense = region * (0.85 + 0.15 * tex).clip(0.0, 1.0)
            fr.raise_to("fill", 0.9 * dense)
            fr.raise_to("bronchograms", dense)
        elif kind == "pneumonia":
            patch = np.zeros_like(fr.lung)
            for _ in range(int(rng.integers(3, 6))):
                t0, vv = rng.uniform(0.2, 0.85), v0 + rng.normal(0, 0.07)
                r = rng.uniform(0.13, 0.22)
                np.maximum(patch, _lung_region(fr, side, t0, vv, r, r * 0.35, 0.8), out=patch)
            patchy = patch * (0.55 + 0.6 * tex).clip(0.0, 1.0)
            fr.raise_to("fill", 0.75 * patchy)
        else:
            sev = _pick(f, (0.5, 0.62, 0.75))
            region = _lung_region(fr, side, rng.uniform(0.4, 0.6), v0, rng.uniform(0.45, 0.6), 0.24, 1.0)
            fr.raise_to("fill", sev * region)


def _atelectasis(fr: _Frontal, f: Finding):
    cv, anat = fr.cv, fr.anat
    rng = fr.rng("atelectasis")
    for side in _sides(f):
        lung = fr.lungs[side]
        if f.subtype == "lobar":
            # Collapsed lower lobe: a dense triangle at the medial base.
            dome = anat.dome_r if side < 0 else anat.dome_l
            tri = ((0.55 - lung.t - (dome - cv.V) * 1.3) * 6.0).clip(0.0, 1.0) * lung.mask
            fr.raise_to("fill", 0.9 * tri)
            continue
        v0 = _zone_v(fr, side, f.zone, rng)
        for k in range(int(rng.integers(1, 3))):
            vv = v0 - 0.06 * k + rng.normal(0, 0.02)
            slope = rng.uniform(-0.12, 0.12)
            t0, t1 = rng.uniform(0.15, 0.35), rng.uniform(0.7, 0.9)
            d = (cv.V - vv - slope * (lung.t - 0.5)) * cv.pv
            band = _soft_band(d, 0.012 * cv.pv) * ((lung.t - t0) * 10).clip(0, 1)
            band *= ((t1 - lung.t) * 10).clip(0, 1) * lung.mask
            fr.raise_to("fill", 0.95 * band)


def _edema(fr: _Frontal, f: Finding):
    cv = fr.cv
    if f.subtype == "vascular_congestion":
        return  # drawn as anatomy: larger hila and upper-zone vessels (see _modify)
    strength = _pick(f, (0.35, 0.5, 0.65))
    for side in (-1, 1):
        du = (cv.U - side * 0.22) * (1.0 / 0.45)
        dv = (cv.V - 0.48) * (1.0 / 0.32)
        bat = (1.0 - du * du - dv * dv).clip(0.0, 1.0)
        fr.raise_to("fill", strength * bat * bat * fr.lungs[side].mask)
        # Kerley B lines: short horizontal lines at the lateral bases.
        lung = fr.lungs[side]
        phase = cv.V * (1.0 / 0.035)
        q = phase - np.floor(phase)
        lines = (0.18 - np.abs(q - 0.5)).clip(0.0, 1.0) * 4.0
        sel = ((lung.t - 0.85) * 12).clip(0, 1) * ((cv.V - 0.55) * 8).clip(0, 1) * lung.mask
        cv.A += 0.18 * lines * sel


def _lesion(fr: _Frontal, f: Finding):
    cv, rng = fr.cv, fr.rng(f.observation)
    side = _sides(f)[0]
    v0 = _zone_v(fr, side, f.zone, rng)
    u0, _ = fr.anat.lung_point(side, float(rng.uniform(0.35, 0.8)), v0)
    if f.subtype == "mass":
        r = float(rng.uniform(0.11, 0.16))
        for _ in range(3):  # lobulated outline
            cv.add_ellipse(0.28, u0 + rng.normal(0, r / 3), v0 + rng.normal(0, r / 3), r * 0.8, r * 0.7)
        cv.add_ellipse(0.22, u0, v0, r, r * 0.9)
    else:
        r = float(rng.uniform(0.055, 0.085))
        cv.add_ellipse(0.6, u0, v0, r, r * 0.9, soft=0.3)


def _granuloma(fr: _Frontal, f: Finding):
    cv, rng = fr.cv, fr.rng(f.observation)
    for side in _sides(f):
        for _ in range(int(rng.integers(1, 4))):
            v0 = _zone_v(fr, side, f.zone, rng)
            u0, _ = fr.anat.lung_point(side, float(rng.uniform(0.25, 0.8)), v0)
            r = float(rng.uniform(0.028, 0.038))  # small, but as dense as bone
            cv.add_ellipse(1.0, u0, v0, r, r * 0.95)


def _pleural_thickening(fr: _Frontal, f: Finding):
    cv = fr.cv
    for side in _sides(f):
        lung = fr.lungs[side]
        band = ((lung.t - 0.9) * 20).clip(0.0, 1.0) * lung.mask
        if f.zone == "upper":  # apical cap
            band = np.maximum(band, ((0.08 - cv.V) * cv.pv * 0.5).clip(0, 1) * lung.mask)
        fr.raise_to("fill", 0.8 * band)


def _fracture_ribs(fr: _Frontal, f: Finding, ribs: np.ndarray):
    # A fracture without a stated site is drawn on the ribs, the commonest site on a chest film.
    if f.subtype not in (None, "rib", "other"):
        return
    cv, anat, rng = fr.cv, fr.anat, fr.rng("fracture")
    for side in _sides(f):
        for _ in range(int(rng.integers(3, 5))):
            k = int(rng.integers(3, 7))  # which rib (counted from the phase origin)
            a_f = float(rng.uniform(0.55, 0.8))
            v_f = -0.12 * a_f + 0.62 * a_f * a_f + (anat.rib_v0 + k + 0.2) * anat.rib_pitch
            win = cv.window(side * (a_f - 0.1), side * (a_f + 0.1), v_f - 0.1, v_f + 0.1)
            if win is None:
                continue
            a = side * cv.U[win]
            phase = fr.rib_phase[win]
            near = np.abs(phase - (k + 0.2)) < 0.6
            beyond = (a > a_f) & near
            # Displaced fragment: the lateral part steps down by a third of a rib.
            shifted = _rib_profile(phase - 0.4, anat.rib_pitch * cv.pv)
            patch = np.where(beyond, shifted, ribs[win])
            gap = _soft_band((a - a_f) * cv.pu, max(1.0, 0.015 * cv.pu))
            patch = patch * np.where(near, 1.0 - gap, 1.0)
            ribs[win] = patch
            cv.add_ellipse(0.7, side * a_f, v_f, 0.07, 0.055, soft=0.5)  # callus: a bright, lumpy cuff


def _fracture_other(fr: _Frontal, f: Finding):
    cv, anat, rng = fr.cv, fr.anat, fr.rng("fracture")
    side = _sides(f)[0]
    if f.subtype == "clavicle":
        a_f = float(rng.uniform(0.35, 0.6))
        v_c = _clavicle_v(a_f)
        # A cleft through the clavicle, an offset (overriding) fragment end and callus around it.
        cv.add_ellipse(-0.6, side * a_f, v_c, 0.02, 0.06)
        cv.add_ellipse(0.55, side * (a_f + 0.05), v_c + 0.03, 0.06, 0.025)
        cv.add_ellipse(0.35, side * a_f, v_c + 0.01, 0.07, 0.045, soft=0.5)
    elif f.subtype == "spine":
        # Compression: one flattened, sclerotic vertebral body.
        v_f = float(rng.uniform(0.55, 0.9))
        v_f = (math.floor((v_f + 0.5) / 0.085) + 0.4) * 0.085 - 0.5
        cv.add_ellipse(0.6, float(_spine_center(anat, v_f)), v_f, 0.08, 0.028)


def _devices(fr: _Frontal, f: Finding):
    cv, anat, rng = fr.cv, fr.anat, fr.rng("support_devices")
    w = max(1.2, cv.size / 150)
    sub = f.subtype or "other"
    if sub == "pacemaker":
        s = 1 if rng.random() < 0.8 else -1
        gu, gv = s * rng.uniform(0.45, 0.65), rng.uniform(0.0, 0.1)
        win, m = cv.ellipse(gu, gv, 0.12, 0.085)
        if win is not None:
            np.maximum(cv.metal[win], m, out=cv.metal[win])
        for k in range(int(rng.integers(1, 3))):
            tip = (rng.uniform(0.05, 0.25) - 0.05 * k, anat.heart_v + rng.uniform(0.08, 0.18))
            path = [(gu, gv), (s * 0.35, 0.0 + 0.02 * k), (0.02 * s, 0.12), (-0.06, 0.42), (-0.06, 0.55), tip]
            cv.stroke(_curve(path, 6), w, amp=0.8)
    elif sub == "central_line":
        s = -1 if rng.random() < 0.65 else 1
        tip_v = rng.uniform(0.38, 0.5)
        path = [(s * 0.55, -0.22), (s * 0.3, -0.08), (-0.05, 0.08), (-0.06, tip_v)]
        cv.stroke(_curve(path, 8), w * 0.9, amp=0.55)
    elif sub == "endotracheal_tube":
        tip = rng.uniform(0.12, 0.22)
        for x in (-0.028, 0.028):
            cv.stroke([(x, -0.6), (x * 0.9, tip)], w, amp=0.45)
    elif sub == "ng_tube":
        path = [
            (0.0, -0.6),
            (0.01, 0.3),
            (0.05, anat.dome_l),
            (0.35, anat.dome_l + 0.15),
            (0.45, anat.dome_l + 0.1),
        ]
        cv.stroke(_curve(path, 8), w, amp=0.55)
    elif sub == "chest_tube":
        s = -1 if rng.random() < 0.5 else 1
        path = [(s * 1.0, 0.95), (s * 0.8, 0.7), (s * 0.7, 0.35), (s * 0.55, 0.15)]
        for x in (-0.012, 0.012):
            cv.stroke(_curve([(u + x, v) for u, v in path], 6), w, amp=0.5)
    else:
        # Monitoring leads: electrode snaps on the skin with their wires.
        for _ in range(int(rng.integers(2, 4))):
            eu, ev = rng.uniform(-0.9, 0.9), rng.uniform(-0.1, 0.9)
            win, m = cv.ellipse(eu, ev, 0.035, 0.035)
            if win is not None:
                ring = m * (1.0 - ((m - 0.5) * 3).clip(0, 1) * 0.7)
                np.maximum(cv.metal[win], ring, out=cv.metal[win])
            cv.stroke(
                _curve([(eu, ev), (eu + rng.normal(0, 0.2), ev - 0.3), (eu * 1.3, -0.5)], 6),
                w * 0.8,
                amp=0.35,
            )


def _sternotomy(fr: _Frontal, f: Finding):
    cv, rng = fr.cv, fr.rng("sternotomy")
    n = int(rng.integers(5, 8))
    for k in range(n):
        v0 = 0.08 + k * (0.62 / n) + rng.normal(0, 0.01)
        u0 = rng.normal(0.0, 0.012)
        win, m = cv.ellipse(u0, v0, 0.035, 0.022)
        if win is not None:
            ring = (1.0 - np.abs(m - 0.5) * 2.5).clip(0.0, 1.0)
            np.maximum(cv.metal[win], 0.9 * np.maximum(ring, 0.6 * m), out=cv.metal[win])


def _degenerative(fr: _Frontal, f: Finding):
    cv, rng = fr.cv, fr.rng("degenerative_spine")
    anat = fr.anat
    # Osteophytes: bony spurs at the lateral endplate margins, plus sclerotic endplates.
    levels = rng.choice(np.arange(6, 17), size=int(rng.integers(5, 9)), replace=False)
    for lv in levels:
        v_e = lv * 0.085 - 0.5 - 0.004
        c = float(_spine_center(anat, v_e))
        for s in (-1, 1):
            if rng.random() < 0.8:
                cv.add_ellipse(0.55, c + s * 0.08, v_e, 0.04, 0.018, angle=s * 0.5)
        cv.add_ellipse(0.22, c, v_e, 0.065, 0.012)


def _hiatal_hernia(fr: _Frontal, f: Finding):
    cv, anat, rng = fr.cv, fr.anat, fr.rng("hiatal_hernia")
    u0, v0 = float(rng.uniform(0.0, 0.08)), anat.heart_v + float(rng.uniform(0.02, 0.08))
    r = float(rng.uniform(0.09, 0.13))
    win, m = cv.ellipse(u0, v0, r, r * 0.85)
    if win is None:
        return
    # Gas above a horizontal fluid level, inside a thin bright wall.
    gas = m * ((v0 + 0.1 * r - cv.V[win]) * cv.pv + 0.5).clip(0.0, 1.0)
    rim = (1.0 - np.abs(m - 0.5) * 3.0).clip(0.0, 1.0)
    cv.A[win] += -0.45 * gas + 0.15 * rim


def _aortic(fr: _Frontal, f: Finding):
    cv, anat = fr.cv, fr.anat
    if f.subtype == "calcified":
        # Curvilinear calcification along the rim of the knob.
        win, m = cv.ellipse(anat.knob_u, anat.knob_v, anat.knob_r, anat.knob_r * 1.1, soft=0.3)
        if win is not None:
            rim = (1.0 - np.abs(m - 0.35) * 3.0).clip(0.0, 1.0)  # a band ~15% of the radius wide
            rim *= cv.V[win] < anat.knob_v + 0.2 * anat.knob_r
            np.maximum(cv.metal[win], 0.7 * rim, out=cv.metal[win])


_FRONTAL_STAGES: dict[str, dict[str, Callable]] = {
    "fields": {
        "pleural_effusion": _effusion,
        "pneumothorax": _pneumothorax,
        "consolidation": lambda fr, f: _airspace(fr, f, "consolidation"),
        "pneumonia": lambda fr, f: _airspace(fr, f, "pneumonia"),
        "lung_opacity": lambda fr, f: _airspace(fr, f, "opacity"),
        "atelectasis": _atelectasis,
        "edema": _edema,
        "pleural_other": _pleural_thickening,
    },
    "overlay": {
        "lung_lesion": _lesion,
        "calcified_granuloma": _granuloma,
        "fracture": _fracture_other,
        "support_devices": _devices,
        "sternotomy": _sternotomy,
        "degenerative_spine": _degenerative,
        "hiatal_hernia": _hiatal_hernia,
        "aortic_abnormality": _aortic,
    },
}


def _draw_frontal_findings(fr: _Frontal, found: dict[str, Finding], *, stage: str, ribs=None):
    if stage == "ribs":
        if "fracture" in found:
            _fracture_ribs(fr, found["fracture"], ribs)
        return
    for obs, f in found.items():
        draw = _FRONTAL_STAGES[stage].get(obs)
        if draw is not None:
            draw(fr, f)


# Findings that change the anatomy itself rather than adding to it.
def _modify(anat: Anatomy, found: dict[str, Finding]) -> Anatomy:
    for obs, f in found.items():
        if obs == "cardiomegaly":
            k = _pick(f, (0.54, 0.60, 0.67)) / anat.ctr
            anat = replace(
                anat, heart_l=anat.heart_l * k, heart_r=anat.heart_r * k, heart_top=anat.heart_top - 0.03
            )
        elif obs == "enlarged_cardiomediastinum":
            anat = replace(anat, med_w=anat.med_w * _pick(f, (1.6, 1.9, 2.2)), knob_r=anat.knob_r * 1.2)
        elif obs == "hyperinflation":
            drop = _pick(f, (0.10, 0.15, 0.20))
            anat = replace(
                anat,
                dome_r=anat.dome_r + drop,
                dome_l=anat.dome_l + drop,
                dome_k=anat.dome_k * 0.3,
                air=anat.air * 1.12,
                heart_l=anat.heart_l * 0.85,
                heart_r=anat.heart_r * 0.85,
                heart_top=anat.heart_top + drop * 0.6,
                vessel_gain=anat.vessel_gain * 0.6,
                ap_depth=1.25,
            )
        elif obs == "scoliosis":
            amp = _pick(f, (0.10, 0.14, 0.20))
            anat = replace(anat, spine_amp=amp if anat.rib_v0 < 0.5 else -amp, spine_phase=anat.rib_v0)
        elif obs == "aortic_abnormality" and f.subtype in (None, "tortuous"):
            anat = replace(anat, knob_u=anat.knob_u + 0.08, knob_r=anat.knob_r * 1.45)
        elif obs == "edema" and f.subtype == "vascular_congestion":
            anat = replace(anat, upper_vessels=2.6, hilum=1.6, vessel_gain=anat.vessel_gain * 1.3)
        elif obs == "atelectasis" and f.subtype == "lobar":
            anat = replace(anat, dome_l=anat.dome_l - 0.06) if f.laterality == "left" else anat
    return anat


# --------------------------------------------------------------------------------------------
# Lateral view: anterior on the image left, the spine on the right
# --------------------------------------------------------------------------------------------


def _render_lateral(anat: Anatomy, pose: Pose, size: int, seed: int, found: dict[str, Finding]):
    cv = _Canvas(size, pose)
    W, V = cv.U, cv.V  # w: front (-) to back (+)
    d = anat.ap_depth
    ant = -0.62 * d + 0.1 * (-V).clip(0, 1)
    post = 0.75 * d
    body = ((W - ant) * cv.pu + 0.5).clip(0, 1) * ((post + 0.1 - W) * cv.pu + 0.5).clip(0, 1)
    cv.A += body * 1.05
    # Arms raised forward over the upper chest.
    arm = np.zeros_like(cv.A)
    cv.stroke([(-1.0, -0.75), (-0.15, 0.02)], 0.22 * cv.pv, layer=arm)
    cv.A += 0.18 * arm

    lung_front = -0.52 * d + 0.25 * (0.1 - V).clip(0, 1)
    lung_back = 0.62 * d
    dome_top = min(anat.dome_r, anat.dome_l)
    dome = dome_top + anat.dome_k * 0.9 * (W + 0.1) ** 2 - 0.06
    dome2 = dome + (anat.dome_l - anat.dome_r)
    apex = 0.02 + 0.9 * (W - 0.15) ** 2
    dist = np.minimum(
        np.minimum(W - lung_front, lung_back - W) * cv.pu, np.minimum(dome - V, V - apex) * cv.pv
    )
    lung = (dist + 0.5).clip(0, 1)
    fill = np.zeros_like(lung)
    markings = np.ones_like(lung)

    abdomen = ((V - dome) * cv.pv + 0.5).clip(0, 1) * body
    hw = 0.5 * (anat.heart_l + anat.heart_r) * 0.9 * d
    hh = 0.5 * (anat.dome_l + 0.1 - anat.heart_top)
    win, heart = cv.ellipse(-0.2 * d + (hw - 0.34) * 0.3, anat.heart_v + 0.04, hw, hh, angle=0.3, soft=0.3)
    med = np.zeros_like(lung)
    if win is not None:
        np.maximum(med[win], heart, out=med[win])
    # Aortic arch and the great vessels above the heart.
    win, arch = cv.ellipse(0.05, anat.knob_v + 0.02, 0.2, 0.12 * anat.knob_r / 0.06, soft=0.4)
    if win is not None:
        np.maximum(med[win], 0.5 * arch, out=med[win])
    # The lateral beam crosses the whole chest: less contrast between heart, lung and abdomen.
    cv.A += np.maximum(0.36 * abdomen, 0.3 * med) + 0.1 * (dome2 < V) * (V < dome) * body

    rng = np.random.default_rng([seed, 99, 3])
    white, smooth = _noise_tiles(size)
    tex = _tile_crop(smooth, size, (int(rng.integers(0, 1 << 16)), int(rng.integers(0, 1 << 16))))

    for obs, f in found.items():
        frng = np.random.default_rng([seed, OBSERVATIONS.index(obs), 17])
        if obs == "pleural_effusion":
            level = dome_top + _pick(f, (0.08, -0.18, -0.4))
            surface = level - 0.5 * W.clip(0, 1) ** 2  # highest in the posterior sulcus
            fluid = ((V - surface) * cv.pv * 0.12).clip(0, 1) * lung
            fill = np.maximum(fill, fluid)
            cv.A += 0.42 * fluid
        elif obs in ("consolidation", "pneumonia", "lung_opacity", "atelectasis"):
            v0 = {"upper": 0.25, "middle": 0.5, "lower": 0.75}.get(f.zone or "lower", 0.75)
            w0 = float(frng.uniform(-0.1, 0.35))
            if obs == "atelectasis":
                band = _soft_band((V - v0 - 0.1 * (W - w0)) * cv.pv, 0.012 * cv.pv)
                band *= (0.25 - np.abs(W - w0)).clip(0, 1) * 6
                fill = np.maximum(fill, band.clip(0, 1) * lung * 0.9)
            else:
                r = 0.25 if obs != "lung_opacity" else 0.32
                rho2 = ((W - w0) / r) ** 2 + ((V - v0) / (r * 0.6)) ** 2
                dens = {"consolidation": 0.85, "pneumonia": 0.6, "lung_opacity": 0.4}[obs]
                soft = 0.35 if obs != "lung_opacity" else 1.5
                region = ((1 - rho2) / soft).clip(0, 1) * lung
                if obs == "pneumonia":
                    region *= (0.5 + 0.6 * tex).clip(0, 1)
                fill = np.maximum(fill, dens * region)
        elif obs == "pneumothorax":
            line = (1 - np.abs((V - apex - 0.1) * cv.pv)).clip(0, 1) * lung
            space = ((apex + 0.1 - V) * cv.pv).clip(0, 1) * lung
            markings *= 1 - space
            cv.A += 0.2 * line - 0.1 * space
        elif obs == "edema" and f.subtype != "vascular_congestion":
            rho2 = ((W - 0.05) / 0.4) ** 2 + ((V - 0.45) / 0.3) ** 2
            fill = np.maximum(fill, _pick(f, (0.35, 0.5, 0.65)) * (1 - rho2).clip(0, 1) ** 2 * lung)
        elif obs == "pleural_other":
            band = ((W - (lung_back - 0.06)) * cv.pu).clip(0, 1) * lung
            fill = np.maximum(fill, 0.8 * band)

    air = lung * (1 - 0.6 * med) * (1 - fill)
    cv.A -= 0.8 * anat.air * air
    cv.A += 0.05 * lung * markings
    # Trachea: an air column sloping back toward the carina.
    tw = 0.5 * (W + 0.12 - 0.25 * (V + 0.4))
    trachea = _soft_band(tw * cv.pu, 0.03 * cv.pu) * ((0.32 - V) * cv.pv).clip(0, 1)
    cv.A -= 0.35 * trachea * body
    # Hila and vessels: blotchy density around the hilum.
    hil = (1 - ((W - 0.08) / 0.18) ** 2 - ((V - 0.42) / 0.2) ** 2).clip(0, 1)
    cv.A += anat.hilum * 0.18 * hil * lung + anat.vessel_gain * 0.6 * tex.clip(0, 2) * lung * markings

    # Spine: vertebral bodies with discs at the back, posterior elements behind them.
    spine_w0, spine_w1 = 0.40 * d, 0.58 * d
    col = ((W - spine_w0) * cv.pu + 0.5).clip(0, 1) * ((spine_w1 - W) * cv.pu + 0.5).clip(0, 1)
    vert_phase = (V + 0.5) * (1 / 0.085)
    bodies = _rib_profile(vert_phase, 0.085 * cv.pv, width=0.8)
    cv.A += col * (0.06 + 0.14 * bodies) + 0.07 * ((W - spine_w1 - 0.02) * cv.pu).clip(0, 1) * body
    # Posterior ribs: faint oblique bands over the back of the lungs.
    rib_phase = (V - 0.25 * W - anat.rib_v0 * anat.rib_pitch) * (1 / anat.rib_pitch)
    ribs = _rib_profile(rib_phase, anat.rib_pitch * cv.pv, width=0.35)
    cv.A += 0.08 * ribs * ((W + 0.1) * 3).clip(0, 1) * body * (V > -0.05)
    # Sternum: a thin dense plate in front.
    st = _soft_band((W - (lung_front - 0.05)) * cv.pu, 0.025 * cv.pu) * (V > -0.05) * (V < 0.7)
    cv.A += 0.25 * st

    for obs, f in found.items():
        frng = np.random.default_rng([seed, OBSERVATIONS.index(obs), 17])
        w = max(1.2, size / 150)
        if obs == "lung_lesion":
            v0 = {"upper": 0.25, "middle": 0.5, "lower": 0.72}.get(f.zone or "middle", 0.5)
            r = 0.13 if f.subtype == "mass" else 0.06
            cv.add_ellipse(0.4, float(frng.uniform(-0.2, 0.4)), v0, r, r, soft=0.3)
        elif obs == "calcified_granuloma":
            v0 = {"upper": 0.25, "middle": 0.5, "lower": 0.72}.get(f.zone or "middle", 0.5)
            cv.add_ellipse(0.9, float(frng.uniform(-0.2, 0.4)), v0, 0.025, 0.025)
        elif obs == "sternotomy":
            for k in range(6):
                vv = 0.05 + k * 0.1
                cv.stroke([(-0.56 * d, vv), (-0.5 * d, vv + 0.01)], w * 1.3)
        elif obs == "support_devices":
            if f.subtype == "pacemaker":
                win, m = cv.ellipse(-0.55 * d, 0.05, 0.06, 0.1)
                if win is not None:
                    np.maximum(cv.metal[win], m, out=cv.metal[win])
                cv.stroke(
                    _curve([(-0.55 * d, 0.05), (-0.1, 0.15), (-0.05, 0.45), (-0.3, 0.8)], 6), w, amp=0.8
                )
            else:
                cv.stroke(_curve([(-0.3, -0.3), (-0.1, 0.1), (-0.05, 0.45)], 6), w * 0.9, amp=0.55)
        elif obs == "degenerative_spine":
            levels = frng.choice(np.arange(3, 16), size=5, replace=False)
            for lv in levels:
                ve = lv * 0.085 - 0.5 - 0.004
                cv.add_ellipse(0.45, spine_w0 - 0.02, ve, 0.03, 0.014, angle=0.6)
        elif obs == "fracture" and f.subtype == "spine":
            v_f = float(frng.uniform(0.55, 0.9))
            v_f = (math.floor((v_f + 0.5) / 0.085) + 0.4) * 0.085 - 0.5
            cv.add_ellipse(0.6, (spine_w0 + spine_w1) / 2, v_f, 0.1 * d, 0.028)
        elif obs == "hiatal_hernia":
            u0, v0 = 0.25, anat.heart_v + 0.05
            win, m = cv.ellipse(u0, v0, 0.1, 0.09)
            if win is not None:
                gas = m * ((v0 - cv.V[win]) * cv.pv + 0.5).clip(0, 1)
                cv.A[win] += -0.45 * gas
        elif obs == "aortic_abnormality" and f.subtype == "calcified":
            pts = [
                (-0.12 + 0.17 * math.cos(t), anat.knob_v + 0.02 - 0.12 * math.sin(t))
                for t in np.linspace(0.3, 2.8, 8)
            ]
            cv.stroke(pts, w, amp=0.5)

    cv.A *= body
    cv.A += 1.3 * cv.metal
    return cv


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def _expose(cv: _Canvas, pose: Pose) -> np.ndarray:
    size = cv.size
    white, _ = _noise_tiles(size)
    img = cv.A - pose.lo
    img *= 4095.0 / (pose.hi - pose.lo)
    np.clip(img, 0.0, 4095.0, out=img)
    img += 0.5
    # The gamma curve through a 4096-entry table: a per-pixel pow costs more than the whole
    # exposure (steps of 1/4095 are far below one grey level).
    curve = np.linspace(0.0, 1.0, 4096, dtype=np.float32) ** np.float32(pose.gamma)
    img = np.take(curve, img.astype(np.intp))
    img *= 255.0 * (1.0 + pose.tilt * (np.arange(size, dtype=np.float32)[:, None] / size - 0.5))  # tilt ramp
    img += pose.noise * _tile_crop(white, size, pose.grain)
    np.clip(img, 0.0, 255.0, out=img)
    img += 0.5
    return img.astype(np.uint8)


# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


@functools.lru_cache(maxsize=1)
def keep_freed_memory(trim_bytes: int = 64 << 20, mmap_bytes: int = 8 << 20) -> bool:
    """Let this process keep freed heap memory between renders instead of handing it back to the OS.

    A render allocates a few MB of temporary arrays and frees them. By default glibc returns the
    freed top of the heap to the OS and the next render page-faults it back in: about 40% of the
    render time at 224 px (docs/PHANTOMS.md, "Rendering speed"). This raises glibc's trim threshold
    to `trim_bytes` and serves allocations under `mmap_bytes` from the heap. The cost is up to
    `trim_bytes` of freed memory kept per process. Process-wide, so it is called explicitly by
    the phantom image path (`study_images`) and the benchmark, never at import; once per process.
    Returns False where the C library is not glibc (nothing changes there).
    """
    import ctypes
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    ok = libc.mallopt(_M_TRIM_THRESHOLD, int(trim_bytes)) == 1
    return libc.mallopt(_M_MMAP_THRESHOLD, int(mmap_bytes)) == 1 and ok


def resolve_findings(findings: Mapping[str, object], *, seed: int) -> Findings:
    """The findings a render with this seed draws, with every attribute it chose filled in."""
    rng = np.random.default_rng([seed, 1])
    return _resolve(_valid_positive(findings), rng)


def render_phantom(findings: Findings, *, view: str = "frontal", size: int = 224, seed: int) -> np.ndarray:
    """A synthetic grayscale radiograph (uint8 [size, size]) showing the positive findings.

    The same (findings, view, size, seed) always gives the same bytes. Unknown observations or
    attributes raise a `PhantomWarning` and are skipped.
    """
    if view not in VIEWS:
        raise ValueError(f"view must be one of {VIEWS}, not {view!r}")
    if not MIN_SIZE <= size <= MAX_SIZE:
        raise ValueError(f"size must be in [{MIN_SIZE}, {MAX_SIZE}], not {size}")
    found = resolve_findings(findings, seed=seed)
    anat = _modify(_draw_anatomy(np.random.default_rng([seed, 2])), found)
    pose = _draw_pose(np.random.default_rng([seed, 3, VIEWS.index(view)]), view)
    if view == "frontal":
        cv = _render_frontal(anat, pose, size, seed, found)
    else:
        cv = _render_lateral(anat, pose, size, seed, found)
    return _expose(cv, pose)


# --------------------------------------------------------------------------------------------
# Records -> findings
# --------------------------------------------------------------------------------------------

# Report language that compares with an earlier film: a phantom is one image and cannot show change.
_COMPARISON = re.compile(
    r"\b(prior|previous(ly)?|unchanged|no (significant )?(interval )?change|interval(ly)?|"
    r"compared (with|to)|since|stable|again (seen|noted|demonstrated)|improv\w+|worsen\w*|resolv\w+)\b",
    re.IGNORECASE,
)


def comparison_phrases(text: str) -> list[str]:
    return sorted({m.group(0).lower() for m in _COMPARISON.finditer(text or "")})


def findings_for_record(record) -> tuple[Findings, list[str]]:
    """(positive findings to draw, items that cannot be drawn) for one study.

    IU studies use their human-coded MeSH terms; other sources the positive entries of
    `record.labels`. Not drawable: MeSH terms `mesh_to_findings` leaves unmapped, labels outside
    the vocabulary, and report statements that compare with a prior study.
    """
    not_renderable: list[str] = []
    findings: Findings = {}
    if record.source == "iu" and record.mesh:
        findings, unmapped = mesh_to_findings(list(record.mesh))
        not_renderable += [f"mesh: {t}" for t in unmapped]
    else:
        for obs, attrs in (record.labels or {}).items():
            if not isinstance(attrs, Mapping):
                not_renderable.append(f"label: {obs} (not a mapping)")
                continue
            if attrs.get("status", "positive") != "positive":
                continue
            try:
                f = Finding.from_dict(
                    {"observation": obs, **{k: v for k, v in attrs.items() if k != "observation"}}
                )
            except (TypeError, ValueError) as e:
                not_renderable.append(f"label: {obs} ({e})")
                continue
            if f.subtype is not None and f.subtype not in SUBTYPES.get(obs, ()):
                not_renderable.append(f"label: {obs} subtype {f.subtype!r}")
                f = replace(f, subtype=None)
            findings[obs] = f
        if len(findings) > 1:
            findings.pop("no_finding", None)
    text = " ".join(
        [
            record.findings or "",
            record.impression or "",
            *(record.original or {}).get("findings", "").split("\0"),
        ]
    )
    phrases = comparison_phrases(text)
    if phrases:
        not_renderable.append("comparison with a prior study: " + ", ".join(phrases))
    return findings, not_renderable


# --------------------------------------------------------------------------------------------
# `echocxr data phantoms`
# --------------------------------------------------------------------------------------------


def study_seed(study_id: str, seed: int, epoch: int | None = None) -> int:
    """A stable 63-bit seed per (study, seed, epoch), the same in every process."""
    key = f"{study_id}|{seed}|{'eval' if epoch is None else epoch}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 1


def iu_records(archive: str | Path):
    """IU studies (Records) from the Open-i archive, via the corpus reader."""
    from echocxr.data.readers import IssueLog
    from echocxr.data.readers.iu import read_iu

    archive = Path(archive)
    images = archive.parent / "images"
    return read_iu(archive, images if images.is_dir() else None, IssueLog())


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--iu", required=True, help="IU report archive (NLMCXR_reports.tgz) or its folder")
    parser.add_argument("--out", required=True, help="output folder for PNGs and findings.jsonl")
    parser.add_argument("--limit", type=int, default=16, help="number of studies (default 16)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=224, help=f"pixels, {MIN_SIZE} to {MAX_SIZE}")
    parser.add_argument("--views", default="frontal", help="comma-separated: frontal,lateral")
    parser.add_argument("--finding", default=None, help="only studies positive for this observation")


def _parse_views(text: str) -> tuple[str, ...]:
    views = tuple(v.strip() for v in text.split(",") if v.strip())
    bad = [v for v in views if v not in VIEWS]
    if bad or not views:
        raise UserError(f"--views: expected a comma-separated subset of {','.join(VIEWS)}, got {text!r}")
    return views


def run(args: argparse.Namespace) -> int:
    from PIL import Image

    views = _parse_views(args.views)
    if not MIN_SIZE <= args.size <= MAX_SIZE:
        raise UserError(f"--size must be in [{MIN_SIZE}, {MAX_SIZE}], got {args.size}")
    if args.finding is not None and args.finding not in OBSERVATIONS:
        raise UserError(f"--finding: unknown observation {args.finding!r}; one of {', '.join(OBSERVATIONS)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for rec in iu_records(args.iu):
        if len(rows) >= args.limit:
            break
        findings, not_renderable = findings_for_record(rec)
        if args.finding is not None and args.finding not in findings:
            continue
        s = study_seed(rec.study_id, args.seed)
        name = rec.study_id.replace(":", "_")
        files = {}
        for view in views:
            img = render_phantom(findings, view=view, size=args.size, seed=s)
            files[view] = f"{name}_{view}.png"
            Image.fromarray(img).save(out / files[view], optimize=False, compress_level=6)
        drawn = resolve_findings(findings, seed=s)
        rows.append(
            {
                "study_id": rec.study_id,
                "seed": s,
                "images": files,
                "findings": {k: f.to_dict() for k, f in drawn.items()},
                "not_renderable": not_renderable,
                "report": rec.report,
            }
        )
    _write_jsonl_atomic(out / "findings.jsonl", rows)
    print(json.dumps({"out": str(out), "studies": len(rows), "views": list(views), "size": args.size}))
    return 0


def _write_jsonl_atomic(path: Path, rows: Iterable[dict]) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n")
    os.replace(tmp, path)
