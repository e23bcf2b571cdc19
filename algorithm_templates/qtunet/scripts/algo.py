# Copyright (c) qtunet_monai contributors. Licensed under the Apache License, Version 2.0.
"""Auto3DSeg algorithm ``qtunet``: QT-UNet, configured from the DataAnalyzer statistics by key."""

from __future__ import annotations

from monai.apps.auto3dseg import BundleAlgo


class QtunetAlgo(BundleAlgo):
    """Auto3DSeg registers this class for the template folder ``qtunet`` (``<Name>Algo``)."""

    def fill_template_config(self, data_stats_filename: str, output_path: str, **kwargs) -> dict:
        from qtunet_monai.integrations.auto3dseg import fill_hyper_parameters, refuse_gpu_customization

        refuse_gpu_customization(bool(kwargs.get("gpu_customization", False)))  # MONAI's hook: refused, not ignored
        return fill_hyper_parameters(data_stats_filename, self.data_list_file, output_path,
                                     fold=kwargs.get("fold", 0))


if __name__ == "__main__":
    from monai.utils import optional_import

    fire, _ = optional_import("fire")
    fire.Fire({"QtunetAlgo": QtunetAlgo})
