"""Windows around small objects (core/crops.py) and stm-lite's per-object convolutions on them:
the same answer as on the whole frame, within the stated tolerance, and the exact network when
an object fills the frame."""

from __future__ import annotations

import pytest
import torch

from napari_stm.core import crops, readout, stm_lite
from napari_stm.core.readout import ObjectPriors, motion_prior, soft_aggregate
from napari_stm.core.stm_lite import STMLite

H, W = 256, 384  # a 16 x 24 grid of stride-16 cells


def test_one_object_is_never_cropped():
    # its window plus the shared background would cost more than the whole frame
    maps = torch.zeros(1, 16, 24)
    maps[0, 2, 3] = 1
    plan = crops.plan_crops(maps, threshold=0.5, reach=2, context=2, max_share=0.5)
    assert plan.full == [0] and not plan.cropped


def test_plan_windows_hold_their_core_and_group_by_size():
    maps = torch.zeros(4, 16, 24)
    maps[0, 2, 3] = 1  # small, near the corner
    maps[1, 10:12, 15:17] = 1  # small, inside
    maps[2] = 1  # fills the grid
    plan = crops.plan_crops(maps, threshold=0.5, reach=2, context=2, max_share=0.5)
    assert plan.full == [2]
    assert plan.absent == [3]
    grouped = {i: (g, j) for g in plan.groups for j, i in enumerate(g.objects)}
    assert set(grouped) == {0, 1}
    for g, j in grouped.values():
        core, window = g.cores[j], g.windows[j]
        assert window.size == g.windows[0].size  # one batch: one size
        assert window.top <= core.top and core.bottom <= window.bottom
        assert window.left <= core.left and core.right <= window.right
        assert 0 <= window.top and window.bottom <= 16 and 0 <= window.left and window.right <= 24
    g, j = grouped[0]
    assert g.cores[j] == crops.Box(0, 5, 1, 6)  # clipped at the top edge, grown by 2 elsewhere
    g, j = grouped[1]
    assert g.cores[j] == crops.Box(8, 14, 13, 19)


def test_gather_and_paste_are_inverse_on_the_core():
    maps = torch.zeros(2, 16, 16)
    maps[0, 5, 6] = 1
    maps[1, 12, 2] = 1
    plan = crops.plan_crops(maps, threshold=0.5, reach=1, context=1, max_share=1)
    group = plan.groups[0]
    x = torch.randn(2, 3, 64, 64)
    out = torch.zeros(2, 3, 64, 64)
    crops.paste(out, group.objects, crops.gather(x[group.objects], group.windows, 4), group, 4)
    for i, core in zip(group.objects, group.cores, strict=True):
        rows, cols = core.scaled(4)
        assert torch.equal(out[i, :, rows, cols], x[i, :, rows, cols])
        assert out[i].count_nonzero() == x[i, :, rows, cols].numel()  # nothing else written


@pytest.fixture(scope="module")
def net() -> STMLite:
    torch.manual_seed(0)
    model = STMLite(pretrained=True).eval()
    # A freshly made decoder's prediction is zero (it starts from the read-out's soft mask);
    # random weights make its refinement, the part computed on windows, count.
    torch.nn.init.normal_(model.decoder.pred.weight, std=0.05)
    return model


def _scene(offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3 + offset)
    image = torch.rand(1, 3, H, W, generator=g) * 0.3
    masks = torch.zeros(3, H, W)
    for k, (y, x) in enumerate([(40, 50), (180, 300), (100, 200)]):
        y, x = y + offset, x + offset
        masks[k, y : y + 20, x : x + 24] = 1
        image[0, k, y : y + 20, x : x + 24] += 0.6
    return image, masks


