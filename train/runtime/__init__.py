"""The machine a run uses: devices, processes (DDP), optional extras, fault injection for tests."""
