"""The memory bank: what is kept, what is forgotten, and that memory stays bounded."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny_network import TinyMatch, iou

from napari_stm.core.engine import PropagationConfig, Propagator, Tracker, confidence
from napari_stm.core.memory import MemoryBank
from napari_stm.core.model import MemoryEntry
from napari_stm.synthetic import make_clip

HW = (2, 3)


def entry(value: float, n: int = 2) -> MemoryEntry:
    """An entry whose every key and value element is ``value`` (so reads show which is where)."""
    return MemoryEntry(
        keys=torch.full((1, 4, *HW), float(value)), values=torch.full((n, 5, *HW), float(value))
    )


def read_values(bank: MemoryBank, current_t: int | None = None) -> list[float]:
    """The value of each memory frame a read sees, in slot order."""
    _, values = bank.tensors(current_t)
    per_frame = values[0, 0].reshape(-1, HW[0] * HW[1])
    return [float(v[0]) for v in per_frame]


# -- MemoryBank ---------------------------------------------------------------------------------
def test_previous_frame_is_replaced_not_appended():
    bank = MemoryBank(max_frames=5)
    bank.add(0, entry(0), "reference")
    bank.add(1, entry(1), "previous")
    bank.add(2, entry(2), "previous")
    assert len(bank) == 2 and bank.kinds() == ["reference", "previous"]
    assert bank.frames("previous") == [2]
    assert read_values(bank) == [0, 2]


def test_entry_numbers_name_contents_that_never_change():
    # What stm-lite keeps per entry (stm_lite._kept_differs) is found by these numbers: an
    # entry rewritten gets a new one, an entry moved in the buffer keeps its own.
    bank = MemoryBank(max_frames=4)
    bank.add(0, entry(0), "reference")
    bank.add(1, entry(1), "previous")
    first = bank.entries()
    bank.add(2, entry(2), "previous")  # the previous slot rewritten in place
    assert bank.entries()[0] == first[0] and bank.entries()[1] != first[1]
    bank.add(3, entry(3), "working")
    moved = bank.entries()[2]
    bank.discard(("previous",))  # frame 3 moves into the freed slot
    assert bank.entries() == (first[0], moved) and read_values(bank) == [0, 3]
    assert len(set(bank.entries())) == len(bank)


def test_promote_previous_keeps_it():
    bank = MemoryBank(max_frames=5)
    bank.add(0, entry(0), "reference")
    bank.add(5, entry(5), "previous")
    bank.promote_previous("working")
    bank.add(6, entry(6), "previous")
    assert bank.kinds() == ["reference", "working", "previous"]
    assert bank.frames() == [0, 5, 6] and read_values(bank) == [0, 5, 6]
    bank.promote_previous("permanent")
    assert bank.frames("permanent") == [6]
    MemoryBank().promote_previous()  # nothing to promote: no error


def test_same_frame_memorised_again_replaces_it():
    bank = MemoryBank(max_frames=4)
    bank.add(3, entry(1), "reference")
    bank.add(3, entry(9), "reference")
    assert bank.frames() == [3] and read_values(bank) == [9]


def test_working_memory_forgets_oldest_first():
    bank = MemoryBank(max_frames=5)  # 1 reference + 1 previous leaves 3 working entries
    bank.add(0, entry(0), "reference")
    bank.add(99, entry(99), "previous")
    for t in range(1, 8):
        bank.add(t, entry(t), "working")
        assert len(bank) <= 5
    assert sorted(bank.frames("working")) == [5, 6, 7]
    assert bank.frames("reference") == [0] and bank.frames("previous") == [99]
    # Promotion makes room the same way.
    bank.add(8, entry(8), "previous")
    bank.promote_previous("working")
    assert sorted(bank.frames("working")) == [6, 7, 8] and len(bank) == 4


def test_reads_are_a_contiguous_prefix_view():
    bank = MemoryBank(max_frames=5)
    bank.add(0, entry(0), "reference")
    for t in range(1, 6):
        bank.add(t, entry(t), "working")
    bank.add(10, entry(10), "previous")
    keys, values = bank.tensors()
    # No copy: the read is a view of the buffer's first len(bank) slots.
    assert keys.data_ptr() == bank._keys.data_ptr()
    assert values.data_ptr() == bank._values.data_ptr()
    assert keys.shape == (1, 4, len(bank) * HW[0] * HW[1])
    assert values.shape == (2, 5, len(bank) * HW[0] * HW[1])
    # Every slot holds the entry of the frame its bookkeeping names.
    assert read_values(bank) == [float(t) for t in bank.frames()]
    assert sorted(bank.frames()) == [0, 3, 4, 5, 10]


def test_discard_forgets_kinds_and_keeps_the_rest_readable():
    bank = MemoryBank(max_frames=6)
    bank.add(0, entry(0), "reference")
    bank.add(1, entry(1), "working")
    bank.add(9, entry(9), "reference")
    bank.add(2, entry(2), "working")
    bank.add(3, entry(3), "previous")
    bank.discard(("working", "previous"))
    assert bank.kinds() == ["reference", "reference"] and read_values(bank) == [0, 9]
    bank.add(4, entry(4), "previous")
    assert read_values(bank) == [0, 9, 4]


def test_references_beyond_the_cap_read_the_nearest():
    bank = MemoryBank(max_frames=4)
    for t in (0, 10, 20, 30, 40, 50):
        bank.add(t, entry(t), "reference")
    bank.add(31, entry(31), "previous")
    assert len(bank) == 7  # every reference stays stored
    seen = read_values(bank, current_t=32)
    assert len(seen) == 4 and sorted(seen) == [20, 30, 31, 40]
    assert sorted(read_values(bank, current_t=3)) == [0, 10, 20, 31]


def test_a_third_reference_takes_no_working_entry_and_pushes_no_reference_out():
    # Corrections are read beside the working memory: a reference used to take a working
    # entry's place, and one added on a full working memory pushed every other reference out
    # of the read until the working memory shrank.
    bank = MemoryBank(max_frames=5)  # the previous frame and two references leave 2 working
    bank.add(0, entry(0), "reference")
    for t in (1, 2, 3):
        bank.add(t, entry(t), "working")
    bank.add(4, entry(4), "previous")
    bank.add(6, entry(6), "reference")
    bank.add(7, entry(7), "reference")
    assert sorted(read_values(bank, current_t=8)) == [0, 1, 2, 3, 4, 6, 7]
    bank.add(8, entry(8), "working")
    assert sorted(bank.frames("working")) == [3, 8]
    assert sorted(read_values(bank, current_t=9)) == [0, 3, 4, 6, 7, 8]


def test_unbounded_bank_grows_and_keeps_everything():
    bank = MemoryBank()
    for t in range(20):
        bank.add(t, entry(t), "permanent")
    assert len(bank) == 20 and read_values(bank) == [float(t) for t in range(20)]
    assert bank.nbytes >= 20 * (4 + 2 * 5) * HW[0] * HW[1] * 4


def test_bank_errors():
    with pytest.raises(ValueError, match="memory is empty"):
        MemoryBank().tensors()
    with pytest.raises(ValueError, match="at least 2"):
        MemoryBank(max_frames=1)
    bank = MemoryBank(max_frames=3)
    bank.add(0, entry(0), "reference")
    with pytest.raises(ValueError, match="does not match the bank"):
        bank.add(1, entry(1, n=3), "previous")


def test_storage_dtype():
    bank = MemoryBank(max_frames=3, storage_dtype=torch.float16)
    bank.add(0, entry(0.5), "reference")
    keys, values = bank.tensors()
    assert keys.dtype == values.dtype == torch.float16 and float(values.max()) == 0.5


# -- confidence gate ----------------------------------------------------------------------------
def test_confidence_score():
    certain = torch.zeros(3, 8, 8)
    certain[0], certain[1, :4] = 1, 1
    certain[0, :4] = 0
    assert confidence(certain) == 1.0
    assert confidence(torch.full((3, 8, 8), 1 / 3)) == 0.0
    half = certain.clone()
    half[:, :2] = torch.tensor([0.5, 0.5, 0.0])[:, None, None]  # half the object is unsure
    assert confidence(half) == pytest.approx(0.5)


def _tracker(model: TinyMatch, **kw) -> tuple[Tracker, np.ndarray, np.ndarray]:
    frames, labels = make_clip(n_frames=6, height=32, width=48, seed=1, occlusion=False)
    tr = Tracker(model, PropagationConfig(device="cpu", **kw))
    tr.step(frames[0], labels[0])
    return tr, frames, labels


def _at_network(tr: Tracker, frame: np.ndarray, labels: np.ndarray) -> tuple[torch.Tensor, ...]:
    """A frame [1, 3, Hp, Wp] and its labels [Hp, Wp] as the tracker's network sees them."""
    image = torch.from_numpy(frame / np.float32(255)).permute(2, 0, 1)[None]
    image = torch.nn.functional.pad(image, tr.geo.pad)
    return image, torch.nn.functional.pad(torch.from_numpy(labels).long(), tr.geo.pad)


