"""Settings every process must agree on: recorded at first start, refused on a mismatch, changed only by
``handrail repartition``, which moves waiting entries to their new partitions in order."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from bot import codec, install
from bot.errors import HandrailError, SettingsMismatch
from bot.events import ChannelRef, MessageReceived
from bot.keys import Keys
from bot.repartition import repartition
from bot.runtime import Deps, open_deps
from bot.settings import Settings
from tests.test_cli import Env, run_cli

ALICE = ChannelRef(kind="terminal", address="t", user="terminal:alice")


async def test_the_first_start_records_the_settings_and_a_process_with_another_partition_count_is_refused(
    deps: Deps, settings: Settings
) -> None:
    recorded = json.loads(await deps.redis.get(deps.keys.settings))
    assert recorded == {"encoding": codec.VERSION, "namespace": settings.namespace, "partitions": 4}
    with pytest.raises(SettingsMismatch) as refused:
        async with open_deps(replace(settings, partitions=8), with_config=False):
            pass
    message = str(refused.value)
    assert "HANDRAIL_PARTITIONS=8" in message and "uses 4" in message and "handrail repartition 8" in message
    async with open_deps(settings, with_config=False) as same:  # the same settings start as before
        assert same.keys.partitions == 4


async def test_another_encoding_version_is_refused(
    deps: Deps, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(codec, "VERSION", codec.VERSION + 1)
    with pytest.raises(SettingsMismatch, match=f"version {codec.VERSION} but the installation's events are version"):
        async with open_deps(settings, with_config=False):
            pass


async def test_a_process_whose_settings_went_stale_cannot_publish(deps: Deps, settings: Settings) -> None:
    await deps.redis.set(deps.keys.settings, replace(install.ours(deps.keys), partitions=8).dump())
    with pytest.raises(SettingsMismatch, match="HANDRAIL_PARTITIONS=4 but the installation in Redis"):
        await deps.bus.publish(MessageReceived(thread_id="t1", key="m1", text="hi"))
    assert not await deps.redis.xlen(deps.keys.inbound_for("t1")), "nothing went on the stream"


async def _fill(deps: Deps, threads: int, each: int) -> dict[str, list[str]]:
    """``each`` messages per thread, interleaved across threads; returns each thread's texts in order."""
    sent: dict[str, list[str]] = {f"t{i}": [] for i in range(threads)}
    for n in range(each):
        for tid, texts in sent.items():
            texts.append(f"{tid}-{n}")
            await deps.bus.publish(MessageReceived(thread_id=tid, key=f"{tid}-{n}", text=texts[-1]))
    return sent


async def _texts_by_stream(deps: Deps, keys: Keys) -> dict[str, dict[str, list[str]]]:
    out: dict[str, dict[str, list[str]]] = {}
    async for raw in deps.redis.scan_iter(match=f"{keys.ns}:in:*"):
        for _, fields in await deps.redis.xrange(raw):
            e = codec.decode(fields[b"e"])
            assert isinstance(e, MessageReceived)
            out.setdefault(raw.decode(), {}).setdefault(e.thread_id, []).append(e.text)
    return out


async def test_repartition_moves_every_entry_to_its_new_partition_keeping_each_threads_order(
    deps: Deps, settings: Settings
) -> None:
    sent = await _fill(deps, threads=30, each=4)
    done = await repartition(deps.redis, settings.namespace, 7, lease_ms=settings.lease_ms)
    new = Keys(settings.namespace, 7)
    assert (done.old, done.new, done.dead_lettered) == (4, 7, [])
    found = await _texts_by_stream(deps, new)
    assert {tid: texts for stream in found.values() for tid, texts in stream.items()} == sent
    assert all(stream == new.inbound_for(tid) for stream, by in found.items() for tid in by)
    old = Keys(settings.namespace, 4)
    assert done.moved == sum(len(texts) for t, texts in sent.items() if new.inbound_for(t) != old.inbound_for(t))
    with pytest.raises(SettingsMismatch, match=r"HANDRAIL_PARTITIONS=4 but .* uses 7"):
        async with open_deps(settings, with_config=False):
            pass
    async with open_deps(replace(settings, partitions=7), with_config=False) as after:
        assert await after.bus.publish(MessageReceived(thread_id="t0", key="later", text="t0-later"))

    back = await repartition(deps.redis, settings.namespace, 2, lease_ms=settings.lease_ms)  # and down again
    assert back.old == 7
    found = await _texts_by_stream(deps, Keys(settings.namespace, 2))
    assert sorted(found) == [f"{settings.namespace}:in:0", f"{settings.namespace}:in:1"], "emptied streams go"
    assert {tid: texts for s in found.values() for tid, texts in s.items()} == {**sent, "t0": [*sent["t0"], "t0-later"]}


async def test_repartition_is_refused_while_a_worker_holds_a_partition_and_changes_nothing(
    deps: Deps, settings: Settings
) -> None:
    await _fill(deps, threads=3, each=1)
    before = await deps.redis.get(deps.keys.settings)
    await deps.redis.set(deps.keys.lease(2), "worker-1:7", px=5000)
    with pytest.raises(HandrailError, match=r"partition 2 is leased by worker-1:7.*stop every worker"):
        await repartition(deps.redis, settings.namespace, 8, lease_ms=settings.lease_ms)
    assert await deps.redis.get(deps.keys.settings) == before


async def test_an_interrupted_repartition_refuses_to_start_processes_and_is_finished_by_running_it_again(
    deps: Deps, settings: Settings
) -> None:
    sent = await _fill(deps, threads=10, each=3)
    await deps.redis.set(deps.keys.settings, replace(install.ours(deps.keys), moving_to=5).dump())
    with pytest.raises(SettingsMismatch, match=r"being changed from 4 to 5.*handrail repartition 5"):
        async with open_deps(settings, with_config=False):
            pass
    with pytest.raises(HandrailError, match="finish it first with 'handrail repartition 5'"):
        await repartition(deps.redis, settings.namespace, 6, lease_ms=settings.lease_ms)
    await repartition(deps.redis, settings.namespace, 5, lease_ms=settings.lease_ms)
    found = await _texts_by_stream(deps, Keys(settings.namespace, 5))
    assert {tid: texts for s in found.values() for tid, texts in s.items()} == sent


async def test_an_unreadable_entry_goes_to_the_dead_letter_stream_instead_of_being_stranded(
    deps: Deps, settings: Settings
) -> None:
    await deps.redis.xadd(deps.keys.inbound(3), {"e": b"?garbage"})
    done = await repartition(deps.redis, settings.namespace, 2, lease_ms=settings.lease_ms)
    assert len(done.dead_lettered) == 1
    [(_, fields)] = await deps.bus.dead_letters()
    assert fields["stream"] == deps.keys.inbound(3) and fields["payload"] == "?garbage"


def test_the_repartition_command_says_what_it_did_and_what_to_do_next(deps: Deps, env_for: Env) -> None:
    env = env_for()
    result = run_cli(env, "repartition", "6")
    assert result.returncode == 0, result.stderr
    assert "partitions: 4 -> 6" in result.stdout and "HANDRAIL_PARTITIONS=6" in result.stdout
    refused = run_cli(env, "approvals", "list")  # a process still on 4 is refused, clearly
    assert refused.returncode == 1 and "HANDRAIL_PARTITIONS=4 but" in refused.stderr, refused.stderr
