from uniref.models.transformer import UniRefTransformer2DModel

__all__ = ["UniRefTransformer2DModel"]
