"""Transform formats: tfreg displacements to and from world mm, ITK/ANTs and Learn2Reg files.

Every format below describes the same pull transform ``T``: a point of the **fixed** image maps to
the point of the moving image whose intensity it takes. ``F`` is the fixed image's `(4, 4)`
voxel-to-world (RAS mm) NIfTI affine, ``M = F[:3, :3]``, ``L = diag(-1, -1, 1)`` (RAS <-> LPS).

=======  =====================  ============  ===============================================
format   array on disk          units / axes  meaning
=======  =====================  ============  ===============================================
tfreg    ``(X, Y, Z, 3)`` f32   fixed voxels, ``T(F x) = F (x + u(x))``: channel d along array
                                array axes    axis d (Learn2Reg's and voxelmorph's convention)
world    ``(X, Y, Z, 3)`` f32   mm, RAS       ``d_ras(x) = M u(x)``; fixed grid; intent_name
                                              ``"RAS mm"`` marks it
itk      ``(X,Y,Z,1,3)`` f32    mm, LPS       ``d_lps(x) = L M u(x)``; intent 1007 (vector),
                                              as antsApplyTransforms / ITK read displacement
                                              fields: ``T(p) = p + d(p)`` for LPS points
l2r      ``(X, Y, Z, 3)``       fixed voxels  tfreg's layout, values rounded to float16
                                              precision, named ``disp_FIXED_MOVING.nii.gz``
=======  =====================  ============  ===============================================

The origin of voxel coordinates is the centre of the first voxel (NIfTI's and ITK's); world
coordinates are the scanner's (the NIfTI affine's). An ITK affine transform file (``.mat``, MATLAB
v4 as ANTs writes it, or ``.txt``) holds ``AffineTransform_double_3_3``: parameters
``[m00 m01 m02 m10 ... m22 t0 t1 t2]`` (row-major matrix, then translation) and fixed parameters
``c`` (the centre), and maps an LPS point of the fixed image to ``Mx (p - c) + c + t`` in the
moving image. ANTs applies ``transformlist=[warp, affine]`` to a fixed point as
``affine(warp(p))``: the warp first.

A NIfTI-1 file has no float16 voxel type (nibabel refuses it), so the Learn2Reg layout rounds the
values to float16 precision and stores them as float32 (the zeroed low mantissa bits compress).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy import ndimage

from tfreg.errors import InputError, reason
from tfreg.io import Volume, atomic_path, load_volume, nifti_stem, read_info, save_volume

__all__ = ["FORMATS", "RAS_TO_LPS", "voxel_to_world", "world_to_voxel", "homogeneous_affine",
           "centred_affine", "affine_to_physical",
           "physical_to_affine", "deformable_part", "read_itk_affine", "write_itk_affine",
           "save_field", "read_transform", "field_format", "l2r_name"]

#: field formats `save_field` writes (`read_transform` reads all but "l2r", which is "tfreg").
FORMATS = ("tfreg", "world", "itk", "l2r")
#: RAS <-> LPS: the first two world axes change sign (its own inverse).
RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])
#: NIfTI intent code of a vector image (what ITK writes for displacement fields).
INTENT_VECTOR = 1007
#: intent_name marking a world-space (RAS mm) field written by tfreg.
WORLD_INTENT = "RAS mm"
_AFFINE_SUFFIXES = (".mat", ".txt", ".tfm")


def _check_3d(name: str, shape: tuple[int, ...], what: str) -> None:
    if len(shape) != 3:
        raise InputError(f"{name}: {what} needs a 3D field, got spatial shape {shape}")


# ------------------------------------------------------------------------------- vectors
def voxel_to_world(disp: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Voxel displacement `(*S, 3)` on a grid with `affine` -> RAS mm vectors `(*S, 3)`."""
    linear = np.asarray(affine, np.float64)[:3, :3]
    return np.asarray(disp, np.float64) @ linear.T


