"""Spawn attachments: names, sizes, encodings, permissions, and their life (rule 8)."""

from __future__ import annotations

import base64
import stat
from pathlib import Path

import pytest

from clawgate.client import ClientError
from clawgate.errors import InvalidRequest
from clawgate.protocol.schemas import Attachment
from clawgate.state.clock import FakeClock
from clawgate.subagents import attachments
from conftest import GatewayFactory, settle
from test_subagents import MANUAL_TICKS, assert_partial, connect, history, spawn, stored, tick

MIB = 1024 * 1024


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# -- pure: names, decoding, sizes ------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name", ["../x", "a/b", ".hidden", "", "..", "a\\b", "a\x00b", " lead", "trail ", "x/../y", "a..b"]
)
def test_names_that_could_leave_the_directory_are_refused(name: str) -> None:
    with pytest.raises(InvalidRequest) as err:
        attachments.check_name(name)
    assert err.value.details == {"field": "params.attachments.name"}


@pytest.mark.parametrize("name", ["report.txt", "data-1_v2.csv", "a b.md", "X"])
def test_plain_names_are_accepted(name: str) -> None:
    attachments.check_name(name)


def test_base64_is_decoded_and_invalid_base64_refused() -> None:
    raw = bytes(range(256))
    att = Attachment(name="bin", content=base64.b64encode(raw).decode(), encoding="base64")
    assert attachments.decode(att) == raw
    assert attachments.decode(Attachment(name="t", content="héllo")) == "héllo".encode()
    with pytest.raises(InvalidRequest) as err:
        attachments.decode(Attachment(name="bad", content="not base64!", encoding="base64"))
    assert err.value.details == {"field": "params.attachments.content"}


def test_total_size_limit_is_per_spawn() -> None:
    half = "x" * 50
    ok = attachments.prepare([Attachment(name="a", content=half), Attachment(name="b", content=half)], 100)
    assert [(n, len(d)) for n, d in ok] == [("a", 50), ("b", 50)]
    with pytest.raises(InvalidRequest) as err:
        attachments.prepare(
            [Attachment(name="a", content=half), Attachment(name="b", content=half + "x")], 100
        )
    assert err.value.details == {"field": "params.attachments", "maxBytes": 100}
    # Decoded size counts, not the base64 text: 75 bytes encode to 100 characters.
    b64 = base64.b64encode(b"y" * 75).decode()
    assert len(b64) == 100
    assert attachments.prepare([Attachment(name="c", content=b64, encoding="base64")], 75)[0][1] == b"y" * 75
    with pytest.raises(InvalidRequest):
        attachments.prepare([Attachment(name="c", content=b64, encoding="base64")], 74)


def test_duplicate_names_are_refused() -> None:
    with pytest.raises(InvalidRequest):
        attachments.prepare([Attachment(name="a", content="1"), Attachment(name="a", content="2")], 100)


def test_write_makes_a_private_directory_and_private_files(tmp_path: Path) -> None:
    target = attachments.write(tmp_path / "att", "run-1", [("a.txt", b"alpha"), ("b.bin", b"\x00\x01")])
    assert target == tmp_path / "att" / "run-1"
    assert mode_of(target) == 0o700
    assert sorted(p.name for p in target.iterdir()) == ["a.txt", "b.bin"]
    for p in target.iterdir():
        assert mode_of(p) == 0o600
    assert (target / "a.txt").read_bytes() == b"alpha"
    attachments.remove(str(target))
    assert not target.exists()
    attachments.remove(None)  # nothing to remove is not an error


# -- over the wire ------------------------------------------------------------------------------------------
async def test_spawn_writes_attachments_privately(start_gateway: GatewayFactory, tmp_path: Path) -> None:
    rg = await start_gateway(**MANUAL_TICKS)
    gw = rg.gateway
    raw = bytes(range(256)) * 4
    async with connect(rg) as c:
        res = await spawn(
            c,
            "agent:main:att",
            "[[reply:read them]]",
            attachments=[
                {"name": "notes.txt", "content": "héllo"},
                {"name": "blob.bin", "content": base64.b64encode(raw).decode(), "encoding": "base64"},
            ],
        )
        await settle(gw)
        rec = await stored(gw, res["runId"])
        assert rec is not None
        folder = Path(rec["attachments_dir"])
        assert folder == tmp_path / "state" / "attachments" / res["runId"]
        assert mode_of(folder) == 0o700
        assert (folder / "notes.txt").read_bytes() == "héllo".encode()
        assert (folder / "blob.bin").read_bytes() == raw
        assert {mode_of(folder / n) for n in ("notes.txt", "blob.bin")} == {0o600}
        # The child is told which files it has.
        child = await history(c, res["childSessionKey"])
        assert child[0]["content"].endswith("Attachments: notes.txt, blob.bin")