def _run(net: STMLite, share: float) -> tuple[torch.Tensor, torch.Tensor]:
    net.crop_share = share
    try:
        image0, masks0 = _scene()
        image1, _ = _scene(offset=4)
        with torch.inference_mode():
            memory = net.encode_memory(image0, masks0)
            query = net.encode_query(image1)
            prior = motion_prior(torch.tensor([1]), (H // 16, W // 16), 0.05)
            keys, values = memory.keys.flatten(2), memory.values.flatten(2)
            probs = net.segment(query, keys, values, None, prior)
    finally:
        net.crop_share = STMLite.crop_share
    return memory.values, probs


def test_windows_give_the_whole_frame_answer_for_small_objects(net, monkeypatch):
    planned = []
    plan_crops = crops.plan_crops
    monkeypatch.setattr(
        crops, "plan_crops", lambda *a: planned.append(plan_crops(*a)) or planned[-1]
    )
    values_full, probs_full = _run(net, 0.0)
    assert not planned  # crop_share 0: the exact network, no windows
    values, probs = _run(net, 0.5)
    assert len(planned) == 2 and all(p.groups and not p.full for p in planned)
    # Value encoding: exact up to float rounding (outside its window an object's values are
    # the background encoding, which is what the whole frame computes there).
    assert torch.allclose(values, values_full, atol=1e-4, rtol=1e-4)
    # Decoding: cores exact; outside them the shared background read stands for each
    # object's own (the stated tolerance).
    assert (probs - probs_full).abs().max() < 0.05
    labels = soft_aggregate(probs).argmax(0)
    labels_full = soft_aggregate(probs_full).argmax(0)
    assert (labels == labels_full).float().mean() > 0.999


@pytest.mark.parametrize("objects", [1, 2])
def test_objects_filling_the_frame_run_the_whole_frame_network(net, objects):
    image = torch.rand(1, 3, H, W, generator=torch.Generator().manual_seed(1))
    masks = torch.zeros(2, H, W)
    masks[0, 16:-16, 16:-16] = 1
    masks[1, 100:] = 1
    masks = masks[:objects]
    results = []
    for share in (0.0, 0.5):
        net.crop_share = share
        with torch.inference_mode():
            memory = net.encode_memory(image, masks)
            query = net.encode_query(image)
            probs = net.segment(query, memory.keys.flatten(2), memory.values.flatten(2))
        results.append((memory.values, probs))
    net.crop_share = STMLite.crop_share
    (values_full, probs_full), (values, probs) = results
    if objects == 1:  # one object: never windows, the very same computation
        assert torch.equal(values, values_full) and torch.equal(probs, probs_full)
    else:  # the same read, its weights kept whole first: equal up to float rounding
        assert torch.equal(values, values_full)
        assert torch.allclose(probs, probs_full, atol=1e-5)


def test_independent_objects_encode_as_each_alone(net):
    # groups: the objects of independent trackers (CVAT's one-object trackers of one request)
    # in one memory-encoder call; each sees no other object, as alone.
    image, masks = _scene()
    with torch.inference_mode():
        alone = torch.cat([net.encode_memory(image, masks[k : k + 1]).values for k in range(3)])
        apart = net.encode_memory(image, masks, groups=3).values  # windows: 3 small objects
        assert torch.allclose(apart, alone, atol=1e-4, rtol=1e-4)
        pairs = torch.cat([masks, masks.flip(0)])  # two trackers of three objects each
        together = net.encode_memory(image, pairs, groups=2).values
        assert torch.allclose(together[:3], net.encode_memory(image, masks).values, atol=1e-4)
        assert torch.allclose(
            together[3:], net.encode_memory(image, masks.flip(0)).values, atol=1e-4
        )


def test_a_frames_own_maps_are_computed_once_across_calls(net):
    # The decoder's skips and the value encoder's stem and empty background depend on the
    # frame only: the calls of a large request on one frame (bounded calls, trackers whose
    # reads differ) compute them once, kept on the query features, and get the same maps.
    image0, masks0 = _scene()
    image1, masks1 = _scene(offset=4)
    ran: list[str] = []
    modules = {
        "skip8": net.decoder.RF3.convFS,
        "skip4": net.decoder.RF2.convFS,
        "stem": net.value_encoder.stem_image,
        "values": net.value_encoder,
    }
    hooks = [
        m.register_forward_hook(lambda *_, name=name: ran.append(name))
        for name, m in modules.items()
    ]
    try:
        with torch.inference_mode():
            memory = net.encode_memory(image0, masks0)
            keys, values = memory.keys.flatten(2), memory.values.flatten(2)
            prior = motion_prior(torch.tensor([1]), (H // 16, W // 16), 0.05)
            query = net.encode_query(image1)
            ran.clear()
            first = net.segment(query, keys, values, None, prior)
            assert ran.count("skip8") == ran.count("skip4") == 1
            ran.clear()
            net.segment(query, keys, values[:2], None, prior)
            assert "skip8" not in ran and "skip4" not in ran
            fresh = net.segment(net.encode_query(image1), keys, values, None, prior)
            assert torch.equal(first, fresh)

            ran.clear()
            apart = net.encode_memory(image1, masks1, query, groups=3).values
            runs = ran.count("values")
            assert ran.count("stem") == 1
            ran.clear()
            twice = net.encode_memory(image1, masks1, query, groups=3).values
            assert "stem" not in ran and ran.count("values") == runs - 1  # no background
            alone = net.encode_memory(image1, masks1, net.encode_query(image1), groups=3)
            assert torch.equal(apart, twice) and torch.equal(apart, alone.values)
        # Training differentiates every call: nothing is kept then.
        memory = net.encode_memory(image0, masks0)
        query = net.encode_query(image1)
        kept = set(query.extra)
        net.segment(query, memory.keys.flatten(2), memory.values.flatten(2), None, prior)
        assert set(query.extra) == kept
    finally:
        for h in hooks:
            h.remove()


def test_objects_with_their_own_motion_prior_read_in_one_call(net):
    # ObjectPriors: the one-object trackers of a CVAT request whose measured motion differs
    # read in one call, each object with its own prior.
    image0, masks0 = _scene()
    image1, _ = _scene(offset=4)
    grid = (H // 16, W // 16)
    slow, fast = (motion_prior(torch.tensor([1]), grid, s) for s in (0.05, 0.15))
    mixed = ObjectPriors((slow, fast), (0, 1, 0))  # object 1 moves faster
    try:
        with torch.inference_mode():
            memory = net.encode_memory(image0, masks0)
            keys, values = memory.keys.flatten(2), memory.values.flatten(2)
            query = net.encode_query(image1)
            net.crop_share = 0.0  # the exact network: each object as read with its own prior
            got = net.segment(query, keys, values, None, mixed)
            alone = [
                net.segment(query, keys, values[i : i + 1], None, own)[0]
                for i, own in enumerate((slow, fast, slow))
            ]
            assert torch.allclose(got, torch.stack(alone), atol=1e-5)
            net.crop_share = 0.5  # windows
            got = net.segment(query, keys, values, None, mixed)
            as_slow = net.segment(query, keys, values, None, slow)
            as_fast = net.segment(query, keys, values, None, fast)
    finally:
        net.crop_share = STMLite.crop_share
    # The objects of the prior most objects have: as if every object had it.
    assert torch.allclose(got[[0, 2]], as_slow[[0, 2]], atol=1e-5)
    # The other: its own read and decoding on its window (where it is: the same), the
    # background decoded with the main prior outside it (within the windows' tolerance).
    on = as_fast[1] > 0.5
    assert on.any() and torch.allclose(got[1][on], as_fast[1][on], atol=1e-5)
    assert (got[1] - torch.stack(alone)[1]).abs().max() < 0.05


def test_calls_reading_one_memory_decode_its_background_once(net):
    # The bounded calls of a large CVAT request read the same memory: the background read
    # their objects share outside their windows is the same to float rounding and is decoded
    # for the first call only (kept on the query features); another memory decodes its own.
    image0, masks0 = _scene()
    image1, masks1 = _scene(offset=4)
    decoded: list = []  # whole-frame decodes: the decoder's stride-16 block on the whole grid
    grid = (H // 16, W // 16)
    hook = net.decoder.ResMM.register_forward_hook(
        lambda _m, _i, out: decoded.append(out.shape[0]) if out.shape[-2:] == grid else None
    )
    try:
        with torch.inference_mode():
            prior = motion_prior(torch.tensor([1]), grid, 0.05)

            def memory(image, masks):  # three one-object trackers' memories
                entry = net.encode_memory(image, masks, groups=3)
                return entry.keys.flatten(2), entry.values.flatten(2)

            keys, values = memory(image0, masks0)
            query = net.encode_query(image1)
            net.segment(query, keys, values[:2], None, prior)
            assert decoded == [1]
            decoded.clear()
            second = net.segment(query, keys, values[1:], None, prior)
            assert decoded == []
            alone = net.segment(net.encode_query(image1), keys, values[1:], None, prior)
            assert (second - alone).abs().max() < 1e-5
            decoded.clear()
            other_keys, other_values = memory(image1, masks1)
            net.segment(query, other_keys, other_values[1:], None, prior)
            assert decoded == [1]
    finally:
        hook.remove()


def test_one_prior_with_entries_reads_as_the_plain_prior_bit_for_bit(net):
    # The trackers of one memory with one shared prior (tracker.SHARED_PRIOR) pass it as
    # ObjectPriors of one prior, only so that stm-lite keeps what it derives from their
    # memory entries (_kept_differs): the plain prior's read, bit for bit, first call and
    # again from what was kept.
    image0, masks0 = _scene()
    image1, _ = _scene(offset=4)
    prior = motion_prior(torch.tensor([1]), (H // 16, W // 16), 0.05)
    kept: dict = {}
    entries = tuple(((kept, (i, 7)),) for i in range(3))  # one memory frame, entry 7
    one = ObjectPriors((prior,), (0, 0, 0), entries=entries)
    with torch.inference_mode():
        memory = net.encode_memory(image0, masks0, groups=3)
        keys, values = memory.keys.flatten(2), memory.values.flatten(2)
        want = net.segment(net.encode_query(image1), keys, values, None, prior)
        first = net.segment(net.encode_query(image1), keys, values, None, one)
        assert kept  # the differences were kept with the entries
        again = net.segment(net.encode_query(image1), keys, values, None, one)
    assert torch.equal(first, want) and torch.equal(again, want)


@pytest.mark.parametrize("mixed", [False, True])
def test_windows_read_sparsely_as_densely(net, monkeypatch, mixed):
    # Each window reads only the memory positions where its object's values differ from the
    # background's (readout.window_read); reading every position gives the same answer.
    image0, masks0 = _scene()
    image1, _ = _scene(offset=4)
    grid = (H // 16, W // 16)
    slow, fast = (motion_prior(torch.tensor([1]), grid, s) for s in (0.05, 0.15))
    prior = ObjectPriors((slow, fast), (0, 1, 0)) if mixed else slow
    sparse = readout.window_read
    sizes: list[tuple[int, int]] = []

    def dense(
        weights, owner, rows, values, objects, background, background_read, differs, cols, at
    ):
        sizes.append((int(differs[objects].sum(dim=1).max()), values.shape[-1]))
        if cols is None:
            w = weights[owner[:, None], rows]
        else:  # each set's rows, each over its own memory positions (window g's: at[g])
            w = weights[at[:, :, None], cols[owner][:, None, :]]
        return torch.bmm(w, values[objects].transpose(1, 2))

    with torch.inference_mode():
        memory = net.encode_memory(image0, masks0, groups=3)  # three one-object trackers
        keys, values = memory.keys.flatten(2), memory.values.flatten(2)
        got = net.segment(net.encode_query(image1), keys, values, None, prior)
        monkeypatch.setattr(readout, "window_read", dense)
        want = net.segment(net.encode_query(image1), keys, values, None, prior)
    assert sparse is not readout.window_read and sizes  # the windows ran, and read densely
    assert all(0 < s < m / 4 for s, m in sizes)  # a few of the memory positions differ
    assert torch.allclose(got, want, atol=1e-5)


@pytest.mark.parametrize(("share", "one_background"), [(0.0, True), (0.5, False), (0.5, True)])
def test_objects_over_different_memories_read_in_one_call(net, monkeypatch, share, one_background):
    # ObjectPriors.frames: one-object trackers whose memories diverged (a CVAT request's
    # trackers admit frames by their own confidence) read in one call over the union of
    # their memory frames, each object from its own frames with its own prior; each equals
    # the call of its own memory (the windows too: their reads are exact, and without
    # ONE_BACKGROUND each memory decodes its own background). With ONE_BACKGROUND the call
    # decodes only its most held memory's background: those objects still equal their own
    # memory's call, the others do on their window (where they are) and within the windows'
    # tolerance outside it.
    monkeypatch.setattr(stm_lite, "ONE_BACKGROUND", one_background)
    image0, masks0 = _scene()
    image_mid, masks_mid = _scene(offset=2)
    image1, _ = _scene(offset=4)
    grid = (H // 16, W // 16)
    cells = grid[0] * grid[1]
    decoded: list = []  # whole-frame decodes: the decoder's stride-16 block on the whole grid
    hook = net.decoder.ResMM.register_forward_hook(
        lambda _m, _i, out: decoded.append(out.shape[0]) if out.shape[-2:] == grid else None
    )
    net.crop_share = share
    try:
        with torch.inference_mode():
            first = net.encode_memory(image0, masks0, groups=3)
            mid = net.encode_memory(image_mid, masks_mid, groups=3)
            keys_a, values_a = first.keys.flatten(2), first.values.flatten(2)
            keys_b = torch.cat([keys_a, mid.keys.flatten(2)], dim=-1)
            values_b = torch.cat([values_a, mid.values.flatten(2)], dim=-1)
            prior_a = motion_prior(torch.tensor([2]), grid, 0.05)
            prior_b = motion_prior(torch.tensor([2, 1]), grid, 0.08)
            # objects 0, 1 hold frame 0 (memory a); objects 2, 3 frames 0 and 1 (memory b)
            values = values_a.new_zeros(4, values_a.shape[1], 2 * cells)
            values[:2, :, :cells] = values_a[[0, 1]]
            values[2:] = values_b[[1, 2]]
            both = ObjectPriors((prior_a, prior_b), (0, 0, 1, 1), ((0,), (0, 1)))
            decoded.clear()
            got = net.segment(net.encode_query(image1), keys_b, values, None, both)
            decodes = list(decoded)
            a = net.segment(net.encode_query(image1), keys_a, values_a[[0, 1]], None, prior_a)
            b = net.segment(net.encode_query(image1), keys_b, values_b[[1, 2]], None, prior_b)
    finally:
        net.crop_share = STMLite.crop_share
        hook.remove()
    if not share or not one_background:
        assert torch.allclose(got, torch.cat([a, b]), atol=1e-5)
        # windows: one background decode a memory; the exact network: each object on the frame
        assert decodes == ([1, 1] if share else [4])
        return
    assert decodes == [1]  # the most held memory's only (a tie: the first)
    assert torch.allclose(got[:2], a, atol=1e-5)
    on = b > 0.5
    assert on.any() and torch.allclose(got[2:][on], b[on], atol=1e-5)
    assert (got[2:] - b).abs().max() < 0.05
