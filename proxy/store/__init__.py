"""Where entries live. Every backend speaks the same small Protocol, proven by one contract suite."""

from __future__ import annotations

from .base import Store, StoredItem
from .factory import describe_store, open_store, store_folder

__all__ = ["Store", "StoredItem", "describe_store", "open_store", "store_folder"]
