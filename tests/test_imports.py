"""The core never pulls in a GUI or CVAT: it must run in a Nuclio container and a plain shell."""

from __future__ import annotations

import json
import subprocess
import sys

FORBIDDEN = (
    "napari",
    "PyQt5",
    "PyQt6",
    "PySide2",
    "PySide6",
    "qtpy",
    "superqt",
    "magicgui",
    "vispy",
    "cvat_sdk",
)


def _modules_after(code: str) -> set[str]:
    """Top-level names in sys.modules after running ``code`` in a fresh interpreter."""
    script = f"{code}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False
    )
    assert out.returncode == 0, out.stderr
    return {name.split(".")[0] for name in json.loads(out.stdout.strip().splitlines()[-1])}


def test_core_and_package_import_no_gui_or_cvat():
    code = "\n".join(
        [
            "import napari_stm, napari_stm.core",
            "import napari_stm.core.engine, napari_stm.core.memory, napari_stm.core.frames",
            "import napari_stm.core.weights, napari_stm.core.network, napari_stm.core.lite0_match",
            "import napari_stm.core.readout, napari_stm.core.backbones",
            # The package's public names, imported lazily on first use, and a model built.
            "for name in napari_stm.__all__: getattr(napari_stm, name)",
            "napari_stm.load_model('lite0-match', device='cpu')",
        ]
    )
    loaded = _modules_after(code)
    assert "torch" in loaded and "napari_stm" in loaded  # the script really ran
    assert not loaded & set(FORBIDDEN), f"imported: {sorted(loaded & set(FORBIDDEN))}"


def test_package_import_is_light():
    # napari reads the plugin manifest by importing the package: that must not load torch.
    loaded = _modules_after("import napari_stm")
    assert "torch" not in loaded and not loaded & set(FORBIDDEN)
