# Copyright (c) qtunet_monai contributors. Licensed under the Apache License, Version 2.0.
"""Predict new cases with a trained Auto3DSeg ensemble (``python -m qtunet_monai auto3dseg_predict``).

MONAI's ``EnsembleRunner`` does the work (the best model of each fold, their mean probability); this module
calls it the way a finished ``AutoRunner`` work folder needs:

- the cases come from a folder (or a list of files), written as the ``testing`` key of a data list of our
  own, because the runner predicts only ``testing`` (an MSD ``dataset.json`` names its cases ``test``);
- that folder is the ``dataroot``, so the predictions go flat into ``output_dir`` as
  ``<name>_ensemble.nii.gz`` (not into sub-folders mirroring where the inputs lie);
- ``mgpu`` is on only with several GPUs (the runner's default, on, starts NCCL and fails on a CPU or one GPU);
  with several GPUs the runner launches itself under torchrun;
- every case is checked first (files, channels, NaN, duplicate output names): bad cases are named in one
  ``DataError`` instead of a traceback from inside the ensemble.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

from ..bundle.errors import DataError, SettingError

__all__ = ["trained_algos", "predict_ensemble"]


def trained_algos(work_dir: str | Path) -> list[Path]:
    """The algorithm folders of ``work_dir`` that finished training (``<algo>_<fold>`` with ``model/model.pt``
    and a ``progress.yaml``, as the qtunet template writes them; other templates' ``algo_object.pkl``)."""
    work = Path(work_dir)
    found = []
    for folder in sorted(p for p in work.iterdir() if p.is_dir() and re.match(r"^.+_\d+", p.name)) \
            if work.is_dir() else []:
        if (folder / "configs" / "hyper_parameters.yaml").is_file() and (
                (folder / "model" / "model.pt").is_file() or (folder / "algo_object.pkl").is_file()):
            found.append(folder)
    return found


def _folds(algos: list[Path]) -> int:
    """Folds trained: the largest ``<algo>_<fold>`` index plus one."""
    return 1 + max(int(re.match(r"^.+?_(\d+)", a.name)[1]) for a in algos)


def predict_ensemble(work_dir: str | Path, input_dir: str | Path, output_dir: str | Path,
                     num_fold: int | None = None, ensemble: str = "AlgoEnsembleBestByFold", n_best: int = 2,
                     check_data: bool = True) -> list[Path]:
    """Predict every NIfTI volume of ``input_dir`` with the ensemble trained in ``work_dir``; returns the files
    written (``<output_dir>/<name>_ensemble.nii.gz``, label maps in each input's grid and affine).

    Args:
        work_dir: the ``AutoRunner`` work folder (``input.yaml``, ``qtunet_0``, ...).
        input_dir: the folder of images to predict (nnU-Net's ``case_0000.nii.gz`` channel files are grouped
            when the models take several channels).
        output_dir: where the predictions go.
        num_fold: folds the models were trained on (default: from the algorithm folders' names).
        ensemble: ``AlgoEnsembleBestByFold`` (the best model per fold) or ``AlgoEnsembleBestN``.
        n_best: models for ``AlgoEnsembleBestN``.
        check_data: also read the voxels in the checks (NaN, infinite, extreme values); headers only if False.

    Raises:
        SettingError: no trained model or no ``input.yaml`` in ``work_dir``.
        DataError: ``input_dir`` holds no volume, or bad cases (one line each).
    """
    import torch
    from monai.apps.auto3dseg import EnsembleRunner

    from ..bundle.datalist import check_cases, folder_datalist, output_stem

    work = Path(work_dir).resolve()
    source_file = work / "input.yaml"
    algos = trained_algos(work)
    if not source_file.is_file() or not algos:
        raise SettingError(f"{work} is not a trained Auto3DSeg work folder (input.yaml and at least one "
                           "<algo>_<fold>/ with a trained model): run AutoRunner / CheckedAutoRunner first.")
    hyper = yaml.safe_load((algos[0] / "configs" / "hyper_parameters.yaml").read_text())
    channels = hyper.get("input_channels")
    cases = check_cases(folder_datalist(str(input_dir), channels), channels, check_values=check_data,
                        unique_names=True)
    out = Path(output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    # our own data list and source config, next to the models (the user's files stay untouched)
    staging = work / "ensemble_predict"
    staging.mkdir(exist_ok=True)
    datalist = staging / "datalist.json"
    datalist.write_text(json.dumps({"testing": cases}, indent=1))
    source = yaml.safe_load(source_file.read_text())
    source.update({"datalist": str(datalist), "dataroot": str(Path(input_dir).resolve())})
    staged_source = staging / "input.yaml"
    staged_source.write_text(yaml.safe_dump(source))
    gpus = torch.cuda.device_count()
    runner = EnsembleRunner(str(staged_source), work_dir=str(work), num_fold=num_fold or _folds(algos),
                            ensemble_method_name=ensemble, mgpu=gpus > 1, output_dir=str(out),
                            **({"n_best": n_best} if ensemble == "AlgoEnsembleBestN" else {}),
                            **({"sigmoid": True} if hyper.get("sigmoid") else {}))
    runner.run({"CUDA_VISIBLE_DEVICES": ",".join(map(str, range(gpus))) if gpus else ""})
    written = []
    for case in cases:
        image = case["image"][0] if isinstance(case["image"], list) else case["image"]
        path = out / f"{output_stem(image)}_ensemble.nii.gz"
        if not path.is_file():
            raise DataError(f"{image}: the ensemble wrote no prediction {path}.")
        written.append(path)
    return written
