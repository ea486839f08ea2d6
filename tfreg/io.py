"""NIfTI input and output that keeps the affine and header.

Arrays keep the NIfTI array axes in file order (no reorientation). Images are float32, label maps
int32 and displacement fields float32 ``(*S, ndims)``. Every problem with a user's file raises
`tfreg.errors.InputError` with one line that starts with the file name, e.g.
``"scans/a.nii.gz: contains 3 NaN voxels"``.

Writes are atomic: the file is written under a temporary name in the destination folder and moved
into place with ``os.replace``, so a reader (or a second writer) never sees a half-written file.
"""

from __future__ import annotations

import contextlib
import gzip
import os
import shutil
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from scipy import ndimage

from tfreg.errors import InputError, reason

__all__ = [
    "Volume",
    "VolumeInfo",
    "load_volume",
    "read_info",
    "save_volume",
    "resample_to_grid",
    "voxel_spacing",
    "atomic_path",
    "nifti_stem",
    "check_label_grid",
    "LABEL_GRID_TOLERANCE",
]

#: suffixes removed by `nifti_stem` (longest first).
_SUFFIXES = (".nii.gz", ".nii", ".mgz", ".mgh", ".img.gz", ".img", ".hdr")
#: suffixes `save_volume` can write.
_WRITABLE = (".nii.gz", ".nii")

# Permission bits for files created by `atomic_path` (``mkstemp`` would leave them 0600).
_UMASK = os.umask(0)
os.umask(_UMASK)


def nifti_stem(path: str | Path) -> str:
    """File name without its image suffix: ``"sub-01_T1w.nii.gz" -> "sub-01_T1w"``."""
    name = Path(path).name
    for suffix in _SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


def voxel_spacing(affine: np.ndarray, ndims: int = 3) -> tuple[float, ...]:
    """Voxel sizes (mm) of the first `ndims` array axes: norms of the affine's columns.

    Args:
        affine: `(4, 4)` voxel-to-world matrix.
        ndims: 2 or 3.

    Returns:
        `ndims` positive floats.

    Example:
    >>> voxel_spacing(np.diag([2.0, -1.0, 1.5, 1.0]))
    (2.0, 1.0, 1.5)
    """
    affine = np.asarray(affine, dtype=np.float64)
    return tuple(float(v) for v in np.sqrt((affine[:3, :ndims] ** 2).sum(axis=0)))


@dataclass
class Volume:
    """An image, label map or displacement field with its voxel-to-world affine.

    Attributes:
        data: `(*S,)` image (float32) or label map (int32), or `(*S, ndims)` field (float32);
            spatial axes are the NIfTI array axes in file order.
        affine: `(4, 4)` voxel-to-world matrix (mm); for 2D data the third array axis is absent.
        header: the nibabel header it was read with (None for arrays not read from a file).
        path: the file it was read from ("" if none).
        vector: True when the last axis of `data` holds vector components (a field).
    """

    data: np.ndarray
    affine: np.ndarray
    header: Any = None
    path: str = ""
    vector: bool = False

    @property
    def shape(self) -> tuple[int, ...]:
        """Spatial shape `(*S,)` (without the vector axis)."""
        return tuple(self.data.shape[:-1] if self.vector else self.data.shape)

    @property
    def ndims(self) -> int:
        """Number of spatial axes, 2 or 3."""
        return len(self.shape)

    @property
    def spacing(self) -> tuple[float, ...]:
        """Voxel sizes in mm along the spatial array axes."""
        return voxel_spacing(self.affine, self.ndims)


@dataclass(frozen=True)
class VolumeInfo:
    """What the header says: spatial `shape` (after squeezing), `affine`, `vector` flag."""

    path: str
    shape: tuple[int, ...]
    affine: np.ndarray
    vector: bool = False

    @property
    def ndims(self) -> int:
        return len(self.shape)


# ----------------------------------------------------------------------------------- reading
def _open(path: str | Path) -> Any:
    """nibabel image proxy (header read, data not yet decoded)."""
    import nibabel as nib

    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: file not found")
    if path.is_dir():
        raise InputError(f"{path}: is a folder, expected an image file")
    try:
        return nib.load(str(path))
    except Exception as err:  # nibabel raises many types for foreign or damaged files
        raise InputError(f"{path}: not a readable NIfTI/MGH image ({reason(err)})") from None


