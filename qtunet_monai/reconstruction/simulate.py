# Copyright (c) qtunet_monai contributors. Licensed under the Apache License, Version 2.0.
"""Offline demo k-space: axial slices of the MNI template that nilearn ships, in fastMRI's file layout.

The template is a magnitude image. Its k-space, taken as it is, would be Hermitian-symmetric (a real
image) and noise-free, which makes undersampling easier to undo than in any scanner's data (the
"inverse crime" of magnitude-only simulation). So each volume gets

- the random affine and elastic deformation, bias field and contrast change of the segmentation demo
  (:mod:`qtunet_monai.data.demo`; the undeformed template is the test volume), without its image noise;
- a smooth random phase ``phi``: a random quadratic polynomial over the volume, ``|phi| <= pi``, so the
  complex image is ``x = |m| exp(i phi)`` and its k-space is not Hermitian;
- complex Gaussian noise in k-space (white, the same standard deviation in the image: the centred FFT is
  orthonormal), ``noise_std`` times the volume's largest magnitude per real and imaginary part.

The k-space of each axial slice is MONAI's centred orthonormal FFT
(:func:`monai.data.fft_utils.fftn_centered`), so MONAI's ``ifftn_centered`` inverts it. Files follow the
fastMRI layout: ``kspace`` ``(slices, coils, rows, columns)`` complex64 with a singleton coil axis (without
it MONAI's mask transforms would take the root-sum-of-squares over the slices), ``reconstruction_rss``
``(slices, rows, columns)`` the magnitude of the fully sampled k-space (fastMRI's target: the noise stays
in it), attributes ``acquisition``, ``max``, ``norm``, ``patient_id`` and how the file was simulated.
MONAI's :class:`~monai.apps.reconstruction.fastmri_reader.FastMRIReader` reads them unchanged.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

__all__ = ["smooth_phase", "simulate_kspace", "zero_filled", "write_fastmri_h5", "axial_slices", "prepare_demo",
           "DEMO_BUNDLE_DATA"]

#: where ``prepare_demo`` writes by default (run from the repository root)
DEMO_BUNDLE_DATA = "bundles/qtunet_demo_mri_reconstruction/data"


def _h5py():
    try:
        import h5py
    except ImportError as e:
        raise ImportError("fastMRI files are HDF5: pip install 'qtunet_monai[reconstruction]' (h5py)") from e
    return h5py


def smooth_phase(shape: tuple[int, ...], rng: np.random.Generator, max_phase: float = np.pi) -> np.ndarray:
    """A smooth random phase map over ``shape``: a quadratic polynomial of the normalised coordinates
    with standard normal coefficients, scaled so that its largest magnitude is a random value in
    ``[max_phase / 2, max_phase]``."""
    axes = np.meshgrid(*[np.linspace(-1.0, 1.0, n) for n in shape], indexing="ij")
    terms = [np.ones(shape)] + list(axes) + [a * b for i, a in enumerate(axes) for b in axes[i:]]
    phase = sum(rng.standard_normal() * t for t in terms)
    peak = np.abs(phase).max()
    scale = rng.uniform(0.5, 1.0) * max_phase / peak if peak > 0 else 0.0
    return (phase * scale).astype(np.float32)


def simulate_kspace(image: np.ndarray, phase: np.ndarray | None = None, noise_std: float = 0.0,
                    rng: np.random.Generator | None = None) -> np.ndarray:
    """Centred orthonormal 2D k-space of ``image`` (``(..., rows, columns)``, magnitude or complex) times
    ``exp(i phase)``, with complex Gaussian noise of ``noise_std`` per real and imaginary part.

    Returns a complex64 array of ``image``'s shape; ``ifftn_centered`` of it (mask of ones, no noise,
    no phase) gives ``image`` back.
    """
    from monai.data.fft_utils import fftn_centered

    x = np.asarray(image).astype(np.complex64)
    if phase is not None:
        x = x * np.exp(1j * np.asarray(phase, dtype=np.float32)).astype(np.complex64)
    kspace = torch.view_as_complex(fftn_centered(torch.view_as_real(torch.from_numpy(x)).contiguous(),
                                                 spatial_dims=2, is_complex=True).contiguous()).numpy()
    if noise_std > 0:
        rng = rng if rng is not None else np.random.default_rng()
        noise = rng.standard_normal((*kspace.shape, 2)).astype(np.float32) * noise_std
        kspace = kspace + (noise[..., 0] + 1j * noise[..., 1]).astype(np.complex64)
    return kspace.astype(np.complex64)


def zero_filled(kspace: np.ndarray, coil_axis: int | None = -3) -> np.ndarray:
    """Magnitude image of (masked) k-space: ``|ifftn_centered|``, root-sum-of-squares over ``coil_axis``
    (None: no coil axis)."""
    from monai.data.fft_utils import ifftn_centered

    k = torch.view_as_real(torch.from_numpy(np.ascontiguousarray(kspace, dtype=np.complex64)))
    image = torch.view_as_complex(ifftn_centered(k, spatial_dims=2, is_complex=True).contiguous()).abs()
    if coil_axis is not None:
        image = (image**2).sum(coil_axis).sqrt()
    return image.numpy().astype(np.float32)


def write_fastmri_h5(path: str | Path, kspace: np.ndarray, target: np.ndarray | None = None,
                     target_key: str = "reconstruction_rss", attrs: Mapping | None = None) -> Path:
    """Write one volume in fastMRI's layout, atomically (a temporary file beside ``path``, renamed).

    Args:
        path: the ``.h5`` file.
        kspace: complex ``(slices, coils, rows, columns)`` (multi-coil layout) or ``(slices, rows,
            columns)`` (fastMRI's single-coil layout).
        target: ``(slices, rows', columns')`` magnitude target, or None (test files have none).
        target_key: ``reconstruction_rss`` (multi-coil) or ``reconstruction_esc`` (single-coil knee).
        attrs: the file's attributes (``acquisition``, ``max``, ``norm``, ``patient_id``, ...).
    """
    from ..bundle.files import replace_atomically, temporary_path

    h5py = _h5py()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(path, keep_extension=True)
    try:
        with h5py.File(tmp, "w") as f:
            f.create_dataset("kspace", data=np.asarray(kspace))
            if target is not None:
                f.create_dataset(target_key, data=np.asarray(target, dtype=np.float32))
            for key, value in (attrs or {}).items():
                f.attrs[key] = value
        replace_atomically(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def axial_slices(volume: np.ndarray, brain: np.ndarray, size: int, min_brain_fraction: float = 0.1,
                 max_slices: int | None = None) -> np.ndarray:
    """The axial slices of an ``(X, Y, Z)`` RAS volume that hold brain, each turned to anterior-up
    ``(Y, X)`` and zero-padded (or centre-cropped) to ``size x size``: ``(slices, size, size)``.

    Slices are kept whose brain area is at least ``min_brain_fraction`` of the largest one's; with
    ``max_slices``, only that many around the middle of those.
    """
    area = brain.reshape(-1, brain.shape[-1]).sum(0)
    keep = np.flatnonzero(area >= min_brain_fraction * area.max())
    if max_slices is not None and len(keep) > max_slices:
        start = (len(keep) - max_slices) // 2
        keep = keep[start:start + max_slices]
    out = np.zeros((len(keep), size, size), dtype=np.float32)
    for i, z in enumerate(keep):
        s = np.rot90(volume[:, :, z])
        src, dst = [], []
        for n in s.shape:
            if n <= size:
                src.append(slice(0, n))
                dst.append(slice((size - n) // 2, (size - n) // 2 + n))
            else:
                src.append(slice((n - size) // 2, (n - size) // 2 + size))
                dst.append(slice(0, size))
        out[i][tuple(dst)] = s[tuple(src)]
    return out


def _deformed(image: np.ndarray, label: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The segmentation demo's deformation of the template (affine, elastic, bias field, contrast), without
    its Gaussian image noise (k-space noise is added instead); background exactly 0."""
    from monai.transforms import RandGaussianNoised

    from ..data.demo import _deformation

    transform = _deformation(seed)  # seeds each transform from ``seed``; dropping one keeps the others' draws
    transform.transforms = tuple(t for t in transform.transforms if not isinstance(t, RandGaussianNoised))
    case = transform({"image": torch.from_numpy(image)[None], "label": torch.from_numpy(label)[None]})
    case_label = np.asarray(case["label"][0]).round()
    return np.asarray(case["image"][0]) * (case_label > 0), case_label


def _write_volume(path: Path, magnitude: np.ndarray, rng: np.random.Generator, noise_std: float, name: str,
                  seed: int) -> dict:
    phase = smooth_phase(magnitude.shape, rng)
    sigma = noise_std * float(magnitude.max())
    kspace = simulate_kspace(magnitude, phase, sigma, rng)[:, None]  # the singleton coil axis
    target = zero_filled(kspace)  # fastMRI's target: RSS of the fully sampled (noisy) k-space
    attrs = {"acquisition": "AXT1", "max": float(target.max()), "norm": float(np.linalg.norm(target)),
             "patient_id": name, "simulation": "MNI ICBM152 2009c T1 (nilearn), smooth random phase, complex "
             "Gaussian k-space noise; qtunet_monai.reconstruction.prepare_demo",
             "noise_std": sigma, "seed": seed}
    write_fastmri_h5(path, kspace, target, "reconstruction_rss", attrs)
    return {"slices": int(kspace.shape[0]), "max_phase": float(np.abs(phase).max())}


def prepare_demo(output_dir: str | Path = DEMO_BUNDLE_DATA, num_train: int = 12, num_val: int = 3,
                 spacing: float = 2.0, size: int = 112, noise_std: float = 0.01, max_slices: int | None = None,
                 seed: int = 0) -> Path:
    """Write the reconstruction demo's fastMRI-layout files and their data list; returns the data list.

    ``train/`` and ``val/`` hold deformed templates (``brain_000.h5``, ...), ``test/brain_template.h5`` the
    undeformed one; ``datalist.json`` lists them (``{"kspace": <file>}``, relative to its folder) under
    ``training``, ``validation`` and ``testing``. Deterministic for a given ``seed``.

    Args:
        output_dir: folder to write into (created).
        num_train: deformed training volumes.
        num_val: deformed validation volumes.
        spacing: voxel size in mm (the template is 1 mm; 2 mm gives 77 x 95 brain slices).
        size: each slice is zero-padded (or centre-cropped) to ``size x size`` (112 = 4 x 4 x 7: QT-UNet's
            patches and windows without padding).
        noise_std: k-space noise per real and imaginary part, relative to the volume's largest magnitude.
        max_slices: keep at most this many axial slices around the middle of each volume (None: every
            slice with brain).
        seed: seed of the deformations, phases and noise.
    """
    from ..bundle.files import atomic_write_text
    from ..data.demo import reference_volume

    _h5py()  # fail before the work when the extra is missing
    if num_train < 1 or num_val < 1:
        raise ValueError(f"need at least one training and one validation volume, got {num_train} and {num_val}.")
    if size < 8 or spacing <= 0 or noise_std < 0:
        raise ValueError(f"size must be >= 8, spacing > 0 and noise_std >= 0; got {size}, {spacing}, {noise_std}.")
    out = Path(output_dir)
    image, label, _ = reference_volume(spacing)
    cases = [(f"train/brain_{i:03d}.h5", seed + i) for i in range(num_train)]
    cases += [(f"val/brain_{num_train + i:03d}.h5", seed + num_train + i) for i in range(num_val)]
    written = {}
    for rel, case_seed in cases:
        volume, brain = _deformed(image, label, case_seed)
        slices = axial_slices(volume, brain > 0, size, max_slices=max_slices)
        written[rel] = _write_volume(out / rel, slices, np.random.default_rng(case_seed), noise_std,
                                     Path(rel).stem, case_seed)
    test_seed = seed + num_train + num_val
    slices = axial_slices(image, label > 0, size, max_slices=max_slices)
    written["test/brain_template.h5"] = _write_volume(out / "test" / "brain_template.h5", slices,
                                                      np.random.default_rng(test_seed), noise_std, "brain_template",
                                                      test_seed)
    datalist = {
        "training": [{"kspace": rel} for rel, _ in cases[:num_train]],
        "validation": [{"kspace": rel} for rel, _ in cases[num_train:]],
        "testing": [{"kspace": "test/brain_template.h5"}],
    }
    atomic_write_text(out / "datalist.json", json.dumps(datalist, indent=1) + "\n")
    settings = {"spacing_mm": spacing, "size": size, "noise_std": noise_std, "max_slices": max_slices, "seed": seed,
                "volumes": written}
    atomic_write_text(out / "simulation.json", json.dumps(settings, indent=1) + "\n")
    return out / "datalist.json"
