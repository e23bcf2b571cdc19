# Copyright (c) qtunet_monai contributors. Licensed under the Apache License, Version 2.0.
"""Every task bundle, generated from qtunet_monai/tasks.py, end to end on its fake data on CPU:
MONAI's bundle checks, a short training, evaluation and inference with tiny crops."""

from __future__ import annotations

import importlib.util
import json
import shutil
import string
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser, ckpt_export, run, verify_net_in_out

from qtunet_monai.tasks import TASKS

REPO = Path(__file__).resolve().parents[2]
GENERATOR = REPO / "tools" / "generate_bundles.py"
_spec = importlib.util.spec_from_file_location("generate_bundles", GENERATOR)
generate_bundles = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(generate_bundles)
check_bundles, render_bundle = generate_bundles.check_bundles, generate_bundles.render_bundle
TASK_BUNDLES = [t for t in TASKS.values() if t.data != "demo" and not t.pretraining_only]


def _untrained(config: dict) -> dict:
    """``config`` as a bundle without a trained model sees it: each ``$@trained.get('key', default)`` setting
    (qtunet_monai/bundle/settings.py) replaced by its default, a literal or, where the default is an
    expression (the preset-scaled learning rate), that expression."""
    import ast
    import re

    def value(v):
        found = re.fullmatch(r"\$@trained\.get\('(\w+)', (.*)\)", v) if isinstance(v, str) else None
        if not found:
            return v
        try:
            return ast.literal_eval(found[2])
        except (ValueError, SyntaxError):
            return "$" + found[2]

    return {k: value(v) for k, v in config.items()}


def test_committed_bundles_match_their_tasks():
    """The committed configs and docs are what qtunet_monai/tasks.py generates (no hand drift)."""
    assert check_bundles(REPO / "bundles") == []
    # the reconstruction bundle has its own generator (tools/generate_reconstruction_bundle.py)
    assert sorted(p.name for p in (REPO / "bundles").iterdir() if p.is_dir()) == sorted(
        [*TASKS, "qtunet_demo_mri_reconstruction"])


@pytest.mark.slow
def test_generator_check_fails_on_drift(tmp_path):
    """``tools/generate_bundles.py --check`` exits 1 naming a hand-edited file, 0 once regenerated."""
    name = "qtunet_demo_brain_tissue_segmentation"
    root = tmp_path / "bundles"
    assert generate_bundles.main(["--root", str(root), name]) == 0
    assert generate_bundles.main(["--check", "--root", str(root)]) == 1  # the other bundles are missing
    generate_bundles.write_bundles(root)
    assert generate_bundles.main(["--check", "--root", str(root)]) == 0
    train = root / name / "configs" / "train.json"
    train.write_text(train.read_text() + "\n")  # any hand edit is drift
    result = subprocess.run([sys.executable, str(GENERATOR), "--check", "--root", str(root)], capture_output=True,
                            text=True, check=False)
    assert result.returncode == 1 and str(train) in result.stdout and result.stdout.count(".json") == 1


def test_generated_json_layout_and_imports():
    """The model zoo's layout (json.dumps(indent=4) plus a newline) and only imports an expression uses."""
    for task in TASKS.values():
        for rel, text in render_bundle(task).items():
            if not rel.endswith(".json"):
                continue
            config = json.loads(text)
            assert text == json.dumps(config, indent=4) + "\n", rel
            used = " ".join(e for e in generate_bundles._expressions(config) if not e.startswith("$import"))
            for statement in config.get("imports", []):
                assert statement.split()[-1] + "." in used, (task.bundle, rel, statement)


def test_readme_templates_fill_every_placeholder():
    """Every task's README sections fill exactly the placeholders of its template (rendering raises on a missing
    one), and the rendered text starts with the task's title and ends with its references."""
    for task in TASKS.values():
        name, sections = (("pretraining_README.md", generate_bundles.pretraining_sections(task))
                          if task.pretraining_only else ("bundle_README.md", generate_bundles.readme_sections(task)))
        template = string.Template((generate_bundles.TEMPLATES / name).read_text())
        assert set(template.get_identifiers()) == set(sections), (task.bundle, name)
        text = generate_bundles.render_template(name, sections)
        assert text.startswith(f"# {task.title}\n\n{task.description}") and "$" not in text, task.bundle
        assert text.endswith("## References\n" + "".join(f"- {r}\n" for r in task.docs.references)), task.bundle
        missing = dict(sections)
        del missing["thesis_result"]
        with pytest.raises(KeyError, match="thesis_result"):
            generate_bundles.render_template(name, missing)


