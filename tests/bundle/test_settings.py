# Copyright (c) qtunet_monai contributors. Licensed under the Apache License, Version 2.0.
"""Settings that travel with the model (models/settings.json), configs that resolve without data, and
model-zoo readiness (metadata versions for every supported Python, Auto3DSeg's gpu_customization)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from packaging.version import Version

from qtunet_monai.bundle.errors import DataError, SettingError, find_cause
from qtunet_monai.bundle.presets import preset
from qtunet_monai.bundle.settings import (
    LazyCases,
    check_settings,
    load_settings,
    settings_differences,
    write_settings,
)

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "bundles" / "qtunet_demo_brain_tissue_segmentation"
TEMPLATES = REPO / "algorithm_templates"


def _fresh_bundle(tmp_path: Path, source: Path = DEMO) -> Path:
    """A copy of a bundle's generated files only: no data, no models."""
    bundle = tmp_path / source.name
    shutil.copytree(source, bundle, ignore=shutil.ignore_patterns("data", "models", "eval"))
    return bundle


# ------------------------------------------------------------------------------------------- the helpers
def test_stored_settings_round_trip_and_contradictions_are_listed(tmp_path):
    path = tmp_path / "models" / "settings.json"
    assert load_settings(path) == {}  # no training yet: nothing applies
    write_settings(path, {"pixdim": (2.0, 2.0, 2.0), "roi_size": [56, 56, 56]}, {"max_epochs": 5})
    stored = load_settings(path)
    assert stored == {"pixdim": [2.0, 2.0, 2.0], "roi_size": [56, 56, 56], "max_epochs": 5}
    assert load_settings(path, model_only=True) == {"pixdim": [2.0, 2.0, 2.0], "roi_size": [56, 56, 56]}
    check_settings(stored, {"pixdim": [2, 2, 2], "roi_size": [56, 56, 56]})  # equal values, other types
    with pytest.raises(SettingError) as refused:
        check_settings(stored, {"pixdim": [1.0, 1.0, 1.0], "roi_size": [56, 56, 56], "max_epochs": 7}, path=path)
    message = str(refused.value)
    assert "\n" not in message and str(path) in message and "--accept_settings True" in message
    assert "pixdim [2.0, 2.0, 2.0] (given [1.0, 1.0, 1.0]); max_epochs 5 (given 7)" in message
    check_settings(stored, {"pixdim": [1.0, 1.0, 1.0]}, accept=True)  # the switch accepts them
    check_settings({"capacity": 0.25}, {"capacity": 0.5})  # a routed share may change at inference
    assert settings_differences(stored, {"seed": 1}) == []  # a key the model does not store: nothing to compare
    path.write_text("{not json")
    with pytest.raises(SettingError, match=re.escape(str(path))):
        load_settings(path)


def test_a_preset_keeps_the_values_its_model_was_trained_with():
    trained = {"preset": "accurate", "detail_widths": [16]}
    assert preset("accurate", trained)["detail_widths"] == [16]
    assert preset("accurate")["detail_widths"] == [12, 24]
    assert preset("thesis", trained)["detail_widths"] == []  # another preset, accepted: its own values


def test_lazy_cases_are_read_once_and_report_missing_data_as_a_data_error():
    calls = []

    def load():
        calls.append(1)
        return [{"image": "a.nii.gz"}, {"image": "b.nii.gz"}]

    cases = LazyCases(load)
    assert not calls
    assert len(cases) == 2 and cases[1] == {"image": "b.nii.gz"} and [c["image"] for c in cases] == ["a.nii.gz", "b.nii.gz"]
    assert len(calls) == 1

    def missing():
        raise DataError("data list data/datalist.json does not exist")

    absent = LazyCases(missing)
    with pytest.raises(TypeError):  # MONAI's engines then build with an unknown epoch length
        len(absent)
    with pytest.raises(DataError, match="does not exist"):  # ... and the run names the file
        len(absent)
    with pytest.raises(DataError, match="does not exist"):
        list(absent)


# -------------------------------------------------------------------------------------- generated configs
def test_check_properties_of_a_fresh_inference_config_is_empty_without_data(tmp_path):
    """What the model zoo's verify_bundle, MONAI Label and Deploy run: InferProperties and MetaProperties of a
    bundle that has neither a data list nor a model yet."""
    from monai.bundle import create_workflow
    from monai.bundle.properties import InferProperties, MetaProperties

    bundle = _fresh_bundle(tmp_path)
    workflow = create_workflow(config_file=str(bundle / "configs" / "inference.json"),
                               meta_file=str(bundle / "configs" / "metadata.json"), workflow_type="infer",
                               bundle_root=str(bundle))
    assert set(InferProperties) | set(MetaProperties) <= set(workflow.properties)
    assert workflow.check_properties() == []
    with pytest.raises(DataError, match="does not exist"):  # the data list is read when a case is needed
        list(workflow.dataset)


