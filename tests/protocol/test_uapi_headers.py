"""Every size, offset and constant in protocol/ checked against the Linux UAPI headers, with gcc.

The test writes a small C program that includes the installed ``linux/virtio_*.h`` headers
(Debian's linux-libc-dev; 6.1 on the reference machine) and ``linux/vhost_types.h``, compiles it
and runs it. The program prints one ``name value`` line per fact (``name -`` when the header does
not define the macro); each fact is compared with what protocol/ declares.

Facts a header may lack (the 6.1 headers have no ``VIRTIO_F_NOTIFICATION_DATA``, no
``VIRTIO_MMIO_QUEUE_RESET``, no stats tags above 9) carry a reference value from the virtio spec
(or, for stats tags 10-15, Linux 6.12's uapi); when the header lacks them our value is checked
against that reference instead, and when a newer header has them, against both.
"""

from __future__ import annotations

import enum
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
from construct import Construct

from protocol import balloon, mmio, packed_ring, split_ring, vhost_user
from protocol.balloon import BalloonConfig, CommandId, ConfigOffset, StatRecord, StatTag
from protocol.features import BalloonFeature, TransportFeature
from protocol.mmio import InterruptBit, MmioReg
from protocol.packed_ring import EventFlags, PackedDesc, PackedDescFlags, PackedEventSuppress
from protocol.split_ring import DescFlags, VirtqDesc, VirtqUsedElem, avail_ring, used_ring
from protocol.status import DeviceStatus

try:
    from peers import require_peer
except ModuleNotFoundError:  # pragma: no cover - depends on how pytest puts tests/ on sys.path
    from tests.peers import require_peer

INCLUDE = Path("/usr/include")
HEADERS = (
    "linux/virtio_ring.h",
    "linux/virtio_config.h",
    "linux/virtio_balloon.h",
    "linux/virtio_mmio.h",
    "linux/virtio_ids.h",
    "linux/vhost_types.h",
)
QUEUE_SIZES = (1, 2, 128, 256, 1024, 32768)
ALIGN = 4096

SPEC = "virtio spec"
LINUX_612 = "Linux 6.12 uapi virtio_balloon.h"


@dataclass(frozen=True)
class Fact:
    """One thing the header says, and the protocol/ declarations that must agree with it.

    ``c_expr`` is a C expression (``None``: the fact is in no Linux header, spec only);
    ``guard`` a macro the header may not define; ``reference`` the value and source to check
    against when it does not (and to cross-check when it does).
    """

    name: str
    c_expr: str | None
    ours: dict[str, int]
    guard: str | None = None
    reference: tuple[int, str] | None = None


def offsets(layout: Construct) -> dict[str, int]:
    """Byte offset of each named field of a fixed-layout construct ``Struct``."""
    out: dict[str, int] = {}
    pos = 0
    for sub in layout.subcons:
        if sub.name is not None:
            out[sub.name] = pos
        pos += sub.sizeof()
    return out


def _macro(name: str, ours: dict[str, int], reference: tuple[int, str] | None = None,
           *, guarded: bool = False) -> Fact:
    """A macro fact; guarded (``#ifdef``) when asked or when it has a reference to fall back on."""
    guard = name if guarded or reference is not None else None
    return Fact(name, name, ours, guard=guard, reference=reference)


def _enum_facts(prefix: str, enum_cls: type[enum.Enum], *, rename: dict[str, str] | None = None,
                references: dict[str, tuple[int, str]] | None = None, skip: tuple[str, ...] = (),
                guarded: bool = False) -> list[Fact]:
    """One fact per member: macro ``prefix + name`` (or ``rename[name]``) against the member."""
    rename = rename or {}
    references = references or {}
    return [
        _macro(rename.get(m.name, prefix + m.name), {f"{enum_cls.__name__}.{m.name}": int(m)},
               references.get(m.name), guarded=guarded)
        for m in enum_cls if m.name not in skip
    ]


