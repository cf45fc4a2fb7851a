"""Synthetic videos with exact labels, for tests, demos and napari's sample data.

``make_clip`` draws textured objects moving over a textured background (with occlusions and,
optionally, an object entering mid-way); ``make_timelapse`` draws a fluorescence-microscopy-like
time-lapse of moving cells, one of which divides. Both are deterministic for a seed and use
numpy and scipy only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

__all__ = ["make_cell_timelapse", "make_clip", "make_timelapse"]


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], sigma: float) -> np.ndarray:
    """Gaussian-filtered white noise with zero mean and unit standard deviation."""
    noise = ndimage.gaussian_filter(rng.standard_normal(shape), sigma, mode="wrap")
    noise -= noise.mean()
    return noise / (noise.std() + 1e-12)


def _hsv_to_rgb(h: float, s: float, v: float) -> np.ndarray:
    i = int(h * 6.0) % 6
    f = h * 6.0 - int(h * 6.0)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    return np.array(
        [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i], dtype=np.float32
    )


def _to_dtype(frames: np.ndarray, dtype: np.dtype | type) -> np.ndarray:
    """Float frames in [0, 1] -> the requested dtype (integers span their full range)."""
    dtype = np.dtype(dtype)
    frames = np.clip(frames, 0.0, 1.0)
    if np.issubdtype(dtype, np.integer):
        return np.round(frames * np.iinfo(dtype).max).astype(dtype)
    if np.issubdtype(dtype, np.floating):
        return frames.astype(dtype)
    raise ValueError(f"dtype must be an integer or floating type, got {dtype}")


def _check_size(n_frames: int, height: int, width: int) -> None:
    if n_frames < 1:
        raise ValueError(f"n_frames must be at least 1, got {n_frames}")
    if height < 16 or width < 16:
        raise ValueError(f"frames must be at least 16x16 pixels, got {height}x{width}")


@dataclass
class _Sprite:
    """A textured shape with a trajectory; drawn in its own rotating, scaling frame."""

    label: int
    radius: float  # mean radius of the outline
    harmonics: np.ndarray  # [K, 3]: order, relative amplitude, phase of the outline
    texture: np.ndarray  # [L, L, C], centred on the shape
    center0: np.ndarray  # (y, x) at t = 0
    velocity: np.ndarray  # (y, x) per frame
    wobble: np.ndarray  # [2, 3]: amplitude, angular frequency, phase of (y, x) oscillation
    angle0: float
    spin: float  # radians per frame
    scale_amp: float
    scale_freq: float
    shading: float = 0.25  # darkening towards the rim, for a little depth
    aspect: float = 1.0  # stretch along the local u axis (cells elongating before division)

    @property
    def max_radius(self) -> float:
        outline = 1.0 + np.abs(self.harmonics[:, 1]).sum()
        return self.radius * outline * (1.0 + abs(self.scale_amp)) * max(self.aspect, 1.0)

    def pose(self, t: float) -> tuple[np.ndarray, float, float]:
        amp, freq, phase = self.wobble[:, 0], self.wobble[:, 1], self.wobble[:, 2]
        center = self.center0 + self.velocity * t + amp * np.sin(freq * t + phase)
        angle = self.angle0 + self.spin * t
        scale = 1.0 + self.scale_amp * np.sin(self.scale_freq * t)
        return center, angle, scale

    def draw(
        self, image: np.ndarray, labels: np.ndarray, t: float, label: int | None = None
    ) -> None:
        """Paint the sprite over ``image`` [H, W, C] and ``labels`` [H, W] in place."""
        h, w = labels.shape
        (cy, cx), angle, scale = self.pose(t)
        reach = self.max_radius + 2
        y0, y1 = max(int(np.floor(cy - reach)), 0), min(int(np.ceil(cy + reach)) + 1, h)
        x0, x1 = max(int(np.floor(cx - reach)), 0), min(int(np.ceil(cx + reach)) + 1, w)
        if y0 >= y1 or x0 >= x1:
            return
        dy, dx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
        dy -= cy
        dx -= cx
        cos, sin = np.cos(angle), np.sin(angle)
        u = (cos * dx + sin * dy) / (scale * self.aspect)
        v = (-sin * dx + cos * dy) / scale
        rho = np.hypot(u, v)
        phi = np.arctan2(v, u)
        outline = np.ones_like(rho)
        for order, amp, phase in self.harmonics:
            outline += amp * np.cos(order * phi + phase)
        outline *= self.radius
        # One pixel of anti-aliasing on the rim; the label is the half-coverage contour.
        alpha = np.clip((outline - rho) * scale + 0.5, 0.0, 1.0)[..., None]
        inside = rho < outline
        if not inside.any():
            return
        half = (self.texture.shape[0] - 1) / 2
        coords = np.stack([v + half, u + half])
        colour = np.stack(
            [
                ndimage.map_coordinates(self.texture[..., c], coords, order=1, mode="nearest")
                for c in range(self.texture.shape[-1])
            ],
            axis=-1,
        )
        rim = np.clip(rho / np.maximum(outline, 1e-6), 0.0, 1.0)[..., None]
        colour *= 1.0 - self.shading * rim**4
        patch = image[y0:y1, x0:x1]
        patch *= 1.0 - alpha
        patch += alpha * colour
        labels[y0:y1, x0:x1][inside] = self.label if label is None else label


def _object_texture(rng: np.random.Generator, size: int, hue: float, radius: float) -> np.ndarray:
    """Saturated two-colour pattern (stripes or spots) with fine grain."""
    c1 = _hsv_to_rgb(hue, rng.uniform(0.65, 0.9), rng.uniform(0.75, 0.95))
    c2 = _hsv_to_rgb((hue + rng.uniform(-0.08, 0.08)) % 1.0, rng.uniform(0.7, 1.0), 0.35)
    yy, xx = np.mgrid[:size, :size].astype(np.float32)
    if rng.random() < 0.5:
        direction = rng.uniform(0, np.pi)
        period = radius * rng.uniform(0.45, 0.8)
        warp = 1.5 * _smooth_noise(rng, (size, size), radius / 3)
        along = xx * np.cos(direction) + yy * np.sin(direction)
        mix = np.sin(2 * np.pi * along / period + warp)
    else:
        mix = 1.5 * _smooth_noise(rng, (size, size), radius / 6) - 0.3
    mix = 1.0 / (1.0 + np.exp(-4.0 * mix))  # soft edges between the two colours
    grain = 1.0 + 0.08 * _smooth_noise(rng, (size, size), 0.8)
    tex = (mix[..., None] * c1 + (1.0 - mix[..., None]) * c2) * grain[..., None]
    return tex.astype(np.float32)


def _background(rng: np.random.Generator, height: int, width: int, hue: float) -> np.ndarray:
    """Muted, low-saturation texture at several scales (a table top, a field, a wall)."""
    c1 = _hsv_to_rgb(hue, rng.uniform(0.1, 0.3), rng.uniform(0.5, 0.65))
    c2 = _hsv_to_rgb((hue + rng.uniform(0.05, 0.15)) % 1.0, rng.uniform(0.1, 0.3), 0.3)
    big = max(height, width) / 8
    mix = 1.0 / (1.0 + np.exp(-2.0 * _smooth_noise(rng, (height, width), big)))
    mid = _smooth_noise(rng, (height, width), 3.0)
    fine = _smooth_noise(rng, (height, width), 0.7)
    lum = 1.0 + 0.12 * mid + 0.06 * fine
    bg = (mix[..., None] * c1 + (1.0 - mix[..., None]) * c2) * lum[..., None]
    return bg.astype(np.float32)


def make_clip(
    n_frames: int = 12,
    height: int = 96,
    width: int = 128,
    n_objects: int = 2,
    seed: int = 0,
    occlusion: bool = True,
    late_object: bool = False,
    channels: int = 3,
    dtype: np.dtype | type = np.uint8,
) -> tuple[np.ndarray, np.ndarray]:
    """A video of textured objects moving over a textured background, with exact labels.

    Returns ``frames`` [T, H, W, 3] (or [T, H, W] when ``channels == 1``) of ``dtype``
    (integers span their full range, floats lie in [0, 1]) and ``labels`` [T, H, W] uint8 with
    objects 1..n_objects (0 = background). With ``occlusion``, objects 1 and 2 cross paths
    mid-clip and the one in front wins in the labels; without it, every object keeps to its own
    vertical strip of the frame and objects never touch. With ``late_object``, object
    ``n_objects + 1`` enters from the border: absent from the first half of the clip, inside
    the frame at the end.
    """
    _check_size(n_frames, height, width)
    most = 255 - int(late_object)  # ids must fit in uint8 labels
    if not 1 <= n_objects <= most:
        raise ValueError(f"n_objects must be between 1 and {most}, got {n_objects}")
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    rng = np.random.default_rng(seed)
    side = min(height, width)
    last = max(n_frames - 1, 1)
    mid = last / 2
    hue0 = rng.random()

    sprites: list[_Sprite] = []
    for k in range(n_objects):
        radius = side * rng.uniform(0.13, 0.18)
        if not occlusion:
            # Keep to a strip so objects never touch, whatever the motion.
            strip = width / n_objects
            radius = min(radius, strip * 0.28)
        n_harm = 3
        harmonics = np.stack(
            [
                np.arange(2, 2 + n_harm),
                rng.uniform(0.03, 0.1, n_harm),
                rng.uniform(0, 2 * np.pi, n_harm),
            ],
            axis=1,
        )
        sprite = _Sprite(
            label=k + 1,
            radius=radius,
            harmonics=harmonics,
            texture=np.empty((1, 1, 3), np.float32),
            center0=np.zeros(2),
            velocity=np.zeros(2),
            wobble=np.stack(
                [
                    rng.uniform(0.01, 0.04, 2) * side,
                    rng.uniform(0.2, 0.5, 2),
                    rng.uniform(0, 2 * np.pi, 2),
                ],
                axis=1,
            ),
            angle0=rng.uniform(0, 2 * np.pi),
            spin=rng.uniform(-0.06, 0.06),
            scale_amp=rng.uniform(0.03, 0.1),
            scale_freq=rng.uniform(0.1, 0.3),
        )
        size = 2 * int(np.ceil(sprite.max_radius)) + 3
        hue = (hue0 + 0.5 + (k - (n_objects - 1) / 2) / max(n_objects + 1, 3)) % 1.0
        sprite.texture = _object_texture(rng, size, hue, radius)
        if occlusion:
            if k < 2:
                # Objects 1 and 2 meet near the centre mid-clip, coming from opposite sides.
                # Offset across the paths so the one behind stays partly visible.
                shift = (0.35 if k == 0 else -0.35) * side * 0.15
                meet = (
                    np.array([height / 2 + shift, width / 2]) + rng.uniform(-0.03, 0.03, 2) * side
                )
                heading = rng.uniform(-0.4, 0.4) + (0 if k == 0 else np.pi)
                travel = side * 0.32
                direction = np.array([np.sin(heading) * 0.6, np.cos(heading)])
                sprite.velocity = direction * travel / max(mid, 1)
                sprite.center0 = meet - sprite.velocity * mid
                # Cancel the wobble at the meeting time so they do overlap then.
                sprite.center0 -= sprite.wobble[:, 0] * np.sin(
                    sprite.wobble[:, 1] * mid + sprite.wobble[:, 2]
                )
            else:
                margin = sprite.radius * 1.2
                sprite.center0 = np.array(
                    [rng.uniform(margin, height - margin), rng.uniform(margin, width - margin)]
                )
                sprite.velocity = rng.uniform(-1, 1, 2) * side * 0.3 / last
        else:
            strip = width / n_objects
            reach = sprite.max_radius + 1
            room = max(strip / 2 - reach, 0.0)
            sprite.wobble[1, 0] = min(sprite.wobble[1, 0], room / 2)
            cx = strip * (k + 0.5)
            cy = rng.uniform(reach, max(height - reach, reach + 1))
            sprite.center0 = np.array([cy, cx])
            sprite.velocity = np.array([rng.uniform(-1, 1) * side * 0.25 / last, 0.0])
            sprite.wobble[1, 2] = 0.0  # no x offset at t = 0; x stays within +-room/2
        sprites.append(sprite)
    order = list(rng.permutation(n_objects))  # back to front

    if late_object:
        radius = side * 0.15
        harmonics = np.array([[2, 0.08, rng.uniform(0, 6)], [3, 0.05, rng.uniform(0, 6)]])
        late = _Sprite(
            label=n_objects + 1,
            radius=radius,
            harmonics=harmonics,
            texture=np.empty((1, 1, 3), np.float32),
            center0=np.zeros(2),
            velocity=np.zeros(2),
            wobble=np.zeros((2, 3)),
            angle0=rng.uniform(0, 2 * np.pi),
            spin=0.03,
            scale_amp=0.0,
            scale_freq=0.0,
        )
        size = 2 * int(np.ceil(late.max_radius)) + 3
        late_hue = (hue0 + 0.5 + 0.5 / max(n_objects + 1, 3)) % 1.0
        late.texture = _object_texture(rng, size, late_hue, radius)
        # Enter from the left or right border: just outside at t_in, inside by the last frame.
        t_in = n_frames // 2
        from_left = rng.random() < 0.5
        outside = late.max_radius + 1.5
        target = width * 0.3 if from_left else width * 0.7
        start_x = -outside if from_left else width - 1 + outside
        speed = (target - start_x) / max(n_frames - 1 - t_in, 1)
        late.velocity = np.array([0.0, speed])
        cy = height * rng.uniform(0.35, 0.65)
        late.center0 = np.array([cy, start_x - speed * t_in])
        sprites.append(late)
        order.append(n_objects)  # in front: it must be seen when it enters

    # The background's hue is opposite the objects': they must not blend in by chance.
    background = _background(rng, height, width, (hue0 + rng.uniform(-0.05, 0.05)) % 1.0)
    frames = np.empty((n_frames, height, width, 3), np.float32)
    labels = np.zeros((n_frames, height, width), np.uint8)
    for t in range(n_frames):
        image = background.copy()
        for k in order:
            sprites[k].draw(image, labels[t], float(t))
        image += 0.012 * rng.standard_normal(image.shape).astype(np.float32)
        frames[t] = image
    if channels == 1:
        frames = frames @ np.array([0.299, 0.587, 0.114], np.float32)
    return _to_dtype(frames, dtype), labels


def make_timelapse(
    n_frames: int = 20,
    height: int = 128,
    width: int = 128,
    n_cells: int = 5,
    seed: int = 0,
    dtype: np.dtype | type = np.uint16,
) -> tuple[np.ndarray, np.ndarray]:
    """A fluorescence-microscopy-like time-lapse: bright cells drifting on a dark noisy field.

    Returns ``frames`` [T, H, W] of ``dtype`` (uint16 counts by default: offset about 100,
    cells a few thousand, shot and read noise) and ``labels`` [T, H, W] uint8 with cells
    1..n_cells. Cell 1 divides at frame ``n_frames // 2`` (when n_frames >= 4): one daughter
    keeps id 1, the other is a new object, id ``n_cells + 1``.
    """
    _check_size(n_frames, height, width)
    if not 1 <= n_cells <= 254:
        raise ValueError(f"n_cells must be between 1 and 254, got {n_cells}")
    rng = np.random.default_rng(seed)
    side = min(height, width)
    last = max(n_frames - 1, 1)

    cells: list[_Sprite] = []
    centres: list[np.ndarray] = []
    for k in range(n_cells):
        radius = side * rng.uniform(0.055, 0.085)
        harmonics = np.array(
            [[2, rng.uniform(0.05, 0.15), rng.uniform(0, 6)], [3, 0.04, rng.uniform(0, 6)]]
        )
        margin = radius * 2.2
        # Spread the cells out: keep the candidate farthest from those already placed.
        candidates = np.stack(
            [rng.uniform(margin, height - margin, 16), rng.uniform(margin, width - margin, 16)],
            axis=1,
        )
        if centres:
            gaps = np.linalg.norm(candidates[:, None] - np.array(centres)[None], axis=2).min(1)
            centre = candidates[int(np.argmax(gaps))]
        else:
            centre = candidates[0]
        centres.append(centre)
        size = 2 * int(np.ceil(radius * 1.8)) + 3
        brightness = rng.uniform(0.5, 1.0)
        # Nucleus-like texture: brighter nucleoli spots on a smooth body.
        body = 1.0 + 0.2 * _smooth_noise(rng, (size, size), radius / 4)
        spots = np.clip(_smooth_noise(rng, (size, size), radius / 8) - 1.2, 0, None)
        texture = (brightness * (body + 0.5 * spots))[..., None].astype(np.float32)
        cells.append(
            _Sprite(
                label=k + 1,
                radius=radius,
                harmonics=harmonics,
                texture=texture,
                center0=centre,
                velocity=rng.uniform(-1, 1, 2) * side * 0.08 / last,
                wobble=np.stack(
                    [rng.uniform(0.5, 1.5, 2), rng.uniform(0.2, 0.6, 2), rng.uniform(0, 6, 2)],
                    axis=1,
                ),
                angle0=rng.uniform(0, 2 * np.pi),
                spin=rng.uniform(-0.03, 0.03),
                scale_amp=0.03,
                scale_freq=rng.uniform(0.1, 0.3),
                shading=-0.3,  # fluorescence is brighter at the rim of a flattened cell
            )
        )

    t_div = n_frames // 2 if n_frames >= 4 else None
    parent = cells[0]
    daughters: list[tuple[float, _Sprite]] = []
    if t_div is not None:
        for sign, label in ((1.0, 1), (-1.0, n_cells + 1)):
            daughter = _Sprite(
                label=label,
                radius=parent.radius * 0.78,
                harmonics=parent.harmonics * 0.5,
                texture=parent.texture * 1.15,
                center0=parent.center0,
                velocity=parent.velocity,
                wobble=parent.wobble,
                angle0=parent.angle0,
                spin=0.0,
                scale_amp=0.0,
                scale_freq=0.0,
                shading=parent.shading,
            )
            daughters.append((sign, daughter))

    offset = 100.0 / 65535
    gain = 3000.0 / 65535
    background = offset * (1.0 + 0.1 * _smooth_noise(rng, (height, width), side / 6))
    frames = np.empty((n_frames, height, width), np.float32)
    labels = np.zeros((n_frames, height, width), np.uint8)
    for t in range(n_frames):
        signal = np.zeros((height, width, 1), np.float32)
        for cell in cells[1:]:
            cell.draw(signal, labels[t], float(t))
        if t_div is None or t < t_div:
            # The parent stretches along its axis during the frames before it divides.
            if t_div is not None:
                parent.aspect = 1.0 + 0.4 * np.clip((t - (t_div - 3)) / 3, 0, 1)
            parent.draw(signal, labels[t], float(t))
        else:
            (cy, cx), angle, _ = parent.pose(float(t_div))
            axis = np.array([np.sin(angle), np.cos(angle)])
            separation = parent.radius * (0.85 + 0.25 * min(t - t_div, 4))
            for sign, daughter in daughters:
                daughter.center0 = (
                    np.array([cy, cx]) + sign * axis * separation - parent.velocity * t_div
                )
                daughter.angle0 = angle + np.pi / 2
                daughter.wobble = np.zeros((2, 3))
                daughter.draw(signal, labels[t], float(t))
        # A little optical blur, then shot noise and camera read noise, in counts.
        signal = ndimage.gaussian_filter(signal[..., 0], 1.0)
        expected = (background + gain * signal) * 65535
        counts = rng.poisson(np.maximum(expected, 0)).astype(np.float32)
        counts += 5.0 * rng.standard_normal(counts.shape).astype(np.float32)
        frames[t] = counts / 65535
    return _to_dtype(frames, dtype), labels


def make_cell_timelapse(
    n_frames: int = 8,
    height: int = 160,
    width: int = 160,
    n_cells: int = 12,
    diameter: float = 40.0,
    modality: str = "fluorescence",
    divisions: int = 2,
    entering: int = 1,
    bleaching: float = 0.02,
    speed: float = 0.1,
    snr: float = 1.0,
    seed: int = 0,
    dtype: np.dtype | type = np.uint16,
) -> tuple[np.ndarray, np.ndarray]:
    """A crowded microscopy time-lapse: touching, deforming, dividing cells, some entering.

    ``modality`` is ``"fluorescence"`` (bright textured nuclei on a dark offset, blur, Poisson
    and read noise, photobleaching: the signal falls by ``bleaching`` per frame) or ``"dic"``
    (label-free differential interference contrast: the gradient of the cells' optical
    thickness along a shear direction, relief-like, on a grey, unevenly lit field).
    ``diameter`` is the median cell diameter in pixels (each cell within +-25 %), ``speed`` the
    typical displacement per frame as a share of it, ``snr`` scales the photon budget (lower is
    noisier).

    Returns ``frames`` [T, H, W] of ``dtype`` and ``labels`` [T, H, W] uint8 as *lineages*:
    ``divisions`` cells split mid-clip and both daughters keep the mother's id (the target when
    one follows "this cell and its progeny"); ``entering`` cells come in across the border
    with new ids after the first ``n_cells``. Later-drawn cells cover earlier ones where they
    touch.
    """
    _check_size(n_frames, height, width)
    if modality not in ("fluorescence", "dic"):
        raise ValueError(f"modality must be 'fluorescence' or 'dic', got {modality!r}")
    if not 1 <= n_cells + entering <= 255:
        raise ValueError(f"n_cells + entering must be between 1 and 255, got {n_cells + entering}")
    if diameter < 4:
        raise ValueError(f"diameter must be at least 4 pixels, got {diameter}")
    rng = np.random.default_rng(seed)
    fluo = modality == "fluorescence"
    step = speed * diameter

    def cell(label: int, centre: np.ndarray, velocity: np.ndarray) -> _Sprite:
        radius = diameter / 2 * rng.uniform(0.75, 1.25)
        harmonics = np.array(
            [
                [2, rng.uniform(0.03, 0.2), rng.uniform(0, 6)],
                [3, rng.uniform(0.0, 0.08), rng.uniform(0, 6)],
                [5, rng.uniform(0.0, 0.04), rng.uniform(0, 6)],
            ]
        )
        size = 2 * int(np.ceil(radius * 1.9)) + 3
        body = 1.0 + rng.uniform(0.05, 0.3) * _smooth_noise(rng, (size, size), max(radius / 4, 1))
        spots = np.clip(_smooth_noise(rng, (size, size), max(radius / 8, 0.7)) - 1.0, 0, None)
        brightness = rng.uniform(0.4, 1.0) if fluo else rng.uniform(0.6, 1.0)
        texture = (brightness * (body + rng.uniform(0.2, 0.8) * spots))[..., None]
        return _Sprite(
            label=label,
            radius=radius,
            harmonics=harmonics,
            texture=texture.astype(np.float32),
            center0=centre,
            velocity=velocity,
            wobble=np.stack(
                [
                    rng.uniform(0.2, 1.0, 2) * step,
                    rng.uniform(0.2, 0.8, 2),
                    rng.uniform(0, 6, 2),
                ],
                axis=1,
            ),
            angle0=rng.uniform(0, 2 * np.pi),
            spin=rng.uniform(-0.06, 0.06),
            scale_amp=rng.uniform(0.0, 0.08),
            scale_freq=rng.uniform(0.1, 0.4),
            # Fluorescence: brighter rim of a flattened nucleus; DIC: a dome of optical thickness.
            shading=-0.3 if fluo else 0.9,
        )

    cells = [
        cell(
            k + 1,
            np.array([rng.uniform(0, height), rng.uniform(0, width)]),
            rng.standard_normal(2) * step,
        )
        for k in range(n_cells)
    ]
    for k in range(entering):
        # Starts just outside one border, heads inwards, arrives within the clip.
        side = int(rng.integers(4))
        along = rng.uniform(0.2, 0.8)
        r = diameter * 0.7
        start = {
            0: (-r, along * width),
            1: (height + r, along * width),
            2: (along * height, -r),
            3: (along * height, width + r),
        }[side]
        inward = {0: (1, 0), 1: (-1, 0), 2: (0, 1), 3: (0, -1)}[side]
        t_in = rng.uniform(0, max(n_frames - 2, 1))
        v = np.array(inward, dtype=float) * 2.5 * r / max(n_frames - t_in, 1)
        cells.append(cell(n_cells + k + 1, np.array(start) - v * t_in, v))
    order = list(rng.permutation(len(cells)))

    # Divisions: the mother stretches for 3 frames, then two smaller daughters move apart.
    dividing: dict[int, tuple[int, list[_Sprite]]] = {}
    for k in rng.permutation(n_cells)[: min(divisions, n_cells)] if n_frames >= 2 else []:
        mother = cells[int(k)]
        t_div = int(rng.integers(1, n_frames)) if n_frames > 1 else 0
        daughters = []
        for _ in range(2):
            d = cell(mother.label, mother.center0, mother.velocity)
            d.radius = mother.radius * 0.75
            d.texture = mother.texture * 1.15
            d.wobble = np.zeros((2, 3))
            daughters.append(d)
        dividing[int(k)] = (t_div, daughters)

    density = np.empty((n_frames, height, width), np.float32)
    labels = np.zeros((n_frames, height, width), np.uint8)
    for t in range(n_frames):
        canvas = np.zeros((height, width, 1), np.float32)
        for k in order:
            c = cells[k]
            if k in dividing and t >= dividing[k][0]:
                t_div, daughters = dividing[k]
                (cy, cx), angle, _ = c.pose(float(t_div))
                axis = np.array([np.sin(angle), np.cos(angle)])
                sep = c.radius * (0.8 + 0.25 * min(t - t_div, 4))
                for sign, d in zip((1.0, -1.0), daughters, strict=True):
                    d.center0 = np.array([cy, cx]) + sign * axis * sep - c.velocity * t_div
                    d.angle0 = angle + np.pi / 2
                    d.draw(canvas, labels[t], float(t))
            else:
                if k in dividing:
                    c.aspect = 1.0 + 0.35 * np.clip((t - (dividing[k][0] - 3)) / 3, 0, 1)
                c.draw(canvas, labels[t], float(t))
        density[t] = canvas[..., 0]

    side = min(height, width)
    illumination = 1.0 + rng.uniform(0.0, 0.15) * _smooth_noise(rng, (height, width), side / 3)
    frames = np.empty((n_frames, height, width), np.float32)
    if fluo:
        offset = rng.uniform(0.002, 0.02)
        photons = rng.uniform(200, 3000) * snr  # photons at full brightness
        blur = rng.uniform(0.6, 1.5)
        for t in range(n_frames):
            signal = ndimage.gaussian_filter(density[t], blur) * np.exp(-bleaching * t)
            expected = (0.03 + signal * illumination) * photons
            counts = rng.poisson(np.maximum(expected, 0)).astype(np.float32) / photons
            frames[t] = (
                offset
                + 0.2 * counts
                + rng.uniform(0.0005, 0.003)
                * rng.standard_normal((height, width)).astype(np.float32)
            )
    else:
        shear = rng.uniform(0, 2 * np.pi)
        relief = rng.uniform(0.15, 0.4) / max(diameter / 40, 0.5)
        grey = rng.uniform(0.35, 0.55)
        noise = rng.uniform(0.005, 0.03) / snr
        for t in range(n_frames):
            thick = ndimage.gaussian_filter(density[t], rng.uniform(1.0, 2.0))
            gy, gx = np.gradient(thick)
            dic = np.cos(shear) * gx + np.sin(shear) * gy
            frames[t] = (grey + relief * dic * diameter / 8) * illumination + noise * (
                rng.standard_normal((height, width)).astype(np.float32)
            )
    return _to_dtype(frames, dtype), labels
