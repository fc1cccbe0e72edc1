"""The run configuration: `Config`, its options, presets and checks, and `--config` files."""