def test_generated_configs_follow_the_thesis_recipe():
    for task in TASK_BUNDLES:
        config = json.loads(render_bundle(task)["configs/train.json"])
        train = _untrained(config)
        parser = ConfigParser(config)  # the thesis preset, the task bundles' default
        assert train["preset"] == "thesis" and parser.get_parsed_content("optimizer_name") == "Adam"
        assert parser.get_parsed_content("learning_rate") == 4e-5 and train["network_def"]["drop_path_rate"] == 0.2
        assert (train["batch_size"], train["max_epochs"]) == ((4, 150) if task.source.spatial_dims == 2 else (1, 350))
        assert parser.get_parsed_content("weight_decay") == (0.001 if task.source.spatial_dims == 2 else 0.0)
        parser.update({"preset": "accurate"})  # the demo's recipe: AdamW, twice the task's learning rate
        assert parser.get_parsed_content("learning_rate") == 8e-5
        assert parser.get_parsed_content("weight_decay") == 0.05
        assert train["validate"]["inferer"]["overlap"] == 0.5 and train["validate"]["inferer"]["mode"] == "@sw_mode"
        assert train["sw_mode"] == "constant"
        loss = train["loss"]
        assert loss.get("sigmoid", False) == (task.data in ("brats21", "msd_brain"))
        metrics = set(train["validate"]["key_metric"]) | set(train["validate"]["additional_metrics"])
        assert "val_mean_dice" in train["validate"]["key_metric"]
        assert ("val_hd95" in metrics) == task.recipe.hd95
        assert ("val_mean_iou" in metrics) == (task.source.spatial_dims == 2)
    brats = _untrained(json.loads(render_bundle(TASKS["qtunet_brats21_segmentation"])["configs/train.json"]))
    assert brats["roi_size"] == [128, 128, 128] and brats["pixdim"] == [1.0, 1.0, 1.0]
    btcv = _untrained(json.loads(render_bundle(TASKS["qtunet_btcv_segmentation"])["configs/train.json"]))
    scale = next(t for t in btcv["train"]["deterministic_transforms"] if t["_target_"] == "ScaleIntensityRanged")
    assert (scale["a_min"], scale["a_max"], btcv["pixdim"]) == (-175.0, 250.0, [1.5, 1.5, 2.0])


def test_generated_configs_keep_the_shared_training_machinery():
    """Crops as the thesis, GPUs by LOCAL_RANK, Swin's no-decay groups, held-out pre-training losses and no
    metadata number that reads like a result."""
    rendered = {name: render_bundle(task) for name, task in TASKS.items()}

    def config(bundle: str, rel: str) -> dict:
        return _untrained(json.loads(rendered[bundle][rel]))

    # MSD Task 1 crops 128^3 like BraTS (thesis 3.2.1, footnote of 5.2.1); BraTS and Task 1 pre-train at 128^3
    assert config("qtunet_msd_brain_segmentation", "configs/train.json")["roi_size"] == [128, 128, 128]
    for bundle in ("qtunet_brats21_segmentation", "qtunet_msd_brain_segmentation"):
        assert config(bundle, "configs/pretrain.json")["roi_size"] == [128, 128, 128]
    for bundle, files in rendered.items():
        task = TASKS[bundle]
        for rel in [r for r in files if r.endswith(".json")]:
            text = files[rel]
            assert "get_rank()}" not in text and "'cuda:0'" not in text, (bundle, rel)  # no global-rank GPU
        pretrain = config(bundle, "configs/pretrain.json")
        assert pretrain["gpu_device"] == "$qtunet_bundle.local_gpu()" and "@gpu_device" in pretrain["device"]
        assert pretrain["optimizer"]["params"] == "$qtunet_bundle.param_groups(@network, @weight_decay)"
        assert pretrain["validate"]["evaluator"]["_target_"] == "qtunet_monai.ssl.SSLEvaluator"
        assert {"_target_": "ValidationHandler", "validator": "@validate#evaluator", "epoch_level": True,
                "interval": "@val_interval"} in pretrain["pretrain"]["handlers"]
        overlay = config(bundle, "configs/multi_gpu_pretrain.json")
        assert "device" not in overlay and "$qtunet_bundle.init_distributed(@device)" in overlay["initialize"]
        assert overlay["validate#sampler"]["even_divisible"]  # every rank computes the all-reduced mean
        meta = config(bundle, "configs/metadata.json")
        assert meta.get("eval_metrics") == (task.docs.eval_metrics or None), bundle
        if task.pretraining_only:
            continue
        train = config(bundle, "configs/train.json")
        assert train["optimizer"]["params"] == "$qtunet_bundle.param_groups(@network, @weight_decay)"
        assert "device" not in config(bundle, "configs/multi_gpu_train.json")
    # The demo's published figure is the campaign's mean test Dice of its default network over the seeds run.
    campaign = json.loads((REPO / "benchmarks/results/demo_options.json").read_text())["arms"]["detail_12_24"]
    measured = sum(run["test_dice"]["mean"] for run in campaign.values()) / len(campaign)
    demo_metadata = config("qtunet_demo_brain_tissue_segmentation", "configs/metadata.json")
    assert demo_metadata["eval_metrics"] == {"mean_dice": round(measured, 2)}


