"""Free page hinting through the driver and the free page queue of a scripted host."""

from __future__ import annotations

import trio
from balloon_host import make_machine

from guest.balloon import BalloonOptions, HintMode
from guest.workload import Workload
from protocol.balloon import ConfigOffset


async def hint_round(m, cmd_id: int) -> None:
    m.host.set_cmd_id(cmd_id)
    await trio.sleep(0.5)


async def test_alloc_mode_round_until_done(autojump_clock):
    m = make_machine()
    m.balloon.probe()
    free = m.mm.nr_free_pages()
    async with trio.open_nursery() as nursery:
        await nursery.start(m.balloon.run)
        await hint_round(m, 0x80000001)
        kinds = [k for k, _ in m.host.hint_buffers]
        assert m.host.hint_buffers[0] == ("id", 0x80000001)
        assert m.host.hint_buffers[-1] == ("id", 0)
        assert set(kinds[1:-1]) == {"block"}
        held = m.balloon.hinting.held
        assert len(held) == len(kinds) - 2 > 0
        assert m.balloon.shrink_count() == len(held) << 10
        await hint_round(m, 1)  # DONE
        assert m.balloon.hinting.held == []
        nursery.cancel_scope.cancel()
    stats = m.balloon.hint_statistics()
    assert stats.runs == 1 and stats.bytes_hinted == (len(kinds) - 2) << 22
    # the reporting pass ran meanwhile too; once idle every page is free again
    assert m.mm.nr_free_pages() == free
    m.close()


async def test_qemu_start_state_reads_zero_but_the_run_goes_on(autojump_clock):
    """QEMU's config reads 0 once the ID is echoed (research/qtest-hint.md pitfall 1)."""
    m = make_machine()
    record = m.host._record

    def qemu_like(name, chain):
        record(name, chain)
        if name == "free_page" and m.host.hint_buffers[-1] == ("id", 0x80000001):
            m.host.set_cmd_id(0, interrupt=False)  # START: the field reads 0, no interrupt

    m.host._record = qemu_like
    m.balloon.probe()
    async with trio.open_nursery() as nursery:
        await nursery.start(m.balloon.run)
        await hint_round(m, 0x80000001)
        nursery.cancel_scope.cancel()
    blocks = [b for k, b in m.host.hint_buffers if k == "block"]
    assert len(blocks) > 10  # polling the field would have looked like STOP after the echo
    m.close()


async def test_id_change_mid_run_on_a_small_ring(autojump_clock):
    m = make_machine(options=BalloonOptions(max_queue_size=4),
                     policies={"free_page": "manual"})
    m.balloon.probe()
    assert m.balloon.vqs[3].size == 4
    async with trio.open_nursery() as nursery:
        await nursery.start(m.balloon.run)
        m.host.set_cmd_id(0x80000001)
        await trio.sleep(0.1)
        assert m.host.pending("free_page") == 3  # start id + 2 blocks; 1 entry kept for STOP
        m.host.consume("free_page", 2)
        await trio.sleep(0.1)
        m.host.set_cmd_id(0x80000002)  # the host moves on before the round is over
        for _ in range(50):
            m.host.consume("free_page")
            await trio.sleep(0.1)
        nursery.cancel_scope.cancel()
    ids = [v for k, v in m.host.hint_buffers if k == "id"]
    assert ids == [0x80000001, 0, 0x80000002, 0]
    first_stop = m.host.hint_buffers.index(("id", 0))
    assert 2 <= first_stop - 1 < 10  # round 1 was cut short
    m.close()


async def test_walk_mode_lets_the_guest_reuse_hinted_pages(autojump_clock):
    results = {}
    for mode in (HintMode.ALLOC, HintMode.WALK):
        m = make_machine(options=BalloonOptions(hint_mode=mode, max_queue_size=64),
                         features=(1 << 3) | (1 << 32))  # FREE_PAGE_HINT, VERSION_1 only
        m.balloon.probe()
        async with trio.open_nursery() as nursery:
            await nursery.start(m.balloon.run)
            await hint_round(m, 0x80000001)
            work = Workload(m.mm, m.memory, "steady", seed=7, ops=400)
            work.run()
            await hint_round(m, 1)
            nursery.cancel_scope.cancel()
        stats = m.balloon.hint_statistics()
        results[mode] = stats
        assert stats.bytes_hinted > 0
        m.close()
    alloc, walk = results[HintMode.ALLOC], results[HintMode.WALK]
    assert alloc.pages_reused == 0 and alloc.pages_written == 0  # held: nothing to reuse
    assert walk.pages_reused > 0 and walk.pages_written > 0  # the seed design's weakness
    assert walk.bytes_hinted >= alloc.bytes_hinted  # it hints what Linux keeps in reserve too


async def test_shrinker_gives_blocks_back_before_done(autojump_clock):
    m = make_machine()
    m.balloon.probe()
    async with trio.open_nursery() as nursery:
        await nursery.start(m.balloon.run)
        await hint_round(m, 0x80000001)
        held = len(m.balloon.hinting.held)
        assert m.balloon.shrink(1500) == 2048  # two whole blocks
        assert len(m.balloon.hinting.held) == held - 2
        nursery.cancel_scope.cancel()
    assert m.host.get_config(ConfigOffset.FREE_PAGE_HINT_CMD_ID) == 0x80000001
    m.close()
