"""Synthetic brain-like phantoms and smooth random deformations (NumPy + SciPy).

Used by the demo (no data download is possible), by tests (tiny volumes with known answers) and by
benchmarks. Everything is deterministic for a given seed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy import ndimage

#: label -> mean intensity of the phantom (T1-like: WM bright, GM mid, CSF dark).
PHANTOM_INTENSITY = {0: 0.0, 1: 0.25, 2: 0.55, 3: 0.85, 4: 0.65, 5: 0.4, 6: 0.7}


def smooth_random_field(shape: tuple[int, ...], max_disp: float, smoothness: float,
                        rng: np.random.Generator) -> np.ndarray:
    """Random smooth displacement field.

    Args:
        shape: spatial shape `(*S,)`, 2D or 3D.
        max_disp: largest displacement magnitude per component, in voxels.
        smoothness: Gaussian sigma of the smoothing, in voxels.
        rng: NumPy random generator.

    Returns:
        `(*S, ndims)` float32 displacement in voxels (pull convention).
    """
    ndims = len(shape)
    comps = []
    for _ in range(ndims):
        noise = ndimage.gaussian_filter(rng.normal(size=shape), smoothness, mode="nearest")
        peak = np.abs(noise).max()
        comps.append(noise / (peak if peak > 0 else 1.0) * max_disp)
    return np.stack(comps, axis=-1).astype("float32")


def warp_numpy(volume: np.ndarray, disp: np.ndarray, order: int = 1) -> np.ndarray:
    """Reference warp with SciPy: `out(x) = volume(x + disp(x))`, nearest-border outside.

    Args:
        volume: `(*S,)` array.
        disp: `(*S, ndims)` displacement in voxels.
        order: spline order (1 linear, 0 nearest for labels).
    """
    grid = np.meshgrid(*[np.arange(n) for n in volume.shape], indexing="ij")
    coords = [g + disp[..., d] for d, g in enumerate(grid)]
    return ndimage.map_coordinates(volume, coords, order=order, mode="nearest")


def phantom(shape: tuple[int, ...], rng: np.random.Generator | None = None,
            jitter: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """A brain-like phantom: nested ellipsoids (CSF, GM, WM), two ventricles and deep nuclei.

    Args:
        shape: spatial shape, 2D or 3D.
        rng: random generator used for `jitter` (subject-to-subject variation of radii/centres).
        jitter: relative random variation of the ellipsoid radii and centres (0 = canonical).

    Returns:
        `(image, labels)`: float32 `(*S,)` in [0, 1] and int32 `(*S,)` with labels 0..6.
    """
    rng = rng or np.random.default_rng(0)
    ndims = len(shape)
    grid = np.meshgrid(*[(np.arange(n) - (n - 1) / 2) / (n / 2) for n in shape], indexing="ij")

    def ellipsoid(centre, radii):
        c = np.asarray(centre) + jitter * rng.normal(size=ndims) * 0.05
        r = np.asarray(radii) * (1 + jitter * rng.normal(size=ndims) * 0.05)
        return sum(((g - ci) / ri) ** 2 for g, ci, ri in zip(grid, c, r)) <= 1.0

    def pad(v, fill):
        return (list(v) + [fill] * 3)[:ndims]

    labels = np.zeros(shape, np.int32)
    labels[ellipsoid(pad([0, 0], 0), pad([0.85, 0.8], 0.8))] = 1          # CSF shell
    labels[ellipsoid(pad([0, 0], 0), pad([0.78, 0.72], 0.72))] = 2        # grey matter
    labels[ellipsoid(pad([0, 0], 0), pad([0.62, 0.56], 0.56))] = 3        # white matter
    labels[ellipsoid(pad([-0.05, -0.22], 0), pad([0.3, 0.09], 0.2))] = 4  # left ventricle region
    labels[ellipsoid(pad([-0.05, 0.22], 0), pad([0.3, 0.09], 0.2))] = 4   # right ventricle region
    labels[ellipsoid(pad([0.3, -0.2], 0.05), pad([0.12, 0.12], 0.12))] = 5  # nucleus L
    labels[ellipsoid(pad([0.3, 0.2], 0.05), pad([0.12, 0.12], 0.12))] = 6   # nucleus R
    image = np.vectorize(PHANTOM_INTENSITY.get, otypes=[np.float32])(labels)
    image = ndimage.gaussian_filter(image, 0.7)
    return image.astype("float32"), labels


def deformed_subject(shape: tuple[int, ...], seed: int, max_disp: float = 2.0,
                     smoothness: float | None = None, noise: float = 0.01
                     ) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic subject: a jittered phantom deformed by a smooth random field, plus noise.

    Returns:
        `(image float32 (*S,), labels int32 (*S,))`.
    """
    rng = np.random.default_rng(seed)
    image, labels = phantom(shape, rng, jitter=1.0)
    sigma = smoothness if smoothness is not None else max(min(shape) / 6, 2.0)
    disp = smooth_random_field(shape, max_disp, sigma, rng)
    image = warp_numpy(image, disp, order=1) + noise * rng.normal(size=shape)
    labels = warp_numpy(labels, disp, order=0).astype(np.int32)
    return np.clip(image, 0, 1).astype("float32"), labels


def write_collection(folder: str | Path, n: int = 6, shape: tuple[int, ...] = (24, 24, 24),
                     seed: int = 0, max_disp: float = 2.0) -> Path:
    """Write `n` synthetic subjects as NIfTI (`images/sub-XX.nii.gz`, `labels/sub-XX.nii.gz`) and a
    minimal data spec `data.yaml` (scan-to-scan pairing). Returns the path of `data.yaml`."""
    import nibabel as nib

    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "labels").mkdir(parents=True, exist_ok=True)
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    for i in range(n):
        image, labels = deformed_subject(shape, seed * 1000 + i, max_disp=max_disp)
        nib.save(nib.Nifti1Image(image, affine), folder / "images" / f"sub-{i:02d}.nii.gz")
        nib.save(nib.Nifti1Image(labels, affine), folder / "labels" / f"sub-{i:02d}.nii.gz")
    spec = folder / "data.yaml"
    spec.write_text(
        "images: images/*.nii.gz\n"
        "labels: labels/*.nii.gz\n"
        f"shape: [{', '.join(str(s) for s in shape)}]\n"
        "pairing: scan-to-scan\n"
    )
    return spec