def _check_rank(path: str | Path, shape: tuple[int, ...], allow_vector: bool
                ) -> tuple[tuple[int, ...], bool]:
    """Squeeze trailing singleton axes and check the rank.

    Returns:
        `(array shape after squeezing, vector)`.
    """
    shape = tuple(int(s) for s in shape)
    if allow_vector and len(shape) == 5 and shape[3] == 1:  # NIfTI vector convention (X,Y,Z,1,3)
        shape = shape[:3] + shape[4:]
    while len(shape) > 2 and shape[-1] == 1:
        shape = shape[:-1]
    if allow_vector and len(shape) in (3, 4) and shape[-1] == len(shape) - 1:
        return shape, True
    if len(shape) in (2, 3):
        return shape, False
    if len(shape) == 4:
        hint = ("a 4D volume (time series or multi-channel) is not supported; "
                "save one 3D volume per file")
        if allow_vector:
            hint = "a 4D volume must be a 3D vector field with 3 components in its last axis"
        raise InputError(f"{path}: has shape {shape}: {hint}")
    raise InputError(f"{path}: has shape {shape}: expected a 2D or 3D volume")


def read_info(path: str | Path, *, allow_vector: bool = False) -> VolumeInfo:
    """Read only the header: spatial shape after squeezing trailing singletons, and the affine.

    Cheap (no voxel data decoded). Detects missing and foreign files and a wrong rank; truncated
    data and NaN/Inf are only found by `load_volume`.

    Raises:
        InputError: ``"<path>: <problem>"``.
    """
    img = _open(path)
    shape, vector = _check_rank(path, img.shape, allow_vector)
    affine = np.asarray(img.affine, dtype=np.float64)
    spatial = shape[:-1] if vector else shape
    return VolumeInfo(str(path), spatial, affine, vector)


def load_volume(path: str | Path, *, label: bool = False, allow_vector: bool = False) -> Volume:
    """Read a NIfTI (or MGH) image, label map or displacement field.

    Args:
        path: file name (`.nii`, `.nii.gz`, `.mgz`, ...).
        label: read a label map: values must be whole numbers; returned as int32.
        allow_vector: accept a field `(*S, ndims)` (also NIfTI's `(X, Y, Z, 1, 3)`).

    Returns:
        `Volume` with float32 `(*S,)` data (int32 when `label`; `(*S, ndims)` for a field), the
        file's affine and a copy of its header. Trailing singleton axes are squeezed.

    Raises:
        InputError: one line naming the file: missing, not an image, truncated or corrupt data,
            wrong rank (4D or more), NaN/Inf voxels, non-integer label values.
    """
    img = _open(path)
    shape, vector = _check_rank(path, img.shape, allow_vector)
    try:
        data = np.asanyarray(img.dataobj)
    except (EOFError, zlib.error, gzip.BadGzipFile) as err:
        raise InputError(f"{path}: truncated or corrupt compressed data ({reason(err)})") from None
    except (OSError, ValueError) as err:
        raise InputError(f"{path}: truncated or unreadable voxel data ({reason(err)})") from None
    if data.dtype.fields is not None or data.dtype.kind not in "biuf":
        raise InputError(f"{path}: unsupported voxel type {data.dtype} (expected numbers)")
    data = data.reshape(shape)
    if data.dtype.kind == "f":
        finite = np.isfinite(data)
        if not finite.all():
            n_nan = int(np.isnan(data).sum())
            n_inf = int(data.size - finite.sum() - n_nan)
            parts = [f"{n} {what} voxels" for n, what in ((n_nan, "NaN"), (n_inf, "Inf")) if n]
            raise InputError(f"{path}: contains {' and '.join(parts)}")
    if label:
        if vector:
            raise InputError(f"{path}: a label map cannot be a vector field")
        if data.dtype.kind == "f":
            rounded = np.rint(data)
            if np.abs(data - rounded).max(initial=0.0) > 1e-3:
                raise InputError(f"{path}: label map has non-integer values (is it an image?)")
            data = rounded
        limits = np.iinfo(np.int32)
        if data.size and (data.min() < limits.min or data.max() > limits.max):
            raise InputError(f"{path}: label values do not fit in int32")
        data = data.astype(np.int32, copy=False)
    else:
        data = data.astype(np.float32, copy=False)
    header = img.header.copy()
    return Volume(data, np.asarray(img.affine, np.float64), header, str(path), vector)


