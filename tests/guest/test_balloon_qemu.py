"""The balloon driver against QEMU's real virtio-balloon (microvm, virtio-mmio, qtest).

The same driver the simulated device tests use, unchanged: only the bus (``QtestMmioBus``),
the memory (``QtestMemory``) and the interrupt line (polling InterruptStatus) differ; the
wiring is ``sim.qemu.guest.run_guest``. The named scenarios (``sim.qemu.scenarios``) check
much more; these are the driver's own end-to-end smoke tests.
"""

from __future__ import annotations

import pytest

from guest.balloon import BalloonOptions
from protocol.balloon import ConfigOffset
from protocol.features import BalloonFeature, has

pytestmark = pytest.mark.peer

MiB = 1 << 20


async def test_inflate_stats_report_deflate_remove_on_qemu(qemu_binary):
    from sim.qemu import BalloonProperties, QemuMode, QemuOptions, run_qemu
    from sim.qemu.guest import run_guest
    from sim.qemu.kit import wait_until

    ram = 128 * MiB
    options = QemuOptions(
        memory=ram, mode=QemuMode.RUNNING, binary=qemu_binary,
        balloon=BalloonProperties(free_page_reporting=True, deflate_on_oom=True,
                                  guest_stats_polling_interval=1))
    async with run_qemu(options) as qemu:
        async with run_guest(qemu, BalloonOptions(init_on_free=True),
                             poll_period=0.002) as guest:
            balloon, mm, transport = guest.balloon, guest.mm, guest.transport
            features = balloon.features
            assert has(features, BalloonFeature.REPORTING)
            assert has(features, BalloonFeature.PAGE_POISON)
            await qemu.qmp.balloon(ram - 32 * MiB)
            assert await wait_until(
                lambda: transport.read_config32(ConfigOffset.ACTUAL) == 8192, 20)
            assert await qemu.qmp.query_balloon() == ram - 32 * MiB
            assert all(mm.is_allocated(pfn, 0) for pfn in balloon.balloon.pages)
            assert await wait_until(lambda: balloon.reporting.core.statistics().batches > 0, 10)
            assert await wait_until(lambda: balloon.last_stats, 5)
            stats = await qemu.qmp.guest_stats(options.balloon.qom_path)
            assert stats["stats"]["stat-total-memory"] == mm.totalram_pages() << 12
            await qemu.qmp.balloon(ram)
            assert await wait_until(lambda: transport.read_config32(ConfigOffset.ACTUAL) == 0, 20)
            await balloon.remove()
        assert transport.get_status() == 0
        assert mm.allocations() == {}


async def test_free_page_hints_shrink_a_real_migration(qemu_binary):
    """QEMU skips the hinted pages: the migration sends a fraction of the filled RAM."""
    from sim.qemu import BalloonProperties, QemuMode, QemuOptions, run_qemu
    from sim.qemu.guest import run_guest
    from sim.qemu.kit import wait_until

    ram = 128 * MiB
    options = QemuOptions(memory=ram, mode=QemuMode.RUNNING, binary=qemu_binary,
                          balloon=BalloonProperties(free_page_hint=True))
    async with run_qemu(options) as qemu:
        async with run_guest(qemu, BalloonOptions(max_queue_size=64),
                             poll_period=0.001) as guest:
            balloon, mm, transport = guest.balloon, guest.mm, guest.transport
            blocks = []  # fill free RAM with non-zero bytes, or skipping it would prove nothing
            while (pfn := mm.alloc_pages(10)) is not None:
                blocks.append(pfn)
            for pfn in blocks:
                qemu.memory.fill(pfn << 12, 4 * MiB, 0x5A)
                mm.free_pages(pfn, 10)
            filled = len(blocks) * 4 * MiB
            await qemu.qmp.migrate_set_parameters(max_bandwidth=64 * MiB)
            await qemu.qmp.migrate("exec:cat > /dev/null")
            info = await qemu.qmp.wait_migration(timeout=60)
            assert await wait_until(lambda: not balloon.hinting.held, 5)  # DONE gave them back
        stats = balloon.hint_statistics()
        assert stats.runs >= 1 and stats.bytes_hinted >= filled // 2
        assert info["ram"]["transferred"] < filled // 4
        assert transport.read_config32(ConfigOffset.FREE_PAGE_HINT_CMD_ID) == 1  # DONE