def _struct_facts(c_struct: str, layout: Construct, label: str,
                  c_fields: dict[str, str] | None = None,
                  sizes: dict[str, int] | None = None) -> list[Fact]:
    """sizeof and offsetof of every field of ``struct c_struct`` against the construct layout.

    ``c_fields`` maps our field names to the C ones when they differ.
    """
    c_fields = c_fields or {}
    facts = [Fact(f"sizeof.{c_struct}", f"sizeof(struct {c_struct})",
                  {f"{label}.sizeof()": layout.sizeof(), **(sizes or {})})]
    for name, off in offsets(layout).items():
        c_name = c_fields.get(name, name)
        facts.append(Fact(f"offsetof.{c_struct}.{c_name}", f"offsetof(struct {c_struct}, {c_name})",
                          {f"offsets({label})[{name!r}]": off}))
    return facts


def _ring_facts() -> list[Fact]:
    avail, used = avail_ring(4), used_ring(4)
    facts = _struct_facts("vring_desc", VirtqDesc, "VirtqDesc",
                          sizes={"DESC_SIZE": split_ring.DESC_SIZE})
    facts += _struct_facts("vring_used_elem", VirtqUsedElem, "VirtqUsedElem",
                           sizes={"USED_ELEM_SIZE": split_ring.USED_ELEM_SIZE})
    # struct vring_avail / vring_used end in a flexible ring[]: their sizeof is the fixed part.
    facts += [
        Fact("sizeof.vring_avail", "sizeof(struct vring_avail)",
             {"AVAIL_RING": split_ring.AVAIL_RING}),
        Fact("offsetof.vring_avail.flags", "offsetof(struct vring_avail, flags)",
             {"AVAIL_FLAGS": split_ring.AVAIL_FLAGS, "offsets(avail_ring(4))['flags']":
              offsets(avail)["flags"]}),
        Fact("offsetof.vring_avail.idx", "offsetof(struct vring_avail, idx)",
             {"AVAIL_IDX": split_ring.AVAIL_IDX, "offsets(avail_ring(4))['idx']":
              offsets(avail)["idx"]}),
        Fact("offsetof.vring_avail.ring", "offsetof(struct vring_avail, ring)",
             {"AVAIL_RING": split_ring.AVAIL_RING, "offsets(avail_ring(4))['ring']":
              offsets(avail)["ring"]}),
        Fact("sizeof.vring_used", "sizeof(struct vring_used)", {"USED_RING": split_ring.USED_RING}),
        Fact("offsetof.vring_used.flags", "offsetof(struct vring_used, flags)",
             {"USED_FLAGS": split_ring.USED_FLAGS, "offsets(used_ring(4))['flags']":
              offsets(used)["flags"]}),
        Fact("offsetof.vring_used.idx", "offsetof(struct vring_used, idx)",
             {"USED_IDX": split_ring.USED_IDX, "offsets(used_ring(4))['idx']":
              offsets(used)["idx"]}),
        Fact("offsetof.vring_used.ring", "offsetof(struct vring_used, ring)",
             {"USED_RING": split_ring.USED_RING, "offsets(used_ring(4))['ring']":
              offsets(used)["ring"]}),
        Fact("VRING_DESC_ALIGN_SIZE", "VRING_DESC_ALIGN_SIZE",
             {"DESC_ALIGN": split_ring.DESC_ALIGN}),
        Fact("VRING_AVAIL_ALIGN_SIZE", "VRING_AVAIL_ALIGN_SIZE",
             {"AVAIL_ALIGN": split_ring.AVAIL_ALIGN}),
        Fact("VRING_USED_ALIGN_SIZE", "VRING_USED_ALIGN_SIZE",
             {"USED_ALIGN": split_ring.USED_ALIGN}),
        _macro("VRING_AVAIL_F_NO_INTERRUPT",
               {"VRING_AVAIL_F_NO_INTERRUPT": split_ring.VRING_AVAIL_F_NO_INTERRUPT}),
        _macro("VRING_USED_F_NO_NOTIFY",
               {"VRING_USED_F_NO_NOTIFY": split_ring.VRING_USED_F_NO_NOTIFY}),
        Fact("MAX_QUEUE_SIZE", None, {"MAX_QUEUE_SIZE": split_ring.MAX_QUEUE_SIZE},
             reference=(32768, SPEC + " §2.7 (Queue Size <= 2^15)")),
    ]
    facts += _enum_facts("VRING_DESC_F_", DescFlags)
    for n in QUEUE_SIZES:
        a, u = avail_ring(n), used_ring(n)
        facts += [
            Fact(f"vring_size({n},{ALIGN})", f"vring_size({n}, {ALIGN})",
                 {f"vring_size({n}, {ALIGN})": split_ring.vring_size(n, ALIGN)}),
            Fact(f"vring_init({n}).avail", f"avail_offset({n})",
                 {f"desc_table_size({n})": split_ring.desc_table_size(n)}),
            Fact(f"vring_init({n}).used", f"used_offset({n})",
                 {f"vring_used_offset({n}, {ALIGN})": split_ring.vring_used_offset(n, ALIGN)}),
            Fact(f"vring_used_event({n})", f"used_event_offset({n})",
                 {f"used_event_offset({n})": split_ring.used_event_offset(n),
                  f"offsets(avail_ring({n}))['used_event']": offsets(a)["used_event"]}),
            Fact(f"vring_avail_event({n})", f"avail_event_offset({n})",
                 {f"avail_event_offset({n})": split_ring.avail_event_offset(n),
                  f"offsets(used_ring({n}))['avail_event']": offsets(u)["avail_event"]}),
            Fact(f"avail_area_size({n})", f"used_event_offset({n}) + sizeof(__virtio16)",
                 {f"avail_size({n})": split_ring.avail_size(n),
                  f"avail_ring({n}).sizeof()": a.sizeof()}),
            Fact(f"used_area_size({n})", f"vring_size({n}, {ALIGN}) - used_offset({n})",
                 {f"used_size({n})": split_ring.used_size(n),
                  f"used_ring({n}).sizeof()": u.sizeof()}),
        ]
    return facts