# ----------------------------------------------------------------------- label maps vs images
#: a label map's header may differ from its image's by this fraction (voxel sizes, and the
#: world position of any voxel relative to the field of view's diagonal) and still be used.
LABEL_GRID_TOLERANCE = 0.05


def check_label_grid(labels_path: str | Path, labels_affine: np.ndarray,
                     labels_shape: tuple[int, ...], image_path: str | Path,
                     image_affine: np.ndarray, image_shape: tuple[int, ...],
                     tol: float = LABEL_GRID_TOLERANCE) -> str | None:
    """Compare a label map's grid with its image's.

    Label maps and images share one grid. Headers written by other tools often differ slightly
    (FreeSurfer, resampled or converted label maps): with the same shape, voxel sizes within
    `tol` (5 %) of the image's and no voxel centre further than `tol` of the image's field-of-view
    diagonal from where the image's header puts it, the label map is used voxel for voxel on the
    image's grid (the image's header wins).

    Returns:
        None when the grids agree (within 1e-3 mm), else a one-line warning to show.

    Raises:
        InputError: a different shape, or a larger mismatch (the message says how to fix it).
    """
    labels_affine = np.asarray(labels_affine, np.float64)
    image_affine = np.asarray(image_affine, np.float64)
    if tuple(labels_shape) != tuple(image_shape):
        raise InputError(f"{labels_path}: shape {list(labels_shape)} differs from its image "
                         f"{image_path} {list(image_shape)} (resample the label map onto the "
                         "image's grid with nearest-neighbour interpolation)")
    if np.allclose(labels_affine, image_affine, atol=1e-3):
        return None
    n = len(image_shape)
    zooms_l = np.array(voxel_spacing(labels_affine, n))
    zooms_i = np.array(voxel_spacing(image_affine, n))
    zoom_diff = float(np.max(np.abs(zooms_l - zooms_i) / zooms_i))
    corners = np.array(np.meshgrid(*[[0, s - 1] for s in image_shape], indexing="ij")
                       ).reshape(n, -1)
    homog = np.zeros((4, corners.shape[1]))
    homog[:n] = corners
    homog[3] = 1.0
    shift = float(np.max(np.linalg.norm((labels_affine @ homog - image_affine @ homog)[:3],
                                         axis=0)))
    diagonal = float(np.linalg.norm(zooms_i * (np.array(image_shape) - 1)))
    if zoom_diff <= tol and shift <= tol * max(diagonal, 1e-9):
        return (f"{labels_path}: header differs slightly from its image {image_path} (voxel "
                f"sizes by {100 * zoom_diff:.1f}%, positions by up to {shift:.1f} mm); using the "
                "image's header for the label map")
    raise InputError(f"{labels_path}: its header differs from its image {image_path} (voxel "
                     f"sizes by {100 * zoom_diff:.1f}%, positions by up to {shift:.1f} mm; "
                     f"tolerated: {100 * tol:.0f}%); if the label map is on the image's grid copy "
                     "the image's header to it, else resample it onto the image with "
                     "nearest-neighbour interpolation")


