"""napari adapter: a dock widget that propagates a Labels layer, and sample data.

The only part of napari-stm that imports napari or Qt. napari finds it through the npe2 manifest
``napari.yaml`` (entry point ``napari.manifest``).
"""

__all__ = ["PropagateWidget", "make_sample_data", "sample_ground_truth"]


def __getattr__(name: str) -> object:
    # Lazy, so that npe2 reading the manifest does not import napari, Qt or torch.
    if name == "PropagateWidget":
        from napari_stm.napari._widget import PropagateWidget

        return PropagateWidget
    if name in ("make_sample_data", "sample_ground_truth"):
        from napari_stm.napari import _sample_data

        return getattr(_sample_data, name)
    raise AttributeError(name)
