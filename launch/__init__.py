"""Launch layer: expands the architecture x size grid and runs it locally or on Cloud TPU VMs."""