def _packed_facts() -> list[Fact]:
    facts = _struct_facts("vring_packed_desc", PackedDesc, "PackedDesc")
    facts += _struct_facts("vring_packed_desc_event", PackedEventSuppress, "PackedEventSuppress")
    # NEXT/WRITE/INDIRECT share the split ring's VRING_DESC_F_* values.
    for name in ("NEXT", "WRITE", "INDIRECT"):
        facts.append(Fact(f"VRING_DESC_F_{name}(packed)", f"VRING_DESC_F_{name}",
                          {f"PackedDescFlags.{name}": int(PackedDescFlags[name])}))
    # Linux gives AVAIL/USED as bit numbers; ours are masks.
    for name in ("AVAIL", "USED"):
        facts.append(Fact(f"1<<VRING_PACKED_DESC_F_{name}", f"1ULL << VRING_PACKED_DESC_F_{name}",
                          {f"PackedDescFlags.{name}": int(PackedDescFlags[name])}))
    facts += _enum_facts("VRING_PACKED_EVENT_FLAG_", EventFlags)
    facts += [
        _macro("VRING_PACKED_EVENT_F_WRAP_CTR",
               {"EVENT_F_WRAP_CTR": packed_ring.EVENT_F_WRAP_CTR}),
        Fact("PACKED_DESC_ALIGN", None, {"PACKED_DESC_ALIGN": packed_ring.PACKED_DESC_ALIGN},
             reference=(16, SPEC + " §2.8.10.1 (Descriptor Ring alignment)")),
        Fact("PACKED_EVENT_ALIGN", None, {"PACKED_EVENT_ALIGN": packed_ring.PACKED_EVENT_ALIGN},
             reference=(4, SPEC + " §2.8.10.1 (event suppression alignment)")),
    ]
    return facts


