"""Cartridges at Scale rotation: on-disk cartridge store, rotation policy, device slot manager."""
from cas.rotation.manager import (STATE_KEYS, SlotError, SlotManager, resident_bytes,
                                  slot_shardings)
from cas.rotation.policy import (RotationError, RotationPlan, RotationPolicy, tiebreak_key,
                                 validate)
from cas.rotation.store import ARRAY_NAMES, CartridgeStore, StoreError, doc_dirname

__all__ = [
    "ARRAY_NAMES", "CartridgeStore", "RotationError", "RotationPlan", "RotationPolicy",
    "STATE_KEYS", "SlotError", "SlotManager", "StoreError", "doc_dirname", "resident_bytes",
    "slot_shardings", "tiebreak_key", "validate",
]
