# Copyright (c) qtunet_monai contributors. Licensed under the Apache License, Version 2.0.
"""The family reproduces the thesis' parameter and FLOP tables (docs/architecture.md section 1) to within 1 %.

The tests count the full-size FLOPs of T and B for every row (14 of the table's 21 figures; about two
minutes on a 2-core CPU); ``python -m qtunet_monai table`` counts all 21."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from qtunet_monai import QTUNet, build_architecture
from qtunet_monai.profiling.complexity import (
    THESIS_TARGETS,
    VARIANT_ORDER,
    complexity_table,
    count_flops,
    count_parameters,
)

CASES = [
    pytest.param(target, variant, id=f"{target.architecture}-{target.task}-{variant}")
    for target in THESIS_TARGETS
    for variant in VARIANT_ORDER
]


@pytest.mark.parametrize("target, variant", CASES)
def test_parameters_match_the_thesis(target, variant):
    model = build_architecture(target.architecture, target.in_channels, target.out_channels, variant)
    params_m = count_parameters(model) / 1e6
    expected = target.params_m[VARIANT_ORDER.index(variant)]
    assert params_m == pytest.approx(expected, rel=0.01)


# FLOPs of T and B for every row (S differs from them only in width, C = 72 between 48 and 96; its parameters are
# checked above and `python -m qtunet_monai table` counts all 21): 14 full-size counts instead of 21.
FLOP_CASES = [case for case in CASES if case.values[1] != "small"]


@pytest.mark.slow
@pytest.mark.parametrize("target, variant", FLOP_CASES)
def test_flops_match_the_thesis(target, variant):
    pytest.importorskip("fvcore")
    (row,) = complexity_table([variant], flops=True, targets=[target])
    assert row["gflops"] == pytest.approx(row["target_gflops"], rel=0.01)


@pytest.mark.slow
def test_cli_info_reports_four_stages_patch_two_and_deep_supervision(capsys):
    pytest.importorskip("fvcore")
    from qtunet_monai.cli import main

    # in-process: the command line's own process is covered by test_cli_rejects_bad_arguments_with_one_line
    main(["info", "--out_channels", "3", "--roi", "32", "--num_stages", "4", "--patch_size", "2",
          "--deep_supervision", "True"])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (result["num_stages"], result["patch_size"], result["deep_supervision"]) == (4, 2, True)
    net = QTUNet(1, 3, num_stages=4, patch_size=2, deep_supervision=True)
    assert result["params_m"] == round(count_parameters(net) / 1e6, 3)
    assert result["params_m"] > 3 * 6.65  # the fourth stage (8C) and the 16C bottleneck dominate
    # FLOPs of the plain logits: the auxiliary heads are not run outside training
    assert result["gflops"] == round(count_flops(net, (1, 1, 32, 32, 32)) / 1e9, 2)


@pytest.mark.slow
def test_cli_rejects_bad_arguments_with_one_line():
    done = subprocess.run([sys.executable, "-m", "qtunet_monai", "info", "--variant", "huge"],
                          capture_output=True, text=True, check=False)
    assert done.returncode == 2
    assert done.stderr.strip() == "error: unknown variant 'huge'; choose one of ['base', 'small', 'tiny']."


@pytest.mark.slow
def test_cli_info_takes_any_input_shape(capsys):
    pytest.importorskip("fvcore")
    from qtunet_monai.cli import main

    main(["info", "--roi", "50,61,37", "--out_channels", "3"])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["input"] == [1, 1, 50, 61, 37] and result["gflops"] > 0
    assert result["gflops"] == round(count_flops(QTUNet(1, 3), (1, 1, 50, 61, 37)) / 1e9, 2)
    main(["info", "--roi", "40x24", "--spatial_dims", "2", "--flops", "False"])
    assert json.loads(capsys.readouterr().out)["input"] == [1, 1, 40, 24]
    for roi in ("50,61", "50,0,37", "big"):
        with pytest.raises(SystemExit) as stopped:
            main(["info", "--roi", roi, "--flops", "False"])
        assert stopped.value.code == 2
        error = capsys.readouterr().err.strip()
        assert error.startswith("error: --roi ") and "(e.g. 50,61,37)" in error and len(error.splitlines()) == 1


@pytest.mark.slow
def test_cli_table_writes_json(tmp_path):
    out = tmp_path / "table.json"
    cmd = [sys.executable, "-m", "qtunet_monai", "table", "--variants", "tiny", "--flops", "False",
           "--json_file", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    rows = json.loads(out.read_text())
    assert len(rows) == len(THESIS_TARGETS)
    table_rows = [line for line in done.stdout.splitlines() if line.startswith("| ")]
    assert len(table_rows) == 1 + len(THESIS_TARGETS)  # header plus one row per target
    for row in rows:
        assert row["params_m"] == pytest.approx(row["target_params_m"], rel=0.01)


@pytest.mark.slow
def test_cli_info_and_the_option_table_count_the_detail_path_and_cct(capsys):
    pytest.importorskip("fvcore")
    from qtunet_monai.cli import main
    from qtunet_monai.profiling.complexity import option_table

    main(["info", "--out_channels", "3", "--roi", "32", "--detail_widths", "8,16", "--skip", "cct",
          "--cct_preset", "lite"])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    net = QTUNet(1, 3, detail_widths=(8, 16), skip="cct", cct_preset="lite")
    assert result["detail_widths"] == [8, 16] and result["skip"] == "cct"
    assert result["params_m"] == round(count_parameters(net) / 1e6, 3)
    assert result["gflops"] == round(count_flops(net, (1, 1, 32, 32, 32)) / 1e9, 2)
    plain = QTUNet(1, 3)
    (row,) = option_table(["tiny"], rows=[("detail", "QT-UNet", 1, 3, 32, {"detail_widths": (8, 16)})])
    assert row["plain_params_m"] == count_parameters(plain) / 1e6
    assert row["gflops"] == count_flops(QTUNet(1, 3, detail_widths=(8, 16)), (1, 1, 32, 32, 32)) / 1e9
    assert row["gflops"] > row["plain_gflops"]  # full-resolution convolutions cost FLOPs
