from .runstore import RunStore

__all__ = ["RunStore"]