def test_confidence_gate_keeps_uncertain_frames_out(tiny_model):
    tr, frames, labels = _tracker(tiny_model, mem_every=1, confidence_gate=0.7)
    image, lab = _at_network(tr, frames[1], labels[1])
    certain = torch.stack([lab == k for k in (0, 1, 2)]).float()
    # Unsure on the objects only (half object, half background): unsure over the whole frame
    # would also spread each object's mass across it, which the spill rule keeps out anyway.
    unsure = torch.stack([(lab == 0) + (lab > 0) / 2, (lab == 1) / 2, (lab == 2) / 2]).float()
    assert torch.allclose(unsure.sum(0), torch.ones_like(unsure[0]))
    assert confidence(certain) == 1.0 and confidence(unsure) == 0.0
    with torch.inference_mode():
        query = tr.segment(1, image).query
        tr.remember(1, image, unsure, query)
        tr.segment(2, image)  # the pending frame is written before this read
        assert tr.bank.frames("working") == []
        assert tr.bank.frames("previous") == [1]  # still the previous frame, just not kept
        tr.remember(2, image, certain, query)
        tr.segment(3, image)
        assert tr.bank.frames("working") == [2] and tr.bank.frames("previous") == []


def test_a_read_without_the_previous_frame_still_sees_the_kept_ones(tiny_model):
    # segment(previous=False), the backward side of a long stretch (plan.Pass.reads_previous):
    # the frame waiting to enter memory goes in only if the policy keeps it, as working
    # memory; one that would only have been the previous frame is dropped, and so is an
    # older previous-frame entry.
    tr, frames, labels = _tracker(tiny_model, mem_every=2, confidence_gate=0.0)
    with torch.inference_mode():
        for t in (1, 2, 3, 4):
            image, _ = _at_network(tr, frames[t], labels[t])
            out = tr.segment(t, image)
            tr.remember(t, image, out.probs, out.query)
        # Frame 2 is working memory, 3 the previous frame, 4 (kept) waits to enter.
        assert tr.bank.frames("working") == [2] and tr.bank.frames("previous") == [3]
        image, _ = _at_network(tr, frames[5], labels[5])
        out = tr.segment(5, image, previous=False)
        assert out.read.times is not None and sorted(out.read.times) == [0, 2, 4]
        assert tr.bank.frames("working") == [2, 4] and tr.bank.frames("previous") == []
        tr.remember(5, image, out.probs, out.query)  # not kept: only a previous frame
        out = tr.segment(6, image, previous=False)
        assert out.read.times is not None and sorted(out.read.times) == [0, 2, 4]
        assert tr.bank.frames("previous") == [] and tr._pending is None


