from .record import SCHEMA_VERSION, ImageRecord
from .runstore import RunStore

__all__ = ["ImageRecord", "RunStore", "SCHEMA_VERSION"]