def _feature_and_status_facts() -> list[Fact]:
    spec = {  # bits and values a header may lack (virtio spec §6, §2.1)
        "UNUSED": (30, SPEC + " §6 (bit 30, VHOST_USER_F_PROTOCOL_FEATURES)"),
        "NOTIFICATION_DATA": (38, SPEC + " §6"),
        "NOTIF_CONFIG_DATA": (39, SPEC + " §6"),
        "RING_RESET": (40, SPEC + " §6"),
        "ADMIN_VQ": (41, SPEC + " §6"),
        "SUSPEND": (43, SPEC + " v1.4 §6"),
    }
    # Every transport bit is checked with #ifdef: which ones a header has depends on its age.
    facts = _enum_facts(
        "VIRTIO_F_", TransportFeature,
        rename={"RING_INDIRECT_DESC": "VIRTIO_RING_F_INDIRECT_DESC",
                "RING_EVENT_IDX": "VIRTIO_RING_F_EVENT_IDX"},
        references=spec, skip=("UNUSED",), guarded=True,
    )
    facts += [
        _macro("VIRTIO_F_IOMMU_PLATFORM", {"TransportFeature.ACCESS_PLATFORM":
                                           int(TransportFeature.ACCESS_PLATFORM)}, guarded=True),
        # Bit 30 has no Linux define; vhost-user reuses it.
        Fact("VIRTIO_F_UNUSED", None,
             {"TransportFeature.UNUSED": int(TransportFeature.UNUSED),
              "vhost_user.VHOST_USER_F_PROTOCOL_FEATURES":
              vhost_user.VHOST_USER_F_PROTOCOL_FEATURES},
             reference=spec["UNUSED"]),
    ]
    facts += _enum_facts(
        "VIRTIO_CONFIG_S_", DeviceStatus,
        rename={"DEVICE_NEEDS_RESET": "VIRTIO_CONFIG_S_NEEDS_RESET"},
        references={"SUSPEND": (16, SPEC + " v1.4 §2.1")},
    )
    facts += _enum_facts("VIRTIO_BALLOON_F_", BalloonFeature)
    return facts


def _balloon_facts() -> list[Fact]:
    facts = _struct_facts("virtio_balloon_config", BalloonConfig, "BalloonConfig",
                          sizes={"config_size(PAGE_POISON)": balloon.config_size(1 << 4)})
    for member in ConfigOffset:
        c_name = member.name.lower()
        facts.append(Fact(f"offsetof.virtio_balloon_config.{c_name}[ConfigOffset]",
                          f"offsetof(struct virtio_balloon_config, {c_name})",
                          {f"ConfigOffset.{member.name}": int(member)}))
    facts.append(Fact("offsetof.virtio_balloon_config.free_page_report_cmd_id",
                      "offsetof(struct virtio_balloon_config, free_page_report_cmd_id)",
                      {"ConfigOffset.FREE_PAGE_HINT_CMD_ID":
                       int(ConfigOffset.FREE_PAGE_HINT_CMD_ID)}))
    facts += _struct_facts("virtio_balloon_stat", StatRecord, "StatRecord")
    newer = {"OOM_KILL": 10, "ALLOC_STALL": 11, "ASYNC_SCAN": 12, "DIRECT_SCAN": 13,
             "ASYNC_RECLAIM": 14, "DIRECT_RECLAIM": 15}  # not in 6.1 headers
    facts += _enum_facts("VIRTIO_BALLOON_S_", StatTag,
                         references={k: (v, LINUX_612) for k, v in newer.items()})
    facts += _enum_facts("VIRTIO_BALLOON_CMD_ID_", CommandId)
    facts += [
        _macro("VIRTIO_BALLOON_PFN_SHIFT", {"PFN_SHIFT": balloon.PFN_SHIFT}),
        _macro("VIRTIO_ID_BALLOON", {"VIRTIO_ID_BALLOON": balloon.VIRTIO_ID_BALLOON}),
    ]
    return facts


def _mmio_facts() -> list[Fact]:
    facts = _enum_facts("VIRTIO_MMIO_", MmioReg,
                        references={"QUEUE_RESET": (0x0C0, SPEC + " §4.2.2 (QueueReset)")})
    facts += _enum_facts("VIRTIO_MMIO_INT_", InterruptBit)
    facts += [
        Fact("VIRTIO_MMIO_CONFIG(CONFIG_OFFSET)", "VIRTIO_MMIO_CONFIG",
             {"CONFIG_OFFSET": mmio.CONFIG_OFFSET}),
        Fact("MagicValue", None, {"MAGIC_VALUE": mmio.MAGIC_VALUE},
             reference=(0x74726976, SPEC + " §4.2.2")),
        Fact("Version", None, {"VERSION": mmio.VERSION}, reference=(2, SPEC + " §4.2.2")),
        Fact("Version(legacy)", None, {"LEGACY_VERSION": mmio.LEGACY_VERSION},
             reference=(1, SPEC + " §4.2.4")),
    ]
    return facts


