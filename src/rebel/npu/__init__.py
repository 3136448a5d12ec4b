"""Hardware descriptions: one TOML spec per product, loaded into typed dataclasses."""
from .machine import (DeviceInfo, MachineConfig, current_machine, device_count, get_npu_name,
                      machine_from_env, npu_is_available, reset_machine)
from .spec import ProductSpec, builtin_products, load_spec

__all__ = ["DeviceInfo", "MachineConfig", "ProductSpec", "builtin_products", "current_machine",
           "device_count", "get_npu_name", "load_spec", "machine_from_env", "npu_is_available",
           "reset_machine"]
