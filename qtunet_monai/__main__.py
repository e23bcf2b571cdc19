# Copyright (c) qtunet_monai contributors. Licensed under the Apache License, Version 2.0.
from .cli import main

main()
