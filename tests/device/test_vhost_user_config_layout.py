"""The back-end's precompiled config header is the protocol's ConfigHeader / VhostUserConfig.

``device.vhost_user.session`` parses GET_CONFIG / SET_CONFIG with ``struct`` (they come with
every balloon chain Linux sends, see benchmarks/uml.py); the layouts must stay equal.
"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from device.vhost_user.session import _CONFIG_HEADER
from protocol.vhost_user import CONFIG_HEADER_SIZE, ConfigHeader, VhostUserConfig

u32 = st.integers(0, 2**32 - 1)


@given(u32, u32, u32)
def test_header_layout_is_construct_s(offset, size, flags):
    built = ConfigHeader.build(dict(offset=offset, size=size, flags=flags))
    assert _CONFIG_HEADER.pack(offset, size, flags) == built
    assert _CONFIG_HEADER.unpack(built) == (offset, size, flags)
    assert _CONFIG_HEADER.size == CONFIG_HEADER_SIZE


@given(u32, u32, st.binary(max_size=256))
def test_reply_layout_is_vhost_user_config(offset, flags, payload):
    built = VhostUserConfig.build(dict(offset=offset, size=len(payload), flags=flags,
                                       payload=payload))
    assert _CONFIG_HEADER.pack(offset, len(payload), flags) + payload == built