def _overrides(task) -> dict:
    """Tiny crops and one short epoch; the fake volumes stay small at the task's spacing."""
    over = {"roi_size": [64, 64] if task.source.spatial_dims == 2 else [32, 32, 32], "num_workers": 0}
    if task.data in ("msd_hippocampus", "msd_prostate"):  # 0.2 / 0.5 mm would blow the fake volumes up
        over["pixdim"] = [1.5, 1.5, 1.5]
    return over


@pytest.mark.slow
@pytest.mark.parametrize("task", TASK_BUNDLES, ids=[t.data for t in TASK_BUNDLES])
def test_bundle_end_to_end_on_fake_data(task, task_bundle):
    bundle = task_bundle(task.data)
    over = _overrides(task)

    verify_net_in_out("network_def", meta_file="configs/metadata.json", config_file="configs/inference.json",
                      device="cpu", n=1)

    run(config_file="configs/train.json", max_epochs=1, val_interval=1, **over)
    model = torch.load("models/model.pt", weights_only=True)
    assert model["head.classifier.weight"].shape[0] == task.source.num_classes
    assert torch.load("models/resume.pt", weights_only=True)["epoch"] == 1

    run(config_file=["configs/train.json", "configs/evaluate.json"], **over)
    scores = (bundle / "eval" / "metrics.csv").read_text()
    assert "val_mean_dice" in scores
    assert ("val_hd95" in scores) == task.recipe.hd95 and ("val_mean_iou" in scores) == task.recipe.iou

    shutil.rmtree("eval")
    run(config_file="configs/inference.json", **{k: v for k, v in over.items() if k != "num_workers"})
    datalist = json.loads((bundle / "data" / "datalist.json").read_text())
    source = datalist["testing"][0]["image"]
    source = source[0] if isinstance(source, list) else source
    predictions = sorted((bundle / "eval").glob("*_seg.*"))
    assert len(predictions) == len(datalist["testing"])
    if task.source.spatial_dims == 2:
        from PIL import Image

        prediction, image = Image.open(predictions[0]), Image.open(source)
        assert prediction.size == image.size and prediction.mode == "L"
        assert set(np.unique(np.asarray(prediction)).tolist()) <= set(range(task.source.num_classes))
    else:
        prediction, image = nib.load(predictions[0]), nib.load(source)
        assert prediction.shape == image.shape[:3]
        np.testing.assert_allclose(prediction.affine, image.affine, atol=1e-4)
        assert set(np.unique(np.asarray(prediction.dataobj)).tolist()) <= set(task.source.label_values)

    ckpt_export("network_def", filepath="models/model.ts", ckpt_file="models/model.pt",
                meta_file="configs/metadata.json", config_file="configs/inference.json", use_trace=True,
                input_shape=[1, task.source.in_channels, *over["roi_size"]], **over)
    shape = (1, task.source.in_channels, *over["roi_size"])
    traced = torch.jit.load("models/model.ts")
    assert traced(torch.randn(shape)).shape == (1, task.source.num_classes, *over["roi_size"])


@pytest.mark.slow
@pytest.mark.parametrize("key", ["btcv", "cityscapes", "ctssl", "mrissl"])
def test_pretrain_then_finetune_on_fake_data(key, task_bundle, capsys):
    """configs/pretrain.json writes the encoder; a task bundle starts from it with --finetune True."""
    task = next(t for t in TASKS.values() if t.data == key)
    bundle = task_bundle(key)
    roi = [64, 64] if task.source.spatial_dims == 2 else [32, 32, 32]
    run(config_file="configs/pretrain.json", max_epochs=2, batch_size=2, roi_size=roi, num_workers=0)
    encoder = torch.load("models/pretrained.pt", weights_only=True)
    assert torch.load("models/pretrain_resume.pt", weights_only=True)["epoch"] == 2
    assert "patch_embed.proj.weight" in encoder and not any(k.startswith("decoder_stages") for k in encoder)
    assert list((bundle / "eval").glob("events.out.tfevents.*"))
    if task.pretraining_only:  # fine-tune a CT / MRI task network from it
        from qtunet_monai import QTUNet
        from qtunet_monai.bundle import load_pretrained

        net = QTUNet(1, 14)
        report = load_pretrained(net, "models/pretrained.pt")
        assert len(report["loaded"]) == len(encoder) and not report["unexpected"]
        return
    capsys.readouterr()
    run(config_file="configs/train.json", max_epochs=1, val_interval=1, roi_size=roi, num_workers=0,
        finetune=True, finetune_checkpoint="models/pretrained.pt")
    log = capsys.readouterr()
    assert f"{len(encoder)} tensors loaded" in log.out + log.err
