"""The confidence strip: one cell per frame and object, coloured by the engine's confidence.

:class:`Scores` keeps what the engine said about each frame (confidence and flags per object)
and asks the engine's picker (``core.quality.frame_to_correct``) which frame to correct next;
it is plain Python, tested without Qt.
:class:`ConfidenceStrip` draws it (frames left to right, objects top to bottom) and reports
clicks as frame numbers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from qtpy.QtCore import QEvent, QRect, Qt, Signal
from qtpy.QtGui import QColor, QHelpEvent, QImage, QMouseEvent, QPainter, QPaintEvent, QPen
from qtpy.QtWidgets import QSizePolicy, QToolTip, QWidget

from napari_stm.core.quality import frame_to_correct, mean_confidence

#: colours (RGB) of cells that carry no confidence
NOT_COMPUTED = (60, 60, 60)
REFERENCE = (70, 130, 230)
LOST = (200, 0, 200)
#: below this confidence a frame counts as unsure
UNSURE_BELOW = 0.5


def confidence_rgb(conf: np.ndarray) -> np.ndarray:
    """[...] confidence in [0, 1] -> [..., 3] uint8: red (unsure) through yellow to green."""
    c = np.clip(conf, 0.0, 1.0)[..., None]
    red = np.array([215, 48, 39], np.float32)
    yellow = np.array([254, 224, 80], np.float32)
    green = np.array([26, 152, 80], np.float32)
    low = red + (yellow - red) * np.clip(c * 2, 0, 1)
    high = yellow + (green - yellow) * np.clip(c * 2 - 1, 0, 1)
    return np.where(c < 0.5, low, high).round().astype(np.uint8)


@dataclass
class Scores:
    """Per frame and object: the engine's confidence and flag for the frames of a sequence."""

    n_frames: int
    ids: list[int] = field(default_factory=list)
    confidence: dict[int, dict[int, float]] = field(default_factory=dict)
    flags: dict[int, dict[int, str]] = field(default_factory=dict)
    references: set[int] = field(default_factory=set)

    def add(self, t: int, confidence: dict[int, float], flags: dict[int, str]) -> None:
        for i in (*confidence, *flags):
            if i not in self.ids:
                self.ids = sorted({*self.ids, int(i)})
        self.confidence[t] = {int(k): float(v) for k, v in confidence.items()}
        self.flags[t] = {int(k): str(v) for k, v in flags.items()}
        if "reference" in self.flags[t].values():
            self.references.add(t)

    def forget(self, frames: set[int]) -> None:
        """Frames whose scores no longer describe the labels (painted over since)."""
        for t in frames:
            self.confidence.pop(t, None)
            self.flags.pop(t, None)

    def frame_score(self, t: int) -> float | None:
        """A frame is as sure as its least sure object; a lost object scores 0."""
        if t in self.references or t not in self.confidence:
            return None
        conf = dict(self.confidence[t])
        for i, flag in self.flags.get(t, {}).items():
            if flag == "lost":
                conf[i] = 0.0
        return min(conf.values()) if conf else None

    def lost(self, t: int) -> list[int]:
        return [i for i, f in self.flags.get(t, {}).items() if f == "lost"]

    def describe(self, t: int, row: int) -> str:
        """What the strip's cell at frame ``t`` and ``row`` (objects by ascending id) shows."""
        if not (0 <= t < self.n_frames and 0 <= row < len(self.ids)):
            return f"frame {t}" if 0 <= t < self.n_frames else ""
        i = self.ids[row]
        if t in self.references or self.flags.get(t, {}).get(i) == "reference":
            return f"frame {t}, object {i}: painted (a reference)"
        if i not in self.confidence.get(t, {}):
            return f"frame {t}, object {i}: not computed"
        conf = self.confidence[t][i]
        flag = self.flags.get(t, {}).get(i) or ("unsure" if conf < UNSURE_BELOW else "")
        return f"frame {t}, object {i}: confidence {conf:.2f}" + (f", {flag}" if flag else "")

    def unsure(self, t: int) -> bool:
        """Whether frame ``t`` has an object below :data:`UNSURE_BELOW` or lost."""
        score = self.frame_score(t)
        return score is not None and score < UNSURE_BELOW

    def to_correct(self) -> int | None:
        """The frame to correct next, as `bench annotate --pickers tool` picks it
        (``core.quality.frame_to_correct`` on each computed frame's mean object confidence),
        or None when no computed frame is unsure: then there is nothing worth a correction."""
        if not any(self.unsure(t) for t in self.confidence):
            return None
        conf = {
            t: mean_confidence(c, self.ids)
            for t, c in self.confidence.items()
            if t not in self.references
        }
        return frame_to_correct(conf, self.references)

    def image(self) -> np.ndarray:
        """[objects, frames, 3] uint8: the strip's cells."""
        out = np.empty((max(len(self.ids), 1), self.n_frames, 3), np.uint8)
        out[:] = NOT_COMPUTED
        for t, conf in self.confidence.items():
            if not 0 <= t < self.n_frames:
                continue
            flags = self.flags.get(t, {})
            for row, i in enumerate(self.ids):
                if flags.get(i) == "reference" or t in self.references:
                    out[row, t] = REFERENCE
                elif flags.get(i) == "lost":
                    out[row, t] = LOST
                elif i in conf:
                    out[row, t] = confidence_rgb(np.float32(conf[i]))
        for t in self.references:
            if 0 <= t < self.n_frames:
                out[:, t] = REFERENCE
        return out


