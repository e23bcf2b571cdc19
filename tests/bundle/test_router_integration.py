# Copyright (c) qtunet_monai contributors. Licensed under the Apache License, Version 2.0.
"""Conditional light/heavy Swin blocks (``router=``) outside the network: the bundles' and Auto3DSeg's
``--router``/``--capacity`` switches, the baselines' refusal, ``info``/``table`` rows, ``bench`` models,
``set_capacity`` keeping the network's summary current, and the demo campaign's capacity sweep."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigParser

from qtunet_monai import QTUNet
from qtunet_monai.bundle import build_network
from qtunet_monai.bundle.errors import find_cause
from qtunet_monai.networks.blocks.conditional import BlockRouting
from qtunet_monai.networks.blocks.conditional import set_capacity as set_capacity_of
from qtunet_monai.profiling.complexity import OPTION_ROWS, count_flops, count_parameters, option_table
from qtunet_monai.tasks import TASKS

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "bundles" / "qtunet_demo_brain_tissue_segmentation"
SMALL = {"feature_size": 12, "window_size": 3}


def _parsed(config_file: Path, **overrides) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config(str(config_file))
    parser.update({"bundle_root": str(config_file.parents[1]), **overrides})
    return parser


def _capacities(net: torch.nn.Module) -> list[dict]:
    return [m.capacity for m in net.modules() if isinstance(m, BlockRouting)]


@pytest.mark.slow
def test_every_segmentation_bundle_builds_a_conditional_network_from_its_switches():
    """--router light --capacity 0.25 reach the network of train.json and inference.json of every bundle;
    without them the network is dense."""
    for task in TASKS.values():
        if task.pretraining_only:
            continue
        for name in ("train.json", "inference.json"):
            config = REPO / "bundles" / task.bundle / "configs" / name
            dense = _parsed(config).get_parsed_content("network_def")
            assert dense.routing is None and not _capacities(dense), (task.bundle, name)
            net = _parsed(config, router="light", capacity=0.25).get_parsed_content("network_def")
            assert net.router_type == "light" and net.routing.capacity == {"q": 0.25, "kv": 0.25, "ff": 0.25}
            assert _capacities(net) and all(c == net.routing.capacity for c in _capacities(net)), task.bundle
            # the routers are new parameters; the dense ones keep their names
            dense_keys, keys = set(dense.state_dict()), set(net.state_dict())
            assert dense_keys < keys and all(".router." in k or ".light_" in k for k in keys - dense_keys)


def test_the_bundle_capacity_at_inference_changes_the_routed_share_of_the_same_weights():
    """A model trained at capacity 0.25 loads into inference.json's network at --capacity 0.5 (no new or
    missing keys) and computes what set_capacity(0.5) computes on the trained network."""
    common = {"preset": "thesis", "router": "light"}
    trained = _parsed(DEMO / "configs" / "train.json", capacity=0.25, **common).get_parsed_content("network_def")
    with torch.no_grad():  # non-zero light branches, so that the two capacities differ
        for name, p in trained.named_parameters():
            if ".light_" in name:
                p.normal_(0.0, 0.02)
    inference = _parsed(DEMO / "configs" / "inference.json", capacity=0.5, **common).get_parsed_content("network_def")
    inference.load_state_dict(trained.state_dict(), strict=True)
    x = torch.randn(1, 1, 28, 28, 28)
    with torch.no_grad():
        at_quarter = trained.eval()(x)
        trained.set_capacity(0.5)
        torch.testing.assert_close(inference.eval()(x), trained(x))
    assert not torch.allclose(at_quarter, trained(x))
    sites = _parsed(DEMO / "configs" / "inference.json", router_sites=["encoder", "bottleneck"], **common)
    net = sites.get_parsed_content("network_def")
    assert set(net.routing.sites) == {"encoder", "bottleneck"}
    assert not any(isinstance(m, BlockRouting) for stage in net.decoder_stages for m in stage.modules())


def test_a_named_conditional_architecture_keeps_its_router_in_the_bundle():
    net = _parsed(DEMO / "configs" / "inference.json", preset="thesis",
                  architecture="QT-UNet-Cond").get_parsed_content("network_def")
    assert net.router_type == "light" and net.routing.capacity["q"] == 0.25
    net = _parsed(DEMO / "configs" / "inference.json", preset="thesis", architecture="QT-UNet-Cond",
                  capacity=0.5).get_parsed_content("network_def")
    assert net.routing.capacity == {"q": 0.5, "kv": 0.5, "ff": 0.5}


def test_a_named_cct_architecture_keeps_its_skips_in_the_bundle():
    net = _parsed(DEMO / "configs" / "inference.json", preset="thesis",
                  architecture="QT-UNet-CCT").get_parsed_content("network_def")
    assert net.skip_type == "cct"
    plain = _parsed(DEMO / "configs" / "inference.json", preset="thesis").get_parsed_content("network_def")
    assert plain.skip_type == "concat"
    with pytest.raises(ValueError, match=r"SegResNet has no QT-UNet \['skip'\]"):
        build_network("SegResNet", 1, 4, [56, 56, 56], skip="cct")
    assert build_network("SegResNet", 1, 4, [56, 56, 56], skip=None) is not None


@pytest.mark.parametrize("option", [{"router": "light"}, {"capacity": 0.25}, {"router_sites": ["encoder"]}])
def test_baselines_refuse_router_options_by_name(option):
    (key,) = option
    with pytest.raises(ValueError, match=rf"SegResNet has no QT-UNet \['{key}'\]"):
        build_network("SegResNet", 1, 4, [56, 56, 56], **option)
    assert build_network("SegResNet", 1, 4, [56, 56, 56], router=None, capacity=None, router_sites=None) is not None
    parser = _parsed(DEMO / "configs" / "train.json", preset="thesis", architecture="SegResNet", **option)
    with pytest.raises(RuntimeError) as error:  # MONAI's "Failed to instantiate", caused by ours
        parser.get_parsed_content("network_def")
    assert f"SegResNet has no QT-UNet ['{key}']" in str(find_cause(error.value, ValueError))


def test_the_auto3dseg_template_takes_the_router_switches(auto3dseg_template):
    from qtunet_monai.integrations.auto3dseg import load_config

    algo = auto3dseg_template
    configs = [str(algo / "configs" / f) for f in ("hyper_parameters.yaml", "network.yaml", "transforms.yaml")]
    dense = load_config(configs, input_channels=1, output_classes=3).get_parsed_content("network")
    assert dense.routing is None
    net = load_config(configs, input_channels=1, output_classes=3, router="iterative", capacity=0.5,
                      router_sites=["encoder"]).get_parsed_content("network")
    assert net.router_type == "iterative" and net.routing.capacity == {"q": 0.5, "kv": 0.5, "ff": 0.5}
    assert set(net.routing.sites) == {"encoder"}


def test_set_capacity_keeps_the_network_summary_current():
    """net.routing reports the capacity every block runs at after set_capacity (whole or per kind, through
    the method or the module function), and the network computes what one built at that capacity does."""
    torch.manual_seed(0)
    net = QTUNet(1, 3, **SMALL, router="light", capacity=0.25).eval()
    net.set_capacity(0.5)
    assert net.routing.capacity == {"q": 0.5, "kv": 0.5, "ff": 0.5}
    net.set_capacity({"ff": 0.125})
    assert net.routing.capacity == {"q": 0.5, "kv": 0.5, "ff": 0.125}
    assert all(c == net.routing.capacity for c in _capacities(net))
    assert set_capacity_of(net, 1.0) == len(_capacities(net))
    assert net.routing.capacity == {"q": 1.0, "kv": 1.0, "ff": 1.0}
    net.set_capacity({"q": 0.5, "kv": 0.5, "ff": 0.125})
    fresh = QTUNet(1, 3, **SMALL, router="light", capacity=dict(net.routing.capacity)).eval()
    fresh.load_state_dict(net.state_dict())
    x = torch.randn(1, 1, 20, 20, 20)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), net(x))


def test_option_rows_cover_the_routers_and_cct_on_the_thesis_inputs():
    rows = {(label, arch, c_in, roi) for label, arch, c_in, _, roi, _ in OPTION_ROWS}
    for capacity in ("0.25", "0.5"):
        assert (f"light router, capacity {capacity}", "QT-UNet", 4, 128) in rows
        assert (f"light router, capacity {capacity}", "QT-UNet-2D", 3, 1024) in rows
    for preset in ("full", "lite"):
        assert (f"CCT {preset}", "QT-UNet", 4, 128) in rows and (f"CCT {preset}", "QT-UNet-2D", 3, 1024) in rows


@pytest.mark.slow
def test_info_and_the_option_table_count_the_conditional_network(capsys):
    pytest.importorskip("fvcore")
    from qtunet_monai.cli import main

    # in-process: the command line's own process is not what this test is about
    main(["info", "--out_channels", "3", "--roi", "32", "--router", "light", "--capacity", "0.25"])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    torch.manual_seed(0)
    net = QTUNet(1, 3, router="light", capacity=0.25)
    assert result["router"] == "light" and result["capacity"] == {"q": 0.25, "kv": 0.25, "ff": 0.25}
    assert result["params_m"] == round(count_parameters(net) / 1e6, 3)
    assert result["gflops"] == round(count_flops(net, (1, 1, 32, 32, 32)) / 1e9, 2)
    options = [(f"light {c}", "QT-UNet", 1, 3, 32, {"router": "light", "capacity": c}) for c in (0.25, 1.0)]
    quarter, full = option_table(["tiny"], rows=options)
    assert quarter["plain_params_m"] == count_parameters(QTUNet(1, 3)) / 1e6
    assert quarter["params_m"] == full["params_m"] > quarter["plain_params_m"]  # routers and light branches
    assert quarter["gflops"] == count_flops(net, (1, 1, 32, 32, 32)) / 1e9
    assert quarter["gflops"] < full["gflops"]  # the heavy branches see a quarter of the tokens


def test_bench_names_dense_and_conditional_models(monkeypatch):
    from qtunet_monai.profiling import benchmark

    assert {"qtunet-tiny-cond0.25", "qtunet-tiny-cond0.5", "qtunet-base-cond0.25", "qtunet-base-cond0.5"} <= set(
        benchmark.MODELS)
    assert not any("-cond" in name for name in benchmark.DEFAULT_MODELS)
    assert benchmark.build_model("qtunet-base-cond0.5", 96, torch.device("cpu")).routing.capacity["q"] == 0.5
    monkeypatch.setitem(benchmark.SCENARIOS, "infer32", ("infer", 32))
    result = benchmark.run_benchmark(["qtunet-tiny", "qtunet-tiny-cond0.25"], ["infer32"], repeats=1, memory=False,
                                     flops=False)
    rows = result["scenarios"]["infer32"]
    assert set(rows) == {"qtunet-tiny", "qtunet-tiny-cond0.25"} and all(r["seconds"] > 0 for r in rows.values())
    assert rows["qtunet-tiny-cond0.25"]["params_m"] > rows["qtunet-tiny"]["params_m"]


def _demo_options():
    spec = importlib.util.spec_from_file_location("demo_options", REPO / "benchmarks" / "demo_options.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_the_capacity_sweep_predicts_the_test_case_at_each_capacity(tmp_path):
    """The campaign's sweep on a fabricated (untrained) model of the router arm: one evaluation per
    capacity through the bundle's configs, Dice per class and inference time recorded under the arm's run,
    and a second table."""
    pytest.importorskip("nilearn")
    from qtunet_monai.data.demo import prepare_demo

    demo_options = _demo_options()
    overrides = demo_options.ARMS["router_light"][0]
    assert overrides["router"] == "light" and overrides["capacity"] == 0.25
    work = tmp_path / "work"
    bundle = work / "router_light__seed123"
    shutil.copytree(DEMO, bundle, ignore=shutil.ignore_patterns("data", "models", "eval"))
    prepare_demo(bundle / "data", num_train=1, num_val=1)
    torch.manual_seed(0)
    network = {k: v for k, v in overrides.items() if k != "max_epochs"}
    net = _parsed(bundle / "configs" / "train.json", **network).get_parsed_content("network_def")
    (bundle / "models").mkdir()
    torch.save(net.state_dict(), bundle / "models" / "model.pt")
    results = tmp_path / "demo_options.json"
    # the arm's own row, as `run` writes it (figures made up: the table only formats them)
    run = {"overrides": overrides, "test_dice": dict.fromkeys((*demo_options.CLASSES, "mean"), 0.5),
           "train_s": 60.0, "epochs": 1, "best_val_dice": 0.5, "params_m": 6.7, "gflops": 7.0}
    results.write_text(json.dumps({"arms": {"router_light": {"123": run}}}))
    with pytest.raises(SystemExit, match="not a conditional arm"):
        demo_options.capacity_sweep("detail", work_dir=str(work), output=str(results))

    sweep = demo_options.capacity_sweep("router_light", "0.25,1.0", work_dir=str(work), output=str(results))
    stored = json.loads(results.read_text())["arms"]["router_light"]["123"]["capacity_sweep"]
    assert stored == sweep and set(sweep) == {"0.25", "1.0"}
    for capacity, row in sweep.items():
        assert set(row["test_dice"]) == {*demo_options.CLASSES, "mean"}
        assert all(0.0 <= v <= 1.0 for v in row["test_dice"].values())
        assert 0.0 < row["inference_s"] < row["process_s"]
        assert (bundle / f"eval_capacity_{capacity}" / "brain_template_seg.nii.gz").is_file()
    log = (bundle / "capacity_sweep.log").read_text()
    assert "--capacity 0.25" in log and "--capacity 1.0" in log
    table = demo_options.table(str(results))
    assert "| `router_light` | 123 | 0.25 (trained) |" in table and "| `router_light` | 123 | 1.0 |" in table
