"""Settings of the paired-scene generator: a config file for `--config=configs/datagen.py:224`.

The defaults, presets and validation live in `data_pipeline.settings` (the data pipeline imports nothing
from configs/); this file re-exports them so that training configs and scripts can name the generator
settings beside the other configs. Presets by `arg`: None / "448" (the default), "224", "160", or any
other integer resolution.

Launch: python -m data_pipeline.generate --output_dir=/tmp/dig --num_pairs=1000 --workers=2 \
            --config=configs/datagen.py:224 --config.shadows=True
"""
from data_pipeline.settings import KINDS, get_config, validate

__all__ = ["KINDS", "get_config", "validate"]