# ----------------------------------------------------------------------------------- writing
@contextlib.contextmanager
def atomic_path(path: str | Path, suffix: str | None = None, *, directory: bool = False
                ) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success move it onto `path`.

    This is tfreg's one way of writing a file or folder atomically: a reader (or a second
    writer) never sees it half-written, and concurrent writers of the same `path` never corrupt
    it (the last complete one wins). On error the temporary is removed and `path` is unchanged.

    Args:
        path: destination file (or folder, with `directory`); parent folders are created.
        suffix: ending of the temporary name, so that writers choosing a format by extension
            work. Defaults to all suffixes of `path` (``.nii.gz``, ``.weights.h5``, ``.yaml``).
        directory: yield an empty temporary folder instead of an empty file. On success it
            replaces `path`; an existing folder there is moved aside first, then deleted.

    Example:
    >>> with atomic_path("out/notes.txt") as tmp:
    ...     _ = tmp.write_text("written in one piece")
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix is None:
        suffix = "".join(Path(path.name).suffixes)
    prefix, tmp_suffix = f".{path.name}.", f".tmp{suffix}"
    if directory:
        tmp = Path(tempfile.mkdtemp(prefix=prefix, suffix=tmp_suffix, dir=path.parent))
    else:
        fd, name = tempfile.mkstemp(prefix=prefix, suffix=tmp_suffix, dir=path.parent)
        os.close(fd)
        tmp = Path(name)
    try:
        yield tmp
        if directory:
            os.chmod(tmp, 0o777 & ~_UMASK)
            _replace_folder(tmp, path)
        else:
            os.chmod(tmp, 0o666 & ~_UMASK)
            with open(tmp, "rb") as handle:  # on disk before the rename makes it visible
                os.fsync(handle.fileno())
            os.replace(tmp, path)
    except BaseException:
        if directory:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise


def _replace_folder(new: Path, path: Path) -> None:
    """Move folder `new` onto `path`; an existing folder at `path` is moved aside, then deleted
    (``os.replace`` cannot replace a non-empty folder)."""
    if not path.exists():
        os.replace(new, path)
        return
    old = new.with_name(f"{new.name}.old")
    os.replace(path, old)
    os.replace(new, path)
    shutil.rmtree(old, ignore_errors=True)


def _disk_dtype(data: np.ndarray) -> np.dtype:
    """float32 for images and fields; int16 for label maps that fit, else int32."""
    if data.dtype.kind in "biu":
        if data.size == 0 or (data.min() >= np.iinfo(np.int16).min
                              and data.max() <= np.iinfo(np.int16).max):
            return np.dtype(np.int16)
        if data.min() < np.iinfo(np.int32).min or data.max() > np.iinfo(np.int32).max:
            raise InputError(f"label values {data.min()}..{data.max()} do not fit in int32")
        return np.dtype(np.int32)
    if data.dtype.kind == "f":
        return np.dtype(np.float32)
    raise InputError(f"cannot save voxel type {data.dtype}")


def save_volume(path: str | Path, data: np.ndarray, affine: np.ndarray, header: Any = None) -> Path:
    """Write a NIfTI-1 file atomically, keeping the header's information.

    Args:
        path: destination ending in `.nii.gz` or `.nii`; parent folders are created.
        data: `(*S,)` image or label map, or `(*S, ndims)` displacement field (voxels, written as
            a 4D array like Learn2Reg's `disp_*.nii.gz`). Floats are written as float32, integers
            (label maps) as int16 when they fit, else int32.
        affine: `(4, 4)` voxel-to-world matrix; written to both the sform and the qform (codes
            kept from `header` when set, else 1 = scanner).
        header: optional nibabel header to copy (descriptions, units, intent, codes); its data
            type, shape and scaling are replaced by those of `data`.

    Returns:
        The written path.

    Raises:
        InputError: unsupported suffix, wrong rank, non-finite values or affine.
    """
    import nibabel as nib

    path = Path(path)
    if not path.name.lower().endswith(_WRITABLE):
        raise InputError(f"{path}: output must end in .nii.gz or .nii")
    data = np.asarray(data)
    if data.ndim not in (2, 3, 4):
        raise InputError(f"{path}: cannot save an array of shape {data.shape} (2D/3D, or a field)")
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4) or not np.isfinite(affine).all():
        raise InputError(f"{path}: affine must be a finite 4x4 matrix, got shape {affine.shape}")
    dtype = _disk_dtype(data)
    if dtype.kind == "f" and not np.isfinite(data).all():
        raise InputError(f"{path}: refusing to save NaN/Inf values")
    array = data.astype(dtype, copy=False)

    if header is None:
        hdr = nib.Nifti1Header()
        hdr.set_xyzt_units("mm")
        qcode = scode = 1
    else:
        hdr = header.copy() if isinstance(header, nib.Nifti1Header) else \
            nib.Nifti1Header.from_header(header)
        qcode = int(hdr["qform_code"]) or 1
        scode = int(hdr["sform_code"]) or 1
    hdr.set_data_dtype(dtype)
    hdr.set_data_shape(array.shape)
    img = nib.Nifti1Image(array, affine, header=hdr)
    img.set_sform(affine, code=scode)
    img.set_qform(affine, code=qcode)
    img.header.set_slope_inter(1.0, 0.0)
    with atomic_path(path) as tmp:
        nib.save(img, str(tmp))
    return path


