"""napari-stm in CVAT: a Nuclio tracker (``nuclio/``), a cvat-sdk tracking function for
``cvat-cli`` agents (``agent``), and ``napari-stm cvat fill-task`` (``task``).

This package imports the propagation engine and cvat-sdk; ``napari_stm.core`` never imports it.
"""