class ConfidenceStrip(QWidget):
    """Frames x objects, coloured by confidence; a click asks the viewer to show that frame."""

    frame_clicked = Signal(int)
    LEGEND = (
        "Confidence per frame (left to right) and object (top to bottom, ascending ids): green "
        "sure, yellow middling, red unsure, magenta lost, blue painted, grey not computed. "
        "Click to show a frame."
    )

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.scores = Scores(0)
        self.current: int | None = None
        self.setMinimumHeight(36)
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Fixed)

    def set_scores(self, scores: Scores) -> None:
        self.scores = scores
        rows = max(len(scores.ids), 1)
        self.setFixedHeight(min(120, max(36, 10 * rows)))
        self.update()

    def set_current(self, t: int | None) -> None:
        if t != self.current:
            self.current = t
            self.update()

    def _frame_at(self, x: float) -> int | None:
        n = self.scores.n_frames
        if n == 0 or self.width() <= 0:
            return None
        return min(n - 1, max(0, int(x * n / self.width())))

    def _row_at(self, y: float) -> int:
        rows = max(len(self.scores.ids), 1)
        return min(rows - 1, max(0, int(y * rows / max(self.height(), 1))))

    def text_at(self, x: float, y: float) -> str:
        """The tooltip at widget position (x, y): which frame and object, and its score."""
        t = self._frame_at(x)
        return "" if t is None else self.scores.describe(t, self._row_at(y))

    def event(self, event: QEvent) -> bool:
        # The rows carry no names: hovering says which frame and object a cell is.
        if event.type() == QEvent.Type.ToolTip and isinstance(event, QHelpEvent):
            text = self.text_at(event.pos().x(), event.pos().y())
            QToolTip.showText(event.globalPos(), f"{text}\n\n{self.LEGEND}" if text else "")
            return True
        return super().event(event)

    def mousePressEvent(self, event: QMouseEvent) -> None:  # noqa: N802 (Qt's name)
        t = self._frame_at(event.position().x())
        if t is not None:
            self.frame_clicked.emit(t)

    def paintEvent(self, event: QPaintEvent) -> None:  # noqa: N802 (Qt's name)
        painter = QPainter(self)
        try:
            if self.scores.n_frames == 0:
                painter.fillRect(self.rect(), QColor(*NOT_COMPUTED))
                return
            cells = np.ascontiguousarray(self.scores.image())
            h, w = cells.shape[:2]
            image = QImage(cells.data, w, h, 3 * w, QImage.Format.Format_RGB888)
            painter.setRenderHint(QPainter.RenderHint.SmoothPixmapTransform, False)
            painter.drawImage(self.rect(), image)
            if self.current is not None:
                x0 = int(self.current * self.width() / self.scores.n_frames)
                x1 = int((self.current + 1) * self.width() / self.scores.n_frames)
                painter.setPen(QPen(QColor(255, 255, 255), 2))
                painter.drawRect(QRect(x0, 1, max(x1 - x0, 2), self.height() - 2))
            painter.setPen(QPen(Qt.GlobalColor.black, 1))
            painter.drawRect(self.rect().adjusted(0, 0, -1, -1))
        finally:
            painter.end()