def test_gate_zero_keeps_everything(tiny_model):
    tr, frames, _ = _tracker(tiny_model, mem_every=1, confidence_gate=0.0)
    for t in range(1, 5):
        tr.step(frames[t])
    tr.step(frames[5])
    assert sorted(tr.bank.frames("working")) == [1, 2, 3, 4]


# -- bounded and official schedules on real propagation -----------------------------------------
class MemoryCounter(TinyMatch):
    """Records how many memory frames each read sees."""

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[int] = []

    def segment(self, query, mem_keys, mem_values, top_k=None):
        h, w = query.key.shape[-2:]
        self.reads.append(mem_keys.shape[-1] // (h * w))
        return super().segment(query, mem_keys, mem_values, top_k)


def test_memory_stays_bounded_on_500_frames():
    model = MemoryCounter()
    frames, labels = make_clip(n_frames=500, height=64, width=64, seed=1, occlusion=False)
    # No confidence gate, so the working memory fills and must forget (the gate is tested above).
    cfg = PropagationConfig(device="cpu", max_memory=6, mem_every=2, confidence_gate=0.0)
    tr = Tracker(model, cfg)
    tr.step(frames[0], labels[0])
    counts, bank_bytes, total_bytes, scores = [], [], [], []
    for t in range(1, 500):
        lab, probs = tr.step(frames[t])
        counts.append(tr.memory_frames)
        bank_bytes.append(tr.bank.nbytes)
        total_bytes.append(tr.memory_nbytes)
        if t % 50 == 0:
            scores.append(round(float(np.mean([iou(lab == k, labels[t] == k) for k in (1, 2)])), 3))
    print(f"500 frames: most memory frames {max(counts)}, reads {max(model.reads)}")
    print(f"  IoU every 50 frames {scores}")
    assert max(counts) == 6 and max(model.reads) == 6
    assert len(model.reads) == 499
    assert len(set(bank_bytes)) == 1  # preallocated once, never grown
    assert max(total_bytes[250:]) == max(total_bytes[:50])  # flat once the memory is full
    assert min(scores) > 0.7  # and it still tracks at the end

    # The same bound through the Propagator, both directions.
    model.reads.clear()
    prop = Propagator(model, frames, cfg)
    prop.add_reference(250, labels[250])
    assert sum(1 for _ in prop.propagate("both")) == 500
    assert len(model.reads) == 499 and max(model.reads) == 6


def test_official_memory_grows_every_fifth_frame():
    model = MemoryCounter()
    frames, labels = make_clip(n_frames=17, height=32, width=32, seed=0)
    prop = Propagator(model, frames, PropagationConfig(device="cpu", memory="official"))
    prop.add_reference(0, labels[0])
    list(prop.propagate("forward"))
    # Frame t reads frames 0, 5, 10, ... before t - 1, and t - 1 itself (the paper's schedule).
    want = [len({0, t - 1} | set(range(0, t - 1, 5))) for t in range(1, 17)]
    assert want == [1, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 4, 4, 4, 4, 4]
    assert model.reads == want

    tr = Tracker(model, PropagationConfig(device="cpu", memory="official"))
    tr.step(frames[0], labels[0])
    for t in range(1, 17):
        tr.step(frames[t])
    assert tr.bank.frames("permanent") == [5, 10, 15] and tr.bank.max_frames is None


def test_bounded_schedule_keeps_references_and_recent_frames(tiny_model):
    frames, labels = make_clip(n_frames=30, height=64, width=96, seed=2, occlusion=False)
    tr = Tracker(tiny_model, PropagationConfig(device="cpu", max_memory=4, mem_every=5))
    tr.step(frames[0], labels[0])
    for t in range(1, 30):
        tr.step(frames[t])
    # Reference 0, the two newest confident every-5th frames, and the previous frame 28.
    assert tr.bank.frames("reference") == [0]
    assert sorted(tr.bank.frames("working")) == [20, 25]
    assert tr.bank.frames("previous") == [28]
    assert tr.memory_frames == 4  # frame 29 is pending and will replace 28


def test_a_frame_where_the_objects_vanished_stays_out_of_memory(tiny_model):
    # A lost object's frame shows it as background; memorised, later reads would learn that.
    tr, frames, labels = _tracker(tiny_model, mem_every=1, confidence_gate=0.0)
    image, lab = _at_network(tr, frames[1], labels[1])
    found = torch.stack([lab == k for k in (0, 1, 2)]).float()
    one_gone = torch.stack([(lab == 0) | (lab == 1), torch.zeros_like(lab), lab == 2]).float()
    all_gone = torch.stack([lab >= 0, lab < 0, lab < 0]).float()  # background everywhere
    with torch.inference_mode():
        query = tr.segment(1, image).query
        tr.remember(1, image, found, query)
        tr.segment(2, image)
        assert tr.bank.frames("working") == [1]
        tr.remember(2, image, all_gone, query)
        tr.segment(3, image)
        # Neither kept nor the previous frame: the next read still sees frame 1 as the last.
        assert tr.bank.frames() == [0, 1] and tr.bank.frames("previous") == []
        tr.remember(3, image, one_gone, query)  # one of two lost: the other's memory goes on
        tr.segment(4, image)
        assert tr.bank.frames("working") == [1, 3]
    # The rule survives a saved and loaded session.
    state = tr.state_dict()
    again = Tracker(tiny_model, PropagationConfig(device="cpu", mem_every=1, confidence_gate=0.0))
    again.load_state_dict(state)
    with torch.inference_mode():
        again.segment(4, image)
        again.remember(4, image, all_gone, query)
        again.segment(5, image)
    assert again.bank.frames() == tr.bank.frames()


def test_a_frame_where_the_objects_spilled_stays_out_of_memory(tiny_model):
    # While an object hides its mask can spill onto the background; memorised, the background
    # would become the object for every later read.
    tr, frames, labels = _tracker(tiny_model, mem_every=1, confidence_gate=0.0)
    image, lab = _at_network(tr, frames[1], labels[1])
    bg, one, two = (lab == 0).float(), (lab == 1).float(), (lab == 2).float()
    found = torch.stack([bg, one, two])
    all_spilled = torch.stack([0 * bg, one + bg / 2, two + bg / 2])
    one_spilled = torch.stack([0 * bg, one + bg, two])
    area = found[1:].sum((1, 2))
    assert bool((all_spilled[1:].sum((1, 2)) > 2 * area).all())  # each more than doubles
    with torch.inference_mode():
        query = tr.segment(1, image).query
        tr.remember(1, image, found, query)
        tr.segment(2, image)
        tr.remember(2, image, all_spilled, query)
        tr.segment(3, image)
        assert tr.bank.frames() == [0, 1] and tr.bank.frames("previous") == []
        tr.remember(3, image, one_spilled, query)  # one of two spilled: memorised
        tr.segment(4, image)
        assert tr.bank.frames("working") == [1, 3]
        # Growth is measured from the last frame memorised: frame 3's object 1, so the same
        # spill is no jump now, while object 2 growing 1.5x is within what objects do.
        grown = torch.stack([0 * bg, one + bg, two * 1.5])
        tr.remember(4, image, grown, query)
        tr.segment(5, image)
        assert tr.bank.frames("working") == [1, 3, 4]
    # The rule survives a saved and loaded session.
    again = Tracker(tiny_model, PropagationConfig(device="cpu", mem_every=1, confidence_gate=0.0))
    again.load_state_dict(tr.state_dict())
    with torch.inference_mode():
        again.segment(5, image)
        again.remember(5, image, torch.stack([0 * bg, one + bg, two * 4]), query)
        again.segment(6, image)
    assert again.bank.frames() == tr.bank.frames() + [5]  # one of two: memorised
    with torch.inference_mode():
        again.remember(6, image, torch.stack([0 * bg, (one + bg) * 3, two * 12]), query)
        again.segment(7, image)
    assert 6 not in again.bank.frames()


def test_official_policy_memorises_frames_without_objects(tiny_model):
    tr, frames, labels = _tracker(tiny_model, memory="official", mem_every=1)
    image, lab = _at_network(tr, frames[1], labels[1])
    all_gone = torch.stack([lab >= 0, lab < 0, lab < 0]).float()  # background everywhere
    with torch.inference_mode():
        query = tr.segment(1, image).query
        tr.remember(1, image, all_gone, query)
        tr.segment(2, image)
    assert 1 in tr.bank.frames()