# -------------------------------------------------------------------------------- resampling
def _snap(matrix: np.ndarray, tol: float = 1e-9) -> np.ndarray:
    """Round entries within `tol` of an integer (removes float noise from flips/permutations)."""
    rounded = np.rint(matrix)
    return np.where(np.abs(matrix - rounded) < tol, rounded, matrix)


def resample_to_grid(volume: Volume, affine: np.ndarray, shape: tuple[int, ...], order: int = 1,
                     fill_value: float | None = 0.0) -> np.ndarray:
    """Resample a volume into another voxel grid through the two voxel-to-world affines.

    For each target voxel `x`, the source is sampled at ``inv(volume.affine) @ affine @ x`` (the
    same world point), with `scipy.ndimage.affine_transform` (the `map_coordinates` machinery
    without a coordinate array).

    Outside the source grid::

        fill_value=0.0 (default)   ... 0 0 | a b c d | 0 0 ...    no data outside the scan
        fill_value=None            ... a a | a b c d | d d ...    nearest border voxel

    With a constant, linear interpolation (``order=1``) blends towards it over the one voxel beyond
    the outermost voxel centres (SciPy's ``"grid-constant"`` mode; its ``"constant"`` mode would
    drop a border voxel whose coordinate overshoots by float rounding); ``order=0`` (labels) takes
    the nearest voxel.

    For 2D volumes both grids are taken at the third array index 0 (the same slice plane).

    Args:
        volume: source `Volume` with `(*S,)` data (a vector field is refused: its components
            would need reorienting too).
        affine: `(4, 4)` voxel-to-world matrix of the target grid.
        shape: target spatial shape, same number of axes as the source.
        order: spline order: 1 linear (images), 0 nearest (label maps, dtype kept), 3 cubic.
        fill_value: a number (constant outside) or None (nearest border).

    Returns:
        `(*shape,)` array, float32 for images (the source dtype for ``order=0``).

    Example:
    >>> vol = Volume(np.arange(4.0, dtype="float32").reshape(2, 2), np.eye(4))
    >>> flip = np.diag([-1.0, 1.0, 1.0, 1.0]); flip[0, 3] = 1.0
    >>> resample_to_grid(vol, flip, (2, 2))[0].tolist()
    [2.0, 3.0]
    """
    if volume.vector:
        raise InputError(f"{volume.path or 'field'}: resampling a vector field is not supported "
                         "(its components would need reorienting)")
    shape = tuple(int(s) for s in shape)
    ndims = volume.ndims
    if len(shape) != ndims:
        raise InputError(f"{volume.path or 'volume'}: cannot resample a {ndims}D volume into a "
                         f"{len(shape)}D grid {shape}")
    if order not in (0, 1, 3):
        raise ValueError(f"`order` must be 0, 1 or 3. Received: order={order!r}")
    to_source = _snap(np.linalg.inv(np.asarray(volume.affine, np.float64))
                      @ np.asarray(affine, np.float64))
    matrix, offset = to_source[:ndims, :ndims], to_source[:ndims, 3]
    data = volume.data if order == 0 else volume.data.astype(np.float32, copy=False)
    mode = "nearest" if fill_value is None else "grid-constant"
    out = ndimage.affine_transform(data, matrix, offset=offset, output_shape=shape, order=order,
                                   mode=mode, cval=0.0 if fill_value is None else fill_value,
                                   prefilter=order > 1)
    return out if order == 0 else out.astype(np.float32, copy=False)
