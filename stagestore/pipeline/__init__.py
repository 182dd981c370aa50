"""Pipelines: loading and validating `stagestore.toml` and building one in Python (`model`),
placeholders (`syntax`), the two keys that decide identical work (`keys`), built-in kinds in a
pipeline (`kindspec`), item files (`items`) and writing TOML (`tomlwrite`)."""