def world_to_voxel(field: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """RAS mm vectors `(*S, 3)` -> voxel displacement `(*S, 3)` of a grid with `affine`."""
    linear = np.asarray(affine, np.float64)[:3, :3]
    return np.asarray(field, np.float64) @ np.linalg.inv(linear).T


# ------------------------------------------------------------------------------- affines
def homogeneous_affine(affine_vox: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """`(N, N+1)` centred voxel affine ``y = A (x - c) + b + c`` (``c = (shape - 1) / 2``) ->
    `(N+1, N+1)` plain voxel map."""
    a = np.asarray(affine_vox, np.float64)
    n = a.shape[0]
    centre = (np.asarray(shape, np.float64) - 1) / 2.0
    out = np.eye(n + 1)
    out[:n, :n] = a[:, :n]
    out[:n, n] = a[:, n] + centre - a[:, :n] @ centre
    return out


def centred_affine(matrix: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Inverse of `homogeneous_affine`: `(N+1, N+1)` voxel map -> centred `(N, N+1)` affine."""
    h = np.asarray(matrix, np.float64)
    n = h.shape[0] - 1
    centre = (np.asarray(shape, np.float64) - 1) / 2.0
    a = h[:n, :n]
    return np.concatenate([a, (h[:n, n] - centre + a @ centre)[:, None]], axis=1)


def affine_to_physical(affine_vox: np.ndarray, grid_affine: np.ndarray,
                       shape: tuple[int, ...]) -> np.ndarray:
    """tfreg's centred voxel affine `(3, 4)` on a fixed grid -> `(4, 4)` map of RAS mm points.

    Args:
        affine_vox: ``[A | b]`` with ``y = A (x - c) + b + c``, ``c = (shape - 1) / 2`` (voxels).
        grid_affine: `(4, 4)` voxel-to-world affine ``F`` of the fixed grid.
        shape: the fixed grid's spatial shape.

    Returns:
        ``F H F^-1``: fixed RAS point -> moving RAS point.
    """
    f = np.asarray(grid_affine, np.float64)
    return f @ homogeneous_affine(affine_vox, shape) @ np.linalg.inv(f)


def physical_to_affine(physical: np.ndarray, grid_affine: np.ndarray,
                       shape: tuple[int, ...]) -> np.ndarray:
    """Inverse of `affine_to_physical`: `(4, 4)` RAS map -> centred voxel affine `(3, 4)`."""
    f = np.asarray(grid_affine, np.float64)
    return centred_affine(np.linalg.inv(f) @ np.asarray(physical, np.float64) @ f, shape)


def deformable_part(disp: np.ndarray, affine_vox: np.ndarray) -> np.ndarray:
    """The warp ``v`` with ``x + disp(x) = Aff(x + v(x))`` for a centred voxel affine ``Aff``.

    Args:
        disp: `(*S, N)` full displacement (voxels, pull), affine included.
        affine_vox: `(N, N+1)` centred affine of the same grid.

    Returns:
        `(*S, N)` float64 ``v(x) = Aff^-1(x + disp(x)) - x`` (exact, no interpolation).
    """
    shape = disp.shape[:-1]
    h_inv = np.linalg.inv(homogeneous_affine(affine_vox, shape))
    grid = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float64) for s in shape],
                                indexing="ij"), axis=-1)
    n = len(shape)
    target = grid + np.asarray(disp, np.float64)
    return target @ h_inv[:n, :n].T + h_inv[:n, n] - grid


def write_itk_affine(path: str | Path, physical_ras: np.ndarray,
                     centre_ras: np.ndarray | None = None) -> Path:
    """Write a `(4, 4)` RAS point map (fixed -> moving) as an ITK ``AffineTransform_double_3_3``.

    ``.mat``: MATLAB v4 with ``AffineTransform_double_3_3`` (12 x 1) and ``fixed`` (3 x 1), as ANTs
    writes it; ``.txt``/``.tfm``: the ITK text format. Points are converted to LPS. `centre_ras`
    (default: the origin) becomes the fixed parameters; the map is the same for any centre.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in _AFFINE_SUFFIXES:
        raise InputError(f"{path}: an ITK affine must end in .mat, .txt or .tfm")
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    lps = flip @ np.asarray(physical_ras, np.float64) @ flip
    centre = np.zeros(3) if centre_ras is None else RAS_TO_LPS @ np.asarray(centre_ras, float)
    matrix = lps[:3, :3]
    translation = lps[:3, 3] + matrix @ centre - centre  # M p + o = M (p - c) + c + t
    params = np.concatenate([matrix.ravel(), translation])
    with atomic_path(path) as tmp:
        if suffix == ".mat":
            from scipy.io import savemat

            with open(tmp, "wb") as fh:
                savemat(fh, {"AffineTransform_double_3_3": params[:, None],
                             "fixed": centre[:, None]}, format="4")
        else:
            text = ("#Insight Transform File V1.0\n#Transform 0\n"
                    "Transform: AffineTransform_double_3_3\n"
                    f"Parameters: {' '.join(repr(float(v)) for v in params)}\n"
                    f"FixedParameters: {' '.join(repr(float(v)) for v in centre)}\n")
            tmp.write_text(text, encoding="utf-8")
    return path


def read_itk_affine(path: str | Path) -> np.ndarray:
    """Read an ITK/ANTs affine (``.mat`` MATLAB v4/v5, ``.txt``/``.tfm`` text) -> `(4, 4)` RAS map.

    Accepts ``AffineTransform_{double,float}_3_3`` and ``MatrixOffsetTransformBase_*_3_3`` (the
    12-parameter matrix forms ANTs writes); rigid and Euler parametrisations are refused.

    Raises:
        InputError: missing file, unknown transform type, wrong parameter count.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: file not found")
    suffix = path.suffix.lower()
    try:
        if suffix == ".mat":
            from scipy.io import loadmat

            content = loadmat(str(path))
            keys = [k for k in content if not k.startswith("__") and k != "fixed"]
            if len(keys) != 1:
                raise InputError(f"{path}: expected one transform and 'fixed' in the .mat file, "
                                 f"found {sorted(keys)}")
            kind, params = keys[0], np.asarray(content[keys[0]], np.float64).ravel()
            centre = np.asarray(content.get("fixed", np.zeros(3)), np.float64).ravel()
        elif suffix in (".txt", ".tfm"):
            fields = {}
            for line in path.read_text(encoding="utf-8").splitlines():
                key, sep, value = line.partition(":")
                if sep and not key.startswith("#"):
                    fields.setdefault(key.strip(), value.strip())
            kind = fields.get("Transform", "")
            params = np.array(fields.get("Parameters", "").split(), np.float64)
            centre = np.array(fields.get("FixedParameters", "0 0 0").split(), np.float64)
        else:
            raise InputError(f"{path}: an ITK affine must end in .mat, .txt or .tfm")
    except InputError:
        raise
    except Exception as err:  # scipy/parsing errors on foreign files
        raise InputError(f"{path}: not a readable ITK transform file ({reason(err)})") from None
    if not (kind.startswith(("AffineTransform_", "MatrixOffsetTransformBase_"))
            and kind.endswith("_3_3")) or params.size != 12 or centre.size != 3:
        raise InputError(f"{path}: expected a 3D affine transform (12 parameters, 3 fixed), got "
                         f"{kind or 'no transform'} with {params.size} parameters")
    matrix, translation = params[:9].reshape(3, 3), params[9:]
    lps = np.eye(4)
    lps[:3, :3] = matrix
    lps[:3, 3] = translation + centre - matrix @ centre
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    return flip @ lps @ flip


# ------------------------------------------------------------------------------- fields
def save_field(path: str | Path, disp: np.ndarray, affine: np.ndarray, fmt: str = "tfreg",
               header=None) -> Path:
    """Write a tfreg displacement `(*S, 3)` (fixed voxels, pull) in one of `FORMATS`.

    Args:
        path: `.nii.gz` or `.nii` destination (written atomically).
        disp: `(X, Y, Z, 3)` displacement in voxels of the grid with `affine`.
        affine: `(4, 4)` voxel-to-world matrix of that (fixed) grid.
        fmt: "tfreg", "world" (RAS mm), "itk" (LPS mm, 5D vector NIfTI) or "l2r".
        header: optional header to copy (tfreg format only).

    Raises:
        InputError: unknown format, not a 3D field (world/itk/l2r), bad path.
    """
    if fmt not in FORMATS:
        raise InputError(f"--to: unknown format {fmt!r} (choose from {', '.join(FORMATS)})")
    disp = np.asarray(disp)
    if fmt == "tfreg":
        return save_volume(path, disp.astype(np.float32), affine, header)
    _check_3d(str(path), disp.shape[:-1], f"the {fmt} format")
    if fmt == "l2r":
        return save_volume(path, disp.astype(np.float16).astype(np.float32), affine)
    import nibabel as nib

    path = Path(path)
    if not path.name.lower().endswith((".nii.gz", ".nii")):
        raise InputError(f"{path}: output must end in .nii.gz or .nii")
    vectors = voxel_to_world(disp, affine)
    if fmt == "itk":
        vectors = (vectors @ RAS_TO_LPS.T)[:, :, :, None, :]
    img = nib.Nifti1Image(vectors.astype(np.float32), np.asarray(affine, np.float64))
    img.header.set_xyzt_units("mm")
    img.set_sform(affine, code=1)
    img.set_qform(affine, code=1)
    img.header.set_intent(INTENT_VECTOR, name=WORLD_INTENT if fmt == "world" else "")
    with atomic_path(path) as tmp:
        nib.save(img, str(tmp))
    return path


def field_format(path: str | Path) -> str:
    """Which format a field file holds: "itk" (5D ``(X, Y, Z, 1, 3)``), "world" (tfreg's
    ``"RAS mm"`` intent name) or "tfreg" (any other `(*S, N)` field, Learn2Reg's included)."""
    import nibabel as nib

    try:
        img = nib.load(str(path))
    except Exception:  # noqa: BLE001 - load_volume reports it properly
        return "tfreg"
    if len(img.shape) == 5 and img.shape[3] == 1:
        return "itk"
    name = img.header.get_intent()[2] if hasattr(img.header, "get_intent") else ""
    return "world" if name == WORLD_INTENT else "tfreg"


def _resample_vectors(field: Volume, affine: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Vectors of `field` (physical components) at the voxels of another grid; zero outside the
    field's extent (as ITK's displacement-field transform), linear inside."""
    to_field = np.linalg.inv(field.affine) @ np.asarray(affine, np.float64)
    grid = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float64) for s in shape],
                                indexing="ij"), axis=-1)
    coords = grid @ to_field[:3, :3].T + to_field[:3, 3]
    points = np.moveaxis(coords, -1, 0)
    out = np.stack([ndimage.map_coordinates(field.data[..., c], points, order=1, mode="nearest")
                    for c in range(field.data.shape[-1])], axis=-1)
    size = np.asarray(field.shape, np.float64)
    inside = np.all((coords >= -0.5) & (coords <= size - 0.5), axis=-1)
    return np.where(inside[..., None], out, 0.0)


def _as_grid(reference) -> tuple[np.ndarray, tuple[int, ...]] | None:
    if reference is None:
        return None
    if isinstance(reference, Volume):
        return reference.affine, reference.shape
    ref = read_info(reference, allow_vector=True)
    return ref.affine, ref.shape


def read_transform(field: str | Path | None = None, *, affine: str | Path | None = None,
                   reference=None) -> Volume:
    """Read an external transform as a tfreg displacement on a fixed grid.

    Args:
        field: a displacement field in any readable format (`field_format`): tfreg/Learn2Reg
            voxels, world RAS mm, or an ITK/ANTs LPS warp. None: `affine` alone.
        affine: an ITK/ANTs affine file applied **after** the warp, as ANTs'
            ``transformlist=[warp, affine]``: ``T(p) = affine(p + d(p))``.
        reference: the fixed image (path or `Volume`) whose grid the result lives on. Needed for
            an affine alone; optional otherwise (default: the field's grid). A tfreg voxel field
            cannot be moved onto another grid (its units are that grid's voxels).

    Returns:
        `Volume` with `(*S, 3)` float32 displacement in voxels of the reference grid (pull), the
        grid's affine, `vector=True`.

    Raises:
        InputError: unreadable files, a voxel field on a grid other than `reference`, nothing
            given.
    """
    grid = _as_grid(reference)
    if field is None and affine is None:
        raise InputError("transform: give a displacement field, an affine file or both")
    if field is None and grid is None:
        raise InputError(f"{affine}: an affine alone needs --reference (the fixed image) to "
                         "define the output grid")
    physical = None
    if field is not None:
        fmt = field_format(field)
        vol = load_volume(field, allow_vector=True)
        if not vol.vector:
            raise InputError(f"{field}: expected a displacement field (*S, N), got shape "
                             f"{vol.data.shape}")
        if fmt == "tfreg":
            if grid is not None and (tuple(grid[1]) != vol.shape
                                     or not np.allclose(grid[0], vol.affine, atol=1e-3)):
                raise InputError(f"{field}: a voxel displacement field must be on the reference "
                                 "grid (same shape and affine); convert it to world or itk first")
            if affine is None:
                return Volume(vol.data.astype(np.float32), vol.affine, None, str(field), True)
            grid = (vol.affine, vol.shape)
            physical = voxel_to_world(vol.data, vol.affine)
        else:
            _check_3d(str(field), vol.shape, f"an {fmt} field")
            data = vol.data.astype(np.float64)
            if fmt == "itk":
                data = data @ RAS_TO_LPS.T  # LPS -> RAS
            vol = Volume(data, vol.affine, None, str(field), True)
            if grid is None:
                grid = (vol.affine, vol.shape)
            same = tuple(grid[1]) == vol.shape and np.allclose(grid[0], vol.affine, atol=1e-6)
            physical = data if same else _resample_vectors(vol, grid[0], tuple(grid[1]))
    f_aff, shape = np.asarray(grid[0], np.float64), tuple(int(s) for s in grid[1])
    _check_3d(str(reference or field), shape, "reading an external transform")
    voxels = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float64) for s in shape],
                                  indexing="ij"), axis=-1)
    points = voxels @ f_aff[:3, :3].T + f_aff[:3, 3]
    if physical is not None:
        points = points + physical
    if affine is not None:
        h = read_itk_affine(affine)
        points = points @ h[:3, :3].T + h[:3, 3]
    inv = np.linalg.inv(f_aff)
    disp = points @ inv[:3, :3].T + inv[:3, 3] - voxels
    return Volume(disp.astype(np.float32), f_aff, None, str(field or affine), True)


def l2r_name(fixed: str | Path, moving: str | Path) -> str:
    """Learn2Reg's file name ``disp_FIXED_MOVING.nii.gz`` for a pair of image files.

    Learn2Reg images are named ``<TASK>_<case>_<modality>.nii.gz`` (``OASIS_0395_0000``): the
    name uses the four-digit case ids. Other names use the whole file stem.
    """
    def case(path) -> str:
        parts = nifti_stem(path).split("_")
        if len(parts) >= 3 and parts[-1].isdigit() and parts[-2].isdigit():
            return parts[-2]
        return nifti_stem(path)

    return f"disp_{case(fixed)}_{case(moving)}.nii.gz"