def test_inference_uses_the_trained_settings_unless_told_otherwise(tmp_path):
    """inference.json and explain read models/settings.json: no override -> the trained value; a contradicting
    one stops with the differences listed; --accept_settings True takes it."""
    from monai.bundle import ConfigParser

    from qtunet_monai.explain.report import _bundle_parser, _check_settings

    bundle = _fresh_bundle(tmp_path)
    write_settings(bundle / "models" / "settings.json", {"pixdim": [3.0, 3.0, 3.0], "preset": "accurate",
                                                         "detail_widths": [16], "roi_size": [28, 28, 28]})
    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.json"))
    parser["bundle_root"] = str(bundle)
    assert parser.get_parsed_content("pixdim") == [3.0, 3.0, 3.0]
    assert parser.get_parsed_content("network_def#detail_widths") == [16]
    assert parser.get_parsed_content("model_settings")["roi_size"] == [28, 28, 28]

    for config in ("inference.json", "train.json"):  # explain's attention maps and its ablation Dice
        parser = _bundle_parser(str(bundle), config, bundle / "models" / "model.pt")
        assert parser.get_parsed_content("pixdim") == [3.0, 3.0, 3.0]
        _check_settings(parser, accept=False)
        parser = _bundle_parser(str(bundle), config, bundle / "models" / "model.pt", {"pixdim": [2.0, 2.0, 2.0]})
        with pytest.raises(SettingError, match=re.escape("pixdim [3.0, 3.0, 3.0] (given [2.0, 2.0, 2.0])")):
            _check_settings(parser, accept=False)
        _check_settings(parser, accept=True)
    with pytest.raises(ValueError, match="--no_such_key: .* has no such key"):
        _bundle_parser(str(bundle), "inference.json", None, {"no_such_key": 1})


@pytest.mark.slow
def test_training_stores_its_settings_and_resume_and_inference_keep_to_them(task_bundle):
    from monai.bundle import run

    bundle = task_bundle("msd_spleen")
    over = {"roi_size": [32, 32, 32], "pixdim": [2.0, 2.0, 2.0]}
    run(config_file="configs/train.json", max_epochs=1, val_interval=1, num_workers=0, **over)
    stored = load_settings(bundle / "models" / "settings.json")
    assert (stored["pixdim"], stored["roi_size"], stored["max_epochs"]) == ([2.0, 2.0, 2.0], [32, 32, 32], 1)
    assert stored["num_classes"] == 2 and stored["preset"] == "thesis" and stored["learning_rate"] == 4e-5

    run(config_file="configs/inference.json")  # nothing repeated: the trained spacing and ROI
    assert len(list((bundle / "eval").glob("*_seg.nii.gz"))) == 1

    with pytest.raises(Exception) as refused:
        run(config_file="configs/inference.json", pixdim=[1.5, 1.5, 1.5])
    assert "pixdim [2.0, 2.0, 2.0] (given [1.5, 1.5, 1.5])" in str(find_cause(refused.value, SettingError))
    run(config_file="configs/inference.json", pixdim=[1.5, 1.5, 1.5], accept_settings=True)

    with pytest.raises(Exception) as refused:
        run(config_file=["configs/train.json", "configs/evaluate.json"], roi_size=[28, 28, 28])
    assert "roi_size [32, 32, 32] (given [28, 28, 28])" in str(find_cause(refused.value, SettingError))

    with pytest.raises(Exception) as refused:
        run(config_file="configs/train.json", resume=True, max_epochs=2, num_workers=0)
    assert "max_epochs 1 (given 2)" in str(find_cause(refused.value, SettingError))
    run(config_file="configs/train.json", resume=True, max_epochs=2, num_workers=0, accept_settings=True)
    assert load_settings(bundle / "models" / "settings.json")["max_epochs"] == 2  # the accepted value is stored


# ---------------------------------------------------------------------------------------- model zoo
# The newest release of each pinned package that installs on Python 3.10, the lowest Python pyproject.toml
# supports, as `pip index versions <name> --python-version 3.10` listed it; the rest install there at their pins.
NEWEST_FOR_PYTHON_3_10 = {"numpy": "2.2.6", "pillow": "12.3.0"}


def test_metadata_package_versions_install_on_every_supported_python():
    # tomllib is Python 3.11's; the line is read as text
    requires = re.search(r'^requires-python\s*=\s*"([^"]+)"', (REPO / "pyproject.toml").read_text(),
                         re.MULTILINE)[1]
    assert requires == ">=3.10", "re-check NEWEST_FOR_PYTHON_3_10 for the new lowest Python"
    checked = 0
    for meta_file in sorted((REPO / "bundles").glob("*/configs/metadata.json")):
        meta = json.loads(meta_file.read_text())
        pinned = {"numpy": meta["numpy_version"], **meta.get("required_packages_version", {})}
        for name, newest in NEWEST_FOR_PYTHON_3_10.items():
            if name in pinned:
                assert Version(pinned[name]) <= Version(newest), f"{meta_file}: {name} {pinned[name]} needs Python > 3.10"
                checked += 1
    assert checked >= len(list((REPO / "bundles").glob("*/configs/metadata.json")))


def test_gpu_customization_is_refused_with_a_message(tmp_path):
    """MONAI's dummy-training search would silently not run for the qtunet template: it is refused by name."""
    import importlib.util

    from qtunet_monai.integrations.auto3dseg import CheckedAutoRunner, TemplateError

    spec = importlib.util.spec_from_file_location("qtunet_algo", TEMPLATES / "qtunet" / "scripts" / "algo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    algo = module.QtunetAlgo(str(TEMPLATES))
    with pytest.raises(TemplateError, match="gpu_customization: the qtunet template does not run"):
        algo.fill_template_config("datastats.yaml", str(tmp_path), fold=0, gpu_customization=True)

    datalist = tmp_path / "datalist.json"
    datalist.write_text(json.dumps({"training": [{"image": "a.nii.gz", "label": "a_seg.nii.gz", "fold": 0}]}))
    runner = CheckedAutoRunner(work_dir=str(tmp_path / "work"), algos=["qtunet"], templates_path_or_url=str(TEMPLATES),
                               input={"modality": "MRI", "datalist": str(datalist), "dataroot": str(tmp_path)})
    with pytest.raises(TemplateError, match=re.escape("set_gpu_customization(False)")):
        runner.set_gpu_customization(True)
    runner.set_gpu_customization(False)
    assert runner.gpu_customization is False