def _vhost_facts() -> list[Fact]:
    """vhost-user payloads reuse the kernel vhost structs of ``linux/vhost_types.h``."""
    facts = _struct_facts("vhost_vring_state", vhost_user.VringState, "VringState")
    facts += _struct_facts(
        "vhost_vring_addr", vhost_user.VringAddr, "VringAddr",
        c_fields={"desc": "desc_user_addr", "used": "used_user_addr",
                  "avail": "avail_user_addr", "log": "log_guest_addr"})
    facts += _struct_facts(
        "vhost_memory_region", vhost_user.MemoryRegionDesc, "MemoryRegionDesc",
        c_fields={"mmap_offset": "flags_padding"},
        sizes={"MEMORY_REGION_SIZE": vhost_user.MEMORY_REGION_SIZE})
    facts += [
        Fact("offsetof.vhost_memory.regions", "offsetof(struct vhost_memory, regions)",
             {"MEMORY_TABLE_HEADER_SIZE": vhost_user.MEMORY_TABLE_HEADER_SIZE}),
        _macro("VHOST_VRING_F_LOG", {"VHOST_VRING_F_LOG": vhost_user.VHOST_VRING_F_LOG}),
    ]
    return facts


def all_facts() -> list[Fact]:
    return (_ring_facts() + _packed_facts() + _feature_and_status_facts() + _balloon_facts()
            + _mmio_facts() + _vhost_facts())


FACTS = all_facts()
EXTRA = [Fact("VIRTIO_BALLOON_S_NR", "VIRTIO_BALLOON_S_NR", {})]
"""Header values we print but do not declare (used by test_stat_tags_cover_the_header)."""

_C_PRELUDE = f"""\
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <linux/virtio_ring.h>
#include <linux/virtio_config.h>
#include <linux/virtio_balloon.h>
#include <linux/virtio_mmio.h>
#include <linux/virtio_ids.h>
#include <linux/vhost_types.h>

typedef unsigned long long ull;
static unsigned char *area; /* big enough for the largest ring; only addresses are taken */

static struct vring ring(unsigned int num)
{{
    struct vring vr;
    vring_init(&vr, num, area, {ALIGN}UL);
    return vr;
}}
static ull avail_offset(unsigned int num)
{{
    struct vring vr = ring(num);
    return (ull)((unsigned char *)vr.avail - area);
}}
static ull used_offset(unsigned int num)
{{
    struct vring vr = ring(num);
    return (ull)((unsigned char *)vr.used - area);
}}
static ull used_event_offset(unsigned int num)
{{
    struct vring vr = ring(num);
    return (ull)((unsigned char *)&vring_used_event(&vr) - (unsigned char *)vr.avail);
}}
static ull avail_event_offset(unsigned int num)
{{
    struct vring vr = ring(num);
    return (ull)((unsigned char *)&vring_avail_event(&vr) - (unsigned char *)vr.used);
}}

int main(void)
{{
    /* vring_init aligns the used ring's absolute address: the area must start aligned. */
    area = aligned_alloc({ALIGN}UL, (vring_size({max(QUEUE_SIZES)}, {ALIGN}UL) + {ALIGN - 1}UL)
                         & ~{ALIGN - 1}UL);
    if (!area)
        return 1;
"""


def c_program(facts: list[Fact]) -> str:
    """The C source printing ``name value`` (or ``name -`` when a guard is undefined)."""
    lines = [_C_PRELUDE]
    for f in facts:
        if f.c_expr is None:
            continue
        show = f'    printf("%s %llu\\n", "{f.name}", (ull)({f.c_expr}));'
        if f.guard is None:
            lines.append(show)
        else:
            lines += [f"#ifdef {f.guard}", show, "#else",
                      f'    printf("%s -\\n", "{f.name}");', "#endif"]
    lines.append("    free(area);\n    return 0;\n}\n")
    return "\n".join(lines)


def _find_toolchain() -> str:
    gcc = shutil.which("gcc")
    if gcc is None:
        raise RuntimeError("gcc not found (apt-get install gcc)")
    missing = [h for h in HEADERS if not (INCLUDE / h).is_file()]
    if missing:
        raise RuntimeError(f"missing {', '.join(missing)} (apt-get install linux-libc-dev)")
    return gcc