@pytest.mark.parametrize("name", ["../x", "a/b", ".hidden", ""])
async def test_spawn_refuses_bad_names(start_gateway: GatewayFactory, tmp_path: Path, name: str) -> None:
    rg = await start_gateway(**MANUAL_TICKS)
    async with connect(rg) as c:
        with pytest.raises(ClientError) as err:
            await c.spawn("agent:main:att", "t", attachments=[{"name": name, "content": "x"}])
        assert err.value.code == "INVALID_REQUEST"
        assert (await c.call("subagents.list", {}))["runs"] == []
    assert not (tmp_path / "state" / "attachments").exists() or not any(
        (tmp_path / "state" / "attachments").iterdir()
    )
    assert await rg.gateway.store.count_subagents() == 0


async def test_spawn_refuses_more_than_5_mib(start_gateway: GatewayFactory, tmp_path: Path) -> None:
    # The frame limit is raised so the 5 MiB attachment limit is what refuses.
    rg = await start_gateway(max_payload_bytes=12 * MIB, **MANUAL_TICKS)
    async with connect(rg) as c:
        over = [{"name": "a", "content": "x" * (3 * MIB)}, {"name": "b", "content": "y" * (2 * MIB + 1)}]
        with pytest.raises(ClientError) as err:
            await c.spawn("agent:main:big", "t", attachments=over)
        assert err.value.code == "INVALID_REQUEST"
        assert err.value.details == {"field": "params.attachments", "maxBytes": 5 * MIB}
        exact = [{"name": "a", "content": "x" * (3 * MIB)}, {"name": "b", "content": "y" * (2 * MIB)}]
        res = await spawn(c, "agent:main:big", "[[reply:ok]]", attachments=exact)
        await settle(rg.gateway)
    folder = tmp_path / "state" / "attachments" / res["runId"]
    assert (folder / "a").stat().st_size + (folder / "b").stat().st_size == 5 * MIB
    assert await rg.gateway.store.count_subagents() == 1


async def test_spawn_refuses_invalid_base64(start_gateway: GatewayFactory) -> None:
    rg = await start_gateway(**MANUAL_TICKS)
    async with connect(rg) as c:
        with pytest.raises(ClientError) as err:
            await c.spawn(
                "agent:main:att", "t", attachments=[{"name": "a", "content": "@@@", "encoding": "base64"}]
            )
        assert err.value.code == "INVALID_REQUEST"


# -- rule 8: attachments and the sweep ---------------------------------------------------------------------------
FILES = [{"name": "keep.txt", "content": "kept"}]


# Retained attachments live as long as their child session (docs/disk.md): a session-mode
# child keeps its session after the sweep, so its files stay; a run-mode archive deletes the
# child session, and its files go with it (tests/test_disk_retention.py).
@pytest.mark.parametrize("mode", ["session"])
async def test_rule8_attachments_survive_the_sweep_when_retained_on_keep(
    start_gateway: GatewayFactory, clock: FakeClock, tmp_path: Path, mode: str
) -> None:
    rg = await start_gateway(retain_attachments_on_keep=True, **MANUAL_TICKS)
    gw = rg.gateway
    async with connect(rg) as c:
        res = await spawn(c, "agent:main:r8", "[[reply:x]]", mode=mode, attachments=FILES)
        await settle(gw)
    folder = tmp_path / "state" / "attachments" / res["runId"]
    await clock.advance_async(gw.settings.subagent_archive_after_s + 1)
    assert (await tick(gw))["subagent_archive"] == 1
    assert await stored(gw, res["runId"]) is None
    assert (folder / "keep.txt").read_text() == "kept"


@pytest.mark.parametrize("mode", ["session", "run"])
async def test_rule8_attachments_are_removed_by_the_sweep_otherwise(
    start_gateway: GatewayFactory, clock: FakeClock, tmp_path: Path, mode: str
) -> None:
    rg = await start_gateway(**MANUAL_TICKS)
    gw = rg.gateway
    async with connect(rg) as c:
        res = await spawn(c, "agent:main:r8", "[[reply:x]]", mode=mode, attachments=FILES)
        await settle(gw)
    folder = tmp_path / "state" / "attachments" / res["runId"]
    assert (folder / "keep.txt").exists()  # cleanup `keep` keeps them until the sweep
    await clock.advance_async(gw.settings.subagent_archive_after_s + 1)
    assert (await tick(gw))["subagent_archive"] == 1
    assert not folder.exists()


async def test_rule8_cleanup_delete_removes_attachments_at_cleanup(
    start_gateway: GatewayFactory, tmp_path: Path
) -> None:
    # Even with retain set: retention applies to `keep` only.
    rg = await start_gateway(retain_attachments_on_keep=True, **MANUAL_TICKS)
    gw = rg.gateway
    async with connect(rg) as c:
        res = await spawn(c, "agent:main:r8", "[[reply:x]]", cleanup="delete", attachments=FILES)
        await settle(gw)
    assert not (tmp_path / "state" / "attachments" / res["runId"]).exists()
    assert_partial(
        await stored(gw, res["runId"]),
        {"attachments_dir": None, "ended_reason": "deleted", "status": "ended"},
    )
