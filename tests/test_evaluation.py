"""DAVIS evaluation protocol on tiny hand-made sequences with hand-computed J and F.

Frames are 64x64, so the boundary tolerance is 1 pixel: a mask edge moved by one column
still has F = 1, moved by two it has F = 0.
"""

from __future__ import annotations

import numpy as np
import pytest

from napari_stm.core.errors import InputError
from napari_stm.evaluation import (
    GLOBAL_COLUMNS,
    add_arguments,
    evaluate,
    find_sequences,
    main,
)
from napari_stm.io import write_palette_png

SIZE = 64


def left(width: int, obj: int = 1) -> np.ndarray:
    labels = np.zeros((SIZE, SIZE), np.uint8)
    labels[:, :width] = obj
    return labels


def empty() -> np.ndarray:
    return np.zeros((SIZE, SIZE), np.uint8)


def write_seq(folder, frames: dict[int, np.ndarray]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for t, labels in frames.items():
        write_palette_png(folder / f"{t:05d}.png", labels)


def alpha(gt_dir, pred_dir) -> None:
    """One object; scored frames 1..3 have J = [32/33, 16/17, 1], F = [1, 0, 1]."""
    write_seq(gt_dir, {t: left(32) for t in range(5)})
    write_seq(pred_dir, {0: empty(), 1: left(33), 2: left(34), 3: left(32), 4: empty()})


ALPHA_J = [32 / 33, 16 / 17, 1.0]
ALPHA_F = [1.0, 0.0, 1.0]


def test_single_sequence_folder_and_statistics(tmp_path):
    alpha(tmp_path / "gt", tmp_path / "pred")
    result = evaluate(tmp_path / "pred", tmp_path / "gt")
    (obj,) = result.objects
    assert (obj.sequence, obj.object_id, obj.frames) == ("gt", 1, ["00001", "00002", "00003"])
    np.testing.assert_allclose(obj.j, ALPHA_J)
    np.testing.assert_allclose(obj.f, ALPHA_F)
    scores = result.global_scores
    assert scores["J-Mean"] == pytest.approx(np.mean(ALPHA_J))
    assert scores["F-Mean"] == pytest.approx(2 / 3)
    assert scores["J&F-Mean"] == pytest.approx((np.mean(ALPHA_J) + 2 / 3) / 2)
    assert scores["J-Recall"] == 1.0 and scores["F-Recall"] == pytest.approx(2 / 3)
    # 3 frames: decay bins are frames 0..1 and frame 2.
    assert scores["J-Decay"] == pytest.approx((32 / 33 + 16 / 17) / 2 - 1)
    assert scores["F-Decay"] == pytest.approx(-0.5)


def test_all_frames_keeps_first_and_last(tmp_path):
    alpha(tmp_path / "seq" / "Annotations", tmp_path / "pred")
    result = evaluate(tmp_path / "pred", tmp_path / "seq", all_frames=True)
    (obj,) = result.objects
    assert obj.sequence == "seq" and len(obj.frames) == 5
    np.testing.assert_allclose(obj.j, [0.0, *ALPHA_J, 0.0])  # empty predictions on 0 and 4


def test_late_object_scored_from_its_first_frame(tmp_path):
    square = np.zeros((SIZE, SIZE), np.uint8)
    square[40:50, 40:50] = 2
    gt = {}
    for t in range(6):
        gt[t] = left(20)
        if t in (2, 3, 5):  # object 2 enters at frame 2, is hidden at frame 4
            gt[t] = np.maximum(gt[t], square)
    pred = {t: left(20) for t in range(6)}
    pred[2] = gt[2]  # found where it appears, missed at frame 3, correctly absent at frame 4
    write_seq(tmp_path / "gt" / "beta" / "Annotations", gt)
    write_seq(tmp_path / "pred" / "beta", pred)
    result = evaluate(tmp_path / "pred", tmp_path / "gt")
    one, two = result.objects
    assert one.frames == ["00001", "00002", "00003", "00004"]
    np.testing.assert_allclose(one.j, 1.0)
    assert two.frames == ["00002", "00003", "00004"]
    np.testing.assert_allclose(two.j, [1.0, 0.0, 1.0])  # absent in both: counts 1
    np.testing.assert_allclose(two.f, [1.0, 0.0, 1.0])
    assert result.sequences["beta"]["J-Mean"] == pytest.approx((1 + 2 / 3) / 2)


def test_sparse_ground_truth_scores_only_annotated_frames(tmp_path):
    write_seq(tmp_path / "gt" / "gamma", {t: left(32) for t in (0, 5, 10, 15)})
    pred = {t: left(5) for t in range(16)}  # wrong everywhere except...
    pred[5] = left(32)
    pred[10] = empty()
    write_seq(tmp_path / "pred" / "gamma", pred)
    (obj,) = evaluate(tmp_path / "pred", tmp_path / "gt").objects
    assert obj.frames == ["00005", "00010"]
    np.testing.assert_allclose(obj.j, [1.0, 0.0])


def test_davis_official_layout_and_csv(tmp_path):
    gt_root = tmp_path / "DAVIS" / "Annotations" / "480p"
    alpha(gt_root / "alpha", tmp_path / "pred" / "alpha")
    write_seq(gt_root / "beta", {t: left(10, obj=3) for t in range(4)})
    write_seq(tmp_path / "pred" / "beta", {t: left(10, obj=3) for t in range(4)})
    assert list(find_sequences(tmp_path / "DAVIS")) == ["alpha", "beta"]
    result = evaluate(tmp_path / "pred", tmp_path / "DAVIS", csv_dir=tmp_path / "csv")
    assert [o.name for o in result.objects] == ["alpha_1", "beta_3"]
    # Global means are over objects: (alpha J-Mean + 1) / 2.
    j_mean = (np.mean(ALPHA_J) + 1) / 2
    f_mean = (2 / 3 + 1) / 2
    assert result.global_scores["J-Mean"] == pytest.approx(j_mean)
    global_csv = (tmp_path / "csv" / "global_results-val.csv").read_text().splitlines()
    assert global_csv[0] == "J&F-Mean,J-Mean,J-Recall,J-Decay,F-Mean,F-Recall,F-Decay"
    assert global_csv[1].split(",")[:2] == [f"{(j_mean + f_mean) / 2:.3f}", f"{j_mean:.3f}"]
    assert len(global_csv) == 2 and len(global_csv[1].split(",")) == len(GLOBAL_COLUMNS)
    seq_csv = (tmp_path / "csv" / "per-sequence_results-val.csv").read_text().splitlines()
    assert seq_csv == [
        "Sequence,J-Mean,F-Mean",
        f"alpha_1,{np.mean(ALPHA_J):.3f},0.667",
        "beta_3,1.000,1.000",
    ]


def test_errors_name_sequence_and_frame(tmp_path):
    alpha(tmp_path / "gt" / "alpha", tmp_path / "pred" / "alpha")
    (tmp_path / "pred" / "alpha" / "00002.png").unlink()
    with pytest.raises(InputError, match=r"sequence 'alpha'.*frame '00002'"):
        evaluate(tmp_path / "pred", tmp_path / "gt")
    write_palette_png(tmp_path / "pred" / "alpha" / "00002.png", left(32, obj=4))
    with pytest.raises(InputError, match=r"'alpha', frame '00002'.*object id\(s\) \[4\]"):
        evaluate(tmp_path / "pred", tmp_path / "gt")
    write_palette_png(tmp_path / "pred" / "alpha" / "00002.png", np.zeros((32, 32), np.uint8))
    with pytest.raises(InputError, match="32x32 but the ground truth is 64x64"):
        evaluate(tmp_path / "pred", tmp_path / "gt")
    write_seq(tmp_path / "gt" / "delta", {t: left(32) for t in range(3)})
    with pytest.raises(InputError, match="no predictions for sequence 'delta'"):
        evaluate(tmp_path / "pred", tmp_path / "gt", sequences=["delta"])
    with pytest.raises(InputError, match="does not exist"):
        evaluate(tmp_path / "pred", tmp_path / "no_such_gt")
    (tmp_path / "blank").mkdir()
    with pytest.raises(InputError, match="no ground-truth label images"):
        evaluate(tmp_path / "pred", tmp_path / "blank")


def test_command_line(tmp_path, capsys):
    import argparse

    alpha(tmp_path / "gt" / "alpha", tmp_path / "pred" / "alpha")
    parser = add_arguments(argparse.ArgumentParser())
    args = parser.parse_args([str(tmp_path / "pred"), str(tmp_path / "gt"), "--all-frames"])
    assert args.all_frames and args.csv is None
    code = main([str(tmp_path / "pred"), str(tmp_path / "gt"), "--csv", str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert code == 0
    assert "alpha" in out and "J&F-Mean" in out and "F-Decay" in out
    assert (tmp_path / "out" / "per-sequence_results-val.csv").is_file()
    assert main([str(tmp_path / "pred"), str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