@pytest.fixture(scope="module")
def header(tmp_path_factory: pytest.TempPathFactory) -> dict[str, int | None]:
    """Compile and run the program; ``{name: value}``, ``None`` for macros the header lacks."""
    gcc = require_peer("A C compiler with the Linux UAPI headers", _find_toolchain)
    tmp = tmp_path_factory.mktemp("uapi")
    src, exe = tmp / "uapi.c", tmp / "uapi"
    src.write_text(c_program(FACTS + EXTRA))
    cc = subprocess.run([gcc, "-std=gnu11", "-Wall", "-o", str(exe), str(src)],
                        capture_output=True, text=True, check=False)
    assert cc.returncode == 0, f"gcc failed on {src}:\n{cc.stderr}"
    run = subprocess.run([str(exe)], capture_output=True, text=True, check=False, timeout=30)
    assert run.returncode == 0, f"{exe} exited {run.returncode}: {run.stderr}"
    values: dict[str, int | None] = {}
    for line in run.stdout.splitlines():
        name, value = line.rsplit(" ", 1)
        assert name not in values, f"{name} printed twice"
        values[name] = None if value == "-" else int(value)
    return values


def test_fact_names_are_unique() -> None:
    names = [f.name for f in FACTS]
    assert len(names) == len(set(names)), sorted({n for n in names if names.count(n) > 1})


def test_every_fact_is_printed(header: dict[str, int | None]) -> None:
    """The program printed exactly the facts with a C expression: none lost, none extra."""
    expected = {f.name for f in FACTS + EXTRA if f.c_expr is not None}
    assert set(header) == expected, (
        f"missing: {sorted(expected - set(header))}, unexpected: {sorted(set(header) - expected)}")
    unguarded_absent = [f.name for f in FACTS if f.guard is None and f.c_expr is not None
                        and header[f.name] is None]
    assert not unguarded_absent


@pytest.mark.parametrize("fact", FACTS, ids=[f.name for f in FACTS])
def test_declaration_matches(fact: Fact, request: pytest.FixtureRequest) -> None:
    """Our declaration equals the header's value, or the spec's when the header lacks it."""
    value = None
    if fact.c_expr is not None:
        value = request.getfixturevalue("header")[fact.name]
    if value is None:
        assert fact.reference is not None, (
            f"{fact.name}: the installed headers do not define it and no reference value is given")
        expected, source = fact.reference
    else:
        expected, source = value, "the installed Linux UAPI headers"
        if fact.reference is not None:
            ref, ref_source = fact.reference
            assert ref == value, f"{fact.name}: {source} say {value}, {ref_source} says {ref}"
    wrong = {label: ours for label, ours in fact.ours.items() if ours != expected}
    assert not wrong, f"{fact.name}: {source} say {expected}, but protocol/ declares " + ", ".join(
        f"{label} = {ours}" for label, ours in wrong.items())


def test_stat_tags_cover_the_header(header: dict[str, int | None]) -> None:
    """StatTag knows every tag below the header's VIRTIO_BALLOON_S_NR, each exactly once."""
    nr = header.get("VIRTIO_BALLOON_S_NR")
    assert nr is not None and nr >= 10
    missing = sorted(set(range(nr)) - {int(t) for t in StatTag})
    assert not missing, f"VIRTIO_BALLOON_S_NR is {nr} but StatTag lacks tags {missing}"
    assert sorted(int(t) for t in StatTag) == list(range(len(StatTag))), "StatTag is not dense"


_CHECKED_ENUMS: tuple[type[enum.Enum], ...] = (
    DescFlags, PackedDescFlags, EventFlags, TransportFeature, BalloonFeature, DeviceStatus,
    StatTag, CommandId, ConfigOffset, MmioReg, InterruptBit,
)


@pytest.mark.parametrize("enum_cls", _CHECKED_ENUMS, ids=lambda c: c.__name__)
def test_every_member_is_checked(enum_cls: type[enum.Enum]) -> None:
    """A member added to a wire enum without a fact here fails, naming the member."""
    labels = {label for f in FACTS for label in f.ours}
    unchecked = [m.name for m in enum_cls if f"{enum_cls.__name__}.{m.name}" not in labels]
    assert not unchecked, f"{enum_cls.__name__} members with no header/spec check: {unchecked}"
